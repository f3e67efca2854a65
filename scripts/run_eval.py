"""The main job: ``python scripts/run_eval.py model=llava_ov prune=hieravid ratio=0.3`` (what ``make eval`` runs).

Composes ``configs/eval.yaml``; see ``eval/runner.py``. Errors a user can fix (missing weights, an unknown option, a
ratio outside (0, 1]) end with one line saying what is wrong and what to do, and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from eval.backbones import BackboneUnavailable
    from eval.runner import run

    try:
        run(cfg)
    except (BackboneUnavailable, FileNotFoundError, ValueError) as err:
        print(f"vidprune: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
