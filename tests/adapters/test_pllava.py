"""PLLaVA adapter and converter on tiny random models (real geometry, tiny widths), CPU only, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from prune.adapters import VideoAdapter
from prune.adapters.convert_pllava import BASE_REPO, CLIP_L14_336, config_from_original, convert_state_dict
from prune.adapters.pllava import (
    HF_REPO,
    IMAGE_TOKEN_ID,
    PllavaAdapter,
    load_pllava,
    pllava_prompt,
    pllava_resize_shape,
    preprocess_pllava,
    tiny_pllava,
)
from prune.adapters.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from prune.api import simulate
from prune.strategies.none import NoPruning
from prune.strategies.prunevid import PruneVid, merge_tokens

T = 16
# "<s> ... USER: <image>\n USER: What is he doing? ASSISTANT:" in Vicuna ids (approximate; any ids < 32064 work).
PREFIX = [1, 3148, 1001, 29901, 29871]
SUFFIX = [29871, 13, 3148, 1001, 29901, 1724, 338, 540, 2599, 29973, 319, 1799, 9047, 13566, 29901]
CONFIGS = Path(__file__).parents[2] / "configs" / "prune"
TINY_OVERRIDES = {
    "prunevid": {"layer": 1},
    "hieravid": {"num_layers": 4, "boundaries": [1, 2, 3]},
    "pdrop": {"num_layers": 4, "layers": [1, 2, 3]},
    "framefusion": {"num_layers": 4},
    "holitom": {"merge_layer": 3},
}

# Tiny original checkpoint: 2 CLIP layers (width 32), 2 Llama layers (width 64, 4 heads), LoRA rank 8 on q/v.
DV, D, FFN, LAYERS, HEADS, R, V = 32, 64, 128, 2, 4, 8, 32064
LM = "language_model.base_model.model."
TINY_VISION = {"hidden_size": DV, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _ids():
    return torch.tensor([PREFIX + [IMAGE_TOKEN_ID] + SUFFIX])


@pytest.fixture(scope="module")
def model():
    return tiny_pllava(seed=0)


@pytest.fixture(scope="module")
def video():
    return torch.randn(1, T, 3, 336, 336, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def grid(model, video):
    """``[T, 12, 12, D]`` visual tokens of ``video`` (the vision path is strategy-independent; computed once)."""
    adapter = PllavaAdapter(model, NoPruning())
    try:
        with torch.no_grad():
            return adapter.video_grid(video)
    finally:
        adapter.llm.remove()


# --- the original checkpoint layout ---------------------------------------------------------------------------------


def _original_config() -> dict:
    """A saved PllavaConfig (transformers 4.37 writes nested configs as a diff against the defaults), tiny widths."""
    return {
        "architectures": ["PllavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_ID,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": V,
        "pooling_method": "avg",
        "pooling_shape": [16, 12, 12],
        "frame_shape": [24, 24],
        "num_frames": 16,
        "use_pooling": True,
        "torch_dtype": "bfloat16",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": D,
            "intermediate_size": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "max_position_embeddings": 4096,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": V,
        },
        "vision_config": {"model_type": "clip_vision_model", "projection_dim": 768, **TINY_VISION},
    }


def _original_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under PLLaVA's peft-wrapped key names (CLIP keys from a stock tower, the rest by hand)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPVisionModel(CLIPVisionConfig(**{**CLIP_L14_336, **TINY_VISION}))
    weights = {f"vision_tower.vision_model.{k}": v.clone() for k, v in clip.state_dict().items()}
    shapes = {
        "multi_modal_projector.linear_1.weight": (D, DV),
        "multi_modal_projector.linear_1.bias": (D,),
        "multi_modal_projector.linear_2.weight": (D, D),
        "multi_modal_projector.linear_2.bias": (D,),
        LM + "model.embed_tokens.weight": (V, D),
        LM + "model.norm.weight": (D,),
        LM + "lm_head.weight": (V, D),
    }
    for i in range(LAYERS):
        p = f"{LM}model.layers.{i}."
        for proj in ("q_proj", "v_proj"):  # PLLaVA's LoRA targets
            shapes |= {
                p + f"self_attn.{proj}.base_layer.weight": (D, D),
                p + f"self_attn.{proj}.lora_A.default.weight": (R, D),
                p + f"self_attn.{proj}.lora_B.default.weight": (D, R),
            }
        shapes |= {
            p + "self_attn.k_proj.weight": (D, D),
            p + "self_attn.o_proj.weight": (D, D),
            p + "mlp.gate_proj.weight": (FFN, D),
            p + "mlp.up_proj.weight": (FFN, D),
            p + "mlp.down_proj.weight": (D, FFN),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    for key, shape in shapes.items():
        scale = 1.0 if key.endswith("norm.weight") else 0.1
        weights[key] = torch.randn(shape, generator=g) * scale + (1.0 if key.endswith("norm.weight") else 0.0)
    return weights


def _write(directory: Path, weights: dict, config: dict | None = None) -> Path:
    """Write the checkpoint as the release is laid out: config.json, sharded safetensors and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or _original_config()))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [
        {k: v for k, v in weights.items() if k.startswith(LM)},
        {k: v for k, v in weights.items() if not k.startswith(LM)},
    ]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        save_file(part, directory / name)
        weight_map |= dict.fromkeys(part, name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _load(path, lora_alpha=14.0):
    return load_pllava(str(path), dtype=torch.float32, lora_alpha=lora_alpha, vision_config=TINY_VISION)


@pytest.fixture(scope="module")
def original():
    return _original_weights()


@pytest.fixture(scope="module")
def ckpt(original, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("pllava"), original)


# --- a forward written from the original tensors -------------------------------------------------------------------


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta=10000.0):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv[None]  # [S, hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rotated = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], dim=-1)
    return x * cos + rotated * sin


def _reference_logits(orig: dict, ids: list[int], video: torch.Tensor, lora_alpha: float) -> torch.Tensor:
    """PLLaVA from the original tensors: stock CLIP, then projector, 3-D pooling and a hand-written Llama.

    The attention weights are the original base weights plus ``lora_alpha / r * B @ A``, as peft computes them.
    """
    vt = "vision_tower.vision_model."
    clip = CLIPVisionModel(CLIPVisionConfig(**{**CLIP_L14_336, **TINY_VISION})).eval()
    clip.load_state_dict({k[len(vt) :]: v for k, v in orig.items() if k.startswith(vt)}, strict=True)
    t = video.shape[1]
    with torch.no_grad():
        feats = clip(video[0], output_hidden_states=True).hidden_states[-2][:, 1:]  # [T, 576, DV]
        w = {k.removeprefix("multi_modal_projector."): v for k, v in orig.items() if "projector" in k}
        x = F.linear(F.gelu(F.linear(feats, w["linear_1.weight"], w["linear_1.bias"])), w["linear_2.weight"])
        x = x + w["linear_2.bias"]
        vis = x.view(t, 12, 2, 12, 2, D).mean(dim=(2, 4)).reshape(t * 144, D)  # 2x2 average, frame by frame

        at = ids.index(IMAGE_TOKEN_ID)
        emb = orig[LM + "model.embed_tokens.weight"]
        h = torch.cat([emb[ids[:at]], vis, emb[ids[at + 1 :]]])
        s, hd = h.shape[0], D // HEADS
        pos = torch.arange(s)
        causal = torch.full((s, s), float("-inf")).triu(1)
        scale = lora_alpha / R
        for i in range(LAYERS):
            p = f"{LM}model.layers.{i}."

            def lora(proj, p=p):
                base = orig[p + f"self_attn.{proj}.base_layer.weight"]
                a, b = (
                    orig[p + f"self_attn.{proj}.lora_A.default.weight"],
                    orig[p + f"self_attn.{proj}.lora_B.default.weight"],
                )
                return base + scale * b @ a

            y = _rms(h, orig[p + "input_layernorm.weight"])
            q = (y @ lora("q_proj").T).view(s, HEADS, hd)
            k = (y @ orig[p + "self_attn.k_proj.weight"].T).view(s, HEADS, hd)
            v = (y @ lora("v_proj").T).view(s, HEADS, hd)
            q, k = _rope(q, pos), _rope(k, pos)
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + causal
            o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(s, D)
            h = h + o @ orig[p + "self_attn.o_proj.weight"].T
            y = _rms(h, orig[p + "post_attention_layernorm.weight"])
            gate, up = y @ orig[p + "mlp.gate_proj.weight"].T, y @ orig[p + "mlp.up_proj.weight"].T
            h = h + (F.silu(gate) * up) @ orig[p + "mlp.down_proj.weight"].T
        return (_rms(h, orig[LM + "model.norm.weight"]) @ orig[LM + "lm_head.weight"].T)[-1]


def _first_logits(model, video, frames):
    adapter = PllavaAdapter(model, NoPruning(), num_frames=frames)
    try:
        return adapter.generate(_ids(), video, max_new_tokens=1, return_logits=True).logits[0]
    finally:
        adapter.llm.remove()


# --- converter round trip -------------------------------------------------------------------------------------------


def test_converted_logits_match_the_original_tensors(original, ckpt):
    loaded = _load(ckpt)
    video = torch.randn(1, 4, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    ours = _first_logits(loaded, video, frames=4)
    ref = _reference_logits(original, PREFIX + [IMAGE_TOKEN_ID] + SUFFIX, video, lora_alpha=14.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert loaded.config.pllava["lora_ranks"] == [R] and loaded.config.pllava["lora_merged"] == 2 * LAYERS


def test_lora_is_merged_with_alpha_over_r(original, ckpt):
    loaded = _load(ckpt, lora_alpha=14.0)
    layer = loaded.model.language_model.layers[1].self_attn
    p = f"{LM}model.layers.1.self_attn."
    for proj in ("q_proj", "v_proj"):
        base = original[p + f"{proj}.base_layer.weight"]
        delta = original[p + f"{proj}.lora_B.default.weight"] @ original[p + f"{proj}.lora_A.default.weight"]
        torch.testing.assert_close(getattr(layer, proj).weight, base + 14.0 / R * delta, atol=1e-6, rtol=0)
        assert not torch.allclose(getattr(layer, proj).weight, base, atol=1e-3)  # the LoRA really moved it
    assert torch.equal(layer.k_proj.weight, original[p + "k_proj.weight"])  # not a LoRA target: untouched
    assert torch.equal(loaded.lm_head.weight, original[LM + "lm_head.weight"])
    assert torch.equal(
        loaded.model.multi_modal_projector.linear_1.bias, original["multi_modal_projector.linear_1.bias"]
    )


def test_wrong_lora_alpha_changes_the_logits(original, ckpt):
    video = torch.randn(1, 4, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    at_14 = _first_logits(_load(ckpt, lora_alpha=14.0), video, frames=4)
    at_4 = _first_logits(_load(ckpt, lora_alpha=4.0), video, frames=4)
    assert (at_14 - at_4).abs().max() > 1e-3
    ref_4 = _reference_logits(original, PREFIX + [IMAGE_TOKEN_ID] + SUFFIX, video, lora_alpha=4.0)
    torch.testing.assert_close(at_4, ref_4, atol=1e-5, rtol=1e-5)


def test_unmerged_or_unwrapped_layout_converts_too(original):
    # An already-merged export: no peft prefix, no base_layer, no LoRA keys.
    plain = {}
    for k, v in original.items():
        if ".lora_" in k:
            continue
        plain[k.replace("base_model.model.", "").replace(".base_layer.", ".")] = v
    conv = convert_state_dict(plain)
    assert conv.merged == () and conv.ranks == ()
    ref = convert_state_dict(original, lora_alpha=0.0)  # alpha 0: plain rename
    assert set(conv.state_dict) == set(ref.state_dict)
    for k, v in conv.state_dict.items():
        torch.testing.assert_close(v, ref.state_dict[k], atol=0, rtol=0)


def test_missing_and_unexpected_keys_raise(original, tmp_path):
    weights = dict(original)
    del weights[f"{LM}model.layers.1.mlp.up_proj.weight"]
    weights["multi_modal_projector.register_embed"] = torch.zeros(D)
    with pytest.raises(ValueError, match=r"multi_modal_projector\.register_embed"):
        _load(_write(tmp_path / "a", weights))
    weights = dict(original)
    del weights[f"{LM}model.layers.1.mlp.up_proj.weight"], weights["vision_tower.vision_model.post_layernorm.bias"]
    with pytest.raises(ValueError) as err:
        _load(_write(tmp_path / "b", weights))
    msg = str(err.value)
    assert "missing 2" in msg and "model.language_model.layers.1.mlp.up_proj.weight" in msg
    assert "model.vision_tower.post_layernorm.bias" in msg


def test_incomplete_lora_pair_raises(original):
    weights = dict(original)
    del weights[f"{LM}model.layers.0.self_attn.v_proj.lora_B.default.weight"]
    with pytest.raises(ValueError, match="only lora_A"):
        convert_state_dict(weights)
    weights = dict(original)
    weights[f"{LM}model.layers.0.self_attn.q_proj.lora_B.default.weight"] = torch.zeros(D, R + 1)
    with pytest.raises(ValueError, match="LoRA shapes"):
        convert_state_dict(weights)


def test_lora_only_export_names_the_base_model(original, tmp_path):
    adapters = {k: v for k, v in original.items() if ".lora_" in k or "projector" in k or "base_layer" in k}
    with pytest.raises(FileNotFoundError, match=BASE_REPO):
        _load(_write(tmp_path, adapters))


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"ermu2001/pllava-7b \(about 14 GB"):
        load_pllava(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pllava(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(_original_config()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_pllava(str(tmp_path))

    import huggingface_hub

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download ermu2001/pllava-7b"):
        load_pllava(HF_REPO)


def test_config_defaults_are_clip_l14_336_and_vicuna_7b():
    cfg = config_from_original({"vocab_size": V, "text_config": {"rms_norm_eps": 1e-5, "vocab_size": V}})
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, v.hidden_act) == (
        1024,
        24,
        336,
        14,
        "quick_gelu",
    )
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (4096, 32, 32, 11008)
    assert t.vocab_size == V and cfg.image_token_id == IMAGE_TOKEN_ID and cfg.vision_feature_layer == -2
    assert cfg.multimodal_projector_bias and cfg.projector_hidden_act == "gelu" and not cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="CLS"):
        config_from_original({"vision_feature_select_strategy": "full"})
    with pytest.raises(ValueError, match="frame_shape"):
        config_from_original({"frame_shape": [16, 16]})


# --- the adapter on the tiny model ----------------------------------------------------------------------------------


def test_satisfies_the_adapter_contract(model):
    adapter = PllavaAdapter(model, NoPruning())
    try:
        assert isinstance(adapter, VideoAdapter)
        assert adapter.grid == (12, 12) and adapter.num_frames == 16 and adapter.separators_unpruned == 0
        assert adapter.placeholder_id == IMAGE_TOKEN_ID == model.config.image_token_id
        assert model.config.text_config.vocab_size == 32064
    finally:
        adapter.llm.remove()


def test_video_grid_is_projector_then_2x2_average(model, video, grid):
    assert grid.shape == (T, 12, 12, 64)
    with torch.no_grad():
        hf = model.model.get_image_features(
            pixel_values=video[0], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output  # T x [576, D]: CLIP layer -2 without CLS, projected (HF's own path, unpooled)
        stacked = torch.stack(list(hf)).view(T, 12, 2, 12, 2, 64).mean(dim=(2, 4))
    torch.testing.assert_close(grid, stacked, atol=1e-6, rtol=1e-6)


def test_none_reproduces_a_plain_forward(model, video, grid):
    adapter = PllavaAdapter(model, NoPruning())
    try:
        out = adapter.generate(_ids(), video, max_new_tokens=4, return_logits=True)
    finally:
        adapter.llm.remove()
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([embed(torch.tensor(PREFIX)), grid.reshape(-1, 64), embed(torch.tensor(SUFFIX))])[None]
        logits = model(inputs_embeds=embeds).logits[0, -1]
        hf = model.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
    assert out.tokens == hf[0, -4:].tolist()
    assert out.visual_in == out.visual_pre_llm == 2304 and out.separators == 0
    assert out.llm.seq_len == len(PREFIX) + 2304 + len(SUFFIX)


def _strategy(name, ratio=0.3):
    cfg = OmegaConf.create({"ratio": ratio, "prune": OmegaConf.load(CONFIGS / f"{name}.yaml")})
    for key, value in TINY_OVERRIDES.get(name, {}).items():
        cfg.prune[key] = value
    return instantiate(cfg.prune)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_strategy_runs_on_pllava(model, video, grid, name):
    strategy = _strategy(name)
    adapter = PllavaAdapter(model, strategy)
    try:
        out = adapter.generate(_ids(), video, max_new_tokens=3)
        video_tokens = adapter.video_tokens(video)  # with the vision-side fields the strategy declares
    finally:
        adapter.llm.remove()
    assert len(out.tokens) == 3 and all(0 <= tok < 32064 for tok in out.tokens)
    assert out.visual_in == T * 144 and out.separators == 0
    assert torch.equal(video_tokens.tokens, grid.reshape(T, 144, 64))
    pre, budget = simulate(strategy, video_tokens, 4, _scores)
    assert out.visual_pre_llm == pre.n == budget.pre_llm
    # per-layer counts: what the LLM measured == what the strategy promises == a model-free simulation
    if name == "framefusion":  # counts follow hidden-state similarity: measured only; the layer average is its budget
        assert abs(sum(out.llm.visual_per_layer) / (4 * pre.n) - strategy.ratio) <= 0.01 + 1 / pre.n
    else:
        assert tuple(out.llm.visual_per_layer) == strategy.layer_counts(out.pre, 4) == budget.per_layer
    assert out.llm.kv_len_per_layer[-1] == len(PREFIX) + out.llm.visual_per_layer[-1] + len(SUFFIX)
    assert set(out.timings) == {"vision", "pre_llm", "prefill", "decode"}
    if name == "none":
        assert out.llm.visual_per_layer == [2304] * 4
    elif name in ("random", "pool"):
        assert out.visual_pre_llm == round(0.3 * 2304)


def _scores(spec, visual, pre):
    return torch.rand(visual.numel(), generator=torch.Generator().manual_seed(spec.layer))


def _scene_video():
    """Three scenes of near-identical frames with a moving patch: static and dynamic tokens in several segments."""
    g = torch.Generator().manual_seed(1)
    scenes = torch.randn(3, 3, 336, 336, generator=g)
    frames = []
    for scene, n in zip(scenes, (6, 4, 6), strict=True):
        for i in range(n):
            f = scene.clone()
            f[:, 100:200, 40 + 10 * i : 140 + 10 * i] = torch.randn(3, 100, 100, generator=g)
            frames.append(f + 0.05 * torch.randn(3, 336, 336, generator=g))
    return torch.stack(frames)[None]


def test_prunevid_paper_settings_keep_the_predicted_groups(model):
    video = _scene_video()
    strategy = PruneVid(ratio=0.4, layer=1, tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5)
    adapter = PllavaAdapter(model, strategy)
    try:
        grid = adapter.video_grid(video)
        out = adapter.generate(_ids(), video, max_new_tokens=2)
    finally:
        adapter.llm.remove()
    merged = merge_tokens(
        grid.reshape(T, 144, 64),
        tau=0.8,
        temporal_segment_ratio=0.25,
        cluster_ratio=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    # the prediction is non-trivial: several segments, static and dynamic groups
    assert len(merged.window_sizes) >= 2 and sum(merged.window_sizes) == T
    assert any(merged.static_sizes) and any(merged.dynamic_sizes)
    groups = []
    for s, dyn, w in zip(merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, strict=True):
        groups += [s] + [dyn // w] * w
    assert out.pre.groups == tuple(groups)
    assert out.visual_pre_llm == merged.tokens.shape[0] == sum(groups)
    torch.testing.assert_close(out.pre.tokens, merged.tokens)
    kept = sum(math.floor(0.4 * g) for g in groups)
    assert out.llm.visual_per_layer == [sum(groups)] * 2 + [kept] * 2
    assert out.llm.kv_len_per_layer == [len(PREFIX) + kept + len(SUFFIX)] * 4  # layers <= K cut too


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_what_is_accepted(model, video):
    adapter = PllavaAdapter(model, NoPruning())
    try:
        with pytest.raises(ValueError, match="batch size 1"):
            adapter.generate(_ids().repeat(2, 1), video)
        with pytest.raises(ValueError, match="batch size 1"):
            adapter.generate(_ids(), video.repeat(2, 1, 1, 1, 1))
        with pytest.raises(ValueError, match="expects 16"):
            adapter.generate(_ids(), video[:, :8])
        with pytest.raises(ValueError, match="3x336x336"):
            adapter.generate(_ids(), torch.randn(1, T, 3, 224, 224))
        with pytest.raises(ValueError, match=r"<image> placeholders \(id 32000\)"):
            adapter.generate(torch.tensor([PREFIX + SUFFIX]), video)
        with pytest.raises(ValueError, match="contiguous"):
            adapter.generate(torch.tensor([PREFIX + [IMAGE_TOKEN_ID, 5, IMAGE_TOKEN_ID] + SUFFIX]), video)
    finally:
        adapter.llm.remove()
    with pytest.raises(ValueError, match="num_frames"):
        PllavaAdapter(model, NoPruning(), num_frames=0)


def test_tiny_build_leaves_global_rng_alone():
    state = torch.get_rng_state()
    tiny_pllava(seed=3, llm_layers=1)
    assert torch.equal(state, torch.get_rng_state())


# --- preprocessing and prompt ---------------------------------------------------------------------------------------


def test_constant_frame_normalises_to_clip_values():
    colour = np.array([10, 128, 250], dtype=np.uint8)
    frames = np.broadcast_to(colour, (2, 480, 640, 3)).copy()
    out = preprocess_pllava(frames)
    assert out.shape == (1, 2, 3, 336, 336) and out.dtype == torch.float32
    expected = (colour / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    for c in range(3):
        torch.testing.assert_close(out[0, :, c], torch.full((2, 336, 336), float(expected[c])), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("hw", "resized"),
    [
        ((480, 640), (480, 640)),  # already within the caps: untouched
        ((1080, 1920), (360, 640)),  # long side capped at 640
        ((1920, 1080), (640, 360)),  # portrait: the same, transposed
        ((480, 854), (359, 638)),  # int() truncation of 640 / aspect
        ((240, 320), (336, 448)),  # short side never below 336: upsized
        ((200, 2000), (336, 3360)),  # extreme aspect: the 336 floor wins over the 640 cap
    ],
)
def test_short_side_resize_shape(hw, resized):
    out, crop = pllava_resize_shape(*hw)
    assert out == resized and crop == resized  # one video: the processor's long-side slice is a no-op


def test_centre_crop_keeps_the_middle_of_the_long_side():
    # Portrait 800x400: top quarter red, middle half green, bottom quarter blue -> 672x336 -> centre 336 rows.
    frame = np.zeros((1, 800, 400, 3), dtype=np.uint8)
    frame[0, :200, :, 0] = 255
    frame[0, 200:600, :, 1] = 255
    frame[0, 600:, :, 2] = 255
    out = preprocess_pllava(frame)[0, 0]
    pixels = out * torch.tensor(OPENAI_CLIP_STD)[:, None, None] + torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    inner = pixels[:, 4:-4]  # away from the colour edges (bicubic overshoot)
    torch.testing.assert_close(inner[1], torch.ones_like(inner[1]), atol=1e-6, rtol=0)
    assert inner[0].abs().max() < 1e-6 and inner[2].abs().max() < 1e-6


def test_matches_hf_clip_processor_after_the_first_resize():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    frames = np.random.default_rng(0).integers(0, 256, (2, 480, 854, 3), dtype=np.uint8)
    ours = preprocess_pllava(frames)[0]
    (rh, rw), _ = pllava_resize_shape(480, 854)
    from PIL import Image

    first = [np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames]
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    hf = clip(first, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)


def test_preprocess_rejects_bad_frames():
    with pytest.raises(ValueError, match="rank 4"):
        preprocess_pllava(np.zeros((336, 336, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="3 .RGB. channels"):
        preprocess_pllava(np.zeros((2, 336, 336, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_pllava(np.zeros((2, 336, 336, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="zero frames"):
        preprocess_pllava(np.zeros((0, 336, 336, 3), dtype=np.uint8))


def test_prompt_is_prunevids_mvbench_template():
    context = "Question: What is he doing?\nOptions:\n(A) running\n(B) sitting"
    prompt = pllava_prompt(context)
    assert prompt.startswith("Carefully watch the video") and prompt.count("<image>") == 1
    assert prompt.endswith(
        ".\n USER: <image>\n USER: Question: What is he doing?\nOptions:\n(A) running\n(B) sitting "
        "\nOnly give the best option. ASSISTANT:Best option:("
    )
    free = pllava_prompt("Describe it.", task="videomme", post_query="", answer_prefix="")
    assert free.startswith("Select the best answer") and free.endswith("USER: <image>\n USER: Describe it. ASSISTANT:")
    with pytest.raises(ValueError, match="task"):
        pllava_prompt(context, task="nextqa")
    with pytest.raises(ValueError, match="<image>"):
        pllava_prompt("<image>\n" + context)
