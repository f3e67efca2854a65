"""scripts/probe_targets.py: the targets table's verdicts follow the issue's targets, from records only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import probe_targets  # noqa: E402


def _record(prune="none", seed=probe_targets.EVAL_SEED, blank=False, retained=100.0, **acc) -> dict:
    by_task = {f"probe_{f}": acc.get(f, 100.0) for f in ("needle", "order", "count", "detail", "motion")}
    return {
        "config": {"benchmark": {"seed": seed, "blank": blank}},
        "prune": prune,
        "ratio": 1.0 if prune == "none" else 0.0005,
        "accuracy_by_task": by_task,
        "accuracy": sum(by_task.values()) / 5,
        "n_samples": 100,
        "pre_llm_retained_pct": retained,
        "git_sha": "0123456789abcdef",
    }


def test_verdicts_follow_the_targets(tmp_path):
    records = {
        "eval_met": _record(order=90.0),
        "eval_missed": _record(count=55.0),
        "new_seed_met": _record(seed=7777, order=85.0),
        "blank_met": _record(blank=True, needle=25.0, order=30.0, count=20.0, detail=35.0, motion=50.0),
        "one_token_missed": _record(
            "random", retained=0.06, needle=25.0, order=25.0, count=25.0, detail=51.0, motion=50.0
        ),  # fmt: skip
        "pruned_no_target": _record("hieravid", retained=30.0, count=40.0),
    }
    paths = []
    for name, record in records.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(record))
    out = tmp_path / "targets.md"
    assert probe_targets.main([*map(str, paths), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "generator seed" not in line]
    verdicts = [row.split("|")[1:-1][-1].strip() for row in rows]
    assert verdicts == ["met", "**missed**", "met", "met", "**missed**", ""]
    assert "(blank video)" in rows[3] and "new seed" in rows[2]
