"""Load the original LLaVA-Video-7B-Qwen2 checkpoint into transformers' ``LlavaOnevisionForConditionalGeneration``.

``lmms-lab/LLaVA-Video-7B-Qwen2`` has no official ``-hf`` conversion. It is saved by LLaVA-NeXT's
``LlavaQwenForCausalLM`` (``LLaVA-VL/LLaVA-NeXT:llava/model/language_model/llava_qwen.py``), whose module tree is the
one LLaVA-OneVision uses: SigLIP so400m/14-384 with the last of its 27 layers deleted and no pooling head
(``llava/model/multimodal_encoder/siglip_encoder.py``), an ``mlp2x_gelu`` projector, Qwen2-7B and an
``image_newline`` vector. So the weights load into the OneVision class with the key mapping of transformers'
``models/llava_onevision/convert_llava_onevision_weights_to_hf.py`` (``KEYS_TO_MODIFY_MAPPING``), rewritten for the
5.x module layout (``model.language_model.*`` instead of ``language_model.model.*``, SigLIP without the
``vision_model.`` level, ``lm_head`` on the outer class). See ``backbones.md`` §1.2.

What this module does *not* do: LLaVA-Video's own video token layout (2x2 average pool to 13x13, a newline after
every row; backbones.md §1.2) differs from the OneVision ``get_video_features`` (bilinear 14x14, one trailing
newline). That belongs to the adapter; the original config's layout fields are kept on the config as
``original_video_layout`` so the adapter can read them. The original tokenizer has no ``<image>``/``<video>``
tokens: ids 151646/151647 lie in Qwen2's padded, untrained embedding rows (the embedding has 152064 rows, the
tokenizer 151646), so nothing is resized here, unlike the HF OneVision conversion (which grows the vocabulary to
152128). The placeholder rows are overwritten by visual features, so their values never matter.

Shape legend: ``V`` vocabulary, ``D`` LLM hidden size, ``Dv`` vision hidden size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from prune.adapters.checkpoint import read_safetensors, rename_keys, resolve_dir, short_keys

__all__ = [
    "HUB_REPO",
    "IGNORED_KEYS",
    "KEY_MAP",
    "SIGLIP_SO400M_26L",
    "config_from_original",
    "convert_state_dict",
    "load_llava_video",
]

HUB_REPO = "lmms-lab/LLaVA-Video-7B-Qwen2"

# Original LLaVA-NeXT key -> transformers 5.23 key, first match wins. Same mapping as the HF OneVision conversion
# script (mm_projector.0/.2 -> linear_1/linear_2, vision_tower.vision_tower.vision_model -> vision tower, LLM under
# the language model), anchored so that any key not listed here fails instead of being renamed by accident.
KEY_MAP: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$", r"model.vision_tower.\1"),
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^model\.image_newline$", r"model.image_newline"),
    (r"^model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)$", r"model.language_model.\1"),
    (r"^lm_head\.weight$", r"lm_head.weight"),
]
# Buffers some checkpoints carry; both are recomputed at construction (the HF script drops inv_freq the same way).
IGNORED_KEYS: list[str] = [r"\.rotary_emb\.inv_freq$", r"\.embeddings\.position_ids$"]

# SigLIP so400m-patch14-384 as LLaVA-NeXT runs it: 27 layers with the last one deleted, no head. These are the values
# of the HF OneVision conversion script's SiglipVisionConfig; none of them is in the original config.json.
SIGLIP_SO400M_26L: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 26,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}

# Qwen2 fields read from the original config.json (LLaVA-NeXT saves the full Qwen2Config); the first group is required.
_TEXT_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "rope_theta",
)
_TEXT_OPTIONAL = (
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "attention_dropout",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
)
# LLaVA-NeXT fields that define the visual token layout; kept verbatim (None when absent) for the adapter.
_LAYOUT_FIELDS = (
    "mm_spatial_pool_mode",
    "mm_spatial_pool_stride",
    "mm_newline_position",
    "mm_patch_merge_type",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "image_aspect_ratio",
    "add_faster_video",
    "faster_token_stride",
    "frames_upbound",
)
_HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "*.safetensors"]


def _hint(repo: str = HUB_REPO) -> str:
    return (
        f"download {repo} with `huggingface-cli download {repo} --include 'config.json' '*.safetensors' "
        "'model.safetensors.index.json'` (or `hf download ...`) and pass the snapshot directory, "
        "or point HF_HOME at a cache that already holds it"
    )


def convert_state_dict(original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original LLaVA-NeXT (``LlavaQwenForCausalLM``) state dict to transformers 5.23 OneVision keys.

    Tensors are passed through untouched (same objects, no copy, no cast), so the result is bit-exact.

    Args:
        original: Original keys such as ``model.layers.0.self_attn.q_proj.weight`` (``[D, D]``),
            ``model.mm_projector.0.weight`` (``[D, Dv]``), ``model.vision_tower.vision_tower.vision_model.*``.

    Returns:
        The same tensors under ``LlavaOnevisionForConditionalGeneration`` keys; keys matching :data:`IGNORED_KEYS`
        are dropped.

    Raises:
        ValueError: If a key matches no :data:`KEY_MAP` rule (all such keys are listed), or two keys map to one name.
    """
    converted, unmapped = rename_keys(original, KEY_MAP, IGNORED_KEYS)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} original key(s) match no KEY_MAP rule (is this a LLaVA-NeXT LlavaQwenForCausalLM "
            f"checkpoint without extra modules such as faster_token or a resampler?): {short_keys(unmapped)}"
        )
    return converted


def config_from_original(
    original_config: Mapping[str, Any],
    *,
    vision_config: Mapping[str, Any] | None = None,
    image_token_index: int = 151646,
    video_token_index: int = 151647,
) -> LlavaOnevisionConfig:
    """Build a ``LlavaOnevisionConfig`` from an original LLaVA-NeXT ``config.json``.

    Read from the original: the Qwen2 text fields (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``, ``rope_theta``, ``rms_norm_eps``,
    ``max_position_embeddings``, sliding-window fields, bos/eos ids), ``tie_word_embeddings``,
    ``image_grid_pinpoints`` and ``image_aspect_ratio`` (image path only). Validated: ``mm_vision_tower`` is a
    SigLIP, ``mm_projector_type == "mlp2x_gelu"``, ``mm_hidden_size`` equals the vision width, ``rope_scaling`` is
    null. Kept verbatim as ``config.original_video_layout``: the LLaVA-NeXT token-layout fields
    (``mm_spatial_pool_mode``, ``mm_newline_position``, ...), which the OneVision class has no place for.

    Fixed, as in the HF OneVision conversion: the SigLIP geometry (:data:`SIGLIP_SO400M_26L`; LLaVA-NeXT deletes
    the 27th layer and ignores ``mm_vision_select_layer``, which reads -2, so 26 layers + ``vision_feature_layer=-1``
    is the same feature), ``vision_feature_select_strategy="full"`` (SigLIP has no CLS token), GELU projector with
    bias, and the ``<image>``/``<video>`` ids 151646/151647.

    Args:
        original_config: Parsed original ``config.json``.
        vision_config: Fields overriding :data:`SIGLIP_SO400M_26L` (tests use a tiny tower); ``None`` for so400m.
        image_token_index: Id of the ``<image>`` placeholder.
        video_token_index: Id of the ``<video>`` placeholder.

    Returns:
        The config, with ``original_video_layout`` (dict) attached.

    Raises:
        ValueError: For a missing required field, a non-SigLIP tower, a projector other than ``mlp2x_gelu``, a width
            mismatch, a non-null ``rope_scaling``, or placeholder ids outside the vocabulary.
    """
    missing = [k for k in (*_TEXT_REQUIRED, "mm_vision_tower", "mm_hidden_size") if k not in original_config]
    if missing:
        raise ValueError(f"original config.json lacks required field(s) {missing}; is it a LLaVA-NeXT config?")
    tower = str(original_config["mm_vision_tower"])
    if "siglip" not in tower.lower():
        raise ValueError(f"mm_vision_tower must be a SigLIP tower (so400m-patch14-384), got {tower!r}")
    # LLaVA-NeXT's builder defaults to a single linear projector when the field is absent, so require it.
    projector = original_config.get("mm_projector_type")
    if projector != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type must be 'mlp2x_gelu' (Linear-GELU-Linear), got {projector!r}")
    if original_config.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling must be null for LLaVA-Video-7B-Qwen2, got {original_config['rope_scaling']}")

    vision = {**SIGLIP_SO400M_26L, **(vision_config or {})}
    if int(original_config["mm_hidden_size"]) != vision["hidden_size"]:
        raise ValueError(
            f"mm_hidden_size {original_config['mm_hidden_size']} != vision hidden_size {vision['hidden_size']}"
        )
    vocab = int(original_config["vocab_size"])
    for name, idx in (("image_token_index", image_token_index), ("video_token_index", video_token_index)):
        if not 0 <= idx < vocab:
            raise ValueError(f"{name}={idx} is outside the vocabulary (vocab_size={vocab})")

    text = {k: original_config[k] for k in _TEXT_REQUIRED if k != "rope_theta"}
    text.update({k: original_config[k] for k in _TEXT_OPTIONAL if k in original_config})
    tie = bool(original_config.get("tie_word_embeddings", False))
    text_config = Qwen2Config(
        **text,
        rope_parameters={"rope_type": "default", "rope_theta": float(original_config["rope_theta"])},
        tie_word_embeddings=tie,
    )
    extra: dict[str, Any] = {}
    if original_config.get("image_grid_pinpoints") is not None:
        extra["image_grid_pinpoints"] = original_config["image_grid_pinpoints"]
    aspect = original_config.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres_max"):
        extra["vision_aspect_ratio"] = aspect
    config = LlavaOnevisionConfig(
        text_config=text_config.to_dict(),
        vision_config=SiglipVisionConfig(**vision).to_dict(),
        image_token_index=image_token_index,
        video_token_index=video_token_index,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",  # nn.GELU() in LLaVA-NeXT's mlp2x_gelu: exact (erf) GELU
        multimodal_projector_bias=True,
        tie_word_embeddings=tie,
        **extra,
    )
    config.original_video_layout = {k: original_config.get(k) for k in _LAYOUT_FIELDS}
    return config


def _check_against_model(config: LlavaOnevisionConfig, converted: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strict key/shape check against the model the config builds; returns the dict to load (tied head removed)."""
    with torch.device("meta"):  # shapes only; no memory, no init
        expected = {k: v.shape for k, v in LlavaOnevisionForConditionalGeneration(config).state_dict().items()}
    to_load = dict(converted)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        head = to_load.pop("lm_head.weight", None)
        embed = to_load.get("model.language_model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from embed_tokens.weight")
    missing = sorted(set(expected) - set(to_load))
    unexpected = sorted(set(to_load) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(to_load[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(to_load))
        if tuple(to_load[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            head_note = (
                " (lm_head is untied in config.json, so it must be saved)" if "lm_head.weight" in missing else ""
            )
            parts.append(f"missing {len(missing)}{head_note}: {short_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {short_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {short_keys(mismatched)}")
        raise ValueError(
            "converted checkpoint does not fit LlavaOnevisionForConditionalGeneration; " + "; ".join(parts)
        )
    return to_load


def load_llava_video(
    path_or_repo: str | os.PathLike[str] = HUB_REPO,
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | dict[str, Any] | torch.device | None = None,
    attn_implementation: str = "sdpa",
    *,
    revision: str | None = None,
    vision_config: Mapping[str, Any] | None = None,
    image_token_index: int = 151646,
    video_token_index: int = 151647,
) -> LlavaOnevisionForConditionalGeneration:
    """Load an original-layout LLaVA-Video checkpoint as ``LlavaOnevisionForConditionalGeneration``, in eval mode.

    Reads ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` plus its shards) from a
    local directory, or from the hub through ``huggingface_hub.snapshot_download`` when ``path_or_repo`` is a repo
    id and not an existing path. Keys are converted with :func:`convert_state_dict` and checked strictly against the
    model (missing, unexpected and mis-shaped keys all raise), then loaded through transformers' own
    ``from_pretrained(None, config=..., state_dict=...)`` path, which builds on the meta device, casts to ``dtype``
    and places weights by ``device_map``.

    Args:
        path_or_repo: Checkpoint directory or hub repo id (default ``lmms-lab/LLaVA-Video-7B-Qwen2``).
        dtype: Parameter dtype (the checkpoint is bf16; float32 keeps it exact too).
        device_map: Passed to ``from_pretrained`` (e.g. ``"cuda"``, ``{"": 0}``); ``None`` keeps CPU.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
        revision: Hub revision (commit, branch or tag) to pin; ignored for local directories.
        vision_config: Overrides of the fixed SigLIP geometry (see :func:`config_from_original`).
        image_token_index: Id of the ``<image>`` placeholder.
        video_token_index: Id of the ``<video>`` placeholder.

    Returns:
        The model in eval mode; ``model.config.original_video_layout`` holds the original layout fields.

    Raises:
        FileNotFoundError: If the directory, ``config.json`` or the weights are missing (the message says how to
            download them).
        OSError: If the hub download fails.
        ValueError: If the config or the weights do not convert or do not fit the model exactly.
    """
    directory = resolve_dir(path_or_repo, revision, _HUB_PATTERNS, _hint)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json. To get the checkpoint, {_hint()}")
    config = config_from_original(
        json.loads(config_file.read_text()),
        vision_config=vision_config,
        image_token_index=image_token_index,
        video_token_index=video_token_index,
    )
    state_dict = _check_against_model(config, convert_state_dict(read_safetensors(directory, _hint())))
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    # The pre-check above should make this unreachable; kept so a transformers change cannot load silently.
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"from_pretrained reported loading problems: {problems}")
    return model.eval()
