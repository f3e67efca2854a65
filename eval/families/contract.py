"""The contract a backbone family fills in (:class:`Family`), and the pieces families build it from.

A family module (``eval/families/<family>.py``) holds one model family's glue: tokenizer choice, prompt builder,
weight check with its download hint, a loader per ``loader:`` value and the preprocessing. It ends with one
``FAMILY = Family(...)`` entry, which :mod:`eval.backbones` discovers; nothing else registers it. Model surgery stays in
the family's adapter, ``prune/adapters/<family>.py``.

This module imports no family and no :mod:`eval.backbones` (the family modules import it, and
:mod:`eval.backbones` imports them), so the import graph stays a tree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from prune.adapters import VideoAdapter
from prune.api import Strategy

if TYPE_CHECKING:
    from eval.backbones import Backbone

__all__ = [
    "BackboneUnavailable",
    "ByteIdTokenizer",
    "Family",
    "HFTokenizer",
    "Loader",
    "PromptFn",
    "hf_home",
    "missing_files",
    "require_local",
]

# (backbone, context) -> ([1, S] ids, extra model inputs); and (model cfg, device, dtype, attention) -> model.
PromptFn = Callable[["Backbone", str], tuple[torch.Tensor, dict[str, Any]]]
Loader = Callable[[Mapping[str, Any], torch.device, torch.dtype, str], Any]


class BackboneUnavailable(RuntimeError):
    """The backbone cannot be built here: missing weights or an unknown family. The message says what to do."""


@dataclass(frozen=True)
class Family:
    """What differs between model families; :func:`eval.backbones.build_backbone` does the rest the same way for all.

    Attributes:
        name: the ``family`` value of the model configs.
        models: the model configs of this family (for messages).
        adapter: ``(model, strategy, model_cfg)`` to the :class:`~prune.adapters.VideoAdapter`.
        loaders: ``loader`` value to ``(model_cfg, device, dtype, attn_implementation)`` -> the model on ``device``.
            ``tiny`` builds a random model from ``seed``; every other loader reads a checkpoint.
        check: ``model_cfg`` -> raises :class:`BackboneUnavailable` when a checkpoint loader's files (and, with
            ``tokenizer: checkpoint``, the tokenizers') are not on this machine; reads only local files.
        preprocess: ``[T, H, W, 3]`` uint8 frames to ``[1, T, 3, h, w]`` pixels.
        prompt: ``model_cfg`` -> the :attr:`Backbone.prompt` callable (it may load the family's extra tokenizer).
        tokenizer: ``model_cfg`` -> the checkpoint's tokenizer (``tokenizer: checkpoint``).
        tiny_tokenizer: the tokenizer-free ids of the tiny model (``tokenizer: bytes``).
    """

    name: str
    models: tuple[str, ...]
    adapter: Callable[[Any, Strategy, Mapping[str, Any]], VideoAdapter]
    loaders: Mapping[str, Loader]
    check: Callable[[Mapping[str, Any]], None]
    preprocess: Callable[[Any], torch.Tensor]
    prompt: Callable[[Mapping[str, Any]], PromptFn]
    tokenizer: Callable[[Mapping[str, Any]], Any]
    tiny_tokenizer: Callable[[], Any]


class ByteIdTokenizer:
    """Tokenizer-free ids for the tiny Llama-family models and the tiny Q-Former: UTF-8 bytes as ids 0..255.

    The special strings a family's prompt needs (``<s>``, ``</s>``, ``<image>``) map to their real ids, so the prompt
    builders see the layout of the real tokenizer. It is callable like a Hugging Face tokenizer (``input_ids`` and
    ``attention_mask`` lists; ``add_special_tokens`` prepends ``bos_token_id``; ``truncation`` keeps ``max_length``
    ids from ``truncation_side``), so the family's own prompt functions (``st_llm_input_ids``) take it unchanged.
    Byte ids can coincide with Llama's specials 0..2 only for control characters, which prompts do not contain.

    Args:
        specials: special string -> id, matched before the bytes.
        bos_token_id: prepended when ``add_special_tokens`` is true; ``None`` prepends nothing.
        eos_token_ids: the generation stops after one of these.
        stops: decoded text is cut at the first of these strings.
        truncation_side: ``"right"`` or ``"left"`` (the ST-LLM Q-Former keeps the end of a long question).
    """

    def __init__(
        self,
        specials: Mapping[str, int] | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        stops: tuple[str, ...] = (),
        truncation_side: str = "right",
    ) -> None:
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.specials = dict(specials or {})
        self.bos_token_id, self.eos_token_ids = bos_token_id, tuple(eos_token_ids)
        self.stops, self.truncation_side = tuple(stops), truncation_side
        # Longest first, so a special that contains another wins.
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS."""
        if self._split is None:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in self._split.split(text):
            ids += [self.specials[piece]] if piece in self.specials else list(piece.encode("utf-8"))
        return ids

    def __call__(
        self, text: str, add_special_tokens: bool = True, truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[int]]:
        ids = self.encode(text)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[len(ids) - max_length :] if self.truncation_side == "left" else ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: list[int]) -> str:
        """Bytes ``id % 256``, special and EOS ids dropped, cut at the first stop string."""
        skip = {*self.eos_token_ids, *self.specials.values(), self.bos_token_id}
        return _cut(bytes(i % 256 for i in ids if i not in skip).decode("utf-8", errors="replace"), self.stops)


class HFTokenizer:
    """A Hugging Face tokenizer with the ``encode``/``decode``/``eos_token_ids`` the ``Backbone`` uses.

    Each family names its stop ids (``<|im_end|>`` exists in the Qwen vocabulary only; Llama's would resolve to
    ``<unk>``). Calling it calls the wrapped tokenizer.

    Args:
        tok: the wrapped tokenizer.
        eos_token_ids: the generation stops after one of these.
        stops: decoded text is cut at the first of these strings.
    """

    def __init__(self, tok, eos_token_ids: tuple[int, ...], stops: tuple[str, ...] = ()) -> None:
        self.tok, self.stops = tok, tuple(stops)
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.tok(text, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return _cut(self.tok.decode(ids, skip_special_tokens=True), self.stops)


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        if stop in text:
            text = text[: text.index(stop)]
    return text


def hf_home() -> str:
    """Where the Hugging Face cache is looked for (for messages)."""
    return os.environ.get("HF_HOME", "~/.cache/huggingface")


def require_local(checkpoint: str, download: bool) -> None:
    """Fail fast, before any network wait, when a hub checkpoint is not on this machine."""
    if download or os.path.isdir(checkpoint):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(checkpoint, "config.json"), str):
        raise BackboneUnavailable(
            f"weights for {checkpoint!r} are not on this machine (looked in {checkpoint!r} as a folder and in the "
            f"Hugging Face cache under HF_HOME={hf_home()}). Get them with "
            f"`huggingface-cli download {checkpoint}`, or pass model.download=true to let from_pretrained fetch them."
        )


def missing_files(source: str, files: tuple[str, ...]) -> list[str]:
    """Which of ``files`` are absent from ``source``: a local folder, else a hub repo id looked up in the HF cache.

    Only the cache is read (``try_to_load_from_cache``), never the network, so a missing checkpoint fails at once.
    """
    if os.path.isdir(source):
        return [f for f in files if not os.path.exists(os.path.join(source, f))]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source) is None:
        return list(files)  # neither a folder nor a repo id: nothing of it can be here
    from huggingface_hub import try_to_load_from_cache

    return [f for f in files if not isinstance(try_to_load_from_cache(source, f), str)]
