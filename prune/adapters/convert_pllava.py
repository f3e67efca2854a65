"""Load the released PLLaVA-7B checkpoint (``ermu2001/pllava-7b``) into transformers' ``LlavaForConditionalGeneration``.

PLLaVA (Xu et al., "PLLaVA: Parameter-free LLaVA Extension from Images to Videos for Video Dense Captioning",
arXiv 2404.16994) is saved by its own ``PllavaForConditionalGeneration`` (``magic-research/PLLaVA:
models/pllava/modeling_pllava.py``, transformers 4.37), whose language model is wrapped by peft's ``get_peft_model``
(LoRA on ``q_proj``/``v_proj``, ``tasks/eval/model_utils.py:load_pllava``). Its module tree is LLaVA's: a CLIP
vision tower, a two-layer GELU projector (``linear_1``/``linear_2``) and a Llama. Only the 3-D pooling after the
projector is PLLaVA's own, and it has no weights, so the adapter (:mod:`prune.adapters.pllava`) does it. See
``backbones.md`` §1.3 and ``docs/pllava.md``.

Key mapping, original (peft-wrapped ``PllavaForConditionalGeneration``) -> transformers 5.23
``LlavaForConditionalGeneration``:

================================================================  ==================================================
original                                                          converted
================================================================  ==================================================
``vision_tower.vision_model.<rest>``                              ``model.vision_tower.<rest>`` (5.x ``CLIPVisionModel``
                                                                  has no ``vision_model`` level)
``multi_modal_projector.linear_{1,2}.{weight,bias}``              ``model.multi_modal_projector.linear_{1,2}.*``
``language_model.base_model.model.model.<rest>``                  ``model.language_model.<rest>``
``language_model.base_model.model.lm_head.weight``                ``lm_head.weight``
``...<module>.base_layer.weight``                                 ``...<module>.weight`` + (α / r) · B @ A
``...<module>.lora_A.default.weight`` ``[r, in]``                 merged into the weight above
``...<module>.lora_B.default.weight`` ``[out, r]``                merged into the weight above
================================================================  ==================================================

The peft prefix ``base_model.model.`` and the ``base_layer`` level are optional, so an already merged or unwrapped
checkpoint (``language_model.model.*``, ``q_proj.weight``) converts too. ``base_layer`` is peft >= 0.7's name for
the wrapped weight (PLLaVA pins peft 0.10); ``default`` is peft's adapter name. Any other key raises.

**LoRA scale.** peft computes ``W x + (lora_alpha / r) · B A x`` (no rsLoRA). The checkpoint stores neither
``lora_alpha`` nor ``r``: r is read from the ``lora_A`` shapes (128 in the release), and ``lora_alpha`` is a load
option because the official scripts disagree. PLLaVA's own ``scripts/eval.sh`` uses ``lora_alpha=4`` (scale
4/128 = 0.03125) for every benchmark; PruneVid's ``scripts/eval.sh`` (``Visual-AI/PruneVid``), whose tables this
harness reproduces, uses **14** (scale 0.109375) for MVBench, VideoMME and EgoSchema and 4 for VideoChatGPT-Bench.
The default here is 14. Merging is done in float32 and cast once to the load dtype; the official model instead runs
the unmerged bf16 LoRA branch, so bf16 results differ at rounding level.

Shape legend: ``D`` LLM hidden size, ``Dv`` vision hidden size, ``r`` LoRA rank, ``V`` vocabulary.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from prune.adapters.checkpoint import read_safetensors, rename_keys, resolve_dir, short_keys

__all__ = [
    "BASE_REPO",
    "CLIP_L14_336",
    "DEFAULT_LORA_ALPHA",
    "HUB_REPO",
    "IGNORED_KEYS",
    "KEY_MAP",
    "Conversion",
    "config_from_original",
    "convert_state_dict",
    "download_hint",
    "load_original",
]

HUB_REPO = "ermu2001/pllava-7b"
BASE_REPO = "llava-hf/llava-v1.6-vicuna-7b-hf"
DEFAULT_LORA_ALPHA = 14.0  # PruneVid scripts/eval.sh for MVBench/VideoMME/EgoSchema; PLLaVA's own scripts use 4

# Original key -> transformers 5.23 key, first match wins; anchored so an unlisted key fails instead of being renamed.
# LoRA keys are handled before this table (see convert_state_dict).
_LM = r"^language_model\.(?:base_model\.model\.)?"
KEY_MAP: list[tuple[str, str]] = [
    (r"^vision_tower\.vision_model\.(.+)$", r"model.vision_tower.\1"),
    (r"^multi_modal_projector\.(linear_[12])\.(weight|bias)$", r"model.multi_modal_projector.\1.\2"),
    (_LM + r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)$", r"model.language_model.\1"),
    (_LM + r"lm_head\.weight$", r"lm_head.weight"),
]
_LORA = re.compile(_LM + r"(model\.layers\.\d+\..+)\.lora_([AB])\.default\.weight$")
# Non-persistent buffers some exports carry; both are rebuilt at construction.
IGNORED_KEYS: list[str] = [r"\.rotary_emb\.inv_freq$", r"\.embeddings\.position_ids$"]

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower PllavaConfig builds when none is given. Used as the
# fallback for fields the saved config omits (transformers 4.x saves nested configs as a diff).
CLIP_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_VISION_FIELDS = (*CLIP_L14_336, "num_channels", "attention_dropout", "initializer_range", "initializer_factor")
# Llama fields read from the saved text_config; absent ones take LlamaConfig's defaults, which are Llama-7B's (the
# same defaults 4.37 diffed against when saving).
_TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]


@dataclass(frozen=True)
class Conversion:
    """A converted state dict and what the LoRA merge did.

    Attributes:
        state_dict: tensors under ``LlavaForConditionalGeneration`` keys, LoRA merged.
        merged: converted keys of the weights a LoRA pair was merged into, sorted.
        ranks: the LoRA ranks found (``(128,)`` for the release; ``()`` without LoRA keys).
        lora_alpha: the α used; the scale of a module of rank r is ``lora_alpha / r``.
    """

    state_dict: dict[str, Tensor]
    merged: tuple[str, ...]
    ranks: tuple[int, ...]
    lora_alpha: float


def download_hint(repo: str = HUB_REPO) -> str:
    """What to download for PLLaVA-7B, with sizes; used by every missing-weights error."""
    return (
        f"download {repo} (about 14 GB: config.json and 3 bf16 safetensors shards holding the CLIP ViT-L/14-336 "
        f"tower, the projector, Vicuna-7B and the LoRA weights) with `huggingface-cli download {repo} --include "
        "config.json '*.safetensors' model.safetensors.index.json` and pass the snapshot directory, or point HF_HOME "
        f"at a cache that holds it. The base {BASE_REPO} (about 14 GB) is only needed for a LoRA+projector-only "
        "export, which this loader does not merge onto the base"
    )


def convert_state_dict(
    original: Mapping[str, Tensor], lora_alpha: float = DEFAULT_LORA_ALPHA, dtype: torch.dtype | None = None
) -> Conversion:
    """Rename a PLLaVA state dict to ``LlavaForConditionalGeneration`` keys and merge its LoRA weights.

    Every weight with a LoRA pair becomes ``W + (lora_alpha / r) · B @ A`` (``W [out, in]``, ``A [r, in]``,
    ``B [out, r]``), computed in float32. Other tensors are passed through untouched (same objects).

    Args:
        original: original keys such as ``language_model.base_model.model.model.layers.0.self_attn.q_proj.
            base_layer.weight`` (``[D, D]``), ``...q_proj.lora_A.default.weight`` (``[r, D]``),
            ``multi_modal_projector.linear_1.weight`` (``[D, Dv]``), ``vision_tower.vision_model.*``.
        lora_alpha: peft's ``lora_alpha``; 14 for PruneVid's MCQ tables, 4 for PLLaVA's own scripts.
        dtype: dtype of the merged weights; ``None`` keeps each base weight's dtype.

    Returns:
        The :class:`Conversion`.

    Raises:
        ValueError: for keys that match no rule (all listed), two keys mapping to one name, a LoRA ``A`` without
            its ``B`` (or the reverse), a LoRA pair without a base weight, or LoRA shapes that do not fit.
    """
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, int | float) or lora_alpha < 0:
        raise ValueError(f"lora_alpha must be a number >= 0, got {lora_alpha!r}")
    lora: dict[str, dict[str, Tensor]] = {}

    def lora_weight(key: str, tensor: Tensor) -> bool:  # merged into its base weight below
        if m := _LORA.match(key):
            target = f"model.language_model.{m.group(1).removeprefix('model.')}.weight"
            lora.setdefault(target, {})[m.group(2)] = tensor
            return True
        return False

    # peft wraps every LoRA-target linear: its base weight sits under ``.base_layer.``
    converted, unmapped = rename_keys(
        original, KEY_MAP, IGNORED_KEYS, claim=lora_weight, normalise=lambda key: key.replace(".base_layer.", ".")
    )
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} original key(s) match no PLLaVA key rule (is this a PllavaForConditionalGeneration "
            f"checkpoint with LoRA adapter 'default'?): {short_keys(unmapped)}"
        )
    ranks: set[int] = set()
    for target, pair in sorted(lora.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA of {target} has only lora_{''.join(pair)}; both lora_A and lora_B are needed")
        if target not in converted:
            raise ValueError(f"LoRA pair for {target} has no base weight in the checkpoint")
        a, b, w = pair["A"], pair["B"], converted[target]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"LoRA shapes of {target} do not fit: A {tuple(a.shape)}, B {tuple(b.shape)}, weight {tuple(w.shape)}"
            )
        # peft LoraLayer (use_rslora=False): scaling = lora_alpha / r.
        merged = w.float() + (float(lora_alpha) / r) * (b.float() @ a.float())
        converted[target] = merged.to(dtype or w.dtype)
        ranks.add(int(r))
    return Conversion(converted, tuple(sorted(lora)), tuple(sorted(ranks)), float(lora_alpha))


def config_from_original(
    original_config: Mapping[str, Any], *, vision_config: Mapping[str, Any] | None = None
) -> LlavaConfig:
    """Build a ``LlavaConfig`` from PLLaVA's ``config.json`` (a saved ``PllavaConfig``).

    Read: ``text_config`` (Llama fields, defaults Llama-7B), ``vision_config`` (CLIP fields, defaults
    :data:`CLIP_L14_336`), ``image_token_index``, ``projector_hidden_act``, ``vision_feature_layer``,
    ``vision_feature_select_strategy``. PLLaVA's pooling fields (``pooling_shape``, ``num_frames``, ``frame_shape``)
    are kept as ``config.pllava`` for reference only: the official eval overrides them (16 frames, 16-12-12), and the
    adapter pools to ``(T, 12, 12)``.

    Args:
        original_config: parsed ``config.json``.
        vision_config: fields overriding the vision config (tests use a tiny tower).

    Returns:
        The config (``projector`` with bias, untied head unless the text config says otherwise).

    Raises:
        ValueError: for a non-``default`` feature strategy (PLLaVA implements only CLS-dropping), a non-null
            ``rope_scaling``, a placeholder id outside the vocabulary, or a ``frame_shape`` that does not match
            the vision geometry.
    """
    text_in = dict(original_config.get("text_config") or {})
    vision_in = dict(original_config.get("vision_config") or {})
    strategy = original_config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy must be 'default' (PLLaVA drops CLS), got {strategy!r}")
    if text_in.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling must be null for Vicuna-7B v1.5, got {text_in['rope_scaling']}")
    vision = {**CLIP_L14_336, **{k: vision_in[k] for k in _VISION_FIELDS if k in vision_in}, **(vision_config or {})}
    side = vision["image_size"] // vision["patch_size"]
    frame_shape = original_config.get("frame_shape")
    if frame_shape is not None and tuple(frame_shape) != (side, side):
        raise ValueError(f"frame_shape {tuple(frame_shape)} does not match the {side}x{side} patch grid of the tower")
    text = {k: text_in[k] for k in _TEXT_FIELDS if k in text_in}
    if "vocab_size" not in text and "vocab_size" in original_config:
        text["vocab_size"] = original_config["vocab_size"]
    theta = float(text_in.get("rope_theta", 10000.0))
    tie = bool(text_in.get("tie_word_embeddings", False))
    text_config = LlamaConfig(
        **text, rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie
    )
    image_token = int(original_config.get("image_token_index", 32000))
    if not 0 <= image_token < text_config.vocab_size:
        raise ValueError(f"image_token_index={image_token} is outside the vocabulary ({text_config.vocab_size})")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token,
        projector_hidden_act=original_config.get("projector_hidden_act", "gelu"),
        vision_feature_layer=int(original_config.get("vision_feature_layer", -2)),
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,  # PllavaMultiModalProjector: both linears have bias=True
        tie_word_embeddings=tie,
    )
    config.pllava = {k: original_config.get(k) for k in ("pooling_shape", "num_frames", "frame_shape")}
    return config


def _check_against_model(config: LlavaConfig, conversion: Conversion) -> dict[str, Tensor]:
    """Strict key and shape check against the model the config builds; returns the dict to load."""
    with torch.device("meta"):  # shapes only
        expected = {k: v.shape for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    to_load = dict(conversion.state_dict)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        to_load.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(to_load))
    unexpected = sorted(set(to_load) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(to_load[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(to_load))
        if tuple(to_load[k].shape) != tuple(expected[k])
    ]
    base_absent = "model.language_model.embed_tokens.weight" in missing and any(
        k.startswith("model.vision_tower.") for k in missing
    )
    if base_absent and conversion.merged:
        raise FileNotFoundError(
            f"the checkpoint holds LoRA/projector weights only ({len(to_load)} tensors, no CLIP tower or LLM base); "
            f"{download_hint()}"
        )
    if missing or unexpected or mismatched:
        parts = [f"missing {len(missing)}: {short_keys(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)}: {short_keys(unexpected)}"] if unexpected else []
        parts += [f"shape mismatch {len(mismatched)}: {short_keys(mismatched)}"] if mismatched else []
        raise ValueError("converted PLLaVA checkpoint does not fit LlavaForConditionalGeneration; " + "; ".join(parts))
    return to_load


def load_original(
    path_or_repo: str | os.PathLike[str] = HUB_REPO,
    *,
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | torch.device | None = None,
    revision: str | None = None,
    vision_config: Mapping[str, Any] | None = None,
) -> LlavaForConditionalGeneration:
    """Load a PLLaVA checkpoint as ``LlavaForConditionalGeneration`` with the LoRA merged, in eval mode.

    Reads ``config.json`` and ``model.safetensors`` (or the index and its shards) from a local directory, or from
    the hub via ``huggingface_hub.snapshot_download`` when ``path_or_repo`` is a repo id. Keys are converted by
    :func:`convert_state_dict`, checked strictly against the model, and loaded through
    ``from_pretrained(None, config=..., state_dict=...)``.

    Args:
        path_or_repo: checkpoint directory or hub repo id.
        lora_alpha: LoRA α (scale α/r); see the module docstring.
        dtype: parameter dtype.
        attn_implementation: the LLM's kernel (``sdpa``, ``eager``, ``flash_attention_2``); CLIP uses sdpa.
        device_map: passed to ``from_pretrained``.
        revision: hub revision to pin.
        vision_config: overrides of the CLIP geometry (tests).

    Returns:
        The model; ``model.config.pllava`` holds the original pooling fields and the LoRA merge summary.

    Raises:
        FileNotFoundError: weights, shards or ``config.json`` missing, or not downloadable (the message says what
            to download and how big it is).
        ValueError: the config or the keys do not convert or do not fit the model exactly.
    """
    directory = resolve_dir(path_or_repo, revision, _HUB_PATTERNS, download_hint)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; {download_hint()}")
    config = config_from_original(json.loads(config_file.read_text()), vision_config=vision_config)
    conversion = convert_state_dict(read_safetensors(directory, download_hint()), lora_alpha=lora_alpha, dtype=dtype)
    state_dict = _check_against_model(config, conversion)
    config.pllava.update(lora_alpha=conversion.lora_alpha, lora_ranks=list(conversion.ranks))
    config.pllava["lora_merged"] = len(conversion.merged)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        dtype=dtype,
        device_map=device_map,
        attn_implementation={"text_config": attn_implementation, "vision_config": "sdpa"},
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:  # unreachable after the strict check; guards against a transformers change loading silently
        raise ValueError(f"from_pretrained reported loading problems: {problems}")
    return model.eval()
