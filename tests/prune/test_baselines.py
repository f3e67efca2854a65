from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from prune.api import Strategy, VideoTokens, keep_count, simulate
from prune.strategies.fastv import FastV
from prune.strategies.none import NoPruning
from prune.strategies.pool import Pool, frame_counts, region_mask
from prune.strategies.random import RandomPruning

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "prune"


def video(t, h, w, d=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return VideoTokens(tokens=torch.randn(t, h * w, d, generator=g).to(dtype), grid=(h, w))


def no_scores(spec, visual, pre):
    raise AssertionError("pre-LLM-only strategies must not request in-LLM scores")


# ----------------------------------------------------------------------------------------------------- random


@pytest.mark.parametrize(("t", "p", "ratio"), [(1, 1, 0.5), (2, 5, 0.25), (4, 9, 0.3), (8, 196 // 4, 0.1), (3, 7, 1.0)])
def test_random_exact_budget_and_consistent_assignment(t, p, ratio):
    vid = video(t, 1, p)
    pre = RandomPruning(ratio=ratio, seed=7).pre_llm(vid)
    n = t * p
    k = keep_count(ratio, n)
    flat = vid.tokens.reshape(n, -1)
    kept = torch.nonzero(pre.assignment >= 0).squeeze(1)
    assert pre.n == k == kept.numel()
    assert pre.assignment[kept].tolist() == list(range(k))  # original order preserved
    assert torch.equal(pre.tokens, flat[kept])
    assert torch.equal(pre.sources(), kept)


def test_random_is_seeded_privately():
    vid = video(4, 4, 4)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = RandomPruning(ratio=0.25, seed=3).pre_llm(vid)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    torch.manual_seed(2)
    b = RandomPruning(ratio=0.25, seed=3).pre_llm(vid)
    c = RandomPruning(ratio=0.25, seed=4).pre_llm(vid)
    assert torch.equal(a.assignment, b.assignment)
    assert not torch.equal(a.assignment, c.assignment)


def test_random_is_uniform_over_positions():
    # Over 400 seeds every position of a 20-token video is kept about half the time.
    hits = torch.zeros(20)
    vid = video(1, 4, 5)
    for seed in range(400):
        hits += (RandomPruning(ratio=0.5, seed=seed).pre_llm(vid).assignment >= 0).float()
    assert hits.sum() == 400 * 10
    assert 0.4 < hits.min() / 400 and hits.max() / 400 < 0.6


def test_random_preserves_dtype_and_input():
    vid = video(2, 3, 3, dtype=torch.bfloat16)
    before = vid.tokens.clone()
    pre, budget = simulate(RandomPruning(ratio=0.5), vid, num_layers=3, score_fn=no_scores)
    assert pre.tokens.dtype == torch.bfloat16 and pre.assignment.dtype == torch.long
    assert torch.equal(vid.tokens, before)
    assert budget.per_layer == (9, 9, 9) and budget.pre_llm == 9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"ratio": 0.0}, r"\(0, 1\]")],
)
def test_random_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomPruning(**kwargs)


# ------------------------------------------------------------------------------------------------------- pool


@pytest.mark.parametrize("t", [1, 3, 5])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (4, 4), (3, 7), (14, 14)])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.3, 0.5, 0.77, 1.0])
def test_pool_exact_budget(t, h, w, ratio):
    vid = video(t, h, w)
    pre = Pool(ratio=ratio).pre_llm(vid)
    assert pre.n == keep_count(ratio, t * h * w)
    covered = pre.assignment[pre.assignment >= 0]
    assert torch.equal(torch.unique(covered), torch.arange(pre.n))  # every output token has an input
    assert torch.all(pre.sources()[1:] > pre.sources()[:-1])  # time-then-raster order


@pytest.mark.parametrize(("h", "w"), [(4, 4), (4, 6), (2, 8), (6, 2)])
def test_pool_equals_avg_pool2d_at_quarter_budget(h, w):
    t, d = 3, 5
    vid = video(t, h, w, d)
    pre = Pool(ratio=0.25).pre_llm(vid)  # exactly (H/2)(W/2) tokens per frame
    grid = vid.tokens.reshape(t, h, w, d).permute(0, 3, 1, 2)
    want = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(-1, d)
    torch.testing.assert_close(pre.tokens, want)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = (rows // 2) * (w // 2) + cols // 2  # [H, W] output token of each cell in one frame
    frame_offset = torch.arange(t)[:, None] * (h * w // 4)
    assert torch.equal(pre.assignment, (frame_offset + block.reshape(1, -1)).reshape(-1))


def test_pool_overlapping_regions_match_adaptive_avg_pool2d():
    # 4 tokens on a 3x4 grid: 2 bands x 2 bins, rows [0, 2) and [1, 3) overlap like adaptive_avg_pool2d's.
    vid = video(2, 3, 4, d=2)
    pre = Pool(ratio=4 / 12).pre_llm(vid)
    grid = vid.tokens.reshape(2, 3, 4, 2).permute(0, 3, 1, 2)
    want = F.adaptive_avg_pool2d(grid, (2, 2)).permute(0, 2, 3, 1).reshape(-1, 2)
    torch.testing.assert_close(pre.tokens, want)
    # Row 1 belongs to both bands; the first (upper) region wins.
    assert pre.assignment[:12].reshape(3, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]]


def test_pool_region_layout():
    # 5 tokens on 3x4: round(sqrt(5 * 3 / 4)) = 2 bands, the first gets 3 column bins and the second 2.
    mask = region_mask(5, (3, 4)).reshape(5, 3, 4).int()
    assert mask[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]  # cols [0, 2)
    assert mask[1].tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]  # cols [1, 3)
    assert mask[4].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    # Every cell is covered for every count; a very wide grid still never needs more than W bins per band.
    for count in range(1, 13):
        assert bool(region_mask(count, (3, 4)).any(0).all())
    assert region_mask(7, (1, 7)).sum(1).tolist() == [1] * 7
    assert frame_counts(7, 3) == [3, 2, 2]


def test_pool_identity_at_ratio_one():
    vid = video(3, 2, 5, dtype=torch.bfloat16)
    pre = Pool(ratio=1.0).pre_llm(vid)
    assert torch.equal(pre.tokens, vid.tokens.reshape(30, 3)) and pre.tokens.dtype == torch.bfloat16
    assert pre.assignment.tolist() == list(range(30))


def test_pool_identity_also_when_a_frame_keeps_all_its_tokens_in_the_matmul_path():
    # temporal=2 on a single frame: one run of length 1, c = P, so the weights are the identity matrix.
    vid = video(1, 3, 3)
    assert torch.equal(Pool(ratio=1.0, temporal=2).pre_llm(vid).tokens, vid.tokens.reshape(9, 3))


def test_pool_temporal_average_with_short_last_run():
    # 3 frames, temporal=2: frames (0, 1) are averaged, frame 2 stands alone; 2/3 keeps P tokens per pooled frame.
    vid = video(3, 2, 2, d=4)
    pre = Pool(ratio=2 / 3, temporal=2).pre_llm(vid)
    x = vid.tokens
    torch.testing.assert_close(pre.tokens, torch.cat([(x[0] + x[1]) / 2, x[2]]))
    assert pre.assignment.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]


def test_pool_temporal_and_spatial_equal_avg_pool3d():
    t, h, w, d = 4, 4, 6, 3
    vid = video(t, h, w, d)
    pre = Pool(ratio=1 / 8, temporal=2).pre_llm(vid)
    grid = vid.tokens.reshape(t, h, w, d).permute(3, 0, 1, 2)  # [D, T, H, W]
    want = F.avg_pool3d(grid, 2).permute(1, 2, 3, 0).reshape(-1, d)
    torch.testing.assert_close(pre.tokens, want)


def test_pool_uneven_and_tiny_budgets():
    vid = video(3, 4, 4)
    pre = Pool(ratio=0.1).pre_llm(vid)  # keep_count = 5 -> frames get 2, 2, 1
    a = pre.assignment.reshape(3, 16)
    assert pre.n == 5
    assert [sorted(set(row.tolist())) for row in a] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(pre.tokens[4], vid.tokens[2].mean(0))
    tiny = Pool(ratio=0.03).pre_llm(vid)  # keep_count = 1: only frame 0 gets a token
    assert tiny.n == 1 and set(tiny.assignment.tolist()) == {0, -1}
    assert (tiny.assignment.reshape(3, 16)[1:] == -1).all()


def test_pool_preserves_dtype_and_input():
    vid = video(2, 4, 4, dtype=torch.float16)
    before = vid.tokens.clone()
    pre, budget = simulate(Pool(ratio=0.25), vid, num_layers=2, score_fn=no_scores)
    assert pre.tokens.dtype == torch.float16 and torch.equal(vid.tokens, before)
    assert budget.per_layer == (8, 8) and budget.pre_llm_ratio == 0.25


def test_pool_temporal_over_budget_raises():
    with pytest.raises(ValueError, match="lower temporal"):
        Pool(ratio=0.5, temporal=4).pre_llm(video(4, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temporal": 0}, ">= 1"), ({"temporal": True}, ">= 1"), ({"temporal": 1.5}, ">= 1"), ({"ratio": 2}, r"\(0, 1\]")],
)
def test_pool_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pool(**kwargs)


# ---------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("name", "cls"), [("none", NoPruning), ("fastv", FastV), ("random", RandomPruning), ("pool", Pool)]
)
def test_config_instantiates_with_every_default(name, cls):
    node = OmegaConf.load(CONFIGS / f"{name}.yaml")
    root = OmegaConf.create({"ratio": 0.25, "prune": node})
    strategy = hydra.utils.instantiate(root.prune)
    assert type(strategy) is cls and isinstance(strategy, Strategy)
    assert strategy.ratio == 0.25 and strategy.name == name
    # Every hyperparameter is spelled out in the YAML, with the dataclass default.
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("name", "ratio")}
    yaml_keys = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("_target_", "ratio")}
    assert yaml_keys == fields
