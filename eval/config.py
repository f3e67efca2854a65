"""Hydra config to objects: compose ``configs/eval.yaml``, instantiate the strategy and build the backbone.

Both routes into an evaluation use this module: the Hydra runner (:mod:`eval.runner`) and the lmms-eval CLI route of
:class:`eval.lmms_model.VidPruneLMM`. It imports neither of them, so the runner can import the lmms-eval model and the
model can compose a config without an import circle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "CONFIGS",
    "REPO",
    "at_budget",
    "budget_of",
    "compose_config",
    "make_backbone",
    "make_paired_backbones",
    "make_strategy",
]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def budget_of(cfg: DictConfig) -> tuple[float, str] | None:
    """``(budget, budget_measure)`` when the run asks for a target achieved budget, validated; else ``None``.

    Raises:
        ValueError: a budget outside (0, 1] or an unknown measure, named with what is accepted.
    """
    from prune.api import check_ratio
    from prune.budget import check_measure

    if cfg.get("budget") is None:
        return None
    return check_ratio(cfg.budget, "budget"), check_measure(str(cfg.get("budget_measure", "flops")))


def compose_config(overrides: list[str]) -> DictConfig:
    """``configs/eval.yaml`` with Hydra overrides, outside ``@hydra.main`` (tests, the lmms-eval CLI route)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from eval.options import check_knob_overrides

    check_knob_overrides(overrides)  # ratio= and budget= together is an error, whatever the route
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("eval", overrides=overrides)


def make_strategy(cfg: DictConfig):
    """Instantiate ``cfg.prune``; a bad setting (e.g. a ratio outside (0, 1]) raises a one-line OptionError."""
    from eval.options import build_strategy

    return build_strategy(cfg)


def make_backbone(cfg: DictConfig):
    """Build the strategy and the backbone it runs on; with ``budget=``, the strategy solved per sample.

    The budget wrapper (:class:`prune.budget.AtBudget`) needs the LLM's depth and widths for the ``layer_avg`` and
    ``flops`` measures, known once the model is built; it is swapped in then (same in-LLM stages).
    """
    from eval.backbones import build_backbone
    from prune.adapters import swap_strategy

    budget = budget_of(cfg)
    strategy = make_strategy(cfg)
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), strategy, cfg.device)
    if budget is not None and strategy.name != "none":
        swap_strategy(backbone.adapter, at_budget(strategy, budget, backbone))
    return backbone


def at_budget(strategy, budget: tuple[float, str], backbone):
    """``strategy`` wrapped to hit ``budget = (target, measure)`` on ``backbone``'s LLM (``prune.budget.AtBudget``).

    The wrapper needs the LLM's depth and widths for the ``layer_avg`` and ``flops`` measures and the separators of
    the visual span (counted with the prompt text for ``flops``), known once the model is built.
    """
    from prune.budget import AtBudget

    shape = backbone.llm_shape
    return AtBudget(
        strategy,
        budget[0],
        budget[1],
        num_layers=shape.layers,
        hidden=shape.hidden,
        ffn=shape.ffn,
        separators=backbone.adapter.separators_unpruned,
    )


def make_paired_backbones(cfg: DictConfig, base_cfg: DictConfig):
    """The ``none`` and the pruned backbone on one loaded model (paired timing without a second copy of the weights).

    ``none`` is installed first: the scoring kernel reports to the handle installed last, and a handle's hooks do
    nothing while its own generate is not running, so each backbone runs exactly as it would alone. With ``budget=``,
    the pruned backbone's strategy is solved per sample (:func:`at_budget`).

    Returns:
        ``(none_backbone, pruned_backbone)``.
    """
    from eval.backbones import FAMILIES, build_backbone

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    none = build_backbone(model_cfg, make_strategy(base_cfg), cfg.device)
    strategy = make_strategy(cfg)
    budget = budget_of(cfg)
    if budget is not None and strategy.name != "none":
        strategy = at_budget(strategy, budget, none)
    adapter = FAMILIES[model_cfg["family"]].adapter(none.adapter.model, strategy, model_cfg)
    return none, dataclasses.replace(none, adapter=adapter, warm=False)
