"""FrameFusion's rules on hand-made inputs: cost arithmetic, same-position similarity, run merging, the stage order."""

from __future__ import annotations

import pytest
import torch

from prune.api import LayerInput, LayerMerge, PreLLMOutput, Strategy
from prune.strategies.framefusion import FrameFusion, merge_runs, patch_similarity, pruning_ratio


def test_pruning_ratio_is_the_official_cost_arithmetic():
    # no history: every remaining layer keeps `cost` of the tokens
    assert pruning_ratio([], 0.3, 28) == pytest.approx(0.7)
    # history [0.2, 0.05]: total = 0.8 + 0.76 = 1.56, s = 0.76, remaining = 8.4 - 1.56 -> p = 1 - 6.84 / (26 * 0.76)
    assert pruning_ratio([0.2, 0.05], 0.3, 28) == pytest.approx(1 - 6.84 / (26 * 0.76))
    assert pruning_ratio([], 1.0, 28) == 0.0  # cost 1: nothing to prune
    assert pruning_ratio([0.0] * 3, 0.1, 4) == 1.0  # the official code raises "The cost is too small"


def _frames():
    """3 frames x 2 patches, D = 2. Patch 0 stays (frames 0, 1, 2 alike); patch 1 turns at frame 1, then stays."""
    h = torch.tensor(
        [
            [1.0, 0.0], [0.0, 1.0],  # frame 0
            [1.0, 0.1], [1.0, 0.0],  # frame 1: patch 0 ~ frame 0, patch 1 changed
            [1.0, 0.2], [1.0, 0.05],  # frame 2: both ~ frame 1
        ]
    )  # fmt: skip
    return h, torch.tensor([0, 1, 0, 1, 0, 1])


def test_similarity_is_to_the_previous_token_of_the_same_patch():
    h, patch = _frames()
    order, sim = patch_similarity(h, patch)
    assert order.tolist() == [0, 2, 4, 1, 3, 5]
    assert sim[0] == -2 and sim[3] == -2  # first of each patch
    assert sim[1] == pytest.approx(torch.nn.functional.cosine_similarity(h[2], h[0], dim=0))
    assert sim[4] < 0.1 and sim[5] > 0.99  # patch 1: frame 1 differs from frame 0, frame 2 matches frame 1


def test_runs_merge_into_the_token_before_them_as_plain_means():
    h, patch = _frames()
    order, sim = patch_similarity(h, patch)
    merge = merge_runs(order, sim >= 0.6, 6)
    # patch 0: tokens 2 and 4 join token 0; patch 1: token 5 joins token 3; token 1 stays alone
    assert merge.keep.tolist() == [0, 1, 3]
    assert merge.into.tolist() == [0, 1, 0, 2, 0, 2]
    assert merge.weights.tolist() == pytest.approx([1 / 3, 1, 1 / 3, 1 / 2, 1 / 3, 1 / 2])


def _step(layer, n, scores=None, hidden=None, state=None, groups=(2, 2, 2)):
    pre = PreLLMOutput(torch.zeros(sum(groups), 2), torch.arange(sum(groups)), groups)
    visual = torch.arange(n) if n == sum(groups) else torch.tensor([0, 1, 3])
    scores = torch.rand(n) if scores is None else scores
    return LayerInput(layer, scores, visual, pre, hidden, state)


def test_stages_merge_then_prune_once_then_stop():
    s = FrameFusion(ratio=0.5, num_layers=4)
    assert isinstance(s, Strategy)
    specs = s.layer_specs
    assert specs[0].own_layer and specs[0].layer == 0 and all(x.hidden for x in specs)
    assert [x.layer for x in specs[1:]] == [0, 1, 2] and all(x.mid_layer for x in specs[1:])
    h, _ = _frames()
    state: dict = {}
    # call 0: 3 of 6 tokens are candidates, 0.5 < u = 0.5? no: u = 1 - 0.5 = 0.5 and above = 0.5 -> top int(0.5 * 6)
    out = s.in_llm(_step(0, 6, hidden=h, state=state))
    assert isinstance(out, LayerMerge) and state["done"]
    # the three most similar candidates: tokens 2, 4 (patch 0) and 5 (patch 1) -> same merge as above
    assert out.keep.tolist() == [0, 1, 3]
    assert torch.equal(s.in_llm(_step(0, 3, hidden=h[[0, 1, 3]], state=state)), torch.arange(3))  # nothing more


def test_small_merge_ends_merging_and_the_next_stage_prunes_with_scores():
    s = FrameFusion(ratio=0.5, num_layers=4)
    state: dict = {}
    h = torch.eye(6)  # nothing alike: no candidate
    out = s.in_llm(_step(0, 6, hidden=h, state=state))
    assert torch.equal(out, torch.arange(6)) and state["history"] == [0.0] and state["merged"]
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    keep = s.in_llm(_step(0, 6, scores=scores, hidden=h, state=state))
    p = pruning_ratio([0.0], 0.5, 4)  # 1 - (2 - 1) / 3: the last 3 layers keep a third
    assert round(6 * (1 - p)) == 2
    assert keep.tolist() == [1, 3] and state["done"]
    # a budget that rounds to no token still keeps one (the official round() would keep none)
    state = {"history": [0.0], "merged": True}
    low = FrameFusion(ratio=0.3, num_layers=4)
    assert low.in_llm(_step(1, 6, scores=scores, hidden=h, state=state)).tolist() == [3]


def test_layer_counts_are_not_promised_and_bad_settings_are_named():
    with pytest.raises(ValueError, match="known only after the prefill"):
        FrameFusion().layer_counts(PreLLMOutput(torch.zeros(4, 2), torch.arange(4)), 28)
    with pytest.raises(ValueError, match="similarity_lower_bound"):
        FrameFusion(similarity_lower_bound=2.0)
    with pytest.raises(ValueError, match="needs LayerInput.state"):
        FrameFusion().in_llm(_step(0, 6))
