"""Tests for prune.adapters.preprocess: HF parity, PIL parity, known values, frame sampling and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prune.adapters.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    preprocess_video,
    sample_frame_indices,
)

STATS = {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}


def _random_video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _gradient_video(h: int, w: int) -> np.ndarray:
    """Two smooth frames, a different ramp per channel so that a channel swap is visible."""
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 255 / (h + w - 2)], -1)
    frame = frame.round().astype(np.uint8)
    return np.stack([frame, frame[::-1].copy()])


def _pil_reference(video: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Independent reference: PIL bicubic per frame, then rescale 1/255 and normalise, [1, T, 3, S, S]."""
    frames = [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in video]
    x = np.stack(frames).astype(np.float64) / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2)).float()[None]


def _hf_video_processor():
    """transformers' LlavaOnevisionVideoProcessor class, or skip when its torchvision backend cannot be imported."""
    try:
        import torchvision  # noqa: F401  (the registry wheel is a CUDA build that fails with more than ImportError)
        from transformers import LlavaOnevisionVideoProcessor

        LlavaOnevisionVideoProcessor()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torchvision / the HF video processor does not import here: {err}")
    return LlavaOnevisionVideoProcessor


# (a) -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stats", ["siglip", "clip"])
@pytest.mark.parametrize("shape", [(3, 120, 160), (2, 384, 384), (2, 500, 90)])
def test_matches_hf_video_processor(stats, shape):
    processor_cls = _hf_video_processor()
    mean, std = STATS[stats]
    processor = processor_cls(image_mean=list(mean), image_std=list(std))
    video = _random_video(*shape)
    # uint8 channels-last, uint8 channels-first tensor, float32 (HF resizes floats without rounding to uint8).
    for frames in (video, torch.from_numpy(video).permute(0, 3, 1, 2), video.astype(np.float32)):
        expected = processor(frames, return_tensors="pt")["pixel_values_videos"]
        out = preprocess_video(frames, mean=mean, std=std)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# (b) -------------------------------------------------------------------------------------------------------------

# torch's antialiased bicubic is Pillow's kernel (a = -0.5) computed with different fixed-point rounding: measured
# max 2 grey levels on <1 % of pixels for random frames and 0-1 levels for smooth ones. The limits below allow that
# and nothing more: a channel swap moves the mean error to ~0.6, a CLIP-vs-SigLIP mean/std mix-up moves the channel
# means by > 0.05.
MAX_LEVELS = 2
MEAN_ABS_TOL = 1e-3
CHANNEL_MEAN_TOL = 1e-3


def _pil_gap(out: torch.Tensor, ref: torch.Tensor, std) -> tuple[float, float, float]:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    levels = ((out - ref).abs() * torch.tensor(std).view(1, 1, 3, 1, 1) * 255).amax().item()
    mean_abs = (out - ref).abs().mean().item()
    channel = (out.mean((0, 1, 3, 4)) - ref.mean((0, 1, 3, 4))).abs().amax().item()
    return levels, mean_abs, channel


def _within_pil_tolerance(out, ref, std) -> bool:
    levels, mean_abs, channel = _pil_gap(out, ref, std)
    return levels <= MAX_LEVELS + 1e-3 and mean_abs <= MEAN_ABS_TOL and channel <= CHANNEL_MEAN_TOL


@pytest.mark.parametrize("video", [_random_video(2, 90, 120, seed=1), _gradient_video(72, 128)], ids=["rand", "grad"])
def test_torch_backend_close_to_pil(video):
    ref = _pil_reference(video, 384, SIGLIP_MEAN, SIGLIP_STD)
    out = preprocess_video(video)
    levels, mean_abs, channel = _pil_gap(out, ref, SIGLIP_STD)
    assert levels <= MAX_LEVELS + 1e-3, levels
    assert mean_abs <= MEAN_ABS_TOL, mean_abs
    assert channel <= CHANNEL_MEAN_TOL, channel


@pytest.mark.parametrize(
    "mutant",
    [
        lambda v: preprocess_video(v[..., ::-1].copy()),  # BGR instead of RGB
        lambda v: preprocess_video(v, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),  # wrong statistics
        lambda v: preprocess_video(v, size=336),  # wrong size
    ],
    ids=["bgr", "clip_stats", "size336"],
)
def test_pil_tolerance_catches_mistakes(mutant):
    for video in (_random_video(2, 90, 120, seed=1), _gradient_video(72, 128)):
        ref = _pil_reference(video, 384, SIGLIP_MEAN, SIGLIP_STD)
        out = mutant(video)
        if out.shape != ref.shape:
            continue  # a wrong size is caught by the shape check alone
        assert not _within_pil_tolerance(out, ref, SIGLIP_STD)


def test_pil_backend_matches_llava_next_pipeline():
    # LLaVA-NeXT's SigLipImageProcessor composes exactly these transformers.image_transforms functions per frame.
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    video = np.concatenate([_random_video(1, 90, 120, seed=2), _gradient_video(90, 120)])
    first = ChannelDimension.FIRST
    frames = []
    for f in video:
        x = resize(f, size=(384, 384), resample=PILImageResampling.BICUBIC, data_format=first)
        x = rescale(x, scale=1 / 255, data_format=first)
        frames.append(torch.from_numpy(normalize(x, mean=SIGLIP_MEAN, std=SIGLIP_STD, data_format=first)))
    expected = torch.stack(frames)[None]
    assert torch.equal(preprocess_video(video, backend="pil"), expected)


# (c) -------------------------------------------------------------------------------------------------------------


def test_constants_match_transformers():
    from transformers.image_utils import OPENAI_CLIP_MEAN as HF_MEAN
    from transformers.image_utils import OPENAI_CLIP_STD as HF_STD

    assert tuple(HF_MEAN) == OPENAI_CLIP_MEAN and tuple(HF_STD) == OPENAI_CLIP_STD


@pytest.mark.parametrize("backend", ["torch", "pil"])
@pytest.mark.parametrize("stats", ["siglip", "clip"])
def test_constant_colour_maps_to_normalised_value(backend, stats):
    mean, std = STATS[stats]
    colour = np.array([10, 128, 250], dtype=np.uint8)
    video = np.broadcast_to(colour, (3, 50, 70, 3)).copy()
    out = preprocess_video(video, mean=mean, std=std, backend=backend)
    expected = (colour / 255.0 - np.asarray(mean)) / np.asarray(std)
    assert out.shape == (1, 3, 3, 384, 384) and out.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(out[0, :, c], torch.full_like(out[0, :, c], expected[c]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_rgb_order_preserved(backend):
    video = np.zeros((1, 40, 40, 3), dtype=np.uint8)
    video[..., 0] = 255  # pure red
    out = preprocess_video(video, backend=backend)[0, 0]
    assert torch.allclose(out[0], torch.tensor(1.0)) and torch.allclose(out[1:], torch.tensor(-1.0))


def test_layouts_and_containers_agree():
    video = _random_video(2, 64, 48, seed=3)
    ref = preprocess_video(video, size=32)
    assert ref.shape == (1, 2, 3, 32, 32)
    assert torch.equal(preprocess_video(torch.from_numpy(video), size=32), ref)
    assert torch.equal(preprocess_video(np.ascontiguousarray(video.transpose(0, 3, 1, 2)), size=32), ref)
    assert torch.equal(preprocess_video(torch.from_numpy(video).permute(0, 3, 1, 2), size=32), ref)


def test_target_size_input_is_not_resampled():
    video = _random_video(2, 384, 384, seed=4)
    out = preprocess_video(video)
    expected = (torch.from_numpy(video).permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out[0].double(), expected, atol=1e-6, rtol=0)


# (d) -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "num", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),
        (64, 64, list(range(64))),
        (3, 5, [0, 0, 1, 1, 2]),  # fewer frames than requested: indices repeat
        (1, 4, [0, 0, 0, 0]),
        (100, 1, [0]),
    ],
)
def test_sample_frame_indices_known(total, num, expected):
    assert sample_frame_indices(total, num) == expected


@pytest.mark.parametrize(("total", "num"), [(1000, 64), (7, 32), (5000, 32), (65, 64)])
def test_sample_frame_indices_is_lmms_eval_linspace(total, num):
    got = sample_frame_indices(total, num)
    assert got == np.linspace(0, total - 1, num, dtype=int).tolist()
    assert len(got) == num and got[0] == 0 and got[-1] == total - 1 and got == sorted(got)
    assert all(isinstance(i, int) for i in got)


@pytest.mark.parametrize(("total", "num"), [(0, 4), (10, 0), (-1, 3), (10, 2.5), (True, 3), ("10", 3)])
def test_sample_frame_indices_rejects_bad_counts(total, num):
    with pytest.raises(ValueError, match="positive integer"):
        sample_frame_indices(total, num)


# (e) -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (np.zeros((8, 8, 3), np.uint8), {}, "rank 4"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), {}, "rank 4"),
        (np.zeros((2, 8, 8, 4), np.uint8), {}, "3 \\(RGB\\) channels"),
        (np.zeros((2, 1, 8, 8), np.uint8), {}, "3 \\(RGB\\) channels"),
        (np.zeros((2, 3, 8, 3), np.uint8), {}, "ambiguous"),
        (np.zeros((0, 8, 8, 3), np.uint8), {}, "zero frames"),
        (np.zeros((2, 0, 8, 3), np.uint8), {}, "empty spatial size"),
        (np.zeros((2, 8, 8, 3), np.int64), {}, "use uint8, or float"),
        (np.zeros((2, 8, 8, 3), bool), {}, "use uint8, or float"),
        (np.full((2, 8, 8, 3), 300.0, np.float32), {}, "\\[0, 255\\]"),
        (np.full((2, 8, 8, 3), -1.0, np.float32), {}, "\\[0, 255\\]"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), {}, "\\[0, 255\\]"),
        ([np.zeros((8, 8, 3), np.uint8)], {}, "numpy array or a torch tensor"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"size": 0}, "size must be a positive integer"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"mean": (0.5, 0.5)}, "3 values"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"std": (0.5, 0.0, 0.5)}, "non-zero"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"backend": "cv2"}, "backend must be one of"),
        (np.zeros((2, 8, 8, 3), np.float32), {"backend": "pil"}, "needs uint8"),
    ],
)
def test_bad_inputs_raise(frames, kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess_video(frames, **kwargs)
