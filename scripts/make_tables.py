"""Rebuild ``results/tables/summary.{csv,md}`` from every ``results/runs/**/record.json``: ``make tables``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.tables import write_tables  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=Path("results"))
    for path in write_tables(ap.parse_args().results):
        print(f"wrote {path}")
