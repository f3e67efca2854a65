"""Decode cache: the preprocessed frames of a video, on disk, shared by every cell and method of a results folder.

Pruning never changes what comes before the vision tower, so a sweep (paired ``none``, every method, every ratio)
would decode and preprocess every video once per cell. The cache stores each video's ``[1, T, 3, H, W]`` pixels
(exactly, in the dtype the family's transform returns) under ``<results_dir>/.cache/frames/``, so the second cell of
a sweep decodes nothing.

**Key** (:func:`entry_key`): the video's path (resolved) and fingerprint (:func:`eval.keys.video_fingerprint`: size,
``mtime_ns`` and a hash of its first and last 64 KiB), the number of sampled frames, and the preprocessing: the
transform's name, the SHA-256 of its module's source and of every ``prune/adapters`` module (where the families'
transforms live), and the torch and decord versions. A re-encoded, replaced or touched video, another frame count,
or an edited transform gets a new key and is decoded again; nothing is reused where its inputs changed.

**Times stay honest.** An entry keeps the ``video_decode`` and ``preprocess`` seconds measured when it was decoded
and the timing key (:func:`eval.keys.timing_key`) of that environment. A hit in the same timing environment reports
those measured stage times in the sample's TTFT (``video_source: cache`` in ``samples.jsonl``); an entry timed in
another environment (another machine, thread count, commit) is not used: the video is decoded again, timed here,
and the entry rewritten. So a record's TTFT is what decoding costs on its machine, with or without the cache.

**Size cap and eviction:** least recently used first. A hit refreshes the entry's mtime; after every write, while the
cache holds more than ``max_bytes``, the entry with the oldest mtime is deleted. An entry larger than the cap is not
stored. Writes are atomic (temporary file and rename); a file that cannot be read (removed by a concurrent eviction,
or damaged) is a miss. Failed decodes are never cached: a bad video fails again, and is retried, on every run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.backbones import Visual
from eval.keys import stable_hash

__all__ = ["FrameCache", "entry_key", "preprocess_identity"]

_VERSION = 1  # of the entry format
_ADAPTERS = Path(__file__).resolve().parents[1] / "prune" / "adapters"


def _file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.cache
def preprocess_identity(fn: Callable[[Any], torch.Tensor]) -> dict[str, Any]:
    """What decides a transform's output besides its input: its name, its code and the libraries under it."""
    from importlib import metadata

    try:
        source = _file_sha(inspect.getsourcefile(fn) or "")
    except (OSError, TypeError):
        source = None
    adapters = {p.name: _file_sha(p) for p in sorted(_ADAPTERS.glob("*.py"))}
    try:
        decord = metadata.version("decord")
    except metadata.PackageNotFoundError:
        decord = None
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return {"fn": name, "source": source, "adapters": adapters, "torch": torch.__version__, "decord": decord}


def entry_key(video: str, fingerprint: Mapping[str, Any], num_frames: int, preprocess: Callable) -> str:
    """The cache key of one video's preprocessed frames (see the module docstring)."""
    return stable_hash(
        {
            "version": _VERSION,
            "video": os.path.abspath(video),
            "fingerprint": dict(fingerprint),
            "num_frames": int(num_frames),
            "preprocess": preprocess_identity(preprocess),
        },
        32,
    )


@dataclass(frozen=True)
class FrameCache:
    """The on-disk decode cache of one results folder.

    Attributes:
        root: the cache folder (``<results_dir>/.cache/frames``).
        max_bytes: the size cap; least recently used entries go first when it is exceeded.
    """

    root: Path
    max_bytes: int

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def load(self, key: str, timing_key: str) -> Visual | None:
        """The entry of ``key`` when it exists, reads back whole and was timed in ``timing_key``; else None."""
        path = self.path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):  # absent, evicted meanwhile, or damaged: a miss
            return None
        if not isinstance(entry, dict) or entry.get("version") != _VERSION or entry.get("timing_key") != timing_key:
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return Visual(entry["pixels"], int(entry["frames_in_video"]), dict(entry["timings"]), None, "cache")

    def store(self, key: str, visual: Visual, timing_key: str) -> bool:
        """Write the entry atomically, then evict down to the cap; False when it was not stored (too large, or I/O)."""
        size = visual.pixels.numel() * visual.pixels.element_size()
        if size > self.max_bytes:
            return False
        path = self.path(key)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{id(visual)}.tmp"
        entry = {
            "version": _VERSION,
            "pixels": visual.pixels.detach().cpu().contiguous(),
            "frames_in_video": int(visual.frames_in_video),
            "timings": {k: float(v) for k, v in visual.timings.items()},
            "timing_key": timing_key,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(entry, tmp)
            os.replace(tmp, path)
        except OSError:  # a full disk must not fail the sample: the cache is an optimisation
            tmp.unlink(missing_ok=True)
            return False
        self.evict(keep=path)
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(mtime, bytes, path)`` of every entry, oldest first."""
        out = []
        for path in self.root.glob("*/*.pt"):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return sorted(out)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries while the cache exceeds its cap; return how many went."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed
