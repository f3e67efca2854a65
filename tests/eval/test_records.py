"""Sample log (incremental, resumable), record aggregation and the summary tables."""

from __future__ import annotations

import json

import pytest

from eval.records import SampleLog, build_record, config_hash, percentile
from eval.tables import COLUMNS, write_tables


def test_sample_log_appends_and_resumes_only_the_same_config(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path, "abc")
    log.append({"task": "t", "doc_id": 0, "prediction": "A", "failed": False})
    log.append({"task": "t", "doc_id": 1, "prediction": "B", "failed": False})
    with path.open("a") as f:
        f.write('{"task": "t", "doc_id": 2, "predic')  # a line cut by a kill
    again = SampleLog(path, "abc")
    assert set(again.done) == {("t", 0), ("t", 1)} and again.get("t", 1)["prediction"] == "B"
    assert SampleLog(path, "other").done == {}  # a changed configuration never reuses stale answers


def test_config_hash_is_stable_and_sensitive():
    a = {"model": {"name": "m"}, "prune": {"ratio": 0.3}}
    assert config_hash(a) == config_hash(json.loads(json.dumps(a)))
    assert config_hash(a) != config_hash({"model": {"name": "m"}, "prune": {"ratio": 0.4}})


def test_percentile():
    assert percentile([], 90) is None
    assert percentile([5.0], 90) == 5.0
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)


def _stats(pre, layers, ttft):
    return {
        "visual_in": 100,
        "visual_pre_llm": pre,
        "visual_per_layer": layers,
        "kv_bytes": 1000,
        "ttft_s": ttft,
        "timings_s": {"vision": 0.1, "prefill": ttft - 0.1, "decode": 0.03},
        "decode_s_per_token": 0.01,
        "peak_mem_bytes": None,
        "rss_peak_bytes": 5_000_000,
    }


def test_record_counts_failures_as_wrong_and_aggregates_tokens():
    samples = [
        {"task": "a", "score": 1.0, "failed": False, "parse_ok": True, "stats": _stats(50, [50, 50, 25, 25], 0.2)},
        {"task": "a", "score": 0.0, "failed": False, "parse_ok": False, "stats": _stats(50, [50, 50, 25, 25], 0.4)},
        {"task": "b", "score": 0.0, "failed": True, "parse_ok": False, "stats": None},
    ]
    f = {"prefill": 1.0, "prefill_full": 4.0, "prefill_exact": 2.0, "prefill_exact_full": 10.0, "scoring": 0.5}
    flops = [{**f, "decode_exact": 3.0}, {**f, "decode_exact": 1.0}]
    rec = build_record(meta={"model": "m"}, samples=samples, llm_shape={"layers": 4}, flops=flops)
    assert rec["n_samples"] == 3 and rec["n_failed"] == 1 and rec["n_parse_failed"] == 1
    assert rec["accuracy"] == pytest.approx(100 / 3)  # the failed sample stays in the denominator
    assert rec["accuracy_by_task"] == {"a": 50.0, "b": 0.0}
    assert rec["pre_llm_retained_pct"] == 50.0 and rec["layer_avg_retained_pct"] == 37.5
    assert rec["flops_ratio"] == 0.25 and rec["ttft_ms_median"] == pytest.approx(300)
    assert rec["flops_ratio_exact"] == 0.2 and rec["decode_exact_tflops"] == pytest.approx(2e-12)
    assert rec["scoring_gflops"] == pytest.approx(0.5e-9) and rec["decode_ms_per_token_median"] == pytest.approx(10)
    assert rec["stage_ms_median"] == {"vision": pytest.approx(100), "prefill": pytest.approx(200), "decode": 30}
    assert rec["peak_memory_kind"] == "process_peak_rss" and rec["peak_memory_bytes"] == 5_000_000


def _write(root, prune, ratio, acc, ttft):
    d = root / "runs" / "m" / "b" / prune / str(ratio)
    d.mkdir(parents=True)
    rec = {c: None for c in COLUMNS} | {
        "model": "m",
        "benchmark": "b",
        "prune": prune,
        "ratio": ratio,
        "accuracy": acc,
        "ttft_ms_median": ttft,
    }
    (d / "record.json").write_text(json.dumps(rec))


def test_tables_pair_each_cell_with_none(tmp_path):
    _write(tmp_path, "none", 1.0, 50.0, 200.0)
    _write(tmp_path, "fastv", 0.3, 45.0, 100.0)
    csv, md = write_tables(tmp_path)
    text = csv.read_text().splitlines()
    assert text[0].split(",")[: len(COLUMNS)] == COLUMNS
    import pandas as pd

    frame = pd.read_csv(csv)
    row = frame[frame.prune == "fastv"].iloc[0]
    assert row.delta_accuracy == -5.0 and row.ttft_speedup == 2.0
    assert "fastv" in md.read_text() and md.read_text().startswith("<!-- generated")


def test_record_carries_the_four_measures_and_the_solved_budget():
    def solved(achieved, reachable, alpha):
        return {
            "knobs": [["ratio", alpha]],
            "budget": 0.3,
            "measure": "final",
            "achieved": achieved,
            "reachable": reachable,
        }

    stats = [_stats(60, [60, 60, 30, 30], 0.2), _stats(50, [50, 50, 28, 28], 0.3)]
    stats[0]["budget"], stats[1]["budget"] = solved(0.30, True, 0.5), solved(0.28, False, 0.56)
    samples = [{"task": "a", "score": 1.0, "failed": False, "parse_ok": True, "stats": st} for st in stats]
    f = {"prefill": 1.0, "prefill_full": 4.0, "prefill_exact": 2.0, "prefill_exact_full": 10.0, "scoring": 0.5}
    meta = {"model": "m", "ratio": None, "budget_target": 0.3, "budget_measure": "final"}
    rec = build_record(meta=meta, samples=samples, llm_shape={"layers": 4}, flops=[{**f, "decode_exact": 1.0}] * 2)
    assert rec["tokens_in_retained_pct"] == pytest.approx(55.0) and rec["final_retained_pct"] == pytest.approx(29.0)
    assert rec["layer_avg_retained_pct"] == pytest.approx((45 + 39) / 2) and rec["flops_ratio"] == pytest.approx(0.25)
    assert rec["budget_target"] == 0.3 and rec["budget_measure"] == "final" and rec["budget_n_unreachable"] == 1
    assert rec["budget_achieved_pct"] == pytest.approx(29.0)
    assert rec["budget_knobs"] == {"ratio": {"median": pytest.approx(0.53), "min": 0.5, "max": 0.56}}
    plain = build_record(
        meta={"model": "m"}, samples=[{**samples[0], "stats": _stats(60, [60] * 4, 0.2)}], llm_shape={}, flops=[]
    )
    assert plain["budget_target"] is None and "budget_knobs" not in plain


def test_a_budget_is_checked_against_the_measured_counts():
    """FrameFusion-like: the solver set its knob by construction (achieved = target), the prefill's counts missed it."""
    entry = {"knobs": [["ratio", 0.3]], "budget": 0.3, "measure": "layer_avg", "achieved": 0.3, "reachable": True}
    on, off = _stats(100, [100, 10, 10, 0], 0.2), _stats(100, [100, 20, 10, 10], 0.2)  # layer averages 0.30, 0.35
    on["budget"], off["budget"] = entry, entry
    samples = [{"task": "a", "score": 1.0, "failed": False, "parse_ok": True, "stats": st} for st in (on, off)]
    meta = {"model": "m", "ratio": None, "budget_target": 0.3, "budget_measure": "layer_avg"}
    rec = build_record(meta=meta, samples=samples, llm_shape={}, flops=[])
    assert rec["budget_achieved_pct"] == pytest.approx(32.5) and rec["budget_n_unreachable"] == 1
    assert rec["budget_achieved_pct"] == pytest.approx(rec["layer_avg_retained_pct"])
