"""Resume keys: what makes a recorded answer or a recorded timing reusable.

A finished sample in ``samples.jsonl`` is reused only when its **answer key** equals the one this run computes for
the same sample, and its timings only count as this run's when its **timing key** matches too.

* **Answer key** (:func:`answer_key`), per sample: the cell's answer settings (:func:`answer_settings`: the model
  config with the checkpoint's identity, the strategy with all its settings, frames, decoding, seed, and the
  benchmark's data identity: mode, benchmarks and the resolved ``data_dir``), plus the sample's own inputs: its
  annotation row (the document, hashed as canonical JSON, so an edited row is recomputed and an untouched one is
  not), the prompt text, the generation kwargs and the video's fingerprint (:func:`video_fingerprint`).
* **Timing key** (:func:`timing_key`): device, dtype, threads, machine, git commit (and dirty flag), the versions
  of torch, transformers and lmms-eval, the cell's processes (``nproc``) and decode workers (``prefetch``). A sample
  whose answer key matches but whose timing key differs keeps its answer; it is re-timed (``retime=true``, the
  default) or its timings are kept apart and the record says from which environment its TTFT comes
  (``retime=false``, see :func:`eval.records.build_record`).

Video fingerprint: size, ``mtime_ns`` and the SHA-256 of the first and last 64 KiB (the whole file when smaller).
Hashing every byte of a benchmark's videos (hundreds of GB) on every resume would cost more than the samples it
saves; size + mtime catches a re-encoded, re-downloaded or replaced file, and the head/tail hash catches a
replacement copied with its mtime preserved (``cp -p``, ``rsync -t``) that happens to have the same size. A frame
folder is fingerprinted by its files' names, sizes and mtimes. A missing path has the fingerprint ``None``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "answer_key",
    "answer_settings",
    "checkpoint_identity",
    "file_sha256",
    "stable_hash",
    "timing_env",
    "timing_key",
    "video_fingerprint",
]

_EDGE = 64 * 1024  # bytes hashed at each end of a video


def stable_hash(value: Any, length: int = 16) -> str:
    """Short SHA-256 of canonical JSON (sorted keys; non-JSON values by ``str``)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file (annotations: small)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def video_fingerprint(path: str | Path | None) -> dict[str, Any] | None:
    """Cheap content identity of a video file or frame folder (see the module docstring); None when missing."""
    if path is None:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    if p.is_dir():
        entries = []
        for child in sorted(p.iterdir()):
            try:
                cst = child.stat()
            except OSError:
                continue
            entries.append((child.name, cst.st_size, cst.st_mtime_ns))
        return {"kind": "dir", "files": len(entries), "hash": stable_hash(entries, 32)}
    digest = hashlib.sha256()
    try:
        with p.open("rb") as f:
            digest.update(f.read(_EDGE))
            if st.st_size > 2 * _EDGE:
                f.seek(-_EDGE, os.SEEK_END)
            digest.update(f.read(_EDGE))
    except OSError:
        return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": None}
    return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": digest.hexdigest()[:32]}


def _hf_snapshot(repo_id: str) -> str | None:
    """The commit a hub id resolves to in the local HF cache (``refs/main``), or None."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    ref = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def checkpoint_identity(model: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the weights are, beyond the checkpoint's name.

    A local folder: the names, sizes and mtimes of its top-level files (a re-converted or re-downloaded checkpoint
    gets new ones). A hub id: the snapshot commit the local cache resolves it to. Tiny random models: None (their
    weights follow from the config and ``model.seed``, both already in the answer settings).
    """
    ckpt = model.get("checkpoint")
    if not ckpt:
        return None
    path = Path(str(ckpt)).expanduser()
    if path.exists():
        return {"local": str(path.resolve()), "files": video_fingerprint(path) if path.is_dir() else None}
    return {"hub": str(ckpt), "snapshot": _hf_snapshot(str(ckpt))}


def answer_settings(
    model: Mapping[str, Any],
    prune: Mapping[str, Any],
    seed: int,
    max_new_tokens: int | None,
    benchmark: Mapping[str, Any],
    data_dir: str | None,
) -> dict[str, Any]:
    """The cell-level settings that decide an answer (hashed into every sample's answer key).

    Args:
        model: the resolved model config (frames, dtype, loader, checkpoint, ...).
        prune: the resolved strategy config (``_target_`` and every setting; ``none`` without its ignored ratio).
        seed: the run's seed.
        max_new_tokens: the decoding override (None = the task's).
        benchmark: the resolved benchmark config (``mode``, ``benchmarks``).
        data_dir: the resolved absolute data folder of an offline benchmark, None online.
    """
    return {
        "model": dict(model),
        "checkpoint": checkpoint_identity(model),
        "prune": dict(prune),
        "seed": int(seed),
        "max_new_tokens": max_new_tokens,
        "benchmark": {"mode": benchmark.get("mode"), "benchmarks": list(benchmark.get("benchmarks") or [])},
        "data_dir": data_dir,
    }


def answer_key(
    settings_hash: str,
    task: str,
    doc_id: int,
    doc: Any,
    context: str,
    gen_kwargs: Mapping[str, Any],
    video: str | None,
    fingerprint: Mapping[str, Any] | None,
) -> str:
    """One sample's answer key: the cell's settings hash and everything the sample itself feeds the model."""
    return stable_hash(
        {
            "settings": settings_hash,
            "task": task,
            "doc_id": int(doc_id),
            "doc": stable_hash(doc, 32),
            "context": context,
            "gen_kwargs": dict(gen_kwargs),
            "video": video,
            "video_fingerprint": fingerprint,
        },
        24,
    )


def timing_env(env: Mapping[str, Any], dtype: str | None, processes: int = 1, prefetch: int = 0) -> dict[str, Any]:
    """The environment fields a timing depends on, from :func:`eval.records.environment` plus the model dtype.

    ``processes`` (a cell's ``nproc``) and ``prefetch`` (decode workers) are part of it: on a CPU they share the cores
    with the model, so they change every stage's time.
    """
    versions = env.get("versions") or {}
    return {
        "processes": int(processes),
        "prefetch": int(prefetch),
        "device": env.get("device"),
        "dtype": dtype,
        "threads": env.get("threads"),
        "machine": env.get("machine"),
        "git_sha": env.get("git_sha"),
        "git_dirty": env.get("git_dirty"),
        "versions": {k: versions.get(k) for k in ("torch", "transformers", "lmms_eval")},
    }


def timing_key(timing: Mapping[str, Any]) -> str:
    """Hash of :func:`timing_env`'s dict."""
    return stable_hash(dict(timing))
