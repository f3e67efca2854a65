"""Hydra config to objects: compose ``configs/eval.yaml``, instantiate the strategy and build the backbone.

Both routes into an evaluation use this module: the Hydra runner (:mod:`eval.runner`) and the lmms-eval CLI route of
:class:`eval.lmms_model.VidPruneLMM`. It imports neither of them, so the runner can import the lmms-eval model and the
model can compose a config without an import circle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIGS", "REPO", "compose_config", "make_backbone", "make_paired_backbones", "make_strategy"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def compose_config(overrides: list[str]) -> DictConfig:
    """``configs/eval.yaml`` with Hydra overrides, outside ``@hydra.main`` (tests, the lmms-eval CLI route)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("eval", overrides=overrides)


def make_strategy(cfg: DictConfig):
    """Instantiate ``cfg.prune``; a bad setting (e.g. a ratio outside (0, 1]) raises a one-line OptionError."""
    from eval.options import build_strategy

    return build_strategy(cfg)


def make_backbone(cfg: DictConfig):
    """Build the strategy and the backbone it runs on."""
    from eval.backbones import build_backbone

    strategy = make_strategy(cfg)
    return build_backbone(OmegaConf.to_container(cfg.model, resolve=True), strategy, cfg.device)


def make_paired_backbones(cfg: DictConfig, base_cfg: DictConfig):
    """The ``none`` and the pruned backbone on one loaded model (paired timing without a second copy of the weights).

    ``none`` is installed first: the scoring kernel reports to the handle installed last, and a handle's hooks do
    nothing while its own generate is not running, so each backbone runs exactly as it would alone.

    Returns:
        ``(none_backbone, pruned_backbone)``.
    """
    from eval.backbones import FAMILIES, build_backbone

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    none = build_backbone(model_cfg, make_strategy(base_cfg), cfg.device)
    adapter = FAMILIES[model_cfg["family"]].adapter(none.adapter.model, make_strategy(cfg), model_cfg)
    return none, dataclasses.replace(none, adapter=adapter, warm=False)
