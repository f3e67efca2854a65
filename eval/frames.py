"""Video decoding shared by the backbones and the probe's haystacks: one leaf module, so neither imports the other.

``load_frames`` samples frames uniformly over the whole clip (lmms-eval's ``linspace``), from a video file (decord)
or a folder of frame images; :mod:`eval.backbones` re-exports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prune.adapters.preprocess import sample_frame_indices

__all__ = ["FRAME_SUFFIXES", "load_frames"]

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")  # the frame images a frame folder may hold


def load_frames(path: str, num_frames: int) -> tuple[Any, int]:
    """Decode ``num_frames`` uniformly sampled frames (lmms-eval's ``linspace`` over the whole clip).

    Args:
        path: an MP4 (any container decord reads) or a folder of frame images (MVBench's TVQA subtask).
        num_frames: frames to sample; a shorter video repeats frames, as ``np.linspace`` with int cast does.

    Returns:
        ``[T, H, W, 3]`` uint8 frames and the video's own frame count.

    Raises:
        FileNotFoundError: no such file. ValueError: the video has no decodable frame.
    """
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):  # a folder of frames
        from PIL import Image

        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"frame folder has no .jpg/.png frames: {path}")
        idx = sample_frame_indices(len(files), num_frames)
        return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in idx]), len(files)
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as err:  # decord raises its own DECORDError for corrupt files
        raise ValueError(f"cannot decode video {path}: {err}") from err
    total = len(reader)
    if total == 0:
        raise ValueError(f"video has no frames: {path}")
    return reader.get_batch(sample_frame_indices(total, num_frames)).asnumpy(), total
