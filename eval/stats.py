"""Statistics over recorded runs: paired bootstrap CIs of Δaccuracy, per-sample scores, published reference numbers.

A pruned cell and its ``none`` baseline answer the same samples, so their difference is estimated on the pairs: the
per-sample differences ``d_i = pruned_i - baseline_i`` are resampled with replacement, which keeps the strong
correlation between the two runs (both are right on easy samples) and gives a much narrower, honest interval than
two independent intervals would.

Shape legend: ``n`` paired samples, ``B`` bootstrap resamples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "PUBLISHED_COLUMNS",
    "PUBLISHED_DIR",
    "PUBLISHED_REQUIRED",
    "PairedDelta",
    "compare_runs",
    "load_published",
    "load_scores",
    "paired_bootstrap",
    "ratio_ci",
]

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_DIR = REPO / "results" / "published"
PUBLISHED_COLUMNS = (
    "table",
    "backbone",
    "method",
    "retained_pct",
    "flops_ratio",
    "benchmark",
    "metric",
    "value",
    "source",
    "note",
)
"""Columns of every ``results/published/*.csv``, in file order."""
PUBLISHED_REQUIRED = ("table", "backbone", "method", "benchmark", "metric", "value", "source")
"""Columns that may not be empty in a published CSV (``retained_pct``, ``flops_ratio`` and ``note`` may)."""

# Elements of one [chunk, n] index block; bounds memory (~64 MiB of int64) whatever n and n_boot are.
_CHUNK_ELEMENTS = 1 << 23


def load_scores(run_dir: str | Path) -> dict[tuple[str, int], float]:
    """Per-sample scores of one evaluation cell, keyed for pairing.

    Args:
        run_dir: a cell folder ``results/runs/<model>/<benchmark>/<prune>/<ratio>/`` (or its ``scores.jsonl``).

    Returns:
        ``{(task, doc_id): score}`` with ``score`` in {0.0, 1.0} as recorded; a failed sample counts 0.0, as it does
        in ``record.json``'s accuracy.

    Raises:
        FileNotFoundError: no ``scores.jsonl``.
        ValueError: a line without ``task``/``doc_id``/``score``, or the same sample twice.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / "scores.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no scores.jsonl at {path}; evaluate the cell first (make eval ...)")
    scores: dict[tuple[str, int], float] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            key = (str(row["task"]), int(row["doc_id"]))
            score = 0.0 if row.get("failed") else float(row["score"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: expected task, doc_id and score, got {line[:200]!r}") from err
        if key in scores:
            raise ValueError(f"{path}:{number}: sample {key} appears twice")
        scores[key] = score
    return scores


def paired_bootstrap(
    pruned: Mapping[Hashable, float],
    baseline: Mapping[Hashable, float],
    n_boot: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedDelta:
    """Paired bootstrap percentile interval of the accuracy difference pruned − baseline.

    Samples are paired by key (``(task, doc_id)`` from :func:`load_scores`); keys present in only one run are
    counted and left out. Each of the ``n_boot`` resamples draws ``n`` pairs with replacement and takes the mean
    difference; the interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles of those means.

    Args:
        pruned: per-sample score of the pruned run, in [0, 1] (1 = correct).
        baseline: per-sample score of the ``none`` run on the same samples.
        n_boot: bootstrap resamples ``B`` (>= 1).
        alpha: 1 - confidence level, in (0, 1); 0.05 gives a 95 % interval.
        seed: seed of the ``numpy.random.Generator`` that draws the resamples.

    Returns:
        The :class:`PairedDelta`, in percentage points.

    Raises:
        ValueError: no key in common, a non-finite score, or a bad ``n_boot``/``alpha``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not (isinstance(alpha, int | float) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    common = [key for key in pruned if key in baseline]
    if not common:
        raise ValueError(
            f"no common samples: pruned has {len(pruned)}, baseline {len(baseline)}, none with the same key; "
            "pair a pruned cell with the none cell of the same model and benchmark"
        )
    diff = np.array([float(pruned[k]) - float(baseline[k]) for k in common], dtype=np.float64)  # [n]
    if not np.isfinite(diff).all():
        raise ValueError("scores must be finite numbers")
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)  # [B]
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # [chunk, n] resampled pair indices
        means[start:stop] = diff[idx].mean(axis=1)
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return PairedDelta(
        delta=100 * float(diff.mean()),
        low=100 * float(low),
        high=100 * float(high),
        n_paired=n,
        n_only_pruned=len(pruned) - n,
        n_only_baseline=len(baseline) - n,
        n_boot=n_boot,
        seed=seed,
        alpha=float(alpha),
    )


def ratio_ci(ratios, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, float | bool | int]:
    """Median of per-sample ratios (e.g. TTFT of none / TTFT of pruned, timed back-to-back) with a bootstrap CI.

    The samples are resampled with replacement ``n_boot`` times; the interval is the ``alpha/2`` and
    ``1 - alpha/2`` percentiles of the resampled medians. A speed-up is ``significant`` when the interval excludes
    1.0 (either way: a slow-down can be significant too).

    Args:
        ratios: ``[n]`` positive finite per-sample ratios.
        n_boot: bootstrap resamples ``B``.
        alpha: 1 - confidence level.
        seed: seed of the resampling generator.

    Returns:
        ``{"median", "low", "high", "n", "significant"}``.

    Raises:
        ValueError: no ratio, or a ratio that is not positive and finite.
    """
    x = np.asarray(list(ratios), dtype=np.float64)  # [n]
    if x.size == 0 or not np.isfinite(x).all() or (x <= 0).any():
        raise ValueError(f"ratio_ci needs positive finite ratios, got {x.size} values")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // x.size)
    medians = np.empty(n_boot, dtype=np.float64)  # [B]
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        medians[start:stop] = np.median(x[rng.integers(0, x.size, size=(stop - start, x.size))], axis=1)
    low, high = np.percentile(medians, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {
        "median": float(np.median(x)),
        "low": float(low),
        "high": float(high),
        "n": int(x.size),
        "significant": bool(low > 1.0 or high < 1.0),
    }


def compare_runs(pruned_dir: str | Path, baseline_dir: str | Path, **kwargs) -> PairedDelta:
    """:func:`paired_bootstrap` of two cells' ``scores.jsonl`` (``kwargs``: ``n_boot``, ``alpha``, ``seed``)."""
    return paired_bootstrap(load_scores(pruned_dir), load_scores(baseline_dir), **kwargs)


def load_published(name: str) -> pd.DataFrame:
    """One transcribed table of published numbers from ``results/published/<name>.csv``.

    Args:
        name: the file's stem (``prunevid_table1``, ``prunevid_table2``, ``hieravid_main``, ...) or a path to a CSV
            with the same columns.

    Returns:
        The rows, with columns :data:`PUBLISHED_COLUMNS`; ``retained_pct``, ``flops_ratio`` and ``value`` as floats
        (NaN where a source gives no number).

    Raises:
        ValueError: unknown name (the message lists the available ones), missing columns, or an empty required cell.
    """
    path = Path(name)
    if path.suffix != ".csv":
        path = PUBLISHED_DIR / f"{name}.csv"
    if not path.is_file():
        available = sorted(p.stem for p in PUBLISHED_DIR.glob("*.csv"))
        raise ValueError(f"no published table {name!r}; available: {available}")
    # keep_default_na=False: "NA"-like strings in notes stay text; the numeric columns are converted below.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PUBLISHED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path.name}: missing columns {missing}; expected {list(PUBLISHED_COLUMNS)}")
    for column in PUBLISHED_REQUIRED:
        empty = frame.index[frame[column].str.strip() == ""].tolist()
        if empty:
            raise ValueError(f"{path.name}: empty {column!r} in data rows {[i + 1 for i in empty]}")
    for column in ("retained_pct", "flops_ratio", "value"):
        frame[column] = pd.to_numeric(frame[column].replace("", math.nan), errors="raise")
    return frame[list(PUBLISHED_COLUMNS)]


@dataclass(frozen=True)
class PairedDelta:
    """Δaccuracy of a pruned run against its baseline on the paired samples.

    Attributes:
        delta: mean of pruned − baseline over the paired samples, in percentage points.
        low: lower bound of the percentile interval, in percentage points.
        high: upper bound, in percentage points.
        n_paired: samples present in both runs (the ones used).
        n_only_pruned: samples only the pruned run has (left out).
        n_only_baseline: samples only the baseline has (left out).
        n_boot: bootstrap resamples drawn.
        seed: seed of the resampling generator.
        alpha: 1 - confidence level of the interval.
    """

    delta: float
    low: float
    high: float
    n_paired: int
    n_only_pruned: int
    n_only_baseline: int
    n_boot: int
    seed: int
    alpha: float = 0.05
