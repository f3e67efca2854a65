"""LLaVA-OneVision and LLaVA-Video glue: Qwen chat prompt and tokenizers, four loaders, the weight checks.

The fourth loader, ``probe``, reads the committed known-answer probe model (``model=probe_llava_ov``, docs/probe.md)
with its word-level tokenizer (:class:`eval.probe.ProbeTokenizer`).

Model surgery is :mod:`prune.adapters.llava_onevision`; LLaVA-Video's original checkpoint is mapped onto the same
class by :mod:`prune.adapters.convert_llava_video`. Preprocessing is :func:`prune.adapters.preprocess.preprocess_video`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eval.families.contract import BackboneUnavailable, Family, HFTokenizer, require_local
from prune.adapters import VideoAdapter
from prune.adapters.llava_onevision import LlavaOnevisionAdapter
from prune.adapters.preprocess import preprocess_video
from prune.api import Strategy

if TYPE_CHECKING:
    from eval.backbones import Backbone

__all__ = ["FAMILY", "ByteTokenizer", "qwen_prompt"]

IM_START, IM_END = 151644, 151645  # Qwen2 chat special tokens
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


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


def qwen_prompt(backbone: Backbone, context: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Qwen chat prompt (lmms-eval's ``qwen_1_5`` template) with one ``<video>`` placeholder before the text."""
    prefix = backbone.tokenizer.encode(QWEN_SYSTEM)
    suffix = backbone.tokenizer.encode("\n" + context + QWEN_ASSISTANT)
    return torch.tensor([prefix + [backbone.adapter.placeholder_id] + suffix]), {}


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
    require_local(cfg["checkpoint"], download=False)


def _ov_tokenizer(cfg: Mapping[str, Any]) -> HFTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg["checkpoint"])
    # The Qwen chat rule: the tokenizer's EOS and <|im_end|>, whichever resolve.
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    return HFTokenizer(tok, eos_token_ids=tuple(i for i in ids if isinstance(i, int) and i >= 0))


# The known-answer probe model (docs/probe.md): a committed folder and the probe's word-level tokenizer.
_PROBE_FILES = ("config.json", "model.safetensors", "vocab.json")


def _repo_path(path: str) -> Path:
    """``path`` as given when it exists, else relative to the repository root (configs name repo files that way)."""
    return Path(path) if os.path.exists(path) else Path(__file__).resolve().parents[2] / path


def _ov_probe(cfg: Mapping[str, Any], dev: torch.device, dtype: torch.dtype, attn: str):
    from prune.adapters.llava_onevision import load_llava_onevision

    return load_llava_onevision(str(_repo_path(cfg["checkpoint"])), dtype=dtype, attn_implementation=attn).to(dev)


def _ov_probe_check(cfg: Mapping[str, Any]) -> None:
    folder = _repo_path(cfg["checkpoint"])
    missing = [f for f in _PROBE_FILES if not (folder / f).is_file()]
    if missing:
        raise BackboneUnavailable(
            f"the probe model {cfg['name']!r} has no {missing} in {folder}; it is committed with the repository "
            "(tests/fixtures/probe_llava_ov), or rebuild it with `make probe-model`"
        )


def _ov_probe_tokenizer(cfg: Mapping[str, Any]) -> Any:
    from eval.probe import PROBE_VOCAB, ProbeTokenizer

    vocab = json.loads((_repo_path(cfg["checkpoint"]) / "vocab.json").read_text())
    if tuple(vocab) != PROBE_VOCAB:
        raise BackboneUnavailable(
            f"{cfg['checkpoint']}/vocab.json differs from eval.probe.PROBE_VOCAB: the checkpoint was trained with "
            "another vocabulary; retrain it with `make probe-model`"
        )
    return ProbeTokenizer()


def _check(cfg: Mapping[str, Any]) -> None:
    (_ov_probe_check if cfg["loader"] == "probe" else _ov_check)(cfg)


def _tokenizer(cfg: Mapping[str, Any]) -> Any:
    return (_ov_probe_tokenizer if cfg["loader"] == "probe" else _ov_tokenizer)(cfg)


def _ov_pooling_head(model, strategy: Strategy, cfg: Mapping[str, Any]):
    """SigLIP's pooling head for strategies that need it (FastVID), else ``None``.

    Seeded random on the tiny and probe models (their towers are not SigLIP so400m, so no checkpoint head fits);
    otherwise restored from the SigLIP checkpoint ``model.siglip_checkpoint`` (default
    google/siglip-so400m-patch14-384), as FastVID does.
    """
    from prune.adapters.vision import SIGLIP_REPO, load_siglip_pooling_head, siglip_pooling_head
    from prune.api import vision_inputs

    if not vision_inputs(strategy) & {"frame_global", "frame_head_attn"}:
        return None
    vision = model.config.vision_config
    param = next(model.parameters())
    if cfg["loader"] in ("tiny", "probe"):
        head = siglip_pooling_head(vision, seed=int(cfg.get("seed", 0)))
        return head.to(device=param.device, dtype=param.dtype)
    try:
        return load_siglip_pooling_head(cfg.get("siglip_checkpoint") or SIGLIP_REPO, vision, param.dtype, param.device)
    except FileNotFoundError as err:
        raise BackboneUnavailable(str(err)) from err


def _ov_adapter(model, strategy: Strategy, cfg: Mapping[str, Any]) -> VideoAdapter:
    head = _ov_pooling_head(model, strategy, cfg)
    return LlavaOnevisionAdapter(model, strategy, cfg["layout"], num_frames=int(cfg["num_frames"]), pooling_head=head)


FAMILY = Family(
    name="llava_onevision",
    models=("llava_ov", "llava_video", "tiny_llava_ov", "tiny_llava_video", "probe_llava_ov"),
    adapter=_ov_adapter,
    loaders={"tiny": _ov_tiny, "hf": _ov_hf, "llava_video": _ov_llava_video, "probe": _ov_probe},
    check=_check,
    preprocess=preprocess_video,
    prompt=lambda cfg: qwen_prompt,
    tokenizer=_tokenizer,
    tiny_tokenizer=ByteTokenizer,
)
