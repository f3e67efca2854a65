"""One conformance suite over every strategy config in ``configs/prune/`` (composer's algorithm_settings pattern).

A new strategy config without an entry in ``BUDGET_RULES`` fails here on purpose: say what its budget means.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prune.api import VISION_INPUTS, PreLLMOutput, Strategy, TokenBudget, VideoTokens, keep_count, simulate

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "prune").glob("*.yaml"))
NAMES = [p.stem for p in CONFIGS]
RATIOS = [0.3, 1.0]
NUM_LAYERS = 28
T_FRAMES = 16  # frames of the conformance video


def _expected_ok(name: str, s: Strategy, pre: PreLLMOutput, budget: TokenBudget) -> str | None:
    """Check the budget each strategy declares (±1 token); return an error message or None."""
    n_in, r = budget.visual_in, s.ratio
    if name == "none":
        ok = budget.per_layer == (n_in,) * NUM_LAYERS and pre.n == n_in
    elif name == "fastv":
        k = s.layer
        ok = budget.per_layer[:k] == (n_in,) * k and all(
            abs(v - keep_count(r, n_in)) <= 1 for v in budget.per_layer[k:]
        )
    elif name in ("random", "pool"):
        ok = abs(pre.n - keep_count(r, n_in)) <= 1 and set(budget.per_layer) == {pre.n}
    elif name == "prunevid":
        # Stage 1 is content-dependent; stage 2 keeps int(alpha * size) of every group.
        ok = budget.per_layer[-1] == sum(math.floor(g * r) for g in pre.groups)
    elif name == "pdrop":
        # ratio is PDrop's layer-averaged retention; int() per stage loses under a token per stage.
        ok = budget.layer_avg_ratio <= r + 1e-9 and abs(budget.layer_avg_ratio - r) <= 0.01 * r
    elif name == "framefusion":
        # ratio is the official cost, a layer-averaged retention met by construction once it prunes (round() per stage)
        ok = abs(budget.layer_avg_ratio - r) <= 0.01 * r + 1 / n_in
    elif name == "hieravid":
        # ratio is the layer-averaged retention; within 1 % of it (and never above by more than a token per layer).
        ok = abs(budget.layer_avg_ratio - r) <= 0.01 * r
    elif name == "visionzip":
        # keep_count(ratio, P) tokens per frame (dominant + contextual)
        t, p = T_FRAMES, n_in // T_FRAMES
        ok = pre.n == t * keep_count(r, p) and set(budget.per_layer) == {pre.n}
    elif name == "vidcom2":
        # frame budgets average ratio; per-frame rounding moves the total by at most one token per frame
        ok = (pre.n == n_in if r == 1.0 else abs(pre.n - r * n_in) <= T_FRAMES) and set(budget.per_layer) == {pre.n}
    elif name == "fastvid":
        # int(P * ratio) per frame; a segment's anchors lose < ceil(L/p) <= L tokens to integer division
        retain = max(1, int(n_in // T_FRAMES * r))
        ok = T_FRAMES * retain - T_FRAMES <= pre.n <= T_FRAMES * retain if r < 1.0 else pre.n == n_in
    elif name == "dycoke":
        # TTM: whole frames plus int(ratio * P) of each pruned frame; decode-time pruning is outside the prefill
        from prune.strategies.dycoke import ttm_plan

        p = n_in // T_FRAMES
        cut = sum(ref is not None for ref in ttm_plan(T_FRAMES))
        ok = pre.n == n_in - cut * (p - min(p, int(r * p))) and set(budget.per_layer) == {pre.n}
    elif name == "holitom":
        # HoliTom's own count: r' = r / ((N - R) / N) spread over windows (round) and frames (ceil), so the total is
        # r * N up to half a token per window below and under one token per frame above; then round(n * (1 - r_m))
        # from merge_layer on. ratio 1 is the unpruned model.
        k = s.merge_layer
        if r == 1.0:
            ok = pre.n == n_in and budget.per_layer == (n_in,) * NUM_LAYERS
        else:
            ok = -T_FRAMES / 2 <= pre.n - r * n_in < T_FRAMES and budget.per_layer == (pre.n,) * k + (
                round(pre.n * (1 - s.merge_ratio)),
            ) * (NUM_LAYERS - k)
    else:
        return f"no budget rule for strategy config {name!r}: add one to BUDGET_RULES in {__file__}"
    return None if ok else f"{name} at ratio {r}: budget not met: pre={pre.n}, per_layer={budget.per_layer}"


def _strategy(name: str, ratio: float) -> Strategy:
    cfg = OmegaConf.create({"ratio": ratio, "prune": OmegaConf.load(CONFIGS[NAMES.index(name)])})
    if name in ("hieravid", "pdrop", "framefusion"):
        cfg.prune.num_layers = NUM_LAYERS
    return instantiate(cfg.prune)


def _video(t=T_FRAMES, h=6, w=6, d=32, dtype=torch.float32, seed=0, static=0):
    """Random tokens, and random vision-side fields (strategies that do not declare them never read them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h * w, d, generator=g)
    if static:
        x[:, :static] = torch.randn(static, d, generator=g)
    vision = {
        "frame_global": torch.randn(t, 8, generator=g),
        "frame_head_attn": torch.rand(t, h * w, generator=g),
        "frame_patch_attn": torch.rand(t, h * w, generator=g),
        "frame_patch_keys": torch.randn(t, h * w, 4, generator=g),
    }
    return VideoTokens(x.to(dtype), (h, w), **vision)


def _scores(seed=0):
    def fn(spec, visual, pre):
        g = torch.Generator().manual_seed(seed + spec.layer)
        return torch.rand(visual.numel(), generator=g)

    return fn


def test_every_config_is_covered():
    assert {"none", "fastv", "prunevid", "hieravid", "random", "pool"} <= set(NAMES)
    assert {"visionzip", "vidcom2", "fastvid", "dycoke"} <= set(NAMES)
    assert {"pdrop", "framefusion", "holitom"} <= set(NAMES)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", NAMES)
def test_conformance(name, ratio):
    s = _strategy(name, ratio)
    assert isinstance(s, Strategy) and s.name == name
    video = _video(static=12)
    before = video.tokens.clone()
    rng = torch.get_rng_state()

    pre, budget = simulate(s, video, NUM_LAYERS, _scores())
    assert torch.equal(video.tokens, before), "input mutated"
    assert torch.equal(rng, torch.get_rng_state()), "global RNG used"
    assert (msg := _expected_ok(name, s, pre, budget)) is None, msg
    if name == "framefusion":  # counts follow hidden-state similarity inside the LLM: not promised in advance
        with pytest.raises(ValueError, match="known only after the prefill"):
            s.layer_counts(pre, NUM_LAYERS)
    else:
        assert s.layer_counts(pre, NUM_LAYERS) == budget.per_layer
    assert all(b >= a for a, b in zip(budget.per_layer[1:], budget.per_layer, strict=False)), "counts grow"

    # assignment: every input token maps to an output token or -1, every output token has a member
    n = pre.n
    assert pre.assignment.shape == (video.tokens.shape[0] * video.tokens.shape[1],)
    assert pre.assignment.min() >= -1 and pre.assignment.max() < n
    assert torch.bincount(pre.assignment[pre.assignment >= 0], minlength=n).min() >= 1
    for kept in budget.kept:
        assert kept.dtype == torch.long
        assert torch.equal(kept, torch.unique(kept)), "kept indices must be sorted and unique"

    # deterministic under the seed
    pre2, budget2 = simulate(_strategy(name, ratio), _video(static=12), NUM_LAYERS, _scores())
    assert torch.equal(pre.tokens, pre2.tokens)
    assert all(torch.equal(a, b) for a, b in zip(budget.kept, budget2.kept, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_preserved(name):
    s = _strategy(name, 0.5)
    video = _video(dtype=torch.bfloat16)
    pre, _ = simulate(s, video, NUM_LAYERS, _scores())
    assert pre.tokens.dtype == torch.bfloat16 and pre.tokens.device == video.tokens.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_device_preserved(name):
    s = _strategy(name, 0.5)
    cpu = _video()
    video = VideoTokens(cpu.tokens.cuda(), (6, 6), **{k: getattr(cpu, k).cuda() for k in VISION_INPUTS})
    pre, budget = simulate(s, video, NUM_LAYERS, lambda spec, vis, pre: torch.rand(vis.numel(), device=vis.device))
    assert pre.tokens.is_cuda and pre.assignment.is_cuda
    assert all(k.is_cuda for k in budget.kept)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_short_videos_are_not_errors(name, t):
    """T = 1 and T < k (DPC-KNN's 7 neighbours) run: fewer neighbours, one segment."""
    pre, budget = simulate(_strategy(name, 0.5), _video(t=t), NUM_LAYERS, _scores())
    assert 1 <= pre.n <= t * 36
    assert budget.per_layer[-1] >= 1


def test_none_is_the_identity():
    video = _video()
    pre, budget = simulate(_strategy("none", 0.3), video, NUM_LAYERS, _scores())
    assert torch.equal(pre.tokens, video.tokens.reshape(-1, video.tokens.shape[-1]))
    assert torch.equal(pre.assignment, torch.arange(pre.n))
    assert budget.layer_avg_ratio == 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_bad_ratio_names_the_range(name, ratio):
    with pytest.raises(InstantiationException) as err:
        _strategy(name, ratio)
    assert isinstance(err.value.__cause__, ValueError) and "(0, 1]" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("tokens", "grid", "match"),
    [
        (torch.randn(0, 4, 8), (2, 2), "empty"),
        (torch.randn(4, 8), (2, 2), "rank 3"),
        (torch.randn(1, 2, 4, 8), (2, 2), "rank 3"),
        (torch.full((2, 4, 8), float("inf")), (2, 2), "NaN or inf"),
        (torch.randn(2, 4, 8), (3, 2), "does not match"),
        (torch.ones(2, 4, 8, dtype=torch.long), (2, 2), "floating point"),
    ],
)
def test_bad_video_input(tokens, grid, match):
    with pytest.raises(ValueError, match=match):
        VideoTokens(tokens, grid)
