"""``vidcom2``: VidCom², "Video Compression Commander" (Liu et al., EMNLP 2025, arXiv 2505.14454).

Official code: ``xuyang-liu16/VidCom2``, ``token_compressor/vidcom2/vidcom2.py`` (``vidcom2_compression``), called by
its LLaVA-OneVision / LLaVA-Video patch (``token_compressor/vidcom2/models/llava.py``) on the projected, pooled frame
tokens before the newline is added. Our reading, rule by rule (``docs/methods/vidcom2.md`` has the full list):

1. **Channels.** Over all ``N = T·P`` tokens, the per-channel variance (population, ``unbiased=False``); the
   ``int(D · 0.5)`` channels with the *lowest* variance are kept for scoring (``select_low_var_channels``).
2. **Uniqueness.** Each token (on those channels) is L2-normalised; the video centre is the mean of all tokens, a
   frame's centre the mean of its tokens. Similarity to a centre is a multi-scale Gaussian
   ``Σ_a exp(-‖x - c‖² / 2a)`` with ``a ∈ {1/8, 1/4, 1/2, 1, 2}``; ``v`` to the video centre, ``f`` to the frame's.
3. **Frame budgets.** A frame's score is ``-mean_p v``; ``π = softmax((s - max s) / 0.01)`` over frames and the frame's
   keep rate is ``ratio · (1 + π_t - mean π)``, clamped at 1 (``compute_scales``); it keeps
   ``k_t = max(1, round(rate_t · P))`` tokens (``torch.round``: half to even, as the official ``.round()``).
4. **Selection.** In each frame the ``k_t`` tokens with the *lowest* ``v + f`` (the most distinct from both centres)
   survive, in their original raster order (``topk(largest=False)`` then ``sort``).
5. **Output.** Frames in order, each frame's survivors in raster order; nothing is merged; positions are renumbered
   contiguously (the official code splices the shorter sequence into the prompt).

``ratio`` is the official ``base_scale`` (``R_RATIO``, default 0.25): the mean keep rate per frame. The total is
``round``-per-frame close to ``ratio · N`` (within ``T`` tokens) unless a frame's rate is clamped at 1.

Deviations (why): scoring in fp32 on every backbone (the official runs in the model dtype, bf16); stable sorts, so
equal variances or scores keep the lower index (``torch.topk`` leaves ties unspecified); ``ratio = 1.0`` returns every
token unchanged (the harness's identity rule; at ``base_scale = 1`` the official clamp only caps rates from above, so
frames below the mean would still lose up to ``1/T`` of their tokens); on LLaVA-Video the official code re-appends all
13 row newlines after each frame's survivors, while the adapter's newline policy puts one newline after each frame.
vLLM's VidCom2 (vllm-project/vllm#47750) could not be read offline and is not compared here.

Shape legend: ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``C`` scoring channels, ``N = T·P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio

__all__ = ["VidCom2", "frame_keep_counts", "gaussian_similarity", "low_variance_channels"]

_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # [2**k for k in range(-3, 2)]


def low_variance_channels(flat: Tensor, fraction: float = 0.5) -> Tensor:
    """Indices of the ``int(D · fraction)`` channels with the lowest population variance over ``flat`` ``[N, D]``."""
    variance = flat.var(dim=0, unbiased=False)
    k = int(flat.shape[-1] * fraction)
    return torch.sort(variance, stable=True).indices[:k]


def gaussian_similarity(x: Tensor, center: Tensor, alphas: tuple[float, ...] = _ALPHAS) -> Tensor:
    """Multi-scale Gaussian kernel ``Σ_a exp(-‖x - c‖² / 2a)`` over the last dimension."""
    dist = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist / (2 * a)) for a in alphas)


def frame_keep_counts(frame_scores: Tensor, ratio: float, per_frame: int, temperature: float = 0.01) -> Tensor:
    """Tokens each frame keeps: ``max(1, round(P · min(1, ratio · (1 + π_t - mean π))))`` (``compute_scales``).

    Args:
        frame_scores: ``[T]`` distinctiveness of each frame (``-mean_p v``).
        ratio: ``base_scale``.
        per_frame: ``P``.
        temperature: softmax temperature (0.01 in the official code).

    Returns:
        ``[T]`` long counts in ``1 .. P``.
    """
    probs = torch.softmax((frame_scores - frame_scores.max()) / temperature, dim=0)
    rates = (ratio * (1 + probs - probs.mean())).clamp(max=1.0)
    return (rates * per_frame).round().long().clamp(min=1, max=per_frame)


@dataclass(frozen=True)
class VidCom2:
    """VidCom² (see the module docstring).

    Args:
        ratio: ``base_scale``, the mean per-frame keep rate, in (0, 1].
        channel_fraction: fraction of (lowest-variance) channels used for scoring (official 0.5).
        temperature: frame-score softmax temperature (official 0.01).
    """

    ratio: float
    channel_fraction: float = 0.5
    temperature: float = 0.01
    name: str = "vidcom2"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_ratio(self.channel_fraction, "channel_fraction")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or self.temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    def in_llm(self, step: LayerInput) -> Tensor:
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers

    def scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Token and frame scores of one video.

        Args:
            tokens: ``[T, P, D]``.

        Returns:
            ``[T, P]`` ``v + f`` (low = distinct) and ``[T]`` frame scores ``-mean_p v`` (high = distinct).
        """
        t, p, d = tokens.shape
        flat = tokens.reshape(t * p, d).float()
        channels = low_variance_channels(flat, self.channel_fraction)
        frames = F.normalize(flat[:, channels].view(t, p, -1), dim=-1)
        v = gaussian_similarity(frames, frames.mean(dim=(0, 1), keepdim=True))
        f = gaussian_similarity(frames, frames.mean(dim=1, keepdim=True))
        return v + f, -v.mean(dim=-1)

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Keep each frame's most distinct tokens under frame-adaptive budgets.

        Returns:
            ``[n, D]`` survivors (input dtype) in frame-then-raster order; ``assignment`` maps kept tokens to their
            output index and dropped ones to ``-1``.
        """
        tokens = video.tokens
        t, p, d = tokens.shape
        n_in = t * p
        if self.ratio == 1.0:  # identity (see the module docstring)
            index = torch.arange(n_in, device=tokens.device)
            return PreLLMOutput(tokens.reshape(n_in, d), index)
        token_scores, frame_scores = self.scores(tokens)
        counts = frame_keep_counts(frame_scores, self.ratio, p, self.temperature).tolist()
        order = torch.sort(token_scores, dim=1, stable=True).indices  # ascending: most distinct first
        keep = torch.zeros(t, p, dtype=torch.bool, device=tokens.device)
        for frame, k in enumerate(counts):
            keep[frame, order[frame, :k]] = True
        keep = keep.reshape(-1)
        assignment = torch.where(keep, torch.cumsum(keep.long(), 0) - 1, -1)
        c = max(1, int(d * self.channel_fraction))
        flops = 3.0 * n_in * d + 2 * 2 * 3.0 * n_in * c  # channel variance; two centre distances (sub, square, sum)
        return PreLLMOutput(tokens.reshape(n_in, d)[keep], assignment, flops=flops)
