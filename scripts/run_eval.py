"""The main job: ``python scripts/run_eval.py model=llava_ov prune=hieravid ratio=0.3`` (what ``make eval`` runs).

Composes ``configs/eval.yaml``; see ``eval/runner.py``. Before Hydra starts, every override (each combination of a
``--multirun`` sweep) is composed and validated (``eval.options.precheck``): a bad option, an unknown key or option,
missing weights, a ratio or budget outside (0, 1], an unknown budget_measure or ``ratio=`` with ``budget=`` ends with
one line saying what is wrong and what is accepted, and exit code 2, before any model or data loads. A full disk or a
cell held by another run ends with one line and exit 3.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# configs/eval.yaml puts Hydra's own logs under ${vidprune_path:${results_dir}}: results_dir resolved as the runner
# resolves it (relative to the repository), so a run started from any folder writes nowhere else.
OmegaConf.register_new_resolver("vidprune_path", lambda p: os.path.abspath(ROOT / str(p)), replace=True)

EXIT_OPTION = 2  # the user can fix it in the command line or the configs
EXIT_ENVIRONMENT = 3  # the machine is in the way: a full disk, a read-only folder, another run on the cell


def _fail(err: BaseException, code: int) -> None:
    print(f"vidprune: error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from eval.backbones import BackboneUnavailable
    from eval.options import check_knob_overrides
    from eval.records import CellLocked, StorageError
    from eval.runner import run

    try:
        check_knob_overrides(HydraConfig.get().overrides.task)  # ratio= and budget= together
        run(cfg)
    except (BackboneUnavailable, FileNotFoundError, ValueError) as err:
        _fail(err, EXIT_OPTION)
    except (CellLocked, StorageError) as err:
        _fail(err, EXIT_ENVIRONMENT)


def precheck(argv: list[str]) -> None:
    """Validate the command line's overrides before Hydra runs anything (one line and exit 2 when one is bad)."""
    from eval.options import OptionError, precheck
    from eval.runner import compose_config

    try:
        precheck(argv, compose_config)
    except OptionError as err:
        _fail(err, EXIT_OPTION)


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
