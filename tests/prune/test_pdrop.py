"""PyramidDrop's schedule: lambda from the layer-averaged ratio, PDrop's integer counts, selection, bad input."""

from __future__ import annotations

import pytest
import torch

from prune.api import LayerInput, PreLLMOutput, Strategy, VideoTokens, simulate
from prune.strategies.pdrop import PyramidDrop, layer_average, solve_lambda


def _pre(n):
    return PreLLMOutput(torch.zeros(n, 2), torch.arange(n))


def test_published_setting_is_lambda_one_half():
    # README: layer_list [8, 16, 24], image_token_ratio_list [0.5, 0.25, 0.125] on 32 layers -> (8+4+2+1)/32
    assert layer_average((8, 16, 24), 0.5, 32) == pytest.approx(15 / 32)
    s = PyramidDrop(ratio=15 / 32, layers=(8, 16, 24), num_layers=32)
    assert s.stage_keep == pytest.approx(0.5, abs=1e-9)
    assert s.stage_counts(576) == (288, 144, 72)  # int(576 * [0.5, 0.25, 0.125])
    counts = s.layer_counts(_pre(576), 32)
    assert counts == (576,) * 8 + (288,) * 8 + (144,) * 8 + (72,) * 8


def test_counts_come_from_the_original_n_not_compounded():
    s = PyramidDrop(ratio=0.6, layers=(1, 2, 3), num_layers=4)
    lam = s.stage_keep
    assert s.stage_counts(101) == tuple(int(101 * lam**i) for i in (1, 2, 3))


def test_ratio_one_keeps_everything_and_a_ratio_below_the_first_stage_is_the_floor():
    assert solve_lambda(1.0, (7, 14, 21), 28) == 1.0
    assert PyramidDrop(ratio=1.0).stage_counts(6272) == (6272,) * 3
    # the first 7 of 28 layers see every token: below 0.25 the nearest schedule keeps one token per later stage
    low = PyramidDrop(ratio=0.2)
    assert low.stage_keep == 0.0 and low.stage_counts(6272) == (1, 1, 1)
    assert PyramidDrop(ratio=0.26).stage_keep > 0


def test_keeps_top_scores_with_earlier_token_on_ties():
    s = PyramidDrop(ratio=0.5, layers=(1, 2, 3), num_layers=4)
    n = 10
    k = s.stage_counts(n)[0]
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9, 0.5, 0.0, 0.3, 0.5, 0.4])
    keep = s.in_llm(LayerInput(1, scores, torch.arange(n), _pre(n)))
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))[:k]
    assert keep.tolist() == sorted(order)


def test_specs_are_own_layer_renumbered_last_token():
    s = PyramidDrop(ratio=0.5)
    assert isinstance(s, Strategy)
    assert [spec.layer for spec in s.layer_specs] == [7, 14, 21]
    assert all(spec.own_layer and spec.positions == "renumber" and spec.queries == "last" for spec in s.layer_specs)
    assert all(not spec.prune_past_kv and spec.first_layer == spec.layer for spec in s.layer_specs)


def test_simulate_matches_layer_counts():
    s = PyramidDrop(ratio=0.4)
    video = VideoTokens(torch.randn(4, 16, 8), (4, 4))
    pre, budget = simulate(s, video, 28, lambda spec, vis, pre: torch.rand(vis.numel()))
    assert budget.per_layer == s.layer_counts(pre, 28)
    # floor() per stage: under the target by less than one token per layer
    assert 0.4 - 1 / 64 < budget.layer_avg_ratio <= 0.4


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"layers": (0, 5)}, "strictly increasing"),
        ({"layers": (5, 5)}, "strictly increasing"),
        ({"layers": (5, 28)}, "strictly increasing"),
        ({"layers": ()}, "strictly increasing"),
        ({"num_layers": 1}, "num_layers"),
        ({"ratio": 0.0}, "ratio"),
    ],
)
def test_bad_settings_say_what_is_accepted(kw, match):
    with pytest.raises(ValueError, match=match):
        PyramidDrop(**kw)


def test_wrong_layer_or_llm_depth_is_an_error():
    s = PyramidDrop(ratio=0.5)
    with pytest.raises(ValueError, match="drops at layers"):
        s.in_llm(LayerInput(3, torch.rand(4), torch.arange(4), _pre(4)))
    with pytest.raises(ValueError, match="num_layers=28"):
        s.layer_counts(_pre(4), 32)
