"""lmms-eval finds the vidprune model through the ``lmms_eval.models`` entry point (the CLI route)."""

from __future__ import annotations

import pytest

from eval.lmms_model import VidPruneLMM


def test_entry_point_resolves_to_the_simple_model():
    from lmms_eval.models import get_model

    assert get_model("vidprune", force_simple=True) is VidPruneLMM
    assert VidPruneLMM.is_simple


def test_cli_style_construction_composes_the_configs():
    model = VidPruneLMM.create_from_arg_string(
        "model=tiny_llava_ov,prune=fastv,ratio=0.5", {"batch_size": 1, "max_batch_size": None, "device": None}
    )
    assert model.backbone.name == "tiny_llava_ov"
    assert model.backbone.adapter.strategy.name == "fastv" and model.backbone.adapter.strategy.ratio == 0.5
    model.backbone.adapter.llm.remove()


def test_batch_size_other_than_one_is_rejected():
    with pytest.raises(ValueError, match="batch_size must be 1"):
        VidPruneLMM(model="tiny_llava_ov", batch_size=4)


def test_cli_route_takes_a_budget_instead_of_a_ratio():
    from prune.budget import AtBudget

    model = VidPruneLMM.create_from_arg_string(
        "model=tiny_llava_ov,prune=fastv,budget=0.3,budget_measure=final", {"batch_size": 1, "device": None}
    )
    strategy = model.backbone.adapter.strategy
    assert isinstance(strategy, AtBudget) and model.backbone.adapter.llm.strategy is strategy
    assert (strategy.budget, strategy.measure, strategy.num_layers) == (0.3, "final", 4)
    model.backbone.adapter.llm.remove()
    with pytest.raises(ValueError, match="both given"):
        VidPruneLMM(model="tiny_llava_ov", prune="fastv", ratio=0.3, budget=0.3)
