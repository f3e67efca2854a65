"""Load the released ST-LLM checkpoint into :class:`prune.adapters.st_llm.StLlm` (native modules + BT-Adapter).

``farewellthree/ST_LLM_weight`` holds two checkpoints, ``QA_weight/`` (MCQ/QA,
``config/instructblipbase_stllm_qa.yaml``) and ``conversation_weight/`` (VCG), each
``pytorch_model-0000{1,2}-of-00002.bin`` (bf16, 9.98 GB + 6.09 GB for ``QA_weight``), ``pytorch_model.bin.index.json``,
``config.json`` (``STLLMForCausalLM``, LLaMA fields, ``vocab_size`` 32001), ``tokenizer.model`` and
``tokenizer_config.json``. The official evaluation loads them with ``STLLMForCausalLM.get_state_dict`` +
``load_state_dict(strict=False)`` into ``STLLMForCausalLM``
(``stllm/models/st_llm.py``), so the keys are that module's names: the Llama at ``model.*`` / ``lm_head.*`` and the
vision side at ``model.stllm_model.*`` (``STLLMLlamaModel.initialize_vision_modules`` attaches ``STLLMModel`` there).
~16 GB of bf16 is ~8.0 B parameters: Vicuna-7B (6.74 B) + EVA ViT-g (~1.0 B) + BT-Adapter + Q-Former, so the file is
complete and no base weights (``eva_vit_g.pth``, ``instruct_blip_vicuna7b_trimmed.pth``, Vicuna) are needed
[inferred from the sizes and the code; the index file itself was not read].

Key mapping (original → :class:`StLlm`), every rule anchored; a key matching none fails loudly:

=====================================================  ===============================================================
``model.stllm_model.visual_encoder.cls_token``          ``vision.embeddings.class_embedding``
``….visual_encoder.pos_embed``                          ``vision.embeddings.position_embedding``
``….visual_encoder.patch_embed.proj.*``                 ``vision.embeddings.patch_embedding.*``
``….visual_encoder.blocks.{i}.norm1/norm2.*``           ``vision.encoder.layers.{i}.layer_norm1/layer_norm2.*``
``….blocks.{i}.attn.qkv.weight``                        ``….self_attn.qkv.weight`` (same fused layout)
``….blocks.{i}.attn.q_bias`` + ``v_bias``               ``….self_attn.qkv.bias`` = ``cat(q_bias, 0, v_bias)``
``….blocks.{i}.attn.proj.*``                            ``….self_attn.projection.*``
``….blocks.{i}.mlp.fc1/fc2.*``                          ``….mlp.fc1/fc2.*``
``….visual_encoder.BTAdapter_cls``                      ``bt_adapter.cls_token``
``….visual_encoder.BTAdapter_position.weight``          ``bt_adapter.time_embed.weight``
``….visual_encoder.BTAdapter_S.{i}.*``                  ``bt_adapter.spatial.{i}.*`` (as the ViT blocks)
``….visual_encoder.BTAdapter_T.{i}.norm1.*``            ``bt_adapter.temporal.{i}.norm.*``
``….visual_encoder.BTAdapter_T.{i}.attn.*``             ``bt_adapter.temporal.{i}.attn.*`` (as the ViT blocks)
``….visual_encoder.BTAdapter_T.{i}.temporal_fc.*``      ``bt_adapter.temporal.{i}.fc.*``
``model.stllm_model.ln_vision.*``                       ``vision.post_layernorm.*``
``model.stllm_model.query_tokens``                      ``query_tokens``
``….Qformer.bert.embeddings.{word,position}_embeddings``  ``qformer.embeddings.…`` (``LayerNorm`` → ``layernorm``)
``….Qformer.bert.encoder.layer.{i}.attention.self.*``   ``qformer.encoder.layer.{i}.attention.attention.*``
``….layer.{i}.crossattention.self.*``                   ``….crossattention.attention.*``
``….layer.{i}.*`` (output, intermediate, ``_query``)    ``qformer.encoder.layer.{i}.*``
``model.stllm_model.llama_proj.*``                      ``llama_proj.*``
``model.{embed_tokens,layers,norm}.*``, ``lm_head.*``   ``language_model.model.*``, ``language_model.lm_head.*``
=====================================================  ===============================================================

Dropped (:data:`IGNORED_KEYS`): ``model.stllm_model.embed_tokens.weight`` (the same module as ``model.embed_tokens``;
checked equal when both are present), ``model.stllm_model.mvm_decoder.*`` (training-only masked-video-modelling head,
``mvm_decode: True``), the Q-Former's ``position_ids`` buffer and any ``rotary_emb.inv_freq``.

Head counts cannot be read from tensor shapes: EVA ViT-g has 16 (``1408 // 88``), the BERT-base Q-Former 12.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prune.adapters.checkpoint import rename_keys, short_keys
from prune.adapters.st_llm import HF_REPO, HF_SUBFOLDER, StLlm, st_llm_config

__all__ = [
    "IGNORED_KEYS",
    "KEY_MAP",
    "build_model",
    "config_from_original",
    "convert_state_dict",
    "load_original",
    "load_st_llm",
]

_VE = r"model\.stllm_model\.visual_encoder\."
_QF = r"model\.stllm_model\.Qformer\.bert\."
_QL = _QF + r"encoder\.layer\.(?P<i>\d+)\."
# Original key -> StLlm key; patterns are matched in full (re.fullmatch), first match wins.
KEY_MAP: list[tuple[str, str]] = [
    (_VE + r"cls_token", "vision.embeddings.class_embedding"),
    (_VE + r"pos_embed", "vision.embeddings.position_embedding"),
    (_VE + r"patch_embed\.proj\.(?P<p>weight|bias)", r"vision.embeddings.patch_embedding.\g<p>"),
    (_VE + r"BTAdapter_cls", "bt_adapter.cls_token"),
    (_VE + r"BTAdapter_position\.weight", "bt_adapter.time_embed.weight"),
    (_VE + r"BTAdapter_T\.(?P<i>\d+)\.norm1\.(?P<p>weight|bias)", r"bt_adapter.temporal.\g<i>.norm.\g<p>"),
    (_VE + r"BTAdapter_T\.(?P<i>\d+)\.attn\.qkv\.weight", r"bt_adapter.temporal.\g<i>.attn.qkv.weight"),
    (
        _VE + r"BTAdapter_T\.(?P<i>\d+)\.attn\.proj\.(?P<p>weight|bias)",
        r"bt_adapter.temporal.\g<i>.attn.projection.\g<p>",
    ),
    (_VE + r"BTAdapter_T\.(?P<i>\d+)\.temporal_fc\.(?P<p>weight|bias)", r"bt_adapter.temporal.\g<i>.fc.\g<p>"),
    *[
        (_VE + src + r"\.(?P<i>\d+)\." + inner, dst + r".\g<i>." + out)
        for src, dst in (("blocks", "vision.encoder.layers"), ("BTAdapter_S", "bt_adapter.spatial"))
        for inner, out in (
            (r"norm1\.(?P<p>weight|bias)", r"layer_norm1.\g<p>"),
            (r"norm2\.(?P<p>weight|bias)", r"layer_norm2.\g<p>"),
            (r"attn\.qkv\.weight", "self_attn.qkv.weight"),
            (r"attn\.proj\.(?P<p>weight|bias)", r"self_attn.projection.\g<p>"),
            (r"mlp\.(?P<f>fc1|fc2)\.(?P<p>weight|bias)", r"mlp.\g<f>.\g<p>"),
        )
    ],
    (r"model\.stllm_model\.ln_vision\.(?P<p>weight|bias)", r"vision.post_layernorm.\g<p>"),
    (r"model\.stllm_model\.query_tokens", "query_tokens"),
    (_QF + r"embeddings\.(?P<e>word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\g<e>.weight"),
    (_QF + r"embeddings\.LayerNorm\.(?P<p>weight|bias)", r"qformer.embeddings.layernorm.\g<p>"),
    (
        _QL + r"(?P<a>attention|crossattention)\.self\.(?P<m>query|key|value)\.(?P<p>weight|bias)",
        r"qformer.encoder.layer.\g<i>.\g<a>.attention.\g<m>.\g<p>",
    ),
    (
        _QL + r"(?P<a>attention|crossattention)\.output\.(?P<m>dense|LayerNorm)\.(?P<p>weight|bias)",
        r"qformer.encoder.layer.\g<i>.\g<a>.output.\g<m>.\g<p>",
    ),
    (
        _QF + r"encoder\.layer\.(?P<i>\d+)\.(?P<m>intermediate|intermediate_query)\.dense\.(?P<p>weight|bias)",
        r"qformer.encoder.layer.\g<i>.\g<m>.dense.\g<p>",
    ),
    (
        _QF + r"encoder\.layer\.(?P<i>\d+)\.(?P<m>output|output_query)\.(?P<n>dense|LayerNorm)\.(?P<p>weight|bias)",
        r"qformer.encoder.layer.\g<i>.\g<m>.\g<n>.\g<p>",
    ),
    (r"model\.stllm_model\.llama_proj\.(?P<p>weight|bias)", r"llama_proj.\g<p>"),
    (r"model\.(?P<k>embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", r"language_model.model.\g<k>"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
]
# q_bias / v_bias of an EVA attention (ViT blocks, BTAdapter_S, BTAdapter_T) -> prefix of the fused qkv.bias.
_QV_BIAS = [
    (_VE + r"blocks\.(?P<i>\d+)\.attn\.(?P<b>q|v)_bias", r"vision.encoder.layers.\g<i>.self_attn"),
    (_VE + r"BTAdapter_S\.(?P<i>\d+)\.attn\.(?P<b>q|v)_bias", r"bt_adapter.spatial.\g<i>.self_attn"),
    (_VE + r"BTAdapter_T\.(?P<i>\d+)\.attn\.(?P<b>q|v)_bias", r"bt_adapter.temporal.\g<i>.attn"),
]
IGNORED_KEYS: list[str] = [
    r"^model\.stllm_model\.embed_tokens\.weight$",
    r"^model\.stllm_model\.mvm_decoder\.",
    r"^model\.stllm_model\.Qformer\.bert\.embeddings\.position_ids$",
    r"\.rotary_emb\.inv_freq$",
]
_ALIAS = ("model.stllm_model.embed_tokens.weight", "model.embed_tokens.weight")


def _hint(subfolder: str) -> str:
    return (
        f"download `huggingface-cli download {HF_REPO} --include '{subfolder}/*'` (about 16 GB: "
        f"{subfolder}/pytorch_model-00001-of-00002.bin 9.98 GB, -00002-of-00002.bin 6.09 GB, "
        "pytorch_model.bin.index.json, config.json, tokenizer.model) and pass the snapshot directory; the shards "
        "already contain EVA ViT-g, the BT-Adapter, the InstructBLIP Q-Former and Vicuna-7B v1.1, so no base "
        "weights are needed. The Q-Former tokenizer is bert-base-uncased"
    )


def convert_state_dict(original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``STLLMForCausalLM`` state dict to :class:`~prune.adapters.st_llm.StLlm` keys.

    Tensors are passed through untouched, except the EVA ``q_bias``/``v_bias`` pairs, which become the native fused
    ``qkv.bias`` ``[3 Dv] = cat(q_bias, zeros, v_bias)`` (EVA adds no key bias).

    Args:
        original: original keys (see the module docstring).

    Returns:
        The converted state dict.

    Raises:
        ValueError: keys that match no rule (all listed), a q/v bias without its partner, two keys mapping to one
            name, or ``model.stllm_model.embed_tokens.weight`` differing from ``model.embed_tokens.weight``.
    """
    biases: dict[str, dict[str, Tensor]] = {}
    if all(k in original for k in _ALIAS) and not torch.equal(original[_ALIAS[0]], original[_ALIAS[1]]):
        raise ValueError(f"{_ALIAS[0]} differs from {_ALIAS[1]}; they are one module in STLLMForCausalLM")

    def qv_bias(key: str, tensor: Tensor) -> bool:  # EVA's separate q/v biases, fused below
        for pattern, prefix in _QV_BIAS:
            if m := re.fullmatch(pattern, key):
                biases.setdefault(m.expand(prefix), {})[m.group("b")] = tensor
                return True
        return False

    converted, unmapped = rename_keys(original, KEY_MAP, IGNORED_KEYS, claim=qv_bias)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} original key(s) match no ST-LLM rule (is this an STLLMForCausalLM checkpoint with "
            f"model_type instructblip_vicuna0_btadapter?): {short_keys(unmapped)}"
        )
    for prefix, pair in biases.items():
        if set(pair) != {"q", "v"}:
            raise ValueError(f"{prefix}: got only the {sorted(pair)} bias; EVA attention needs both q_bias and v_bias")
        converted[f"{prefix}.qkv.bias"] = torch.cat([pair["q"], torch.zeros_like(pair["v"]), pair["v"]])
    return converted


def _count(weights: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in weights if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ValueError(f"layer indices of {pattern!r} are not 0..n-1: {sorted(found)}")
    return len(found)


def config_from_original(
    original_config: Mapping[str, Any],
    weights: Mapping[str, Tensor],
    *,
    vision_heads: int = 16,
    qformer_heads: int = 12,
):
    """Build the :class:`StLlm` config from the original ``config.json`` (LLaMA fields) and the tensor shapes.

    From shapes: ViT width, depth, MLP width, image and patch size; BT-Adapter depth and frame table; query count;
    Q-Former width, depth, MLP width, vocabulary, positions and cross-attention frequency; ``llama_proj``. From
    ``config.json``: the Llama fields (hidden, intermediate, layers, heads, ``rms_norm_eps``,
    ``max_position_embeddings``, ``rope_theta``, ``vocab_size``, checked against the embedding rows).

    Args:
        original_config: parsed ``config.json``.
        weights: the original state dict.
        vision_heads: EVA ViT-g heads (16).
        qformer_heads: Q-Former heads (12).

    Raises:
        ValueError: missing fields or tensors, or shapes that disagree.
    """
    from transformers import InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    ve, qf = "model.stllm_model.visual_encoder.", "model.stllm_model.Qformer.bert."
    need = [
        ve + "pos_embed",
        ve + "patch_embed.proj.weight",
        ve + "blocks.0.mlp.fc1.weight",
        ve + "BTAdapter_position.weight",
        "model.stllm_model.query_tokens",
        qf + "embeddings.word_embeddings.weight",
        qf + "embeddings.position_embeddings.weight",
        qf + "encoder.layer.0.intermediate_query.dense.weight",
        "model.embed_tokens.weight",
    ]
    missing = [k for k in need if k not in weights]
    text_fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing += [f"config.json:{k}" for k in text_fields if k not in original_config]
    if missing:
        raise ValueError(f"not an ST-LLM (instructblip_vicuna0_btadapter) checkpoint, missing: {missing}")
    pos = weights[ve + "pos_embed"]
    patch = weights[ve + "patch_embed.proj.weight"]
    width, patch_size = pos.shape[-1], patch.shape[-1]
    side = round((pos.shape[1] - 1) ** 0.5)
    if side * side + 1 != pos.shape[1]:
        raise ValueError(f"pos_embed {tuple(pos.shape)} is not 1 + a square number of patches")
    vision = InstructBlipVisionConfig(
        hidden_size=width,
        intermediate_size=weights[ve + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(weights, re.escape(ve) + r"blocks\.(\d+)\."),
        num_attention_heads=vision_heads,
        image_size=side * patch_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,  # EVA create_eva_vit_g: partial(nn.LayerNorm, eps=1e-6)
        qkv_bias=True,
        hidden_act="gelu",  # nn.GELU (erf)
    )
    q_layers = _count(weights, re.escape(qf) + r"encoder\.layer\.(\d+)\.")
    cross = sorted(
        {
            int(m.group(1))
            for k in weights
            if (m := re.match(re.escape(qf) + r"encoder\.layer\.(\d+)\.crossattention", k))
        }
    )
    freq = cross[1] - cross[0] if len(cross) > 1 else q_layers
    if not cross or cross != list(range(0, q_layers, freq)):
        raise ValueError(f"Q-Former cross-attention layers {cross} are not every k-th layer from 0")
    hidden_q = weights["model.stllm_model.query_tokens"].shape[-1]
    qformer = InstructBlipQFormerConfig(
        vocab_size=weights[qf + "embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden_q,
        num_hidden_layers=q_layers,
        num_attention_heads=qformer_heads,
        intermediate_size=weights[qf + "encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=freq,
        encoder_hidden_size=width,
        max_position_embeddings=weights[qf + "embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=1e-12,  # BERT-base
    )
    vocab = weights["model.embed_tokens.weight"].shape[0]
    if int(original_config["vocab_size"]) != vocab:
        raise ValueError(f"config.json vocab_size {original_config['vocab_size']} != embedding rows {vocab}")
    text = LlamaConfig(
        **{k: original_config[k] for k in text_fields},
        num_key_value_heads=original_config.get("num_key_value_heads", original_config["num_attention_heads"]),
        max_position_embeddings=original_config.get("max_position_embeddings", 2048),
        rms_norm_eps=original_config.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(original_config.get("rope_theta", 10000.0))},
        tie_word_embeddings=False,
    )
    return st_llm_config(
        vision,
        qformer,
        text,
        depth=_count(weights, re.escape(ve) + r"BTAdapter_T\.(\d+)\."),
        frames=weights[ve + "BTAdapter_position.weight"].shape[0],
        num_query_tokens=weights["model.stllm_model.query_tokens"].shape[1],
    )


def _reset_non_persistent(model) -> None:
    """Recreate the buffers a meta-device build leaves empty (they are not in any checkpoint)."""
    from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerEmbeddings
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for module in model.modules():
        if isinstance(module, InstructBlipQFormerEmbeddings):
            n = module.position_embeddings.num_embeddings
            module.position_ids = torch.arange(n, device=module.position_embeddings.weight.device).expand((1, -1))
        elif isinstance(module, LlamaRotaryEmbedding):
            inv_freq, module.attention_scaling = module.compute_default_rope_parameters(module.config)
            module.inv_freq, module.original_inv_freq = inv_freq, inv_freq.clone()
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"tensors left on the meta device: {meta}"


def build_model(
    weights: Mapping[str, Tensor],
    original_config: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    vision_heads: int = 16,
    qformer_heads: int = 12,
):
    """Config, strict conversion and loading without a random initialisation (meta device + ``assign``).

    Raises:
        ValueError: unmapped original keys, converted keys the model lacks, model keys the checkpoint lacks, or
            shape mismatches (each listed).
    """
    config = config_from_original(original_config, weights, vision_heads=vision_heads, qformer_heads=qformer_heads)
    converted = convert_state_dict(weights)
    with torch.device("meta"):
        model = StLlm(config, attn_implementation=attn_implementation)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the ST-LLM model: missing {len(missing)} key(s) [{short_keys(missing)}]; "
            f"unexpected {len(unexpected)} key(s) [{short_keys(unexpected)}]"
        )
    shapes = [f"{k}: {tuple(converted[k].shape)} vs {tuple(s)}" for k, s in expected.items() if converted[k].shape != s]
    if shapes:
        raise ValueError(f"shape mismatch: {short_keys(shapes)}")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    _reset_non_persistent(model)
    return model.eval()


def _resolve_dir(path_or_repo: str | os.PathLike[str], subfolder: str) -> Path:
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if not path.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is None:
            raise FileNotFoundError(f"ST-LLM checkpoint directory {text} does not exist. To get it, {_hint(subfolder)}")
        import huggingface_hub

        try:
            path = Path(huggingface_hub.snapshot_download(text, allow_patterns=[f"{subfolder}/*"]))
        except Exception as err:  # noqa: BLE001 - offline, gated, missing repo: one actionable message
            raise FileNotFoundError(
                f"could not fetch {text} from the Hugging Face hub ({type(err).__name__}: {err}); {_hint(subfolder)}"
            ) from err
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the checkpoint directory. {_hint(subfolder)}")
    if (path / subfolder).is_dir():
        path = path / subfolder
    return path


def load_original(path_or_repo: str | os.PathLike[str], subfolder: str = "QA_weight") -> tuple[dict, dict]:
    """Read an original ST-LLM checkpoint: all tensors and ``config.json``.

    Accepts ``pytorch_model.bin.index.json`` + shards (the release), ``pytorch_model-*-of-*.bin`` without index
    (what ``STLLMForCausalLM.get_state_dict`` globs), ``pytorch_model.bin``, or ``model.safetensors``.

    Returns:
        ``(weights, config)``.

    Raises:
        FileNotFoundError: missing directory, ``config.json`` or weight files (the message says what to download).
    """
    directory = _resolve_dir(path_or_repo, subfolder)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json. To get the checkpoint, {_hint(subfolder)}")
    config = json.loads(cfg_file.read_text())
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in directory.glob("pytorch_model-*-of-*.bin"))
        shards = shards or [n for n in ("pytorch_model.bin", "model.safetensors") if (directory / n).is_file()]
    absent = [s for s in shards if not (directory / s).is_file()]
    if not shards or absent:
        raise FileNotFoundError(
            f"{directory} lacks the weight file(s) {absent or 'pytorch_model-*.bin'}. To get them, {_hint(subfolder)}"
        )
    weights: dict[str, Tensor] = {}
    for shard in shards:
        if shard.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights.update(load_file(directory / shard))
        else:
            weights.update(torch.load(directory / shard, map_location="cpu", weights_only=True, mmap=True))
    return weights, config


def load_st_llm(
    path_or_repo: str = HF_REPO,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device_map: str | torch.device | None = None,
    *,
    subfolder: str = HF_SUBFOLDER,
    vision_heads: int = 16,
    qformer_heads: int = 12,
) -> StLlm:
    """Load the released ST-LLM checkpoint (``STLLMForCausalLM`` ``.bin`` shards) as an :class:`StLlm`.

    It lives with the converter, not the adapter, so the import runs one way: converter -> adapter.

    Args:
        path_or_repo: a hub repo id, or a local directory holding ``config.json`` and the weights (either directly or
            in ``subfolder``).
        dtype: parameter dtype.
        attn_implementation: the LLM's attention (``sdpa``, ``eager``, ``flash_attention_2``).
        device_map: ``None`` (CPU), a device (``"cuda"``, ``"cuda:0"``) or ``"auto"`` (CUDA when available).
        subfolder: ``QA_weight`` (MCQ/QA model, the default) or ``conversation_weight``.
        vision_heads: EVA ViT-g heads (1408 // 88 = 16); not recoverable from tensor shapes.
        qformer_heads: Q-Former heads (BERT-base: 12).

    Raises:
        FileNotFoundError: the weights are missing; the message says what to download.
    """
    weights, original_config = load_original(path_or_repo, subfolder=subfolder)
    model = build_model(
        weights,
        original_config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        vision_heads=vision_heads,
        qformer_heads=qformer_heads,
    )
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else None
    if isinstance(device_map, dict):
        raise ValueError("device_map must be None, 'auto' or one device; ST-LLM is loaded on a single device")
    if device_map is not None:
        model = model.to(device_map)
    return model.eval()
