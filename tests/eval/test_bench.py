"""`make bench` (scripts/bench.py) end to end on the tiny preset: the report has every column and the targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
import bench  # noqa: E402


def test_bench_reports_every_method_against_none(tmp_path):
    argv = ["--preset", "tiny", "--repeats", "2", "--methods", "fastv,prunevid", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("cpu-tiny-*.json")
    report = json.loads(path.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"none", "fastv", "prunevid"}
    none = rows["none"]
    assert none["tokens_per_layer"] == [4 * 196 + bench.TEXT_BEFORE + bench.TEXT_AFTER] * 4
    for name in ("fastv", "prunevid"):
        r = rows[name]
        assert len(r["ttft_ms_all"]) == 2 and r["ttft_ms"] == pytest.approx(r["pre_llm_ms"] + r["prefill_ms"])
        assert r["flops_ratio"] < 1 and r["speedup"] == pytest.approx(none["ttft_ms"] / r["ttft_ms"])
        assert r["efficiency"] == pytest.approx(r["flops_ratio"] * r["speedup"])
        assert r["pre_llm_pct_of_unpruned_prefill"] == pytest.approx(100 * r["pre_llm_ms"] / none["prefill_ms"])
        assert r["kv_bytes"] < none["kv_bytes"]  # both prune the KV cache of the layers after K
    assert rows["prunevid"]["pre_llm_gflops"] > 0 and rows["fastv"]["pre_llm_gflops"] == 0
    targets = {(t["method"], t["target"]) for t in report["targets"]}
    assert ("fastv", "TTFT ratio <= 1.2 x FLOPs ratio") in targets
    for t in report["targets"]:
        assert t["met"] or "pre-LLM" in t["where"]  # a miss names the stage holding the time
    assert report["meta"]["threads"] >= 1 and report["meta"]["versions"]["torch"]
    assert len(report["meta"]["load_avg_1_5_15_start"]) == 3 and len(report["meta"]["load_avg_1_5_15_end"]) == 3
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().startswith("<!-- generated")


def _tiny_rows(tmp_path, methods: str) -> dict:
    """``make bench --preset tiny --methods <methods>``: its rows by method (``none`` always among them)."""
    argv = ["--preset", "tiny", "--repeats", "1", "--methods", methods, "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("cpu-tiny-*.json")
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"none", *methods.split(",")}
    return rows


def test_bench_includes_the_video_native_methods(tmp_path):
    methods = "visionzip,vidcom2,fastvid,dycoke"
    rows = _tiny_rows(tmp_path, methods)
    for name in methods.split(","):
        r = rows[name]
        assert r["flops_ratio"] < 1 and r["ttft_ms"] > 0, name  # all four shorten the prefill at 0.3
    assert rows["visionzip"]["visual_pre_llm"] == 4 * 59  # keep_count(0.3, 196) per frame


def test_bench_includes_the_in_llm_merging_methods(tmp_path):
    methods = "pdrop,framefusion,holitom"
    rows = _tiny_rows(tmp_path, methods)
    for name in methods.split(","):
        assert rows[name]["flops_ratio"] < 1 and rows[name]["ttft_ms"] > 0, name
    # HoliTom: its own count enters the LLM, the inner merge halves it from layer 3 (tiny_llava_ov_holitom.yaml)
    text = bench.TEXT_BEFORE + bench.TEXT_AFTER
    n = rows["holitom"]["visual_pre_llm"]
    assert rows["holitom"]["tokens_per_layer"] == [n + text] * 3 + [round(n / 2) + text]
