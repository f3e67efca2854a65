"""``hieravid``: HieraVid (Guo et al. 2026, arXiv 2604.01881), hierarchical segment/frame/layer token pruning.

**This is a reconstruction.** HieraVid has no official code and only its abstract is public. The module implements
the proposed reading of ``shared/reference/hieravid.md`` Part B, built from published blocks of FastVID, HoliTom,
CDPruner and PyramidDrop. Every choice and every unknown is listed in ``docs/methods/hieravid.md``.

Three levels:

1. **Segment level** (pre-LLM, hieravid.md B.1): FastVID's DySeg cuts the video into segments from the cosine
   similarity of adjacent frame descriptors; inside each segment, positions whose token stays similar across every
   consecutive pair of frames are *static* and are merged into one temporal-mean token (HoliTom's
   ``get_static_dynamic_features`` reading).
2. **Frame level** (pre-LLM, B.2): per segment, a greedy MAP DPP (Chen et al. 2018, the fast incremental-Cholesky
   form CDPruner uses) selects a diverse subset jointly over the merged static tokens and the dynamic tokens of all the
   segment's frames. The pre-LLM budget is split across segments with ``segment_beta`` (the authors' ``SEGMENT_BETA``).
3. **Layer level** (in-LLM, B.3): PyramidDrop-style stages; at each boundary ``b`` the visual tokens with the highest
   head-averaged attention of the last prompt token at layer ``b - 1`` survive (FastV's signal).

``ratio`` is the *layer-averaged* fraction of visual tokens the LLM processes, ``(1/L) * sum_l n_l / N``
(hieravid.md B.4). The pre-LLM count and the count of every stage are integers chosen so that this average is as close
to ``ratio`` as the layer widths allow without exceeding it (see :meth:`HieraVid.pre_llm_count` and
:meth:`HieraVid.stage_counts`).

Shape legend (as in :mod:`prune.api`): ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``N = T * P``;
``S`` segments, ``M`` candidates after static merging, ``C`` candidates of one segment, ``k`` tokens kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_range, check_ratio, keep_count
from prune.strategies.fastvid import dyseg

__all__ = ["HieraVid", "greedy_map", "segment_frames", "split_budget", "static_positions"]

# Quality floor for ``quality="text"``: min-max normalisation maps relevance into [floor, 1], so that no candidate gets
# a zero row in L = diag(q) S diag(q) (the least relevant token would otherwise carry no diversity information).
_QUALITY_FLOOR = 0.01
# Fast greedy MAP (Chen et al. 2018): clamp d^2 before the square root (hieravid.md B.2.4), and treat a pick whose
# residual d^2 fell below this fraction of its own diagonal as numerically inside the span of the picks so far (rank
# exhausted, e.g. duplicate tokens or C > D): its Cholesky row is set to 0 instead of dividing noise by ~0.
_D2_MIN = 1e-12
_DEGENERATE_REL = 1e-6
# Float slack when comparing token-layer sums with ratio * L * N (0.3 * 28 * N is not exact in binary).
_SLACK = 1e-6
# A bucket of segments batched through the greedy MAP may pad its kernels to at most this factor of their real size.
_PAD_FACTOR = 1.5
# Greedy MAP steps between folds of the Cholesky rows into the kernel (blocked pivoted Cholesky).
_BLOCK = 128


def segment_frames(tokens: Tensor, num_segments: int, tau_seg: float) -> Tensor:
    """DySeg temporal segmentation (FastVID; hieravid.md B.1.1-3) on mean-token frame descriptors.

    Frame descriptor ``g_f`` = mean of frame ``f``'s tokens; the cuts are FastVID's own :func:`~prune.strategies.
    fastvid.dyseg` (shared, not duplicated): after frame ``f`` when ``cos(g_f, g_{f+1}) < tau_seg``, and always after
    the ``c - 1`` lowest similarities (``c = min(num_segments, T)``; ties go to the earlier transition).

    Args:
        tokens: ``[T, P, D]`` visual tokens (any float dtype; computed in fp32).
        num_segments: ``c``, the minimum number of segments (capped at ``T``).
        tau_seg: cut threshold on the adjacent-frame cosine.

    Returns:
        ``[T]`` long segment id of each frame, ``0 .. S-1``, non-decreasing.
    """
    return dyseg(tokens.float().mean(dim=1), num_segments, tau_seg)


def static_positions(tokens: Tensor, seg_id: Tensor, tau_static: float) -> Tensor:
    """Static positions of every segment (HoliTom ``get_static_dynamic_features`` reading; hieravid.md B.1.4).

    Position ``p`` is static in segment ``s`` when the cosine similarity between the tokens at ``p`` of every pair of
    consecutive frames inside ``s`` exceeds ``tau_static``. A one-frame segment has no static positions.

    Args:
        tokens: ``[T, P, D]`` visual tokens.
        seg_id: ``[T]`` long, output of :func:`segment_frames`.
        tau_static: similarity threshold (strict ``>``); ``1.0`` disables merging.

    Returns:
        ``[S, P]`` bool.
    """
    t, p, _ = tokens.shape
    num_seg = int(seg_id[-1]) + 1
    lengths = torch.bincount(seg_id, minlength=num_seg)
    static = torch.zeros(num_seg, p, dtype=torch.bool, device=tokens.device)
    if t == 1 or not bool((lengths >= 2).any()):
        return static
    x = tokens.float()
    # cosine at every position for every transition, from dot products and norms (no [T-1, P, D] temporary)
    dots = torch.einsum("tpd,tpd->tp", x[:-1], x[1:])  # [T-1, P]
    norms = x.norm(dim=-1).clamp_min(1e-12)  # [T, P]
    cos = dots / (norms[:-1] * norms[1:])
    inside = seg_id[:-1] == seg_id[1:]  # [T-1] transitions within one segment
    # min over each segment's inner transitions; +inf for one-frame segments, masked out below
    low = torch.full((num_seg, p), math.inf, device=tokens.device)
    index = seg_id[:-1][inside].unsqueeze(1).expand(-1, p)
    low = low.scatter_reduce(0, index, cos[inside], reduce="amin", include_self=True)
    return (low > tau_static) & (lengths >= 2).unsqueeze(1)


def greedy_map(kernel: Tensor, sizes: Tensor, ks: Tensor, block: int = _BLOCK, inplace: bool = False) -> Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018, NeurIPS), batched over independent kernels.

    Each step picks ``j = argmax d^2`` and appends the Cholesky row ``e = (L[j] - c[:, j]^T c) / sqrt(d^2_j)``, then
    ``d^2 -= e^2``: the same sequence as greedily maximising ``log det L[Y]``. Steps are sequential in ``k``; each is
    ``O(i * C)`` tensor work for all kernels at once. To keep long selections out of memory-bound matrix-vector
    products, the rows are folded into the kernel every ``block`` steps (``L -= E^T E``, a blocked right-looking
    pivoted Cholesky), so within a block each step only projects on that block's rows. fp32; ties pick the lowest
    index.

    Args:
        kernel: ``[B, C, C]`` PSD kernels, kernel ``b`` in the top-left ``sizes[b] x sizes[b]`` block (rest ignored).
        sizes: ``[B]`` long, valid size of each kernel.
        ks: ``[B]`` long, items to pick from each kernel, ``0 <= ks[b] <= sizes[b]``.
        block: steps between folds into the kernel, ``>= 1``.
        inplace: allow overwriting ``kernel`` (fp32 only) instead of working on a copy.

    Returns:
        ``[B, max(ks)]`` long, the picks of kernel ``b`` in pick order in its first ``ks[b]`` columns, ``-1`` after.
    """
    b, c, _ = kernel.shape
    device = kernel.device
    sizes = sizes.to(device)
    ks = ks.to(device)
    assert block >= 1 and bool((ks >= 0).all()) and bool((ks <= sizes).all()), (block, ks, sizes)
    kmax = int(ks.max()) if b else 0
    picks = torch.full((b, kmax), -1, dtype=torch.long, device=device)
    if kmax == 0:
        return picks
    rows = torch.arange(b, device=device)
    valid = torch.arange(c, device=device).unsqueeze(0) < sizes.unsqueeze(1)  # [B, C]
    resid_kernel = kernel.float()
    if kmax > block and (not inplace or resid_kernel is not kernel):
        resid_kernel = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), resid_kernel, 0.0)  # own copy
    diag = kernel.diagonal(dim1=1, dim2=2).float().clone()  # [B, C] L_ii, for the degeneracy test
    d2 = torch.where(valid, diag, -math.inf)
    rows_e = resid_kernel.new_zeros(b, min(block, kmax), c)  # this block's Cholesky rows
    for start in range(0, kmax, block):
        steps = min(block, kmax - start)
        for i in range(steps):
            active = ks > start + i
            j = d2.argmax(dim=1)  # [B]; first maximum on ties
            dj = d2[rows, j]
            resid = torch.where(valid, resid_kernel[rows, j], 0.0)  # [B, C] row j of the residual kernel
            if i:
                cj = rows_e[:, :i, :].gather(2, j.view(b, 1, 1).expand(b, i, 1))  # [B, i, 1]
                resid = resid - torch.bmm(cj.transpose(1, 2), rows_e[:, :i, :]).squeeze(1)
            ok = active & (dj > _DEGENERATE_REL * diag[rows, j])
            e = torch.where(ok.unsqueeze(1), resid / dj.clamp_min(_D2_MIN).sqrt().unsqueeze(1), 0.0)
            rows_e[:, i, :] = e
            d2 = d2 - e * e
            d2[rows, j] = -math.inf
            picks[:, start + i] = torch.where(active, j, -1)
        if start + steps < kmax:
            done = rows_e[:, :steps, :]
            resid_kernel.baddbmm_(done.transpose(1, 2), done, alpha=-1.0)
    return picks


def split_budget(budget: int, lengths: Tensor, spread: Tensor, caps: Tensor, beta: float) -> Tensor:
    """Split the pre-LLM budget across segments (hieravid.md B.2.2).

    Share ``w_s = beta * |s| / T + (1 - beta) * u_s`` with ``u_s = spread_s / sum(spread)`` (uniform if all spreads
    are 0). Counts are ``clip(t * w_s, lo, caps_s)`` with ``t`` solved so they sum to ``budget`` (water-filling: what
    a capped segment cannot take goes to the others in proportion to their shares), then rounded by largest remainder
    (ties to the earlier segment). ``lo = 1`` when ``budget >= S``, else ``0`` (not every segment can get a token).

    Args:
        budget: ``B0``, tokens to keep over all segments.
        lengths: ``[S]`` segment lengths in frames.
        spread: ``[S]`` non-negative diversity of each segment.
        caps: ``[S]`` candidates of each segment (``>= 1``).
        beta: ``segment_beta`` in [0, 1].

    Returns:
        ``[S]`` long counts, ``lo <= k_s <= caps_s``, summing to ``min(budget, sum(caps))``.
    """
    caps_l = caps.detach().to("cpu", torch.long)
    num = caps_l.numel()
    if budget >= int(caps_l.sum()):
        return caps_l.clone()
    if budget <= 0:
        return torch.zeros(num, dtype=torch.long)
    cap = caps_l.double()
    length = lengths.detach().to("cpu", torch.float64)
    u = spread.detach().to("cpu", torch.float64).clamp_min(0.0)
    u = u / u.sum() if float(u.sum()) > 0 else torch.full((num,), 1.0 / num, dtype=torch.float64)
    w = beta * length / length.sum() + (1.0 - beta) * u
    w = w.clamp_min(1e-9 * float(w.max()))  # a zero share would make the water level unbounded
    lo = 1.0 if budget >= num else 0.0
    t_lo, t_hi = 0.0, float((cap / w).max()) * (1 + 1e-9)  # sum(clip(t_hi * w)) == sum(caps) > budget
    for _ in range(200):
        mid = 0.5 * (t_lo + t_hi)
        if float((mid * w).clamp(lo, None).minimum(cap).sum()) <= budget:
            t_lo = mid
        else:
            t_hi = mid
    x = (t_lo * w).clamp(lo, None).minimum(cap)
    k = x.floor()
    frac = x - k
    rest = budget - int(k.sum())
    while rest > 0:  # at most a couple of passes: sum(x) is within float error of budget
        room = k < cap
        order = torch.sort(torch.where(room, frac, -1.0), descending=True, stable=True).indices
        give = order[: min(rest, int(room.sum()))]
        k[give] += 1
        frac[give] = -1.0
        rest -= int(give.numel())
    return k.long()


@dataclass(frozen=True)
class HieraVid:
    """HieraVid, reconstructed (see the module docstring and ``docs/methods/hieravid.md``).

    Args:
        ratio: layer-averaged fraction of visual tokens the LLM processes, in (0, 1].
        num_segments: ``c`` of DySeg, the minimum number of segments (FastVID default 8; capped at ``T``), ``>= 1``.
        tau_seg: DySeg cut threshold on adjacent frame-descriptor cosine, in [-1, 1] (FastVID default 0.9;
            ``-1`` keeps only the forced cuts).
        tau_static: a position is static in a segment when its consecutive-frame cosine exceeds this everywhere in
            the segment, in [-1, 1]. hieravid.md B.1.4 reuses ``tau_seg``; kept separate so it can be ablated, with
            the same default 0.9. ``1.0`` disables static merging.
        segment_beta: ``beta`` of the segment budget split, in [0, 1]: 1 splits by duration, 0 by diversity
            (authors' sweep {0.2, 0.6, 0.8}; default 0.6).
        quality: DPP quality ``q``: ``"uniform"`` (``q = 1``, pure diversity) or ``"text"`` (relevance to
            ``VideoTokens.text``, min-max normalised into [0.01, 1]).
        boundaries: layers ``b`` where a stage starts. Strictly increasing in ``1 .. num_layers - 1``; ``()``
            disables the layer level.
        stage_keep: ``lambda``, the planned fraction each stage keeps of the previous one, in (0, 1].
        num_layers: decoder layers of the LLM (Qwen2-7B: 28), ``>= 1``.
        layer_rule: how a stage scores and numbers: ``"fastv"`` (default) scores with layer ``b - 1``'s own
            attention and survivors keep their original positions (hieravid.md B.3, FastV/HoliTom); ``"pdrop"``
            scores with layer ``b``'s own Q/K before it runs and renumbers positions (PyramidDrop's code). Why the
            default: ``docs/methods/hieravid.md`` ("Layer level: which rule").
    """

    ratio: float = 0.3
    num_segments: int = 8
    tau_seg: float = 0.9
    tau_static: float = 0.9
    segment_beta: float = 0.6
    quality: str = "uniform"
    boundaries: tuple[int, ...] = (7, 14, 21)
    stage_keep: float = 0.7
    num_layers: int = 28
    layer_rule: str = "fastv"
    name: str = "hieravid"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        _check_int("num_segments", self.num_segments, 1)
        _check_int("num_layers", self.num_layers, 1)
        check_range("tau_seg", self.tau_seg, -1.0, 1.0)
        check_range("tau_static", self.tau_static, -1.0, 1.0)
        check_range("segment_beta", self.segment_beta, 0.0, 1.0)
        check_ratio(self.stage_keep, "stage_keep")
        if self.quality not in ("uniform", "text"):
            raise ValueError(f"quality must be 'uniform' or 'text', got {self.quality!r}")
        if self.layer_rule not in ("fastv", "pdrop"):
            raise ValueError(f"layer_rule must be 'fastv' or 'pdrop', got {self.layer_rule!r}")
        # Hydra hands a ListConfig; store a tuple so the dataclass stays hashable and immutable
        try:
            bounds = tuple(self.boundaries)
        except TypeError:
            raise ValueError(f"boundaries must be a sequence of ints, got {self.boundaries!r}") from None
        object.__setattr__(self, "boundaries", bounds)
        self._check_boundaries()

    def _check_boundaries(self) -> None:
        b = self.boundaries
        top = self.num_layers - 1
        if any(isinstance(x, bool) or not isinstance(x, int) for x in b):
            raise ValueError(f"boundaries must be ints, got {b!r}")
        if any(not 1 <= x <= top for x in b) or any(x >= y for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(
                f"boundaries must be strictly increasing layers in 1..{top} (num_layers={self.num_layers}), got {b!r}"
            )

    # ----------------------------------------------------------------------------------------------- budget (B.4)

    def _widths(self) -> list[int]:
        """Layers per stage: ``[b_1, b_2 - b_1, ..., L - b_S]``."""
        edges = (0, *self.boundaries, self.num_layers)
        return [hi - lo for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def pre_llm_count(self, n_in: int) -> int:
        """Planned pre-LLM token count for ``N = n_in`` input tokens (hieravid.md B.4).

        ``rho0 = ratio * L / sum_i w_i * lambda^i`` (``w_i`` the stage widths), capped at 1 and rounded with
        :func:`prune.api.keep_count`. Integer counts cannot hit every average, so the count is then moved by at most
        ``max(w)`` tokens to the one whose schedule (with :meth:`stage_counts`) comes closest to ``ratio * L * N``
        from below (ties: closest to the plan, then smaller).
        """
        w = self._widths()
        profile = sum(wi * self.stage_keep**i for i, wi in enumerate(w))
        rho0 = min(1.0, self.ratio * self.num_layers / profile)
        plan = keep_count(rho0, n_in)
        target = self.ratio * self.num_layers * n_in + _SLACK
        best, best_key = plan, None
        for n0 in range(max(1, plan - max(w)), min(n_in, plan + max(w)) + 1):
            total = w[0] * n0 + sum(wi * ci for wi, ci in zip(w[1:], self.stage_counts(n0, n_in), strict=True))
            # over the budget only if even one token per layer is (ratio * N < 1): then the smallest total wins
            key = (total > target, -total if total <= target else total, abs(n0 - plan), n0)
            if best_key is None or key < best_key:
                best, best_key = n0, key
        return best

    def stage_counts(self, n_pre: int, n_in: int) -> tuple[int, ...]:
        """Visual tokens kept by each in-LLM stage, given ``n_pre`` tokens entering the LLM out of ``N = n_in``.

        Chooses integer counts ``n_pre >= n_1 >= ... >= n_S >= 1`` whose token-layer sum
        ``b_1 * n_pre + sum_i w_i * n_i`` comes as close to ``ratio * L * N`` as it can from below, along a geometric
        profile ``floor(n_pre * lambda'^i)`` (``lambda'`` by bisection, then the leftover handed to the earliest
        stages that can take it).
        ``lambda'`` is re-solved from ``n_pre``, so it rises above ``stage_keep`` when the pre-LLM stage kept fewer
        tokens than planned (``rho0 > 1`` capped, or static merging left fewer candidates), up to 1 (budget under-met).
        Pure function of ``(n_pre, n_in)``: ``in_llm`` recomputes it from ``step.pre``.
        """
        w = self._widths()
        later = w[1:]
        if not later:
            return ()
        if n_pre <= 0:
            return (0,) * len(later)
        rest = self.ratio * self.num_layers * n_in + _SLACK - w[0] * n_pre
        if rest >= n_pre * sum(later):
            return (n_pre,) * len(later)
        if rest <= sum(later):
            return (1,) * len(later)  # at least one visual token per layer (over budget only if ratio * N < 1)

        def profile(lam: float) -> list[int]:
            return [min(n_pre, max(1, math.floor(n_pre * lam ** (i + 1)))) for i in range(len(later))]

        def cost(counts: list[int]) -> int:
            return sum(wi * ci for wi, ci in zip(later, counts, strict=True))

        lo, hi = 0.0, 1.0  # cost(profile(0)) = sum(later) <= rest < cost(profile(1))
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            if cost(profile(mid)) <= rest:
                lo = mid
            else:
                hi = mid
        counts = profile(lo)
        deficit = rest - cost(counts)
        prev = n_pre
        for i, wi in enumerate(later):
            inc = min(int(deficit // wi), prev - counts[i])
            if inc > 0:
                counts[i] += inc
                deficit -= inc * wi
            prev = counts[i]
        return tuple(counts)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        """Visual tokens at each decoder layer: ``pre.n`` up to the first boundary, then each stage's count.

        Raises:
            ValueError: ``num_layers`` differs from the ``num_layers`` the schedule was built for.
        """
        return self._counts(pre.n, int(pre.assignment.numel()), num_layers)

    def planned_counts(self, n_in: int, num_layers: int) -> tuple[int, ...]:
        """The schedule before the content is seen: :meth:`pre_llm_count` tokens in, then the stage counts.

        The pre-LLM levels can keep fewer (static merging leaves fewer candidates); ``prune.budget`` then re-solves
        the ratio on the real pre-LLM output with :meth:`layer_counts`.
        """
        return self._counts(self.pre_llm_count(n_in), n_in, num_layers)

    def _counts(self, n_pre: int, n_in: int, num_layers: int) -> tuple[int, ...]:
        if num_layers != self.num_layers:
            raise ValueError(f"hieravid was configured for num_layers={self.num_layers}, got {num_layers}")
        self._check_boundaries()
        counts = (n_pre, *self.stage_counts(n_pre, n_in))
        out: list[int] = []
        for width, count in zip(self._widths(), counts, strict=True):
            out.extend([count] * width)
        return tuple(out)

    # ---------------------------------------------------------------------------------------------- layer level

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        # Head-mean attention of the last prompt token, post-RoPE, causal (hieravid.md B.3): from layer b-1's forward
        # with gapped positions (fastv), or from layer b's own Q/K with renumbered positions (pdrop).
        pdrop = self.layer_rule == "pdrop"
        return tuple(
            LayerSpec(
                layer=b if pdrop else b - 1,
                queries="last",
                head_reduce="mean",
                query_reduce="mean",
                rope=True,
                causal=True,
                own_layer=pdrop,
                positions="renumber" if pdrop else "keep",
            )
            for b in self.boundaries
        )

    def in_llm(self, step: LayerInput) -> Tensor:
        """Keep the stage's scheduled count of highest-scoring tokens (stable: ties keep the earlier token).

        Returns:
            ``[k]`` sorted long indices into ``step.visual``.
        """
        layers = [spec.layer for spec in self.layer_specs]
        if step.layer not in layers:
            raise ValueError(f"hieravid scores at layers {layers}, got layer {step.layer}")
        if step.scores.dim() != 1 or step.scores.numel() != step.visual.numel():
            raise ValueError(f"scores must be [n_cur={step.visual.numel()}], got {tuple(step.scores.shape)}")
        counts = self.stage_counts(step.pre.n, int(step.pre.assignment.numel()))
        k = min(counts[layers.index(step.layer)], step.scores.numel())
        order = torch.sort(step.scores.float(), descending=True, stable=True).indices[:k]
        return torch.sort(order).values

    # ------------------------------------------------------------------------------------------ pre-LLM levels

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Segment level (DySeg + static merging), then frame level (per-segment DPP) to the planned count.

        Args:
            video: ``[T, P, D]`` tokens (and ``[M, D]`` text when ``quality="text"``).

        Returns:
            ``[n, D]`` tokens (input dtype and device) in original (frame, position) order, a merged static token at
            its segment's first frame; ``assignment`` ``[N]`` maps every input token to its output token or ``-1``.
        """
        if self.quality == "text" and (video.text is None or video.text.shape[0] == 0):
            raise ValueError("quality='text' needs VideoTokens.text ([M, D] prompt embeddings, M >= 1); got none")
        tokens = video.tokens
        t, p, d = tokens.shape
        n_in = t * p
        device = tokens.device
        x = tokens.float()  # fp32 internals; a view when already fp32, never written to

        # Level 1a: DySeg segments (B.1.1-3)
        seg_id = segment_frames(x, self.num_segments, self.tau_seg)  # [T]
        num_seg = int(seg_id[-1]) + 1
        seg_len = torch.bincount(seg_id, minlength=num_seg)  # [S]
        first = torch.cumsum(seg_len, 0) - seg_len  # [S] first frame of each segment

        # Level 1b: static positions -> one candidate at the segment's first frame (B.1.4)
        static = static_positions(x, seg_id, self.tau_static)  # [S, P]
        static_tp = static[seg_id]  # [T, P]
        frame = torch.arange(t, device=device)
        pos = torch.arange(p, device=device)
        is_first = (frame == first[seg_id]).unsqueeze(1)  # [T, 1]
        rep = (~static_tp | is_first).reshape(-1)  # [N] tokens that head a candidate
        cand_flat = torch.nonzero(rep).squeeze(1)  # [M] sorted: candidates in (frame, position) order
        cand_of_flat = torch.cumsum(rep.long(), 0) - 1  # [N], valid where rep
        src = torch.where(static_tp, (first[seg_id] * p).unsqueeze(1) + pos, (frame * p).unsqueeze(1) + pos)
        tok2cand = cand_of_flat[src.reshape(-1)]  # [N] candidate of every input token
        feats = x.reshape(n_in, d).index_select(0, cand_flat)  # [M, D] fresh copy
        for s in torch.nonzero(static.any(dim=1)).squeeze(1).tolist():
            a, b = int(first[s]), int(first[s] + seg_len[s])
            where = torch.nonzero(static[s]).squeeze(1)
            feats[cand_of_flat[a * p + where]] = x[a:b, where].mean(dim=0)  # temporal mean (HoliTom)
        m = feats.shape[0]
        cand_seg = seg_id[cand_flat // p]  # [M]
        sizes = torch.bincount(cand_seg, minlength=num_seg)  # [S] candidates per segment, >= 1

        # Level 2: budget split across segments, then a DPP per segment (B.2)
        budget = self.pre_llm_count(n_in)
        keep = torch.ones(m, dtype=torch.bool, device=device)
        if budget < m:
            cn = F.normalize(feats, dim=-1)  # [M, D]
            size_list = sizes.tolist()
            # u_s: spread of the segment's unit tokens around their mean, sum_i |c_i - mean|^2 = C (1 - |mean|^2),
            # i.e. C times one minus the mean pairwise cosine (self-pairs included); defined for any segment size
            sums = torch.stack([chunk.sum(0) for chunk in torch.split(cn, size_list)])  # [S, D]
            spread = sizes.double() - (sums.double() ** 2).sum(-1) / sizes.double()
            ks = split_budget(budget, seg_len, spread, sizes, self.segment_beta)
            q = self._quality(cn, video.text)  # [M]
            keep = self._select(cn * q.unsqueeze(1), size_list, ks.tolist())

        # Output in candidate order = original (frame, position) order
        out_index = torch.where(keep, torch.cumsum(keep.long(), 0) - 1, -1)  # [M]
        assignment = out_index[tok2cand]
        out = feats[keep].to(tokens.dtype)
        return PreLLMOutput(tokens=out, assignment=assignment)

    def _quality(self, cn: Tensor, text: Tensor | None) -> Tensor:
        """``[M]`` DPP quality: ones, or CDPruner-style text relevance (mean cosine to the prompt) in [0.01, 1]."""
        if self.quality == "uniform" or text is None:
            return torch.ones(cn.shape[0], device=cn.device)
        # mean over prompt tokens of cos(c_i, t_m) = c_i . mean_m(t_m) for unit t_m. Not negated (CDPruner negates
        # its raw relevance for its LLaVA features; hieravid.md B.2.3 says copy that only with the rest of CDPruner).
        tn = F.normalize(text.to(device=cn.device, dtype=torch.float32), dim=-1)
        rel = cn @ tn.mean(dim=0)  # [M]
        span = rel.max() - rel.min()
        if float(span) <= 0:
            return torch.ones_like(rel)
        return _QUALITY_FLOOR + (1.0 - _QUALITY_FLOOR) * (rel - rel.min()) / span

    @staticmethod
    def _select(feats: Tensor, sizes: list[int], ks: list[int]) -> Tensor:
        """Greedy MAP per segment with kernel ``feats_s @ feats_s^T``; segments batched in similar-size buckets.

        Args:
            feats: ``[M, D]`` ``q``-scaled unit candidates, segments contiguous.
            sizes: ``C_s``, candidates per segment.
            ks: ``k_s``, tokens to keep per segment.

        Returns:
            ``[M]`` bool, the kept candidates.
        """
        device = feats.device
        keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=device)
        offsets = [0]
        for c in sizes:
            offsets.append(offsets[-1] + c)
        todo = []
        for s, (c, k) in enumerate(zip(sizes, ks, strict=True)):
            if k >= c:
                keep[offsets[s] : offsets[s] + c] = True
            elif k > 0:
                todo.append(s)
        # bucket by size (largest first) so that padding to the bucket's largest kernel stays within _PAD_FACTOR
        todo.sort(key=lambda s: (-sizes[s], s))
        buckets: list[list[int]] = []
        for s in todo:
            if buckets:
                cur = buckets[-1]
                big = sizes[cur[0]]
                real = sum(sizes[i] ** 2 for i in cur) + sizes[s] ** 2
                if (len(cur) + 1) * big * big <= _PAD_FACTOR * real:
                    cur.append(s)
                    continue
            buckets.append([s])
        for bucket in buckets:
            big = sizes[bucket[0]]
            kernel = feats.new_zeros(len(bucket), big, big)
            for i, s in enumerate(bucket):
                f = feats[offsets[s] : offsets[s] + sizes[s]]
                kernel[i, : sizes[s], : sizes[s]] = f @ f.T  # L = diag(q) S diag(q), S = cosine (B.2.3)
            bsizes = torch.tensor([sizes[s] for s in bucket], device=device)
            bks = torch.tensor([ks[s] for s in bucket], device=device)
            picks = greedy_map(kernel, bsizes, bks, inplace=True)
            base = torch.tensor([offsets[s] for s in bucket], device=device).unsqueeze(1)
            chosen = (picks + base)[picks >= 0]
            keep[chosen] = True
        return keep


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
