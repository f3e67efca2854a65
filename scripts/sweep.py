"""`make sweep exp=<name>`: run every cell of ``configs/experiment/<name>.yaml`` that has no record yet.

    python scripts/sweep.py ratio_sweep model=tiny_llava_ov          # restrict the grid to one model
    python scripts/sweep.py prunevid_table1 limit=20                  # extra Hydra overrides go to every cell
    python scripts/sweep.py hieravid_main --launcher slurm            # one SLURM job per cell (pip install '.[slurm]')
    python scripts/sweep.py prunevid_table1 --dry-run                 # print the multirun commands only

Each method becomes one Hydra ``--multirun`` of ``scripts/run_eval.py`` over its models, benchmarks and ratios;
the paired ``none`` cell is evaluated (or resumed) by the runner. Finished cells are skipped, finished samples of an
interrupted cell resume, so a sweep can be re-run until nothing is missing. Every cell runs with the decode cache
(``cache=on``, unless the command line says ``cache=off``), so each video is decoded once per sweep.
Every cell waits for a cell another run holds (``lock_wait``, a day unless the command line says otherwise), so
sweeps side by side share their paired ``none`` cell instead of stopping.
``nproc=N`` runs every cell on N processes (docs/eval.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.experiments import load_experiment, shell, split_overrides, sweep_commands  # noqa: E402

# Every cell of a sweep resumes the shared paired ``none`` cell, so two sweeps side by side (or a sweep next to
# `make eval`) meet on its lock; without a wait the second stops with exit 3 at the first meeting. The lock is an
# flock that dies with its holder, so waiting never hangs on a crashed run; a day is "wait", with an end.
LOCK_WAIT_S = 86_400


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", help="a file name under configs/experiment/ (without .yaml)")
    ap.add_argument("overrides", nargs="*", help="model=/benchmark=/prune=/ratio= restrict the grid; others pass on")
    ap.add_argument("--launcher", default=None, help="slurm: configs/hydra/launcher/slurm.yaml; default: basic")
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    restrict, extra, results = split_overrides(args.overrides)
    if not any(o.startswith("cache=") for o in extra):  # the cells of a sweep share one decode of every video
        extra = ["cache=on", *extra]
    if not any(o.startswith("lock_wait=") for o in extra):  # sweeps side by side share the paired none cell
        extra = [f"lock_wait={LOCK_WAIT_S}", *extra]
    args.results = results or args.results  # results_dir= (as for make eval) decides which records count as done
    try:
        exp = load_experiment(args.experiment, restrict)
    except ValueError as err:
        print(f"vidprune: error: {err}", file=sys.stderr)
        return 2
    commands = sweep_commands(exp, args.results, extra, args.launcher)
    total = len(exp.cells())
    if not commands:
        print(f"[sweep] {exp.name}: all {total} cells have a record; `make tables exp={exp.name}` builds the table")
        return 0
    for i, overrides in enumerate(commands, 1):
        cmd = [sys.executable, str(ROOT / "scripts" / "run_eval.py"), "--multirun", *overrides]
        print(f"[sweep] {exp.name} ({i}/{len(commands)}): {shell(cmd[1:])}", flush=True)
        if not args.dry_run:
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode != 0:
                print(f"[sweep] a job failed (exit {done.returncode}); re-run to resume", file=sys.stderr)
                return done.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
