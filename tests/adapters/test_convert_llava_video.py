"""Tests for prune.adapters.convert_llava_video on a tiny checkpoint written in the original LLaVA-NeXT layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from prune.adapters.convert_llava_video import (
    SIGLIP_SO400M_26L,
    config_from_original,
    convert_state_dict,
    load_llava_video,
)

D, DV, V, LAYERS, VLAYERS, FFN, VFFN = 64, 32, 256, 2, 2, 128, 64
TINY_VISION = {"hidden_size": DV, "intermediate_size": VFFN, "num_attention_heads": 2, "num_hidden_layers": VLAYERS}
TOKENS = {"image_token_index": 250, "video_token_index": 251}
VT = "model.vision_tower.vision_tower.vision_model."


def _original_config(**overrides) -> dict:
    """A LLaVA-NeXT llava_qwen config.json (field names and values as in lmms-lab's), with tiny widths."""
    cfg = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "hidden_size": D,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": V,
        "max_position_embeddings": 512,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": 240,
        "eos_token_id": 241,
        "image_token_index": 151646,
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[384, 384], [384, 768]],
        "mm_hidden_size": DV,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_spatial_pool_mode": "bilinear",
        "mm_newline_position": "grid",
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def _original_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under the original LlavaQwenForCausalLM key names and shapes (written out by hand)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    kv = D // 4 * 2  # num_key_value_heads * head_dim
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (D, D),
            p + "self_attn.q_proj.bias": (D,),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (D, D),
            p + "mlp.gate_proj.weight": (FFN, D),
            p + "mlp.up_proj.weight": (FFN, D),
            p + "mlp.down_proj.weight": (D, FFN),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    shapes |= {
        "lm_head.weight": (V, D),
        "model.image_newline": (D,),
        "model.mm_projector.0.weight": (D, DV),
        "model.mm_projector.0.bias": (D,),
        "model.mm_projector.2.weight": (D, D),
        "model.mm_projector.2.bias": (D,),
        VT + "embeddings.patch_embedding.weight": (DV, 3, 14, 14),
        VT + "embeddings.patch_embedding.bias": (DV,),
        VT + "embeddings.position_embedding.weight": (729, DV),
        VT + "post_layernorm.weight": (DV,),
        VT + "post_layernorm.bias": (DV,),
    }
    for j in range(VLAYERS):
        p = f"{VT}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {p + f"self_attn.{proj}.weight": (DV, DV), p + f"self_attn.{proj}.bias": (DV,)}
        shapes |= {
            p + "layer_norm1.weight": (DV,),
            p + "layer_norm1.bias": (DV,),
            p + "layer_norm2.weight": (DV,),
            p + "layer_norm2.bias": (DV,),
            p + "mlp.fc1.weight": (VFFN, DV),
            p + "mlp.fc1.bias": (VFFN,),
            p + "mlp.fc2.weight": (DV, VFFN),
            p + "mlp.fc2.bias": (DV,),
        }
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in shapes.items()}


def _write_checkpoint(directory: Path, weights: dict, config: dict | None = None, sharded: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or _original_config()))
    if not sharded:
        save_file(weights, directory / "model.safetensors")
        return directory
    # Shard 1: the LLM; shard 2: vision tower, projector, newline, lm_head (as HF's sharder would split by size).
    llm = {k: v for k, v in weights.items() if k.startswith(("model.layers", "model.embed", "model.norm"))}
    rest = {k: v for k, v in weights.items() if k not in llm}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (llm, rest), strict=True):
        save_file(part, directory / name)
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _load(path, **kwargs):
    return load_llava_video(
        path, dtype=kwargs.pop("dtype", torch.float32), vision_config=TINY_VISION, **TOKENS, **kwargs
    )


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return _original_weights()


@pytest.fixture(scope="module")
def model(original, tmp_path_factory):
    return _load(_write_checkpoint(tmp_path_factory.mktemp("ckpt"), original))


# ---- loading is bit-exact ----------------------------------------------------------------------------------------


def test_every_tensor_bit_exact(model, original):
    converted = convert_state_dict(original)
    state = model.state_dict()
    assert set(state) == set(converted)  # strict: nothing left over, nothing initialised at random
    for new_key, tensor in converted.items():
        assert torch.equal(state[new_key], tensor), new_key
    # Spot checks through module attributes, independent of the key strings.
    m = model.model
    assert torch.equal(
        m.language_model.layers[1].self_attn.k_proj.bias, original["model.layers.1.self_attn.k_proj.bias"]
    )
    assert torch.equal(m.language_model.embed_tokens.weight, original["model.embed_tokens.weight"])
    assert torch.equal(m.multi_modal_projector.linear_2.weight, original["model.mm_projector.2.weight"])
    assert torch.equal(m.image_newline, original["model.image_newline"])
    assert torch.equal(
        m.vision_tower.encoder.layers[1].mlp.fc1.weight, original[VT + "encoder.layers.1.mlp.fc1.weight"]
    )
    assert torch.equal(m.vision_tower.post_layernorm.bias, original[VT + "post_layernorm.bias"])
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
    assert not model.training and model.dtype == torch.float32


def test_config_read_and_fixed(model):
    cfg = model.config
    assert cfg.text_config.num_key_value_heads == 2 and cfg.text_config.vocab_size == V
    assert cfg.text_config.rope_parameters["rope_theta"] == 1e6 and cfg.text_config.sliding_window is None
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"
    assert cfg.vision_config.vision_use_head is False and cfg.vision_config.patch_size == 14
    assert cfg.vision_config.image_size == 384 and not cfg.tie_word_embeddings
    assert cfg.original_video_layout["mm_newline_position"] == "grid"
    assert cfg.original_video_layout["mm_vision_select_layer"] == -2


def test_default_vision_geometry_is_so400m_26_layers():
    cfg = config_from_original(_original_config(vocab_size=152064, mm_hidden_size=1152))
    assert cfg.vision_config.num_hidden_layers == 26 == SIGLIP_SO400M_26L["num_hidden_layers"]
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_attention_heads) == (1152, 16)
    assert (cfg.image_token_index, cfg.video_token_index) == (151646, 151647)


# ---- forward pieces computed by hand from the original tensors ---------------------------------------------------


def test_projector_matches_hand_computation(model, original):
    x = torch.randn(2, 7, DV, generator=torch.Generator().manual_seed(1))
    w0, b0 = original["model.mm_projector.0.weight"], original["model.mm_projector.0.bias"]
    w2, b2 = original["model.mm_projector.2.weight"], original["model.mm_projector.2.bias"]
    expected = F.linear(F.gelu(F.linear(x, w0, b0)), w2, b2)
    with torch.no_grad():
        assert torch.equal(model.model.multi_modal_projector(x), expected)
    torch.testing.assert_close(expected, F.gelu(x @ w0.T + b0) @ w2.T + b2, atol=1e-6, rtol=1e-6)


def test_embedding_and_lm_head_match_original(model, original):
    ids = torch.tensor([[3, 17, 250, 251, 0]])
    with torch.no_grad():
        assert torch.equal(model.get_input_embeddings()(ids), original["model.embed_tokens.weight"][ids])
        h = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(2))
        assert torch.equal(model.lm_head(h), F.linear(h, original["lm_head.weight"]))


def test_text_logits_match_plain_qwen2_built_from_original_keys(model, original):
    # The original LLM keys (model.layers.*, model.embed_tokens, model.norm, lm_head) are Qwen2ForCausalLM's own
    # names, so an untouched Qwen2 loaded from them is an independent reference for the whole language model.
    llm_keys = {k: v for k, v in original.items() if not k.startswith((VT[:19], "model.mm_projector", "model.image"))}
    qwen = Qwen2ForCausalLM(Qwen2Config(**model.config.text_config.to_dict())).eval()
    qwen.load_state_dict(llm_keys, strict=True)
    ids = torch.tensor([[5, 9, 33, 2, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, qwen(input_ids=ids).logits, atol=0, rtol=0)


def test_vision_tower_matches_plain_siglip(model, original):
    siglip = SiglipVisionModel(SiglipVisionConfig(**{**SIGLIP_SO400M_26L, **TINY_VISION})).eval()
    siglip.load_state_dict({k[len(VT) :]: v for k, v in original.items() if k.startswith(VT)}, strict=True)
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        ref = siglip(pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(ours, ref)


# ---- layouts and dtypes --------------------------------------------------------------------------------------------


def test_single_file_bf16_checkpoint(tmp_path):
    weights = _original_weights(seed=5, dtype=torch.bfloat16)
    loaded = _load(_write_checkpoint(tmp_path, weights, sharded=False), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.language_model.norm.weight, weights["model.norm.weight"])


def test_tied_head_without_lm_head(tmp_path):
    weights = _original_weights(seed=6)
    del weights["lm_head.weight"]
    loaded = _load(_write_checkpoint(tmp_path, weights, _original_config(tie_word_embeddings=True)))
    assert torch.equal(loaded.lm_head.weight, weights["model.embed_tokens.weight"])


def test_tied_config_with_different_lm_head_raises(tmp_path):
    path = _write_checkpoint(tmp_path, _original_weights(seed=7), _original_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        _load(path)


def test_ignored_buffers_are_dropped(original):
    extra = dict(original, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    assert set(convert_state_dict(extra)) == set(convert_state_dict(original))


# ---- errors --------------------------------------------------------------------------------------------------------


def test_unmapped_key_raises(original):
    bad = dict(original, **{"model.faster_token": torch.zeros(D), "model.vision_resampler.w": torch.zeros(1)})
    with pytest.raises(ValueError, match="model.faster_token.*model.vision_resampler.w"):
        convert_state_dict(bad)


def test_unmapped_key_in_checkpoint_raises(tmp_path):
    weights = dict(_original_weights(seed=8), **{"model.faster_token": torch.zeros(D)})
    with pytest.raises(ValueError, match="model.faster_token"):
        _load(_write_checkpoint(tmp_path, weights))


def test_missing_and_unexpected_and_misshaped_keys_raise(tmp_path):
    weights = _original_weights(seed=9)
    del weights["model.layers.1.mlp.up_proj.weight"], weights["lm_head.weight"]
    weights[VT + "encoder.layers.2.layer_norm1.weight"] = torch.zeros(DV)  # a 27th-layer-style extra layer
    weights["model.norm.weight"] = torch.zeros(D + 1)
    with pytest.raises(ValueError) as err:
        _load(_write_checkpoint(tmp_path, weights))
    msg = str(err.value)
    assert "model.language_model.layers.1.mlp.up_proj.weight" in msg and "lm_head is untied" in msg
    assert "unexpected 1: model.vision_tower.encoder.layers.2.layer_norm1.weight" in msg
    assert "model.language_model.norm.weight: checkpoint (65,) vs model (64,)" in msg


def test_missing_path_has_download_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download lmms-lab/LLaVA-Video-7B-Qwen2"):
        _load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        _load(tmp_path)


def test_missing_weights_and_shards_raise(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_original_config()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        _load(tmp_path)
    _write_checkpoint(tmp_path, _original_weights(seed=10))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        _load(tmp_path)


def test_hub_path_uses_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    ckpt = _write_checkpoint(tmp_path / "snap", _original_weights(seed=11))
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = _load("lmms-lab/LLaVA-Video-7B-Qwen2", revision="abc123")
    assert calls[0][:2] == ("lmms-lab/LLaVA-Video-7B-Qwen2", "abc123") and "config.json" in calls[0][2]
    assert not loaded.training

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not fetch some-org/some-model.*huggingface-cli download"):
        _load("some-org/some-model")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mm_projector_type": "linear"}, "mlp2x_gelu"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "SigLIP"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size 1024"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_theta": None}, "rope_theta"),
    ],
)
def test_config_from_original_rejects(overrides, match):
    cfg = _original_config(**overrides)
    if overrides.get("rope_theta", 0) is None:
        del cfg["rope_theta"]
    with pytest.raises(ValueError, match=match):
        config_from_original(cfg, vision_config=TINY_VISION, **TOKENS)


def test_placeholder_ids_must_fit_vocabulary():
    with pytest.raises(ValueError, match="image_token_index=151646 is outside the vocabulary"):
        config_from_original(_original_config(), vision_config=TINY_VISION)
