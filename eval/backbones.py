"""Backbones for the eval spine: load a model per ``configs/model/*.yaml`` and answer one prompt about one video.

A :class:`Backbone` decodes the video with decord, samples frames uniformly (lmms-eval's ``linspace``), preprocesses
them without torchvision, builds the chat prompt, runs the pruned model through its adapter and returns the answer
with the per-sample stats the records need. Model surgery stays in ``prune/adapters``; this module is glue.

What differs between model families (adapter class, loaders, preprocessing, prompt, tokenizers, the fail-fast check
for missing weights) is one :class:`Family` entry in :data:`FAMILIES`; :func:`build_backbone` is the same for all.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune.adapters import VideoAdapter
from prune.adapters.llava_onevision import LlavaOnevisionAdapter
from prune.adapters.preprocess import preprocess_video, sample_frame_indices
from prune.api import Strategy
from prune.flops import LLMShape

__all__ = [
    "FAMILIES",
    "IMPLEMENTED",
    "Backbone",
    "BackboneUnavailable",
    "ByteIdTokenizer",
    "ByteTokenizer",
    "Family",
    "build_backbone",
    "load_frames",
]

IM_START, IM_END = 151644, 151645  # Qwen2 chat special tokens
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


class BackboneUnavailable(RuntimeError):
    """The backbone cannot be built here: missing weights or an unknown family. The message says what to do."""


class ByteTokenizer:
    """Tokenizer-free ids for tiny random models: UTF-8 bytes as ids 0..255, Qwen chat markers as their real ids.

    Decoding maps every id to ``id % 256`` as a byte, so a random model's output is deterministic garbage text.
    """

    eos_token_ids = (IM_END,)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split("<|im_start|>")):
            if i:
                ids.append(IM_START)
            for j, piece in enumerate(part.split("<|im_end|>")):
                if j:
                    ids.append(IM_END)
                ids += list(piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids if i not in self.eos_token_ids).decode("utf-8", errors="replace")


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


class _HFTokenizer:
    """A Hugging Face tokenizer with the ``encode``/``decode``/``eos_token_ids`` the :class:`Backbone` uses.

    ``eos_token_ids=None`` keeps the Qwen chat rule (the tokenizer's EOS and ``<|im_end|>``); Llama families pass
    theirs, since ``<|im_end|>`` would resolve to ``<unk>`` there. Calling it calls the wrapped tokenizer.
    """

    def __init__(self, tok, eos_token_ids: tuple[int, ...] | None = None, stops: tuple[str, ...] = ()) -> None:
        self.tok, self.stops = tok, tuple(stops)
        if eos_token_ids is None:
            ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
            eos_token_ids = tuple(i for i in ids if isinstance(i, int) and i >= 0)
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


def load_frames(path: str, num_frames: int) -> tuple[Any, int]:
    """Decode ``num_frames`` uniformly sampled frames (lmms-eval's ``linspace`` over the whole clip).

    Args:
        path: an MP4 (any container decord reads) or a folder of frame images (MVBench's TVQA subtask).
        num_frames: frames to sample; a shorter video repeats frames, as ``np.linspace`` with int cast does.

    Returns:
        ``[T, H, W, 3]`` uint8 frames and the video's own frame count.

    Raises:
        FileNotFoundError: no such file. ValueError: the video has no decodable frame.
    """
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):  # a folder of frames
        from PIL import Image

        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise ValueError(f"frame folder has no .jpg/.png frames: {path}")
        idx = sample_frame_indices(len(files), num_frames)
        return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in idx]), len(files)
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as err:  # decord raises its own DECORDError for corrupt files
        raise ValueError(f"cannot decode video {path}: {err}") from err
    total = len(reader)
    if total == 0:
        raise ValueError(f"video has no frames: {path}")
    return reader.get_batch(sample_frame_indices(total, num_frames)).asnumpy(), total


@dataclass
class Prepared:
    """One sample's model inputs, before the adapter runs.

    Attributes:
        input_ids: ``[1, S]`` prompt ids with the adapter's placeholder.
        pixels: ``[1, T, 3, H, W]`` preprocessed frames.
        inputs: extra model inputs (ST-LLM: Q-Former question ids).
        frames: ``[T, H0, W0, 3]`` uint8 sampled frames as decoded (for pictures).
        frames_in_video: the video's own frame count.
        timings: seconds of ``video_decode`` and ``preprocess``.
    """

    input_ids: torch.Tensor
    pixels: torch.Tensor
    inputs: dict[str, Any]
    frames: Any
    frames_in_video: int
    timings: dict[str, float]


@dataclass
class Backbone:
    """One loaded model with a strategy installed, answering one (video, prompt) at a time.

    Attributes:
        name: the model config's name.
        adapter: the family's :class:`~prune.adapters.VideoAdapter`.
        tokenizer: ``encode``/``decode``/``eos_token_ids``.
        num_frames: frames sampled per video.
        device: where the model runs.
        preprocess: ``[T, H, W, 3]`` uint8 frames to ``[1, T, 3, h, w]`` model pixels (the family's transform).
        prompt: ``(backbone, context)`` to ``([1, S]`` prompt ids, extra model inputs).
    """

    name: str
    adapter: VideoAdapter
    tokenizer: Any
    num_frames: int
    device: torch.device
    preprocess: Callable[[Any], torch.Tensor] = preprocess_video
    prompt: Callable[[Backbone, str], tuple[torch.Tensor, dict[str, Any]]] = field(default=None)  # type: ignore[assignment]
    warm: bool = False

    def __post_init__(self) -> None:
        if self.prompt is None:
            self.prompt = qwen_prompt

    @property
    def llm_shape(self) -> LLMShape:
        """LLM dimensions for FLOPs (:mod:`prune.flops`)."""
        c = self.adapter.llm.lm.config
        heads = c.num_attention_heads
        return LLMShape(
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab=c.vocab_size,
        )

    def prompt_ids(self, context: str) -> torch.Tensor:
        """The family's chat prompt around ``context`` with one placeholder, as ``[1, S]`` ids."""
        return self.prompt(self, context)[0]

    def prepare(self, video: str, context: str) -> Prepared:
        """Decode, sample and preprocess ``video`` and build the prompt for ``context``."""
        t0 = time.perf_counter()
        frames, total = load_frames(video, self.num_frames)
        t1 = time.perf_counter()
        pixels = self.preprocess(frames)
        t2 = time.perf_counter()
        ids, inputs = self.prompt(self, context)
        return Prepared(ids, pixels, inputs, frames, total, {"video_decode": t1 - t0, "preprocess": t2 - t1})

    def answer(self, video: str, context: str, gen_kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Answer ``context`` about ``video`` greedily.

        Args:
            video: path of the video (or frame folder).
            context: the task's prompt text.
            gen_kwargs: lmms-eval generation kwargs; ``max_new_tokens`` (default 16) and ``until`` are used.

        Returns:
            The answer text and the per-sample stats.
        """
        sample = self.prepare(video, context)
        max_new = int(gen_kwargs.get("max_new_tokens") or 16)
        run = functools.partial(
            self.adapter.generate,
            sample.input_ids,
            sample.pixels,
            eos_token_ids=self.tokenizer.eos_token_ids,
            **sample.inputs,
        )
        if not self.warm:
            # Warm-up, untimed: the first call of a process pays for kernel selection, allocator growth and lazy
            # initialisation; every recorded sample is measured warm.
            run(max_new_tokens=2)
            self.warm = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = run(max_new_tokens=max_new)
        text = self.tokenizer.decode(gen.tokens)
        for stop in gen_kwargs.get("until") or []:
            if stop and stop in text:
                text = text[: text.index(stop)]
        timings = {**sample.timings, **gen.timings}
        ttft = sum(timings[k] for k in ("video_decode", "preprocess", "vision", "pre_llm", "prefill"))
        steps = gen.llm.new_tokens - 1  # the first token comes from the prefill
        stats = {
            "frames": self.num_frames,
            "frames_in_video": sample.frames_in_video,
            "text_tokens": int((sample.input_ids != self.adapter.placeholder_id).sum()),
            "visual_in": gen.visual_in,
            "visual_pre_llm": gen.visual_pre_llm,
            "separators": gen.separators,
            "separators_unpruned": self.adapter.separators_unpruned,
            "visual_per_layer": gen.llm.visual_per_layer,
            "tokens_per_layer": gen.llm.tokens_per_layer,
            "scoring": [list(s) for s in gen.llm.scoring],
            "kv_len_per_layer": gen.llm.kv_len_per_layer,
            "kv_bytes": gen.llm.kv_bytes,
            "new_tokens": gen.llm.new_tokens,
            "timings_s": timings,
            "ttft_s": ttft,
            "decode_s_per_token": timings["decode"] / steps if steps > 0 else None,
            # GPU: torch.cuda.max_memory_allocated over this sample's generate (reset above). CPU: the process's peak
            # resident set so far (it never decreases, so it bounds this sample's peak from above).
            "peak_mem_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        return text, stats


def qwen_prompt(backbone: Backbone, context: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Qwen chat prompt (lmms-eval's ``qwen_1_5`` template) with one ``<video>`` placeholder before the text."""
    prefix = backbone.tokenizer.encode(QWEN_SYSTEM)
    suffix = backbone.tokenizer.encode("\n" + context + QWEN_ASSISTANT)
    return torch.tensor([prefix + [backbone.adapter.placeholder_id] + suffix]), {}


# (backbone, context) -> ([1, S] ids, extra model inputs); and (model cfg, device, dtype, attention) -> model.
PromptFn = Callable[[Backbone, str], tuple[torch.Tensor, dict[str, Any]]]
Loader = Callable[[Mapping[str, Any], torch.device, torch.dtype, str], Any]


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError as err:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}") from err


def _hf_home() -> str:
    return os.environ.get("HF_HOME", "~/.cache/huggingface")


def _require_local(checkpoint: str, download: bool) -> None:
    """Fail fast, before any network wait, when a hub checkpoint is not on this machine."""
    if download or os.path.isdir(checkpoint):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(checkpoint, "config.json"), str):
        raise BackboneUnavailable(
            f"weights for {checkpoint!r} are not on this machine (looked in {checkpoint!r} as a folder and in the "
            f"Hugging Face cache under HF_HOME={_hf_home()}). Get them with "
            f"`huggingface-cli download {checkpoint}`, or pass model.download=true to let from_pretrained fetch them."
        )


def _missing(source: str, files: tuple[str, ...]) -> list[str]:
    """Which of ``files`` are absent from ``source``: a local folder, else a hub repo id looked up in the HF cache.

    Only the cache is read (``try_to_load_from_cache``), never the network, so a missing checkpoint fails at once.
    """
    if os.path.isdir(source):
        return [f for f in files if not os.path.exists(os.path.join(source, f))]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source) is None:
        return list(files)  # neither a folder nor a repo id: nothing of it can be here
    from huggingface_hub import try_to_load_from_cache

    return [f for f in files if not isinstance(try_to_load_from_cache(source, f), str)]


# -- LLaVA-OneVision / LLaVA-Video --------------------------------------------------------------------------------


def _ov_tiny(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.llava_onevision import tiny_llava_onevision

    model = tiny_llava_onevision(seed=int(cfg.get("seed", 0)), attn_implementation=attn, llm_layers=cfg["llm_layers"])
    return model.to(dev, dtype)


def _ov_hf(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.llava_onevision import load_llava_onevision

    return load_llava_onevision(cfg["checkpoint"], dtype=dtype, attn_implementation=attn).to(dev)


def _ov_llava_video(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.convert_llava_video import load_llava_video

    return load_llava_video(cfg["checkpoint"], dtype=dtype, attn_implementation=attn).to(dev)


def _ov_check(cfg: Mapping[str, Any]) -> None:
    _require_local(cfg["checkpoint"], download=False)


def _ov_tokenizer(cfg: Mapping[str, Any]) -> _HFTokenizer:
    from transformers import AutoTokenizer

    return _HFTokenizer(AutoTokenizer.from_pretrained(cfg["checkpoint"]))


def _ov_adapter(model, strategy: Strategy, cfg: Mapping[str, Any]) -> VideoAdapter:
    return LlavaOnevisionAdapter(model, strategy, cfg["layout"], num_frames=int(cfg["num_frames"]))


# -- PLLaVA -------------------------------------------------------------------------------------------------------

# Files of ermu2001/pllava-7b the backbone reads: the converter's config and shard index, and the tokenizer the
# official eval loads from the same folder (PllavaProcessor.from_pretrained(repo_id) in tasks/eval/model_utils.py).
_PLLAVA_WEIGHTS = ("config.json", "model.safetensors.index.json")
_PLLAVA_TOKENIZER = ("tokenizer_config.json",)


def _pllava_tiny(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.pllava import tiny_pllava

    return tiny_pllava(seed=int(cfg.get("seed", 0)), attn_implementation=attn, llm_layers=cfg["llm_layers"]).to(
        dev, dtype
    )


def _pllava_checkpoint(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.convert_pllava import DEFAULT_LORA_ALPHA
    from prune.adapters.pllava import load_pllava

    alpha = cfg.get("lora_alpha")
    alpha = DEFAULT_LORA_ALPHA if alpha is None else float(alpha)
    return load_pllava(cfg["checkpoint"], dtype=dtype, attn_implementation=attn, lora_alpha=alpha).to(dev)


def _pllava_check(cfg: Mapping[str, Any]) -> None:
    from prune.adapters.convert_pllava import BASE_REPO

    ckpt = cfg["checkpoint"]
    # A local export may be a single model.safetensors; the converter checks its shards itself.
    files = ("config.json",) if os.path.isdir(ckpt) else _PLLAVA_WEIGHTS
    files += _PLLAVA_TOKENIZER if cfg.get("tokenizer", "bytes") == "checkpoint" else ()
    missing = _missing(ckpt, files)
    if missing:
        raise BackboneUnavailable(
            f"PLLaVA-7B files {missing} of {ckpt!r} are not on this machine (looked in {ckpt!r} as a folder and in the "
            f"Hugging Face cache under HF_HOME={_hf_home()}). Get the release with `huggingface-cli download {ckpt}` "
            "(about 14 GB: config.json, 3 bf16 safetensors shards holding CLIP ViT-L/14-336, the projector, "
            "Vicuna-7B and the LoRA, and the Llama tokenizer files), or pass model.download=true. The base "
            f"{BASE_REPO} is not needed, since the release holds the full weights and the tokenizer; only a "
            "LoRA+projector-only export would need it, and this loader does not merge onto a base."
        )


def _pllava_tokenizer(cfg: Mapping[str, Any]) -> _HFTokenizer:
    from transformers import AutoTokenizer

    from prune.adapters.pllava import IMAGE_TOKEN_ID

    tok = AutoTokenizer.from_pretrained(cfg["checkpoint"])
    if tok.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID:
        raise BackboneUnavailable(
            f"the tokenizer of {cfg['checkpoint']!r} maps <image> to {tok.convert_tokens_to_ids('<image>')}, PLLaVA "
            f"needs {IMAGE_TOKEN_ID}; use the tokenizer shipped with ermu2001/pllava-7b"
        )
    return _HFTokenizer(tok, eos_token_ids=(tok.convert_tokens_to_ids("</s>"),))


def _pllava_tiny_tokenizer() -> ByteIdTokenizer:
    from prune.adapters.pllava import IMAGE_TOKEN_ID

    # Vicuna's <s> = 1 and </s> = 2, and <image> = 32000 of the llava-hf vocabulary the tiny model keeps.
    return ByteIdTokenizer({"<s>": 1, "</s>": 2, "<image>": IMAGE_TOKEN_ID}, bos_token_id=1, eos_token_ids=(2,))


def _pllava_prompt(cfg: Mapping[str, Any]) -> PromptFn:
    return functools.partial(
        pllava_inputs,
        task=cfg.get("prompt_task") or "mvbench",
        post_query=cfg.get("post_query", "\nOnly give the best option."),
        answer_prefix=cfg.get("answer_prefix", "Best option:("),
    )


def pllava_inputs(
    backbone: Backbone, context: str, task: str = "mvbench", post_query: str = "", answer_prefix: str = ""
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PLLaVA's eval prompt (:func:`~prune.adapters.pllava.pllava_prompt`) as ``[1, S]`` ids, no extra inputs.

    The whole prompt is tokenized with special tokens, as ``PllavaProcessor`` does: ``<s>`` in front and ``<image>``
    as the single id :data:`~prune.adapters.pllava.IMAGE_TOKEN_ID`.

    Raises:
        ValueError: the tokenizer did not produce exactly one ``<image>`` id.
    """
    from prune.adapters.pllava import IMAGE_TOKEN_ID, pllava_prompt

    text = pllava_prompt(context, task=task, post_query=post_query, answer_prefix=answer_prefix)
    ids = list(backbone.tokenizer(text)["input_ids"])
    if ids.count(IMAGE_TOKEN_ID) != 1:
        raise ValueError(
            f"the PLLaVA prompt must hold one <image> id {IMAGE_TOKEN_ID}, got {ids.count(IMAGE_TOKEN_ID)}"
        )
    return torch.tensor([ids]), {}


def _pllava_adapter(model, strategy: Strategy, cfg: Mapping[str, Any]) -> VideoAdapter:
    from prune.adapters.pllava import PllavaAdapter

    return PllavaAdapter(model, strategy, num_frames=int(cfg["num_frames"]))


def _pllava_preprocess(frames: Any) -> torch.Tensor:
    from prune.adapters.pllava import preprocess_pllava

    return preprocess_pllava(frames)


# -- ST-LLM -------------------------------------------------------------------------------------------------------

# bert-base-uncased files AutoTokenizer reads (its tokenizer_config names no class, so config.json is read too).
_BERT_FILES = ("config.json", "tokenizer_config.json", "vocab.txt")


def _st_llm_subfolder(cfg: Mapping[str, Any]) -> str:
    from prune.adapters.st_llm import HF_SUBFOLDER

    return cfg.get("subfolder") or HF_SUBFOLDER


def _st_llm_tiny(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.st_llm import tiny_st_llm

    return tiny_st_llm(seed=int(cfg.get("seed", 0)), attn_implementation=attn, llm_layers=cfg["llm_layers"]).to(
        dev, dtype
    )


def _st_llm_checkpoint(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.st_llm import load_st_llm

    return load_st_llm(
        cfg["checkpoint"], dtype=dtype, attn_implementation=attn, device_map=dev, subfolder=_st_llm_subfolder(cfg)
    )


def _st_llm_check(cfg: Mapping[str, Any]) -> None:
    from prune.adapters.st_llm import QFORMER_TOKENIZER

    ckpt, sub = cfg["checkpoint"], _st_llm_subfolder(cfg)
    # tokenizer.model is the one tokenizer file the release is known to hold (docs/st_llm.md); it is enough to load.
    vicuna = ("tokenizer.model",) if cfg.get("tokenizer", "bytes") == "checkpoint" else ()
    if os.path.isdir(ckpt):
        # A local folder is the subfolder itself or holds it; its shards may be unindexed (the converter globs them).
        folder = os.path.join(ckpt, sub) if os.path.isdir(os.path.join(ckpt, sub)) else ckpt
        missing = _missing(folder, ("config.json", *vicuna))
    else:
        missing = _missing(ckpt, tuple(f"{sub}/{f}" for f in ("config.json", "pytorch_model.bin.index.json", *vicuna)))
    bert = cfg.get("qformer_tokenizer") or QFORMER_TOKENIZER
    bert_missing = _missing(bert, _BERT_FILES) if cfg.get("tokenizer", "bytes") == "checkpoint" else []
    if not missing and not bert_missing:
        return
    parts = []
    if missing:
        parts.append(
            f"the ST-LLM-7B files {missing} of {ckpt!r}: get them with `huggingface-cli download {ckpt} --include "
            f"'{sub}/*'` (about 16 GB: two bf16 .bin shards holding EVA ViT-g, the BT-Adapter, the InstructBLIP "
            "Q-Former and Vicuna-7B v1.1, their index, config.json and the Vicuna tokenizer; no base weights needed)"
        )
    if bert_missing:
        parts.append(
            f"the Q-Former tokenizer files {bert_missing} of {bert!r}: get them with `huggingface-cli download {bert} "
            f"{' '.join(_BERT_FILES)}`"
        )
    raise BackboneUnavailable(
        f"backbone {cfg['name']!r} needs files that are not on this machine (looked in local folders and in the "
        f"Hugging Face cache under HF_HOME={_hf_home()}): " + "; and ".join(parts) + ". Or pass model.download=true."
    )


def _st_llm_tokenizer(cfg: Mapping[str, Any]) -> _HFTokenizer:
    from transformers import AutoTokenizer

    from prune.adapters.st_llm import EOS_TOKEN_IDS

    ckpt, sub = cfg["checkpoint"], _st_llm_subfolder(cfg)
    if os.path.isdir(ckpt):
        folder = os.path.join(ckpt, sub)
        tok = AutoTokenizer.from_pretrained(folder if os.path.isdir(folder) else ckpt)
    else:
        tok = AutoTokenizer.from_pretrained(ckpt, subfolder=sub)
    # The official answer is cut at "###", whose two-token form [2277, 29937] no single-id stop catches.
    return _HFTokenizer(tok, eos_token_ids=EOS_TOKEN_IDS, stops=("###",))


def _st_llm_tiny_tokenizer() -> ByteIdTokenizer:
    from prune.adapters.st_llm import EOS_TOKEN_IDS

    # st_llm_input_ids prepends TEXT_BOS_ID itself, so no BOS here; </s> keeps its real id.
    return ByteIdTokenizer({"</s>": 2}, eos_token_ids=EOS_TOKEN_IDS, stops=("###",))


def _st_llm_prompt(cfg: Mapping[str, Any]) -> PromptFn:
    from prune.adapters.st_llm import QFORMER_TOKENIZER, QFORMER_TRUNCATION_SIDE

    if cfg.get("tokenizer", "bytes") == "bytes":
        qformer: Any = ByteIdTokenizer(truncation_side=QFORMER_TRUNCATION_SIDE)  # bytes lie inside BERT's 30523
    else:
        from transformers import AutoTokenizer

        qformer = AutoTokenizer.from_pretrained(
            cfg.get("qformer_tokenizer") or QFORMER_TOKENIZER, truncation_side=QFORMER_TRUNCATION_SIDE
        )
    return functools.partial(st_llm_inputs, qformer_tokenizer=qformer)


def st_llm_inputs(backbone: Backbone, context: str, qformer_tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """ST-LLM's QA prompt ids (:func:`~prune.adapters.st_llm.st_llm_input_ids`) and the Q-Former's question ids.

    The Q-Former reads ``context`` tokenized as ``STLLMModel`` does: BERT with special tokens, truncated from the
    left to :data:`~prune.adapters.st_llm.QFORMER_MAX_LEN`.

    Returns:
        ``[1, S]`` ids and ``{"qformer_input_ids": [1, M], "qformer_attention_mask": [1, M]}``.
    """
    from prune.adapters.st_llm import QFORMER_MAX_LEN, st_llm_input_ids

    q = qformer_tokenizer(context, truncation=True, max_length=QFORMER_MAX_LEN)
    extra = {
        "qformer_input_ids": torch.tensor([list(q["input_ids"])]),
        "qformer_attention_mask": torch.tensor([list(q["attention_mask"])]),
    }
    return st_llm_input_ids(backbone.tokenizer, context), extra


def _st_llm_adapter(model, strategy: Strategy, cfg: Mapping[str, Any]) -> VideoAdapter:
    from prune.adapters.st_llm import StLlmAdapter

    limit = cfg.get("max_input_tokens")
    return StLlmAdapter(
        model, strategy, num_frames=int(cfg["num_frames"]), max_input_tokens=None if limit is None else int(limit)
    )


def _st_llm_preprocess(frames: Any) -> torch.Tensor:
    from prune.adapters.st_llm import preprocess_st_llm

    return preprocess_st_llm(frames)


# -- the table ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What differs between model families; :func:`build_backbone` does the rest the same way for all.

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


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llava_onevision",
            models=("llava_ov", "llava_video", "tiny_llava_ov", "tiny_llava_video"),
            adapter=_ov_adapter,
            loaders={"tiny": _ov_tiny, "hf": _ov_hf, "llava_video": _ov_llava_video},
            check=_ov_check,
            preprocess=preprocess_video,
            prompt=lambda cfg: qwen_prompt,
            tokenizer=_ov_tokenizer,
            tiny_tokenizer=ByteTokenizer,
        ),
        Family(
            name="pllava",
            models=("pllava", "tiny_pllava"),
            adapter=_pllava_adapter,
            loaders={"tiny": _pllava_tiny, "checkpoint": _pllava_checkpoint},
            check=_pllava_check,
            preprocess=_pllava_preprocess,
            prompt=_pllava_prompt,
            tokenizer=_pllava_tokenizer,
            tiny_tokenizer=_pllava_tiny_tokenizer,
        ),
        Family(
            name="st_llm",
            models=("st_llm", "tiny_st_llm"),
            adapter=_st_llm_adapter,
            loaders={"tiny": _st_llm_tiny, "checkpoint": _st_llm_checkpoint},
            check=_st_llm_check,
            preprocess=_st_llm_preprocess,
            prompt=_st_llm_prompt,
            tokenizer=_st_llm_tokenizer,
            tiny_tokenizer=_st_llm_tiny_tokenizer,
        ),
    )
}
IMPLEMENTED = tuple(FAMILIES)


def build_backbone(cfg: Mapping[str, Any], strategy: Strategy, device: str = "auto") -> Backbone:
    """Load the model a ``configs/model`` entry describes and install ``strategy`` on it.

    Args:
        cfg: the model config (``family``, ``loader``, ``checkpoint``, ``num_frames``, ``dtype``, ``tokenizer``, and
            the family's own keys, e.g. PLLaVA's ``lora_alpha``, ST-LLM's ``max_input_tokens``).
        strategy: the pruning method to install.
        device: ``auto`` (CUDA when available), or a torch device string.

    Raises:
        BackboneUnavailable: unknown family, or the weights or tokenizers are missing; the message says what to do.
        ValueError: an unknown loader or dtype for the family.
    """
    family_name, loader_name = cfg["family"], cfg["loader"]
    family = FAMILIES.get(family_name)
    if family is None:
        models = ", ".join(m for f in FAMILIES.values() for m in f.models)
        raise BackboneUnavailable(
            f"backbone {cfg['name']!r} (family {family_name!r}) has no adapter; available families: {IMPLEMENTED} "
            f"(models {models})"
        )
    if loader_name not in family.loaders:
        raise ValueError(f"model.loader must be one of {sorted(family.loaders)} for {family_name}, got {loader_name!r}")
    tokenizer_kind = cfg.get("tokenizer", "bytes")
    if tokenizer_kind not in ("bytes", "checkpoint"):
        raise ValueError(f"model.tokenizer must be bytes or checkpoint, got {tokenizer_kind!r}")
    if loader_name != "tiny" and not cfg.get("download", False):
        family.check(cfg)  # before anything slow: a missing checkpoint must not cost a model load or a network wait
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    dtype = _dtype(cfg.get("dtype", "float32"))
    try:
        model = family.loaders[loader_name](cfg, dev, dtype, cfg.get("attn_implementation", "sdpa"))
    except FileNotFoundError as err:  # the converters name what to download
        raise BackboneUnavailable(str(err)) from err
    tokenizer = family.tiny_tokenizer() if tokenizer_kind == "bytes" else family.tokenizer(cfg)
    adapter = family.adapter(model, strategy, cfg)
    return Backbone(
        cfg["name"],
        adapter,
        tokenizer,
        int(cfg["num_frames"]),
        dev,
        preprocess=family.preprocess,
        prompt=family.prompt(cfg),
    )


def flops_of(stats: Mapping[str, Any], shape: LLMShape) -> dict[str, float]:
    """FLOPs of one sample from its logged per-layer token counts (:mod:`prune.flops`).

    Returns:
        ``prefill``/``prefill_full``: the papers' convention (FastV) as run and unpruned, for ``flops_ratio``;
        ``prefill_exact``/``prefill_exact_full``: executed FLOPs (GQA, SwiGLU, LM head) as run and unpruned, the run
        including the scoring rows of the in-LLM stages (``scoring``); ``decode_exact``: the decode steps as run.
    """
    from prune.flops import exact_decode_flops, exact_prefill_flops, prefill_flops, tokens_per_layer

    per_layer = stats.get("tokens_per_layer") or tokens_per_layer(
        stats["visual_per_layer"], stats["text_tokens"] + stats["separators"]
    )
    full_n = stats["text_tokens"] + stats["separators_unpruned"] + stats["visual_in"]
    full = [full_n] * shape.layers
    scoring = [tuple(s) for s in stats.get("scoring", [])]
    prefill_exact = exact_prefill_flops(per_layer, shape, scoring)
    return {
        "prefill": prefill_flops(per_layer, shape.hidden, shape.ffn),
        "prefill_full": prefill_flops(full, shape.hidden, shape.ffn),
        "prefill_exact": prefill_exact,
        "prefill_exact_full": exact_prefill_flops(full, shape),
        "scoring": prefill_exact - exact_prefill_flops(per_layer, shape),
        "decode_exact": exact_decode_flops(stats["kv_len_per_layer"], shape, stats["new_tokens"]),
    }
