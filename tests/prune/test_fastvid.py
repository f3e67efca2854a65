"""FastVID: the official rules on small hand-made inputs (module docstring of prune/strategies/fastvid.py)."""

from __future__ import annotations

import math

import pytest
import torch

from prune.api import VideoTokens
from prune.strategies.fastvid import FastVID, anchor_counts, density_scores, dyseg, merge_into_anchors
from prune.strategies.hieravid import segment_frames


def _descriptors(cosines):
    """Unit 2-D descriptors whose adjacent cosines are the given values."""
    angles = [0.0]
    for c in cosines:
        angles.append(angles[-1] + math.acos(c))
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_dyseg_cuts_below_tau_and_at_the_c_minus_1_lowest():
    g = _descriptors([0.99, 0.5, 0.98, 0.95, 0.97])
    assert dyseg(g, 1, 0.9).tolist() == [0, 0, 1, 1, 1, 1]  # only the threshold cut
    assert dyseg(g, 3, 0.9).tolist() == [0, 0, 1, 1, 2, 2]  # plus the lowest above it (0.95)
    assert dyseg(g, 3, 0.0).tolist() == [0, 0, 1, 1, 2, 2]  # forced cuts alone


def test_dyseg_on_clips_shorter_than_the_segment_count_makes_every_frame_a_segment():
    g = _descriptors([0.99, 0.99])
    assert dyseg(g, 8, 0.9).tolist() == [0, 1, 2]  # the official topk(c - 1) would fail here
    assert dyseg(g[:1], 8, 0.9).tolist() == [0]


def test_hieravid_segments_with_fastvids_dyseg_on_mean_tokens():
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(segment_frames(x, 3, 0.9), dyseg(x.mean(dim=1), 3, 0.9))


def test_anchor_counts_follow_the_official_distribution():
    assert anchor_counts([1], 10, 4) == [10]
    assert anchor_counts([5], 10, 4) == [25, 0, 0, 0, 25]  # ceil(5/4) = 2 anchor frames, 50 // 2 each
    assert anchor_counts([4, 2], 3, 4) == [0, 0, 0, 12, 0, 6]  # the last frame of a segment always anchors
    assert anchor_counts([3], 3, 1) == [3, 3, 3]  # p = 1: every frame its own anchor frame with C


def test_density_prefers_dense_tokens_far_from_denser_ones():
    # two clusters on a line: a tight one around 0 (5 points) and a loose one around 10 (5 points)
    pts = torch.tensor([0.0, 0.1, -0.1, 0.05, -0.05, 9.0, 10.0, 11.0, 8.5, 11.5]).view(1, 10, 1)
    scores = density_scores(pts, torch.Generator().manual_seed(0))[0]
    top = torch.sort(scores, descending=True).indices[:2].tolist()
    assert set(top) == {0, 6}  # each cluster's centre: the two density peaks


def test_merge_weight_is_bounded_below_by_beta():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.0], [2.0, 0.1], [4.0, 0.2], [0.0, 1.0]])
    merged, choice = merge_into_anchors(anchors, pool, beta=0.6)
    assert choice.tolist() == [0, 0, 0, 1]
    # anchor 0: 3 joined -> w = max(1/4, 0.6) = 0.6; anchor 1: 1 joined -> w = max(1/2, 0.6) = 0.6
    torch.testing.assert_close(merged[0], 0.6 * anchors[0] + 0.4 * pool[:3].mean(0))
    merged, _ = merge_into_anchors(anchors, pool, beta=0.0)
    torch.testing.assert_close(merged[1], 0.5 * anchors[1] + 0.5 * pool[3])


def _video(t=8, p=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(t, p, d, generator=g)
    frame_global = torch.randn(1, 6, generator=g).expand(t, 6).clone()
    frame_global[4:] += 5.0 * torch.randn(1, 6, generator=g)  # a scene change after frame 3
    attn = torch.rand(t, p, generator=g)
    return VideoTokens(tokens, (4, 4), frame_global=frame_global, frame_head_attn=attn)


def test_salient_tokens_are_kept_unchanged_at_their_original_positions():
    video = _video()
    s = FastVID(0.375, num_segments=2, tau=-1.0)  # segments [0..3], [4..7]
    salient, context = s.budget(16)
    assert (salient, context) == (4, 2)  # retain 6: 6 - int(2.4) salient, 2 context per frame
    pre = s.pre_llm(video)
    assert pre.positions == "original" and torch.equal(pre.origin, pre.origin.sort().values)
    for frame in range(8):
        top = torch.sort(video.frame_head_attn[frame], descending=True, stable=True).indices[:salient]
        for pos in top.tolist():
            out = int(pre.assignment[frame * 16 + pos])
            assert int(pre.origin[out]) == frame * 16 + pos
            torch.testing.assert_close(pre.tokens[out], video.tokens[frame, pos])
    # two 4-frame segments with p = 4: one anchor frame each (the last), 2 * 4 = 8 anchors there, none elsewhere
    per_frame = torch.bincount(pre.origin // 16, minlength=8)
    assert per_frame.tolist() == [4, 4, 4, 12, 4, 4, 4, 12] and pre.n == 8 * 6


def test_multi_frame_anchors_merge_tokens_of_the_whole_segment():
    video = _video()
    s = FastVID(0.5, num_segments=2, tau=-1.0, beta=0.0)  # 5 salient per frame
    pre = s.pre_llm(video)
    # every non-salient token of frames 0..3 is listed under frame 3's anchors (its p-frame group)
    frames_of = pre.origin[pre.assignment.view(8, 16)[:4]] // 16
    salient = torch.zeros(4, 16, dtype=torch.bool)
    for f in range(4):
        salient[f, torch.sort(video.frame_head_attn[f], descending=True, stable=True).indices[:5]] = True
    assert bool((frames_of[~salient] == 3).all())


def test_one_frame_segments_and_short_clips_run():
    video = _video(t=3)
    pre = FastVID(0.5).pre_llm(video)  # c = 8 > T = 3: three one-frame segments
    assert pre.n == 3 * 8 and bool((pre.assignment >= 0).all())
    one = VideoTokens(
        video.tokens[:1], (4, 4), frame_global=video.frame_global[:1], frame_head_attn=video.frame_head_attn[:1]
    )
    assert FastVID(0.25).pre_llm(one).n == 4


def test_anchor_counts_above_the_frame_are_capped():
    video = _video(t=4)
    pre = FastVID(0.9, num_segments=1, tau=-1.0).pre_llm(video)  # one 4-frame segment: 4 * C anchors > M
    salient, context = FastVID(0.9).budget(16)
    assert pre.n == 4 * salient + (16 - salient)  # every non-salient token of the anchor frame, no more


def test_ratio_one_identity_seeded_noise_and_missing_inputs():
    video = _video()
    pre = FastVID(1.0).pre_llm(video)
    assert torch.equal(pre.tokens, video.tokens.reshape(-1, 8))
    a, b = FastVID(0.3, seed=1).pre_llm(video), FastVID(0.3, seed=1).pre_llm(video)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="frame_global, frame_head_attn"):
        FastVID(0.3).pre_llm(VideoTokens(video.tokens, (4, 4)))
    with pytest.raises(ValueError, match="beta"):
        FastVID(0.3, beta=2.0)
