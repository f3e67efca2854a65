"""LLaVA-OneVision / LLaVA-Video adapter on tiny random models (real geometry, tiny widths), CPU only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prune.adapters.llava_onevision import (
    VIDEO_TOKEN_ID,
    LlavaOnevisionAdapter,
    load_llava_onevision,
    tiny_llava_onevision,
)
from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens
from prune.strategies.fastv import FastV
from prune.strategies.none import NoPruning
from prune.strategies.prunevid import PruneVid

T = 4
PREFIX = [151644, 872, 198]  # <|im_start|>user\n
SUFFIX = [198, 3838, 374, 279, 1697, 3730, 30, 198, 151645, 198, 151644, 77091, 198]  # question + assistant turn
CONFIGS = Path(__file__).parents[2] / "configs" / "prune"
# Per-strategy settings that fit the tiny 4-layer LLM (the real defaults target 28/32 layers).
TINY_OVERRIDES = {
    "prunevid": {"layer": 1},
    "hieravid": {"num_layers": 4, "boundaries": [1, 2, 3]},
    "pdrop": {"num_layers": 4, "layers": [1, 2, 3]},
    "framefusion": {"num_layers": 4},
    "holitom": {"merge_layer": 3},
}


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llava_onevision(seed=0)


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava_onevision(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def video():
    return torch.randn(1, T, 3, 384, 384, generator=torch.Generator().manual_seed(1))


def _ids(n_placeholders=1):
    return torch.tensor([PREFIX + [VIDEO_TOKEN_ID] * n_placeholders + SUFFIX])


def _run(model, strategy, video, layout="onevision", **kw):
    adapter = LlavaOnevisionAdapter(model, strategy, layout, num_frames=T)
    try:
        return adapter, adapter.generate(_ids(), video, **kw)
    finally:
        adapter.llm.remove()


@dataclass(frozen=True)
class FixedKeep:
    """Test strategy: identity before the LLM; after ``layer`` keeps the given visual indices."""

    keep: tuple[int, ...]
    layer: int = 1
    prune_past_kv: bool = True
    ratio: float = 1.0
    name: str = "fixed"

    @property
    def layer_specs(self):
        return (LayerSpec(layer=self.layer, queries="last", prune_past_kv=self.prune_past_kv),)

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        t, p, d = video.tokens.shape
        return PreLLMOutput(video.tokens.reshape(t * p, d), torch.arange(t * p))

    def in_llm(self, step: LayerInput) -> torch.Tensor:
        return torch.tensor(self.keep)

    def layer_counts(self, pre, num_layers):
        return (pre.n,) * (self.layer + 1) + (len(self.keep),) * (num_layers - self.layer - 1)


# --- fidelity to the unmodified HF model -----------------------------------------------------------------------


def test_vision_path_matches_hf_get_video_features(sdpa_model, video):
    adapter = LlavaOnevisionAdapter(sdpa_model, NoPruning(), "onevision", num_frames=T)
    grid = adapter.video_grid(video)
    assert grid.shape == (T, 14, 14, 64)
    with torch.no_grad():
        hf = sdpa_model.model.get_video_features(
            pixel_values_videos=video, vision_feature_layer=-1, vision_feature_select_strategy="full"
        ).pooler_output[0]
    assert hf.shape[0] == T * 196 + 1  # one trailing newline
    torch.testing.assert_close(grid.reshape(-1, 64), hf[:-1])
    adapter.llm.remove()


def test_none_reproduces_hf_generate(sdpa_model, video):
    n_video = T * 196 + 1
    ids = _ids(n_video)
    with torch.no_grad():
        out = sdpa_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=video,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    _, ours = _run(sdpa_model, NoPruning(), video, max_new_tokens=6, return_logits=True)
    assert ours.tokens == out.sequences[0, ids.shape[1] :].tolist()
    for mine, theirs in zip(ours.logits, out.logits, strict=True):
        torch.testing.assert_close(mine, theirs[0].float(), rtol=1e-5, atol=1e-5)
    assert ours.visual_in == ours.visual_pre_llm == T * 196 and ours.separators == 1


def test_fastv_ratio_one_equals_none(sdpa_model, video):
    _, base = _run(sdpa_model, NoPruning(), video, max_new_tokens=6, return_logits=True)
    _, fast = _run(sdpa_model, FastV(ratio=1.0), video, max_new_tokens=6, return_logits=True)
    assert fast.tokens == base.tokens
    for a, b in zip(fast.logits, base.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --- KV cache and positions -------------------------------------------------------------------------------------


def _reference_logits(model, ids, video, keep, layer, generated, hide_pruned_from_new):
    """From scratch: one forward over prompt + generated tokens, eager attention, explicit 4-D mask.

    Layers 0..layer see the whole prompt; after ``layer`` only the kept visual tokens remain, with their original
    positions. With ``hide_pruned_from_new`` the generated tokens never see the pruned tokens (PruneVid: the KV cache
    of layers <= K is cut too); without it they see them in layers <= K (FastV's full shallow cache).
    """
    adapter = LlavaOnevisionAdapter(model, NoPruning(), "onevision", num_frames=T)
    with torch.no_grad():
        grid = adapter.video_grid(video).reshape(-1, 64)
        vis, _, _ = adapter.visual_sequence(PreLLMOutput(grid, torch.arange(grid.shape[0])), grid.view(T, 14, 14, 64))
        embed = model.get_input_embeddings()
        prompt = torch.cat([embed(torch.tensor(PREFIX)), vis, embed(torch.tensor(SUFFIX))])
        x = torch.cat([prompt, embed(torch.tensor(generated[:-1]))])[None]
        s, total = prompt.shape[0], x.shape[1]
        pos = torch.arange(total)
        pruned = torch.ones(grid.shape[0], dtype=torch.bool)
        pruned[list(keep)] = False
        pruned_pos = len(PREFIX) + pruned.nonzero()[:, 0]
        allowed = torch.ones(total, total, dtype=torch.bool).tril()
        if hide_pruned_from_new:
            allowed[s:, pruned_pos] = False
        mask = torch.zeros(total, total).masked_fill(~allowed, float("-inf"))[None, None]
        kept = torch.ones(total, dtype=torch.bool)
        kept[pruned_pos] = False
        idx = kept.nonzero()[:, 0]
        lm = model.model.language_model
        cos, sin = lm.rotary_emb(x, pos[None])
        h = x
        for i, dec in enumerate(lm.layers):
            if i == layer + 1:
                h, cos, sin, pos, mask = h[:, idx], cos[:, idx], sin[:, idx], pos[idx], mask[:, :, idx][:, :, :, idx]
            h = dec(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
        logits = model.lm_head(lm.norm(h))[0].float()
    adapter.llm.remove()
    return logits[-len(generated) :]


@pytest.mark.parametrize("prune_past_kv", [True, False])
def test_decode_with_pruned_cache_matches_from_scratch_forward(sdpa_model, eager_model, video, prune_past_kv):
    keep = tuple(range(0, T * 196, 5))
    strategy = FixedKeep(keep, layer=1, prune_past_kv=prune_past_kv)
    _, out = _run(sdpa_model, strategy, video, max_new_tokens=5, return_logits=True)
    ref = _reference_logits(eager_model, _ids(), video, keep, 1, out.tokens, hide_pruned_from_new=prune_past_kv)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, ref[step], rtol=1e-4, atol=1e-4)


def test_prunevid_kv_lengths_and_eager_agrees_with_sdpa(sdpa_model, eager_model, video):
    strategy = PruneVid(ratio=0.4, layer=1)
    adapter, out = _run(sdpa_model, strategy, video, max_new_tokens=4, return_logits=True)
    kept_visual = out.llm.visual_per_layer[-1]
    expected = len(PREFIX) + kept_visual + out.separators + len(SUFFIX)
    assert out.llm.kv_len_per_layer == [expected] * 4  # layers <= K were cut too
    assert out.llm.kv_bytes == sum(2 * expected * 2 * 16 * 4 for _ in range(4))  # K and V, 2 kv heads x 16 dims, fp32
    _, eager = _run(eager_model, strategy, video, max_new_tokens=4, return_logits=True)
    assert eager.tokens == out.tokens
    assert eager.llm.visual_per_layer == out.llm.visual_per_layer
    for a, b in zip(eager.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fastv_keeps_full_shallow_cache_by_default(sdpa_model, video):
    _, out = _run(sdpa_model, FastV(ratio=0.25, layer=2), video, max_new_tokens=2)
    n = T * 196
    full = len(PREFIX) + n + 1 + len(SUFFIX)
    short = len(PREFIX) + round(0.25 * n) + 1 + len(SUFFIX)
    assert out.llm.kv_len_per_layer == [full, full, short, short]
    assert out.llm.visual_per_layer == [n, n, round(0.25 * n), round(0.25 * n)]


# --- every strategy on both layouts --------------------------------------------------------------------------------


def _strategy(name, ratio=0.3):
    cfg = OmegaConf.create({"ratio": ratio, "prune": OmegaConf.load(CONFIGS / f"{name}.yaml")})
    for key, value in TINY_OVERRIDES.get(name, {}).items():
        cfg.prune[key] = value
    return instantiate(cfg.prune)


@pytest.mark.parametrize("layout", ["onevision", "video"])
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_strategy_runs_on_both_backbones(sdpa_model, video, layout, name):
    from prune.adapters.vision import siglip_pooling_head

    strategy = _strategy(name)
    head = siglip_pooling_head(sdpa_model.config.vision_config)  # FastVID's restored SigLIP head (random here)
    adapter = LlavaOnevisionAdapter(sdpa_model, strategy, layout, num_frames=T, pooling_head=head)
    try:
        grid = adapter.video_grid(video)
        video_tokens = adapter.video_tokens(video)
        out = adapter.generate(_ids(), video, max_new_tokens=3)
    finally:
        adapter.llm.remove()
    per_frame = 196 if layout == "onevision" else 169
    assert grid.shape[:3] == ((T, 14, 14) if layout == "onevision" else (T, 13, 13))
    assert out.visual_in == T * per_frame
    assert len(out.tokens) == 3
    # The layer counts the LLM measured are the ones the strategy promises for its own pre-LLM output.
    pre = strategy.pre_llm(video_tokens)
    assert out.visual_pre_llm == pre.n
    if name == "framefusion":  # counts follow hidden-state similarity: measured only; the layer average is its budget
        assert abs(sum(out.llm.visual_per_layer) / (4 * pre.n) - strategy.ratio) <= 0.01 + 1 / pre.n
    else:
        assert tuple(out.llm.visual_per_layer) == strategy.layer_counts(pre, 4)
    if layout == "onevision":
        assert out.separators == 1
    elif pre.n == T * per_frame and name in ("none", "fastv"):
        assert out.separators == T * 13  # one newline per row: 182 tokens per frame
        assert out.visual_pre_llm + out.separators == T * 182
    else:
        assert 1 <= out.separators <= pre.n  # one newline per run of tokens from the same frame
    assert set(out.timings) == {"vision", "pre_llm", "prefill", "decode"}


def test_video_layout_newline_per_frame_after_pre_llm_pruning(sdpa_model, video):
    from prune.strategies.random import RandomPruning

    adapter = LlavaOnevisionAdapter(sdpa_model, RandomPruning(ratio=0.5), "video", num_frames=T)
    grid = adapter.video_grid(video)
    pre = adapter.strategy.pre_llm(VideoTokens(grid.reshape(T, 169, 64), (13, 13)))
    tokens, index, _ = adapter.visual_sequence(pre, grid)
    newline_at = (index < 0).nonzero()[:, 0]
    assert newline_at.numel() == T and int(newline_at[-1]) == index.numel() - 1
    frames = pre.sources()[index[index >= 0]] // 169
    assert torch.equal(frames, frames.sort().values)  # tokens in frame order, a newline closing each frame
    torch.testing.assert_close(tokens[newline_at], sdpa_model.model.image_newline.expand(T, 64))
    adapter.llm.remove()


# --- memory of the scoring layer ------------------------------------------------------------------------------------


def test_scoring_never_builds_the_full_attention_matrix(sdpa_model, video, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    from prune.adapters import llm

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    original = llm.PrunedLM._maybe_score

    def recorded(self, module, query, key):
        with Largest():
            return original(self, module, query, key)

    monkeypatch.setattr(llm.PrunedLM, "_maybe_score", recorded)
    _, out = _run(sdpa_model, PruneVid(ratio=0.4, layer=1), video, max_new_tokens=1)
    seq, heads, rows = out.llm.seq_len, 4, len(SUFFIX)
    assert Largest.biggest >= heads * rows * seq  # the rows after the video were scored ...
    assert Largest.biggest < seq * seq  # ... and nothing of S x S size was built (O(text rows x S))
    assert Largest.biggest <= 2 * heads * rows * seq


# --- bad input ------------------------------------------------------------------------------------------------------


def test_batch_larger_than_one_is_rejected(sdpa_model, video):
    adapter = LlavaOnevisionAdapter(sdpa_model, NoPruning(), "onevision", num_frames=T)
    with pytest.raises(ValueError, match="batch size 1"):
        adapter.generate(_ids().repeat(2, 1), video)
    with pytest.raises(ValueError, match="batch size 1"):
        adapter.generate(_ids(), video.repeat(2, 1, 1, 1, 1))
    adapter.llm.remove()


def test_wrong_frames_or_resolution_explain_the_fix(sdpa_model, video):
    adapter = LlavaOnevisionAdapter(sdpa_model, NoPruning(), "onevision", num_frames=T)
    with pytest.raises(ValueError, match="sample_frame_indices"):
        adapter.generate(_ids(), video[:, :2])
    with pytest.raises(ValueError, match="resize"):
        adapter.generate(_ids(), torch.randn(1, T, 3, 224, 224))
    with pytest.raises(ValueError, match="contiguous run of <video>"):
        adapter.generate(torch.tensor([PREFIX + SUFFIX]), video)
    adapter.llm.remove()


def test_strategy_needing_scores_on_an_unwrappable_kernel(video):
    model = tiny_llava_onevision(seed=0)
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation in"):
        LlavaOnevisionAdapter(model, FastV(ratio=0.5), "onevision", num_frames=T)
    # pre-LLM-only strategies need no scores and run with any kernel
    LlavaOnevisionAdapter(model, NoPruning(), "onevision", num_frames=T).llm.remove()


def test_eager_needs_uniform_kv_cache(eager_model):
    with pytest.raises(ValueError, match="prune_kv=true"):
        LlavaOnevisionAdapter(eager_model, FastV(ratio=0.5), "onevision", num_frames=T)


def test_strategy_layer_outside_the_llm():
    model = tiny_llava_onevision(seed=0)
    with pytest.raises(ValueError, match="0..2"):
        LlavaOnevisionAdapter(model, PruneVid(layer=10), "onevision", num_frames=T)


# --- loading ----------------------------------------------------------------------------------------------------


def test_from_pretrained_on_a_tiny_checkpoint(tmp_path, sdpa_model, video):
    sdpa_model.save_pretrained(tmp_path)
    loaded = load_llava_onevision(str(tmp_path), dtype=torch.float32)
    _, a = _run(sdpa_model, NoPruning(), video, max_new_tokens=2, return_logits=True)
    _, b = _run(loaded, NoPruning(), video, max_new_tokens=2, return_logits=True)
    torch.testing.assert_close(a.logits[0], b.logits[0])


def test_missing_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_llava_onevision(str(tmp_path / "nowhere"))


def test_tiny_build_leaves_global_rng_alone():
    state = torch.get_rng_state()
    tiny_llava_onevision(seed=3)
    assert torch.equal(state, torch.get_rng_state())


# --- the scores are the methods' own ------------------------------------------------------------------------------


def test_fastv_keeps_the_top_of_hf_eager_attention(sdpa_model, eager_model, video):
    n = T * 196
    ids = _ids(n + 1)
    with torch.no_grad():
        att = eager_model(input_ids=ids, pixel_values_videos=video, output_attentions=True, logits_to_keep=1).attentions
    start = len(PREFIX)
    last_row = att[1][0, :, -1, start : start + n].mean(0)  # layer K-1 = 1, head mean, last prompt token
    expected = last_row.topk(round(0.25 * n)).indices.sort().values
    _, out = _run(sdpa_model, FastV(ratio=0.25, layer=2), video, max_new_tokens=1)
    assert torch.equal(out.llm.kept[0], expected)


def test_prunevid_keeps_what_its_official_score_selects(sdpa_model, video):
    from prune.strategies.prunevid import select_tokens, token_scores

    captured = {}
    attn = sdpa_model.model.language_model.layers[1].self_attn

    def grab(module, args, kwargs):
        captured.setdefault("x", kwargs["hidden_states"][0].detach().clone())

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, out = _run(sdpa_model, PruneVid(ratio=0.4, layer=1), video, max_new_tokens=1)
    finally:
        handle.remove()
    x = captured["x"]
    with torch.no_grad():
        q = attn.q_proj(x).view(x.shape[0], -1, 16).transpose(0, 1)
        k = attn.k_proj(x).view(x.shape[0], -1, 16).transpose(0, 1)
    n = out.visual_pre_llm
    scores = token_scores(q, k, len(PREFIX), len(PREFIX) + n)
    grid = LlavaOnevisionAdapter(sdpa_model, NoPruning(), "onevision", num_frames=T).video_grid(video)
    from prune.strategies.prunevid import merge_tokens

    merged = merge_tokens(grid.reshape(T, 196, 64), generator=torch.Generator().manual_seed(0))
    expected = select_tokens(scores, merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, 0.4)
    assert torch.equal(out.llm.kept[0], expected)
