"""``pool``: spatial (and optionally temporal) average pooling at exactly the budget of every other method.

The classic video-LLM token reducer (LLaVA-Video's ``mm_spatial_pool_mode=average``, PLLaVA's adaptive pooling), made
budget-exact so that it runs at every ratio a pruning method runs at: ``keep_count(ratio, T * P)`` tokens, no more,
no fewer, whatever the grid.

Layout of the budget ``B``:

1. ``temporal > 1``: each run of ``temporal`` consecutive frames is averaged first (the last run may be shorter),
   giving ``T' = ceil(T / temporal)`` frames.
2. ``B`` is spread over the ``T'`` frames: ``B // T'`` each, the first ``B % T'`` frames one more.
3. A frame with ``c`` tokens on an ``H x W`` grid is cut into ``h' = round(sqrt(c * H / W))`` row bands (so regions
   are roughly square; clamped so that ``ceil(c / W) <= h' <= min(H, c)``). The ``c`` tokens are split over the
   bands (the first ``c % h'`` bands get one more column bin), and each band is cut into its column bins.
4. Rows and columns use the adaptive partition of ``torch.nn.functional.adaptive_avg_pool2d``: part ``i`` of ``n``
   over length ``L`` is ``[floor(i * L / n), ceil((i + 1) * L / n))``, so neighbouring regions may overlap by one
   row or column when ``n`` does not divide ``L``. Each output token is the mean of its region.

When ``c = (H / 2) * (W / 2)`` this is exactly ``avg_pool2d(kernel_size=2)``; when ``c = P`` it is the identity.
With ``temporal > 1`` a frame can hold at most ``P`` tokens, so ``B <= T' * P`` is required (always true when
``ratio * temporal <= 1``); otherwise ``pre_llm`` raises instead of silently missing the budget.

Shape legend: ``T`` frames, ``H x W`` grid, ``P = H * W``, ``D`` hidden size, ``N = T * P``, ``T'`` pooled frames,
``c`` tokens of one pooled frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio, keep_count

__all__ = ["Pool", "frame_counts", "region_mask"]


def frame_counts(budget: int, frames: int) -> list[int]:
    """Split ``budget`` tokens over ``frames`` frames as evenly as possible; earlier frames get the remainder.

    Args:
        budget: total tokens, ``>= 0``.
        frames: number of frames, ``>= 1``.

    Returns:
        ``frames`` counts summing to ``budget``.
    """
    base, extra = divmod(budget, frames)
    return [base + 1] * extra + [base] * (frames - extra)


def _num_bands(count: int, height: int, width: int) -> int:
    """Row bands for ``count`` regions on a ``height x width`` grid: near-square regions, every band fitting."""
    bands = math.floor(math.sqrt(count * height / width) + 0.5)
    # At least ceil(c / W) bands so no band needs more than W column bins; at most H bands and c bands (>= 1 each).
    bands = max(bands, -(-count // width), 1)
    return min(bands, height, count)


def region_mask(count: int, grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """Which grid cells each of the ``count`` pooling regions of one frame covers.

    Args:
        count: ``c`` regions, ``0 <= c <= H * W``.
        grid: ``(H, W)``.
        device: where to build the mask.

    Returns:
        ``[c, P]`` bool, row ``o`` marks the raster-order cells averaged into output token ``o``; outputs are in
        raster order (band by band, left to right).
    """
    height, width = grid
    if not 0 <= count <= height * width:
        raise ValueError(f"count must be in [0, {height * width}] for a {height}x{width} grid, got {count}")
    if count == 0:
        return torch.zeros((0, height * width), dtype=torch.bool, device=device)
    bands = _num_bands(count, height, width)
    widths = torch.full((bands,), count // bands, dtype=torch.long, device=device)
    widths[: count % bands] += 1  # [h'] column bins per band, <= W by the choice of h'
    band = torch.repeat_interleave(torch.arange(bands, device=device), widths)  # [c]
    col_bin = torch.arange(count, device=device) - (torch.cumsum(widths, 0) - widths)[band]  # [c]
    bins = widths[band]  # [c]
    # Adaptive partition (adaptive_avg_pool2d): [floor(i L / n), ceil((i + 1) L / n)).
    row0, row1 = band * height // bands, ((band + 1) * height + bands - 1) // bands
    col0, col1 = col_bin * width // bins, ((col_bin + 1) * width + bins - 1) // bins
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= row0[:, None]) & (rows < row1[:, None])  # [c, H]
    in_cols = (cols >= col0[:, None]) & (cols < col1[:, None])  # [c, W]
    return (in_rows[:, :, None] & in_cols[:, None, :]).reshape(count, height * width)


@dataclass(frozen=True)
class Pool:
    """Budget-exact spatial/temporal average pooling before the LLM.

    Args:
        ratio: fraction of visual tokens kept, in (0, 1]; exactly ``keep_count(ratio, T * P)`` tokens come out.
        temporal: frames averaged together before spatial pooling, ``>= 1`` (1 = spatial only).
    """

    ratio: float = 0.5
    temporal: int = 1
    name: str = "pool"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if isinstance(self.temporal, bool) or not isinstance(self.temporal, int) or self.temporal < 1:
            raise ValueError(f"temporal must be an int >= 1 (frames averaged together), got {self.temporal!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Average-pool ``[T, P, D]`` down to exactly ``keep_count(ratio, T * P)`` tokens.

        Args:
            video: ``tokens`` is ``[T, P, D]`` on an ``(H, W)`` grid.

        Returns:
            ``tokens`` ``[B, D]`` (input dtype and device) in time-then-raster order; ``assignment`` ``[N]`` maps
            each input token to the first region containing it (-1 in a frame that got no token).

        Raises:
            ValueError: with ``temporal > 1``, the budget needs more than ``P`` tokens per pooled frame.
        """
        tokens = video.tokens
        t, p, d = tokens.shape
        n = t * p
        budget = keep_count(self.ratio, n)
        device = tokens.device
        if self.temporal == 1 and budget == n:
            # Exact identity, independent of TF32 matmul settings on CUDA.
            return PreLLMOutput(tokens=tokens.reshape(n, d), assignment=torch.arange(n, device=device))

        pooled_frames = -(-t // self.temporal)
        base, extra = divmod(budget, pooled_frames)
        if base + (extra > 0) > p:
            raise ValueError(
                f"pool: budget {budget} needs {base + (extra > 0)} tokens per pooled frame but a frame has only P={p} "
                f"({t} frames / temporal={self.temporal} -> {pooled_frames} frames); lower temporal or ratio "
                f"(ratio * temporal <= 1 always fits)"
            )

        # Average in fp32 (fp64 stays fp64) and cast back once: bf16 accumulation would round every partial sum.
        work = torch.promote_types(tokens.dtype, torch.float32)
        x = tokens.to(work)
        run = torch.arange(t, device=device) // self.temporal  # [T] pooled frame of each input frame
        if self.temporal > 1:
            frame_w = torch.nn.functional.one_hot(run, pooled_frames).T.to(work)  # [T', T]
            x = torch.einsum("st,tpd->spd", frame_w / frame_w.sum(1, keepdim=True), x)  # [T', P, D]

        counts = torch.tensor(frame_counts(budget, pooled_frames), device=device)  # [T']
        offsets = counts.cumsum(0) - counts  # [T'] index of each pooled frame's first output token
        region = torch.full((pooled_frames, p), -1, dtype=torch.long, device=device)  # [T', P] output index
        outputs: list[Tensor] = []
        # At most two distinct counts (frame_counts): frames [0, extra) get base + 1, frames [extra, T') get base.
        for lo, hi, c in ((0, extra, base + 1), (extra, pooled_frames, base)):
            if hi <= lo or c == 0:
                continue
            mask = region_mask(c, video.grid, device)  # [c, P]
            weights = mask.to(work)
            weights = weights / weights.sum(1, keepdim=True)
            outputs.append(torch.einsum("cp,spd->scd", weights, x[lo:hi]).reshape(-1, d))  # frames in time order
            # Overlapping adaptive regions: each cell is assigned to the first region containing it (argmax -> first).
            region[lo:hi] = offsets[lo:hi, None] + mask.to(torch.uint8).argmax(0)[None, :]
        out = torch.cat(outputs).to(tokens.dtype)
        assert out.shape[0] == budget, (out.shape, budget)
        return PreLLMOutput(tokens=out, assignment=region[run].reshape(n))

    def in_llm(self, step: LayerInput) -> Tensor:
        """Never called (no in-LLM stage); keeps everything if an adapter calls it anyway."""
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers

    def planned_counts(self, n_in: int, num_layers: int) -> tuple[int, ...]:
        """Budget-exact: ``keep_count(ratio, N)`` at every layer, whatever the content (``prune.budget``)."""
        return (keep_count(self.ratio, n_in),) * num_layers
