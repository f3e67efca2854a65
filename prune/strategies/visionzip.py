"""``visionzip``: VisionZip, dominant plus contextual visual tokens (Yang et al., CVPR 2025, arXiv 2412.04467).

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models".

Official code: ``dvlab-research/VisionZip`` (``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip.forward``) is
for image LLaVA on CLIP. Its video port for LLaVA-OneVision / LLaVA-Video on SigLIP (no CLS token) is
``cokeshao/HoliTom:visionzip/llava_arch.py`` with ``LLaVA-NeXT/.../siglip_encoder.py`` (``WRAPPER=visionzip``), the
version the video papers (HoliTom, VidCom2's codebase, EarlyTom) compare against. We follow the port, frame by frame:

1. **Signals** (from the vision tower, ``VideoTokens.frame_patch_attn`` / ``frame_patch_keys``): the attention each
   patch receives in the last vision layer the VLM uses, averaged over heads and query rows
   (``attn_weights.mean(dim=1).mean(dim=1)``; the CLS-row attention of the CLIP original has no SigLIP counterpart),
   and that layer's keys averaged over heads (``raw_key_states.mean(1)``, the merge ``metric``). Both are pooled to
   the LLM grid exactly as the features (``get_2dPool``); the adapters document what they compute per backbone.
2. **Budget per frame.** ``S = keep_count(ratio, P)`` tokens per frame (the port's ``SPATIAL_TOKENS``), of which
   ``dominant = int(S · 54/64)`` (``DOMINANT_RATIO``, the paper's 54 dominant + 10 contextual of 64) and
   ``contextual = S - dominant``.
3. **Dominant tokens**: the ``dominant`` patches with the highest attention (``topk``), kept unchanged, in raster
   order (``masked_select``).
4. **Contextual tokens.** The other ``R = P - dominant`` patches, in raster order, are compared by the cosine of
   their keys. Targets are every ``step = max(1, R // contextual)``-th of them from the first, the first
   ``contextual``; every other remaining patch joins the target with the highest cosine (``argmax``), and a
   contextual token is ``target + mean(joined)`` (not the mean of the group: the official sum, kept on purpose; a
   target nobody joins stays itself).
5. **Output** per frame: dominant tokens, then contextual tokens in target order; frames concatenated; positions
   renumbered contiguously (one newline after the video on LLaVA-OneVision).

``ratio`` is the fraction of each frame's tokens kept (``SPATIAL_TOKENS / P``): exactly ``T · keep_count(ratio, P)``
tokens enter the LLM. HoliTom's scripts use ``SPATIAL_TOKENS`` 20/30/40/50 of 196 for 10/15/20/25 %.

Deviations (why): fp32 scoring and merging (the port runs bf16); stable top-k (equal attention keeps the lower index)
and lowest-index ``argmax`` on equal cosines, where ``torch`` leaves ties unspecified; at ``S = P`` (``ratio = 1``)
every token is kept in raster order (the official order, dominant first, would permute the frame for no pruning);
on LLaVA-Video the port sorts each frame's tokens by position and re-inserts a newline after every row, while the
adapter puts one newline after each frame's tokens. The CLIP original (PLLaVA's tower) scores with the CLS row at
layer -2 summed over heads; this module always uses ``frame_patch_attn``, so on PLLaVA it ranks by the attention
patches receive from all rows (CLS included). Not applicable to ST-LLM (its tokens are Q-Former queries; the adapter
refuses vision-side inputs).

Shape legend: ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``K`` key width, ``R`` non-dominant tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import (
    LayerInput,
    LayerSpec,
    PreLLMOutput,
    VideoTokens,
    check_range,
    check_ratio,
    keep_count,
    require_vision,
)

__all__ = ["VisionZip", "contextual_merge"]


def contextual_merge(hidden: Tensor, metric: Tensor, contextual: int) -> tuple[Tensor, Tensor, Tensor]:
    """VisionZip's contextual tokens for one frame.

    Args:
        hidden: ``[R, D]`` the non-dominant tokens in raster order.
        metric: ``[R, K]`` their keys (any scale; L2-normalised here).
        contextual: number of contextual tokens, ``1 <= contextual <= R``.

    Returns:
        ``[contextual, D]`` contextual tokens, ``[contextual]`` long target positions (into ``0..R-1``), and ``[R]``
        long index of the contextual token every non-dominant token went into.
    """
    r = hidden.shape[0]
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step, device=hidden.device)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    unit = F.normalize(metric.float(), dim=-1)
    others = (~is_target).nonzero()[:, 0]
    sim = unit[others] @ unit[targets].T  # [R - contextual, contextual]
    best = sim.max(dim=1, keepdim=True).values
    cols = torch.arange(targets.numel(), device=hidden.device).expand_as(sim)
    choice = torch.where(sim == best, cols, targets.numel()).amin(dim=1)  # first target among equal cosines
    x = hidden.float()
    sums = torch.zeros(targets.numel(), x.shape[1], device=x.device).index_add_(0, choice, x[others])
    counts = torch.bincount(choice, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
    merged = x[targets] + sums / counts  # target + mean of the joined tokens (official sum)
    into = torch.empty(r, dtype=torch.long, device=hidden.device)
    into[targets] = torch.arange(targets.numel(), device=hidden.device)
    into[others] = choice
    return merged, targets, into


@dataclass(frozen=True)
class VisionZip:
    """VisionZip, video port (see the module docstring).

    Args:
        ratio: fraction of each frame's tokens kept (dominant + contextual), in (0, 1].
        dominant_ratio: dominant share of a frame's kept tokens (official 54/64), in [0, 1].
    """

    ratio: float
    dominant_ratio: float = 54 / 64
    name: str = "visionzip"
    vision_inputs: ClassVar[frozenset[str]] = frozenset({"frame_patch_attn", "frame_patch_keys"})

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_range("dominant_ratio", self.dominant_ratio, 0.0, 1.0)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    def in_llm(self, step: LayerInput) -> Tensor:
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers

    def split(self, per_frame: int) -> tuple[int, int]:
        """``(dominant, contextual)`` tokens per frame of ``P = per_frame`` tokens."""
        kept = keep_count(self.ratio, per_frame)
        dominant = int(kept * self.dominant_ratio)
        return dominant, kept - dominant

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Dominant tokens by vision attention plus merged contextual tokens, frame by frame.

        Raises:
            ValueError: ``video`` lacks ``frame_patch_attn`` or ``frame_patch_keys``.
        """
        require_vision(video, self.vision_inputs, self.name)
        tokens = video.tokens
        t, p, d = tokens.shape
        device = tokens.device
        if keep_count(self.ratio, p) == p:  # nothing pruned: raster order (see the module docstring)
            return PreLLMOutput(tokens.reshape(t * p, d), torch.arange(t * p, device=device))
        dominant, contextual = self.split(p)
        attn = video.frame_patch_attn.float()
        keys = video.frame_patch_keys
        out, assignment, base = [], torch.full((t * p,), -1, dtype=torch.long, device=device), 0
        flops = 0.0
        for frame in range(t):
            top = torch.sort(attn[frame], descending=True, stable=True).indices[:dominant]
            is_dom = torch.zeros(p, dtype=torch.bool, device=device)
            is_dom[top] = True
            dom = is_dom.nonzero()[:, 0]  # raster order
            rest = (~is_dom).nonzero()[:, 0]
            out.append(tokens[frame, dom].float())
            assignment[frame * p + dom] = base + torch.arange(dom.numel(), device=device)
            base += dom.numel()
            if contextual > 0:
                merged, _, into = contextual_merge(tokens[frame, rest], keys[frame, rest], contextual)
                out.append(merged)
                assignment[frame * p + rest] = base + into
                base += merged.shape[0]
                flops += 2.0 * (rest.numel() - contextual) * contextual * keys.shape[-1]
        return PreLLMOutput(torch.cat(out).to(tokens.dtype), assignment, flops=flops)
