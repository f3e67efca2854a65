"""Rebuild tables from the records: ``make tables`` (every record) or ``make tables exp=<name>`` (one experiment).

Without an experiment: ``results/tables/summary.{csv,md}``, one row per ``results/runs/**/record.json``. With one:
``results/tables/<name>.{md,csv,tex}`` in the paper's layout (plus the sweep plots), listing every cell without a
record and the command that fills it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.experiments import build_table, load_experiment, split_overrides  # noqa: E402
from eval.tables import write_tables  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--exp", default=None, help="a file name under configs/experiment/")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the Δaccuracy CIs")
    ap.add_argument("overrides", nargs="*", help="model=/benchmark=/prune=/ratio= restrict the experiment's grid")
    args = ap.parse_args(argv)
    restrict, _, results = split_overrides(args.overrides)
    args.results = results or args.results  # results_dir= as for make eval
    if not args.exp:
        for path in write_tables(args.results):
            print(f"wrote {path}")
        return 0
    try:
        exp = load_experiment(args.exp, restrict)
    except ValueError as err:
        print(f"vidprune: error: {err}", file=sys.stderr)
        return 2
    out = build_table(exp, args.results, n_boot=args.n_boot)
    for path in out["paths"]:
        print(f"wrote {path}")
    cells = len(exp.cells())
    print(f"[tables] {exp.name}: {cells - len(out['missing'])}/{cells} cells have a record")
    for cell in out["missing"]:
        print(f"  missing: {cell.command()}")
    if out["missing"]:
        print(f"  all at once: make sweep exp={exp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
