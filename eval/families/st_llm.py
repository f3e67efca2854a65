"""ST-LLM glue: Vicuna and Q-Former tokenizers, the QA prompt with the Q-Former's question ids, loaders, weight check.

Model surgery, the prompt ids and the preprocessing are :mod:`prune.adapters.st_llm`; the release is loaded through
:mod:`prune.adapters.convert_st_llm`.
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

__all__ = ["FAMILY", "st_llm_inputs"]

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
    from prune.adapters.convert_st_llm import load_st_llm

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
        missing = missing_files(folder, ("config.json", *vicuna))
    else:
        missing = missing_files(
            ckpt, tuple(f"{sub}/{f}" for f in ("config.json", "pytorch_model.bin.index.json", *vicuna))
        )
    bert = cfg.get("qformer_tokenizer") or QFORMER_TOKENIZER
    bert_missing = missing_files(bert, _BERT_FILES) if cfg.get("tokenizer", "bytes") == "checkpoint" else []
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
        f"Hugging Face cache under HF_HOME={hf_home()}): " + "; and ".join(parts) + ". Or pass model.download=true."
    )


def _st_llm_tokenizer(cfg: Mapping[str, Any]) -> HFTokenizer:
    from transformers import AutoTokenizer

    from prune.adapters.st_llm import EOS_TOKEN_IDS

    ckpt, sub = cfg["checkpoint"], _st_llm_subfolder(cfg)
    if os.path.isdir(ckpt):
        folder = os.path.join(ckpt, sub)
        tok = AutoTokenizer.from_pretrained(folder if os.path.isdir(folder) else ckpt)
    else:
        tok = AutoTokenizer.from_pretrained(ckpt, subfolder=sub)
    # The official answer is cut at "###", whose two-token form [2277, 29937] no single-id stop catches.
    return HFTokenizer(tok, eos_token_ids=EOS_TOKEN_IDS, stops=("###",))


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


FAMILY = Family(
    name="st_llm",
    models=("st_llm", "tiny_st_llm"),
    adapter=_st_llm_adapter,
    loaders={"tiny": _st_llm_tiny, "checkpoint": _st_llm_checkpoint},
    check=_st_llm_check,
    preprocess=_st_llm_preprocess,
    prompt=_st_llm_prompt,
    tokenizer=_st_llm_tokenizer,
    tiny_tokenizer=_st_llm_tiny_tokenizer,
)
