"""VisionZip (video port): the official rules on small hand-made inputs (module docstring of visionzip.py)."""

from __future__ import annotations

import pytest
import torch

from prune.api import VideoTokens
from prune.strategies.visionzip import VisionZip, contextual_merge


def test_contextual_targets_are_strided_and_tokens_join_the_most_similar_key():
    hidden = torch.arange(6, dtype=torch.float32).unsqueeze(1) * 10  # values 0, 10, ..., 50
    metric = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0], [0.2, 0.8], [1.0, 0.05]])
    merged, targets, into = contextual_merge(hidden, metric, contextual=2)
    assert targets.tolist() == [0, 3]  # step = 6 // 2 = 3
    assert into.tolist() == [0, 0, 1, 1, 1, 0]
    # target + mean(joined): not the mean of the group (the official sum)
    torch.testing.assert_close(merged, torch.tensor([[0.0 + (10 + 50) / 2], [30.0 + (20 + 40) / 2]]))


def test_a_target_nobody_joins_stays_itself_and_ties_go_to_the_first_target():
    hidden = torch.tensor([[1.0], [2.0], [3.0]])
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # token 1 has cosine 1 to target 0, 0 to 2
    merged, targets, into = contextual_merge(hidden, metric, contextual=2)
    assert targets.tolist() == [0, 1] and into.tolist() == [0, 1, 0]
    equal = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # token 2 equally close to both targets
    _, _, into = contextual_merge(hidden, equal, contextual=2)
    assert into.tolist() == [0, 1, 0]


def _video(attn, keys=None, t=1, p=9, d=4):
    tokens = torch.arange(t * p * d, dtype=torch.float32).view(t, p, d)
    keys = keys if keys is not None else torch.randn(t, p, 3, generator=torch.Generator().manual_seed(0))
    return VideoTokens(tokens, (3, 3), frame_patch_attn=attn, frame_patch_keys=keys), tokens


def test_dominant_by_attention_in_raster_order_then_contextual():
    attn = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0, 0.0, 0.7, 0.0, 0.0]])
    video, tokens = _video(attn)
    s = VisionZip(ratio=4 / 9)  # keep_count = 4 per frame: dominant int(4 * 54/64) = 3, contextual 1
    assert s.split(9) == (3, 1)
    pre = s.pre_llm(video)
    assert pre.n == 4
    torch.testing.assert_close(pre.tokens[:3], tokens[0, [1, 3, 6]])  # raster order, not attention order
    rest = [0, 2, 4, 5, 7, 8]  # one contextual target (the first), all others join it
    torch.testing.assert_close(pre.tokens[3], tokens[0, 0] + tokens[0, rest[1:]].mean(0))
    assert pre.assignment.tolist() == [3, 0, 3, 1, 3, 3, 2, 3, 3]


def test_frames_are_independent_and_ties_keep_the_lower_index():
    attn = torch.zeros(2, 9)
    attn[1, 8] = 1.0
    video, tokens = _video(attn, t=2)
    pre = VisionZip(ratio=2 / 9, dominant_ratio=0.5).pre_llm(video)  # 1 dominant + 1 contextual per frame
    assert pre.n == 4
    torch.testing.assert_close(pre.tokens[0], tokens[0, 0])  # all-zero attention: the first patch
    torch.testing.assert_close(pre.tokens[2], tokens[1, 8])


def test_ratio_one_keeps_raster_order_and_missing_inputs_are_named():
    video, tokens = _video(torch.rand(1, 9))
    pre = VisionZip(1.0).pre_llm(video)
    assert torch.equal(pre.tokens, tokens.view(9, 4)) and torch.equal(pre.assignment, torch.arange(9))
    with pytest.raises(ValueError, match="frame_patch_attn, frame_patch_keys"):
        VisionZip(0.3).pre_llm(VideoTokens(tokens, (3, 3)))
    with pytest.raises(ValueError, match="dominant_ratio"):
        VisionZip(0.3, dominant_ratio=1.5)
