"""``holitom``: HoliTom, holistic token merging before and inside the LLM (Shao et al., NeurIPS 2025, arXiv:2505.21334).

Paper: "HoliTom: Holistic Token Merging for Fast Video Large Language Models". Official code: ``cokeshao/HoliTom``
(``holitom/llava_arch.py``: ``prepare_inputs_labels_for_multimodal``, ``select_static_windows``,
``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``,
``cluster_dpc_knn``, ``merge_tokens_by_clustering``, ``add_newline_token``; ``holitom/modeling_qwen2.py``:
``Qwen2Model_holitom.forward``; settings from ``scripts/eval_*_holitom.sh``). Our reading of it:

**Outer-LLM (before the LLM)**, on the projected, pooled tokens ``[T, P, D]`` and the vision tower's pooled patch
attention ``[T, P]`` (``VideoTokens.frame_patch_attn``: last vision layer, mean over heads and query rows):

1. **Similarity.** ``sim[t, p]`` = cosine of the tokens at location ``p`` in frames ``t`` and ``t + 1``.
2. **Global temporal segmentation** (``select_static_windows``). A window ``[s, e]`` of frames reduces
   ``count(s, e) = (e - s) * #{p : sim[i, p] > tau for every i in s..e-1}`` tokens (each static location keeps
   one of its ``e - s + 1`` copies). A dynamic programme over the frames maximises the total reduction:
   ``dp[i] = max(dp[i-1], max_{2 <= w <= min(i+1, max_window)} dp[i-w] + count(i-w+1, i))``, with ``dp[-1] = 0``;
   ties keep the earlier candidate (a frame on its own first, then shorter windows: strict ``>``). Backtracking
   ``prev`` gives the windows.
3. **Budget** (not ``round(ratio * N)``). With ``N = T * P`` and ``R = dp[T-1]`` the tokens removed by step 4,
   ``r' = min(ratio / ((N - R) / N), 1)``. Every frame and window then rounds on its own (below), so the count
   entering the LLM depends on the video; it is close to ``ratio * N``.
4. **Static tokens** of a window of ``W >= 2`` frames: the locations above ``tau`` in every consecutive pair are
   averaged over the ``W`` frames (one token per location), then clustered (``merge_tokens_by_density``):
   ``c = round(n_static * r')`` (Python ``round``, half to even) DPC-kNN centres (``cluster_dpc_knn``: distances
   ``cdist / sqrt(D)``, density ``exp(-mean of the squared distances to the min(K, c) nearest, self included)``
   plus uniform noise ``1e-6`` that breaks ties, distance to the nearest denser token (else the largest distance),
   score = distance x density, the ``c`` best, re-sorted). Every other static token joins its nearest centre
   (``argmin``), and a centre with members becomes ``beta * centre + (1 - beta) * mean(members)``
   (``merge_tokens_by_clustering``, ``NO_BETA`` unset), else stays itself. ``c = 0`` drops them all.
5. **Dynamic tokens** of every frame (a lone frame: all ``P``; a window: the non-static locations):
   ``ceil(P_dyn * r')`` by the vision attention (``topk``), kept unchanged in raster order
   (``merge_tokens_by_attention_density`` with ``D = 0``; the rest are dropped).
6. **Order.** LLaVA-OneVision (``mm_newline_position = "one_token"``): per window its static tokens, then each frame's
   dynamic tokens; one newline after the video. LLaVA-Video (``"grid"``): a window's static tokens join its first
   frame and each frame's tokens are sorted by location (a static token at its centre's location), a newline after
   every row that still has tokens. Positions are renumbered contiguously (``order`` selects the two orders).

**Inner-LLM** (``HOLITOM_k = 18``, ``HOLITOM_r = 0.5`` for the 7B models): at layer ``k`` of the prefill, the attention
of layer ``k - 1`` (its own forward, ``output_attentions``) averaged over heads, last prompt token's row, visual span:
the ``round(n * (1 - r))`` highest survive. Each other visual token is merged into the survivor with the highest
cosine similarity of the hidden states entering layer ``k`` (computed once, before any merge), **sequentially** in
index order: ``h[s] = (h[s] + h[t]) / 2``. A survivor that absorbs ``t_1 < ... < t_m`` ends as
``h_s / 2^m + sum_i h_{t_i} / 2^(m - i + 1)``. Survivors keep their original positions (``position_ids =
keep_indexs``); the caches of layers ``< k`` keep every token; decoding continues at the unpruned positions. Here:
``LayerSpec(layer=k-1, queries="last", hidden=True)`` and a :class:`~prune.api.LayerMerge` with those weights.
``merge_layer=None`` is the paper's "HoliTom (w/o M)".

``ratio`` is ``RETAIN_RATIO``: the before-LLM retained fraction the HoliTom table reports (about ``ratio * N`` tokens
enter the LLM; the inner merge halves them from layer ``k`` on). The equal-budget solver moves ``ratio`` alone,
re-running the outer stage (its count is monotone in it); the inner ``r`` stays at its value.

Deviations (why):

* ``ratio = 1`` is the unpruned model: nothing is merged before or inside the LLM (the official code would still
  merge static windows and halve the tokens at layer ``k``). The inner merge is skipped whenever the outer stage
  kept every token (only ``ratio = 1``, or a ratio within ``1/P`` of 1 on a video without static windows).
* Separators (newlines) are never merged or counted: the official inner count ``round(n * (1 - r))`` includes the
  newline tokens in ``n`` and may merge them; here ``n`` is the visual tokens alone. On LLaVA-Video the adapter puts
  one newline after each frame's tokens, not one per non-empty row (its newline policy for every method).
* The density noise comes from a ``torch.Generator`` seeded with ``seed`` (the official draws from the global RNG):
  runs are reproducible. Attention ``topk`` and the final centre choice keep the lower index on ties (``topk``
  leaves them unspecified); ``argmin``/``argmax`` take the first. Similarities, clustering and merging run in fp32
  (the official code runs the model dtype).
* ``D > 0`` (contextual dynamic tokens by DPC-kNN) is not offered: the official ``D > 0`` path fails on a broadcast
  in ``merge_tokens_by_attention_density`` (``pos.masked_select(mask.unsqueeze(-1))``), and every script uses
  ``D = 0``.
* Every inner merge keeps at least one token (``round`` could give 0).

Shape legend: ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``W`` frames of a window, ``n`` visual tokens
present, ``k`` survivors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import (
    LayerInput,
    LayerMerge,
    LayerSpec,
    PreLLMOutput,
    VideoTokens,
    check_range,
    check_ratio,
    require_vision,
)

__all__ = ["HoliTom", "dpc_knn_centres", "merge_weights", "static_windows", "window_reduction"]


def window_reduction(sim: Tensor, tau: float) -> Tensor:
    """``count[s, e]``: tokens a static window over frames ``s..e`` removes (``get_pruned_static_count``).

    Args:
        sim: ``[T-1, P]`` cosine similarity of each location between consecutive frames.
        tau: a location is static in a window when every consecutive similarity inside it exceeds ``tau``.

    Returns:
        ``[T, T]`` long; ``(e - s) * #static locations`` for ``e > s``, 0 elsewhere.
    """
    t = sim.shape[0] + 1
    count = torch.zeros(t, t, dtype=torch.long)
    above = (sim > tau).long().cpu()
    for s in range(t - 1):
        run = torch.cumprod(above[s:], dim=0).sum(dim=1)  # [T-1-s]: static locations of windows [s, s+1..T-1]
        count[s, s + 1 :] = run * torch.arange(1, t - s)
    return count


def static_windows(sim: Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's global temporal segmentation (``select_static_windows``): windows maximising the static reduction.

    Args:
        sim: ``[T-1, P]`` consecutive-frame similarities.
        tau: static threshold.
        max_window: the longest window in frames (``MAX_WINDOW_SIZE``).

    Returns:
        ``[(start, end), ...]`` inclusive frame windows covering ``0..T-1`` in order, and the tokens they remove.
    """
    t = sim.shape[0] + 1
    count = window_reduction(sim, tau).tolist()
    dp, prev = [0] * t, [0] * t
    for i in range(t):
        best, best_j = (dp[i - 1] if i > 0 else 0), i  # frame i alone
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            value = (dp[j] if j >= 0 else 0) + count[j + 1][i]
            if value > best:  # strict: ties keep the shorter candidate, as the official loop
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], t - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def dpc_knn_centres(x: Tensor, centres: int, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """DPC-kNN cluster centres (``cluster_dpc_knn``).

    Args:
        x: ``[n, D]`` tokens.
        centres: number of centres ``c``, ``1 <= c <= n``.
        k: neighbours for the density (``min(K, c)`` in the official call).
        generator: source of the ``1e-6`` density noise that breaks ties.

    Returns:
        ``[c]`` sorted long indices of the centres and the ``[n, n]`` distance matrix (``cdist / sqrt(D)``).
    """
    x = x.float()
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[-1])
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=generator).to(density.device) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = torch.where(denser, dist, dist.max()).min(dim=-1).values
    score = to_denser * density
    top = torch.sort(score, descending=True, stable=True).indices[:centres]  # ties: the lower index
    return torch.sort(top).values, dist


def merge_weights(into: Tensor, keep: Tensor) -> Tensor:
    """Weights of HoliTom's sequential pairwise averaging, as one weighted sum per survivor.

    Each non-survivor ``t`` is averaged into its survivor in index order, ``h[s] = (h[s] + h[t]) / 2``, so a survivor
    absorbing ``t_1 < ... < t_m`` ends as ``h_s / 2^m + sum_i h_{t_i} / 2^(m - i + 1)``.

    Args:
        into: ``[n]`` long, the survivor (``0..k-1``) of every token; survivors map to themselves.
        keep: ``[k]`` sorted indices of the survivors.

    Returns:
        ``[n]`` float64 weights, summing to 1 over each survivor's group.
    """
    n, kk = into.numel(), keep.numel()
    is_kept = torch.zeros(n, dtype=torch.bool, device=into.device)
    is_kept[keep] = True
    absorbed = (~is_kept).nonzero()[:, 0]  # ascending: the official loop order
    group = into[absorbed]
    m = torch.bincount(group, minlength=kk)
    order = torch.sort(group, stable=True).indices  # by survivor, index order within each
    starts = torch.cumsum(m, 0) - m
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=into.device) - starts[group[order]]  # 0-based within the group
    weights = torch.empty(n, dtype=torch.float64, device=into.device)
    weights[keep] = torch.pow(2.0, -m.double())
    weights[absorbed] = torch.pow(2.0, -(m[group] - rank).double())
    return weights


@dataclass(frozen=True)
class HoliTom:
    """HoliTom: global temporal segmentation, spatio-temporal merging before the LLM, similarity merging inside it.

    Args:
        ratio: ``RETAIN_RATIO``, the before-LLM retained fraction (HoliTom's own count, see the module docstring).
        tau: ``T``, the static threshold on consecutive-frame cosine (0.8; the scripts use 0.65 at ``ratio = 0.1`` on
            LLaVA-OV).
        beta: ``BETA``, a static centre's weight against its members' mean (0.6).
        neighbours: ``K``, the DPC-kNN neighbours (7; ``min(K, c)`` are used).
        max_window: ``MAX_WINDOW_SIZE``, the longest static window in frames (1024: unbounded).
        merge_layer: ``HOLITOM_k``, the decoder layer from which the inner merge applies (scored with layer
            ``k - 1``'s attention); ``None``: no inner merge ("HoliTom (w/o M)").
        merge_ratio: ``HOLITOM_r``, the fraction of visual tokens merged away at ``merge_layer``, in [0, 1).
        order: ``"static_first"`` (LLaVA-OneVision's flat order: a window's static tokens, then each frame's dynamic
            tokens) or ``"position"`` (LLaVA-Video's grid order: each frame by location, static tokens in the
            window's first frame).
        seed: seed of the density noise (the official code draws it from the global RNG).
    """

    ratio: float = 0.15
    tau: float = 0.8
    beta: float = 0.6
    neighbours: int = 7
    max_window: int = 1024
    merge_layer: int | None = 18
    merge_ratio: float = 0.5
    order: Literal["static_first", "position"] = "static_first"
    seed: int = 0
    name: str = "holitom"
    vision_inputs: ClassVar[frozenset[str]] = frozenset({"frame_patch_attn"})

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for key, low, high in (("tau", -1.0, 1.0), ("beta", 0.0, 1.0)):
            check_range(key, getattr(self, key), low, high)
        r = self.merge_ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or not 0.0 <= r < 1.0:
            raise ValueError(f"merge_ratio must be a number in [0, 1), got {r!r}")
        for key, low in (("neighbours", 1), ("max_window", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        k = self.merge_layer
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"merge_layer must be an int >= 1 (first layer on the merged sequence) or null, got {k!r}")
        if self.order not in ("static_first", "position"):
            raise ValueError(f"order must be 'static_first' or 'position', got {self.order!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Layer ``k - 1``'s own attention (last prompt token, head mean); the merge applies from layer ``k``."""
        if self.merge_layer is None:
            return ()
        return (LayerSpec(layer=self.merge_layer - 1, queries="last", head_reduce="mean", hidden=True),)

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Segment the video into static windows, merge static tokens, keep the most attended dynamic ones.

        Raises:
            ValueError: ``video`` lacks ``frame_patch_attn``.
        """
        require_vision(video, self.vision_inputs, self.name)
        tokens = video.tokens
        t, p, d = tokens.shape
        device = tokens.device
        if self.ratio >= 1.0:  # the unpruned model (module docstring, deviations)
            return PreLLMOutput(tokens.reshape(t * p, d), torch.arange(t * p, device=device))
        x = tokens.float()
        attn = video.frame_patch_attn.float()
        # cosine of consecutive frames per location, frame pair by frame pair (no [T-1, P, D] temporary)
        norm = torch.linalg.vector_norm(x, dim=-1)
        dots = [(x[i] * x[i + 1]).sum(dim=-1) for i in range(t - 1)]
        sim = torch.stack(dots) if dots else x.new_zeros(0, p)
        sim = sim / (norm[:-1] * norm[1:]).clamp_min(1e-8)  # [T-1, P]
        windows, reduced = static_windows(sim, self.tau, self.max_window)
        total = t * p
        r = min(self.ratio / ((total - reduced) / total), 1)  # the official expression, so floats round alike
        generator = torch.Generator().manual_seed(self.seed)
        flops = 2.0 * (t - 1) * p * d  # consecutive-frame cosines (matmul-class work only)

        static_tok: list[Tensor] = []  # [*, D] merged static tokens, in output order
        origin: list[Tensor] = []  # the input token (flattened t * P + p) whose place each output token takes
        is_merged: list[Tensor] = []  # [*] bool: the output token is a merged static token
        assignment = torch.full((total,), -1, dtype=torch.long, device=device)
        every = torch.arange(p, device=device)
        n_out = 0
        for start, end in windows:
            if start == end:
                is_static = torch.zeros(p, dtype=torch.bool, device=device)
            else:
                is_static = (sim[start:end] > self.tau).all(dim=0)
            static_loc = is_static.nonzero()[:, 0]
            dynamic_loc = every[~is_static]
            # static tokens: the window's temporal mean per location, then DPC-kNN clusters
            s_tok, s_loc, s_into = x.new_zeros(0, d), static_loc[:0], static_loc[:0]
            c = round(static_loc.numel() * r)  # Python round, as merge_tokens_by_density
            if static_loc.numel() and c > 0:
                mean = x[start : end + 1, static_loc].mean(dim=0)
                centre, dist = dpc_knn_centres(mean, c, min(self.neighbours, c), generator)
                flops += 2.0 * static_loc.numel() ** 2 * d
                is_centre = torch.zeros(static_loc.numel(), dtype=torch.bool, device=device)
                is_centre[centre] = True
                members = (~is_centre).nonzero()[:, 0]
                s_into = torch.empty(static_loc.numel(), dtype=torch.long, device=device)
                s_into[centre] = torch.arange(c, device=device)
                s_into[members] = dist[members][:, centre].argmin(dim=1)  # argmin: the first centre on ties
                s_tok = mean[centre].clone()
                if members.numel():
                    sums = torch.zeros(c, d, device=device).index_add_(0, s_into[members], mean[members])
                    sizes = torch.bincount(s_into[members], minlength=c)
                    joined = sizes > 0
                    s_tok[joined] = self.beta * mean[centre][joined] + (1 - self.beta) * (
                        sums[joined] / sizes[joined, None]
                    )
                s_loc = static_loc[centre]
            # dynamic tokens of every frame: ceil(P_dyn * r') by vision attention, raster order
            keep_dyn = math.ceil(dynamic_loc.numel() * r)
            top = torch.sort(attn[start : end + 1, dynamic_loc], dim=1, descending=True, stable=True).indices
            kept = dynamic_loc[torch.sort(top[:, :keep_dyn], dim=1).values]  # [W, keep_dyn] locations
            # output order as (location, frame) pairs; static tokens sit in the window's first frame
            frames = torch.arange(start, end + 1, device=device)[:, None].expand_as(kept)
            s_frame = torch.full_like(s_loc, start)
            if self.order == "static_first":  # LLaVA-OneVision: static tokens, then every frame's dynamic ones
                locs = torch.cat([s_loc, kept.reshape(-1)])
                fr = torch.cat([s_frame, frames.reshape(-1)])
            else:  # LLaVA-Video grid: the first frame holds the static tokens, every frame sorted by location
                first = torch.cat([s_loc, kept[0]])
                by_loc = torch.sort(first, stable=True).indices
                locs = torch.cat([first[by_loc], kept[1:].reshape(-1)])
                fr = torch.cat([torch.full_like(first, start), frames[1:].reshape(-1)])
            flat = fr * p + locs
            merged = is_static[locs] & (fr == start)  # dynamic tokens never sit at a static location
            slot = n_out + torch.arange(locs.numel(), device=device)
            assignment[flat[~merged]] = slot[~merged]
            if s_loc.numel():  # every frame's copy of a static location goes to its cluster (centre order kept)
                member_slot = slot[merged][s_into]
                for f in range(start, end + 1):
                    assignment[f * p + static_loc] = member_slot
            n_out += locs.numel()
            static_tok.append(s_tok)
            origin.append(flat)
            is_merged.append(merged)
        flat = torch.cat(origin)
        merged = torch.cat(is_merged)
        out = tokens.reshape(total, d)[flat]  # one gather of the kept tokens, in the input dtype
        if bool(merged.any()):
            out[merged] = torch.cat(static_tok).to(tokens.dtype)
        return PreLLMOutput(out, assignment, origin=flat, flops=flops)

    def in_llm(self, step: LayerInput) -> Tensor | LayerMerge:
        """Keep the ``round(n * (1 - r))`` most attended tokens; merge each other into its most similar survivor.

        Raises:
            ValueError: ``step.hidden`` is missing (the spec asks the adapter for it).
        """
        n = step.visual.numel()
        device = step.visual.device
        if self.merge_layer is None or _unpruned(step.pre):
            return torch.arange(n, device=device)
        if step.hidden is None:
            raise ValueError("holitom needs LayerInput.hidden (LayerSpec.hidden=True)")
        k = _inner_count(n, self.merge_ratio)
        top = torch.sort(step.scores.float(), descending=True, stable=True).indices[:k]
        keep = torch.sort(top).values
        is_kept = torch.zeros(n, dtype=torch.bool, device=device)
        is_kept[keep] = True
        unit = F.normalize(step.hidden.float(), dim=-1)
        into = torch.empty(n, dtype=torch.long, device=device)
        into[keep] = torch.arange(k, device=device)
        absorbed = (~is_kept).nonzero()[:, 0]
        if absorbed.numel():
            into[absorbed] = (unit[absorbed] @ unit[keep].T).argmax(dim=1)  # argmax: the first survivor on ties
        return LayerMerge(keep=keep, into=into, weights=merge_weights(into, keep).float())

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        """``pre.n`` in layers ``< k``, ``round(pre.n * (1 - r))`` from layer ``k`` on."""
        if self.merge_layer is None or _unpruned(pre):
            return (pre.n,) * num_layers
        k = min(self.merge_layer, num_layers)
        return (pre.n,) * k + (_inner_count(pre.n, self.merge_ratio),) * (num_layers - k)


def _inner_count(n: int, merge_ratio: float) -> int:
    """Survivors of the inner merge: ``round(n * (1 - r))`` (Python ``round``, as the official code), at least 1."""
    return min(n, max(1, round(n * (1 - merge_ratio))))


def _unpruned(pre: PreLLMOutput) -> bool:
    """The outer stage kept every token as it was (``ratio = 1``): the inner merge is skipped too."""
    return pre.n == pre.assignment.numel()
