"""Paired bootstrap of Δaccuracy, scores.jsonl loading and the published-number CSVs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from eval.stats import (
    PUBLISHED_COLUMNS,
    PUBLISHED_DIR,
    PUBLISHED_REQUIRED,
    PairedDelta,
    compare_runs,
    load_published,
    load_scores,
    paired_bootstrap,
)


def _runs(n: int, p_base: float, p_pruned: float, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    keys = [("task", i) for i in range(n)]
    base = {k: float(v) for k, v in zip(keys, rng.random(n) < p_base, strict=True)}
    pruned = {k: float(v) for k, v in zip(keys, rng.random(n) < p_pruned, strict=True)}
    return pruned, base


def test_identical_runs_give_zero_delta_and_a_zero_interval():
    pruned, base = _runs(50, 0.6, 0.6, seed=1)
    out = paired_bootstrap(base, dict(base), n_boot=500)
    assert (out.delta, out.low, out.high) == (0.0, 0.0, 0.0)
    assert out.n_paired == 50 and out.n_only_pruned == 0 and out.n_only_baseline == 0


def test_constant_difference_is_exact():
    # Every pair differs by +1 (pruned right, baseline wrong): every resample's mean is exactly 100 points.
    keys = [("t", i) for i in range(7)]
    out = paired_bootstrap(dict.fromkeys(keys, 1.0), dict.fromkeys(keys, 0.0), n_boot=200)
    assert (out.delta, out.low, out.high) == (100.0, 100.0, 100.0)


def test_delta_is_the_exact_paired_mean_and_the_spread_matches_the_analytic_se():
    # d = [+1, 0, 0, -1, +1, +1, 0, 0]: mean 0.25; population sd sqrt(mean(d^2) - 0.25^2) = sqrt(0.5 - 0.0625).
    pruned = {("a", i): v for i, v in enumerate([1, 0, 1, 0, 1, 1, 0, 1])}
    base = {("a", i): v for i, v in enumerate([0, 0, 1, 1, 0, 0, 0, 1])}
    out = paired_bootstrap(pruned, base, n_boot=40_000, alpha=0.3173, seed=3)  # ±1 sigma interval
    assert out.delta == pytest.approx(25.0, abs=1e-12)
    se = 100 * np.sqrt(0.5 - 0.0625) / np.sqrt(8)  # bootstrap SE of a mean: population sd / sqrt(n)
    assert (out.high - out.low) / 2 == pytest.approx(se, rel=0.15)
    assert out.low < out.delta < out.high


def test_interval_covers_delta_and_narrows_with_more_samples():
    pruned, base = _runs(100, 0.6, 0.5, seed=2)
    small = paired_bootstrap(pruned, base, n_boot=4000, seed=0)
    # The same pairs repeated 16 times: same delta, standard error divided by 4.
    big_p = {(t, i + 1000 * r): v for r in range(16) for (t, i), v in pruned.items()}
    big_b = {(t, i + 1000 * r): v for r in range(16) for (t, i), v in base.items()}
    big = paired_bootstrap(big_p, big_b, n_boot=4000, seed=0)
    for out in (small, big):
        assert out.low <= out.delta <= out.high
    assert big.delta == pytest.approx(small.delta)
    ratio = (big.high - big.low) / (small.high - small.low)
    assert 0.2 < ratio < 0.32  # ~1/4


def test_seed_reproducibility():
    pruned, base = _runs(60, 0.7, 0.5, seed=4)
    a = paired_bootstrap(pruned, base, n_boot=1000, seed=11)
    b = paired_bootstrap(pruned, base, n_boot=1000, seed=11)
    c = paired_bootstrap(pruned, base, n_boot=1000, seed=12)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    assert a.seed == 11 and a.n_boot == 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.delta = 0.0  # type: ignore[misc]


def test_chunked_resampling_matches_one_block(monkeypatch):
    # Memory bounding splits the [B, n] draw into chunks; the stream (and so the result) must not change.
    import eval.stats as stats

    pruned, base = _runs(30, 0.5, 0.4, seed=5)
    whole = paired_bootstrap(pruned, base, n_boot=999, seed=7)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 30 * 17)
    chunked = paired_bootstrap(pruned, base, n_boot=999, seed=7)
    assert chunked == whole


def test_unpaired_keys_are_counted_and_excluded():
    base = {("t", 0): 1.0, ("t", 1): 0.0, ("t", 2): 1.0, ("u", 0): 0.0}
    pruned = {("t", 0): 1.0, ("t", 1): 1.0, ("v", 9): 0.0, ("v", 10): 0.0, ("v", 11): 0.0}
    out = paired_bootstrap(pruned, base, n_boot=100)
    assert (out.n_paired, out.n_only_pruned, out.n_only_baseline) == (2, 3, 2)
    assert out.delta == pytest.approx(50.0)  # only (t,0): 0 and (t,1): +1; the unpaired zeros do not count


def test_errors():
    with pytest.raises(ValueError, match="no common samples"):
        paired_bootstrap({("a", 0): 1.0}, {("b", 0): 1.0})
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap({1: 1.0}, {1: 0.0}, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        paired_bootstrap({1: 1.0}, {1: 0.0}, alpha=1.0)
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap({1: float("nan")}, {1: 0.0})


def _write_scores(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_scores_and_compare_runs(tmp_path):
    row = {"prediction": "A", "error": None, "parse_ok": True}
    base = _write_scores(
        tmp_path / "none",
        [
            {**row, "task": "videomme_local", "doc_id": 0, "failed": False, "score": 1.0},
            {**row, "task": "videomme_local", "doc_id": 1, "failed": False, "score": 1.0},
            {**row, "task": "egoschema_local", "doc_id": 0, "failed": False, "score": 0.0},
        ],
    )
    pruned = _write_scores(
        tmp_path / "prunevid",
        [
            {**row, "task": "videomme_local", "doc_id": 0, "failed": False, "score": 1.0},
            # a failed sample counts as wrong whatever its score field says
            {**row, "task": "videomme_local", "doc_id": 1, "failed": True, "score": 1.0, "error": "boom"},
            {**row, "task": "egoschema_local", "doc_id": 0, "failed": False, "score": 1.0},
        ],
    )
    scores = load_scores(pruned)
    assert scores == {("videomme_local", 0): 1.0, ("videomme_local", 1): 0.0, ("egoschema_local", 0): 1.0}
    assert load_scores(pruned / "scores.jsonl") == scores
    out = compare_runs(pruned, base, n_boot=300, seed=1)
    assert isinstance(out, PairedDelta) and out.n_paired == 3 and out.delta == pytest.approx(0.0)


def test_load_scores_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores.jsonl"):
        load_scores(tmp_path)
    dup = {"task": "t", "doc_id": 0, "failed": False, "score": 1.0}
    _write_scores(tmp_path / "dup", [dup, dup])
    with pytest.raises(ValueError, match="twice"):
        load_scores(tmp_path / "dup")
    _write_scores(tmp_path / "bad", [{"task": "t", "failed": False}])
    with pytest.raises(ValueError, match="expected task, doc_id and score"):
        load_scores(tmp_path / "bad")


PUBLISHED = sorted(p.stem for p in PUBLISHED_DIR.glob("*.csv"))


def test_the_published_tables_exist():
    assert {"prunevid_table1", "prunevid_table2", "hieravid_main"} <= set(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_csv_loads_with_required_columns(name):
    frame = load_published(name)
    assert tuple(frame.columns) == PUBLISHED_COLUMNS and len(frame) > 0
    for column in PUBLISHED_REQUIRED:
        assert (frame[column].astype(str).str.strip() != "").all(), column
    assert frame["value"].notna().all()
    # One number per (table, backbone, method, retained, benchmark, metric): no row transcribed twice.
    key = ["table", "backbone", "method", "retained_pct", "benchmark", "metric"]
    assert not frame.duplicated(key).any()


def test_published_spot_checks():
    t1 = load_published("prunevid_table1")
    row = t1[(t1.backbone == "PLLaVA-7B") & (t1.method == "prunevid") & (t1.benchmark == "videomme")]
    assert row["value"].tolist() == [45.0] and "45.3" in row["note"].iloc[0]
    ov = t1[(t1.backbone == "LLaVA-OneVision-7B") & (t1.method == "prunevid")]
    assert set(ov["retained_pct"]) == {17.0} and set(ov["flops_ratio"]) == {0.2}
    t2 = load_published("prunevid_table2")
    speed = t2[(t2.method == "prunevid") & (t2.metric == "ttft_speedup")]
    assert speed["value"].tolist() == [1.55]


def test_load_published_errors(tmp_path):
    with pytest.raises(ValueError, match="available"):
        load_published("no_such_table")
    bad = tmp_path / "bad.csv"
    bad.write_text("table,backbone,method\nx,y,z\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_published(str(bad))
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(PUBLISHED_COLUMNS) + "\nT1,PLLaVA-7B,none,100,1.0,mvbench,accuracy,,paper,\n")
    with pytest.raises(ValueError, match="empty 'value'"):
        load_published(str(empty))
