"""The eval spine end to end on the tiny bundle: records, pairing, per-sample failures, resume, fail-fast errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval.options import OptionError
from eval.runner import REPO, compose_config, run, run_cell

sys.path.insert(0, str(REPO / "scripts"))
from make_tiny_bench import write_corrupt_mp4, write_mp4, write_zero_frame_mp4  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny_bench"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_bench.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def _cfg(data_dir, results, *extra):
    return compose_config(
        [
            "model=tiny_llava_ov",
            "benchmark=tiny",
            f"benchmark.data_dir={data_dir}",
            "benchmark.build=false",
            f"results_dir={results}",
            "limit=1",
            "max_new_tokens=4",
            *extra,
        ]
    )


def _scores(record):
    path = Path(record["_path"]).parent / "scores.jsonl"
    return {(r["task"], r["doc_id"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_paired_run_writes_both_records_and_the_tables(bundle, tmp_path):
    record = run(_cfg(bundle, tmp_path / "results", "prune=hieravid", "ratio=0.3"))
    runs = tmp_path / "results" / "runs" / "tiny_llava_ov" / "tiny"
    assert (runs / "none" / "1.0" / "record.json").exists() and (runs / "hieravid" / "0.3" / "record.json").exists()
    for key in (
        "accuracy",
        "n_samples",
        "n_failed",
        "n_parse_failed",
        "visual_tokens_in",
        "pre_llm_retained_pct",
        "layer_avg_retained_pct",
        "prefill_tflops",
        "flops_ratio",
        "prefill_exact_tflops",
        "flops_ratio_exact",
        "scoring_gflops",
        "decode_exact_tflops",
        "decode_ms_per_token_median",
        "ttft_ms_median",
        "ttft_ms_p90",
        "peak_memory_bytes",
        "kv_cache_bytes_median",
        "versions",
        "git_sha",
        "git_dirty",
        "device",
        "seed",
    ):
        assert record[key] is not None, key
    assert record["n_samples"] == 5  # limit=1 per task: 2 MVBench subtasks + 3 benchmarks
    assert abs(record["layer_avg_retained_pct"] - 30.0) < 0.3  # HieraVid's ratio is the layer average
    assert record["flops_ratio"] < 0.5 and record["baseline"]["ttft_speedup"] is not None
    stages = ("video_decode", "preprocess", "vision", "pre_llm", "prefill", "decode")
    assert set(record["stage_ms_median"]) == set(stages) and record["scoring_gflops"] > 0
    assert record["timer"] == "perf_counter" and record["threads"] >= 1
    sample = json.loads((Path(record["_path"]).parent / "samples.jsonl").read_text().splitlines()[0])["stats"]
    ttft_stages = sum(sample["timings_s"][k] for k in stages[:-1])
    assert sample["ttft_s"] == pytest.approx(ttft_stages) and sample["kv_bytes"] > 0 and sample["rss_peak_bytes"] > 0
    table = (tmp_path / "results" / "tables" / "summary.md").read_text()
    assert "hieravid" in table and "none" in table
    assert (Path(record["_path"]).parent / "config.yaml").exists()


def test_fastv_ratio_one_predicts_exactly_like_none(bundle, tmp_path):
    cfgs = [_cfg(bundle, tmp_path / "r", f"prune={p}", "ratio=1.0", "paired_baseline=false") for p in ("none", "fastv")]
    from eval.runner import _prepare_tasks

    tasks, include = _prepare_tasks(cfgs[0])
    none, fastv = (run_cell(c, tasks, include) for c in cfgs)
    a, b = _scores(none), _scores(fastv)
    assert a.keys() == b.keys() and len(a) == 5
    assert all(a[k]["prediction"] == b[k]["prediction"] for k in a)


def test_bad_videos_are_recorded_failures_and_a_killed_run_resumes(bundle, tmp_path, monkeypatch):
    data = tmp_path / "bad_bench"
    shutil.copytree(bundle, data)
    # prefetch=0: every run decodes inline, in Backbone.answer, so `calls` counts failing decodes too
    # (tests/eval/test_scale.py covers bad videos with the prefetch workers)
    cfg = _cfg(data, tmp_path / "results", "prune=none", "paired_baseline=false", "prefetch=0")
    from eval.runner import _prepare_tasks

    tasks, include = _prepare_tasks(cfg)
    # break the video of the first document of three tasks in three ways, and shorten one MVBench video
    docs = {
        t: json.loads(next(iter((data / f).glob("*.jsonl"))).read_text().splitlines()[0])
        for t, f in [("videomme", "videomme"), ("egoschema", "egoschema"), ("nextqa", "nextqa")]
    }
    (data / "videomme" / "data" / f"{docs['videomme']['videoID']}.mp4").unlink()  # missing
    write_corrupt_mp4(data / "egoschema" / "videos" / f"{docs['egoschema']['video_idx']}.mp4")  # corrupt
    zero = data / "nextqa" / "NExTVideo" / f"{docs['nextqa']['video']}.mp4"
    zero.unlink()
    write_zero_frame_mp4(zero)  # a container with no frame
    mv = next((data / "mvbench").glob("*.jsonl"))
    short = json.loads(mv.read_text().splitlines()[0])
    short_path = next(data.rglob(short["video"]))
    short_path.unlink()
    write_mp4(short_path, num_frames=5, height=48, width=64, seed=7)  # fewer frames than the model samples (32)

    calls = []
    from eval.backbones import Backbone

    original = Backbone.answer

    def counting(self, video, context, gen_kwargs, **kwargs):
        calls.append(video)
        return original(self, video, context, gen_kwargs, **kwargs)

    monkeypatch.setattr(Backbone, "answer", counting)
    record = run_cell(cfg, tasks, include)
    scores = _scores(record)
    assert record["n_samples"] == 5 and record["n_failed"] == 3
    errors = {k[0]: v["error"] for k, v in scores.items() if v["failed"]}
    assert "not found" in errors["videomme_local"] or "No such file" in errors["videomme_local"]
    assert "decode" in errors["egoschema_local"] and "decode" in errors["nextqa_mc_local"]
    assert all(v["score"] == 0.0 for v in scores.values() if v["failed"])  # failures stay in the denominator
    samples = (Path(record["_path"]).parent / "samples.jsonl").read_text().splitlines()
    short_entry = next(json.loads(s) for s in samples if json.loads(s).get("video") == str(short_path))
    assert not short_entry["failed"] and short_entry["stats"]["frames_in_video"] == 5

    # "kill" the run after two finished samples (and a half-written third line), then re-run: only the rest run
    log = Path(record["_path"]).parent / "samples.jsonl"
    log.write_text("\n".join(samples[:2]) + "\n" + samples[2][:25])
    calls.clear()
    again = run_cell(cfg, tasks, include)
    assert again["n_samples"] == 5 and again["n_failed"] == 3
    first = [json.loads(s) for s in samples[:2]]
    done_before = {e["video"] for e in first if not e["failed"]}
    assert not done_before & set(calls)  # finished samples were not recomputed
    retried = sum(e["failed"] for e in first)  # a failure is not a finished result: it is retried
    assert len(calls) == 5 - 2 + retried and again["n_retried"] == retried


def test_missing_weights_fail_fast_with_a_message(tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "run_eval.py"),
            "model=llava_ov",
            "prune=hieravid",
            "ratio=0.3",
            "benchmark=tiny",
            f"results_dir={tmp_path / 'results'}",
            f"benchmark.data_dir={tmp_path / 'bench'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "vidprune: error:" in proc.stderr and "huggingface-cli download" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_benchmark_field_is_rejected(bundle):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="modee"):
        compose_config(["benchmark.modee=offline"])


def test_budget_run_solves_per_sample_and_records_all_four_measures(bundle, tmp_path):
    """budget=0.3 budget_measure=final: every sample's final retained share within ±2 % of 30 %, knobs per sample."""
    cfg = _cfg(
        bundle,
        tmp_path / "r",
        "prune=prunevid",
        "budget=0.3",
        "budget_measure=final",
        "paired_baseline=false",
        "threads=1",
    )
    from eval.runner import _prepare_tasks

    tasks, include = _prepare_tasks(cfg)
    record = run_cell(cfg, tasks, include)
    folder = Path(record["_path"]).parent
    assert folder.name == "final-0.3" and folder.parent.name == "prunevid"
    assert record["ratio"] is None and record["budget_target"] == 0.3 and record["budget_measure"] == "final"
    for key in ("tokens_in_retained_pct", "final_retained_pct", "layer_avg_retained_pct", "flops_ratio"):
        assert record[key] is not None, key
    assert abs(record["final_retained_pct"] - 30.0) <= 0.6 and record["budget_n_unreachable"] == 0
    assert set(record["budget_knobs"]) == {"cluster_ratio", "tau", "ratio"}
    rows = list(_scores(record).values())
    assert len(rows) == 5 and all(r["budget"]["measure"] == "final" and r["budget"]["reachable"] for r in rows)
    assert all(abs(r["budget"]["achieved"] - 0.3) <= 0.006 for r in rows)
    # a ratio run of the same method is another cell: neither reuses the other's samples
    ratio_cfg = _cfg(bundle, tmp_path / "r", "prune=prunevid", "ratio=0.3")
    from eval.records import config_hash
    from eval.runner import _cell_config

    assert config_hash(_cell_config(ratio_cfg)) != record["config_hash"]


def test_ratio_and_budget_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ratio=0.3 and budget=0.2 were both given"):
        compose_config(["prune=fastv", "ratio=0.3", "budget=0.2"])
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_eval.py"), "ratio=0.3", "budget=0.2", f"results_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "give one of them" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
    with pytest.raises(OptionError, match="option budget_measure='retained': expected one of tokens_in, final"):
        run(compose_config(["budget=0.2", "budget_measure=retained"]))
    with pytest.raises(OptionError, match=r"option budget=1.5: expected a target fraction in \(0, 1\]"):
        run(compose_config(["budget=1.5"]))
    with pytest.raises(
        OptionError, match="prune=framefusion .*known only after the prefill.*accepted: budget_measure=layer_avg"
    ):
        run(compose_config(["prune=framefusion", "budget=0.3", "budget_measure=final"]))
    assert not (tmp_path / "runs").exists()


def test_budget_and_measure_are_in_the_answer_key(bundle, tmp_path):
    """A resume never reuses a sample of another target or measure (nor of a ratio run of the same method)."""
    from eval.records import config_hash
    from eval.runner import _cell_config

    def key(*overrides, prune="prunevid"):
        return config_hash(_cell_config(_cfg(bundle, tmp_path / "r", f"prune={prune}", *overrides)))

    keys = [key("budget=0.3", "budget_measure=final"), key("budget=0.2", "budget_measure=final")]
    keys += [key("budget=0.3", "budget_measure=layer_avg"), key("ratio=0.3")]
    assert len(set(keys)) == 4
    # none ignores both knobs: one paired baseline cell for every ratio and budget
    assert key("budget=0.3", prune="none") == key("ratio=0.5", prune="none")
