"""Video preprocessing for the SigLIP-384 LLaVA backbones (LLaVA-OneVision, LLaVA-Video) without torchvision.

Two reference pipelines exist, and they differ in the resize kernel, so both are reproduced:

* ``backend="torch"`` reproduces transformers 5.23's ``LlavaOnevisionVideoProcessor`` (the ``-hf`` path, lmms-eval's
  ``llava_onevision`` hf model). Read from ``transformers/video_processing_utils.py`` (``BaseVideoProcessor``),
  ``image_processing_backends.py`` (``TorchvisionBackend.resize`` / ``rescale_and_normalize``) and torchvision 0.28's
  ``transforms/v2/functional/_geometry.py::resize_image``:

  1. frames become ``uint8 [T, 3, H, W]`` (channels-last input is permuted, nothing is cast);
  2. ``tvF.resize(video, (384, 384), BICUBIC, antialias=True)``. On CPU torchvision passes the **uint8** tensor
     straight to ``F.interpolate`` (``_do_native_uint8_resize_on_cpu`` is true for bicubic), so the result is
     rounded to uint8 *inside* torch's separable kernel, including after the horizontal pass. Off CPU it runs in
     float32, then ``clamp(0, 255)``, ``round`` and casts back to uint8. Float inputs are resized in float, with no
     clamp or rounding. A frame already at the target size is returned untouched;
  3. rescale and normalise are fused: ``(x.float() - 255 * mean) / (255 * std)`` in float32.

  Checked against the real processor (torchvision 0.28 in a scratch directory, outside this venv): bit-identical.

* ``backend="pil"`` reproduces LLaVA-NeXT's ``SigLipImageProcessor``
  (``LLaVA-VL/LLaVA-NeXT:llava/model/multimodal_encoder/siglip_encoder.py``), which the original-code models use
  (lmms-eval ``llava_vid`` for LLaVA-Video-7B-Qwen2, and ``llava_onevision``): per frame, PIL ``BICUBIC`` resize of the
  uint8 image, then ``float64 * (1/255)`` cast to float32, then ``(x - mean) / std`` in float32 (the
  ``transformers.image_transforms`` ``resize``/``rescale``/``normalize`` it calls).

The two backends agree closely. torch's *antialiased* bicubic kernel is Pillow's (``a = -0.5``, weights taken from
Pillow's ``Resample.c``, uint8 path with int16 fixed-point weights); only the non-antialiased torch bicubic uses
``a = -0.75``. Measured on random and smooth-gradient frames from 64x80 to 1080x1920: at most 2 grey levels apart,
on under 1 % of the pixels (0 on smooth gradients), i.e. at most ``2 / 255 / std`` after normalisation.

**Mean/std.** The default is SigLIP's ``(0.5, 0.5, 0.5)``, not the class defaults of ``LlavaOnevisionVideoProcessor``
(``OPENAI_CLIP_MEAN/STD``). Every real checkpoint this project uses normalises with 0.5. The HF conversion script
builds the processor with ``LlavaOnevisionVideoProcessor.from_pretrained("google/siglip-so400m-patch14-384")``, and
the released ``llava-hf/llava-onevision-qwen2-*-hf`` ``video_processor`` configs and
``lmms-lab/LLaVA-Video-7B-Qwen2``'s ``preprocessor_config.json`` say ``image_mean = image_std = [0.5, 0.5, 0.5]``.
``LLaVA-NeXT``'s ``SigLipImageProcessor`` defaults to 0.5 as well. Pass ``mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD``
only to match a processor built with no config (``LlavaOnevisionVideoProcessor()``).

Shape legend: ``T`` frames, ``H``/``W`` input height/width, ``S`` output side (``size``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "preprocess_video",
    "sample_frame_indices",
]

# Same values as transformers.image_utils.OPENAI_CLIP_MEAN/STD (a test checks they stay equal).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# google/siglip-so400m-patch14-384 preprocessor_config.json, LLaVA-NeXT SigLipImageProcessor defaults.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_RESCALE = 1 / 255  # HF `rescale_factor`; kept as this exact float so the fused constants match HF bit for bit
_BACKENDS = ("torch", "pil")


def sample_frame_indices(total: int, num: int) -> list[int]:
    """Uniformly sample ``num`` frame indices from a video of ``total`` frames, as lmms-eval does.

    This is ``np.linspace(0, total - 1, num, dtype=int)``: the first and last frame are always included and the
    fractional positions are truncated (floored, all positions being non-negative). It is the sampling of lmms-eval's
    ``llava_onevision`` ``load_video`` and of ``llava_vid`` with ``force_sample=True`` (the LLaVA-Video eval setting).
    It is *not* HF's ``default_sample_indices_fn`` (``arange(0, total, total / num)``), which never includes the last
    frame.

    When ``total < num`` the indices repeat (e.g. ``total=3, num=5`` gives ``[0, 0, 1, 1, 2]``), exactly as linspace
    does, so the model always sees ``num`` frames; lmms-eval behaves the same way.

    Args:
        total: Number of frames in the video, >= 1.
        num: Number of frames to sample, >= 1.

    Returns:
        ``num`` non-decreasing indices in ``[0, total - 1]``.

    Raises:
        ValueError: If ``total`` or ``num`` is not a positive integer.
    """
    for name, value in (("total", total), ("num", num)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return np.linspace(0, total - 1, num, dtype=int).tolist()


def _as_tensor(frames: np.ndarray | Tensor) -> Tensor:
    if isinstance(frames, np.ndarray):
        # torch.from_numpy does not take every numpy dtype (e.g. uint16 on old torch, object); report it clearly.
        try:
            return torch.from_numpy(np.ascontiguousarray(frames))
        except TypeError as err:
            raise ValueError(f"frames has unsupported numpy dtype {frames.dtype}; accepted: uint8 or float") from err
    if isinstance(frames, Tensor):
        return frames
    raise ValueError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")


def _to_channels_first(video: Tensor) -> Tensor:
    """Validate rank/channels and return a contiguous ``[T, 3, H, W]`` tensor."""
    if video.ndim != 4:
        raise ValueError(
            f"frames must have rank 4, [T, H, W, 3] or [T, 3, H, W]; got shape {tuple(video.shape)} "
            "(a single image needs a leading frame axis)"
        )
    last, first = video.shape[-1] == 3, video.shape[1] == 3
    if last and first:
        # HF's infer_channel_dimension_format would guess channels-first here and log a warning; a frame 3 pixels
        # wide or high is never a real video, so refuse rather than guess.
        raise ValueError(f"frames shape {tuple(video.shape)} is ambiguous: both dim 1 and dim 3 have size 3")
    if last:
        # HF permutes and calls .contiguous(); the memory format can select a different interpolate kernel.
        video = video.permute(0, 3, 1, 2).contiguous()
    elif not first:
        raise ValueError(
            f"frames must have 3 (RGB) channels, as [T, H, W, 3] or [T, 3, H, W]; got shape {tuple(video.shape)}"
        )
    if video.shape[0] == 0:
        raise ValueError("frames has zero frames (T == 0); sample at least one frame")
    if video.shape[2] == 0 or video.shape[3] == 0:
        raise ValueError(f"frames has an empty spatial size {tuple(video.shape[2:])}")
    return video.contiguous()


def _check_values(video: Tensor) -> None:
    if video.dtype == torch.uint8:
        return
    if not video.is_floating_point():
        raise ValueError(f"frames dtype {video.dtype} is not accepted; use uint8, or float with values in [0, 255]")
    lo, hi = video.amin().item(), video.amax().item()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 255.0:
        raise ValueError(
            f"float frames must be pixel values in [0, 255] (as the HF processor treats them), got range [{lo}, {hi}]"
        )


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {len(mean)} and {len(std)}")
    if any(s == 0.0 for s in std):
        raise ValueError(f"std must be non-zero, got {std}")
    return mean, std


def _resize_torch(video: Tensor, size: int) -> Tensor:
    """Reproduce torchvision 0.28 ``resize_image`` for bicubic + antialias, ``[T, 3, H, W]`` -> ``[T, 3, S, S]``."""
    if tuple(video.shape[-2:]) == (size, size):
        return video  # torchvision returns the input unchanged at the target size
    kwargs = {"size": (size, size), "mode": "bicubic", "align_corners": False, "antialias": True}
    if video.dtype == torch.uint8 and video.device.type == "cpu":
        # Native uint8 kernel: what torchvision uses on CPU, and not the same numbers as the float path below.
        return F.interpolate(video, **kwargs)
    if video.dtype == torch.uint8:
        out = F.interpolate(video.float(), **kwargs)
        return out.clamp_(0, 255).round_().to(torch.uint8)
    if video.dtype in (torch.float32, torch.float64):
        return F.interpolate(video, **kwargs)
    return F.interpolate(video.float(), **kwargs).to(video.dtype)  # float16/bfloat16: cast, no clamp or round


def _normalize_torch(video: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    # HF fuses rescale into normalize: mean and std are multiplied by 1 / rescale_factor in float32, then
    # tvF.normalize computes (x - mean) / std in the image dtype (float32).
    m = (torch.tensor(mean) * (1.0 / _RESCALE)).to(video.device).view(-1, 1, 1)
    s = (torch.tensor(std) * (1.0 / _RESCALE)).to(video.device).view(-1, 1, 1)
    return (video.to(torch.float32) - m) / s


def _preprocess_pil(video: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    from PIL import Image  # pillow is only needed for this backend

    if video.dtype != torch.uint8:
        raise ValueError(f"backend='pil' needs uint8 frames (LLaVA-NeXT resizes uint8 images), got {video.dtype}")
    frames = video.permute(0, 2, 3, 1).cpu().numpy()  # [T, H, W, 3], PIL wants channels-last
    mean_a, std_a = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    out = np.empty((len(frames), 3, size, size), dtype=np.float32)
    for i, frame in enumerate(frames):
        # transformers.image_transforms.resize: PIL resize with reducing_gap=None, back to uint8 numpy.
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((size, size), Image.BICUBIC))
        # image_transforms.rescale: float64 multiply, then cast to float32; normalize: float32 arithmetic.
        scaled = (resized.astype(np.float64) * _RESCALE).astype(np.float32)
        out[i] = ((scaled - mean_a) / std_a).transpose(2, 0, 1)
    return torch.from_numpy(out)


def preprocess_video(
    frames: np.ndarray | Tensor,
    size: int = 384,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
    *,
    backend: str = "torch",
) -> Tensor:
    """Turn decoded frames into the ``pixel_values_videos`` a SigLIP-384 LLaVA model expects.

    Any input resolution is resized to ``size x size`` (no aspect-ratio preservation, no crop), as both reference
    processors do. Frame sampling is not done here; see :func:`sample_frame_indices`.

    Args:
        frames: ``[T, H, W, 3]`` or ``[T, 3, H, W]`` RGB frames, numpy array or tensor. ``uint8`` (what decord and
            PyAV return) or floating point with pixel values in ``[0, 255]``; floats are treated exactly as the HF
            processor treats them (resized in float, no rounding), and only the torch backend takes them.
        size: Output side ``S`` in pixels.
        mean: Per-channel (R, G, B) mean on the ``[0, 1]`` scale. Defaults to SigLIP's 0.5 (see the module docstring).
        std: Per-channel (R, G, B) std on the ``[0, 1]`` scale.
        backend: ``"torch"`` to match HF's ``LlavaOnevisionVideoProcessor`` (torch antialiased bicubic), ``"pil"``
            to match LLaVA-NeXT's ``SigLipImageProcessor`` (PIL bicubic); they differ by at most ~2 grey levels.

    Returns:
        ``[1, T, 3, S, S]`` float32, on the device of ``frames`` for the torch backend, on CPU for the PIL backend.

    Raises:
        ValueError: For a non-array input, a rank other than 4, a channel count other than 3 (or an ambiguous
            layout), zero frames or an empty image, a dtype other than uint8/float, float values outside
            ``[0, 255]`` or non-finite, a non-positive ``size``, malformed ``mean``/``std`` or an unknown backend.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    mean, std = _check_stats(mean, std)
    video = _to_channels_first(_as_tensor(frames))
    _check_values(video)
    if backend == "pil":
        return _preprocess_pil(video, size, mean, std).unsqueeze(0)
    return _normalize_torch(_resize_torch(video, size), mean, std).unsqueeze(0)
