"""Experiments: one ``configs/experiment/<name>.yaml`` per paper table or sweep; multirun sweeps; tables from records.

An experiment names the cells of a table: ``models`` x ``benchmarks`` x (``methods``: prune -> ratios), plus the
``none`` cell of every model x benchmark (the paired baseline). ``make sweep exp=<name>`` runs the cells that have no
record yet (:func:`sweep_commands`: one Hydra ``--multirun`` per method, so each method keeps its own ratios);
``make tables exp=<name>`` rebuilds the table from the records (:func:`build_table`): Markdown, CSV and LaTeX in the
paper's layout, the paired bootstrap CI of Δaccuracy for every pruned cell, the published numbers beside ours with
the difference, the sweep plots when a method has several ratios, and the list of cells still missing with the command
that fills each. Nothing in a table is typed by hand: every cell links back to a ``record.json``.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from eval.records import knob_folder, write_atomic

__all__ = [
    "Cell",
    "Experiment",
    "accuracy_interval",
    "build_table",
    "load_experiment",
    "split_overrides",
    "sweep_commands",
]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiment"
GRID = ("model", "benchmark", "prune", "ratio", "budget", "budget_measure")
KEYS = {
    "name",
    "title",
    "models",
    "benchmarks",
    "methods",
    "budget_methods",
    "only_measures",
    "budgets",
    "report_measure",
    "plot_measure",
    "published",
    "published_names",
    "overrides",
}
# The four budget measures (prune/budget.py) and the record column that holds each.
MEASURE_COLUMNS = {
    "tokens_in": "tokens_in_retained_pct",
    "final": "final_retained_pct",
    "layer_avg": "layer_avg_retained_pct",
    "flops": "flops_ratio",
}
MEASURE_NAMES = {
    "tokens_in": "visual tokens entering the LLM",
    "final": "visual tokens after the last prune",
    "layer_avg": "layer-averaged visual tokens",
    "flops": "prefill FLOPs ratio vs none",
}


@dataclass(frozen=True)
class Cell:
    """One evaluation: a model x benchmark x method at a ratio, or at a target achieved budget; where its record lives.

    A budget cell (``budget`` and ``measure`` set) runs ``budget=<budget> budget_measure=<measure>``: the method's
    knobs are solved per sample (prune/budget.py) and ``ratio`` is unused.
    """

    model: str
    benchmark: str
    prune: str
    ratio: float | None
    budget: float | None = None
    measure: str | None = None

    @property
    def ratio_dir(self) -> str:
        """The runner's folder name: the ratio, ``<measure>-<budget>``, or ``1.0`` for ``none``."""
        return knob_folder(self.prune, self.ratio, self.budget, self.measure)

    @property
    def knob(self) -> str:
        """The nominal setting as a label: ``0.3`` or ``flops 30 %``."""
        if self.prune == "none":
            return ""
        return f"{self.measure} {100 * self.budget:g} %" if self.budget is not None else f"{self.ratio:g}"

    def record(self, results_dir: Path) -> Path:
        """``<results>/runs/<model>/<benchmark>/<prune>/<ratio or measure-budget>/record.json``."""
        return Path(results_dir) / "runs" / self.model / self.benchmark / self.prune / self.ratio_dir / "record.json"

    def command(self) -> str:
        """The ``make eval`` that fills this cell."""
        knob = (
            f"budget={self.budget:g} budget_measure={self.measure}"
            if self.budget is not None
            else f"ratio={self.ratio:g}"
        )
        return f"make eval model={self.model} benchmark={self.benchmark} prune={self.prune} {knob}"


@dataclass(frozen=True)
class Experiment:
    """A parsed ``configs/experiment/<name>.yaml`` (see ``configs/experiment/ratio_sweep.yaml`` for the fields)."""

    name: str
    title: str
    models: tuple[str, ...]
    benchmarks: tuple[str, ...]
    methods: tuple[tuple[str, tuple[float, ...]], ...]
    published: str | None = None
    published_names: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    overrides: tuple[str, ...] = ()
    budget_methods: tuple[str, ...] = ()
    budgets: tuple[tuple[str, tuple[float, ...]], ...] = ()
    only_measures: tuple[tuple[str, tuple[str, ...]], ...] = ()  # method -> the only measures it can be solved for
    report_measure: str = "layer_avg"
    plot_measure: str = "flops"

    def cells(self) -> list[Cell]:
        """Every cell: ``none`` per model x benchmark, each method at each ratio, each budget method at each target."""
        out = []
        for model in self.models:
            for bench in self.benchmarks:
                out.append(Cell(model, bench, "none", 1.0))
                out += [Cell(model, bench, p, r) for p, ratios in self.methods for r in ratios]
                only = dict(self.only_measures)
                out += [
                    Cell(model, bench, p, None, b, m)
                    for p in self.budget_methods
                    for m, targets in self.budgets
                    if m in only.get(p, (m,))
                    for b in targets
                ]
        return out

    def name_map(self, kind: str) -> dict[str, str]:
        """Our ``model``/``benchmark`` names -> the published table's."""
        return dict(dict(self.published_names).get(kind, ()))


def _as_list(value: Any, what: str, name: str) -> list:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"experiment {name!r}: {what} must be a non-empty list, got {value!r}")
    return list(value)


def load_experiment(name: str, restrict: dict[str, str] | None = None) -> Experiment:
    """Read ``configs/experiment/<name>.yaml``, optionally with a narrowed grid.

    Args:
        name: the file name without ``.yaml``.
        restrict: ``model``/``benchmark``/``prune``/``ratio`` from the command line (comma-separated) replace the
            experiment's lists, e.g. ``{"model": "tiny_llava_ov"}``.

    Raises:
        ValueError: unknown experiment (the message lists the available ones), unknown keys or malformed fields.
    """
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
        raise ValueError(f"no experiment {name!r}; available: {available} (configs/experiment/)")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(raw) - KEYS
    if unknown:
        raise ValueError(f"experiment {name!r}: unknown keys {sorted(unknown)}; accepted: {sorted(KEYS)}")
    from prune.budget import check_measure

    models = _as_list(raw.get("models"), "models", name)
    benchmarks = _as_list(raw.get("benchmarks"), "benchmarks", name)
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict):
        raise ValueError(f"experiment {name!r}: methods must map prune -> list of ratios, got {methods!r}")
    methods = {p: [float(r) for r in _as_list(rs, f"methods.{p}", name)] for p, rs in methods.items() if p != "none"}
    budget_methods = [p for p in (raw.get("budget_methods") or []) if p != "none"]
    budgets = raw.get("budgets") or {}
    if not isinstance(budgets, dict) or bool(budgets) != bool(budget_methods):
        raise ValueError(
            f"experiment {name!r}: budget_methods (a list of prune options) and budgets (measure -> list of targets) "
            f"go together; got budget_methods={budget_methods!r}, budgets={budgets!r}"
        )
    try:
        budgets = {
            check_measure(m): [float(b) for b in _as_list(bs, f"budgets.{m}", name)] for m, bs in budgets.items()
        }
        report, plot = (
            check_measure(raw.get(k, d)) for k, d in (("report_measure", "layer_avg"), ("plot_measure", "flops"))
        )
        only = raw.get("only_measures") or {}
        if not isinstance(only, dict):
            raise ValueError(f"only_measures must map prune -> list of measures, got {only!r}")
        only = {p: [check_measure(m) for m in _as_list(ms, f"only_measures.{p}", name)] for p, ms in only.items()}
    except ValueError as err:
        raise ValueError(f"experiment {name!r}: {err}") from None
    restrict = dict(restrict or {})
    if "model" in restrict:
        models = restrict.pop("model").split(",")
    if "benchmark" in restrict:
        benchmarks = restrict.pop("benchmark").split(",")
    if "prune" in restrict:
        wanted = [p for p in restrict.pop("prune").split(",") if p != "none"]
        if budget_methods and not methods:  # an equal-budget experiment stays one
            budget_methods = wanted
        else:
            methods = {p: methods.get(p, [0.3]) for p in wanted}
            budget_methods = [p for p in budget_methods if p in wanted]
    if "ratio" in restrict:
        ratios = [float(r) for r in restrict.pop("ratio").split(",")]
        methods = {p: ratios for p in methods}
    if "budget_measure" in restrict:
        keep = [check_measure(m) for m in restrict.pop("budget_measure").split(",")]
        budgets = {m: budgets.get(m, [0.3]) for m in keep}
    if "budget" in restrict:
        targets = [float(b) for b in restrict.pop("budget").split(",")]
        budgets = {m: targets for m in budgets}
    if restrict:
        raise ValueError(f"can only restrict {', '.join(GRID)}; got {sorted(restrict)}")
    names = raw.get("published_names") or {}
    return Experiment(
        name=raw.get("name", name),
        title=raw.get("title", name),
        models=tuple(models),
        benchmarks=tuple(benchmarks),
        methods=tuple((p, tuple(rs)) for p, rs in methods.items()),
        published=raw.get("published"),
        published_names=tuple((k, tuple(v.items())) for k, v in names.items()),
        overrides=tuple(raw.get("overrides") or ()),
        budget_methods=tuple(budget_methods),
        budgets=tuple((m, tuple(bs)) for m, bs in budgets.items()),
        only_measures=tuple((p, tuple(ms)) for p, ms in only.items()),
        report_measure=report,
        plot_measure=plot,
    )


def split_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str], Path | None]:
    """Command-line ``key=value`` overrides of ``make sweep``/``make tables``, sorted by role.

    Returns:
        The grid restrictions (``model``/``benchmark``/``prune``/``ratio``, for :func:`load_experiment`), the other
        overrides (passed on to every cell), and ``results_dir`` when given (it decides which records exist).
    """
    restrict, extra, results = {}, [], None
    for override in overrides:
        key, _, value = override.partition("=")
        if key in GRID:
            restrict[key] = value
        elif key == "results_dir":
            results = Path(value)
        else:
            extra.append(override)
    return restrict, extra, results


def sweep_commands(exp: Experiment, results_dir: Path, extra: Sequence[str] = (), launcher: str | None = None):
    """Hydra multirun argument lists for the cells with no record (one per method; ``none`` comes paired).

    Returns:
        ``[[override, ...], ...]`` for ``scripts/run_eval.py --multirun``; empty when every cell has a record.
    """
    missing = [c for c in exp.cells() if not c.record(results_dir).exists()]
    commands = []
    # one multirun per method and kind of knob (ratio cells; budget cells of one measure)
    for prune, measure in dict.fromkeys((c.prune, c.measure) for c in missing):
        cells = [c for c in missing if c.prune == prune and c.measure == measure]
        if measure is None:
            knob = ["ratio=" + ",".join(dict.fromkeys(f"{c.ratio:g}" for c in cells))]
        else:
            knob = ["budget=" + ",".join(dict.fromkeys(f"{c.budget:g}" for c in cells)), f"budget_measure={measure}"]
        args = [
            "model=" + ",".join(dict.fromkeys(c.model for c in cells)),
            "benchmark=" + ",".join(dict.fromkeys(c.benchmark for c in cells)),
            f"prune={prune}",
            *knob,
            f"results_dir={results_dir}",
            *exp.overrides,
            *extra,
        ]
        if launcher:
            args.append(f"hydra/launcher={launcher}")
        commands.append(args)
    return commands


# -- tables ----------------------------------------------------------------------------------------------------------


def _load(cell: Cell, results_dir: Path) -> dict | None:
    path = cell.record(results_dir)
    return json.loads(path.read_text()) if path.exists() else None


def _published(exp: Experiment) -> pd.DataFrame | None:
    if not exp.published:
        return None
    from eval.stats import load_published

    frame = load_published(exp.published)
    return frame[frame.metric == "accuracy"]


def _pub_value(pub: pd.DataFrame | None, exp: Experiment, cell: Cell) -> float | None:
    if pub is None:
        return None
    model = exp.name_map("model").get(cell.model)
    bench = exp.name_map("benchmark").get(cell.benchmark)
    rows = pub[(pub.backbone == model) & (pub.method == cell.prune) & (pub.benchmark == bench)]
    return float(rows.value.iloc[0]) if len(rows) else None


def table_frame(exp: Experiment, results_dir: Path, n_boot: int = 2000) -> tuple[pd.DataFrame, list[Cell]]:
    """One row per (model, method, ratio or budget) with the paper's columns, and the cells that have no record.

    Columns: ``model``, ``prune``, ``ratio``, ``budget_target``/``budget_measure`` (budget cells), ``knob`` (the
    nominal setting as a label), ``retained_pct`` (the experiment's ``report_measure``, in %), the four achieved
    budgets ``tokens_in_retained_pct``, ``final_retained_pct``, ``layer_avg_retained_pct``, ``flops_ratio`` (means over
    benchmarks), per benchmark ``<b>`` (accuracy), ``<b>_delta``, ``<b>_ci_low``/``<b>_ci_high`` (paired bootstrap
    of Δ vs none, 95 %), ``<b>_published`` and ``<b>_vs_published``, ``<b>_evidence_final_pct`` (known-answer probe:
    evidence tokens reaching the last layer, else empty), ``<b>_ttft_speedup`` with ``<b>_ttft_ci_low``/``_high``,
    then ``ttft_speedup`` (the median of the row's paired per-sample TTFT ratios over its benchmarks) with
    ``ttft_ci_low``/``_high`` (bootstrap 95 %) and ``ttft_note`` (``n.s.`` when the CI includes 1, ``unpaired`` for a
    ratio of medians without a CI),
    ``peak_memory_gib`` (largest) and ``records`` (the record files behind the row).
    """
    from eval.stats import compare_runs, ratio_ci

    results_dir = Path(results_dir)
    pub = _published(exp)
    missing, rows = [], []
    cells = exp.cells()
    for model in exp.models:
        keys = dict.fromkeys((c.prune, c.ratio, c.budget, c.measure) for c in cells if c.model == model)
        for prune, ratio, budget, measure in keys:
            row: dict[str, Any] = {"model": model, "prune": prune, "ratio": ratio}
            row |= {"budget_target": budget, "budget_measure": measure}
            row["knob"] = Cell(model, "", prune, ratio, budget, measure).knob
            achieved: dict[str, list] = {column: [] for column in MEASURE_COLUMNS.values()}
            memory, records = [], []
            ratios, unpaired = [], []
            for bench in exp.benchmarks:
                cell, base = Cell(model, bench, prune, ratio, budget, measure), Cell(model, bench, "none", 1.0)
                rec = _load(cell, results_dir)
                published = _pub_value(pub, exp, cell)
                row[f"{bench}_published"] = published
                if rec is None:
                    missing.append(cell)
                    continue
                records.append(str(cell.record(results_dir).relative_to(results_dir)))
                row[bench] = rec["accuracy"]
                row[f"{bench}_evidence_final_pct"] = rec.get("evidence_final_pct")  # probe only, else None
                if published is not None and rec["accuracy"] is not None:
                    row[f"{bench}_vs_published"] = rec["accuracy"] - published
                for column in achieved:
                    # records before the four measures: tokens_in was pre_llm_retained_pct, final was not kept
                    achieved[column].append(
                        rec.get(column, rec.get("pre_llm_retained_pct") if "tokens_in" in column else None)
                    )
                memory.append(rec.get("peak_memory_bytes"))
                ref = _load(base, results_dir)
                if prune != "none" and ref is not None:
                    folders = cell.record(results_dir).parent, base.record(results_dir).parent
                    delta = compare_runs(*folders, n_boot=n_boot)
                    row[f"{bench}_delta"], row[f"{bench}_ci_low"], row[f"{bench}_ci_high"] = (
                        delta.delta,
                        delta.low,
                        delta.high,
                    )
                    bench_ratios = _ttft_ratios(folders[0])
                    if bench_ratios:  # paired: per-sample none/pruned TTFT, timed back-to-back
                        ratios += bench_ratios
                        ci = ratio_ci(bench_ratios, n_boot=n_boot)
                        row[f"{bench}_ttft_speedup"] = ci["median"]
                        row[f"{bench}_ttft_ci_low"], row[f"{bench}_ttft_ci_high"] = ci["low"], ci["high"]
                    elif rec.get("ttft_ms_median") and ref.get("ttft_ms_median"):  # separate runs: no CI
                        unpaired.append(ref["ttft_ms_median"] / rec["ttft_ms_median"])
                        row[f"{bench}_ttft_speedup"] = unpaired[-1]
                elif prune == "none":
                    row[f"{bench}_ttft_speedup"] = 1.0
            for column, values in achieved.items():
                vals = [v for v in values if v is not None]
                row[column] = sum(vals) / len(vals) if vals else None
            shown = row[MEASURE_COLUMNS[exp.report_measure]]
            row["retained_pct"] = None if shown is None else shown * (100 if exp.report_measure == "flops" else 1)
            if prune == "none":
                row["ttft_speedup"], row["ttft_note"] = (1.0, "") if records else (None, "")
            elif ratios and not unpaired:  # the row pools every benchmark's paired ratios
                ci = ratio_ci(ratios, n_boot=n_boot)
                row["ttft_speedup"], row["ttft_ci_low"], row["ttft_ci_high"] = ci["median"], ci["low"], ci["high"]
                row["ttft_note"] = "" if ci["significant"] else "n.s."
            elif ratios or unpaired:  # some benchmark was timed in separate runs: no CI for the row
                row["ttft_speedup"] = float(pd.Series([*unpaired, *ratios]).median())
                row["ttft_note"] = "unpaired"
            else:
                row["ttft_speedup"], row["ttft_note"] = None, ""
            vals = [v for v in memory if v is not None]
            row["peak_memory_gib"] = max(vals) / 2**30 if vals else None
            row["records"] = ";".join(records)
            rows.append(row)
    columns = ["model", "prune", "ratio", "budget_target", "budget_measure", "knob", "retained_pct"]
    columns += list(MEASURE_COLUMNS.values())
    for bench in exp.benchmarks:
        columns += [bench, f"{bench}_delta", f"{bench}_ci_low", f"{bench}_ci_high"]
        columns += [f"{bench}_published", f"{bench}_vs_published", f"{bench}_ttft_speedup"]
        columns += [f"{bench}_evidence_final_pct", f"{bench}_ttft_ci_low", f"{bench}_ttft_ci_high"]
    columns += ["ttft_speedup", "ttft_ci_low", "ttft_ci_high", "ttft_note", "peak_memory_gib", "records"]
    return pd.DataFrame(rows).reindex(columns=columns), missing


def _ttft_ratios(run_dir: Path) -> list[float]:
    """The per-sample paired TTFT ratios (none / pruned) a cell's ``scores.jsonl`` holds; empty when unpaired."""
    path = Path(run_dir) / "scores.jsonl"
    if not path.is_file():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [float(r["ttft_ratio"]) for r in rows if r.get("ttft_ratio")]


def _ttft_cell(row: pd.Series, latex: bool = False) -> str:
    """``1.71 [0.76, 2.43] n.s.``: the speed-up, its paired bootstrap CI and whether it is significant."""
    text = _num(row.ttft_speedup, ".2f")
    if text and not pd.isna(row.get("ttft_ci_low")):
        text += f" [{row.ttft_ci_low:.2f}, {row.ttft_ci_high:.2f}]"
    note = row.get("ttft_note")
    if text and isinstance(note, str) and note:
        text += f" {note}"
    return text


def _num(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def _acc_cell(row: pd.Series, bench: str, latex: bool = False) -> str:
    acc = row.get(bench)
    text = _num(acc, ".1f") or ("--" if latex else "–")
    if row.prune != "none" and not pd.isna(row.get(f"{bench}_delta")):
        pm = "$\\pm$" if latex else "±"
        half = (row[f"{bench}_ci_high"] - row[f"{bench}_ci_low"]) / 2
        text += f" ({row[f'{bench}_delta']:+.1f} {pm}{half:.1f})"
    pub = row.get(f"{bench}_published")
    if pub is not None and not pd.isna(pub):
        diff = row.get(f"{bench}_vs_published")
        text += f" [pub {pub:.1f}" + ("" if diff is None or pd.isna(diff) else f", {diff:+.1f}") + "]"
    return text


def _display_rows(exp: Experiment, frame: pd.DataFrame, latex: bool = False) -> tuple[list[str], list[list[str]]]:
    header = ["backbone", "method", f"retained % ({exp.report_measure})", "FLOPs ×", *exp.benchmarks]
    header += ["TTFT ×", "memory GiB"]
    body = []
    for _, row in frame.iterrows():
        method = "none" if row.prune == "none" else f"{row.prune} ({row.knob})"
        body.append(
            [
                row.model,
                method,
                _num(row.retained_pct, ".1f"),
                _num(row.flops_ratio, ".3f"),
                *[_acc_cell(row, b, latex) for b in exp.benchmarks],
                _ttft_cell(row, latex),
                _num(row.peak_memory_gib, ".2f"),
            ]
        )
    return header, body


def _latex(exp: Experiment, frame: pd.DataFrame) -> str:
    header, body = _display_rows(exp, frame, latex=True)

    def esc(text: str) -> str:
        return text.replace("_", "\\_").replace("%", "\\%").replace("×", "$\\times$")

    lines = [
        f"% generated by `make tables exp={exp.name}` from results/runs/**/record.json; do not edit",
        "\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}",
        "\\toprule",
        " & ".join(esc(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(esc(c) if "$" not in c else c.replace("_", "\\_") for c in cells) + " \\\\" for cells in body]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def build_table(exp: Experiment, results_dir: Path, n_boot: int = 2000) -> dict[str, Any]:
    """Write ``<results>/tables/<exp>.{md,csv,tex}`` (and the sweep plots) from the records.

    Returns:
        ``{"paths": [...], "missing": [Cell, ...], "frame": DataFrame}``.
    """
    results_dir = Path(results_dir)
    frame, missing = table_frame(exp, results_dir, n_boot)
    out = results_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    csv, md, tex = (out / f"{exp.name}.{ext}" for ext in ("csv", "md", "tex"))
    write_atomic(csv, frame.to_csv(index=False))
    header, body = _display_rows(exp, frame)
    lines = [
        f"<!-- generated by `make tables exp={exp.name}` from results/runs/**/record.json; do not edit -->",
        f"# {exp.title}",
        "",
        "Accuracy in %; (Δ vs none ± half-width of the paired bootstrap 95 % CI over the same samples); "
        f"[pub: the published number, ours − published]. Retained % ({exp.report_measure}) is the achieved "
        f"{MEASURE_NAMES[exp.report_measure]} (the measure this table's paper reports; the CSV has all four); "
        "FLOPs × the prefill FLOPs ratio (FastV convention); TTFT × the speed-up over none: the median of per-sample "
        "TTFT ratios, none and the method timed back-to-back in one process, [bootstrap 95 % CI]; n.s. = the CI "
        "includes 1.0 (not a significant speed-up on these samples); unpaired = a ratio of medians from separate "
        "runs, no CI. Clean speed-up claims come from `make bench`. A method label gives its nominal setting: its "
        "own ratio, or a target budget (`measure N %`) its knobs were solved for per sample.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if exp.published:
        lines += ["", f"Published numbers: results/published/{exp.published}.csv (sources in its `source` column)."]
    if missing:
        lines += ["", f"## Missing cells ({len(missing)})", "", f"All at once: `make sweep exp={exp.name}`.", ""]
        lines += [f"- `{c.command()}`" for c in missing]
    write_atomic(md, "\n".join(lines) + "\n")
    write_atomic(tex, _latex(exp, frame))
    paths = [md, csv, tex]
    if any(len(rs) > 1 for _, rs in exp.methods) or any(len(bs) > 1 for _, bs in exp.budgets) or len(exp.budgets) > 1:
        paths += _plots(exp, frame, out)
    return {"paths": paths, "missing": missing, "frame": frame}


def _knob_range(rows: pd.DataFrame) -> str:
    """A method's nominal settings in a sweep, for its legend entry: ``ratio 0.1–0.5``, ``flops 10–30 %``."""
    parts = []
    ratios = sorted(r for r in rows.ratio.dropna().unique())
    if ratios:
        parts.append("ratio " + (f"{ratios[0]:g}" if len(ratios) == 1 else f"{ratios[0]:g}–{ratios[-1]:g}"))
    for measure, group in rows.dropna(subset=["budget_measure"]).groupby("budget_measure", sort=True):
        bs = sorted(100 * group.budget_target.unique())
        parts.append(f"{measure} " + (f"{bs[0]:g}" if len(bs) == 1 else f"{bs[0]:g}–{bs[-1]:g}") + " %")
    return ", ".join(parts)


def accuracy_interval(accuracy: float, delta: float, low: float, high: float) -> tuple[float, float]:
    """The paired Δ interval ``[low, high]`` (pruned − ``none``, points) shifted onto the pruned cell's accuracy.

    ``none``'s accuracy is ``accuracy - delta``; the bounds are cut to [0, 100], where an accuracy lies (a wide
    bootstrap interval on few samples would otherwise draw bars above 100 %).
    """
    base = accuracy - delta
    return max(0.0, base + low), min(100.0, base + high)


def _plots(exp: Experiment, frame: pd.DataFrame, out: Path, x: str | None = None) -> list[Path]:
    """Accuracy and speed-up against the achieved budget (``x``, default the experiment's ``plot_measure``)."""
    from eval.plots import plot_sweep

    x = x or exp.plot_measure
    column = MEASURE_COLUMNS[x]
    done = frame[(frame.prune != "none") & frame[list(exp.benchmarks)].notna().any(axis=1)]  # cells with a record
    legend = {p: f"{p} ({_knob_range(rows)})" for p, rows in done.groupby("prune")}
    rows = []
    for _, row in frame.iterrows():
        for bench in exp.benchmarks:
            acc = row.get(bench)
            if acc is None or pd.isna(acc):
                continue
            entry = {"model": row.model, "benchmark": bench, "prune": row.prune, "ratio": row.ratio, "accuracy": acc}
            # the achieved budget of this cell (mean over benchmarks; the runs of one cell share their settings)
            entry[column] = row.get(column)
            entry["legend"] = legend.get(row.prune, row.prune)
            entry["ttft_speedup"] = row.get(f"{bench}_ttft_speedup")
            entry["evidence_final_pct"] = row.get(f"{bench}_evidence_final_pct")
            entry["ttft_ci_low"] = row.get(f"{bench}_ttft_ci_low")
            entry["ttft_ci_high"] = row.get(f"{bench}_ttft_ci_high")
            low = row.get(f"{bench}_ci_low")
            if row.prune != "none" and low is not None and not pd.isna(low):  # CI of Δ, shifted to accuracy units
                entry["ci_low"], entry["ci_high"] = accuracy_interval(
                    acc, row[f"{bench}_delta"], low, row[f"{bench}_ci_high"]
                )
            else:
                entry["ci_low"] = entry["ci_high"] = acc
            rows.append(entry)
    if not rows:
        return []
    return plot_sweep(pd.DataFrame(rows), out, exp.name, x=column)


def shell(args: Sequence[str]) -> str:
    """A copy-pasteable command line."""
    return " ".join(shlex.quote(a) for a in args)
