"""VidCom2: the official rules on small hand-made inputs (module docstring of prune/strategies/vidcom2.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prune.api import VideoTokens
from prune.strategies.vidcom2 import VidCom2, frame_keep_counts, gaussian_similarity, low_variance_channels


def test_scoring_channels_are_the_lowest_variance_half_ties_to_the_lower_index():
    x = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, -5.0, -1.0, 0.0]])  # variances 0, 25, 1, 0
    assert low_variance_channels(x).tolist() == [0, 3]
    assert low_variance_channels(x, 0.75).tolist() == [0, 3, 2]


def test_gaussian_similarity_sums_five_scales():
    x, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    expected = sum(torch.exp(torch.tensor(-1.0 / (2 * a))) for a in (0.125, 0.25, 0.5, 1.0, 2.0))
    torch.testing.assert_close(gaussian_similarity(x, c), expected.reshape(1))
    assert float(gaussian_similarity(c, c)) == 5.0


def test_frame_budgets_favour_the_distinct_frame():
    # one frame far more distinct: softmax at temperature 0.01 is one-hot, rates ratio * (1 + onehot - 1/T)
    counts = frame_keep_counts(torch.tensor([0.0, 0.0, 0.0, 1.0]), 0.4, 100)
    assert counts.tolist() == [30, 30, 30, 70]
    # clamp at 1 and at least one token; rounding half to even (torch.round) as the official .round()
    assert frame_keep_counts(torch.tensor([0.0, 5.0]), 0.9, 10).tolist() == [4, 10]
    assert frame_keep_counts(torch.tensor([0.0, 0.0]), 0.25, 10).tolist() == [2, 2]  # 2.5 -> 2
    assert frame_keep_counts(torch.tensor([0.0, 0.0]), 0.01, 10).tolist() == [1, 1]


def _official_loop(tokens, ratio):
    """The official pipeline written frame by frame (vidcom2_compression on [T*P, D])."""
    t, p, d = tokens.shape
    flat = tokens.reshape(t * p, d)
    ch = torch.sort(flat.var(dim=0, unbiased=False), stable=True).indices[: d // 2]
    frames = F.normalize(flat[:, ch].view(t, p, -1), dim=-1)
    vc, fc = frames.mean(dim=(0, 1), keepdim=True), frames.mean(dim=1, keepdim=True)
    alphas = [2.0**k for k in range(-3, 2)]
    v = sum(torch.exp(-((frames - vc) ** 2).sum(-1) / (2 * a)) for a in alphas)
    f = sum(torch.exp(-((frames - fc) ** 2).sum(-1) / (2 * a)) for a in alphas)
    s = -v.mean(dim=-1)
    probs = torch.softmax((s - s.max()) / 0.01, dim=0)
    ks = (ratio * (1 + probs - probs.mean())).clamp(max=1.0).mul(p).round().long().clamp(min=1)
    kept = []
    for i, k in enumerate(ks.tolist()):
        idx = torch.sort(v[i] + f[i], stable=True).indices[:k]
        kept.append(idx.sort().values + i * p)
    return torch.cat(kept)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_pre_llm_equals_the_official_pipeline(ratio):
    tokens = torch.randn(6, 25, 16, generator=torch.Generator().manual_seed(0))
    pre = VidCom2(ratio).pre_llm(VideoTokens(tokens, (5, 5)))
    idx = _official_loop(tokens, ratio)
    torch.testing.assert_close(pre.tokens, tokens.reshape(-1, 16)[idx])
    assert pre.assignment[idx].tolist() == list(range(idx.numel())) and int((pre.assignment >= 0).sum()) == pre.n
    assert pre.positions == "contiguous" and pre.flops > 0


def test_outlier_tokens_and_frames_survive():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 16, 8, generator=g).expand(4, 16, 8).clone() * 0.01 + 1.0
    base[3] += torch.randn(16, 8, generator=g) * 3  # frame 3 unlike the rest
    base[0, 5] = -4.0  # token 5 of frame 0 unlike its frame and the video
    pre = VidCom2(0.25).pre_llm(VideoTokens(base, (4, 4)))
    kept = (pre.assignment >= 0).view(4, 16)
    assert kept[3].sum() > kept[1].sum() and bool(kept[0, 5])


def test_ratio_one_is_the_identity():
    tokens = torch.randn(3, 4, 8)
    pre = VidCom2(1.0).pre_llm(VideoTokens(tokens, (2, 2)))
    assert torch.equal(pre.tokens, tokens.reshape(12, 8)) and torch.equal(pre.assignment, torch.arange(12))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="temperature"):
        VidCom2(0.3, temperature=0)
    with pytest.raises(ValueError, match="channel_fraction"):
        VidCom2(0.3, channel_fraction=1.5)
