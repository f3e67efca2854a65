"""ST-LLM adapter and converter on tiny random models (real geometry, tiny widths), CPU only, offline."""

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
from PIL import Image

from prune.adapters.convert_st_llm import build_model, convert_state_dict, load_original, load_st_llm
from prune.adapters.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from prune.adapters.st_llm import (
    HF_REPO,
    IMAGE_PLACEHOLDER,
    OFFICIAL_MAX_INPUT_TOKENS,
    PLACEHOLDER_ID,
    TEXT_BOS_ID,
    StLlmAdapter,
    preprocess_st_llm,
    st_llm_input_ids,
    st_llm_prompt,
    tiny_st_llm,
)
from prune.api import VideoTokens
from prune.strategies.fastv import FastV
from prune.strategies.none import NoPruning
from prune.strategies.random import RandomPruning

T = 8
TEXT = [835, 29950, 7889, 29901, 1724, 338, 278, 767, 2599, 29973, 835, 7900, 22137, 29901, 29871]
QIDS = torch.tensor([[101, 2054, 2003, 1996, 2158, 2725, 1029, 102]])  # [CLS] what is the man doing ? [SEP]
CONFIGS = Path(__file__).parents[2] / "configs" / "prune"
TINY_OVERRIDES = {
    "prunevid": {"layer": 1},
    "hieravid": {"num_layers": 4, "boundaries": [1, 2, 3]},
    "pdrop": {"num_layers": 4, "layers": [1, 2, 3]},
    "framefusion": {"num_layers": 4},
    "holitom": {"merge_layer": 3},
}
# Tiny geometry of the original checkpoint written below.
DV, FV, LV, DQ, FQ, LQ, VQ, D, FF, L, V = 32, 64, 4, 32, 64, 2, 30523, 64, 128, 4, 32001
CONFIG_JSON = {
    "architectures": ["STLLMForCausalLM"],
    "model_type": "st_llm_hf",
    "hidden_size": D,
    "intermediate_size": FF,
    "num_hidden_layers": L,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "vocab_size": V,
}
VE = "model.stllm_model.visual_encoder."
QF = "model.stllm_model.Qformer.bert."


def _ids(text=TEXT):
    return torch.tensor([[PLACEHOLDER_ID, TEXT_BOS_ID, *text]])


# --- a tiny checkpoint in the ORIGINAL (STLLMForCausalLM) key layout ---------------------------------------------


def _original_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, dim):
        w[prefix + ".weight"], w[prefix + ".bias"] = 1 + r(dim), r(dim)

    def lin(prefix, out, inp):
        w[prefix + ".weight"], w[prefix + ".bias"] = r(out, inp), r(out)

    def eva_attn(prefix):
        w[prefix + ".qkv.weight"] = r(3 * DV, DV)
        w[prefix + ".q_bias"], w[prefix + ".v_bias"] = r(DV), r(DV)
        lin(prefix + ".proj", DV, DV)

    def eva_block(prefix):
        ln(prefix + ".norm1", DV)
        eva_attn(prefix + ".attn")
        ln(prefix + ".norm2", DV)
        lin(prefix + ".mlp.fc1", FV, DV)
        lin(prefix + ".mlp.fc2", DV, FV)

    w: dict[str, torch.Tensor] = {}
    w[VE + "cls_token"], w[VE + "pos_embed"] = r(1, 1, DV), r(1, 257, DV)
    w[VE + "patch_embed.proj.weight"], w[VE + "patch_embed.proj.bias"] = r(DV, 3, 14, 14, scale=0.02), r(DV)
    for i in range(LV):
        eva_block(f"{VE}blocks.{i}")
    w[VE + "BTAdapter_cls"], w[VE + "BTAdapter_position.weight"] = r(1, 1, DV), r(64, DV)
    for i in range(3):
        eva_block(f"{VE}BTAdapter_S.{i}")
        ln(f"{VE}BTAdapter_T.{i}.norm1", DV)
        eva_attn(f"{VE}BTAdapter_T.{i}.attn")
        lin(f"{VE}BTAdapter_T.{i}.temporal_fc", DV, DV)
    ln("model.stllm_model.ln_vision", DV)
    w["model.stllm_model.query_tokens"] = r(1, 32, DQ)
    w[QF + "embeddings.word_embeddings.weight"] = r(VQ, DQ)
    w[QF + "embeddings.position_embeddings.weight"] = r(512, DQ)
    w[QF + "embeddings.position_ids"] = torch.arange(512)[None]
    ln(QF + "embeddings.LayerNorm", DQ)
    for i in range(LQ):
        p = f"{QF}encoder.layer.{i}."
        for kind, kv_in in (("attention", DQ), ("crossattention", DV)) if i % 2 == 0 else (("attention", DQ),):
            lin(p + kind + ".self.query", DQ, DQ)
            lin(p + kind + ".self.key", DQ, kv_in)
            lin(p + kind + ".self.value", DQ, kv_in)
            lin(p + kind + ".output.dense", DQ, DQ)
            ln(p + kind + ".output.LayerNorm", DQ)
        for suffix in ("", "_query"):
            lin(p + "intermediate" + suffix + ".dense", FQ, DQ)
            lin(p + "output" + suffix + ".dense", DQ, FQ)
            ln(p + "output" + suffix + ".LayerNorm", DQ)
    lin("model.stllm_model.llama_proj", D, DQ)
    lin("model.stllm_model.mvm_decoder.head", D, D)  # training-only head: dropped by the converter
    ln("model.stllm_model.mvm_decoder.norm", D)
    w["model.embed_tokens.weight"] = r(V, D, scale=0.5)
    w["model.stllm_model.embed_tokens.weight"] = w["model.embed_tokens.weight"]  # one module, two names
    for i in range(L):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            w[p + f"self_attn.{proj}_proj.weight"] = r(D, D)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = r(FF, D), r(FF, D)
        w[p + "mlp.down_proj.weight"] = r(D, FF)
        w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = 1 + r(D), 1 + r(D)
        w[p + "self_attn.rotary_emb.inv_freq"] = r(8)  # older transformers saved it; ignored
    w["model.norm.weight"], w["lm_head.weight"] = 1 + r(D), r(V, D)
    return w


def _build(weights, **kw):
    return build_model(weights, CONFIG_JSON, dtype=torch.float32, vision_heads=2, qformer_heads=2, **kw)


@pytest.fixture(scope="module")
def original():
    return _original_weights()


@pytest.fixture(scope="module")
def converted_model(original):
    return _build(original)


@pytest.fixture(scope="module")
def model():
    return tiny_st_llm(seed=0)


@pytest.fixture(scope="module")
def video():
    return torch.randn(1, T, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# --- reference forward written on the original tensors (official eva_btadapter.py / st_llm.py semantics) ----------


def _ln(x, w, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps)


def _eva_attention(x, w, prefix, heads=2):
    b, n, c = x.shape
    bias = torch.cat([w[prefix + ".q_bias"], torch.zeros_like(w[prefix + ".v_bias"]), w[prefix + ".v_bias"]])
    qkv = F.linear(x, w[prefix + ".qkv.weight"], bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
    out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.linear(out.transpose(1, 2).reshape(b, n, c), w[prefix + ".proj.weight"], w[prefix + ".proj.bias"])


def _eva_mlp(x, w, prefix):
    h = F.gelu(F.linear(x, w[prefix + ".fc1.weight"], w[prefix + ".fc1.bias"]))
    return F.linear(h, w[prefix + ".fc2.weight"], w[prefix + ".fc2.bias"])


def _pt_to_frames(x, p, t):
    """``'b (p t) m -> (b t) p m'`` for b = 1, by explicit indices: frame t, patch p is token p * T + t."""
    idx = torch.tensor([[pp * t + tt for pp in range(p)] for tt in range(t)])
    return x[0][idx]


def _frames_to_pt(x, p, t):
    """``'(b t) p m -> b (p t) m'`` for b = 1."""
    out = torch.empty(p * t, x.shape[-1])
    for tt in range(t):
        out[torch.arange(p) * t + tt] = x[tt]
    return out[None]


def _reference_vit(pixels, w):
    """EVAVisionTransformer_BTAdapter.forward_features + ln_vision, B = 1, written from the official code."""
    t = pixels.shape[0]
    x = F.conv2d(pixels, w[VE + "patch_embed.proj.weight"], w[VE + "patch_embed.proj.bias"], stride=14)
    x = torch.cat([w[VE + "cls_token"].expand(t, 1, DV), x.flatten(2).transpose(1, 2)], dim=1) + w[VE + "pos_embed"]
    p = x.shape[1] - 1
    branch = None
    for idx in range(LV):
        pre = f"{VE}blocks.{idx}"
        x = x + _eva_attention(_ln(x, w, pre + ".norm1", 1e-6), w, pre + ".attn")
        x = x + _eva_mlp(_ln(x, w, pre + ".norm2", 1e-6), w, pre + ".mlp")
        if idx < LV - 3:
            continue
        layer = idx - (LV - 3)
        if layer == 0:  # init_input
            cls_x = x[:, 0].mean(dim=0)[None, None]
            y = torch.cat([w[VE + "BTAdapter_cls"].expand(t, 1, DV), x[:, 1:]], dim=1) + w[VE + "pos_embed"]
            cls_branch = y[:1, 0][None]
            y = y[:, 1:] + w[VE + "BTAdapter_position.weight"][:t, None, :]  # time embedding of each frame
            branch = torch.cat([(cls_x + cls_branch) / 2, _frames_to_pt(y, p, t)], dim=1)
        else:
            cls = x[:, 0].mean(dim=0)[None, None]
            branch = torch.cat([cls, _frames_to_pt(x[:, 1:], p, t)], dim=1) + branch
        # BTAdapter_T: attention over time for each patch, temporal_fc, residual on the patches
        pt = f"{VE}BTAdapter_T.{layer}"
        q = branch[:, 1:].reshape(p, t, DV)
        res = F.linear(
            _eva_attention(_ln(q, w, pt + ".norm1", 1e-6), w, pt + ".attn"),
            w[pt + ".temporal_fc.weight"],
            w[pt + ".temporal_fc.bias"],
        )
        branch = torch.cat([branch[:, :1], res.reshape(1, p * t, DV) + branch[:, 1:]], dim=1)
        # BTAdapter_S: EVA block per frame with the video CLS, eps 1e-5
        ps = f"{VE}BTAdapter_S.{layer}"
        frames = torch.cat([branch[:, :1].repeat(t, 1, 1), _pt_to_frames(branch[:, 1:], p, t)], dim=1)
        h = _eva_attention(_ln(frames, w, ps + ".norm1", 1e-5), w, ps + ".attn")
        y = branch + torch.cat([h[:, :1].mean(dim=0)[None], _frames_to_pt(h[:, 1:], p, t)], dim=1)
        branch = y + _eva_mlp(_ln(y, w, ps + ".norm2", 1e-5), w, ps + ".mlp")
    merged = torch.cat([branch[:, :1].repeat(t, 1, 1), _pt_to_frames(branch[:, 1:], p, t)], dim=1)
    x = (x + merged) / 2
    return _ln(x, w, "model.stllm_model.ln_vision", 1e-5)


def _reference_logits(model, w, pixels, qids, text, keep_last=None):
    """First-token logits: reference ViT + stock Q-Former + original llama_proj, splice and lm_head."""
    image = _reference_vit(pixels[0], w)
    t = image.shape[0]
    queries = w["model.stllm_model.query_tokens"].expand(t, -1, -1)
    q_out = model.qformer(
        input_ids=qids.expand(t, -1),
        attention_mask=torch.ones(t, 32 + qids.shape[1], dtype=torch.long),
        query_embeds=queries,
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
    ).last_hidden_state[:, :32]
    video = F.linear(q_out, w["model.stllm_model.llama_proj.weight"], w["model.stllm_model.llama_proj.bias"])
    embeds = torch.cat([video.reshape(-1, D), w["model.embed_tokens.weight"][torch.tensor([TEXT_BOS_ID, *text])]])
    if keep_last is not None:
        embeds = embeds[-keep_last:]
    hidden = model.language_model.model(inputs_embeds=embeds[None]).last_hidden_state[0, -1]
    return F.linear(hidden, w["lm_head.weight"]), image


# --- converter ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_converted_model_matches_reference_on_original_tensors(original, converted_model, video):
    adapter = StLlmAdapter(converted_model, NoPruning(), num_frames=T)
    try:
        out = adapter.generate(_ids(), video, max_new_tokens=1, return_logits=True, qformer_input_ids=QIDS)
    finally:
        adapter.llm.remove()
    ref, ref_image = _reference_logits(converted_model, original, video, QIDS, TEXT)
    torch.testing.assert_close(converted_model.vit(video[0]), ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[0], ref, rtol=0, atol=1e-5)
    assert out.visual_in == out.visual_pre_llm == T * 32 and out.separators == 0
    # LayerNorm eps differences are below atol at these magnitudes, so check them directly: ViT and temporal 1e-6,
    # spatial (nn.LayerNorm default in BTAdapter_Spatial) and ln_vision 1e-5.
    m = converted_model
    assert m.vision.encoder.layers[0].layer_norm1.eps == m.bt_adapter.temporal[0].norm.eps == 1e-6
    assert m.bt_adapter.spatial[0].layer_norm2.eps == m.vision.post_layernorm.eps == 1e-5


def test_key_mapping_of_qformer_and_llm_is_identity_on_tensors(original):
    conv = convert_state_dict(original)
    pairs = {
        QF + "embeddings.LayerNorm.weight": "qformer.embeddings.layernorm.weight",
        QF + "encoder.layer.0.attention.self.query.weight": "qformer.encoder.layer.0.attention.attention.query.weight",
        QF
        + "encoder.layer.0.crossattention.self.key.bias": "qformer.encoder.layer.0.crossattention.attention.key.bias",
        QF + "encoder.layer.0.crossattention.output.LayerNorm.bias": (
            "qformer.encoder.layer.0.crossattention.output.LayerNorm.bias"
        ),
        QF + "encoder.layer.1.output_query.dense.weight": "qformer.encoder.layer.1.output_query.dense.weight",
        QF + "encoder.layer.1.intermediate.dense.bias": "qformer.encoder.layer.1.intermediate.dense.bias",
        "model.stllm_model.query_tokens": "query_tokens",
        "model.layers.3.self_attn.o_proj.weight": "language_model.model.layers.3.self_attn.o_proj.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        VE + "BTAdapter_T.2.temporal_fc.weight": "bt_adapter.temporal.2.fc.weight",
        VE + "BTAdapter_S.1.attn.proj.bias": "bt_adapter.spatial.1.self_attn.projection.bias",
    }
    for old, new in pairs.items():
        assert conv[new] is original[old], (old, new)
    bias = conv["vision.encoder.layers.0.self_attn.qkv.bias"]
    q, v = original[VE + "blocks.0.attn.q_bias"], original[VE + "blocks.0.attn.v_bias"]
    assert torch.equal(bias, torch.cat([q, torch.zeros_like(q), v]))
    assert not any("mvm_decoder" in k or "inv_freq" in k or "position_ids" in k for k in conv)
    n_qformer = sum(k.startswith("model.stllm_model.Qformer.") for k in original) - 1  # minus position_ids
    assert sum(k.startswith("qformer.") for k in conv) == n_qformer


def test_unknown_missing_and_inconsistent_keys_raise(original):
    extra = dict(original, **{"model.stllm_model.foo.weight": torch.zeros(1), "model.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"2 original key\(s\) match no ST-LLM rule.*model\.extra.*foo\.weight"):
        convert_state_dict(extra)
    missing = {k: v for k, v in original.items() if k != VE + "BTAdapter_S.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \[bt_adapter\.spatial\.1\.mlp\.fc2\.bias\]"):
        _build(missing)
    half = {k: v for k, v in original.items() if k != VE + "blocks.2.attn.v_bias"}
    with pytest.raises(ValueError, match="only the \\['q'\\] bias"):
        convert_state_dict(half)
    alias = dict(original, **{"model.stllm_model.embed_tokens.weight": torch.zeros(V, D)})
    with pytest.raises(ValueError, match="differs from model.embed_tokens.weight"):
        convert_state_dict(alias)
    bad_vocab = dict(original, **{"lm_head.weight": torch.zeros(V + 1, D)})
    with pytest.raises(ValueError, match="shape mismatch.*lm_head"):
        _build(bad_vocab)


def _save_checkpoint(directory: Path, weights) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(weights)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: weights[k].to(torch.bfloat16) if weights[k].is_floating_point() else weights[k] for k in keys},
                   directory / shard)  # fmt: skip
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(CONFIG_JSON))


def test_load_st_llm_from_local_folder_and_missing_weights(tmp_path, original, video, monkeypatch):
    _save_checkpoint(tmp_path / "repo" / "QA_weight", original)
    loaded = load_st_llm(str(tmp_path / "repo"), dtype=torch.float32, vision_heads=2, qformer_heads=2)
    bf16 = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in original.items()}
    reference = _build(bf16)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.qformer.embeddings.position_ids, torch.arange(512)[None])
    assert not loaded.training

    with pytest.raises(FileNotFoundError, match=rf"no config.json.*{HF_REPO}.*9.98 GB"):
        load_original(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    with pytest.raises(FileNotFoundError, match="lacks the weight file.*pytorch_model-00001-of-00002.bin"):
        load_original(tmp_path)
    import huggingface_hub

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"could not fetch farewellthree/ST_LLM_weight.*QA_weight/\*"):
        load_st_llm()


# --- adapter behaviour ---------------------------------------------------------------------------------------------


def _strategy(name, ratio=0.3):
    cfg = OmegaConf.create({"ratio": ratio, "prune": OmegaConf.load(CONFIGS / f"{name}.yaml")})
    for key, value in TINY_OVERRIDES.get(name, {}).items():
        cfg.prune[key] = value
    return instantiate(cfg.prune)


def _run(model, strategy, video, num_frames=T, max_input_tokens=None, ids=None, qids=QIDS, **kw):
    adapter = StLlmAdapter(model, strategy, num_frames=num_frames, max_input_tokens=max_input_tokens)
    try:
        return adapter, adapter.generate(ids if ids is not None else _ids(), video, qformer_input_ids=qids, **kw)
    finally:
        adapter.llm.remove()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_strategy_runs(model, video, name):
    strategy = _strategy(name)
    if getattr(strategy, "vision_inputs", None):  # VisionZip, FastVID: no patch attention behind Q-Former tokens
        with pytest.raises(ValueError, match="Q-Former query outputs, not patches"):
            _run(model, strategy, video, max_new_tokens=3)
        return
    adapter, out = _run(model, strategy, video, max_new_tokens=3)
    grid = adapter.video_grid(video, QIDS)
    assert grid.shape == (T, 32, D) and adapter.grid == (1, 32)
    pre = strategy.pre_llm(VideoTokens(grid, (1, 32)))
    assert out.visual_in == T * 32 and out.visual_pre_llm == pre.n and out.separators == 0
    if name == "framefusion":  # counts follow hidden-state similarity: measured only; the layer average is its budget
        assert abs(sum(out.llm.visual_per_layer) / (L * pre.n) - strategy.ratio) <= 0.01 + 1 / pre.n
    else:
        assert tuple(out.llm.visual_per_layer) == strategy.layer_counts(pre, L)
    seq = 2 + len(TEXT) + pre.n - 1  # placeholder replaced by the visual tokens
    assert out.llm.seq_len == seq and len(out.tokens) == 3
    assert set(out.timings) == {"vision", "pre_llm", "prefill", "decode"}
    if name == "none":
        assert out.llm.visual_per_layer == [T * 32] * L
    if name in ("random", "pool"):
        assert pre.n == round(0.3 * T * 32) and out.llm.visual_per_layer == [pre.n] * L
    if name == "fastv":  # K=2: layers 0, 1 see everything
        assert out.llm.visual_per_layer[:2] == [T * 32] * 2 and out.llm.visual_per_layer[2] == round(0.3 * T * 32)
    if name in ("prunevid", "hieravid"):
        assert out.llm.visual_per_layer[-1] < out.llm.visual_per_layer[0] <= T * 32


def test_fastv_ratio_one_equals_none(model, video):
    _, base = _run(model, NoPruning(), video, max_new_tokens=4, return_logits=True)
    _, fast = _run(model, FastV(ratio=1.0), video, max_new_tokens=4, return_logits=True)
    assert fast.tokens == base.tokens
    for a, b in zip(fast.logits, base.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_question_text_changes_the_visual_tokens(model, video):
    adapter = StLlmAdapter(model, NoPruning(), num_frames=T)
    a = adapter.video_grid(video, QIDS)
    b = adapter.video_grid(video, torch.tensor([[101, 2129, 2116, 3057, 2024, 2045, 1029, 102]]))
    padded = adapter.video_grid(video, torch.cat([QIDS, torch.zeros(1, 3, dtype=torch.long)], 1),
                                torch.tensor([[1] * 8 + [0] * 3]))  # fmt: skip
    adapter.llm.remove()
    assert (a - b).abs().max() > 1e-3  # the Q-Former really reads the question
    torch.testing.assert_close(padded, a, rtol=0, atol=1e-5)  # padding masked out


@torch.no_grad()
def test_left_truncation(converted_model, original, video):
    s = 2 + len(TEXT) - 1 + T * 32
    _, full = _run(converted_model, NoPruning(), video, max_new_tokens=1, max_input_tokens=s, return_logits=True)
    assert full.visual_pre_llm == T * 32 and full.llm.seq_len == s  # at the limit: nothing dropped
    keep = s - 70  # drops the first 70 visual tokens (2 frames and 6 queries)
    _, cut = _run(converted_model, NoPruning(), video, max_new_tokens=1, max_input_tokens=keep, return_logits=True)
    assert cut.visual_in == T * 32 and cut.visual_pre_llm == T * 32 - 70 and cut.pre.n == T * 32 - 70
    assert cut.llm.seq_len == keep and cut.llm.kv_len_per_layer == [keep] * L
    assert int((cut.pre.assignment == -1).sum()) == 70 and int(cut.pre.assignment[70]) == 0
    ref, _ = _reference_logits(converted_model, original, video, QIDS, TEXT, keep_last=keep)
    torch.testing.assert_close(cut.logits[0], ref, rtol=0, atol=1e-5)
    # Pruned prompts are truncated less: random keeps 128 tokens, which fit.
    _, pruned = _run(converted_model, RandomPruning(ratio=0.5), video, max_new_tokens=1, max_input_tokens=keep)
    assert pruned.visual_pre_llm == T * 16
    # Group-wise in-LLM selection keeps working on a truncated stage-1 output.
    strategy = _strategy("prunevid", ratio=0.4)
    _, pv = _run(converted_model, strategy, video, max_new_tokens=1, max_input_tokens=keep - 150)
    assert sum(pv.pre.groups) == pv.visual_pre_llm and tuple(pv.llm.visual_per_layer) == strategy.layer_counts(
        pv.pre, L
    )
    with pytest.raises(ValueError, match="leaves no visual token"):
        _run(converted_model, NoPruning(), video, max_input_tokens=len(TEXT))


def test_official_truncation_at_64_frames(model):
    video = torch.randn(1, 64, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    adapter, out = _run(model, NoPruning(), video, num_frames=64, max_input_tokens=OFFICIAL_MAX_INPUT_TOKENS)
    n_text = 1 + len(TEXT)
    assert adapter.grid == (1, 32) and out.visual_in == 2048
    assert out.visual_pre_llm == 1700 - n_text and out.llm.seq_len == 1700  # first 348 + n_text visual tokens dropped
    assert out.llm.visual_per_layer == [1700 - n_text] * L


def test_bad_inputs(model, video):
    with pytest.raises(ValueError, match=r"num_frames must be an int in 1\.\.64"):
        StLlmAdapter(model, NoPruning(), num_frames=65)
    with pytest.raises(ValueError, match="max_input_tokens must be None"):
        StLlmAdapter(model, NoPruning(), max_input_tokens=0)
    adapter = StLlmAdapter(model, NoPruning(), num_frames=T)
    try:
        with pytest.raises(ValueError, match=f"got 4 frames, this adapter expects num_frames={T}"):
            adapter.generate(_ids(), video[:, :4], qformer_input_ids=QIDS)
        with pytest.raises(ValueError, match="frames must be 3x224x224, got 3x112x112"):
            adapter.generate(_ids(), video[..., :112, :112], qformer_input_ids=QIDS)
        with pytest.raises(ValueError, match="batch size 1"):
            adapter.generate(_ids(), video.expand(2, -1, -1, -1, -1), qformer_input_ids=QIDS)
        with pytest.raises(ValueError, match="contiguous run of the placeholder id -200"):
            adapter.generate(torch.tensor([[2, *TEXT]]), video, qformer_input_ids=QIDS)
        with pytest.raises(ValueError, match="contiguous run of the placeholder id -200"):
            adapter.generate(torch.tensor([[PLACEHOLDER_ID, 2, PLACEHOLDER_ID]]), video, qformer_input_ids=QIDS)
        with pytest.raises(ValueError, match="qformer_input_ids is required.*bert-base-uncased"):
            adapter.generate(_ids(), video)
        with pytest.raises(ValueError, match="BERT vocabulary"):
            adapter.generate(_ids(), video, qformer_input_ids=torch.tensor([[101, 40000]]))
        with pytest.raises(ValueError, match="accepts qformer_input_ids and qformer_attention_mask"):
            adapter.generate(_ids(), video, qformer_input_ids=QIDS, pixel_values=video)
        with pytest.raises(ValueError, match=r"input_ids outside the placeholder must lie in 0\.\.32000"):
            adapter.generate(_ids([32001]), video, qformer_input_ids=QIDS)
    finally:
        adapter.llm.remove()


def test_tiny_model_is_seeded_and_leaves_global_rng(model):
    state = torch.random.get_rng_state()
    again = tiny_st_llm(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = tiny_st_llm(seed=1)
    assert not torch.equal(other.bt_adapter.time_embed.weight, model.bt_adapter.time_embed.weight)
    assert model.config.vision_config.image_size == 224 and model.bt_adapter.time_embed.num_embeddings == 64
    assert model.vision.embeddings.position_embedding.shape[1] == 257 and model.query_tokens.shape[1] == 32
    assert model.vision.post_layernorm.eps == 1e-5 and model.bt_adapter.spatial[0].layer_norm1.eps == 1e-5
    assert model.bt_adapter.temporal[0].norm.eps == 1e-6 and model.vision.encoder.layers[0].layer_norm1.eps == 1e-6


# --- prompt and preprocessing --------------------------------------------------------------------------------------


def test_prompt_and_input_ids():
    prompt = st_llm_prompt("What is he doing?")
    assert prompt == "<ImageHere>###Human: What is he doing? ###Assistant: "
    assert prompt.split(IMAGE_PLACEHOLDER)[0] == ""

    def tokenizer(text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [len(word) for word in text.split()]}

    ids = st_llm_input_ids(tokenizer, "What is he doing?")
    assert ids.tolist() == [[PLACEHOLDER_ID, 2, 9, 4, 2, 2, 6, 13]]


def test_preprocess_resizes_short_side_and_center_crops():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 240, 320, 3), dtype=np.uint8)
    out = preprocess_st_llm(frames)
    assert out.shape == (1, 2, 3, 224, 224) and out.dtype == torch.float32
    # Short side 240 -> 224, long side int(224 * 320 / 240) = 298; centre crop offset round(74 / 2) = 37.
    resized = np.asarray(Image.fromarray(frames[1]).resize((298, 224), Image.BICUBIC))[:, 37 : 37 + 224]
    mean, std = np.array(OPENAI_CLIP_MEAN, np.float32), np.array(OPENAI_CLIP_STD, np.float32)
    expected = ((resized.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0, 1].numpy(), expected, rtol=0, atol=1e-6)
    # Portrait frame: width is the short side; a 224x224 frame is only normalised.
    assert preprocess_st_llm(frames.transpose(0, 2, 1, 3).copy()).shape == (1, 2, 3, 224, 224)
    square = rng.integers(0, 256, size=(1, 224, 224, 3), dtype=np.uint8)
    exact = (
        torch.from_numpy(square).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(3, 1, 1)
    ) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(preprocess_st_llm(square)[0], exact, rtol=0, atol=1e-6)
    grey = np.full((1, 100, 300, 3), 128, np.uint8)
    value = (128 / 255 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]
    assert math.isclose(float(preprocess_st_llm(grey)[0, 0, 0].mean()), value, abs_tol=1e-5)
    with pytest.raises(ValueError, match=r"uint8 numpy array \[T, H, W, 3\]"):
        preprocess_st_llm(frames.astype(np.float32))
    with pytest.raises(ValueError, match="at least one"):
        preprocess_st_llm(frames[:0])
