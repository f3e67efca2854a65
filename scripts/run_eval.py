"""The main job: ``python scripts/run_eval.py model=llava_ov prune=hieravid ratio=0.3`` (what ``make eval`` runs).

Composes ``configs/eval.yaml``; see ``eval/runner.py``. Before Hydra starts, every override (each combination of a
``--multirun`` sweep) is composed and validated (``eval.options.precheck``): a bad option, an unknown key or option,
missing weights, a ratio or budget outside (0, 1], an unknown budget_measure or ``ratio=`` with ``budget=`` ends with
one line saying what is wrong and what is accepted, and exit code 2, before any model or data loads. A full disk or a
cell held by another run ends with one line and exit 3.

With ``nproc=N`` it launches N ranks of itself through accelerate (``--rank-config <resolved config>``, see
``eval/distributed.py``); a failing rank prints its line, and this process exits with the launcher's status.
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


def guarded_run(cfg: DictConfig) -> None:
    """``eval.runner.run`` with its errors as one line and an exit code (2: options, 3: environment)."""
    from eval.backbones import BackboneUnavailable
    from eval.distributed import LaunchFailed
    from eval.records import CellLocked, StorageError
    from eval.runner import run

    try:
        run(cfg)
    except (BackboneUnavailable, FileNotFoundError, ValueError) as err:
        _fail(err, EXIT_OPTION)
    except (CellLocked, StorageError) as err:
        _fail(err, EXIT_ENVIRONMENT)
    except LaunchFailed as err:  # a rank printed its own line; this says where that leaves the cell
        _fail(err, err.code)


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from eval.options import OptionError, check_knob_overrides

    try:
        check_knob_overrides(HydraConfig.get().overrides.task)  # ratio= and budget= together (also after --cfg etc.)
    except OptionError as err:
        _fail(err, EXIT_OPTION)
    guarded_run(cfg)


def precheck(argv: list[str]) -> None:
    """Validate the command line's overrides before Hydra runs anything (one line and exit 2 when one is bad)."""
    from eval.options import OptionError, precheck
    from eval.runner import compose_config

    try:
        precheck(argv, compose_config)
    except OptionError as err:
        _fail(err, EXIT_OPTION)


def rank_main(config_path: str) -> None:
    """One rank of a multi-process cell (``nproc``): the config the launching process resolved and checked."""
    guarded_run(OmegaConf.load(config_path))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-config"]:  # started by eval.distributed.launch through accelerate
        rank_main(sys.argv[2])
    else:
        precheck(sys.argv[1:])
        main()
