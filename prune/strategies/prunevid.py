"""PruneVid: visual token pruning for efficient video LLMs.

Paper: Xiaohu Huang, Hao Zhou, Kai Han, "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
arXiv 2412.16117 (Findings of ACL 2025). Official code: ``Visual-AI/PruneVid`` (PLLaVA only):
``models/pllava/modeling_pllava.py`` (stage 1: ``cluster_dpc_knn``, ``refine_clusters``, ``merge_frames_dynamic``)
and ``models/pllava/elastic_cache.py`` (stage 2: ``VTPWindowCache``). The paper body was not available to us, so
every rule below follows the official code; the deviations are listed here and nowhere else.

Stage 1, before the LLM (``merge_tokens``):
  1. Temporal segmentation: DPC-KNN over the T frame-mean vectors into ``int(T * temporal_segment_ratio)``
     clusters, then ``refine_clusters`` makes the labels contiguous; segments are the runs of equal labels.
  2. Per segment of W frames, a location p is static when the mean off-diagonal cosine similarity of its W tokens
     is strictly greater than ``tau``. One mask per segment, shared by all its frames.
  3. Static tokens are averaged over the W frames; the static set (if more than 14 tokens) and each frame's dynamic
     set (if more than 14) are merged spatially by DPC-KNN into ``int(n * cluster_ratio)`` cluster means.
  4. Output per segment in time order: [static clusters, dynamic clusters of frame 1, ..., of frame W], clusters in
     centre-score order (not spatial order), exactly as the official code concatenates them.

Stage 2, inside the LLM after decoder layer K (``token_scores`` and ``select_tokens``): each visual token's score is
the max over heads and over every query row after the video of the non-causal softmax of pre-RoPE Q·Kᵀ/√d; the top
``int(alpha * size)`` tokens of each static group and of each frame's dynamic group survive, in original order, and
all text tokens stay. Layers 0..K see the stage-1 sequence and their KV caches are cut to the survivors too.

The one knob: ``ratio`` is α, the per-group fraction kept at layer K. The paper's setting is ``ratio=0.4``; τ=0.8,
temporal_segment_ratio=0.25, cluster_ratio=0.5, k=7 and K=10 stay at the values of the official ``scripts/eval.sh``.
Stage 1 is content-dependent, so the retained fraction is not fixed by ``ratio``: the achieved count is reported.

Deviations from the official code (none changes a result except through floating-point rounding or ties):
  * The density tie-break noise ``U(0, 1) * 1e-6`` comes from a seeded ``torch.Generator`` (official: global RNG).
  * Ties in the centre scores and in the stage-2 top-k go to the lower index (stable sort); ``torch.topk`` leaves
    the order of ties unspecified.
  * Similarities, means and cluster averages are computed in fp32 and cast back (official: the model dtype, bf16).
  * Frame-descriptor distances use the exact pairwise form for any T; ``torch.cdist``'s default switches to a
    matrix-product form above 25 points (T=32, 64), whose rounding makes identical frames look distinct.
  * Edge cases the official code crashes on: ``T < k`` uses ``k = T`` neighbours; a cluster count that rounds to 0
    becomes 1; a one-frame segment (only when T=1) has every token dynamic, as the official 0/0 = NaN > tau gives.

Shape legend: T frames, P tokens per frame, C feature size, W frames in a segment, n tokens after stage 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio, check_video

__all__ = [
    "MergeResult",
    "PruneVid",
    "cluster_dpc_knn",
    "merge_tokens",
    "refine_clusters",
    "segment_frames",
    "select_tokens",
    "token_scores",
]

# Official constant (modeling_pllava.py, merge_frames_dynamic): groups of at most 14 tokens are not merged.
MERGE_SKIP_MAX = 14


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def cluster_dpc_knn(
    x: Tensor, cluster_num: int, k: int = 7, generator: torch.Generator | None = None, exact: bool = False
) -> Tensor:
    """DPC-KNN clustering (density peaks with k-nearest-neighbour density), as ``cluster_dpc_knn`` of the official code.

    Args:
        x: ``[B, N, C]`` points; B independent problems (e.g. the frames of a segment) solved at once.
        cluster_num: number of clusters m, 1 <= m <= N.
        k: neighbours for the density, counting the point itself (its distance 0); ``min(k, N)`` are used.
        generator: source of the ``U(0, 1) * 1e-6`` density tie-break noise (drawn on the CPU).
        exact: compute distances pairwise instead of by matrix product (see the module docstring).

    Returns:
        ``[B, N]`` long cluster ids in ``[0, m)``; id j belongs to the centre with the j-th highest score, and every
        centre is in its own cluster, so no cluster is empty.
    """
    b, n, c = x.shape
    assert 1 <= cluster_num <= n, (cluster_num, n)
    x = x.float()
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    dist = torch.cdist(x, x, compute_mode=mode) / math.sqrt(c)  # [B, N, N]
    # Local density from the k smallest distances of each row, self-distance included.
    nearest = dist.topk(min(k, n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    noise = torch.rand(density.shape, generator=_default_generator(generator), dtype=torch.float32)
    density = density + noise.to(density.device) * 1e-6
    # delta_i: distance to the nearest point of higher density; the densest point gets the largest distance overall.
    higher = density[:, None, :] > density[:, :, None]  # [B, i, j]: rho_j > rho_i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    score = delta * density
    centres = score.sort(dim=-1, descending=True, stable=True).indices[:, :cluster_num]  # [B, m]
    to_centre = dist.gather(1, centres[:, :, None].expand(b, cluster_num, n))  # [B, m, N]
    labels = to_centre.argmin(dim=1)  # first centre wins a tie, as torch.argmin documents
    ids = torch.arange(cluster_num, device=x.device).expand(b, cluster_num)
    return labels.scatter(1, centres, ids)


def _cluster_means(x: Tensor, labels: Tensor, cluster_num: int) -> Tensor:
    """Unweighted cluster means ``[B, m, C]`` of points ``[B, N, C]`` (official ``compute_cluster_vectors``)."""
    onehot = F.one_hot(labels, cluster_num).to(x.dtype)  # [B, N, m]
    sums = onehot.transpose(1, 2) @ x
    return sums / onehot.sum(dim=1).clamp_min(1)[..., None]


def refine_clusters(labels: Sequence[int]) -> list[int]:
    """Make one video's frame labels temporally contiguous, as the official ``refine_clusters``.

    1. For each label, find its maximal runs. If its longest run has length 1, all its frames are unassigned;
       otherwise every run of maximal length is kept (ties all kept) and the others are unassigned.
    2. Left to right, each run of unassigned frames takes the label of the longer neighbouring run (as labelled at
       that moment, so earlier reassignments count); ties go to the left neighbour; with no neighbour, label 0.

    Args:
        labels: one cluster label per frame.

    Returns:
        The refined labels, same length.
    """
    labels = [int(v) for v in labels]
    n = len(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i))
            start = i
    out = list(labels)
    for spans in runs.values():
        longest = max(end - begin for begin, end in spans)
        for begin, end in spans:
            if longest == 1 or end - begin < longest:
                out[begin:end] = [-1] * (end - begin)
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        begin = i
        while i < n and out[i] == -1:
            i += 1
        left = right = None
        left_len = right_len = 0
        if begin > 0:
            left, j = out[begin - 1], begin - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = begin - 1 - j
        if i < n:
            right, j = out[i], i
            while j < n and out[j] == right:
                j += 1
            right_len = j - i
        if right_len > left_len:
            new = right
        else:
            new = left if left is not None else right
        out[begin:i] = [0 if new is None else new] * (i - begin)
    return out


def _run_lengths(labels: Sequence[int]) -> list[int]:
    """Lengths of the runs of equal consecutive labels (``segment_lengths``)."""
    lengths, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            lengths.append(i - start)
            start = i
    return lengths


def _check_params(temporal_segment_ratio: float, k: int, cluster_ratio: float = 0.5, tau: float = 0.8) -> None:
    check_ratio(temporal_segment_ratio, "temporal_segment_ratio")
    check_ratio(cluster_ratio, "cluster_ratio")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (DPC-KNN neighbours) must be an integer >= 1, got {k!r}")
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number (cosine threshold; > 1 makes every token dynamic), got {tau!r}")


def segment_frames(
    frames: Tensor, temporal_segment_ratio: float = 0.25, k: int = 7, generator: torch.Generator | None = None
) -> list[int]:
    """Split a video into contiguous scenes (PruneVid stage 1a).

    Args:
        frames: ``[T, P, C]`` one video's visual tokens.
        temporal_segment_ratio: DPC-KNN runs with ``int(T * ratio)`` clusters (at least 1).
        k: DPC-KNN neighbours (``min(k, T)`` are used).
        generator: density tie-break noise; ``None`` means a generator seeded with 0.

    Returns:
        Segment lengths in time order; they sum to T and are >= 2 each when T >= 2 (a single segment when T = 1).
    """
    check_video(frames)
    _check_params(temporal_segment_ratio, k)
    return _segment(frames, temporal_segment_ratio, k, _default_generator(generator))


def _segment(frames: Tensor, temporal_segment_ratio: float, k: int, generator: torch.Generator) -> list[int]:
    """:func:`segment_frames` on inputs already validated."""
    t = frames.shape[0]
    cluster_num = min(t, max(1, int(t * temporal_segment_ratio)))
    descriptors = frames.float().mean(dim=1)[None]  # [1, T, C]
    labels = cluster_dpc_knn(descriptors, cluster_num, k, generator, exact=True)[0]
    return _run_lengths(refine_clusters(labels.tolist()))


@dataclass(frozen=True)
class MergeResult:
    """Output of PruneVid stage 1 for one video.

    Attributes:
        tokens: ``[n, C]`` merged tokens, input dtype, official order.
        static_sizes: static tokens per segment.
        dynamic_sizes: dynamic tokens per segment, all frames together (``W * d``).
        window_sizes: frames per segment.
        assignment: ``[T * P]`` long, the output token each input token was merged into.
    """

    tokens: Tensor
    static_sizes: list[int]
    dynamic_sizes: list[int]
    window_sizes: list[int]
    assignment: Tensor


def _spatial_merge(x: Tensor, cluster_ratio: float, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Merge each of B token sets ``[B, N, C]`` into ``int(N * cluster_ratio)`` DPC-KNN cluster means.

    Sets of at most 14 tokens pass through. Returns ``[B, m, C]`` and the ``[B, N]`` cluster id of every token.
    """
    b, n, _ = x.shape
    if n <= MERGE_SKIP_MAX:
        return x, torch.arange(n, device=x.device).expand(b, n)
    m = max(1, int(n * cluster_ratio))
    labels = cluster_dpc_knn(x, m, k, generator)
    return _cluster_means(x, labels, m), labels


def merge_tokens(
    frames: Tensor,
    tau: float = 0.8,
    temporal_segment_ratio: float = 0.25,
    cluster_ratio: float = 0.5,
    k: int = 7,
    generator: torch.Generator | None = None,
) -> MergeResult:
    """PruneVid stage 1: temporal segmentation, static/dynamic decoupling and spatial merging.

    Args:
        frames: ``[T, P, C]`` one video's projected visual tokens.
        tau: a location is static when its mean off-diagonal cosine similarity in the segment is ``> tau`` (strict).
        temporal_segment_ratio: scene clusters = ``int(T * ratio)``.
        cluster_ratio: spatial merging keeps ``int(n * cluster_ratio)`` clusters of a group of n > 14 tokens.
        k: DPC-KNN neighbours, used for both the temporal and the spatial clustering (official: 7, hard-coded).
        generator: density tie-break noise for every clustering call; ``None`` means a generator seeded with 0.

    Returns:
        A :class:`MergeResult` with the tokens in the official order and the group sizes stage 2 needs.
    """
    check_video(frames)
    _check_params(temporal_segment_ratio, k, cluster_ratio, tau)
    gen = _default_generator(generator)
    t, p, c = frames.shape
    windows = _segment(frames, temporal_segment_ratio, k, gen)
    x = frames.float()
    pieces: list[Tensor] = []
    assignment = torch.empty(t, p, dtype=torch.long, device=frames.device)
    static_sizes, dynamic_sizes = [], []
    offset = t0 = 0
    for w in windows:
        seg = x[t0 : t0 + w]  # [W, P, C]
        normed = F.normalize(seg, p=2, dim=-1)
        pair_sim = torch.einsum("wpc,upc->wup", normed, normed)  # [W, W, P]
        # Official arithmetic: subtract each frame's self-similarity as exactly 1, average over W(W-1) pairs.
        # For W = 1 this is 0/0 = NaN, which is never > tau: every token is dynamic.
        sim = (pair_sim.sum(dim=1) - 1).sum(dim=0) / (w * (w - 1)) if w > 1 else torch.full((p,), math.nan)
        static = sim.to(frames.device) > tau  # [P]
        static_pos, dynamic_pos = static.nonzero()[:, 0], (~static).nonzero()[:, 0]  # raster order

        static_feat, static_ids = _spatial_merge(seg[:, static_pos].mean(dim=0)[None], cluster_ratio, k, gen)
        dyn_feat, dyn_ids = _spatial_merge(seg[:, dynamic_pos], cluster_ratio, k, gen)  # all W frames in one batch
        s, d = static_feat.shape[1], dyn_feat.shape[1]
        pieces += [static_feat[0], dyn_feat.reshape(w * d, c)]
        assignment[t0 : t0 + w, static_pos] = offset + static_ids[0]
        frame_offset = offset + s + d * torch.arange(w, device=frames.device)[:, None]
        assignment[t0 : t0 + w, dynamic_pos] = frame_offset + dyn_ids
        static_sizes.append(s)
        dynamic_sizes.append(w * d)
        offset += s + w * d
        t0 += w
    tokens = torch.cat(pieces).to(frames.dtype)
    return MergeResult(tokens, static_sizes, dynamic_sizes, list(windows), assignment.reshape(-1))


def token_scores(q: Tensor, k: Tensor, visual_start: int, visual_end: int) -> Tensor:
    """PruneVid stage-2 score of every visual token (``attn_weights_wo_pos`` + ``VTPWindowCache.process_attention``).

    score_v = max over heads and over every query row after the video of softmax(q·kᵀ/√d)[v], with q and k taken
    before RoPE and the softmax over the whole row (no causal mask). Only the rows after the video are computed, so
    the extra memory is O(heads × text rows × S), never S × S.

    Args:
        q: ``[H, S, d]`` queries of the scoring layer, before RoPE.
        k: ``[H_kv, S, d]`` keys, before RoPE; KV heads are repeated to H (GQA), which the MHA-only official code
            never needed.
        visual_start: first visual position in the sequence.
        visual_end: one past the last visual position; rows ``visual_end..S-1`` are the queries.

    Returns:
        ``[visual_end - visual_start]`` scores in q's dtype (the official code casts the fp32 softmax back).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"need q [H, S, d] and k [H_kv, S, d] with the same S and d, got {q.shape} and {k.shape}")
    h, s, d = q.shape
    if h % k.shape[0]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[0]})")
    if not 0 <= visual_start < visual_end < s:
        raise ValueError(
            f"need 0 <= visual_start < visual_end < S={s} (at least one query token after the video), "
            f"got visual_start={visual_start}, visual_end={visual_end}"
        )
    k = k.repeat_interleave(h // k.shape[0], dim=0)
    logits = q[:, visual_end:].float() @ k.float().transpose(1, 2) / math.sqrt(d)  # [H, Nq, S]
    probs = logits.softmax(dim=-1).to(q.dtype)[:, :, visual_start:visual_end]
    return probs.amax(dim=(0, 1))


def _group_topk(scores: Tensor, sizes: Sequence[int], alpha: float) -> Tensor:
    """Sorted indices of the top ``int(size * alpha)`` scores of every consecutive group; ties go to the lower index."""
    sizes_t = torch.tensor([int(v) for v in sizes], dtype=torch.long, device=scores.device)
    group = torch.repeat_interleave(torch.arange(len(sizes_t), device=scores.device), sizes_t)  # [n]
    by_score = scores.float().sort(descending=True, stable=True).indices
    order = by_score[group[by_score].sort(stable=True).indices]  # group-major, best first within a group
    starts = sizes_t.cumsum(0) - sizes_t
    rank = torch.arange(scores.numel(), device=scores.device) - starts[group[order]]
    quota = (sizes_t.double() * alpha).floor().long()  # int(s * alpha) in the official code
    return order[rank < quota[group[order]]].sort().values


def select_tokens(
    scores: Tensor,
    static_sizes: Sequence[int],
    dynamic_sizes: Sequence[int],
    window_sizes: Sequence[int],
    alpha: float = 0.4,
) -> Tensor:
    """PruneVid stage-2 selection: the top ``int(alpha * n)`` of every static group and every frame's dynamic group.

    Args:
        scores: ``[n]`` stage-2 scores of the stage-1 tokens (from :func:`token_scores`).
        static_sizes: static tokens per segment.
        dynamic_sizes: dynamic tokens per segment (``W * d``).
        window_sizes: frames per segment.
        alpha: per-group keep fraction.

    Returns:
        ``[k]`` sorted long indices into the visual span; ``k = Σ_j int(α s_j) + W_j int(α d_j)``.
    """
    check_ratio(alpha, "alpha")
    if not len(static_sizes) == len(dynamic_sizes) == len(window_sizes):
        raise ValueError("static_sizes, dynamic_sizes and window_sizes must have one entry per segment")
    sizes: list[int] = []
    for s, dyn, w in zip(static_sizes, dynamic_sizes, window_sizes, strict=True):
        if w < 1 or dyn % w:
            raise ValueError(f"dynamic size {dyn} is not a multiple of its window of {w} frames")
        sizes += [s] + [dyn // w] * w
    if scores.dim() != 1 or scores.numel() != sum(sizes):
        raise ValueError(f"scores must be [n] with n = {sum(sizes)} (the group sizes' sum), got {tuple(scores.shape)}")
    return _group_topk(scores, sizes, alpha)


def _groups(merged: MergeResult) -> tuple[int, ...]:
    groups: list[int] = []
    for s, dyn, w in zip(merged.static_sizes, merged.dynamic_sizes, merged.window_sizes, strict=True):
        groups += [s] + [dyn // w] * w
    return tuple(groups)


@dataclass(frozen=True)
class PruneVid:
    """PruneVid as a strategy: stage 1 before the LLM, stage 2 after decoder layer ``layer``.

    Args:
        ratio: α, the fraction of each group kept at layer K (paper: 0.4).
        layer: K, 0-based decoder layer whose attention scores the tokens; layers 0..K run on the stage-1 sequence.
        tau: static threshold τ (paper: 0.8).
        temporal_segment_ratio: scene clusters per frame (paper: 0.25, i.e. 4 clusters for 16 frames).
        cluster_ratio: spatial merging ratio γ (paper: 0.5).
        k: DPC-KNN neighbours (official: 7).
        seed: seed of the density tie-break noise.
    """

    ratio: float = 0.4
    layer: int = 10
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    cluster_ratio: float = 0.5
    k: int = 7
    seed: int = 0
    name: str = "prunevid"
    # prune.budget: stage 1 first (its merging ratio γ; the static threshold τ only when γ alone cannot keep enough
    # tokens of a static video), then α on stage 1's output.
    budget_knobs: ClassVar[tuple[str, ...]] = ("cluster_ratio", "tau", "ratio")

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        _check_params(self.temporal_segment_ratio, self.k, self.cluster_ratio, self.tau)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer (K) must be an integer >= 0, got {self.layer!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        # Official LlamaModelVTP: eager attention at layer K, pre-RoPE, no causal mask, all rows after the video,
        # max over heads and queries; VTPWindowCache then cuts the KV cache of layers 0..K.
        return (
            LayerSpec(
                layer=self.layer,
                queries="after_visual",
                head_reduce="max",
                query_reduce="max",
                rope=False,
                causal=False,
                prune_past_kv=True,
            ),
        )

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        merged = merge_tokens(
            video.tokens,
            tau=self.tau,
            temporal_segment_ratio=self.temporal_segment_ratio,
            cluster_ratio=self.cluster_ratio,
            k=self.k,
            generator=torch.Generator().manual_seed(self.seed),
        )
        return PreLLMOutput(tokens=merged.tokens, assignment=merged.assignment, groups=_groups(merged))

    def in_llm(self, step: LayerInput) -> Tensor:
        if step.scores.numel() != step.pre.n:
            raise ValueError(f"PruneVid scores the whole stage-1 sequence ({step.pre.n}), got {step.scores.numel()}")
        return _group_topk(step.scores, step.pre.groups, self.ratio)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        if not 0 <= self.layer < num_layers - 1:
            raise ValueError(f"layer K={self.layer} must be in 0..{num_layers - 2} for a {num_layers}-layer LLM")
        kept = sum(math.floor(g * self.ratio) for g in pre.groups)
        return (pre.n,) * (self.layer + 1) + (kept,) * (num_layers - self.layer - 1)
