"""HoliTom: the official rules on small hand-made inputs (module docstring of prune/strategies/holitom.py)."""

from __future__ import annotations

import math

import pytest
import torch

from prune.api import LayerInput, LayerMerge, PreLLMOutput, VideoTokens, simulate
from prune.strategies.holitom import HoliTom, dpc_knn_centres, merge_weights, static_windows, window_reduction


def _sim(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- global temporal segmentation -----------------------------------------------------------------------------------


def test_window_reduction_counts_static_locations_times_extra_frames():
    # 4 frames, 3 locations; location 0 static throughout, location 1 only between frames 0-1, location 2 never
    sim = _sim([[0.9, 0.9, 0.1], [0.9, 0.1, 0.1], [0.9, 0.1, 0.1]])
    count = window_reduction(sim, tau=0.8)
    assert count[0, 1] == 2 * 1  # two static locations, one extra frame
    assert count[0, 2] == 1 * 2 and count[0, 3] == 1 * 3 and count[1, 3] == 1 * 2
    assert count[2, 2] == 0 and count[3, 0] == 0
    assert window_reduction(sim, tau=0.9)[0, 3] == 0  # strictly above tau


def test_segmentation_maximises_the_total_reduction():
    # Frames 0-1 share 3 locations, frames 0-4 share 2: one window [0, 4] removes 2 * 4 = 8, more than
    # [0, 1] + [2, 4] (3 + 2 * 2 = 7) which a first-window-first choice would take.
    sim = _sim(
        [
            [0.9, 0.9, 0.9, 0.1],
            [0.1, 0.9, 0.9, 0.1],
            [0.1, 0.9, 0.9, 0.1],
            [0.1, 0.9, 0.9, 0.1],
        ]
    )
    assert static_windows(sim, tau=0.8, max_window=1024) == ([(0, 4)], 8)
    # windows of at most 2 frames: (0, 1) + (2, 3) + (4, 4) = 3 + 2
    assert static_windows(sim, tau=0.8, max_window=2) == ([(0, 1), (2, 3), (4, 4)], 5)


@pytest.mark.parametrize("seed", range(5))
def test_segmentation_equals_brute_force_over_every_partition(seed):
    g = torch.Generator().manual_seed(seed)
    t = 7
    sim = torch.rand(t - 1, 5, generator=g) * 0.3 + 0.65  # about half the pairs above tau = 0.8
    count = window_reduction(sim, 0.8)
    best = 0
    for cuts in range(2 ** (t - 1)):  # bit i set: a window ends after frame i
        starts = [0] + [i + 1 for i in range(t - 1) if cuts >> i & 1]
        ends = [s - 1 for s in starts[1:]] + [t - 1]
        best = max(best, sum(int(count[a, b]) for a, b in zip(starts, ends, strict=True)))
    windows, reduced = static_windows(sim, 0.8, 1024)
    assert reduced == best
    assert sum(int(count[a, b]) for a, b in windows) == best
    assert windows[0][0] == 0 and windows[-1][1] == t - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(windows, windows[1:], strict=False))


def test_segmentation_ties_keep_the_lone_frame_and_the_shorter_window():
    sim = _sim([[0.1, 0.1], [0.1, 0.1]])  # nothing static: every frame alone (a window that removes 0 never wins)
    assert static_windows(sim, 0.8, 1024) == ([(0, 0), (1, 1), (2, 2)], 0)
    # frames 1-2 static at one location, frame 0 unrelated: [1, 2] (1) beats [0, 2] (0 static over 3 frames)
    sim = _sim([[0.1, 0.1], [0.9, 0.1]])
    assert static_windows(sim, 0.8, 1024) == ([(0, 0), (1, 2)], 1)
    # equal reductions: [0, 1] + [2, 2] and [0, 0] + [1, 2] both remove 1; the strict > keeps the earlier (lone) one
    sim = _sim([[0.9, 0.1], [0.1, 0.9]])
    assert static_windows(sim, 0.8, 1024) == ([(0, 1), (2, 2)], 1)
    assert static_windows(torch.zeros(0, 3), 0.8, 1024) == ([(0, 0)], 0)  # one frame


# --- outer-LLM merging and its count --------------------------------------------------------------------------------


def _video(x: torch.Tensor, attn: torch.Tensor, grid: tuple[int, int]) -> VideoTokens:
    return VideoTokens(x, grid, frame_patch_attn=attn)


def _constructed(t=4, h=2, w=3, d=4, static=(0, 2, 4), seed=0):
    """Frames 0..t-1; the ``static`` locations are the same token (plus tiny noise) in every frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h * w, d, generator=g)
    for loc in static:
        x[:, loc] = torch.randn(d, generator=g) + 1e-3 * torch.randn(t, d, generator=g)
    attn = torch.rand(t, h * w, generator=g)
    return x, attn


def test_count_is_holitoms_own_not_round_ratio_times_n():
    x, attn = _constructed()  # 4 frames x 6 locations, 3 static throughout: one window [0, 3] removes 3 * 3 = 9
    s = HoliTom(ratio=0.3, merge_layer=None)
    pre = s.pre_llm(_video(x, attn, (2, 3)))
    n = 24
    r = min(0.3 / ((n - 9) / n), 1)  # 0.48
    static = round(3 * r)  # round(1.44) = 1 cluster
    dynamic = 4 * math.ceil(3 * r)  # ceil(1.44) = 2 per frame
    assert pre.n == static + dynamic == 9
    assert pre.n != round(0.3 * n)  # 7: the plain count would differ


def test_rounding_is_half_to_even_per_window_and_ceil_per_frame():
    # one frame, 4 locations: ceil(4 * 0.3) = 2 (not 1)
    x, attn = torch.randn(1, 4, 3), torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    pre = HoliTom(ratio=0.3, merge_layer=None).pre_llm(_video(x, attn, (2, 2)))
    assert pre.n == 2 and torch.equal(pre.tokens, x[0, [1, 2]])  # most attended, raster order
    # a static window with 5 static locations at r' = 0.5: round(2.5) = 2 clusters (half to even)
    x, attn = _constructed(t=2, h=2, w=3, static=(0, 1, 2, 3, 4))
    # N = 12, R = 5: r' = min(r / (7 / 12), 1) = 0.5 for r = 7 / 24
    s = HoliTom(ratio=7 / 24, merge_layer=None)
    pre = s.pre_llm(_video(x, attn, (2, 3)))
    assert pre.n == 2 + 2 * math.ceil(1 * 0.5)  # 2 static clusters + 1 dynamic token per frame


def test_static_tokens_merge_into_their_nearest_centre_with_beta():
    # 2 frames of 4 static locations forming two tight pairs: 2 DPC-kNN centres, one per pair
    base = torch.tensor([[0.0, 10.0], [0.0, 10.2], [10.0, 0.0], [10.4, 0.0]])
    x = torch.stack([base, base + 0.01])  # [2, 4, 2]: every location static (cosine ~ 1)
    x = torch.cat([x, torch.tensor([[[1.0, -1.0]], [[-1.0, -1.0]]])], dim=1)  # a dynamic 5th location
    attn = torch.rand(2, 5)
    s = HoliTom(ratio=0.3, merge_layer=None, beta=0.6)  # r' = 0.3 / 0.6 = 0.5: round(4 * 0.5) = 2 clusters
    pre = s.pre_llm(VideoTokens(x, (1, 5), frame_patch_attn=attn))
    mean = x[:, :4].mean(dim=0)
    centre, _ = dpc_knn_centres(mean, 2, 2, torch.Generator().manual_seed(0))
    pair = {0: 1, 1: 0, 2: 3, 3: 2}
    assert centre.tolist() in ([0, 2], [0, 3], [1, 2], [1, 3])  # one centre per pair
    for j, c in enumerate(centre.tolist()):  # centre joined by its partner: beta * centre + (1 - beta) * partner
        torch.testing.assert_close(pre.tokens[j], 0.6 * mean[c] + 0.4 * mean[pair[c]])
    # every frame's copy of a static location maps to its cluster; the dynamic token of each frame keeps its place
    a = pre.assignment.view(2, 5)
    assert torch.equal(a[0, :4], a[1, :4]) and set(a[0, :4].tolist()) == {0, 1}
    assert a[0, pair[centre[0].item()]] == 0 and a[0, 4] == 2 and a[1, 4] == 3
    assert pre.n == 2 + 2 * math.ceil(1 * 0.5)
    assert pre.origins()[:2].tolist() == centre.tolist()  # a static token takes its centre's place (frame 0)


def test_dynamic_tokens_by_vision_attention_with_ties_to_the_lower_index():
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))
    x[1] = -x[0]  # nothing static
    attn = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.0, 0.2, 0.9, 0.2]])
    pre = HoliTom(ratio=0.5, merge_layer=None).pre_llm(VideoTokens(x, (2, 2), frame_patch_attn=attn))
    assert pre.assignment.tolist() == [0, 1, -1, -1, -1, 2, 3, -1]  # ties: 0 and 1 before 2; frame 1: 2, then 1


def test_orders_static_first_and_by_position():
    x, attn = _constructed(t=2, h=2, w=3, static=(1, 4))  # static at 1 and 4, dynamic at 0, 2, 3, 5
    video = _video(x, attn, (2, 3))
    flat = HoliTom(ratio=0.5, merge_layer=None).pre_llm(video)
    grid = HoliTom(ratio=0.5, merge_layer=None, order="position").pre_llm(video)
    assert flat.n == grid.n
    loc = flat.origins() % 6
    frame = flat.origins() // 6
    n_static = int((frame == 0).sum() - (frame == 1).sum())  # frame 0 holds the static tokens too
    assert n_static >= 1
    assert set(loc[:n_static].tolist()) <= {1, 4}  # static first in the flat order
    g_loc, g_frame = grid.origins() % 6, grid.origins() // 6
    for f in (0, 1):  # every frame by location in the grid order
        mine = g_loc[g_frame == f]
        assert torch.equal(mine, mine.sort().values)
    assert sorted(flat.tokens.tolist()) == sorted(grid.tokens.tolist())  # the same tokens, another order


def test_ratio_one_is_the_identity_and_missing_attention_is_named():
    x, attn = _constructed()
    pre = HoliTom(ratio=1.0).pre_llm(_video(x, attn, (2, 3)))
    assert torch.equal(pre.tokens, x.reshape(24, 4)) and torch.equal(pre.assignment, torch.arange(24))
    assert HoliTom(ratio=1.0).layer_counts(pre, 28) == (24,) * 28
    with pytest.raises(ValueError, match="frame_patch_attn"):
        HoliTom(0.3).pre_llm(VideoTokens(x, (2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 1.5}, "tau"),
        ({"beta": -0.1}, "beta"),
        ({"merge_ratio": 1.0}, "merge_ratio"),
        ({"merge_layer": 0}, "merge_layer"),
        ({"neighbours": 0}, "neighbours"),
        ({"order": "grid"}, "order"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HoliTom(0.3, **kwargs)


# --- inner-LLM merge ------------------------------------------------------------------------------------------------


def _official_sequential(hidden: torch.Tensor, keep: list[int], into_tokens: list[int]) -> torch.Tensor:
    """The official loop: each non-survivor in index order averaged into its survivor, ``h = (h + h_t) / 2``."""
    h = hidden.clone().double()
    absorbed = [i for i in range(hidden.shape[0]) if i not in keep]
    for t in absorbed:
        s = into_tokens[t]
        h[s] = (h[s] + h[t]) / 2
    return h[keep]


def test_merge_weights_reproduce_sequential_pairwise_averaging():
    g = torch.Generator().manual_seed(0)
    n, d = 12, 5
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 4, 9])
    into = torch.tensor([0, 0, 2, 1, 1, 0, 0, 2, 1, 2, 2, 0])
    weights = merge_weights(into, keep)
    merged = torch.zeros(3, d, dtype=torch.float64).index_add_(0, into, hidden * weights[:, None])
    into_tokens = keep[into].tolist()
    torch.testing.assert_close(merged, _official_sequential(hidden, keep.tolist(), into_tokens))
    # not a plain mean: survivor 1 (4 absorbed) weighs itself 1/16
    assert weights[1] == 1 / 16 and weights[0] == 1 / 16 and weights[11] == 1 / 2


def _step(scores, hidden, n_in=None):
    n = scores.numel()
    pre = PreLLMOutput(torch.zeros(n, hidden.shape[1]), torch.arange(n_in or 2 * n) // 2)  # pruned: n < N
    return LayerInput(1, scores, torch.arange(n), pre, hidden)


def test_in_llm_keeps_the_most_attended_and_merges_into_the_most_similar():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [1.0, 1.0]])
    scores = torch.tensor([0.5, 0.4, 0.1, 0.1, 0.2])
    out = HoliTom(ratio=0.3, merge_layer=2, merge_ratio=0.5).in_llm(_step(scores, hidden))
    assert isinstance(out, LayerMerge)
    assert out.keep.tolist() == [0, 1]  # round(5 * 0.5) = round(2.5) = 2 (half to even, Python round)
    # token 2 joins [1, 0]; token 3 joins [0, 1]; token 4 ([1, 1]) is equally close to both: the first survivor
    assert out.into.tolist() == [0, 1, 0, 1, 0]
    # sequential averaging in index order: survivor 0 absorbs 2 then 4
    assert out.weights.tolist() == [0.25, 0.5, 0.25, 0.5, 0.5]


def test_in_llm_count_is_python_round_and_ties_go_first():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.2, 0.8], [0.5, 0.5], [0.6, 0.4]])
    scores = torch.tensor([0.5, 0.4, 0.4, 0.1, 0.1, 0.05])
    out = HoliTom(0.3, merge_layer=2, merge_ratio=0.5).in_llm(_step(scores, hidden))
    assert out.keep.tolist() == [0, 1, 2]  # round(3.0) = 3; the tie 0.4 / 0.4 is inside the top 3
    # token 3 ~ [0.2, 0.8]: nearest survivor 1 ([0, 1]); token 4 [0.5, 0.5]: cosine 1 to survivor 2 ([1, 1]);
    # token 5 [0.6, 0.4]: cosine 0.98 to [1, 1], 0.83 to [1, 0]
    assert out.into.tolist() == [0, 1, 2, 1, 2, 2]
    equal = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # token 2 equally similar to both survivors
    tie = HoliTom(0.3, merge_layer=2, merge_ratio=0.4).in_llm(_step(torch.tensor([0.9, 0.8, 0.1]), equal))
    assert tie.keep.tolist() == [0, 1] and tie.into.tolist() == [0, 1, 0]  # round(1.8) = 2


def test_in_llm_is_the_identity_after_an_unpruned_outer_stage():
    hidden, scores = torch.randn(4, 2), torch.rand(4)
    step = LayerInput(1, scores, torch.arange(4), PreLLMOutput(hidden, torch.arange(4)), hidden)
    assert torch.equal(HoliTom(0.3, merge_layer=2).in_llm(step), torch.arange(4))


def test_layer_counts_follow_the_merge_and_simulate():
    x, attn = _constructed(t=6, h=3, w=3, static=(0, 1, 2, 3))
    for layer, r in ((18, 0.5), (5, 0.3)):
        s = HoliTom(ratio=0.4, merge_layer=layer, merge_ratio=r)
        pre, budget = simulate(s, _video(x, attn, (3, 3)), 28, lambda spec, vis, pre: torch.rand(vis.numel()))
        assert budget.per_layer == s.layer_counts(pre, 28)
        assert budget.per_layer[:layer] == (pre.n,) * layer
        assert set(budget.per_layer[layer:]) == {round(pre.n * (1 - r))}
    wo_m = HoliTom(ratio=0.4, merge_layer=None)
    assert wo_m.layer_specs == () and wo_m.layer_counts(pre, 28) == (pre.n,) * 28
    spec = HoliTom(0.4).layer_specs[0]
    assert (spec.layer, spec.first_layer, spec.queries, spec.hidden, spec.positions) == (17, 18, "last", True, "keep")
    assert not spec.prune_past_kv and not spec.own_layer


@pytest.mark.parametrize(("ratio", "wo_m", "full"), [(0.25, 0.213, 0.174), (0.15, 0.127, 0.105), (0.10, 0.083, 0.069)])
def test_prefill_flops_of_the_schedule_match_holitoms_table(ratio, wo_m, full):
    """HoliTom's LLaVA-OV-7B table (results/published/holitom_llava_ov.csv): FLOPs ratios of "w/o M" and the full method
    at a before-LLM retention; our layer counts (k = 18, r = 0.5 on 28 layers) give the same ratios (±0.004)."""
    from prune.flops import SHAPES, prefill_flops

    q, n_in = SHAPES["qwen2-7b"], 32 * 196
    n = round(ratio * n_in)
    pre = PreLLMOutput(torch.zeros(n, 1), torch.arange(n_in) % n)
    dense = prefill_flops([n_in] * 28, q.hidden, q.ffn)
    for strategy, published in ((HoliTom(ratio, merge_layer=None), wo_m), (HoliTom(ratio), full)):
        counts = strategy.layer_counts(pre, 28)
        assert prefill_flops(list(counts), q.hidden, q.ffn) / dense == pytest.approx(published, abs=0.004)
