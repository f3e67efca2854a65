"""Result records: the per-sample log written as samples finish, and the ``record.json`` of one evaluation cell.

Layout: ``results/runs/<model>/<benchmark>/<prune>/<ratio>/{record.json, samples.jsonl, scores.jsonl, config.yaml}``.

``samples.jsonl`` gets one line per generated sample, flushed and fsynced before the next sample starts, so a killed
run loses at most the sample in flight. Each line carries the hash of the run's configuration; a re-run of the same
configuration skips every sample already in the log, and a changed configuration never reuses stale lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_VERSION",
    "SampleLog",
    "build_record",
    "config_hash",
    "environment",
    "evidence_summary",
    "percentile",
]

RECORD_VERSION = 1
REPO = Path(__file__).resolve().parents[1]


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of the settings that change a sample's answer (model, strategy, frames, decoding)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class SampleLog:
    """Append-only JSONL of finished samples, keyed by ``(task, doc_id)`` for one configuration hash."""

    path: Path
    hash: str
    done: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open() as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill: that sample runs again
                        continue
                    if entry.get("config_hash") == self.hash:
                        self.done[(entry["task"], int(entry["doc_id"]))] = entry

    def get(self, task: str, doc_id: int) -> dict[str, Any] | None:
        return self.done.get((task, int(doc_id)))

    def append(self, entry: dict[str, Any]) -> None:
        entry = {**entry, "config_hash": self.hash}
        with self.path.open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
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


def build_record(
    *,
    meta: Mapping[str, Any],
    samples: list[dict[str, Any]],
    llm_shape: Mapping[str, int],
    flops: list[Mapping[str, float]],
) -> dict[str, Any]:
    """Aggregate one cell's scored samples into ``record.json``.

    Args:
        meta: model, prune, ratio, benchmark, seed, config, environment.
        samples: one dict per sample with ``task``, ``score`` (0/1, 0 when failed), ``failed``, ``parse_ok`` and the
            generation ``stats`` (absent for failed samples).
        llm_shape: the LLM's dimensions (for the record).
        flops: per successful sample, :func:`eval.backbones.flops_of`'s dict.

    Returns:
        The record: accuracy over all samples (failed ones count as wrong), per-task accuracy, token, FLOPs, TTFT,
        decode and memory statistics. Times are medians over samples; every sample is timed warm (the backbone runs
        one untimed generate first).
    """
    ok = [s for s in samples if not s["failed"]]
    stats = [s["stats"] for s in ok]
    per_task: dict[str, list[float]] = {}
    for s in samples:
        per_task.setdefault(s["task"], []).append(s["score"])
    accuracy = 100 * sum(s["score"] for s in samples) / len(samples) if samples else None
    ttft_ms = [1000 * st["ttft_s"] for st in stats]
    stage_ms = {
        k: _median([1000 * st["timings_s"][k] for st in stats]) for k in (stats[0]["timings_s"] if stats else {})
    }
    pre = [st["visual_pre_llm"] / st["visual_in"] for st in stats]
    layer_avg = [sum(st["visual_per_layer"]) / (len(st["visual_per_layer"]) * st["visual_in"]) for st in stats]
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
        "visual_tokens_in": _median([st["visual_in"] for st in stats]),
        "pre_llm_retained_pct": 100 * statistics.mean(pre) if pre else None,
        "layer_avg_retained_pct": 100 * statistics.mean(layer_avg) if layer_avg else None,
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
