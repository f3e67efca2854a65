"""``framefusion``: FrameFusion (Fu et al., ICCV 2025, arXiv:2501.01986), similarity merging then importance pruning.

Official code: ``thu-nics/FrameFusion`` (``framefusion/main.py``: ``FrameFusion.forward``,
``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``, ``_compute_pruning_ratio``;
``framefusion/models/qwen2/modeling_qwen2.py``: where it is called). Our reading of it:

* **Where.** One module is called at layer 0 *before* attention (on the input embeddings) and in every layer
  *after attention and its residual add, before the MLP*, during prefill only. Here: an own-layer stage at layer 0
  (``LayerSpec(own_layer=True)``, applied before layer 0 runs) and a mid-layer stage in every layer
  (``LayerSpec(mid_layer=True)``), all with the hidden states.
* **Merging** (until it ends). Each visual token has a patch index (its place in the frame's grid); for every patch
  index, the current tokens of that index in sequence order are compared with the previous one (cosine of the
  current hidden states; the first of each index never merges). Candidates: similarity >= ``similarity_lower_bound``.
  ``above = candidates / n``. With ``u = pruning_ratio(history, ratio)``: if ``above < u``, every candidate merges
  and ``above`` joins the history; merging ends when ``above < ratio_lower_bound``. Otherwise only the
  ``int(u * n)`` most similar candidates merge and both merging and pruning end.
* **How.** A run of consecutive candidates of one patch index merges into the token before the run (the earliest
  frame); the survivor becomes the plain mean of itself and the run. Survivors keep their positions.
* **Pruning** (once, at the stage after merging ended with a small ratio): the last prompt token's attention in that
  layer, averaged over heads, keeps the ``round(n * (1 - p))`` highest visual tokens, ``p = pruning_ratio(history,
  ratio)``; positions kept.
* **Budget.** ``pruning_ratio``: with ``s`` the running product of ``(1 - a_i)`` over the history and ``total =
  sum_i prod_{j<=i} (1 - a_j)``, ``remaining = L * ratio - total`` and ``p = 1 - remaining / ((L - len) * s)``
  (0 when that is negative). The ``i``-th history entry is the stage whose tokens layer ``i`` processes, so the
  layer-averaged retention is ``ratio`` by construction once the method prunes (``cost`` in the official code).
* **KV cache.** The layer where a mid-layer stage acts cached every token (its attention ran first); later layers
  cache the survivors. Decoding continues at the unpruned positions.

Deviations: the official ``_compute_pruning_ratio`` hard-codes 28 layers; here ``L = num_layers`` (28 by default).
Where it raises ("The cost is too small", the merges so far already exceed the budget), the most it can prune is
used (one visual token left). Similarities are fp32. ``topk`` ties go to the earlier token. The first token of a
patch index is never merged even in the ``int(u * n)`` branch (the official ``topk`` could pick one when ``u * n``
exceeds the candidates and merge it across patch indices). Separator tokens (LLaVA-Video's row newlines, which the
official LLaVA-Video port merges and prunes as a patch column) always stay, as in every method here. The official
decode positions follow the shortened layer-0 cache; here decode step ``i`` sits at ``S + i``.

``layer_counts`` cannot be known before the LLM runs (the merges follow hidden-state similarity): it raises, and
the achieved counts are recorded per sample. The layer average meets ``ratio`` by construction whenever the method
prunes or stops merging at the budget. ``budget=`` therefore accepts ``budget_measure=layer_avg`` only
(``ratio_measure``; ``prune/budget.py`` sets ``ratio`` to the target) and refuses the other measures before any work.

Shape legend: ``n`` visual tokens present, ``P`` tokens per frame, ``D`` hidden size, ``k`` survivors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import LayerInput, LayerMerge, LayerSpec, PreLLMOutput, VideoTokens, check_range, check_ratio

__all__ = ["FrameFusion", "merge_runs", "patch_similarity", "pruning_ratio"]


def pruning_ratio(history: list[float], cost: float, num_layers: int) -> float:
    """FrameFusion's ``_compute_pruning_ratio``: the sparsity the remaining layers need to meet ``cost``.

    Args:
        history: merge ratios accepted so far, one per stage.
        cost: layer-averaged retention wanted (``ratio``).
        num_layers: ``L`` (the official code hard-codes 28).

    Returns:
        A fraction in [0, 1]; 1 when the merges so far already exceed the budget (the official code raises).
    """
    s, total = 1.0, 0.0
    for a in history:
        s *= 1.0 - a
        total += s
    remaining = num_layers * cost - total
    if remaining < 0 or len(history) >= num_layers or s <= 0:
        return 1.0
    need = remaining / ((num_layers - len(history)) * s)
    return 0.0 if need > 1 else 1.0 - need


def patch_similarity(hidden: Tensor, patch: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity of each token to the previous token of the same patch index.

    Args:
        hidden: ``[n, D]`` current states in sequence order.
        patch: ``[n]`` long patch index of each token.

    Returns:
        ``order`` ``[n]``: token indices sorted by (patch index, sequence order); ``sim`` ``[n]`` in that order, with
        ``-2`` for the first token of each patch index (it has no predecessor).
    """
    order = torch.sort(patch, stable=True).indices
    x = hidden[order].float()
    sim = torch.full((order.numel(),), -2.0, device=hidden.device)
    if order.numel() > 1:
        same = patch[order][1:] == patch[order][:-1]
        cos = F.cosine_similarity(x[1:], x[:-1], dim=-1)
        sim[1:] = torch.where(same, cos, torch.full_like(cos, -2.0))
    return order, sim


def merge_runs(order: Tensor, cand: Tensor, n: int) -> LayerMerge:
    """Merge each run of candidates (in patch order) into the token before it: plain means, survivors in place.

    Args:
        order: ``[n]`` token indices in patch order (:func:`patch_similarity`).
        cand: ``[n]`` bool, candidates in that order; never the first token of a patch index.
        n: number of tokens.

    Returns:
        The merge over the ``n`` tokens (indices in sequence order).
    """
    device = order.device
    pos = torch.arange(n, device=device)
    last_kept = torch.cummax(torch.where(cand, torch.full_like(pos, -1), pos), dim=0).values  # [n] in patch order
    head = order[last_kept]  # sequence index of the survivor each token joins
    survivor = torch.zeros(n, dtype=torch.bool, device=device)
    survivor[order[~cand]] = True
    keep = survivor.nonzero()[:, 0]
    rank = torch.cumsum(survivor.long(), 0) - 1  # [n] rank of each survivor among the kept
    into = torch.empty(n, dtype=torch.long, device=device)
    into[order] = rank[head]
    sizes = torch.bincount(into, minlength=keep.numel()).float()
    return LayerMerge(keep=keep, into=into, weights=1.0 / sizes[into])


@dataclass(frozen=True)
class FrameFusion:
    """FrameFusion: merge similar same-position tokens of consecutive frames layer by layer, then prune by attention.

    Args:
        ratio: layer-averaged fraction of the visual tokens the LLM processes (the official ``cost``), in (0, 1].
        similarity_lower_bound: cosine at or above which a token merges into its predecessor (official 0.6).
        ratio_lower_bound: merging stops after a stage that merged less than this fraction (official 0.1).
        num_layers: decoder layers of the LLM (the official code assumes 28).
    """

    ratio: float = 0.3
    similarity_lower_bound: float = 0.6
    ratio_lower_bound: float = 0.1
    num_layers: int = 28
    name: str = "framefusion"
    # the budget measure ratio equals by construction (counts are known only after the prefill; prune/budget.py)
    ratio_measure: ClassVar[str] = "layer_avg"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for key, low, high in (("similarity_lower_bound", -1.0, 1.0), ("ratio_lower_bound", 0.0, 1.0)):
            check_range(key, getattr(self, key), low, high)
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Before layer 0 (on the embeddings), then after the attention of layers ``0..L-2``, in execution order."""
        first = LayerSpec(layer=0, queries="last", own_layer=True, hidden=True)
        mids = tuple(
            LayerSpec(layer=layer, queries="last", head_reduce="mean", query_reduce="mean", hidden=True, mid_layer=True)
            for layer in range(self.num_layers - 1)
        )
        return (first, *mids)

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Identity: flatten ``[T, P, D]`` to ``[T * P, D]``; one group of ``P`` per frame gives the patch index."""
        t, p, d = video.tokens.shape
        index = torch.arange(t * p, device=video.tokens.device)
        return PreLLMOutput(tokens=video.tokens.reshape(t * p, d), assignment=index, groups=(p,) * t)

    def in_llm(self, step: LayerInput) -> Tensor | LayerMerge:
        """One FrameFusion call: a merge step, the pruning step, or nothing once both have ended.

        Raises:
            ValueError: no per-sample ``state`` or ``hidden`` (the adapter and ``simulate`` pass both).
        """
        if step.state is None or step.hidden is None:
            raise ValueError("framefusion needs LayerInput.state and LayerInput.hidden (LayerSpec.hidden=True)")
        st = step.state
        n = step.visual.numel()
        history = st.setdefault("history", [])
        if st.get("done"):
            return torch.arange(n, device=step.visual.device)
        if st.get("merged"):  # merging ended with a small ratio: prune with this layer's attention, once
            p = pruning_ratio(history, self.ratio, self.num_layers)
            k = min(n, max(1, round(n * (1.0 - p))))  # Python round, as the official code
            st["done"] = True
            order = torch.sort(step.scores.float(), descending=True, stable=True).indices[:k]
            return torch.sort(order).values
        if "patch" not in st:  # patch index of every pre-LLM token: its input position within its frame
            grid = max(step.pre.groups) if step.pre.groups else step.pre.n  # an adapter may truncate the first frame
            st["patch"] = step.pre.sources() % grid
        patch = st["patch"][step.visual]
        order, sim = patch_similarity(step.hidden, patch)
        bound = pruning_ratio(history, self.ratio, self.num_layers)
        cand = sim >= self.similarity_lower_bound
        above = int(cand.sum()) / n
        if above < bound:
            history.append(above)
            if above < self.ratio_lower_bound:
                st["merged"] = True
        else:  # merging alone meets the budget: the int(u * n) most similar candidates, then nothing more
            k = int(bound * n)
            best = torch.sort(torch.where(sim > -2, sim, -math.inf), descending=True, stable=True).indices[:k]
            cand = torch.zeros_like(cand)
            cand[best] = True
            cand &= sim > -2
            st["done"] = True
        if not bool(cand.any()):
            return torch.arange(n, device=step.visual.device)
        return merge_runs(order, cand, n)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        """Not known before the LLM runs: the merges follow hidden-state similarity.

        Raises:
            ValueError: always; the achieved counts are measured per sample.
        """
        raise ValueError(
            "framefusion: per-layer counts depend on hidden-state similarity inside the LLM and are known only after "
            "the prefill (the layer average meets ratio by construction); use the measured counts, not budget="
        )
