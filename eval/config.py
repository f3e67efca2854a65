"""Hydra config to objects: compose ``configs/eval.yaml``, instantiate the strategy and build the backbone.

Both routes into an evaluation use this module: the Hydra runner (:mod:`eval.runner`) and the lmms-eval CLI route of
:class:`eval.lmms_model.VidPruneLMM`. It imports neither of them, so the runner can import the lmms-eval model and the
model can compose a config without an import circle.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIGS", "REPO", "compose_config", "make_backbone", "make_strategy"]

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
    """Instantiate ``cfg.prune`` (raises ValueError naming the accepted range for a bad ratio)."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.prune)
    except Exception as err:  # Hydra wraps the strategy's ValueError
        cause = err.__cause__ or err
        raise ValueError(f"prune={cfg.prune._target_.rsplit('.', 1)[-1]}: {cause}") from err


def make_backbone(cfg: DictConfig):
    """Build the strategy and the backbone it runs on."""
    from eval.backbones import build_backbone

    strategy = make_strategy(cfg)
    return build_backbone(OmegaConf.to_container(cfg.model, resolve=True), strategy, cfg.device)
