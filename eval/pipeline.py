"""The input pipeline: decoded, preprocessed videos for the samples a model is about to run, in their order.

lmms-eval's own models decode each video inline, before the model sees it, so on a GPU the model waits for the
decoder. :class:`VisualSource` takes the list of videos the model will answer about (resumed samples excluded) and
hands them out in order: ``prefetch=K`` keeps the next ``K`` videos decoding and preprocessing in ``K`` background
threads while the model runs on the current one (decord and torch release the GIL while they work); ``prefetch=0``
decodes each one inline when it is asked for. With a :class:`~eval.frame_cache.FrameCache`, a video already
decoded by an earlier cell of the same results folder is read instead of decoded, and a freshly decoded one is stored.

Times: each video's ``video_decode`` and ``preprocess`` seconds are measured around the work itself, in the thread
that does it, so a sample's TTFT counts each stage's own time and never the time the model waited for it (nor the
time a prefetched video sat ready). On a CPU the workers share the cores with the model, so stage times under
prefetch include that contention: the timing environment records ``prefetch`` (:func:`eval.keys.timing_env`).

Errors: a video that cannot be decoded raises its error from :meth:`VisualSource.get`, in the main thread, when its
sample's turn comes; the model records it as that sample's failure and the run goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from eval.backbones import Backbone, Visual
from eval.frame_cache import FrameCache, entry_key

__all__ = ["VisualSource"]


class VisualSource:
    """The decoded visuals of ``jobs`` in order, prefetched ``prefetch`` ahead and cached on disk when asked.

    Args:
        backbone: decodes with its frame count and transform (:meth:`Backbone.decode`).
        jobs: ``(video path, fingerprint)`` of every sample that will run, in the order :meth:`get` asks for them.
        prefetch: videos decoded ahead in background threads; 0 decodes inline.
        cache: the decode cache, or None (``cache=off``).
        timing_key: this run's timing key; a cache entry timed elsewhere is decoded again (``eval.frame_cache``).
    """

    def __init__(
        self,
        backbone: Backbone,
        jobs: Sequence[tuple[str, dict[str, Any] | None]],
        prefetch: int = 0,
        cache: FrameCache | None = None,
        timing_key: str = "",
    ) -> None:
        self.backbone, self.jobs, self.prefetch = backbone, list(jobs), int(prefetch)
        self.cache, self.timing_key = cache, timing_key
        self._pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="vidprune-decode") if self.prefetch else None
        self._futures: dict[int, Future] = {}
        self._next = 0  # the first job not yet submitted

    def _load(self, i: int) -> Visual:
        """Job ``i``: from the cache when it holds it, else decoded (and stored)."""
        video, fingerprint = self.jobs[i]
        key = None
        if self.cache is not None and fingerprint is not None:
            key = entry_key(video, fingerprint, self.backbone.num_frames, self.backbone.preprocess)
            hit = self.cache.load(key, self.timing_key)
            if hit is not None:
                return hit
        # The raw sampled frames (a 1080p video's are ~200 MB at 32 frames) are only for pictures: not kept in flight.
        visual = dataclasses.replace(self.backbone.decode(video), frames=None)
        if key is not None:
            self.cache.store(key, visual, self.timing_key)
        return visual

    def get(self, i: int) -> Visual:
        """Job ``i``'s visual; raises its decode error. Keeps the next ``prefetch`` jobs in flight."""
        if self._pool is None:
            return self._load(i)
        self._next = max(self._next, i)
        while self._next < min(len(self.jobs), i + 1 + self.prefetch):
            self._futures[self._next] = self._pool.submit(self._load, self._next)
            self._next += 1
        future = self._futures.pop(i, None) or self._pool.submit(self._load, i)
        return future.result()

    def close(self) -> None:
        """Stop the workers; prefetched visuals nobody asked for are dropped."""
        if self._pool is not None:
            for future in self._futures.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._futures.clear()

    def __enter__(self) -> VisualSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
