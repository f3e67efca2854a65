"""Sweep plots: accuracy and TTFT speed-up against the achieved budget, one line per method.

The x-axis is what a cell achieved (default the prefill FLOPs ratio; or the visual tokens entering the LLM, after the
last prune, or layer-averaged), never a method's nominal knob: one method's ``ratio=0.3`` is not another's. The
nominal settings go into the legend (a ``legend`` column, e.g. ``prunevid (ratio 0.1–0.5)``).

:func:`plot_sweep` writes two figures, each as PNG and SVG:

* ``<stem>_accuracy``: accuracy (%) against ``x``, with the ``none`` cell as a dashed horizontal reference line
  (and a marker at its own budget, 1.0 or 100 %);
* ``<stem>_ttft_speedup``: TTFT speed-up over ``none`` against ``x``, with the reference line at 1×;
* ``<stem>_evidence_final_pct`` (known-answer probe only, when the column has values): the fraction of the evidence
  tokens that reach the last decoder layer, with ``none``'s 100 % as the reference line.

Layout: one figure per metric, one subplot per (model, benchmark), rows = models, columns = benchmarks, sharing one
legend. One file per metric rather than per benchmark keeps a sweep's picture in one place, and subplots of one
figure share the method colours. Output is byte-for-byte reproducible: the Agg backend, a fixed ``svg.hashsalt``, no
dates in the metadata, and text written as SVG ``<text>`` (searchable, testable) rather than glyph paths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["METRICS", "REQUIRED_COLUMNS", "figure_size", "plot_sweep"]

REQUIRED_COLUMNS = ("model", "benchmark", "prune", "ratio", "accuracy", "ttft_speedup")
METRICS = {"accuracy": "accuracy (%)", "ttft_speedup": "TTFT speed-up over none (×)"}
"""Plotted columns and their axis labels; one figure each."""
OPTIONAL_METRICS = {"evidence_final_pct": "evidence tokens reaching the last layer (%)"}
"""Plotted too when the column has a value (known-answer probe records, eval/probe.py)."""
X_LABELS = {
    "ratio": "ratio (each method's own knob, not a common budget)",
    "flops_ratio": "achieved prefill FLOPs ratio vs none",
    "tokens_in_retained_pct": "achieved visual tokens entering the LLM (%)",
    "pre_llm_retained_pct": "achieved visual tokens entering the LLM (%)",
    "final_retained_pct": "achieved visual tokens after the last prune (%)",
    "layer_avg_retained_pct": "achieved layer-averaged visual tokens (%)",
}
PANEL_IN = (4.0, 3.0)  # width, height of one subplot in inches
LEGEND_IN = 0.6  # height of one row of the legend strip under the panels
LEGEND_PER_PANEL = 3  # legend entries that fit side by side under one panel's width
LEGEND_ENTRY_IN = 0.6  # width of a legend entry's marker and padding in inches
LEGEND_CHAR_IN = 0.075  # width of one legend character in inches (the RC font size)
DPI = 100
# Fixed colours per method so a method keeps its colour across figures and runs; unknown ones take the rest in order.
COLOURS = {
    "prunevid": "tab:blue",
    "hieravid": "tab:orange",
    "fastv": "tab:green",
    "random": "tab:gray",
    "pool": "tab:purple",
}
# Ten spares after the five fixed ones: the 12 strategies of configs/prune get 12 distinct colours (the probe sweep).
SPARE_COLOURS = (
    "tab:red",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "navy",
    "darkgoldenrod",
    "lime",
    "magenta",
    "teal",
)
RC = {
    "svg.hashsalt": "vidprune",  # fixed ids in the SVG, not random ones
    "svg.fonttype": "none",  # text as <text> elements
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def legend_columns(n_entries: int, n_cols: int, longest: int = 0) -> int:
    """Legend entries per row: as many as fit under ``n_cols`` panels, so no entry is cut off.

    ``longest``: characters of the longest entry; labels with the nominal knobs (``prunevid (layer_avg 10–30 %)``)
    take more room than a method name (about ``LEGEND_CHAR_IN`` per character plus the marker).
    """
    fit = math.floor(PANEL_IN[0] * n_cols / (LEGEND_ENTRY_IN + LEGEND_CHAR_IN * longest)) if longest else n_entries
    return max(1, min(n_entries, LEGEND_PER_PANEL * n_cols, fit))


def figure_size(n_rows: int, n_cols: int, dpi: int = DPI, n_legend: int = 0, longest: int = 0) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a saved PNG with ``n_rows`` models × ``n_cols`` benchmarks.

    ``n_legend`` legend entries (the longest ``longest`` characters) wrap into as many rows as they need (one row when
    0 or when they fit).
    """
    legend_rows = math.ceil(n_legend / legend_columns(n_legend, n_cols, longest)) if n_legend else 1
    width, height = PANEL_IN[0] * n_cols, PANEL_IN[1] * n_rows + LEGEND_IN * legend_rows
    return round(width * dpi), round(height * dpi)


def _check(df: pd.DataFrame, x: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"plot_sweep needs a pandas DataFrame, got {type(df).__name__}")
    needed = [*REQUIRED_COLUMNS, x] if x not in REQUIRED_COLUMNS else list(REQUIRED_COLUMNS)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"plot_sweep: missing column(s) {missing}; needs {needed} (optional: ci_low, ci_high)")
    if ("ci_low" in df.columns) != ("ci_high" in df.columns):
        raise ValueError("plot_sweep: give both ci_low and ci_high, or neither")
    if df.empty:
        raise ValueError("plot_sweep: no rows to plot")


def _colours(methods: Sequence[str]) -> dict[str, str]:
    spare = iter(SPARE_COLOURS * (1 + len(methods) // len(SPARE_COLOURS)))
    return {m: COLOURS.get(m) or next(spare) for m in methods}


def _panel(ax, cell: pd.DataFrame, metric: str, x: str, colours: dict[str, str], gid: str) -> None:
    """One (model, benchmark) subplot: a line per method, ``none`` as the reference."""
    base = cell[cell.prune == "none"]
    if metric == "ttft_speedup":
        ref = 1.0  # none's speed-up over itself, whether or not the table filled it in
    elif metric == "evidence_final_pct":
        ref = 100.0  # none keeps every evidence token
    else:
        ref = float(base[metric].iloc[0]) if len(base) and pd.notna(base[metric].iloc[0]) else math.nan
    if not math.isnan(ref):
        ax.axhline(ref, color="black", linestyle="--", linewidth=1.0, label="none", gid=f"{gid}-none")
        if len(base) and pd.notna(base[x].iloc[0]):
            ax.plot([float(base[x].iloc[0])], [ref], marker="*", color="black", markersize=8, linestyle="none")
    for method, rows in cell[cell.prune != "none"].groupby("prune", sort=True):
        rows = rows.sort_values(x)
        xs, ys = rows[x].astype(float).to_numpy(), rows[metric].astype(float).to_numpy()
        label = str(rows["legend"].iloc[0]) if "legend" in rows.columns else method  # nominal knobs live here
        (line,) = ax.plot(xs, ys, marker="o", color=colours[method], label=label, gid=f"{gid}-{method}")
        bounds = {"accuracy": ("ci_low", "ci_high"), "ttft_speedup": ("ttft_ci_low", "ttft_ci_high")}.get(metric)
        if bounds is not None and bounds[0] in rows.columns:
            low, high = rows[bounds[0]].astype(float).to_numpy(), rows[bounds[1]].astype(float).to_numpy()
            has = ~(np.isnan(low) | np.isnan(high))
            if has.any():
                bars = ax.errorbar(
                    xs[has],
                    ys[has],
                    yerr=[ys[has] - low[has], high[has] - ys[has]],
                    fmt="none",
                    ecolor=line.get_color(),
                    capsize=3,
                )
                bars.lines[2][0].set_gid(f"{gid}-{method}-ci")  # the vertical bars (a LineCollection)
            if metric == "ttft_speedup":
                # A speed-up whose CI includes 1.0 is not significant: drawn hollow. Points without a CI (unpaired
                # timing) are drawn as crosses: no claim either way.
                ns = has & (low <= 1.0) & (high >= 1.0)
                if ns.any():
                    ax.plot(
                        xs[ns],
                        ys[ns],
                        marker="o",
                        markerfacecolor="white",
                        color=line.get_color(),
                        linestyle="none",
                        gid=f"{gid}-{method}-ns",
                    )
                if (~has).any():
                    ax.plot(
                        xs[~has],
                        ys[~has],
                        marker="x",
                        color=line.get_color(),
                        linestyle="none",
                        markersize=8,
                        gid=f"{gid}-{method}-unpaired",
                    )


def plot_sweep(df: pd.DataFrame, out_dir: str | Path, stem: str, x: str = "flops_ratio") -> list[Path]:
    """Plot a sweep of methods × ratios as accuracy and TTFT speed-up figures.

    Args:
        df: one row per evaluation cell (e.g. ``eval.tables.collect``), with columns ``model``, ``benchmark``,
            ``prune``, ``ratio``, ``accuracy`` (%) and ``ttft_speedup`` (× over ``none``; NaN allowed); optional
            ``ci_low``/``ci_high``: bounds of the accuracy interval **in accuracy units** (for a paired Δ interval,
            ``none``'s accuracy + ``PairedDelta.low``/``high``), drawn as error bars on the accuracy figure;
            optional ``ttft_ci_low``/``ttft_ci_high``: the bootstrap CI of the paired TTFT speed-up, drawn as error
            bars, with a hollow marker where it includes 1.0 (not significant) and a cross where a point has none.
            The ``none`` row of a (model, benchmark) is the reference line.
            Optional ``legend``: the legend entry of each method (its nominal settings), one value per method.
        out_dir: folder for the files (created).
        stem: file-name prefix.
        x: the x-axis column, an achieved budget: ``flops_ratio`` (default), ``tokens_in_retained_pct``,
            ``final_retained_pct`` or ``layer_avg_retained_pct`` (``ratio`` still works, labelled as a knob).

    Returns:
        ``[<stem>_accuracy.png, .svg, <stem>_ttft_speedup.png, .svg]`` under ``out_dir``, then
        ``<stem>_evidence_final_pct.png, .svg`` when ``df`` has that column with a value.

    Raises:
        ValueError: a missing column (named), only one of ``ci_low``/``ci_high``, or no rows.
    """
    _check(df, x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = sorted(df.model.astype(str).unique())
    benchmarks = sorted(df.benchmark.astype(str).unique())
    colours = _colours(sorted(m for m in df.prune.astype(str).unique() if m != "none"))
    methods = set(df.prune.astype(str))
    labels = df.legend.astype(str) if "legend" in df.columns else df.prune.astype(str)
    longest = max(len(s) for s in labels)
    width, height = figure_size(len(models), len(benchmarks), DPI, n_legend=len(methods), longest=longest)
    paths: list[Path] = []
    with plt.rc_context(RC):
        present = {m: label for m, label in OPTIONAL_METRICS.items() if m in df.columns and df[m].notna().any()}
        for metric, label in {**METRICS, **present}.items():
            fig, axes = plt.subplots(
                len(models),
                len(benchmarks),
                figsize=(width / DPI, height / DPI),
                dpi=DPI,
                squeeze=False,
                layout="constrained",
            )
            for i, model in enumerate(models):
                for j, bench in enumerate(benchmarks):
                    ax = axes[i][j]
                    cell = df[(df.model.astype(str) == model) & (df.benchmark.astype(str) == bench)]
                    _panel(ax, cell, metric, x, colours, gid=f"{metric}-{model}-{bench}")
                    ax.set_title(f"{model} · {bench}")
                    ax.set_xlabel(X_LABELS.get(x, x))
                    ax.set_ylabel(label)
            # One legend for the figure: methods in sorted order, then the reference.
            handles = {}
            for ax in axes.flat:
                for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
                    handles.setdefault(name, handle)
            order = [*sorted(n for n in handles if n != "none"), *(["none"] if "none" in handles else [])]
            ncols = legend_columns(len(order), len(benchmarks), longest)
            fig.legend([handles[n] for n in order], order, loc="outside lower center", ncols=ncols)
            if metric == "ttft_speedup":
                fig.text(
                    0.01,
                    0.99,
                    "bars: bootstrap 95 % CI of paired TTFT ratios; hollow: CI includes 1 (n.s.); x: unpaired, no CI",
                    fontsize=7,
                    va="top",
                    gid="ttft-legend-note",
                )
            for suffix, metadata in ((".png", {"Software": None}), (".svg", {"Date": None})):
                path = out / f"{stem}_{metric}{suffix}"
                tmp = path.with_name(f".{path.name}.tmp")  # written, then renamed: never a torn picture
                fig.savefig(tmp, dpi=DPI, metadata=metadata, format=suffix[1:])
                os.replace(tmp, path)
                paths.append(path)
            plt.close(fig)
    return paths
