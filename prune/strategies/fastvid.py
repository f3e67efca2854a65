"""``fastvid``: FastVID, dynamic density pruning for video LLMs (Shen et al., NeurIPS 2025, arXiv 2503.11187).

Paper: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models".

Official code: ``LunarShen/FastVID``, the LLaVA-OneVision block of ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/
language_model/modeling_qwen2.py`` (``Qwen2Model.forward``, between "FastVID" markers), fed by ``llava_arch.py``
(``encode_images``, ``get_attn_2dPool``) and ``multimodal_encoder/siglip_encoder.py`` (``SigLipVisionAbstract``).
Our reading, rule by rule (``docs/methods/fastvid.md`` has the full list):

* **Inputs from the vision tower.** SigLIP's ``post_layernorm`` and attention-pooling head, which LLaVA-OneVision
  drops, are restored from the SigLIP checkpoint and run on the tower's output: the pooled vector is the frame's
  global descriptor (``VideoTokens.frame_global``), and the head's attention over the 729 patches (averaged over
  heads), bilinearly pooled to 14x14 like the features, is the salience (``frame_head_attn``).
* **DySeg** (:func:`dyseg`, shared with HieraVid): cosine of adjacent L2-normalised descriptors; a cut after frame
  ``f`` where it is below ``tau`` (0.9), and always at the ``c - 1`` lowest similarities (``c = 8``).
* **Per-frame budget.** ``retain = int(P · ratio)``; ``salient = retain - int(retain · d)`` (``d = 0.4``) and
  ``C = retain - salient`` context tokens per frame on average.
* **ATS (salient tokens).** Per frame, the ``salient`` tokens with the highest head attention, kept unchanged.
* **Anchor distribution.** In a segment of ``L`` frames, ``cur = (C · L) // ceil(L / p)`` anchors (``p = 4``) go to
  the last frame and every ``p``-th frame before it; the other frames get none. A one-frame segment gets ``C``.
* **Density score** (per frame, over its non-salient tokens in raster order): ``dist = cdist / sqrt(D)``; density
  ``ρ = exp(-mean of the 4 smallest dist²)`` (the token itself included) plus uniform noise ``· 1e-6``;
  ``δ = min dist`` to a denser token (the frame's largest distance when none is denser); score ``ρ · δ``.
* **DTM, one-frame segments** (and any frame whose anchor count is exactly ``C``): the ``C`` best-scoring tokens are
  anchors; every non-salient token of the frame (anchors included) joins its most cosine-similar anchor; an anchor
  becomes ``w · anchor + (1 - w) · mean(joined)`` with ``w = max(1 / (joined + 1), β)`` (``β = 0.6``).
* **DTM, longer segments.** For every anchor frame, its ``cur`` best-scoring tokens are anchors, and *all*
  non-salient tokens of *all* the segment's frames join that frame's most similar anchor (so a token is averaged
  into one anchor of every anchor frame of its segment), with the same weighting.
* **Output and positions.** Salient tokens and anchors are sorted by their index in the unpruned sequence and keep
  it as their position id (``position_ids = keep_indexs``, ``positions="original"`` here); the text after the video
  and the newline keep their original positions too.

``ratio`` is FastVID's ``retention_ratio``: about ``T · int(P · ratio)`` tokens enter the LLM (a few fewer where
``C · L`` does not divide evenly among a segment's anchor frames).

Decisions and deviations (why):

* **Clips shorter than the segment count.** The official ``topk(similarity, c - 1)`` fails when ``T - 1 < c - 1``;
  here ``c`` is capped at ``T``, so every frame becomes its own segment (one-frame DTM everywhere). ``T = 1`` is one
  segment.
* **Anchor counts above a frame's non-salient tokens** (long segments at high ratios, e.g. ``L = 4`` above about 45 %)
  make the official ``topk`` fail; they are capped at the frame's non-salient count and the budget is under-met.
* ``retain`` is at least 1 per frame (``int(P · ratio)`` can be 0 only below ``1/P``); ``ratio = 1.0`` returns every
  token unchanged (the official would still merge its 40 % context share).
* The density noise comes from a ``torch.Generator`` seeded with ``seed`` (the official draws from the global RNG);
  ties in top-k and ``argmax`` go to the lower index (stable sorts); scores and merges run in fp32.
* ``assignment`` must name one output token per input token; a token merged into several anchor frames' anchors is
  listed under the first anchor frame at or after its own frame (its ``p``-frame group). The merged values use all of
  them, as the official code does.
* On PLLaVA, ``frame_global`` is CLIP's pooled CLS and ``frame_head_attn`` the CLS row's attention (no pooling head);
  ST-LLM is refused (Q-Former tokens have no patch attention). On LLaVA-Video the map is average-pooled like its
  features; FastVID's LLaVA-Video project was not read for this port.

Shape legend: ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``G`` descriptor width, ``M`` non-salient tokens
per frame, ``L`` frames of a segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_range, check_ratio, require_vision

__all__ = ["FastVID", "anchor_counts", "density_scores", "dyseg", "merge_into_anchors"]

_NEIGHBOURS = 4  # torch.topk(dist_matrix, k=4, largest=False) in the official density


def dyseg(descriptors: Tensor, num_segments: int, tau: float) -> Tensor:
    """DySeg: FastVID's dynamic temporal segmentation from per-frame descriptors.

    ``s_f = cos(g_f, g_{f+1})`` of L2-normalised descriptors. A cut goes after frame ``f`` when ``s_f < tau``, and
    always after the ``c - 1`` frames with the lowest ``s_f`` (``c = min(num_segments, T)``; among equal similarities
    the earlier transition is cut first), so there are at least ``c`` segments.

    Args:
        descriptors: ``[T, G]`` one global descriptor per frame (FastVID: SigLIP's pooled output; HieraVid: the mean
            token).
        num_segments: ``c``, the minimum number of segments (capped at ``T``; the official code fails above it).
        tau: cut threshold on the adjacent-frame cosine.

    Returns:
        ``[T]`` long segment id of each frame, ``0 .. S-1``, non-decreasing.
    """
    t = descriptors.shape[0]
    device = descriptors.device
    if t == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    g = F.normalize(descriptors.float(), dim=-1)
    sim = (g[:-1] * g[1:]).sum(-1)  # [T-1]
    cut = sim < tau
    forced = min(num_segments, t) - 1
    if forced > 0:
        cut[torch.sort(sim, stable=True).indices[:forced]] = True
    return torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(cut.long(), 0)])


def anchor_counts(lengths: list[int], context: int, group: int) -> list[int]:
    """Anchors of every frame, segment by segment.

    A segment of ``L`` frames gives ``(C · L) // ceil(L / p)`` anchors to its last frame and to every ``p``-th frame
    before it, 0 to the others; a one-frame segment gets ``C``.

    Args:
        lengths: segment lengths in frame order.
        context: ``C``, context tokens per frame.
        group: ``p``, frames per anchor frame.
    """
    counts: list[int] = []
    for length in lengths:
        per = (context * length) // ((length + group - 1) // group)
        counts.extend(per if (length - 1 - j) % group == 0 else 0 for j in range(length))
    return counts


def density_scores(x: Tensor, generator: torch.Generator, neighbours: int = _NEIGHBOURS) -> Tensor:
    """DPC scores ``ρ · δ`` of the tokens of each frame.

    Args:
        x: ``[F, M, D]`` tokens (fp32).
        generator: CPU generator of the ``1e-6`` tie-break noise.
        neighbours: nearest neighbours of the density (4 official; capped at ``M``).

    Returns:
        ``[F, M]`` scores (high: dense and far from any denser token).
    """
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])  # [F, M, M]
    k = min(neighbours, x.shape[1])
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    density = density + torch.rand(density.shape, generator=generator).to(density.device) * 1e-6
    denser = density[:, None, :] > density[:, :, None]  # [F, i, j]: j is denser than i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    return delta * density


def merge_into_anchors(anchors: Tensor, pool: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DTM: each pool token joins its most cosine-similar anchor; anchors become ``w·a + (1-w)·mean(joined)``.

    Args:
        anchors: ``[A, D]`` anchor tokens (fp32).
        pool: ``[M, D]`` tokens to merge (fp32; may contain the anchors themselves, as the official code does).
        beta: lower bound of the anchor's own weight ``w = max(1 / (joined + 1), beta)``.

    Returns:
        ``[A, D]`` merged anchors and ``[M]`` long index of the anchor each pool token joined.
    """
    sim = F.normalize(pool, dim=-1) @ F.normalize(anchors, dim=-1).T  # [M, A]
    best = sim.max(dim=1, keepdim=True).values
    cols = torch.arange(anchors.shape[0], device=pool.device).expand_as(sim)
    choice = torch.where(sim == best, cols, anchors.shape[0]).amin(dim=1)  # lowest index among equal cosines
    joined = torch.bincount(choice, minlength=anchors.shape[0]).unsqueeze(1).to(pool.dtype)
    sums = torch.zeros_like(anchors).index_add_(0, choice, pool)
    weight = (1.0 / (joined + 1)).clamp(min=beta)
    return weight * anchors + (1 - weight) * sums / joined.clamp(min=1), choice


@dataclass(frozen=True)
class FastVID:
    """FastVID (see the module docstring).

    Args:
        ratio: ``retention_ratio``, fraction of each frame's tokens kept on average, in (0, 1].
        num_segments: ``c`` of DySeg (official 8), ``>= 1``.
        tau: DySeg threshold (official 0.9), in [-1, 1].
        d: context share of the per-frame budget (``STPrune_d``, official 0.4), in [0, 1].
        p: frames per anchor frame in a segment (``DTM_p``, official 4), ``>= 1``.
        beta: lower bound of an anchor's own weight (``DTM_beta``, official 0.6), in [0, 1].
        seed: seed of the density tie-break noise.
    """

    ratio: float
    num_segments: int = 8
    tau: float = 0.9
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    seed: int = 0
    name: str = "fastvid"
    vision_inputs: ClassVar[frozenset[str]] = frozenset({"frame_global", "frame_head_attn"})

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for key, low in (("num_segments", 1), ("p", 1), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        for key, low, high in (("tau", -1.0, 1.0), ("d", 0.0, 1.0), ("beta", 0.0, 1.0)):
            check_range(key, getattr(self, key), low, high)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    def in_llm(self, step: LayerInput) -> Tensor:
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers

    def budget(self, per_frame: int) -> tuple[int, int]:
        """``(salient, context)`` tokens per frame of ``P = per_frame`` tokens."""
        retain = max(1, int(per_frame * self.ratio))
        salient = retain - int(retain * self.d)
        return salient, retain - salient

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """DySeg, then salient tokens plus density-merged anchors, at their original positions.

        Raises:
            ValueError: ``video`` lacks ``frame_global`` or ``frame_head_attn``.
        """
        require_vision(video, self.vision_inputs, self.name)
        tokens = video.tokens
        t, p, d = tokens.shape
        device = tokens.device
        if self.ratio == 1.0:  # identity (see the module docstring)
            return PreLLMOutput(tokens.reshape(t * p, d), torch.arange(t * p, device=device))
        salient, context = self.budget(p)
        seg_id = dyseg(video.frame_global, self.num_segments, self.tau)
        lengths = torch.bincount(seg_id).tolist()
        counts = anchor_counts(lengths, context, self.p)

        x = tokens.float()
        order = torch.sort(video.frame_head_attn.float(), dim=1, descending=True, stable=True).indices
        is_salient = torch.zeros(t, p, dtype=torch.bool, device=device)
        is_salient.scatter_(1, order[:, :salient], True)
        rest = (~is_salient).nonzero()[:, 1].view(t, p - salient)  # [T, M] non-salient positions, raster order
        m = rest.shape[1]
        frame_idx = torch.arange(t, device=device).unsqueeze(1)
        filtered = x[frame_idx, rest]  # [T, M, D]
        generator = torch.Generator().manual_seed(self.seed)
        scores = density_scores(filtered, generator) if m else filtered.new_zeros(t, 0)
        flops = 3.0 * t * m * m * d  # cdist

        out_index: list[Tensor] = [(frame_idx * p + torch.nonzero(is_salient)[:, 1].view(t, salient)).reshape(-1)]
        out_tokens: list[Tensor] = [x[is_salient]]  # [T * salient, D] in frame, raster order
        members: list[tuple[Tensor, Tensor]] = []  # (input indices, index into the anchor list of this call)
        start = 0
        for length in lengths:
            frames = list(range(start, start + length))
            start += length
            targets = [f for f in frames if counts[f] > 0]
            if not targets or m == 0:
                continue
            single = length == 1 or counts[targets[0]] == context
            for f in targets:
                k = min(counts[f], m)
                pick = torch.sort(scores[f], descending=True, stable=True).indices[:k]
                if single:
                    pool_frames = [f]
                else:  # every non-salient token of the segment joins this frame's anchors
                    pool_frames = frames
                pool = filtered[pool_frames].reshape(-1, d)
                merged, choice = merge_into_anchors(filtered[f, pick], pool, self.beta)
                flops += 2.0 * pool.shape[0] * k * d
                anchor_pos = f * p + rest[f, pick]
                base = sum(int(ix.numel()) for ix in out_index)
                out_index.append(anchor_pos)
                out_tokens.append(merged)
                # assignment: a pool token is listed under the first anchor frame at or after its own frame
                pool_pos = (torch.tensor(pool_frames, device=device).unsqueeze(1) * p + rest[pool_frames]).reshape(-1)
                home = torch.tensor(
                    [next(g for g in targets if g >= h) for h in pool_frames], device=device
                ).repeat_interleave(m)
                mine = home == f
                members.append((pool_pos[mine], base + choice[mine]))
                members.append((anchor_pos, base + torch.arange(k, device=device)))

        index = torch.cat(out_index)
        merged_tokens = torch.cat(out_tokens)
        sort = torch.sort(index).indices
        rank = torch.empty_like(sort)
        rank[sort] = torch.arange(sort.numel(), device=device)
        assignment = torch.full((t * p,), -1, dtype=torch.long, device=device)
        for pos, slot in members:
            assignment[pos] = rank[slot]
        assignment[out_index[0]] = rank[: out_index[0].numel()]
        return PreLLMOutput(
            merged_tokens[sort].to(tokens.dtype),
            assignment,
            positions="original",
            flops=flops,
            origin=index[sort],
        )
