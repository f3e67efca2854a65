"""Everything benchmark-specific: lmms-eval task names, metrics, offline local tasks and per-sample scoring.

Four video QA benchmarks, each evaluated through lmms-eval 0.7.3's own task code:

============  ==================  ===========================  =====  ======================================
benchmark     online task(s)      metric key                   scale  local task(s) from `write_local_tasks`
============  ==================  ===========================  =====  ======================================
mvbench       mvbench (group)     mvbench_accuracy             0-100  mvbench_<sub>_local, one per subtask
videomme      videomme            videomme_perception_score    0-100  videomme_local
egoschema     egoschema_subset    score                        0-1    egoschema_local
nextqa        nextqa_mc_test      exact_match                  0-1    nextqa_mc_local
probe         (none: offline)     probe_accuracy               0-1    probe_<family>, from `eval.probe`
============  ==================  ===========================  =====  ======================================

The online tasks download from the HF hub and fail offline (`ConnectionError`); the local tasks read an
annotation jsonl and videos from a data directory laid out exactly like the built-in tasks' `$HF_HOME` cache,
so a real offline copy of a benchmark can be dropped in. Prompts, answer extraction and aggregation stay
lmms-eval's own: the generated task folder re-exports them from `lmms_eval.tasks.<bench>.utils`.

Scoring caveats this module exists to work around (see `sample_score` and `parse_ok`):

* MVBench's aggregation divides by non-empty predictions only, so a failed sample that returns `""` raises the
  score instead of lowering it.
* EgoSchema and NExT-QA pick a *random* letter when nothing parses, using the global `random` module from
  lmms-eval's `process_results` threads; run with `simple_evaluate(process_docs_parallel=PROCESS_DOCS_PARALLEL)`
  so at least the draw order is fixed, and count unparsed answers as wrong with `parse_ok`.
* The `mvbench` group has no `aggregate_metric_list` in 0.7.3, so lmms-eval reports per-subtask scores only.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BENCHMARKS",
    "DATA_ERROR",
    "LOCAL_TASKS_DIR",
    "MVBENCH_SUBTASK_FOLDERS",
    "PROCESS_DOCS_PARALLEL",
    "Benchmark",
    "OptionalTask",
    "check_row",
    "checked_annotations",
    "guarded_doc_to_visual",
    "parse_ok",
    "sample_score",
    "task_benchmark",
    "task_metric",
    "write_local_tasks",
]

DATA_ERROR = "_vidprune_data_error"
"""Field of a document whose annotation row is bad: the one-line error; the model records the sample as failed."""

LOCAL_TASKS_DIR = "lmms_tasks"
"""Folder under the data directory that `write_local_tasks` fills; pass it as lmms-eval's include_path."""

PROCESS_DOCS_PARALLEL = 1
"""`simple_evaluate(process_docs_parallel=...)` for these tasks: one worker keeps the random fallback's draws in
document order (lmms-eval's default of 4 threads shares the global `random` module)."""

# Copy of DATA_LIST in lmms_eval/tasks/mvbench/utils.py (tests check it still matches): the video folder of each
# subtask under `$HF_HOME/mvbench_video/`. Kept here so this module imports without lmms-eval (~6 s).
MVBENCH_SUBTASK_FOLDERS: dict[str, str] = {
    "object_interaction": "star/Charades_segment",
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video",
    "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4",
    "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}


@dataclass(frozen=True)
class OptionalTask:
    """A documented lmms-eval task of a benchmark that the harness does not run by default.

    Attributes:
        name: lmms-eval task name.
        metric: metric key in lmms-eval's results and per-sample logs.
        scale: value of a perfect score as lmms-eval reports it (100.0 or 1.0).
        note: why it is optional.
    """

    name: str
    metric: str
    scale: float
    note: str


@dataclass(frozen=True)
class Benchmark:
    """One benchmark, its lmms-eval tasks and where its local copy lives under a data directory.

    Attributes:
        name: short benchmark name, the key in `BENCHMARKS`.
        online_tasks: lmms-eval task (or group) names that load the data from the HF hub.
        optional_tasks: further documented task names, not run by default.
        metric: metric key of `online_tasks` and of the local task(s).
        scale: value of a perfect score as lmms-eval reports `metric` (100.0 or 1.0); divide by it to normalise.
        local_task: name of the local task; MVBench's has a `{sub}` field for the subtask.
        annotation: annotation jsonl relative to the data directory (MVBench: with `{sub}`).
        video_dir: video folder relative to the data directory, as the built-in task has it under `$HF_HOME`
            (MVBench: the root; each subtask adds its `MVBENCH_SUBTASK_FOLDERS` entry).
        builtin_yaml: the built-in task YAML the local task copies prompts and scoring from (MVBench: `{sub}`).
        notes: facts that matter when reading the numbers.
    """

    name: str
    online_tasks: tuple[str, ...]
    optional_tasks: tuple[OptionalTask, ...]
    metric: str
    scale: float
    local_task: str
    annotation: str
    video_dir: str
    builtin_yaml: str
    notes: str

    def local_task_name(self, sub: str | None = None) -> str:
        """Name of the local task (MVBench: of subtask `sub`)."""
        return self.local_task.format(sub=sub)

    def annotation_path(self, data_dir: Path, sub: str | None = None) -> Path:
        """Absolute path of the annotation jsonl under `data_dir` (MVBench: of subtask `sub`)."""
        return Path(data_dir).resolve() / self.annotation.format(sub=sub)


BENCHMARKS: dict[str, Benchmark] = {
    "mvbench": Benchmark(
        name="mvbench",
        online_tasks=("mvbench",),
        optional_tasks=(),
        metric="mvbench_accuracy",
        scale=100.0,
        local_task="mvbench_{sub}_local",
        annotation="mvbench/{sub}.jsonl",
        video_dir="mvbench_video",
        builtin_yaml="mvbench_{sub}.yaml",
        notes=(
            "20 subtasks x 200 questions; the group has no aggregate in 0.7.3 (average the subtasks: equal sizes, "
            "so macro = micro). Accuracy divides by non-empty predictions only. episodic_reasoning points at "
            "frame folders, not mp4s."
        ),
    ),
    "videomme": Benchmark(
        name="videomme",
        online_tasks=("videomme",),
        optional_tasks=(),
        metric="videomme_perception_score",
        scale=100.0,
        local_task="videomme_local",
        annotation="videomme/videomme.jsonl",
        video_dir="videomme/data",
        builtin_yaml="videomme.yaml",
        notes="2700 questions, 3 per video; no subtitles. Unparsed answers extract to '' and count as wrong.",
    ),
    "egoschema": Benchmark(
        name="egoschema",
        online_tasks=("egoschema_subset",),
        optional_tasks=(
            OptionalTask(
                name="egoschema",
                metric="submission",
                scale=100.0,
                note=(
                    "full 5031-question set without public labels: the aggregation writes a submission file and "
                    "POSTs it to validation-server.onrender.com, raising RuntimeError offline. Cannot be scored "
                    "offline; sample_score returns None for it."
                ),
            ),
        ),
        metric="score",
        scale=1.0,
        local_task="egoschema_local",
        annotation="egoschema/subset.jsonl",
        video_dir="egoschema/videos",
        builtin_yaml="egoschema_subset.yaml",
        notes="500-question labelled subset. A random letter is scored when nothing parses.",
    ),
    "nextqa": Benchmark(
        name="nextqa",
        online_tasks=("nextqa_mc_test",),
        optional_tasks=(
            OptionalTask(
                name="nextqa_oe_test",
                metric="WUPS",
                scale=100.0,
                note=(
                    "open-ended, graded by WUPS: needs pywsd and nltk wordnet/punkt data; offline its "
                    "process_results raises NameError (lemmatize_sentence). Not a 0/1 metric."
                ),
            ),
        ),
        metric="exact_match",
        scale=1.0,
        local_task="nextqa_mc_local",
        annotation="nextqa/mc_test.jsonl",
        video_dir="nextqa/NExTVideo",
        builtin_yaml="nextqa_mc_test.yaml",
        notes="Multiple-choice test split (~8.56k). A random letter is scored when nothing parses.",
    ),
    "probe": Benchmark(
        name="probe",
        online_tasks=(),
        optional_tasks=(),
        metric="probe_accuracy",
        scale=1.0,
        local_task="probe_{sub}",
        annotation="probe/{sub}.jsonl",
        video_dir="videos",
        builtin_yaml="",
        notes=(
            "Known-answer probe (eval/probe.py): generated, offline only, one task per family; written by "
            "eval.probe.write_probe, not write_local_tasks. Exact letter match; an unparsed answer is wrong."
        ),
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------------------------------


def _mvbench_subtask(task: str) -> str | None:
    """The subtask of `mvbench_<sub>` or `mvbench_<sub>_local`, or None if `task` is not one."""
    if not task.startswith("mvbench_"):
        return None
    sub = task.removeprefix("mvbench_").removesuffix("_local")
    return sub if sub in MVBENCH_SUBTASK_FOLDERS else None


def task_benchmark(task: str) -> str:
    """The benchmark a task belongs to.

    Args:
        task: an lmms-eval task name: online (`videomme`, `mvbench_action_antonym`, ...), optional (`egoschema`,
            `nextqa_oe_test`) or local (`videomme_local`, `mvbench_action_antonym_local`, ...).

    Returns:
        The key in `BENCHMARKS`.

    Raises:
        ValueError: `task` belongs to none of the four benchmarks.
    """
    if _mvbench_subtask(task) is not None:
        return "mvbench"
    if task.startswith("probe_"):
        from eval.probe import FAMILIES

        if task.removeprefix("probe_") in FAMILIES:
            return "probe"
    for bench in BENCHMARKS.values():
        names = {*bench.online_tasks, *(t.name for t in bench.optional_tasks)}
        if task in names or (bench.name != "mvbench" and task == bench.local_task):
            return bench.name
    raise ValueError(f"unknown task {task!r}: not a task of {sorted(BENCHMARKS)}")


def task_metric(task: str) -> tuple[str, float]:
    """The metric key of a task in lmms-eval's results and samples, and its scale (100.0 or 1.0).

    Args:
        task: any task name `task_benchmark` accepts.

    Returns:
        `(metric, scale)`: divide the reported value by `scale` for a 0-1 number.
    """
    bench = BENCHMARKS[task_benchmark(task)]
    for optional in bench.optional_tasks:
        if optional.name == task:
            return optional.metric, optional.scale
    return bench.metric, bench.scale


# --------------------------------------------------------------------------------------------------------------
# Local (offline) lmms-eval tasks
# --------------------------------------------------------------------------------------------------------------


class _Function(str):
    """A YAML `!function module.name` reference, kept as its text."""


class _BuiltinLoader(yaml.SafeLoader):
    """Reads lmms-eval task YAMLs without importing the functions they reference."""


_BuiltinLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


class _TaskDumper(yaml.SafeDumper):
    """Writes `_Function` values back as `!function` tags."""


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
# Prompts end in "\n": write them double-quoted with escapes, as lmms-eval's own YAMLs do, not folded.
_TaskDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None),
)

# Keys copied verbatim from the built-in task, so prompts (incl. the per-model variants selected by
# TaskManager(model_name=...)), generation settings and scoring are lmms-eval's own. Dataset keys are replaced and
# doc_to_visual is ours.
_COPIED_KEYS = (
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "process_results",
    "metric_list",
    "generation_kwargs",
    "lmms_eval_specific_kwargs",
    "cluster_key",
    "metadata",
)

_HEADER = "# Generated by eval.benchmarks.write_local_tasks; edits are overwritten.\n"


def _builtin_task_dir(bench: str) -> Path:
    """Folder of lmms-eval's built-in task, found without importing lmms-eval."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("lmms_eval is not installed")
    return Path(spec.origin).parent / "tasks" / bench


def _load_builtin_yaml(path: Path) -> dict[str, Any]:
    """A built-in task YAML with its `include:` merged the way lmms_eval/utils.py:load_yaml_config does."""
    config = yaml.load(path.read_text(), Loader=_BuiltinLoader)  # a SafeLoader subclass
    include = config.pop("include", None)
    if include is None:
        return config
    merged = _load_builtin_yaml(path.parent / include)
    merged.update(config)
    return merged


def _functions(value: Any) -> set[str]:
    """Names of all `!function utils.<name>` references inside a config value."""
    if isinstance(value, _Function):
        module, _, name = value.rpartition(".")
        if module != "utils":
            raise ValueError(f"expected a utils.<fn> reference, got {value!r}")
        return {name}
    if isinstance(value, dict):
        return set().union(*(_functions(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_functions(v) for v in value))
    return set()


def _local_task_config(bench: Benchmark, data_dir: Path, sub: str | None) -> dict[str, Any]:
    """The local task's config: the built-in one with a local json dataset and our doc_to_visual."""
    builtin = _load_builtin_yaml(_builtin_task_dir(bench.name) / bench.builtin_yaml.format(sub=sub))
    config: dict[str, Any] = {
        "task": bench.local_task_name(sub),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(bench.annotation_path(data_dir, sub))}},
        "test_split": "test",
        "doc_to_visual": _Function(f"utils.{bench.name}_local_doc_to_visual"),
    }
    config.update({key: builtin[key] for key in _COPIED_KEYS if key in builtin})
    return config


# The generated utils.py files. Their doc_to_visual mirrors the built-in path logic but returns the canonical path
# when no file exists, instead of sys.exit (videomme, egoschema) or FileNotFoundError (nextqa).
_UTILS_HEAD = '''"""Generated by eval.benchmarks.write_local_tasks: lmms-eval's `{bench}` task on local data.

Prompts, answer extraction and aggregation are lmms-eval's own, re-exported from lmms_eval.tasks.{bench}.utils.
Only doc_to_visual is ours: it resolves the video under DATA_DIR with the layout the built-in task uses under
$HF_HOME and returns that path even when the file is missing, so the model can record a per-sample failure.
"""

import os

{imports}
DATA_DIR = {data_dir!r}


def _first_existing(paths):
    """The first existing path, or the first (canonical) one when none exists."""
    return next((path for path in paths if os.path.exists(path)), paths[0])
'''

_DOC_TO_VISUAL = {
    # lmms_eval/tasks/mvbench/utils.py: mvbench_doc_to_visual; the built-in's data0613/ fallback (MVBench's
    # re-release of the clevrer and star clips) never triggers there (it tests the folder's basename), here it does.
    "mvbench": '''

def mvbench_local_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """[path] of the subtask's video under DATA_DIR/mvbench_video/<DATA_LIST[sub]>/."""
    folder = DATA_LIST[lmms_eval_specific_kwargs["sub_task"]]
    root = os.path.join(DATA_DIR, "mvbench_video")
    paths = [os.path.join(root, folder, doc["video"]), os.path.join(root, "data0613", folder, doc["video"])]
    return [_first_existing(paths)]
''',
    # lmms_eval/tasks/videomme/utils.py: videomme_doc_to_visual (tries .mp4, .MP4, .mkv).
    "videomme": '''

def videomme_local_doc_to_visual(doc):
    """[path] of DATA_DIR/videomme/data/<videoID>.mp4 (or .MP4 / .mkv if only that exists)."""
    stem = os.path.join(DATA_DIR, "videomme", "data", doc["videoID"])
    return [_first_existing([stem + ".mp4", stem + ".MP4", stem + ".mkv"])]
''',
    # lmms_eval/tasks/egoschema/utils.py: egoschema_doc_to_visual (tries .mp4, .MP4).
    "egoschema": '''

def egoschema_local_doc_to_visual(doc):
    """[path] of DATA_DIR/egoschema/videos/<video_idx>.mp4 (or .MP4 if only that exists)."""
    stem = os.path.join(DATA_DIR, "egoschema", "videos", doc["video_idx"])
    return [_first_existing([stem + ".mp4", stem + ".MP4"])]
''',
    # lmms_eval/tasks/nextqa/utils.py: nextqa_doc_to_visual -> _task_utils/video_loader.py: get_video.
    "nextqa": '''

def nextqa_local_doc_to_visual(doc):
    """[path] of DATA_DIR/nextqa/NExTVideo/<video>.mp4 (or .MP4 if only that exists)."""
    name = str(doc["video"]).removesuffix(".mp4")
    stem = os.path.join(DATA_DIR, "nextqa", "NExTVideo", name)
    return [_first_existing([stem + ".mp4", stem + ".MP4"])]
''',
}


def _utils_source(bench: str, data_dir: Path, functions: set[str]) -> str:
    """Source of a generated utils.py re-exporting `functions` from the built-in task module."""
    names = sorted(functions - {f"{bench}_local_doc_to_visual"} | ({"DATA_LIST"} if bench == "mvbench" else set()))
    lines = [f"from lmms_eval.tasks.{bench}.utils import (  # noqa: F401", *(f"    {name}," for name in names), ")"]
    if bench == "nextqa":
        # lmms_eval/tasks/nextqa/utils.py reads os.environ["HF_HOME"] at import (KeyError without it) for its own
        # doc_to_visual, which is not used here: supply the default only for the import.
        lines = [
            '_UNSET = "HF_HOME" not in os.environ',
            'os.environ.setdefault("HF_HOME", os.path.expanduser("~/.cache/huggingface"))',
            "try:",
            *(f"    {line}" for line in lines),
            "finally:",
            "    if _UNSET:",
            '        del os.environ["HF_HOME"]',
        ]
    imports = "\n".join(lines) + "\n"
    return _UTILS_HEAD.format(bench=bench, imports=imports, data_dir=str(data_dir)) + _DOC_TO_VISUAL[bench]


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` to `path` unless it already holds exactly that (keeps mtimes, so reruns are no-ops)."""
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------
# Annotation rows: checked before lmms-eval reads them
# --------------------------------------------------------------------------------------------------------------


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        return f"{key!r} must be a non-empty string, got {value!r}"
    return None


def _options(row: dict, key: str, low: int, high: int) -> str | None:
    value = row.get(key)
    if not isinstance(value, list) or not low <= len(value) <= high:
        return f"{key!r} must be a list of {low}-{high} options, got {value!r}"
    if not all(isinstance(v, str) and v.strip() for v in value):
        return f"{key!r} has an empty or non-string option: {value!r}"
    return None


def _videomme_values() -> dict[str, list[str]]:
    """The metadata values lmms-eval's Video-MME aggregation knows (any other raises KeyError after the run)."""
    from lmms_eval.tasks.videomme import utils

    return {
        "duration": list(utils.VIDEO_TYPE),
        "domain": list(utils.CATEGORIES),
        "sub_category": list(utils.SUB_CATEGORIES),
        "task_type": list(utils.TASK_CATEGORIES),
    }


def check_row(bench: str, row: Any) -> str | None:
    """What is wrong with one annotation row of `bench` for lmms-eval's task code, or None when nothing is.

    Checks the fields the built-in prompt, scoring and aggregation read: the video reference, the question, the
    options (present, non-empty, as many as the task's extractor handles), the answer (among the options) and
    Video-MME's metadata (values its aggregation has a bucket for).
    """
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    problems: list[str | None] = [_text(row, "question")]
    if bench == "mvbench":
        problems += [_text(row, "video"), _options(row, "candidates", 2, 5)]
        if not problems[-1] and row.get("answer") not in row["candidates"]:
            problems.append(f"answer {row.get('answer')!r} is not among the candidates {row['candidates']!r}")
    elif bench == "videomme":
        problems += [_text(row, "videoID"), _options(row, "options", 2, 4)]
        letters = "ABCD"[: len(row["options"])] if not problems[-1] else "ABCD"
        if not isinstance(row.get("answer"), str) or row["answer"] not in letters:
            problems.append(f"answer {row.get('answer')!r} is not one of the option letters {list(letters)}")
        if not any(problems):
            for key, known in _videomme_values().items():
                if row.get(key) not in known:
                    problems.append(f"unknown {key} {row.get(key)!r} (lmms-eval's Video-MME knows {len(known)})")
                    break
    elif bench == "egoschema":
        problems += [_text(row, "video_idx"), _options(row, "option", 5, 5)]
        answer = row.get("answer")
        if "answer" in row and answer is not None and (isinstance(answer, bool) or answer not in range(5)):
            problems.append(f"answer {answer!r} is not an option index 0-4")
    elif bench == "nextqa":
        if not isinstance(row.get("video"), int | str) or isinstance(row.get("video"), bool):
            problems.append(f"'video' must be a video id, got {row.get('video')!r}")
        problems += [_text(row, f"a{i}") for i in range(5)]
        answer = row.get("answer")
        if isinstance(answer, bool) or answer not in range(5):
            problems.append(f"answer {answer!r} is not an option index 0-4")
    return next((p for p in problems if p), None)


def _placeholder(bench: str, template: dict | None) -> dict:
    """A document lmms-eval's task code can prompt, score and aggregate without error (never sent to a model)."""
    if template is not None:
        return dict(template)
    return {
        "mvbench": {"video": "missing.mp4", "question": "-", "candidates": ["-", "--"], "answer": "-"},
        "videomme": {
            "videoID": "missing",
            "question": "-",
            "options": ["A. -", "B. -"],
            "answer": "A",
            "duration": "short",
            "domain": "Knowledge",
            "sub_category": "Humanity & History",
            "task_type": "Counting Problem",
            "question_id": "-",
            "video_id": "-",
        },
        "egoschema": {
            "video_idx": "missing",
            "question": "-",
            "option": ["A. -"] * 5,
            "answer": 0,
            "question_idx": "-",
        },
        "nextqa": {"video": 0, "question": "-", "answer": 0, "qid": 0, "type": "-", **{f"a{i}": "-" for i in range(5)}},
    }[bench]


def checked_annotations(bench: str, source: Path) -> tuple[str, list[str]]:
    """The annotation jsonl with every bad row replaced by a placeholder that carries the row's error.

    Blank lines are skipped (as JSON-lines readers do). A bad row (malformed JSON, missing or empty options, an
    answer not among them, unknown metadata) keeps its position, so document ids stay those of the file; its
    document gets :data:`DATA_ERROR` = ``"<file>:<line>: <problem>"`` and the model records it as a failed sample
    without running it. The placeholder copies the first good row's fields, so the column types stay consistent.

    Returns:
        The jsonl text to give lmms-eval, and one message per bad row.
    """
    rows, errors = [], []
    for number, line in enumerate(source.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row, problem = None, f"malformed JSON ({err.msg} at column {err.colno})"
        else:
            problem = check_row(bench, row)
        rows.append((number, row, problem))
    template = next((row for _, row, problem in rows if problem is None), None)
    out = []
    for number, row, problem in rows:
        if problem is None:
            out.append(row)
            continue
        message = f"{source}:{number}: {problem}"
        errors.append(message)
        out.append({**_placeholder(bench, template), DATA_ERROR: message})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), errors


def _mvbench_subtasks(data_dir: Path, requested: Sequence[str] | None) -> list[str]:
    """Subtasks to write: `requested`, or every subtask with an annotation file under `data_dir`."""
    bench = BENCHMARKS["mvbench"]
    if requested is None:
        present = [sub for sub in MVBENCH_SUBTASK_FOLDERS if bench.annotation_path(data_dir, sub).is_file()]
        if not present:
            raise FileNotFoundError(f"no MVBench annotations {bench.annotation.format(sub='<sub>')} in {data_dir}")
        return present
    unknown = [sub for sub in requested if sub not in MVBENCH_SUBTASK_FOLDERS]
    if unknown:
        raise ValueError(f"unknown MVBench subtasks {unknown}; known: {sorted(MVBENCH_SUBTASK_FOLDERS)}")
    return list(requested)


def write_local_tasks(
    data_dir: Path,
    names: Sequence[str],
    mvbench_subtasks: Sequence[str] | None = None,
    out_dir: Path | None = None,
) -> tuple[Path, list[str]]:
    """Write an lmms-eval task folder that runs the given benchmarks offline from `data_dir`.

    Layout written (one folder per benchmark, so a run imports only the built-in utils it needs)::

        <root>/<bench>/utils.py                 # re-exports + our doc_to_visual (root: out_dir or data_dir/lmms_tasks)
        <root>/<bench>/data/<annotation>.jsonl  # the checked annotation copy
        <root>/mvbench/mvbench_<sub>_local.yaml  # one per subtask
        <root>/videomme/videomme_local.yaml      # likewise egoschema_local, nextqa_mc_local

    Each YAML reads a checked copy of `<data_dir>/<Benchmark.annotation>` (`<root>/<bench>/data/`, see
    `checked_annotations`: a bad row becomes a recorded failed sample) with `dataset_path: json` and copies
    prompts, generation settings and scoring from the built-in task. Files are rewritten only when their content
    changes; files written earlier for other benchmarks or subtasks are left in place.

    Args:
        data_dir: benchmark data laid out like the built-in tasks' `$HF_HOME` cache (see `Benchmark`).
        names: benchmarks to write, keys of `BENCHMARKS`.
        mvbench_subtasks: MVBench subtasks to write; default: every subtask with an annotation in `data_dir`.
        out_dir: where the task folder goes (the runner passes one under `results_dir`, so a read-only dataset
            works); default `<data_dir>/lmms_tasks`.

    Returns:
        `(include_path, task_names)`: pass `include_path` to `lmms_eval.tasks.TaskManager(include_path=...)`
        (or `--include_path`) and run `task_names`.

    Raises:
        ValueError: an unknown benchmark or MVBench subtask.
        FileNotFoundError: a requested benchmark (or subtask) has no annotation file under `data_dir`.
    """
    data_dir = Path(data_dir).resolve()
    root = Path(out_dir) if out_dir is not None else data_dir / LOCAL_TASKS_DIR
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")
    if "probe" in names:
        raise ValueError("the probe's tasks are generated by eval.probe.write_probe, not copied from lmms-eval")
    task_names: list[str] = []
    for name in names:
        bench = BENCHMARKS[name]
        subs: list[str | None] = list(_mvbench_subtasks(data_dir, mvbench_subtasks)) if name == "mvbench" else [None]
        functions: set[str] = set()
        for sub in subs:
            annotation = bench.annotation_path(data_dir, sub)
            if not annotation.is_file():
                raise FileNotFoundError(f"{bench.local_task_name(sub)}: annotation {annotation} not found")
            checked, errors = checked_annotations(name, annotation)
            for message in errors:
                print(f"[vidprune] bad annotation row {message}; the sample is recorded as failed")
            copy = root / name / "data" / annotation.name
            _write_if_changed(copy, checked)
            config = _local_task_config(bench, data_dir, sub)
            config["dataset_kwargs"] = {"data_files": {"test": str(copy)}}
            functions |= _functions(config)
            text = yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=120)
            # PyYAML quotes every explicitly tagged scalar; lmms-eval's YAMLs write `!function utils.fn` plain.
            text = _HEADER + re.sub(r"!function '([\w.]+)'", r"!function \1", text)
            _write_if_changed(root / name / f"{config['task']}.yaml", text)
            task_names.append(config["task"])
        _write_if_changed(root / name / "utils.py", _utils_source(name, data_dir, functions))
    return root, task_names


def guarded_doc_to_visual(fn: Callable[[dict], Any], doc: dict) -> tuple[list[str] | None, str | None]:
    """Call a task's doc_to_visual without letting it end the run.

    The built-in videomme and egoschema doc_to_visual call `sys.exit` on a missing video (ending the whole
    evaluation) and nextqa's raises FileNotFoundError; this turns both into an error message.

    Args:
        fn: a one-argument doc_to_visual, e.g. `task.doc_to_visual` (a bound method that adds the task's
            lmms_eval_specific_kwargs) or a built-in `<bench>_doc_to_visual`.
        doc: one document of the task.

    Returns:
        `(visuals, None)` on success, `(None, "<ExceptionType>: <message>")` on `SystemExit` or any `Exception`.
        A returned path is not checked for existence: decoding reports that.
    """
    try:
        visuals = fn(doc)
    except (SystemExit, Exception) as exc:  # everything but Ctrl-C, sys.exit included
        return None, f"{type(exc).__name__}: {exc}"
    return ([visuals] if isinstance(visuals, str) else list(visuals)), None


# --------------------------------------------------------------------------------------------------------------
# Per-sample scoring from lmms-eval's own outputs
# --------------------------------------------------------------------------------------------------------------


def sample_score(task: str, metric_value: Any) -> float | None:
    """0/1 correctness of one sample, from the value lmms-eval's `process_results` logged for the task's metric.

    Reads the metric named by `task_metric(task)` (the per-sample logs keep it under that key) with the rule of the
    task's own aggregation. A random-fallback answer that happened to be right still scores 1 here: combine with
    `parse_ok` for an honest score, and count samples that failed (no response) as 0.

    * MVBench `mvbench_accuracy`: `{"pred_answer", "gt_answer", "score"}` -> `score` (from `mcq_acc`).
    * Video-MME `videomme_perception_score`: `{..., "pred_answer", "answer", "score"}` -> `pred_answer == answer`
      (what `videomme_aggregate_results` counts).
    * EgoSchema `score`: `{"pred": index, "ground_truth": index}` -> `str(pred) == str(ground_truth)`
      (`egoschema_aggregate_score`); None without a label (the full set's `submission` has none).
    * NExT-QA MC `exact_match`: a bool. NExT-QA OE `WUPS` is graded, not 0/1: None.

    Args:
        task: any task name `task_benchmark` accepts.
        metric_value: the logged value, or None when the sample has none.

    Returns:
        1.0 or 0.0, or None when the value carries no 0/1 correctness.
    """
    bench = task_benchmark(task)
    if metric_value is None:
        return None
    if bench == "probe":  # eval/probe.py: probe_process_results returns the 0/1 score itself
        return float(metric_value)
    if bench == "mvbench":  # lmms_eval/tasks/mvbench/utils.py: mvbench_process_results
        return float(metric_value["score"])
    if bench == "videomme":  # lmms_eval/tasks/videomme/utils.py: videomme_process_results / _aggregate_results
        return float(metric_value["pred_answer"] == metric_value["answer"])
    if bench == "egoschema":  # lmms_eval/tasks/egoschema/utils.py: egoschema_process_results_generation
        if not isinstance(metric_value, dict) or "ground_truth" not in metric_value:
            return None
        if metric_value["ground_truth"] is None:
            return None
        return float(str(metric_value["ground_truth"]) == str(metric_value["pred"]))
    # lmms_eval/tasks/nextqa/utils.py: nextqa_mc_process_results returns {"exact_match": bool}
    if isinstance(metric_value, dict):
        return None
    return float(bool(metric_value))


def _mmmu_parses(response: str, index2ans: dict[str, str]) -> bool:
    """Whether the MMMU-style `parse_multi_choice_response` finds a candidate (i.e. does not pick at random).

    Same candidate rule as lmms_eval/tasks/nextqa/utils.py (and egoschema/utils.py): after stripping
    `,.!?;:'` from both ends and padding with spaces, the response contains "(X)", "X " or "X." for an option
    letter X, or, if it has more than 5 words, some option's text (case-insensitive).
    """
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    if any(f"({x})" in response or f"{x} " in response or f"{x}." in response for x in index2ans):
        return True
    return len(response.split()) > 5 and any(ans.lower() in response.lower() for ans in index2ans.values())


def parse_ok(task: str, response: str, doc: dict) -> bool:
    """Whether the task's own answer extraction finds an option in the raw response, without a random fallback.

    Rules (lmms-eval 0.7.3):

    * MVBench: `mcq_acc` (lmms_eval/tasks/mvbench/utils.py) maps the response to some option letter A-E of the
      doc: `^X.` or a standalone letter after lower-casing (so the English word "a" counts as A, as in lmms-eval).
      Its aggregation counts any non-empty response as answered; this is stricter.
    * Video-MME: `extract_characters_regex` (lmms_eval/tasks/videomme/utils.py -> `extract_mcq_answer`, A-D)
      returns a letter, not "".
    * EgoSchema: `parse_multi_choice_response` (lmms_eval/tasks/egoschema/utils.py) reports a matched candidate;
      the global `random` state its fallback would consume is restored.
    * NExT-QA MC: the MMMU candidate rule of its `parse_multi_choice_response` finds a letter or option text
      (`_mmmu_parses`; that copy does not report whether it fell back to random). NExT-QA OE: a non-empty response.

    Args:
        task: any task name `task_benchmark` accepts.
        response: the model's raw response (lmms-eval's `filtered_resps[0]`).
        doc: the task document (the per-sample logs drop it: take it from `task.test_docs()[doc_id]`).

    Returns:
        True when an answer parses.
    """
    bench = task_benchmark(task)
    if bench == "probe":  # the generated utils.py's probe_parse: a standalone letter A-D
        return re.search(r"\b[ABCD]\b", response or "") is not None
    if bench == "mvbench":
        from lmms_eval.tasks.mvbench.utils import mcq_acc

        return any(mcq_acc(letter, response) for letter in string.ascii_uppercase[: len(doc["candidates"])])
    if bench == "videomme":
        from lmms_eval.tasks.videomme.utils import extract_characters_regex

        return extract_characters_regex(response) != ""
    if bench == "egoschema":
        from lmms_eval.tasks.egoschema.utils import get_multi_choice_info, parse_multi_choice_response

        index2ans, all_choices = get_multi_choice_info(doc)
        state = random.getstate()
        try:
            _, matched = parse_multi_choice_response(response, all_choices, index2ans)
        finally:
            random.setstate(state)
        return bool(matched)
    if task == "nextqa_oe_test":
        return bool(response.strip())
    # lmms_eval/tasks/nextqa/utils.py: get_multi_choice_info (not imported: that module needs HF_HOME and tries
    # nltk downloads at import).
    index2ans = {letter: str(doc[f"a{i}"]).strip() for i, letter in enumerate("ABCDE")}
    return _mmmu_parses(response, index2ans)
