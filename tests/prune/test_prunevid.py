"""PruneVid against the official code's behaviour (shared/reference/prunevid.md §2, §3 and the golden cases of §8)."""

from __future__ import annotations

import math

import pytest
import torch

from prune.api import LayerInput, VideoTokens, simulate
from prune.strategies.prunevid import (
    PruneVid,
    cluster_dpc_knn,
    merge_tokens,
    refine_clusters,
    segment_frames,
    select_tokens,
    token_scores,
)


def _runs(labels):
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append(i - start)
            start = i
    return out


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


UNCHANGED = [3, 3, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]

# --- §8.2: refine_clusters worked examples ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "refined", "segments"),
    [
        ([0, 0, 1, 0, 0, 0, 2, 2], [0, 0, 0, 0, 0, 0, 2, 2], [6, 2]),
        ([0, 1, 2, 3] + [0] * 12, [0] * 16, [16]),
        ([0, 1, 0, 1, 0, 1, 0, 1], [0] * 8, [8]),
        ([0, 0, 1, 1, 0, 0, 2, 2, 2, 3, 3, 3, 3, 1, 2, 2], None, [2, 2, 2, 3, 7]),
        (
            [3, 3, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3],
            [3, 3, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3],
            [2, 4, 4, 4, 2],
        ),
    ],
)
def test_refine_clusters_worked_examples(labels, refined, segments):
    out = refine_clusters(labels)
    if refined is not None:
        assert out == refined
    assert _runs(out) == segments


def test_refine_reassignment_sees_earlier_reassignments():
    # [5] and [6] are singletons: the first run of -1 joins the left run of 0s (2 > 0 on the right? right is 1s, len 3),
    # so it takes label 1 (longer); the -1 at the end has only a left neighbour.
    assert refine_clusters([0, 0, 5, 1, 1, 1, 6]) == [0, 0, 1, 1, 1, 1, 1]
    # Equal neighbours: ties go left.
    assert refine_clusters([0, 0, 7, 1, 1]) == [0, 0, 0, 1, 1]
    # Nothing survives step 1: every label a singleton -> label 0 everywhere.
    assert refine_clusters([3, 1, 2]) == [0, 0, 0]


def test_refine_invariants_on_random_labels():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        t = int(torch.randint(2, 40, (1,), generator=g))
        labels = torch.randint(0, 5, (t,), generator=g).tolist()
        segs = _runs(refine_clusters(labels))
        assert sum(segs) == t
        assert min(segs) >= 2


# --- DPC-KNN against a naive transcription of the spec (§2.1) -------------------------------------------------


def _dpc_naive(x, m, k):
    n, c = x.shape
    d = [[float(torch.dist(x[i], x[j])) / math.sqrt(c) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v**2 for v in sorted(row)[:k]) / k) for row in d]
    dmax = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(n) if rho[j] > rho[i]], default=dmax) for i in range(n)]
    score = [delta[i] * rho[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:m]
    labels = [min(range(m), key=lambda c_: d[centres[c_]][i]) for i in range(n)]
    for cid, i in enumerate(centres):
        labels[i] = cid
    return labels


def test_dpc_knn_matches_naive_spec_batched():
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(2))
    labels = cluster_dpc_knn(x, 5, k=7, exact=True)
    for b in range(3):
        assert labels[b].tolist() == _dpc_naive(x[b], 5, 7)
    assert all(len(set(row.tolist())) == 5 for row in labels)  # no empty cluster


# --- §8.1: identical frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [16, 32])
def test_identical_frames_collapse_to_one_static_segment(t):
    frame = _unit(144, 256, seed=3)
    frames = frame.expand(t, 144, 256).contiguous()
    assert segment_frames(frames) == [t]
    merged = merge_tokens(frames)
    assert merged.static_sizes == [72] and merged.dynamic_sizes == [0] and merged.window_sizes == [t]
    assert merged.tokens.shape == (72, 256)
    strategy = PruneVid()
    pre, budget = simulate(strategy, VideoTokens(frames, (12, 12)), 32, lambda spec, vis, pre: torch.rand(vis.numel()))
    assert budget.pre_llm == 72 and budget.per_layer[-1] == 28  # floor(0.4 * 72)
    assert budget.per_layer[:11] == (72,) * 11 and budget.per_layer[11:] == (28,) * 21


# --- §8.3: the static test is strict and per location -----------------------------------------------------------


def _two_frame_video(cosines, p=144, c=64):
    """Two frames whose token at location i has cosine ``cosines[i]`` across frames; other locations are orthogonal."""
    a = torch.zeros(2, p, c)
    for i in range(p):
        a[0, i, i % c] = 1.0
        a[1, i, (i + 1) % c] = 1.0  # orthogonal by default: dynamic
    for i, cos in enumerate(cosines):
        a[1, i] = 0
        a[1, i, i % c] = cos
        a[1, i, (i + 1) % c] = math.sqrt(1 - cos**2)
    return a


def test_static_threshold_is_strict():
    frames = _two_frame_video([0.8, 0.81])
    merged = merge_tokens(frames, tau=0.8)
    assert merged.window_sizes == [2]
    assert merged.static_sizes == [1]  # only the 0.81 location
    a = merged.assignment.view(2, 144)
    assert a[0, 1] == a[1, 1]  # static: both frames merged into one token
    assert a[0, 0] != a[1, 0]  # cosine exactly 0.8: dynamic
    # The mask is shared by the frames: each frame has the same number of dynamic tokens (143 -> 71 clusters).
    assert merged.dynamic_sizes == [2 * 71]


def test_static_threshold_strict_at_an_exact_float_tie():
    # (1, 0) against (0.6, 0.8): the segment similarity is exactly float32(0.6), so tau=0.6 is a true tie.
    frames = _two_frame_video([0.6])
    a = merge_tokens(frames, tau=0.6).assignment.view(2, 144)
    assert a[0, 0] != a[1, 0]  # sim == tau: dynamic
    b = merge_tokens(frames, tau=0.5999).assignment.view(2, 144)
    assert b[0, 0] == b[1, 0]  # sim > tau: static


# --- §8.4: spatial-merge arithmetic ----------------------------------------------------------------------------


def _static_region_video(t, n_static, p=144, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(t, p, c, generator=g)
    frames[:, :n_static] = torch.randn(n_static, c, generator=g)  # same tokens in every frame
    return frames


@pytest.mark.parametrize(("n_static", "expected"), [(14, 14), (15, 7), (100, 50)])
def test_merge_skip_at_most_14(n_static, expected):
    merged = merge_tokens(_static_region_video(2, n_static))
    assert merged.static_sizes == [expected]


def test_mixed_example_counts():
    frames = _static_region_video(4, 100)
    merged = merge_tokens(frames)
    assert merged.window_sizes == [4]
    assert merged.static_sizes == [50] and merged.dynamic_sizes == [4 * 22]
    assert merged.tokens.shape[0] == 138
    keep = select_tokens(torch.rand(138), merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, 0.4)
    assert keep.numel() == 20 + 4 * 8  # 52


def test_fully_dynamic_video_counts():
    frames = torch.randn(16, 144, 64, generator=torch.Generator().manual_seed(4))
    merged = merge_tokens(frames, tau=1.5)
    assert sum(merged.static_sizes) == 0
    assert merged.tokens.shape[0] == 16 * 72
    keep = select_tokens(torch.rand(1152), merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, 0.4)
    assert keep.numel() == 16 * 28  # 448


def test_merged_tokens_are_means_of_their_members_and_order_is_official():
    frames = _static_region_video(8, 60, seed=5)
    merged = merge_tokens(frames, temporal_segment_ratio=0.25)
    flat = frames.reshape(-1, frames.shape[-1])
    n = merged.tokens.shape[0]
    assert merged.assignment.min() >= 0 and merged.assignment.max() == n - 1
    sums = torch.zeros(n, flat.shape[1]).index_add_(0, merged.assignment, flat)
    counts = torch.bincount(merged.assignment, minlength=n)
    torch.testing.assert_close(merged.tokens, sums / counts[:, None], rtol=1e-5, atol=1e-5)
    # Layout per segment: [static | frame 1 dynamic | ... | frame W dynamic].
    offset, t0 = 0, 0
    a = merged.assignment.view(8, 144)
    for s, dyn, w in zip(merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, strict=True):
        d = dyn // w
        seg = a[t0 : t0 + w]
        static_loc = (seg == seg[0]).all(dim=0)
        assert ((seg[:, static_loc] >= offset) & (seg[:, static_loc] < offset + s)).all()
        for i in range(w):
            dyn_ids = seg[i, ~static_loc]
            lo = offset + s + i * d
            assert ((dyn_ids >= lo) & (dyn_ids < lo + d)).all()
        offset += s + dyn
        t0 += w


def test_seeded_and_deterministic():
    frames = torch.randn(16, 144, 32, generator=torch.Generator().manual_seed(6))
    a = merge_tokens(frames, generator=torch.Generator().manual_seed(1))
    b = merge_tokens(frames, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and a.static_sizes == b.static_sizes
    default_rng = torch.get_rng_state()
    PruneVid(seed=3).pre_llm(VideoTokens(frames, (12, 12)))
    assert torch.equal(default_rng, torch.get_rng_state())  # never touches the global RNG


@pytest.mark.parametrize("t", [1, 2, 3, 6])
def test_short_videos(t):
    frames = torch.randn(t, 16, 8, generator=torch.Generator().manual_seed(t))
    segs = segment_frames(frames)
    assert sum(segs) == t
    merged = merge_tokens(frames)
    if t == 1:
        assert segs == [1] and merged.static_sizes == [0]  # a single frame has no temporal redundancy
    assert merged.tokens.shape[0] == sum(merged.static_sizes) + sum(merged.dynamic_sizes)


def test_dtype_and_device_preserved_and_input_untouched():
    frames = torch.randn(8, 36, 16, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    before = frames.clone()
    merged = merge_tokens(frames)
    assert merged.tokens.dtype == torch.bfloat16
    assert torch.equal(frames, before)


# --- §3 / §8.6: stage-2 scores ---------------------------------------------------------------------------------


def _scores_naive(q, k, vs, ve):
    h = q.shape[0]
    k = k.repeat_interleave(h // k.shape[0], dim=0)
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # full S x S, non-causal
    return a[:, ve:, vs:ve].amax(dim=(0, 1))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_token_scores_match_full_matrix(kv_heads):
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(4, 30, 16, generator=g), torch.randn(kv_heads, 30, 16, generator=g)
    torch.testing.assert_close(token_scores(q, k, 5, 22), _scores_naive(q, k, 5, 22))


def test_token_scores_max_max_beats_mean():
    # Visual tokens 1..4 (positions), queries at 5, 6. Token A (pos 1) gets one huge weight from one head and one
    # query; token B (pos 2) gets a moderate weight everywhere. Max-max keeps A; a head/query mean would prefer B.
    d = 4
    q = torch.zeros(2, 7, d)
    k = torch.zeros(2, 7, d)
    k[:, 1, 0] = 1.0
    k[:, 2, 1] = 1.0
    q[0, 5, 0] = 12.0  # head 0, query 5 -> A
    q[:, :, 1] = 3.0  # everybody -> B, moderately
    q[0, 5, 1] = 0.0
    s = token_scores(q, k, 1, 5)
    assert int(s.argmax()) == 0
    a = torch.softmax(q @ k.transpose(1, 2) / 2, dim=-1)[:, 5:, 1:5].mean(dim=(0, 1))
    assert int(a.argmax()) == 1


def test_token_scores_use_the_full_row_not_the_causal_one():
    # The official score map has no causal mask: row i's softmax also spans keys after i. A causal softmax of the
    # same rows gives different scores, and the function must agree with the non-causal one only.
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 9, 4, generator=g) * 3, torch.randn(2, 9, 4, generator=g) * 3
    logits = q @ k.transpose(1, 2) / 2
    causal = logits.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    causal_scores = causal[:, 5:, 0:5].amax(dim=(0, 1))
    got = token_scores(q, k, 0, 5)
    torch.testing.assert_close(got, logits.softmax(-1)[:, 5:, 0:5].amax(dim=(0, 1)))
    assert not torch.allclose(got, causal_scores, atol=1e-4)


def test_select_tokens_per_group_topk_sorted():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.5, 0.05, 0.95])
    # one segment: static group of 4 (idx 0..3), 2 frames of 3 dynamic tokens (4..6, 7..9)
    keep = select_tokens(scores, [4], [6], [2], alpha=0.5)
    # static: int(4*0.5)=2 -> 0, 2 ; frame 1: int(3*0.5)=1 -> 6 ; frame 2 -> 9
    assert keep.tolist() == [0, 2, 6, 9]
    # ties go to the lower index
    assert select_tokens(torch.ones(6), [2], [4], [2], alpha=0.5).tolist() == [0, 2, 4]


def test_in_llm_stage_matches_select_tokens():
    frames = _static_region_video(8, 40, seed=10)
    strategy = PruneVid(ratio=0.4)
    pre = strategy.pre_llm(VideoTokens(frames, (12, 12)))
    merged = merge_tokens(frames, generator=torch.Generator().manual_seed(0))
    scores = torch.rand(pre.n, generator=torch.Generator().manual_seed(11))
    keep = strategy.in_llm(LayerInput(10, scores, torch.arange(pre.n), pre))
    expected = select_tokens(scores, merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, 0.4)
    assert torch.equal(keep, expected)
    assert strategy.layer_counts(pre, 32)[-1] == keep.numel()
    spec = strategy.layer_specs[0]
    assert (spec.layer, spec.queries, spec.rope, spec.causal, spec.prune_past_kv) == (
        10,
        "after_visual",
        False,
        False,
        True,
    )


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [torch.zeros(0, 4, 4), torch.zeros(4, 4), torch.zeros(2, 3, 4, 5), torch.full((2, 4, 4), float("nan"))],
)
def test_bad_frames_raise(frames):
    with pytest.raises(ValueError, match=r"\[T, P, D\]|empty|NaN"):
        merge_tokens(frames)


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": 0.0}, {"ratio": 1.5}, {"ratio": float("nan")}, {"cluster_ratio": 0}, {"k": 0}, {"layer": -1}],
)
def test_bad_params_raise(kwargs):
    with pytest.raises(ValueError, match=r"\(0, 1\]|>= ?[01]"):
        PruneVid(**kwargs)


def test_bad_score_spans_raise():
    q = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="after the video"):
        token_scores(q, q, 2, 10)
    with pytest.raises(ValueError, match="multiple"):
        token_scores(torch.randn(3, 10, 4), torch.randn(2, 10, 4), 0, 5)
    with pytest.raises(ValueError, match="multiple of its window"):
        select_tokens(torch.rand(7), [1], [5], [2])
