"""PLLaVA glue: Vicuna tokenizer and the official eval prompt, the tiny and checkpoint loaders, the weight check.

Model surgery, the prompt text and the preprocessing are :mod:`prune.adapters.pllava`; the release's LoRA is merged
by :mod:`prune.adapters.convert_pllava`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from eval.families.contract import (
    BackboneUnavailable,
    ByteIdTokenizer,
    Family,
    HFTokenizer,
    PromptFn,
    hf_home,
    missing_files,
)
from prune.adapters import VideoAdapter
from prune.api import Strategy

if TYPE_CHECKING:
    from eval.backbones import Backbone

__all__ = ["FAMILY", "pllava_inputs"]

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
    missing = missing_files(ckpt, files)
    if missing:
        raise BackboneUnavailable(
            f"PLLaVA-7B files {missing} of {ckpt!r} are not on this machine (looked in {ckpt!r} as a folder and in the "
            f"Hugging Face cache under HF_HOME={hf_home()}). Get the release with `huggingface-cli download {ckpt}` "
            "(about 14 GB: config.json, 3 bf16 safetensors shards holding CLIP ViT-L/14-336, the projector, "
            "Vicuna-7B and the LoRA, and the Llama tokenizer files), or pass model.download=true. The base "
            f"{BASE_REPO} is not needed, since the release holds the full weights and the tokenizer; only a "
            "LoRA+projector-only export would need it, and this loader does not merge onto a base."
        )


def _pllava_tokenizer(cfg: Mapping[str, Any]) -> HFTokenizer:
    from transformers import AutoTokenizer

    from prune.adapters.pllava import IMAGE_TOKEN_ID

    tok = AutoTokenizer.from_pretrained(cfg["checkpoint"])
    if tok.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID:
        raise BackboneUnavailable(
            f"the tokenizer of {cfg['checkpoint']!r} maps <image> to {tok.convert_tokens_to_ids('<image>')}, PLLaVA "
            f"needs {IMAGE_TOKEN_ID}; use the tokenizer shipped with ermu2001/pllava-7b"
        )
    return HFTokenizer(tok, eos_token_ids=(tok.convert_tokens_to_ids("</s>"),))


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


FAMILY = Family(
    name="pllava",
    models=("pllava", "tiny_pllava"),
    adapter=_pllava_adapter,
    loaders={"tiny": _pllava_tiny, "checkpoint": _pllava_checkpoint},
    check=_pllava_check,
    preprocess=_pllava_preprocess,
    prompt=_pllava_prompt,
    tokenizer=_pllava_tokenizer,
    tiny_tokenizer=_pllava_tiny_tokenizer,
)
