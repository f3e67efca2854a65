"""HieraVid (reconstructed, docs/methods/hieravid.md): segment, frame and layer levels, layer-averaged budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prune.api import LayerInput, VideoTokens, simulate
from prune.flops import SHAPES, flops_ratio, prefill_flops
from prune.strategies.hieravid import HieraVid, greedy_map, segment_frames, split_budget, static_positions

L = 28


def _scores(seed=0):
    def fn(spec, visual, pre):
        g = torch.Generator().manual_seed(seed + spec.layer)
        return torch.rand(visual.numel(), generator=g)

    return fn


def _random(t, p, d, seed=0):
    return torch.randn(t, p, d, generator=torch.Generator().manual_seed(seed))


def _scenes(lengths, p=16, d=32, noise=0.05, seed=0):
    """Frames of a scene = that scene's random tokens + small noise (adjacent cosine ~0.99 inside, ~0 across)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for n in lengths:
        base = torch.randn(p, d, generator=g)
        frames += [base + noise * torch.randn(p, d, generator=g) for _ in range(n)]
    return torch.stack(frames)


def _grid(p):
    h = int(math.isqrt(p))
    assert h * h == p
    return (h, h)


# ------------------------------------------------------------------------------------------------ segment level


def test_dyseg_cuts_at_scene_changes():
    x = _scenes([4, 5, 3])
    expected = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    # threshold cuts alone (c = 1: no forced cut)
    assert torch.equal(segment_frames(x, 1, 0.9), expected)
    # c = 3 forces the two lowest similarities, which are the same two scene changes
    assert torch.equal(segment_frames(x, 3, 0.9), expected)
    # c = 5 adds two more cuts inside scenes
    assert int(segment_frames(x, 5, 0.9)[-1]) + 1 == 5


def test_dyseg_forces_c_minus_1_cuts_at_the_lowest_similarities():
    # every frame is one unit vector rotating in a plane by known angles: all adjacent cosines > 0.9
    steps = torch.tensor([0.10, 0.30, 0.05, 0.20, 0.25, 0.02, 0.15])
    angle = torch.cat([torch.zeros(1), torch.cumsum(steps, 0)])
    v = torch.zeros(8, 8)
    v[:, 0], v[:, 1] = torch.cos(angle), torch.sin(angle)
    x = v.unsqueeze(1).expand(8, 4, 8).clone()
    assert torch.equal(segment_frames(x, 1, 0.9), torch.zeros(8, dtype=torch.long))
    # the three largest steps are after frames 1, 4 and 3
    assert segment_frames(x, 4, 0.9).tolist() == [0, 0, 1, 1, 2, 3, 3, 3]
    # tau_seg = -1: only the forced cuts; c is capped at T (every frame its own segment)
    assert segment_frames(x, 100, -1.0).tolist() == list(range(8))


def test_static_positions_need_every_consecutive_pair():
    x = _random(6, 9, 16)
    x[:, :3] = x[0, :3]  # positions 0-2 constant over the whole video
    x[3, 4] = x[2, 4]  # position 4 repeats only across the 2->3 transition
    seg = torch.tensor([0, 0, 0, 1, 1, 2])  # frames 0-2, 3-4, 5
    static = static_positions(x, seg, 0.9)
    assert static[0].nonzero().squeeze(1).tolist() == [0, 1, 2]
    assert static[1].nonzero().squeeze(1).tolist() == [0, 1, 2]  # 2->3 crosses the cut: position 4 stays dynamic
    assert not static[2].any()  # a one-frame segment has no static tokens


def test_static_tokens_merge_to_their_temporal_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 32, generator=g)
    x[:, :6] = torch.randn(6, 32, generator=g) + 0.05 * torch.randn(4, 6, 32, generator=g)  # static region
    s = HieraVid(ratio=1.0, num_segments=1, tau_seg=-1.0)  # one segment, keep every candidate
    pre = s.pre_llm(VideoTokens(x, (4, 4)))
    assert pre.n == 6 + 4 * 10
    a = pre.assignment.view(4, 16)
    # every frame's token at a static position maps to the same output, which is their temporal mean
    assert torch.equal(a[:, :6], a[:1, :6].expand(4, 6))
    torch.testing.assert_close(pre.tokens[a[0, :6]], x[:, :6].mean(0))
    # dynamic tokens are kept unchanged, and the output is in (frame, position) order with the merged tokens first
    assert torch.equal(pre.tokens[a[:, 6:].reshape(-1)], x[:, 6:].reshape(-1, 32))
    assert a[0].tolist() == list(range(16))
    assert torch.equal(pre.sources(), torch.sort(pre.sources()).values)
    # tau_static = 1.0 disables merging
    assert HieraVid(ratio=1.0, num_segments=1, tau_seg=-1.0, tau_static=1.0).pre_llm(VideoTokens(x, (4, 4))).n == 64


# -------------------------------------------------------------------------------------------------- frame level


def _bruteforce_greedy(kernel, k):
    chosen = []
    for _ in range(k):
        best, best_val = None, -math.inf
        for i in range(kernel.shape[0]):
            if i in chosen:
                continue
            idx = torch.tensor([*chosen, i])
            val = torch.logdet(kernel[idx][:, idx].double()).item()
            if val > best_val:
                best, best_val = i, val
        chosen.append(best)
    return chosen


def _kernel(n, d, seed, quality=False):
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    if quality:
        f = f * (0.1 + torch.rand(n, 1, generator=g))
    return f @ f.T


@pytest.mark.parametrize("quality", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_map_matches_bruteforce_logdet(seed, quality):
    kernel = _kernel(9, 12, seed, quality)
    expected = _bruteforce_greedy(kernel, 7)
    assert greedy_map(kernel[None], torch.tensor([9]), torch.tensor([7]))[0].tolist() == expected
    # the blocked form (rows folded into the kernel every 2 steps) picks the same items
    assert greedy_map(kernel[None], torch.tensor([9]), torch.tensor([7]), block=2)[0].tolist() == expected


def test_greedy_map_batches_kernels_of_different_sizes():
    a, b = _kernel(9, 12, 3), _kernel(6, 12, 4, quality=True)
    padded = torch.full((2, 9, 9), 7.0)  # junk outside the valid block must be ignored
    padded[0], padded[1, :6, :6] = a, b
    picks = greedy_map(padded, torch.tensor([9, 6]), torch.tensor([5, 3]), block=2)
    assert picks[0].tolist() == _bruteforce_greedy(a, 5)
    assert picks[1].tolist() == [*_bruteforce_greedy(b, 3), -1, -1]
    assert torch.equal(padded[1, 6:], torch.full((3, 9), 7.0)), "kernel overwritten without inplace=True"


def test_greedy_map_fills_the_budget_past_the_kernel_rank():
    f = torch.nn.functional.normalize(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    picks = greedy_map((f @ f.T)[None], torch.tensor([10]), torch.tensor([10]))[0]
    assert sorted(picks.tolist()) == list(range(10))


def test_split_budget_sums_and_respects_caps():
    lengths = torch.tensor([1, 3, 4])
    # beta = 1 and ample caps: proportional to duration
    assert split_budget(16, lengths, torch.ones(3), torch.tensor([100, 100, 100]), 1.0).tolist() == [2, 6, 8]
    # beta = 0: proportional to the spread
    k = split_budget(12, lengths, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([50, 50, 50]), 0.0)
    assert k.tolist() == [3, 3, 6]
    # a capped segment's surplus goes to the others; the sum stays exact
    k = split_budget(40, lengths, torch.tensor([1.0, 5.0, 1.0]), torch.tensor([30, 8, 30]), 0.6)
    assert int(k.sum()) == 40 and k[1] == 8 and bool((k >= 1).all())
    for budget in range(1, 69):
        k = split_budget(budget, lengths, torch.tensor([0.3, 2.0, 0.1]), torch.tensor([30, 8, 30]), 0.6)
        assert int(k.sum()) == budget and bool((k <= torch.tensor([30, 8, 30])).all())
        assert bool((k >= (1 if budget >= 3 else 0)).all())
    # more budget than candidates: everything
    assert split_budget(100, lengths, torch.ones(3), torch.tensor([3, 4, 5]), 0.6).tolist() == [3, 4, 5]


def test_text_quality_needs_text_and_uses_it():
    x = _random(1, 16, 32, seed=3)
    s = HieraVid(ratio=1 / 16, quality="text", boundaries=())  # no in-LLM stage: one pre-LLM token
    with pytest.raises(ValueError, match="text"):
        s.pre_llm(VideoTokens(x, (4, 4)))
    # one pick = the largest L_ii = q_i^2: the token most similar to the prompt
    pre = s.pre_llm(VideoTokens(x, (4, 4), text=x[0, 11:12] * 3))
    assert pre.n == 1 and pre.assignment.tolist().index(0) == 11


# ------------------------------------------------------------------------------------------------- layer budget


def _assert_budget(s, video, ratio, reachable=1.0):
    """Layer average within [0.99 * min(ratio, reachable), ratio]; ``reachable`` = candidates / N after merging."""
    pre, budget = simulate(s, video, L, _scores())
    avg = budget.layer_avg_ratio
    assert avg <= ratio * (1 + 1e-12), f"over budget: {avg} > {ratio}"
    assert avg >= 0.99 * min(ratio, reachable), f"under budget: {avg} < 0.99 * {min(ratio, reachable)}"
    assert s.layer_counts(pre, L) == budget.per_layer
    return pre, budget


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_layer_average_matches_ratio(ratio):
    _assert_budget(HieraVid(ratio=ratio), VideoTokens(_random(8, 64, 16), (8, 8)), ratio)
    # a video with scenes and static regions (merging active), and the text quality
    x = _scenes([5, 3, 8], p=64, d=16, noise=0.5)
    x[:, :20] = x[:1, :20]
    video = VideoTokens(x, (8, 8), text=_random(1, 3, 16, seed=9)[0])
    candidates = HieraVid(ratio=1.0).pre_llm(video).n  # what static merging leaves of the 16 * 64 tokens
    assert candidates == 886
    _, budget = _assert_budget(HieraVid(ratio=ratio, quality="text"), video, ratio, reachable=candidates / 1024)
    if ratio == 1.0:  # unavoidable: all candidates at every layer, never more
        assert budget.per_layer == (candidates,) * L


@pytest.mark.parametrize("ratio", [0.15, 0.6, 0.9])
@pytest.mark.parametrize(("boundaries", "keep"), [((4, 20), 0.5), ((2,), 0.3), ((), 0.7), ((1, 2, 3, 27), 0.9)])
def test_layer_average_other_schedules(boundaries, keep, ratio):
    # N = 8 * 144: with boundaries=() one pre-LLM count serves all 28 layers, so the average moves in steps of 1/N
    s = HieraVid(ratio=ratio, boundaries=boundaries, stage_keep=keep)
    _assert_budget(s, VideoTokens(_random(8, 144, 16), (12, 12)), ratio)


def test_static_video_under_meets_only_when_unavoidable():
    x = _random(1, 64, 16).expand(16, 64, 16).clone()  # one frame repeated: everything is static
    video = VideoTokens(x, (8, 8))
    # c = 2 -> two segments of 8 frames -> 2 * 64 candidates = 12.5 % of N
    pre, budget = simulate(HieraVid(ratio=0.3, num_segments=2), video, L, _scores())
    assert pre.n == 128 and budget.per_layer == (128,) * L  # everything kept everywhere: 0.125 < 0.3
    assert budget.layer_avg_ratio == 0.125
    # below 12.5 % the budget is met: the pre-LLM stage keeps all 128 candidates (rho0 ~ 0.158 is not available) and
    # the stages keep more than stage_keep to compensate
    pre, budget = _assert_budget(HieraVid(ratio=0.1, num_segments=2), video, 0.1)
    assert pre.n == 128 and budget.per_layer[7] / 128 > 0.7
    # tiny ratios are never exceeded either
    for ratio in (0.01, 0.003):
        _, budget = simulate(HieraVid(ratio=ratio, num_segments=2), video, L, _scores())
        assert budget.layer_avg_ratio <= ratio


def test_rho0_capped_at_one_raises_stage_keep():
    s = HieraVid(ratio=0.8)  # 0.8 * 28 / (7 * (1 + .7 + .49 + .343)) > 1
    pre, budget = _assert_budget(s, VideoTokens(_random(8, 64, 16), (8, 8)), 0.8)
    assert pre.n == 512 and budget.per_layer[7] / 512 > 0.7


def test_llava_ov_geometry_worked_example():
    """Qwen2-7B, 32 x 196 tokens, ratio 0.3: the numbers of docs/methods/hieravid.md."""
    s = HieraVid(ratio=0.3)
    assert s.pre_llm_count(6272) == 2971  # rho0 = 0.3 * 28 / 17.731 = 0.4737
    assert s.stage_counts(2971, 6272) == (2080, 1456, 1019)
    pre, budget = _assert_budget(s, VideoTokens(_random(32, 196, 16), (14, 14)), 0.3)
    assert budget.per_layer == (2971,) * 7 + (2080,) * 7 + (1456,) * 7 + (1019,) * 7
    assert abs(budget.layer_avg_ratio - 0.29998) < 1e-5
    q = SHAPES["qwen2-7b"]
    ratio = flops_ratio(prefill_flops(budget.per_layer, q.hidden, q.ffn), prefill_flops([6272] * L, q.hidden, q.ffn))
    assert abs(ratio - 0.2620) < 1e-4


def test_in_llm_keeps_the_scheduled_top_scores():
    s = HieraVid(ratio=0.3)
    pre = s.pre_llm(VideoTokens(_random(8, 64, 16), (8, 8)))
    k = s.stage_counts(pre.n, 512)[0]
    scores = torch.linspace(0, 1, pre.n).flip(0)  # decreasing: the first k win
    scores[5] = 2.0  # ...and token 5 stays in
    keep = s.in_llm(LayerInput(6, scores, torch.arange(pre.n), pre))
    assert keep.tolist() == list(range(k))
    scores = torch.rand(pre.n, generator=torch.Generator().manual_seed(0))
    keep = s.in_llm(LayerInput(6, scores, torch.arange(pre.n), pre))
    assert torch.equal(keep, torch.sort(torch.topk(scores, k).indices).values)
    with pytest.raises(ValueError, match="layers"):
        s.in_llm(LayerInput(7, scores, torch.arange(pre.n), pre))


# --------------------------------------------------------------------------------------- edge cases and checks


def test_single_frame_video():
    s = HieraVid(ratio=0.5)
    pre, budget = _assert_budget(s, VideoTokens(_random(1, 64, 16), (8, 8)), 0.5)
    assert pre.n == s.pre_llm_count(64)  # one segment, no static merging, DPP picks the planned count


def test_fewer_frames_than_segments():
    x = _random(1, 64, 16).expand(3, 64, 16).clone()  # identical frames, but T = 3 < c = 8
    assert segment_frames(x, 8, 0.9).tolist() == [0, 1, 2]  # c capped at T: every frame is a segment
    s = HieraVid(ratio=0.3)
    pre, _ = _assert_budget(s, VideoTokens(x, (8, 8)), 0.3)
    assert pre.n == s.pre_llm_count(192)  # so nothing is static and the planned count is available


def test_dtype_input_and_determinism():
    x = _scenes([3, 5], p=16, d=32, noise=0.3).to(torch.bfloat16)
    x[:, :4] = x[:1, :4]
    before = x.clone()
    rng = torch.get_rng_state()
    s = HieraVid(ratio=0.4)
    pre = s.pre_llm(VideoTokens(x, (4, 4)))
    assert torch.equal(x, before) and torch.equal(rng, torch.get_rng_state())
    assert pre.tokens.dtype == torch.bfloat16
    pre2 = s.pre_llm(VideoTokens(x.clone(), (4, 4)))
    assert torch.equal(pre.tokens, pre2.tokens) and torch.equal(pre.assignment, pre2.assignment)
    # every kept dynamic token is an exact copy of its input
    members = torch.bincount(pre.assignment[pre.assignment >= 0], minlength=pre.n)
    single = (members == 1).nonzero().squeeze(1)
    src = pre.sources()[single]
    assert torch.equal(pre.tokens[single], x.reshape(-1, 32)[src])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, r"\(0, 1\]"),
        ({"ratio": 1.5}, r"\(0, 1\]"),
        ({"ratio": float("nan")}, r"\(0, 1\]"),
        ({"boundaries": (7, 7)}, "strictly increasing"),
        ({"boundaries": (14, 7)}, "strictly increasing"),
        ({"boundaries": (0, 7)}, r"1\.\.27"),
        ({"boundaries": (7, 28)}, r"1\.\.27"),
        ({"boundaries": (7.0,)}, "ints"),
        ({"num_layers": 20}, r"1\.\.19"),
        ({"num_segments": 0}, ">= 1"),
        ({"tau_seg": 1.5}, r"\[-1\.0, 1\.0\]"),
        ({"tau_static": float("nan")}, r"\[-1\.0, 1\.0\]"),
        ({"segment_beta": -0.1}, r"\[0\.0, 1\.0\]"),
        ({"stage_keep": 0.0}, r"\(0, 1\]"),
        ({"quality": "saliency"}, "uniform"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HieraVid(**kwargs)


def test_layer_counts_rejects_other_depths():
    s = HieraVid()
    pre = s.pre_llm(VideoTokens(_random(2, 16, 8), (4, 4)))
    with pytest.raises(ValueError, match="num_layers=28"):
        s.layer_counts(pre, 32)


def test_config_instantiates_the_defaults():
    path = Path(__file__).parents[2] / "configs" / "prune" / "hieravid.yaml"
    s = instantiate(OmegaConf.create({"ratio": 0.3, "prune": OmegaConf.load(path)}).prune)
    assert s == HieraVid() and isinstance(s.boundaries, tuple)
