"""DyCoke: the official rules on small hand-made inputs (module docstring of prune/strategies/dycoke.py)."""

from __future__ import annotations

import pytest
import torch

from prune.api import DecodeInput, PreLLMOutput, VideoTokens
from prune.strategies.dycoke import DyCoke, ttm_plan


def test_ttm_plan_pairs_then_every_fourth():
    assert ttm_plan(8) == [None, 0, 0, 2, None, 4, None, 6]
    whole = [i for i, ref in enumerate(ttm_plan(32)) if ref is None]
    assert whole == [0, 4, 8, 12, 16, 20, 24, 28, 30]  # 9 whole frames of 32
    assert ttm_plan(5) == [None, 0, 0, 2, None]  # odd T: the unpaired last frame stays whole
    assert ttm_plan(1) == [None]


def test_ttm_keeps_the_least_similar_positions_in_similarity_order():
    base = torch.ones(2, 4, 3)
    base[1, 2] = torch.tensor([1.0, -1.0, 0.0])  # cosine 0 to frame 0
    base[1, 0] = torch.tensor([1.0, 1.0, -1.0])  # cosine 1/3
    pre = DyCoke(0.5).pre_llm(VideoTokens(base, (2, 2)))  # int(0.5 * 4) = 2 kept in frame 1
    assert pre.n == 6
    torch.testing.assert_close(pre.tokens[4:], base[1, [2, 0]])  # ascending similarity, not raster order
    assert pre.assignment.tolist() == [0, 1, 2, 3, 5, -1, 4, -1]


def test_frame_i_plus_2_is_cut_against_the_original_frame_i():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 4, generator=g)
    x[2] = x[0]
    x[2, 3] = -x[0, 3]  # only position 3 of frame 2 differs from frame 0
    pre = DyCoke(1 / 8).pre_llm(VideoTokens(x, (2, 4)))  # 1 token per pruned frame
    kept = (pre.assignment >= 0).view(6, 8)
    assert kept[2].nonzero()[:, 0].tolist() == [3]
    assert kept.sum(1).tolist() == [8, 1, 1, 1, 8, 1]
    assert pre.n == 8 + 8 + 4


def test_paper_setting_on_llava_ov_keeps_49_percent_before_the_llm():
    x = torch.randn(32, 196, 4)
    pre = DyCoke(0.3).pre_llm(VideoTokens(x, (14, 14)))
    assert pre.n == 9 * 196 + 23 * 58  # 3,098 of 6,272


def _step(scores, previous=None, step=1):
    visual = torch.arange(scores.numel())
    pre = PreLLMOutput(torch.zeros(scores.numel(), 2), torch.arange(scores.numel()))
    return DecodeInput(step, scores, visual, previous, pre)


def test_decode_prunes_at_the_first_step_and_when_attention_moved():
    s = DyCoke(0.5)
    assert s.decode_spec.layer == 2 and not s.decode_spec.evict  # scored at L-1 = 2, pruned from L = 3
    scores = torch.tensor([0.1, 0.4, 0.3, 0.05, 0.15, 0.0])
    assert s.in_decode(_step(scores)).tolist() == [1, 2, 4]  # top int(6 * 0.5) = 3, in index order
    assert s.in_decode(_step(scores, previous=scores * 1.01, step=2)) is None  # stable: whole cache this step
    moved = torch.tensor([0.4, 0.0, 0.0, 0.3, 0.0, 0.3])
    assert s.in_decode(_step(moved, previous=scores, step=2)).tolist() == [0, 3, 5]


def test_ratio_one_keeps_everything():
    x = torch.randn(4, 4, 3)
    pre = DyCoke(1.0).pre_llm(VideoTokens(x, (2, 2)))
    assert torch.equal(pre.tokens, x.reshape(16, 3))
    assert DyCoke(1.0).in_decode(_step(torch.rand(5))).tolist() == [0, 1, 2, 3, 4]


def test_bad_layer_is_named():
    with pytest.raises(ValueError, match="layer"):
        DyCoke(0.3, layer=0)
