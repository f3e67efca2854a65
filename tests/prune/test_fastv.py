from __future__ import annotations

import pytest
import torch

from prune.api import LayerInput, LayerSpec, Strategy, VideoTokens, simulate
from prune.attention import visual_scores
from prune.strategies.fastv import FastV, fastv_scores, top_k_indices

PREFIX, SUFFIX = 2, 3  # system-prompt tokens before the video, question tokens after it


def video(t=3, p=4, d=2, dtype=torch.float32):
    tokens = torch.arange(t * p * d, dtype=torch.float32).reshape(t, p, d).to(dtype)
    return VideoTokens(tokens=tokens, grid=(2, p // 2))


def step(scores):
    n = scores.numel()
    pre = FastV().pre_llm(VideoTokens(torch.zeros(1, n, 1), (1, n)))
    return LayerInput(layer=1, scores=scores, visual=torch.arange(n), pre=pre)


def test_is_a_strategy_with_fastv_spec():
    s = FastV(ratio=0.3, layer=3, queries="all", prune_kv=True)
    assert isinstance(s, Strategy) and s.name == "fastv"
    assert s.layer_specs == (
        LayerSpec(layer=2, queries="all", head_reduce="mean", query_reduce="mean", rope=True, causal=True,
                  prune_past_kv=True),
    )  # fmt: skip
    assert FastV().layer_specs[0].layer == 1 and FastV().layer_specs[0].queries == "last"


def test_keeps_highest_last_row_attention_globally_across_frames():
    # 3 frames x 4 tokens. Head-mean of the last row puts all of frame 1 plus token 10 on top, so a per-frame quota
    # would give a different answer; FastV ranks globally.
    seq = PREFIX + 12 + SUFFIX
    attn = torch.zeros(2, seq, seq)
    head0 = torch.tensor([0.01, 0.02, 0.00, 0.01, 0.30, 0.20, 0.25, 0.10, 0.00, 0.01, 0.05, 0.00])
    head1 = torch.tensor([0.03, 0.00, 0.02, 0.01, 0.10, 0.20, 0.05, 0.30, 0.01, 0.00, 0.15, 0.02])
    attn[0, -1, PREFIX : PREFIX + 12] = head0
    attn[1, -1, PREFIX : PREFIX + 12] = head1
    attn[:, :-1, PREFIX : PREFIX + 12] = torch.rand(2, seq - 1, 12)  # other rows must not matter for "last"
    scores = fastv_scores(attn[:, -1:], PREFIX, PREFIX + 12)
    torch.testing.assert_close(scores, (head0 + head1) / 2)
    kept = FastV(ratio=5 / 12).in_llm(step(scores))
    assert kept.tolist() == [4, 5, 6, 7, 10]
    assert kept.dtype == torch.long


def test_all_and_last_disagree_on_constructed_case():
    # The last row prefers visual token 0; every other row strongly prefers token 3: "last" keeps 0, "all" keeps 3.
    seq = PREFIX + 4 + SUFFIX
    attn = torch.zeros(1, seq, seq)
    attn[0, :, PREFIX + 3] = 0.5
    attn[0, -1, PREFIX : PREFIX + 4] = torch.tensor([0.4, 0.1, 0.1, 0.2])
    last = FastV(ratio=0.25, queries="last").in_llm(step(fastv_scores(attn[:, -1:], PREFIX, PREFIX + 4)))
    every = FastV(ratio=0.25, queries="all").in_llm(step(fastv_scores(attn, PREFIX, PREFIX + 4)))
    assert last.tolist() == [0]
    assert every.tolist() == [3]


def test_simulate_with_reference_scorer_end_to_end():
    # Keys of the visual tokens point along the last query with strengths v; the last row's attention is monotone
    # in v, so FastV must keep the tokens with the largest v. Other rows get random queries.
    vid = video(t=3, p=4)
    v = torch.tensor([0.0, 3.0, 1.0, 0.5, 2.5, 0.1, 0.2, 2.0, 0.3, 2.8, 0.4, 0.6])
    dim = 4
    n_seq = PREFIX + 12 + SUFFIX
    q = torch.randn(2, n_seq, dim, generator=torch.Generator().manual_seed(0))
    k = torch.zeros(1, n_seq, dim)
    q[:, -1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    k[0, PREFIX : PREFIX + 12, 0] = v

    def score_fn(spec, visual, pre):
        assert spec.layer == 1 and visual.tolist() == list(range(12))
        return visual_scores(q, k, PREFIX, PREFIX + 12, spec)

    strategy = FastV(ratio=0.25, layer=2)
    pre, budget = simulate(strategy, vid, num_layers=5, score_fn=score_fn)
    assert budget.kept[0].tolist() == [1, 4, 9]  # v = 3.0, 2.5, 2.8
    assert budget.per_layer == (12, 12, 3, 3, 3) == strategy.layer_counts(pre, 5)
    assert budget.layer_avg_ratio == pytest.approx((12 + 12 + 3 * 3) / (5 * 12))


def test_ratio_one_keeps_everything():
    scores = torch.rand(10, generator=torch.Generator().manual_seed(3))
    assert FastV(ratio=1.0).in_llm(step(scores)).tolist() == list(range(10))


def test_ties_keep_earlier_tokens():
    assert FastV(ratio=0.4).in_llm(step(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]))).tolist() == [1, 2]
    assert top_k_indices(torch.zeros(6), 3).tolist() == [0, 1, 2]
    assert top_k_indices(torch.tensor([0.0, 5.0, 5.0, 5.0]), 1).tolist() == [1]


def test_keep_count_rounds_half_up():
    # 0.5 * 5 = 2.5 -> 3 kept (keep_count), not 2 (Python's banker's rounding).
    assert FastV(ratio=0.5).in_llm(step(torch.arange(5.0))).tolist() == [2, 3, 4]


def test_bf16_scores_and_device_preserved():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.2], dtype=torch.bfloat16)
    kept = FastV(ratio=0.5).in_llm(step(scores))
    assert kept.tolist() == [1, 2] and kept.dtype == torch.long and kept.device == scores.device


def test_pre_llm_is_identity_and_does_not_copy():
    vid = video(dtype=torch.bfloat16)
    before = vid.tokens.clone()
    pre = FastV().pre_llm(vid)
    assert torch.equal(pre.tokens, before.reshape(12, 2)) and pre.tokens.dtype == torch.bfloat16
    assert pre.tokens.data_ptr() == vid.tokens.data_ptr()
    assert pre.assignment.tolist() == list(range(12))
    assert torch.equal(vid.tokens, before)


def test_layer_counts():
    pre = FastV().pre_llm(video())
    assert FastV(ratio=0.5, layer=2).layer_counts(pre, 4) == (12, 12, 6, 6)
    assert FastV(ratio=0.2, layer=1).layer_counts(pre, 3) == (12, 2, 2)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        FastV(layer=4).layer_counts(pre, 4)


def test_fastv_scores_mean_over_heads_and_rows():
    attn = torch.tensor([[[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]], [[0.3, 0.6, 0.1], [0.9, 0.0, 0.1]]])  # [2, 2, 3]
    torch.testing.assert_close(fastv_scores(attn, 1, 3), torch.tensor([0.325, 0.225]))
    with pytest.raises(ValueError, match="visual span"):
        fastv_scores(attn, 2, 4)
    with pytest.raises(ValueError, match=r"\[H, q, S\]"):
        fastv_scores(attn[0], 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, r"\(0, 1\]"),
        ({"ratio": 1.5}, r"\(0, 1\]"),
        ({"ratio": float("nan")}, r"\(0, 1\]"),
        ({"layer": 0}, ">= 1"),
        ({"layer": True}, ">= 1"),
        ({"queries": "after_visual"}, "'last', 'all'"),
        ({"prune_kv": 1}, "bool"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastV(**kwargs)


def test_rejects_bad_scores():
    with pytest.raises(ValueError, match="NaN"):
        FastV().in_llm(step(torch.tensor([0.1, float("nan")])))
