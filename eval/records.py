"""Result records: the per-sample log written as samples finish, and the ``record.json`` of one evaluation cell.

Layout: ``results/runs/<model>/<benchmark>/<prune>/<knob>/{record.json, samples.jsonl, scores.jsonl, config.yaml}``,
``<knob>`` being the ratio (``0.3``; ``1.0`` for ``none``) or, for a target achieved budget, ``<measure>-<budget>``
(``flops-0.3``; :func:`knob_folder`).

``samples.jsonl`` gets one line per generated sample, written with one ``write`` and fsynced before the next sample
starts, so a killed run loses at most the sample in flight; a torn last line is cut off before the next append. Each
line carries the cell's settings hash and the sample's answer and timing keys (:mod:`eval.keys`): a re-run reuses a
sample only when its inputs are unchanged and it did not fail. ``record.json``, ``scores.jsonl`` and the tables are
written to a temporary file and renamed (:func:`write_atomic`); a lock file (:func:`cell_lock`) keeps two runs off
one cell; :func:`cell_dir` keeps every cell folder under ``results_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_VERSION",
    "CellLocked",
    "SampleLog",
    "StorageError",
    "build_record",
    "cell_dir",
    "cell_lock",
    "config_hash",
    "environment",
    "evidence_summary",
    "knob_folder",
    "percentile",
    "write_atomic",
]

RECORD_VERSION = 1
REPO = Path(__file__).resolve().parents[1]


class StorageError(RuntimeError):
    """A write failed (full disk, read-only folder); the message is one line and earlier files are intact."""


class CellLocked(RuntimeError):
    """Another run holds the cell's lock file."""


def storage_error(path: Path, err: OSError) -> StorageError:
    """One line for a failed write: ENOSPC says so, anything else names the OS error."""
    if err.errno == errno.ENOSPC:
        return StorageError(
            f"no space left on the device writing {path}; every earlier file is intact: free space and re-run "
            "(finished samples resume)"
        )
    return StorageError(f"cannot write {path}: {err.strerror or err}")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, fsync it and rename it over ``path``.

    A reader sees the old file or the new one, never a torn one; on failure (ENOSPC included) the temporary file is
    removed, ``path`` is untouched and :class:`StorageError` says what happened.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, err) from err


@contextlib.contextmanager
def cell_lock(run_dir: Path, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` (``flock``, exclusive) while a run writes the cell.

    The kernel drops the lock when its process dies (``kill -9`` included), so a crashed run never leaves a stale
    lock. A second run on the same cell waits up to ``wait_s`` seconds, then stops with :class:`CellLocked` naming
    the holder.
    """
    run_dir = Path(run_dir)
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise storage_error(path, err) from err
    deadline = time.monotonic() + max(0.0, float(wait_s))
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
                    raise CellLocked(
                        f"another run is writing {run_dir} ({holder}); wait for it to finish, or pass "
                        "lock_wait=<seconds> to wait for it"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since {datetime.now(UTC):%H:%M:%S} UTC".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing drops the flock


def cell_dir(results_dir: Path, *names: str) -> Path:
    """``<results_dir>/runs/<names...>``, refusing any name that could leave ``results_dir``.

    The names are checked by :func:`eval.options.check_name` when the config is composed; this is the last guard:
    every part must be one plain path component and the joined path must stay under ``results_dir``.
    """
    root = Path(os.path.abspath(results_dir))
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"refusing path component {name!r} under {root}: names must be plain folder names")
    path = Path(os.path.normpath(root.joinpath("runs", *names)))
    if os.path.commonpath([root, path]) != str(root):
        raise ValueError(f"refusing {path}: it is outside results_dir {root}")
    return path


def knob_folder(prune: str, ratio: float | None, budget: float | None = None, measure: str | None = None) -> str:
    """Run folder of a method setting: ``1.0`` for ``none``, ``<measure>-<budget>`` for a budget, else the ratio."""
    if prune == "none":
        return "1.0"
    if budget is not None:
        return f"{measure}-{float(budget):g}"
    return f"{float(ratio):g}"


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of the settings that change a sample's answer (:func:`eval.keys.answer_settings`)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class SampleLog:
    """Append-only JSONL of finished samples of one cell, read for the cell's answer-settings hash.

    Every line carries ``config_hash`` (the cell's settings), ``answer_key`` and ``timing_key``
    (:mod:`eval.keys`). ``done`` maps ``(task, doc_id)`` to the latest line with this hash; whether it may be reused
    for the current inputs is :meth:`lookup`'s decision. Opening the log cuts a torn last line (a kill or a full
    disk mid-write) off the file, so the next append starts on a fresh line; ``torn_bytes`` says how much went.
    Open it only while the run holds the cell's lock (:func:`cell_lock`; in a multi-process cell, rank 0 holds it for
    all ranks). Reading, cutting and every append hold an exclusive ``flock`` on the log itself, so the ranks of one
    cell append to one file and a reader never cuts a line another rank is writing.
    """

    path: Path
    hash: str
    done: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    torn_bytes: int = 0
    bad_lines: int = 0

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(self.path.parent, err) from err
        if not self.path.exists():
            return
        with self.path.open("r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # the processes of one cell (nproc) share the log: one at a time
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                self.torn_bytes = len(data) - keep
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
                data = data[:keep]
        for line in data.decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                key = (entry["task"], int(entry["doc_id"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                self.bad_lines += 1
                continue
            if entry.get("config_hash") == self.hash:
                self.done[key] = entry

    def get(self, task: str, doc_id: int) -> dict[str, Any] | None:
        """The latest entry of this sample under this cell's settings (whatever its inputs were)."""
        return self.done.get((task, int(doc_id)))

    def lookup(self, task: str, doc_id: int, answer_key: str, timing_key: str, retime: bool) -> tuple[Any, str]:
        """Whether the recorded sample can stand for this run.

        Returns:
            ``(entry, "reuse")`` when its answer key matches, it did not fail, and its timing key matches (or
            ``retime`` is false); otherwise ``(previous entry or None, reason)`` with reason ``new``, ``inputs
            changed``, ``failed before`` or ``timing environment changed``: the sample runs again.
        """
        entry = self.get(task, doc_id)
        if entry is None:
            return None, "new"
        if entry.get("answer_key") != answer_key:
            return entry, "inputs changed"
        if entry.get("failed"):
            return entry, "failed before"
        if retime and entry.get("timing_key") != timing_key:
            return entry, "timing environment changed"
        return entry, "reuse"

    def append(self, entry: dict[str, Any]) -> None:
        """Append one line with a single write, fsynced; a failed write is cut back off and raises StorageError."""
        entry = {**entry, "config_hash": self.hash}
        line = (json.dumps(entry, default=str) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise storage_error(self.path, err) from err
        try:
            # Exclusive while appending: the ranks of a multi-process cell append to one log, and the cut-back below
            # must never take another process's line with it (O_APPEND alone is not atomic on NFS).
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            except OSError as err:
                os.ftruncate(fd, size)  # leave no fragment for the next append to join
                raise storage_error(self.path, err) from err
        finally:
            os.close(fd)
        self.done[(entry["task"], int(entry["doc_id"]))] = entry


def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100]; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = run("rev-parse", "HEAD")
        # results/, outputs/ and data/ are written by runs themselves; they do not make the code dirty.
        dirty = bool(run("status", "--porcelain", "--", ".", ":!results", ":!outputs", ":!data"))
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha, "git_dirty": dirty}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Versions, git state and machine of this run."""
    import torch

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    if device == "cuda" and torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    else:
        machine = (
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        )
    return {
        "versions": {
            "vidprune": version("vidprune"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "lmms_eval": version("lmms-eval"),
            "python": platform.python_version(),
        },
        **_git(),
        "device": device,
        "machine": machine,
        "threads": torch.get_num_threads(),
        "timer": "cuda_events" if device == "cuda" else "perf_counter",
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _budget_achieved(st: Mapping[str, Any]) -> tuple[float, bool]:
    """One budget sample's achieved value and whether it is on target.

    For ``tokens_in``, ``final`` and ``layer_avg`` the value is measured from the prefill's own per-layer counts (the
    solver's prediction is what they are for every method whose counts are known before the LLM; FrameFusion's are
    known only after it); for ``flops`` it is the solver's value on those counts with the prompt. On target: the
    solver reached the target and the measured value is within its tolerance (``prune.budget.TOLERANCE``).
    """
    from prune.budget import TOLERANCE

    entry, counts = st["budget"], st.get("visual_per_layer")
    count_of = {"tokens_in": lambda c: c[0], "final": lambda c: c[-1], "layer_avg": lambda c: sum(c) / len(c)}
    measure = count_of.get(entry["measure"])
    value = entry["achieved"] if measure is None or not counts else measure(counts) / st["visual_in"]
    return value, bool(entry["reachable"]) and abs(value - entry["budget"]) <= TOLERANCE * entry["budget"] + 1e-12


def _budget_summary(meta: Mapping[str, Any], stats: list[dict[str, Any]]) -> dict[str, Any]:
    """``budget=`` runs: the target, and over samples what was achieved and the knobs the solver chose."""
    budgeted = [st for st in stats if st.get("budget")]
    out: dict[str, Any] = {"budget_target": meta.get("budget_target"), "budget_measure": meta.get("budget_measure")}
    if not budgeted:
        return out
    knobs: dict[str, list[float]] = {}
    for st in budgeted:
        for name, value in st["budget"]["knobs"]:
            knobs.setdefault(name, []).append(float(value))
    achieved = [_budget_achieved(st) for st in budgeted]
    return {
        **out,
        "budget_achieved_pct": 100 * statistics.mean(value for value, _ in achieved),
        # samples not within ±2 % of the target: the method's nearest achievable value was used, or (a method whose
        # counts exist only after the prefill) the measured counts missed it
        "budget_n_unreachable": sum(1 for _, on_target in achieved if not on_target),
        "budget_knobs": {k: {"median": _median(v), "min": min(v), "max": max(v)} for k, v in knobs.items()},
    }


def build_record(
    *,
    meta: Mapping[str, Any],
    samples: list[dict[str, Any]],
    llm_shape: Mapping[str, int],
    flops: list[Mapping[str, float]],
    timing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate one cell's scored samples into ``record.json``.

    Args:
        meta: model, prune, ratio, benchmark, seed, config, environment.
        samples: one dict per sample with ``task``, ``score`` (0/1, 0 when failed), ``failed``, ``parse_ok`` and the
            generation ``stats`` (absent for failed samples).
        llm_shape: the LLM's dimensions (for the record).
        flops: per successful sample, :func:`eval.backbones.flops_of`'s dict.
        timing: this run's :func:`eval.keys.timing_env`. Samples carry the ``timing_key`` and ``timing_env`` they
            were timed under; times, memory and KV bytes aggregate only over one environment: this run's when any
            sample was timed here, else the environment most samples were timed in (``timing_stale`` is then true).
            ``timing_env`` always names the environment the times come from. None: every sample counts.

    Returns:
        The record: accuracy over all samples (failed ones count as wrong), per-task accuracy, token, FLOPs, TTFT,
        decode and memory statistics. Times are medians over samples; every sample is timed warm (the backbone runs
        one untimed generate first).
    """
    ok = [s for s in samples if not s["failed"]]
    timed, timing_meta = _timing_group(ok, timing)
    stats = [s["stats"] for s in timed]
    token_stats = [s["stats"] for s in ok]
    per_task: dict[str, list[float]] = {}
    for s in samples:
        per_task.setdefault(s["task"], []).append(s["score"])
    accuracy = 100 * sum(s["score"] for s in samples) / len(samples) if samples else None
    ttft_ms = [1000 * st["ttft_s"] for st in token_stats]
    stage_ms = {
        k: _median([1000 * st["timings_s"][k] for st in stats]) for k in (stats[0]["timings_s"] if stats else {})
    }
    pre = [st["visual_pre_llm"] / st["visual_in"] for st in token_stats]
    final = [st["visual_per_layer"][-1] / st["visual_in"] for st in token_stats]
    layer_avg = [sum(st["visual_per_layer"]) / (len(st["visual_per_layer"]) * st["visual_in"]) for st in token_stats]
    peaks = [st["peak_mem_bytes"] for st in stats if st.get("peak_mem_bytes") is not None]
    rss = [st["rss_peak_bytes"] for st in stats if st.get("rss_peak_bytes") is not None]

    def total(key: str) -> float:
        return sum(f[key] for f in flops)

    def mean_t(key: str) -> float | None:
        return total(key) / len(flops) / 1e12 if flops else None

    decode = [1000 * st["decode_s_per_token"] for st in stats if st.get("decode_s_per_token") is not None]
    return {
        "record_version": RECORD_VERSION,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **meta,
        "n_samples": len(samples),
        "n_failed": len(samples) - len(ok),
        "n_parse_failed": sum(1 for s in ok if not s["parse_ok"]),
        "accuracy": accuracy,
        "accuracy_by_task": {t: 100 * sum(v) / len(v) for t, v in sorted(per_task.items())},
        "visual_tokens_in": _median([st["visual_in"] for st in token_stats]),
        # The four budget measures (docs/methods/README.md), means over samples; flops_ratio below is the fourth.
        "tokens_in_retained_pct": 100 * statistics.mean(pre) if pre else None,
        "final_retained_pct": 100 * statistics.mean(final) if final else None,
        "layer_avg_retained_pct": 100 * statistics.mean(layer_avg) if layer_avg else None,
        "pre_llm_retained_pct": 100 * statistics.mean(pre) if pre else None,  # = tokens_in, for older readers
        **_budget_summary(meta, token_stats),
        # FLOPs: the papers' convention (FastV) for the ratio the tables show; executed FLOPs next to it.
        "prefill_tflops": mean_t("prefill"),
        "flops_ratio": total("prefill") / total("prefill_full") if flops else None,
        "prefill_exact_tflops": mean_t("prefill_exact"),
        "flops_ratio_exact": total("prefill_exact") / total("prefill_exact_full") if flops else None,
        "scoring_gflops": 1000 * mean_t("scoring") if flops else None,
        "decode_exact_tflops": mean_t("decode_exact"),
        # the method's work outside the LLM: vision-side inputs (VisionZip, FastVID) and its own pre-LLM FLOPs
        "pre_llm_gflops": 1000 * total("pre_llm") / len(flops) / 1e12 if flops and "pre_llm" in flops[0] else None,
        "ttft_ms_median": _median(ttft_ms),
        "ttft_ms_p90": percentile(ttft_ms, 90),
        "stage_ms_median": stage_ms,
        "decode_ms_per_token_median": _median(decode),
        "kv_cache_bytes_median": _median([st["kv_bytes"] for st in stats]),
        # GPU: the largest torch.cuda.max_memory_allocated over samples (reset before each sample's generate).
        # CPU: the process's peak resident set (it only grows over a process) next to the KV-cache bytes above.
        "peak_memory_bytes": max(peaks) if peaks else (max(rss) if rss else None),
        "peak_memory_kind": "cuda_max_allocated" if peaks else "process_peak_rss",
        "llm_shape": dict(llm_shape) if isinstance(llm_shape, Mapping) else asdict(llm_shape),
        **evidence_summary(ok),
        **timing_meta,
    }


def evidence_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean evidence retention (probe samples, :func:`eval.probe.evidence_retention`) in percent.

    ``evidence_by_stage_pct`` is ``[entering the LLM, after in-LLM stage 1, ...]``; ``evidence_final_pct`` its last
    entry (what reaches the last decoder layer); ``evidence_final_by_task_pct`` the same per task. All None when no
    sample carries evidence (benchmarks other than the probe).
    """
    rows = [(s["task"], s["stats"]["evidence_retention"]) for s in samples if "evidence_retention" in s["stats"]]
    if not rows:
        return {"evidence_pre_llm_pct": None, "evidence_final_pct": None, "evidence_by_stage_pct": None,
                "evidence_final_by_task_pct": None}  # fmt: skip
    stages = [[r["pre_llm"], *r["stages"]] for _, r in rows]
    depth = min(len(x) for x in stages)
    by_stage = [100 * statistics.mean(x[i] for x in stages) for i in range(depth)]
    per_task: dict[str, list[float]] = {}
    for (task, _), x in zip(rows, stages, strict=True):
        per_task.setdefault(task, []).append(x[-1])
    return {
        "evidence_pre_llm_pct": by_stage[0],
        "evidence_final_pct": 100 * statistics.mean(x[-1] for x in stages),
        "evidence_by_stage_pct": by_stage,
        "evidence_final_by_task_pct": {t: 100 * statistics.mean(v) for t, v in sorted(per_task.items())},
    }


def _timing_group(ok: list[dict[str, Any]], timing: Mapping[str, Any] | None) -> tuple[list, dict[str, Any]]:
    """The samples whose times a record aggregates (one environment only) and the fields that say which."""
    if timing is None:
        return ok, {}
    from eval.keys import timing_key

    here = timing_key(timing)
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in ok:
        groups.setdefault(s.get("timing_key") or "unknown", []).append(s)
    if here in groups or not groups:
        key, env, stale = here, dict(timing), False
    else:  # nothing timed here (retime=false after a change): report the largest group, and say so
        key = max(groups, key=lambda k: len(groups[k]))
        env, stale = groups[key][0].get("timing_env"), True
    chosen = groups.get(key, [])
    return chosen, {
        "timing_env": env,
        "timing_stale": stale,
        "n_timed": len(chosen),
        "n_timing_other_env": len(ok) - len(chosen),
    }
