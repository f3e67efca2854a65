"""Reliability: resume keys, retries, option and data errors, atomic and locked writes, path safety, paired timing.

Most cases replace the model with a fake backbone (answers in microseconds, TTFT set by the test), so they check
the harness's bookkeeping through the real lmms-eval spine on the tiny bundle without paying for generation; the
cases marked ``real model`` run the tiny random LLaVA-OneVision. docs/reliability.md lists every case and what it
promises.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from eval import runner
from eval.backbones import Visual
from eval.options import OptionError, check_name, precheck
from eval.records import CellLocked, SampleLog, StorageError, cell_dir, cell_lock, write_atomic
from eval.runner import REPO, compose_config, run, run_cell
from prune.flops import LLMShape

sys.path.insert(0, str(REPO / "scripts"))
from make_tiny_bench import write_mp4  # noqa: E402

SHAPE = LLMShape(layers=4, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=300)


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


class FakeBackbone:
    """Stands in for eval.backbones.Backbone: fails on a missing video like decord does, TTFT from ``ttft``."""

    num_frames, device = 32, torch.device("cpu")

    def __init__(self, name: str = "none", ttft=lambda: 0.1 * torch.get_num_threads()) -> None:
        self.name, self.ttft, self.calls = name, ttft, []
        self.llm_shape = SHAPE

    @staticmethod
    def preprocess(frames):
        return frames

    def decode(self, video):
        """The input pipeline's decode (prefetch workers, decode cache): fails on a missing video like decord."""
        if not Path(video).exists():
            raise RuntimeError(f"cannot decode {video}: No such file")
        return Visual(torch.zeros(1, 1), 24, {"video_decode": 0.0, "preprocess": 0.0})

    def answer(self, video, context, gen_kwargs, visual=None):
        self.calls.append(video)
        if visual is None:
            self.decode(video)
        ttft = float(self.ttft())
        stats = {
            "frames": 32,
            "frames_in_video": 24,
            "text_tokens": 20,
            "visual_in": 100,
            "visual_pre_llm": 100 if self.name == "none" else 30,
            "separators": 1,
            "separators_unpruned": 1,
            "visual_per_layer": [100 if self.name == "none" else 30] * 4,
            "scoring": [],
            "kv_len_per_layer": [121] * 4,
            "kv_bytes": 1000,
            "new_tokens": 2,
            "timings_s": {"video_decode": 0.0, "preprocess": 0.0, "vision": 0.0, "pre_llm": 0.0, "prefill": ttft},
            "ttft_s": ttft,
            "decode_s_per_token": 0.01,
            "peak_mem_bytes": None,
            "rss_peak_bytes": 1,
        }
        return "A", stats


@pytest.fixture
def fake(monkeypatch):
    """Every backbone the runner builds is a FakeBackbone; returns the list of those built."""
    built = []

    def make_backbone(cfg):
        built.append(FakeBackbone(runner.make_strategy(cfg).name))
        return built[-1]

    def make_paired(cfg, base_cfg):
        built.extend([FakeBackbone("none", lambda: 1.0), FakeBackbone(runner.make_strategy(cfg).name, lambda: 0.5)])
        return built[-2], built[-1]

    monkeypatch.setattr(runner, "make_backbone", make_backbone)
    monkeypatch.setattr(runner, "make_paired_backbones", make_paired)
    return built


def _cfg(data_dir, results, *extra, benchmarks="[videomme]"):
    return compose_config(
        [
            "model=tiny_llava_ov",
            "benchmark=tiny",
            f"benchmark.data_dir={data_dir}",
            "benchmark.build=false",
            f"benchmark.benchmarks={benchmarks}",
            f"results_dir={results}",
            "max_new_tokens=4",
            *extra,
        ]
    )


def _cell(cfg, *extra):
    tasks, include = runner._prepare_tasks(cfg)
    return run_cell(cfg, tasks, include)


def _videomme_rows(data):
    path = data / "videomme" / "videomme.jsonl"
    return path, [json.loads(line) for line in path.read_text().splitlines()]


# -- 1. resume keys: answers ---------------------------------------------------------------------------------------


def test_another_data_dir_or_edited_annotations_recompute_and_unchanged_data_resumes(bundle, tmp_path, fake):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    results = tmp_path / "results"
    first = _cell(_cfg(bundle, results, "prune=none", "limit=2"))
    assert first["resume"] == {"new": 2} and len(fake[-1].calls) == 2
    again = _cell(_cfg(bundle, results, "prune=none", "limit=2"))
    assert again["resume"] == {"reused": 2} and fake[-1].calls == []  # same data: nothing recomputed
    other = _cell(_cfg(copy, results, "prune=none", "limit=2"))  # same files, another data_dir
    assert other["resume"] == {"new": 2} and len(fake[-1].calls) == 2
    path, rows = _videomme_rows(copy)
    rows[1]["question"] = "How many circles move across the video?"  # edit one annotation row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = _cell(_cfg(copy, results, "prune=none", "limit=2"))
    assert edited["resume"] == {"reused": 1, "inputs changed": 1} and len(fake[-1].calls) == 1
    assert (
        edited["data"]["annotations"]["videomme/videomme.jsonl"]
        != other["data"]["annotations"]["videomme/videomme.jsonl"]
    )


def test_a_replaced_video_is_recomputed(bundle, tmp_path, fake):
    data = tmp_path / "data"
    shutil.copytree(bundle, data)
    cfg = _cfg(data, tmp_path / "results", "prune=none", "limit=1")
    _cell(cfg)
    _, rows = _videomme_rows(data)
    video = data / "videomme" / "data" / f"{rows[0]['videoID']}.mp4"
    stat = video.stat()
    write_mp4(video, num_frames=30, height=48, width=64, seed=99)  # other content...
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...with the old mtime, as cp -p would leave it
    assert _cell(cfg)["resume"] == {"inputs changed": 1}


# -- 1. resume keys: timings ---------------------------------------------------------------------------------------


def test_threads_1_after_threads_2_never_reports_the_2_thread_ttft_as_1_thread(bundle, tmp_path, fake):
    results = tmp_path / "results"
    two = _cell(_cfg(bundle, results, "prune=none", "limit=1", "threads=2"))
    assert two["threads"] == 2 and two["ttft_ms_median"] == pytest.approx(200)
    one = _cell(_cfg(bundle, results, "prune=none", "limit=1", "threads=1"))  # retime=true (default)
    assert one["resume"] == {"timing environment changed": 1}
    assert one["threads"] == 1 and one["ttft_ms_median"] == pytest.approx(100) and not one["timing_stale"]
    # retime=false keeps the answer and says where its time comes from instead of re-timing
    kept = _cell(_cfg(bundle, results, "prune=none", "limit=1", "threads=2", "retime=false"))
    assert kept["resume"] == {"reused": 1, "reused_timed_elsewhere": 1} and fake[-1].calls == []
    assert kept["threads"] == 2 and kept["timing_stale"] and kept["timing_env"]["threads"] == 1
    assert kept["ttft_ms_median"] == pytest.approx(100)  # the 1-thread time, labelled as 1-thread


# -- 2. failed samples are retried -----------------------------------------------------------------------------------


def test_a_missing_video_fails_then_is_retried_and_succeeds_once_added(bundle, tmp_path, fake):
    data = tmp_path / "data"
    shutil.copytree(bundle, data)
    _, rows = _videomme_rows(data)
    video = data / "videomme" / "data" / f"{rows[0]['videoID']}.mp4"
    aside = tmp_path / "aside.mp4"
    video.rename(aside)
    cfg = _cfg(data, tmp_path / "results", "prune=none", "limit=1")
    failed = _cell(cfg)
    assert failed["n_failed"] == 1 and failed["n_retried"] == 0
    still = _cell(cfg)  # the same failure is retried, not taken as final
    assert still["n_retried"] == 1 and still["n_retried_still_failed"] == 1 and still["n_failed"] == 1
    aside.rename(video)
    fixed = _cell(cfg)
    assert fixed["n_failed"] == 0 and fixed["n_retried"] == 1 and fixed["n_retried_still_failed"] == 0


# -- 3. a smaller limit never shrinks a record ----------------------------------------------------------------------


def test_a_smaller_limit_keeps_every_finished_sample_of_the_record(bundle, tmp_path, fake):
    results = tmp_path / "results"
    full = _cell(_cfg(bundle, results, "prune=none", "limit=3"))
    small = _cell(_cfg(bundle, results, "prune=none", "limit=1"))
    assert full["n_samples"] == small["n_samples"] == 3 and small["limit"] == 3 and small["limit_requested"] == 1
    assert small["resume"] == {"reused": 3} and fake[-1].calls == []
    # other settings replace the record, and the old one is kept aside, never lost
    other = _cell(_cfg(bundle, results, "prune=none", "limit=1", "max_new_tokens=8"))
    assert other["n_samples"] == 1
    aside = list((Path(other["_path"]).parent / "superseded").glob("record-*.json"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["n_samples"] == 3


# -- 4. options: one line, exit 2, before any work ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("device=gpu", "device='gpu'"),
        ("device=cuda:7", "device='cuda:7'"),
        ("threads=0", "threads=0"),
        ("threads=two", "threads='two'"),
        ("limit=0", "limit=0"),
        ("limit=-3", "limit=-3"),
        ("seed=-1", "seed=-1"),
        ("seed=1.5", "seed=1.5"),
        ("max_new_tokens=0", "max_new_tokens=0"),
        ("logger=tensorboard", "logger='tensorboard'"),
        ("ratio=1.5", "ratio"),
        ("ratio=abc", "ratio='abc'"),
        ("paired_baseline=maybe", "paired_baseline='maybe'"),
        ("retime=2", "retime=2"),
        ("lock_wait=-1", "lock_wait=-1"),
        ("model.name=../escape", "model.name='../escape'"),
        ("model.name=a/b", "model.name='a/b'"),
        ("benchmark.name=..", "benchmark.name='..'"),
        ("model.num_frames=0", "model.num_frames=0"),
        ("model.dtype=float8", "model.dtype='float8'"),
        ("benchmark.mode=local", "benchmark.mode='local'"),
        ("benchmark.data_dir=/nonexistent/videos", "benchmark.data_dir"),
        ("benchmark.benchmarks=[mmmu]", "benchmark.benchmarks"),
        ("results_dir=", "results_dir"),
        ("prune=nosuch", "nosuch"),
        ("nosuchkey=1", "nosuchkey"),
    ],
)
def test_every_bad_option_is_one_line_naming_key_and_value(bundle, override, needle):
    base = [f"benchmark.data_dir={bundle}", "benchmark.build=false"]
    if override.startswith("benchmark.data_dir"):
        base = ["benchmark.build=false"]
    with pytest.raises(OptionError) as err:
        precheck([*base, override], compose_config)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_a_sweep_with_one_bad_value_fails_before_any_job(bundle):
    with pytest.raises(OptionError, match="threads=0"):
        precheck(
            ["-m", "benchmark=tiny", f"benchmark.data_dir={bundle}", "benchmark.build=false", "threads=1,0"],
            compose_config,
        )
    precheck(
        ["-m", "benchmark=tiny", f"benchmark.data_dir={bundle}", "benchmark.build=false", "ratio=0.2,0.3"],
        compose_config,
    )


@pytest.mark.parametrize("override", ["threads=-2", "model.name=../../escape", "nosuchkey=1"])
def test_run_eval_exits_2_with_one_line_and_writes_nothing(tmp_path, override):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_eval.py"), f"results_dir={results}", override],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vidprune: error:") and "Traceback" not in proc.stderr
    assert override.split("=")[0] in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no results, no outputs/, nothing


# -- 5. bad data rows: recorded, counted, the run goes on -----------------------------------------------------------


def test_bad_annotation_rows_are_failed_samples_with_one_line_each(bundle, tmp_path, fake, capsys):
    data = tmp_path / "data"
    shutil.copytree(bundle, data)
    path, rows = _videomme_rows(data)
    bad_options = dict(rows[0], options=None)
    bad_answer = dict(rows[1], answer="E")
    bad_meta = dict(rows[2], sub_category="Underwater Basket Weaving")
    lines = [json.dumps(bad_options), '{"videoID": "x", "question": ', json.dumps(bad_answer), json.dumps(bad_meta)]
    path.write_text("\n".join(lines) + "\n")
    record = _cell(_cfg(data, tmp_path / "results", "prune=none"))
    assert record["n_samples"] == 4 and record["n_failed"] == 4 and fake[-1].calls == []  # never sent to the model
    scores = [json.loads(line) for line in (Path(record["_path"]).parent / "scores.jsonl").read_text().splitlines()]
    errors = sorted(s["error"] for s in scores)
    assert all(str(path) in e and "\n" not in e for e in errors)
    assert any(":1: 'options'" in e for e in errors) and any(":2: malformed JSON" in e for e in errors)
    assert any(":3: answer 'E'" in e for e in errors) and any(":4: unknown sub_category" in e for e in errors)
    out = capsys.readouterr().out
    assert sum("bad annotation row" in line for line in out.splitlines()) == 4


def test_task_files_go_under_results_dir_and_the_data_folder_is_untouched(bundle, tmp_path, fake, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(bundle, data)
    shutil.rmtree(data / "lmms_tasks", ignore_errors=True)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run(_cfg(data, tmp_path / "results", "prune=fastv", "limit=1"))
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    assert list(work.iterdir()) == []
    assert list((tmp_path / "results" / ".cache" / "lmms_tasks").rglob("videomme_local.yaml"))


# -- 6. writes: atomic, torn lines, ENOSPC, locks, paths ------------------------------------------------------------


def test_a_torn_line_is_cut_before_the_next_append(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path, "h")
    log.append({"task": "t", "doc_id": 0, "prediction": "A", "failed": False})
    with path.open("a") as f:
        f.write('{"task": "t", "doc_id": 1, "pred')  # killed mid-line
    again = SampleLog(path, "h")
    assert again.torn_bytes > 0 and set(again.done) == {("t", 0)}
    again.append({"task": "t", "doc_id": 1, "prediction": "B", "failed": False})
    assert [json.loads(line)["doc_id"] for line in path.read_text().splitlines()] == [0, 1]


def test_enospc_on_append_leaves_the_log_intact_and_says_so_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path, "h")
    log.append({"task": "t", "doc_id": 0, "prediction": "A", "failed": False})
    size = path.stat().st_size
    real = os.write

    def half_then_full(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(StorageError) as err:
        log.append({"task": "t", "doc_id": 1, "prediction": "B", "failed": False})
    monkeypatch.setattr(os, "write", real)
    assert "no space left" in str(err.value) and "\n" not in str(err.value)
    assert path.stat().st_size == size and SampleLog(path, "h").torn_bytes == 0


def test_enospc_on_an_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_atomic(path, '{"old": true}')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="no space left"):
        write_atomic(path, '{"new": true}')
    assert json.loads(path.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_full_disk_mid_run_keeps_every_finished_sample(bundle, tmp_path, fake, monkeypatch):
    cfg = _cfg(bundle, tmp_path / "results", "prune=none", "limit=3")
    real = SampleLog.append
    count = []

    def fill_up(self, entry):
        count.append(entry)
        if len(count) == 3:
            raise StorageError("no space left on the device writing samples.jsonl; every earlier file is intact")
        real(self, entry)

    monkeypatch.setattr(SampleLog, "append", fill_up)
    with pytest.raises(StorageError):
        _cell(cfg)
    monkeypatch.setattr(SampleLog, "append", real)
    log = next((tmp_path / "results").rglob("samples.jsonl"))
    assert len(log.read_text().splitlines()) == 2 and not list(log.parent.glob("*.tmp"))
    assert _cell(cfg)["resume"] == {"reused": 2, "new": 1}  # resumes after space is freed


def test_a_second_run_on_the_same_cell_stops_or_waits(tmp_path):
    with cell_lock(tmp_path):
        start = time.monotonic()
        with pytest.raises(CellLocked, match="another run is writing") as err:
            with cell_lock(tmp_path, wait_s=0.4):
                pass
        assert time.monotonic() - start >= 0.4 and f"pid {os.getpid()}" in str(err.value)
    released = threading.Event()

    def hold():
        with cell_lock(tmp_path):
            released.wait(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    with cell_lock(tmp_path, wait_s=5):  # waits for the holder, then proceeds
        pass
    holder.join()


def test_two_runs_at_once_never_write_duplicate_lines(bundle, tmp_path, fake):
    cfg = _cfg(bundle, tmp_path / "results", "prune=none", "limit=1")
    run_dir = tmp_path / "results" / "runs" / "tiny_llava_ov" / "tiny" / "none" / "1.0"
    run_dir.mkdir(parents=True)
    with cell_lock(run_dir):
        with pytest.raises(CellLocked):
            _cell(cfg)
    assert not (run_dir / "samples.jsonl").exists()


def test_paths_never_leave_results_dir(tmp_path):
    for bad in ("..", "../x", "a/b", "", ".", "x\0"):
        with pytest.raises(ValueError):
            cell_dir(tmp_path, "m", bad, "none", "1.0")
        with pytest.raises(OptionError):
            check_name("model.name", bad)
    assert cell_dir(tmp_path, "m", "b", "none", "1.0") == tmp_path / "runs" / "m" / "b" / "none" / "1.0"


# -- 7. paired timing ------------------------------------------------------------------------------------------------


def test_paired_timing_alternates_order_and_reports_a_median_ratio_with_ci(bundle, tmp_path, fake):
    record = run(_cfg(bundle, tmp_path / "results", "prune=fastv", "ratio=0.3", "limit=3"))
    base = record["baseline"]
    assert base["ttft_speedup_paired"] and base["ttft_speedup"] == pytest.approx(2.0)
    assert base["ttft_speedup_ci"] == pytest.approx([2.0, 2.0]) and base["ttft_speedup_significant"]
    samples = [json.loads(line) for line in (Path(record["_path"]).parent / "samples.jsonl").read_text().splitlines()]
    assert [s["paired"]["first"] for s in samples] == ["none", "pruned", "none"]
    none_log = tmp_path / "results" / "runs" / "tiny_llava_ov" / "tiny" / "none" / "1.0" / "samples.jsonl"
    assert len(none_log.read_text().splitlines()) == 3  # the none answers were recorded once, in the pair
    summary = (tmp_path / "results" / "tables" / "summary.csv").read_text()
    assert "ttft_speedup_ci_low" in summary


def test_paired_none_on_the_shared_model_answers_like_none_alone(bundle, tmp_path):  # real model
    frames = "model.num_frames=8"  # 8 x 196 visual tokens: the check is the same, the test 4x cheaper
    paired = run(_cfg(bundle, tmp_path / "paired", "prune=fastv", "ratio=0.3", "limit=1", frames))
    alone = _cell(_cfg(bundle, tmp_path / "alone", "prune=none", "limit=1", frames))
    none_dir = Path(paired["baseline"]["record"])
    got = json.loads((tmp_path / "paired" / none_dir).parent.joinpath("scores.jsonl").read_text())
    want = json.loads((Path(alone["_path"]).parent / "scores.jsonl").read_text())
    assert got["prediction"] == want["prediction"]
    assert paired["baseline"]["ttft_speedup_paired"] and len(paired["baseline"]["ttft_speedup_ci"]) == 2


def _fake_cell(results, prune, ratio, ratios):
    from eval.experiments import Cell

    path = Cell("tiny_llava_ov", "tiny", prune, ratio).record(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"accuracy": 50.0, "layer_avg_retained_pct": 100 * ratio, "flops_ratio": ratio, "ttft_ms_median": 100.0}
    path.write_text(json.dumps(rec | {"peak_memory_bytes": 1, "prune": prune, "ratio": ratio}))
    rows = [{"task": "t", "doc_id": i, "score": float(i % 2), "ttft_ratio": r} for i, r in enumerate(ratios)]
    (path.parent / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sweep_table_and_plot_carry_the_ttft_ci_and_mark_non_significant_speedups(tmp_path):
    from eval.experiments import build_table, load_experiment

    results = tmp_path / "results"
    _fake_cell(results, "none", 1.0, [None] * 8)
    _fake_cell(results, "random", 0.3, [2.1, 1.9, 2.0, 2.2, 1.8, 2.05, 1.95, 2.0])  # clearly faster
    _fake_cell(results, "random", 0.5, [0.6, 1.5, 0.8, 1.3, 0.9, 1.2, 1.1, 0.7])  # noise around 1
    exp = load_experiment("ratio_sweep", {"prune": "random", "ratio": "0.3,0.5"})
    out = build_table(exp, results, n_boot=500)
    frame = out["frame"].set_index("ratio")
    assert frame.loc[0.3, "ttft_ci_low"] > 1.0 and frame.loc[0.3, "ttft_note"] == ""
    assert frame.loc[0.5, "ttft_ci_low"] < 1.0 < frame.loc[0.5, "ttft_ci_high"]
    assert frame.loc[0.5, "ttft_note"] == "n.s."
    md = (results / "tables" / "ratio_sweep.md").read_text()
    row = next(line for line in md.splitlines() if "random (0.5)" in line)
    assert "n.s." in row and "[" in row.split("|")[-3]
    svg = (results / "tables" / "ratio_sweep_ttft_speedup.svg").read_text()
    assert 'id="ttft_speedup-tiny_llava_ov-tiny-random-ci"' in svg and "random-ns" in svg


def test_an_over_long_prompt_is_a_failed_sample_naming_the_token_count_and_the_context(bundle, tmp_path):  # real
    from eval.backbones import build_backbone

    cfg = _cfg(bundle, tmp_path / "results", "prune=none")
    model = runner.OmegaConf.to_container(cfg.model, resolve=True)
    backbone = build_backbone(model, runner.make_strategy(cfg), "cpu")
    ids = torch.full((1, 40_000), 65)
    with pytest.raises(ValueError, match=r"prompt too long: \d+ tokens .* context of 32768 tokens"):
        backbone.check_context(ids)
    backbone.check_context(torch.full((1, 100), 65))  # a normal prompt passes
