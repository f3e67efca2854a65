"""Experiments: every config composes, paper tables list their missing cells, a tiny sweep fills a table and plots."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from eval.experiments import EXPERIMENTS, Cell, accuracy_interval, build_table, load_experiment, sweep_commands
from eval.runner import REPO, budget_of, compose_config, make_strategy, run_cell
from prune.budget import MEASURES, check_solvable

sys.path.insert(0, str(REPO / "scripts"))
import make_tables  # noqa: E402
import sweep  # noqa: E402

NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
DRIFT = REPO / "tests" / "golden" / "none_tiny_predictions.json"


def test_the_four_tables_exist():
    assert {"prunevid_table1", "prunevid_table2", "hieravid_main", "ratio_sweep", "equal_budget"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_cell_of_every_experiment_composes(name):
    exp = load_experiment(name)
    cells = exp.cells()
    only = dict(exp.only_measures)
    per_grid = 1 + sum(len(r) for _, r in exp.methods)
    per_grid += sum(len(b) for p in exp.budget_methods for m, b in exp.budgets if m in only.get(p, (m,)))
    assert len(cells) == len(exp.models) * len(exp.benchmarks) * per_grid
    for cell in cells:
        knob = [f"budget={cell.budget}", f"budget_measure={cell.measure}"] if cell.budget else [f"ratio={cell.ratio}"]
        cfg = compose_config([f"model={cell.model}", f"benchmark={cell.benchmark}", f"prune={cell.prune}", *knob])
        strategy = make_strategy(cfg)
        assert strategy.name == cell.prune and cfg.model.name == cell.model and cfg.benchmark.name == cell.benchmark
        if cell.budget is not None:
            assert budget_of(cfg) == (cell.budget, cell.measure)
            check_solvable(strategy, cell.measure)  # what the option check refuses before a sweep starts
        elif cell.prune != "none":
            assert strategy.ratio == cell.ratio


def test_paper_tables_say_which_measure_they_report(tmp_path):
    assert load_experiment("prunevid_table1").report_measure == "final"  # PruneVid's "Retained"
    assert load_experiment("hieravid_main").report_measure == "layer_avg"
    equal = load_experiment("equal_budget")
    assert equal.plot_measure == "flops" and {m for m, _ in equal.budgets} == {
        "tokens_in",
        "final",
        "layer_avg",
        "flops",
    }
    assert all(targets == (0.1, 0.2, 0.3) for _, targets in equal.budgets)
    # every strategy on main, at every measure it can be solved for (FrameFusion: its layer average only)
    strategies = {p.stem for p in (REPO / "configs" / "prune").glob("*.yaml")} - {"none"}
    assert set(equal.budget_methods) == strategies
    cells = {(c.prune, c.measure) for c in equal.cells() if c.prune != "none"}
    assert {m for p, m in cells if p == "framefusion"} == {"layer_avg"}
    assert all({m for p, m in cells if p == name} == set(MEASURES) for name in strategies - {"framefusion"})
    main = load_experiment("hieravid_main")
    assert {c.measure for c in main.cells() if c.prune != "none"} == {"layer_avg"}  # equal budget, not equal ratio
    md = build_table(load_experiment("prunevid_table1"), tmp_path)["paths"][0].read_text()
    assert "retained % (final)" in md and "after the last prune" in md


def test_budget_cells_sweep_by_measure_and_restrict(tmp_path):
    exp = load_experiment("equal_budget", {"prune": "fastv,pool", "budget_measure": "final,flops", "budget": "0.2"})
    assert exp.budget_methods == ("fastv", "pool") and exp.budgets == (("final", (0.2,)), ("flops", (0.2,)))
    commands = sweep_commands(exp, tmp_path)
    budgeted = [c for c in commands if "prune=none" not in c]
    assert len(budgeted) == 4 and all(
        "budget=0.2" in c and not any(a.startswith("ratio=") for a in c) for c in budgeted
    )
    assert {a for c in budgeted for a in c if a.startswith("budget_measure=")} == {
        "budget_measure=final",
        "budget_measure=flops",
    }
    cell = Cell("m", "b", "fastv", None, 0.2, "flops")
    assert cell.record(tmp_path).parent.name == "flops-0.2"
    assert cell.command() == "make eval model=m benchmark=b prune=fastv budget=0.2 budget_measure=flops"
    with pytest.raises(ValueError, match="budget_measure must be one of"):
        load_experiment("equal_budget", {"budget_measure": "retained"})


@pytest.mark.parametrize("name", ["prunevid_table1", "prunevid_table2", "hieravid_main"])
def test_paper_tables_list_their_missing_cells_with_commands(name, tmp_path):
    exp = load_experiment(name)
    out = build_table(exp, tmp_path)
    assert set(out["missing"]) == set(exp.cells()) and len(out["missing"]) == len(exp.cells())
    md = (tmp_path / "tables" / f"{name}.md").read_text()
    assert f"## Missing cells ({len(exp.cells())})" in md
    assert all(f"`{c.command()}`" in md for c in exp.cells())
    assert (tmp_path / "tables" / f"{name}.tex").read_text().count("\\\\") == 1 + len(out["frame"])
    if exp.published:  # published numbers are shown even before we have ours
        assert "[pub " in md


def test_prunevid_table1_shows_the_published_pllava_numbers(tmp_path):
    frame = build_table(load_experiment("prunevid_table1"), tmp_path)["frame"]
    row = frame[(frame.model == "pllava") & (frame.prune == "prunevid")].iloc[0]
    assert row.mvbench_published == 47.6 and row.ratio == 0.4
    none = frame[(frame.model == "st_llm") & (frame.prune == "none")].iloc[0]
    assert none.mvbench_published == 54.9


def test_restrict_and_bad_input():
    exp = load_experiment("ratio_sweep", {"model": "tiny_llava_video", "prune": "fastv", "ratio": "0.2,0.4"})
    assert exp.models == ("tiny_llava_video",) and exp.methods == (("fastv", (0.2, 0.4)),)
    with pytest.raises(ValueError, match="no experiment 'nope'; available"):
        load_experiment("nope")
    with pytest.raises(ValueError, match="can only restrict"):
        load_experiment("ratio_sweep", {"seed": "1"})
    assert sweep.main(["nope"]) == 2


def test_sweep_commands_cover_only_missing_cells(tmp_path):
    exp = load_experiment("prunevid_table2")
    done = Cell("pllava", "mvbench", "fastv", 0.3).record(tmp_path)
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    commands = sweep_commands(exp, tmp_path, ["limit=5"], launcher="slurm")
    assert [c[2] for c in commands] == ["prune=none", "prune=prunevid"]
    assert all("limit=5" in c and "hydra/launcher=slurm" in c for c in commands)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def test_tiny_sweep_then_tables_has_no_missing_cell_and_both_plots(tmp_path, offline):
    """`make sweep exp=ratio_sweep model=tiny_llava_ov` then `make tables exp=ratio_sweep`, on a cut-down grid."""
    results = tmp_path / "results"
    grid = ["model=tiny_llava_ov", "prune=random", "ratio=0.3,0.5"]
    assert sweep.main(["ratio_sweep", *grid, "limit=1", "max_new_tokens=1", "--results", str(results)]) == 0
    # a re-run finds nothing to do
    assert sweep_commands(load_experiment("ratio_sweep", dict(g.split("=") for g in grid)), results) == []
    assert make_tables.main(["--exp", "ratio_sweep", "--results", str(results), "--n-boot", "200", *grid]) == 0
    tables = results / "tables"
    frame = pd.read_csv(tables / "ratio_sweep.csv")
    assert list(frame.prune) == ["none", "random", "random"] and list(frame.ratio) == [1.0, 0.3, 0.5]
    assert frame.tiny.notna().all() and frame.tiny_ci_low.notna().sum() == 2 and frame.ttft_speedup.notna().all()
    assert frame.retained_pct.tolist()[1:] == pytest.approx([30.0, 50.0], abs=0.5)
    assert "Missing cells" not in (tables / "ratio_sweep.md").read_text()
    for stem in ("ratio_sweep_accuracy", "ratio_sweep_ttft_speedup"):
        assert (tables / f"{stem}.png").stat().st_size > 1000 and (tables / f"{stem}.svg").exists()
    assert all((results / r).exists() for r in ";".join(frame.records).split(";"))


def test_equal_budget_sweep_then_tables_plots_on_the_achieved_budget(tmp_path, offline):
    """`make sweep exp=equal_budget` then `make tables exp=equal_budget`, cut down to two methods and two targets."""
    results = tmp_path / "results"
    grid = ["prune=random,fastv", "budget_measure=final", "budget=0.2,0.3"]
    assert sweep.main(["equal_budget", *grid, "limit=1", "max_new_tokens=1", "--results", str(results)]) == 0
    assert make_tables.main(["--exp", "equal_budget", "--results", str(results), "--n-boot", "100", *grid]) == 0
    tables = results / "tables"
    frame = pd.read_csv(tables / "equal_budget.csv")
    assert list(frame.prune) == ["none", "random", "random", "fastv", "fastv"]
    assert frame.budget_measure.tolist()[1:] == ["final"] * 4 and frame.ratio.isna().tolist()[1:] == [True] * 4
    assert frame.final_retained_pct.tolist()[1:] == pytest.approx([20, 30, 20, 30], rel=0.02)
    for column in ("tokens_in_retained_pct", "layer_avg_retained_pct", "flops_ratio"):
        assert frame[column].notna().all(), column
    assert frame.tokens_in_retained_pct.tolist()[3:] == [100.0, 100.0]  # FastV prunes inside the LLM
    svg = (tables / "equal_budget_accuracy.svg").read_text()
    assert "achieved prefill FLOPs ratio vs none" in svg and "fastv (final 20–30 %)" in svg
    assert "Missing cells" not in (tables / "equal_budget.md").read_text()


def test_none_predictions_on_the_tiny_bundle_do_not_drift(tmp_path, offline):
    """Baseline drift guard: the unpruned tiny model's answers are stored; any change to them is a visible event.

    Regenerate on purpose (after a deliberate change of the tiny model, prompt or decoding) with
    ``VIDPRUNE_UPDATE_DRIFT=1 make test PYTEST_ARGS="-k drift"`` and commit the file with the reason.
    """
    cfg = compose_config(
        [
            "model=tiny_llava_ov",
            "benchmark=tiny",
            "prune=none",
            f"results_dir={tmp_path}",
            "limit=2",
            "max_new_tokens=4",
            "paired_baseline=false",
        ]
    )
    from eval.runner import _prepare_tasks

    tasks, include = _prepare_tasks(cfg)
    run_dir = Path(run_cell(cfg, tasks, include)["_path"]).parent
    rows = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    got = {f"{r['task']}/{r['doc_id']}": r["prediction"] for r in rows}
    assert len(got) == 9 and not any(r["failed"] for r in rows)
    if os.environ.get("VIDPRUNE_UPDATE_DRIFT") == "1":
        DRIFT.write_text(json.dumps(got, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    stored = json.loads(DRIFT.read_text())
    changed = sorted(k for k in stored.keys() | got.keys() if stored.get(k) != got.get(k))
    assert not changed, f"none's predictions on the tiny bundle changed for {changed}: baseline drift"


def test_sweep_takes_results_dir_like_make_eval(tmp_path, capsys):
    done = Cell("pllava", "mvbench", "none", 1.0).record(tmp_path)
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    assert sweep.main(["prunevid_table2", f"results_dir={tmp_path}", "limit=2", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep]")]
    assert len(lines) == 2 and "prune=none" not in "".join(lines)  # the none cell counts as done under tmp_path
    assert all(line.count("results_dir=") == 1 and f"results_dir={tmp_path}" in line for line in lines)


def test_sweep_cells_wait_for_a_locked_cell_unless_told_otherwise(tmp_path, capsys):
    """Two sweeps side by side meet on the shared none cell's lock: the cells wait for it by default."""
    for given, expected in ((None, f"lock_wait={sweep.LOCK_WAIT_S}"), ("lock_wait=0", "lock_wait=0")):
        extra = [given] if given else []
        assert sweep.main(["prunevid_table2", f"results_dir={tmp_path}", "limit=2", *extra, "--dry-run"]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep]")]
        assert lines and all(line.count("lock_wait=") == 1 and expected in line for line in lines), lines


def test_accuracy_bars_are_the_paired_interval_on_the_cell_and_stay_within_0_and_100():
    # pruned 90 %, none 95 % (Δ −5), Δ interval [−12, +8]: bars from 83 to 103, cut at 100
    assert accuracy_interval(90.0, -5.0, -12.0, 8.0) == (83.0, 100.0)
    assert accuracy_interval(10.0, 5.0, -9.0, 2.0) == (0.0, 7.0)  # none 5 %: 5 − 9 < 0 is cut at 0
    assert accuracy_interval(60.0, 0.0, -3.0, 4.0) == (57.0, 64.0)  # inside the range: untouched


def test_probe_sweep_runs_every_strategy_at_the_issue_ratios():
    """Issue 12: the probe sweep covers every strategy of configs/prune at 5, 10, 20, 30 and 50 %."""
    probe = load_experiment("probe_sweep")
    strategies = {p.stem for p in (REPO / "configs" / "prune").glob("*.yaml")} - {"none"}
    ratios = {}
    for cell in probe.cells():
        if cell.prune != "none":
            ratios.setdefault(cell.prune, set()).add(cell.ratio)
    assert set(ratios) == strategies
    assert all(r == {0.05, 0.1, 0.2, 0.3, 0.5} for r in ratios.values()), ratios
