"""Benchmarks: the tiny offline bundle, lmms-eval local tasks built from it, and per-sample scoring. CPU, offline."""

from __future__ import annotations

import importlib
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import av
import decord
import pytest
import yaml

from eval.benchmarks import (
    _COPIED_KEYS,
    BENCHMARKS,
    MVBENCH_SUBTASK_FOLDERS,
    _builtin_task_dir,
    _BuiltinLoader,
    _load_builtin_yaml,
    _mmmu_parses,
    guarded_doc_to_visual,
    parse_ok,
    sample_score,
    task_benchmark,
    task_metric,
    write_local_tasks,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_tiny_bench.py"
ALL = ["mvbench", "videomme", "egoschema", "nextqa"]
LOCAL_TASKS = [
    "mvbench_object_interaction_local",
    "mvbench_action_antonym_local",
    "videomme_local",
    "egoschema_local",
    "nextqa_mc_local",
]
# Fields each benchmark's documents carry (lmms_eval.md section 2.1).
FIELDS = {
    "mvbench": {"video", "question", "candidates", "answer"},
    "videomme": {"videoID", "question", "options", "answer", "duration", "domain", "sub_category", "task_type"}
    | {"question_id", "video_id", "url"},
    "egoschema": {"video_idx", "question", "option", "answer"},
    "nextqa": {"video", "question", "a0", "a1", "a2", "a3", "a4", "answer"},
}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load_script()


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Offline hub/datasets and every HF cache in a temporary folder, set before lmms-eval is imported."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        mp.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield home


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_bench")
    tiny.make_tiny_bench(out, seed=0)
    return out


@pytest.fixture(scope="module")
def tasks(offline, bundle):
    """The local tasks, loaded the way the harness loads them (the one lmms-eval import of this module)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    include_path, names = write_local_tasks(bundle, ALL)
    assert include_path == bundle / "lmms_tasks"
    assert names == LOCAL_TASKS
    # include_defaults=False skips indexing the ~2000 built-in YAMLs (5 s); the local tasks load the same.
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    return get_task_dict(names, manager)


@pytest.fixture(scope="module")
def builtin_utils(offline):
    """lmms-eval's own task utils modules (they read HF_HOME at import; tests repoint their module globals)."""
    return {bench: importlib.import_module(f"lmms_eval.tasks.{bench}.utils") for bench in ALL}


def _builtin_config(bench: str, sub: str | None = None) -> dict:
    """The built-in task YAML, `!function` tags kept as text."""
    return _load_builtin_yaml(_builtin_task_dir(bench) / BENCHMARKS[bench].builtin_yaml.format(sub=sub))


# --------------------------------------------------------------------------------------------------------------
# The bundle script
# --------------------------------------------------------------------------------------------------------------


def test_bundle_has_readable_mp4s_and_reruns_change_nothing(tmp_path):
    out = tmp_path / "bundle"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, check=True)
    assert "12 documents, 11 MP4s" in run.stdout and run.stdout.count("\n") == 1

    _, videos = tiny.bundle_files(seed=0)
    for rel, num_frames in videos.items():
        reader = decord.VideoReader(str(out / rel))
        assert len(reader) == num_frames and 24 <= num_frames <= 48
        frames = reader.get_batch([0, 1]).asnumpy()
        assert frames.shape == (2, 48, 64, 3)
        assert (frames[0] != frames[1]).any(), "consecutive frames should differ"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in files) < 1_000_000
    for bench in ALL:
        assert (out / BENCHMARKS[bench].annotation.format(sub="action_antonym")).is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in files}
    stats = tiny.make_tiny_bench(out, seed=0)
    assert stats["written"] == 0 and stats["unchanged"] == len(files)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert tiny.make_tiny_bench(out, seed=0, force=True)["written"] == len(files)


def test_bad_input_writers(tmp_path):
    corrupt = tiny.write_corrupt_mp4(tmp_path / "corrupt.mp4")
    with pytest.raises(RuntimeError):  # decord 0.6.0 raises a plain RuntimeError here
        decord.VideoReader(str(corrupt))
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(corrupt))

    empty = tiny.write_zero_frame_mp4(tmp_path / "empty.mp4")
    with pytest.raises(decord.DECORDError):
        decord.VideoReader(str(empty))
    with av.open(str(empty)) as container:
        (stream,) = container.streams.video
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
        assert sum(1 for _ in container.decode(stream)) == 0

    assert len(decord.VideoReader(str(tiny.write_mp4(tmp_path / "ok.mp4", 30, 32, 48, seed=1)))) == 30


# --------------------------------------------------------------------------------------------------------------
# Benchmark table and task names
# --------------------------------------------------------------------------------------------------------------


def test_benchmark_table_matches_lmms_eval_yamls(builtin_utils):
    assert MVBENCH_SUBTASK_FOLDERS == builtin_utils["mvbench"].DATA_LIST
    for bench in BENCHMARKS.values():
        if bench.name == "probe":  # generated by eval.probe, no built-in task to match
            continue
        declared = {}
        for path in _builtin_task_dir(bench.name).glob("*.y*ml"):
            config = yaml.load(path.read_text(), Loader=_BuiltinLoader)  # a SafeLoader subclass
            name = config.get("group") or config.get("task")  # a group YAML lists its tasks under `task`
            declared[name] = [m["metric"] for m in config.get("metric_list", [])]
        for name in bench.online_tasks:
            assert name in declared, name
        for optional in bench.optional_tasks:
            assert declared[optional.name] == [optional.metric]
        if bench.name != "mvbench":
            assert declared[bench.online_tasks[0]] == [bench.metric]
    assert {b: BENCHMARKS[b].scale for b in ALL} == {
        "mvbench": 100.0,
        "videomme": 100.0,
        "egoschema": 1.0,
        "nextqa": 1.0,
    }


def test_task_names_map_to_benchmarks():
    assert task_benchmark("mvbench") == "mvbench"
    assert task_benchmark("mvbench_fine_grained_pose") == task_benchmark("mvbench_action_antonym_local") == "mvbench"
    assert task_benchmark("videomme") == task_benchmark("videomme_local") == "videomme"
    assert task_benchmark("egoschema_subset") == task_benchmark("egoschema") == "egoschema"
    assert task_benchmark("nextqa_mc_test") == task_benchmark("nextqa_oe_test") == task_benchmark("nextqa_mc_local")
    assert task_metric("egoschema_local") == ("score", 1.0)
    assert task_metric("egoschema") == ("submission", 100.0)
    assert task_metric("nextqa_oe_test") == ("WUPS", 100.0)
    assert task_metric("mvbench_action_count") == ("mvbench_accuracy", 100.0)
    for unknown in ("mmmu", "mvbench_nonexistent", "videomme_v2", "mvbench_local"):
        with pytest.raises(ValueError):
            task_benchmark(unknown)


# --------------------------------------------------------------------------------------------------------------
# Local tasks
# --------------------------------------------------------------------------------------------------------------


def test_local_tasks_load_offline_with_the_benchmarks_fields(tasks, bundle):
    assert sorted(tasks) == sorted(LOCAL_TASKS)
    sizes = {name: len(task.test_docs()) for name, task in tasks.items()}
    assert sizes == dict.fromkeys(LOCAL_TASKS, 3) | {
        "mvbench_action_antonym_local": 2,
        "mvbench_object_interaction_local": 1,
    }
    for name, task in tasks.items():
        for doc in task.test_docs():
            assert FIELDS[task_benchmark(name)] <= set(doc)

    files = sorted((bundle / "lmms_tasks").rglob("*.*"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert write_local_tasks(bundle, ALL)[1] == LOCAL_TASKS  # rewriting is a no-op
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert write_local_tasks(bundle, ["mvbench"], ["action_antonym"])[1] == ["mvbench_action_antonym_local"]
    with pytest.raises(ValueError):
        write_local_tasks(bundle, ["mmmu"])
    with pytest.raises(FileNotFoundError):
        write_local_tasks(bundle, ["mvbench"], ["action_count"])


def test_local_tasks_keep_the_builtin_prompt_and_settings(tasks, bundle, builtin_utils):
    for name, task in tasks.items():
        bench = task_benchmark(name)
        sub = name.removeprefix("mvbench_").removesuffix("_local") if bench == "mvbench" else None
        builtin = _builtin_config(bench, sub)
        local = _load_builtin_yaml(bundle / "lmms_tasks" / bench / f"{name}.yaml")
        for key in _COPIED_KEYS:  # prompts, generation settings (none for nextqa_mc_test) and scoring
            assert local.get(key) == builtin.get(key), (name, key)
        assert local["doc_to_visual"] == f"utils.{bench}_local_doc_to_visual"
        doc_to_text = getattr(builtin_utils[bench], builtin["doc_to_text"].removeprefix("utils."))
        kwargs = (builtin.get("lmms_eval_specific_kwargs") or {}).get("default")
        for doc in task.test_docs():
            assert task.doc_to_text(doc) == doc_to_text(doc, kwargs)

    doc = tasks["mvbench_action_antonym_local"].test_docs()[0]
    assert tasks["mvbench_action_antonym_local"].doc_to_text(doc) == (
        "Question:What is the action performed by the person in the video?\nOption:\n(A) Not sure\n"
        "(B) Pushing something from left to right\n(C) Pushing something from right to left\n"
        "Only give the best option.\n"
    )
    doc = tasks["videomme_local"].test_docs()[0]
    assert (
        tasks["videomme_local"]
        .doc_to_text(doc)
        .endswith("D. None.\n\nAnswer with the option's letter from the given choices directly.")
    )


def test_local_doc_to_visual_uses_the_builtin_layout_and_never_exits(tasks, bundle, builtin_utils, monkeypatch):
    # Point the built-in tasks at the bundle as if it were $HF_HOME: both must resolve the same files.
    monkeypatch.setattr(builtin_utils["mvbench"], "base_cache_dir", str(bundle))
    monkeypatch.setattr(builtin_utils["videomme"], "base_cache_dir", str(bundle))
    monkeypatch.setattr(builtin_utils["egoschema"], "cache_dir", str(bundle / "egoschema" / "videos"))
    monkeypatch.setattr(builtin_utils["nextqa"], "cache_dir", str(bundle / "nextqa" / "NExTVideo"))
    for name, task in tasks.items():
        bench = task_benchmark(name)
        builtin = getattr(builtin_utils[bench], f"{bench}_doc_to_visual")
        for doc in task.test_docs():
            (path,) = task.doc_to_visual(doc)
            assert Path(path).is_file() and Path(path).is_relative_to(bundle)
            expected = builtin(doc, task.lmms_eval_specific_kwargs) if bench == "mvbench" else builtin(doc)
            assert [path] == [str(Path(p)) for p in expected]

    missing = {"video": "gone.mp4", "videoID": "gone", "video_idx": "gone"}
    for name, task in tasks.items():
        doc = {**task.test_docs()[0], **missing}
        if task_benchmark(name) == "nextqa":
            doc["video"] = 123
        (path,) = task.doc_to_visual(doc)
        assert not Path(path).exists() and Path(path).stem in {"gone", "123"}
        assert guarded_doc_to_visual(task.doc_to_visual, doc) == ([path], None)


def test_guarded_doc_to_visual_turns_builtin_exits_into_errors(tasks, builtin_utils, monkeypatch, tmp_path):
    # An empty $HF_HOME: the built-in videomme/egoschema call sys.exit and nextqa raises for the missing video.
    monkeypatch.setattr(builtin_utils["videomme"], "base_cache_dir", str(tmp_path))
    monkeypatch.setattr(builtin_utils["egoschema"], "cache_dir", str(tmp_path / "egoschema" / "videos"))
    monkeypatch.setattr(builtin_utils["nextqa"], "cache_dir", str(tmp_path / "nextqa" / "NExTVideo"))
    cases = {
        "videomme": ("videomme_local", "SystemExit: video path:"),
        "egoschema": ("egoschema_local", "SystemExit: video path:"),
        "nextqa": ("nextqa_mc_local", "FileNotFoundError: Tried both"),
    }
    for bench, (task, prefix) in cases.items():
        fn = getattr(builtin_utils[bench], f"{bench}_doc_to_visual")
        visuals, error = guarded_doc_to_visual(fn, tasks[task].test_docs()[0])
        assert visuals is None and error.startswith(prefix), error
        assert str(tmp_path) in error


# --------------------------------------------------------------------------------------------------------------
# Scoring from lmms-eval's own process_results
# --------------------------------------------------------------------------------------------------------------

# (task, doc index, correct letter, wrong letter)
ANSWERS = [
    ("mvbench_action_antonym_local", 0, "B", "C"),
    ("mvbench_object_interaction_local", 0, "A", "D"),
    ("videomme_local", 0, "C", "A"),
    ("egoschema_local", 0, "E", "B"),
    ("nextqa_mc_local", 0, "C", "A"),
]


@pytest.mark.parametrize(("task", "index", "right", "wrong"), ANSWERS)
def test_sample_score_and_parse_ok_on_process_results(tasks, task, index, right, wrong):
    doc = tasks[task].test_docs()[index]
    metric, _ = task_metric(task)

    def judge(response: str) -> tuple[float | None, bool]:
        value = tasks[task].process_results(doc, [response])[metric]
        return sample_score(task, value), parse_ok(task, response, doc)

    assert judge(right) == (1.0, True)
    assert judge(f"{right}.") == (1.0, True)
    assert judge(wrong) == (0.0, True)
    state = random.getstate()
    score, parsed = judge("I don't know")
    assert not parsed
    # MVBench and Video-MME score an unparsed answer 0; EgoSchema and NExT-QA score a random letter.
    assert score in (0.0, 1.0) and (score == 0.0 or task_benchmark(task) in {"egoschema", "nextqa"})
    random.setstate(state)
    assert not parse_ok(task, "", doc)
    random.seed(0)
    before = random.random()
    random.seed(0)
    parse_ok(task, "no idea", doc)  # an unparsed egoschema answer must not consume the global random state
    assert random.random() == before


def test_sample_score_without_a_label_or_a_0_1_metric():
    assert sample_score("egoschema", {"pred": 2, "ground_truth": None}) is None
    assert sample_score("egoschema", {"vid-1": 2}) is None  # the full set's `submission` value
    assert sample_score("egoschema_subset", {"pred": 2, "ground_truth": "2"}) == 1.0
    assert sample_score("nextqa_oe_test", {"0": 0.5, "0.9": 0.1, "qtype": "CW"}) is None
    assert sample_score("videomme_local", None) is None


def test_nextqa_parse_rule_matches_egoschemas_own_flag(builtin_utils):
    # Both tasks copy MMMU's parse_multi_choice_response; egoschema's also returns whether a candidate matched.
    ego = builtin_utils["egoschema"]
    index2ans = {"A": "the squares move", "B": "the camera zooms", "C": "it rains", "D": "a man walks", "E": "none"}
    responses = [
        "A",
        "(B)",
        "C.",
        "answer: D",
        "E) none",
        "I think it is because the squares move",
        "the squares move",
        "I don't know",
        "",
        "It is not clear from the video at all",
    ]
    state = random.getstate()
    for response in responses:
        _, matched = ego.parse_multi_choice_response(response, list(index2ans), index2ans)
        assert _mmmu_parses(response, index2ans) == matched, response
    random.setstate(state)
