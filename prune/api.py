"""The contract between pruning strategies and model adapters.

A strategy is a frozen dataclass of flat, typed hyperparameters that satisfies :class:`Strategy`. It works on one
video at a time (batch 1, as PruneVid's official code asserts) and knows nothing about transformers or lmms-eval.
It has two stages:

* ``pre_llm`` reduces the projected visual tokens of one video, ``[T, P, D]``, to a sequence ``[n, D]`` that the
  adapter splices into the prompt. After this stage the adapter numbers positions contiguously over the shorter
  sequence (PruneVid stage 1 re-indexes positions the same way).
* ``in_llm`` runs at each decoder layer named in ``layer_specs``. The adapter scores the visual tokens still
  present with the attention variant the spec asks for, and the strategy returns which of them survive into the
  following layers, as sorted indices or as a :class:`LayerMerge` (survivors that absorb the others' hidden states:
  HoliTom, FrameFusion). By default survivors keep their original position ids (FastV ``position_ids =
  keep_indexs``; PruneVid stage 2), so positions may have gaps; ``LayerSpec.positions="renumber"`` numbers the
  shorter sequence contiguously instead (PyramidDrop). A merged token takes the position of its survivor.

Three optional extensions, each used only by the strategies that declare it (module attributes read with
:func:`vision_inputs` and :func:`decode_spec`, so strategies that do not use them need not define them):

* **Vision-side inputs.** A strategy with ``vision_inputs = frozenset({...})`` (names from :data:`VISION_INPUTS`) gets
  those :class:`VideoTokens` fields filled by the adapter from the backbone's own vision tower (what the tower saw,
  which cannot be derived from the projected tokens). Adapters compute them only when asked.
* **Positions.** A pre-LLM output with ``positions="original"`` asks the adapter to give every output token the
  position its representative (:meth:`PreLLMOutput.sources`) had in the unpruned prompt, gaps included (FastVID);
  the text after the video keeps its original positions too. The default ``"contiguous"`` renumbers.
* **Decode-time stage.** A strategy with a ``decode_spec`` (:class:`DecodeSpec`) gets ``in_decode`` called at every
  decode step with the new token's attention over the visual tokens in the cache, and chooses which visual entries
  the later layers attend to in that step (DyCoke's dynamic KV-cache pruning), or evicts them for good.

Shape legend: ``T`` frames, ``H x W`` patch grid of one frame, ``P = H * W`` tokens per frame, ``D`` hidden size,
``N = T * P`` visual tokens before pruning, ``n`` visual tokens after the pre-LLM stage, ``k`` tokens kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "VISION_INPUTS",
    "DecodeInput",
    "DecodeSpec",
    "LayerInput",
    "LayerMerge",
    "LayerSpec",
    "PreLLMOutput",
    "Solved",
    "Strategy",
    "TokenBudget",
    "VideoTokens",
    "check_range",
    "check_ratio",
    "check_video",
    "decode_spec",
    "keep_count",
    "kept_indices",
    "require_vision",
    "simulate",
    "vision_inputs",
]

VISION_INPUTS = ("frame_global", "frame_head_attn", "frame_patch_attn", "frame_patch_keys")
"""Names of the optional vision-side fields of :class:`VideoTokens` a strategy may declare in ``vision_inputs``."""


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Validate a keep ratio.

    Args:
        ratio: fraction of visual tokens to keep.
        name: parameter name used in the error message.

    Returns:
        ``ratio`` as a float.

    Raises:
        ValueError: if ``ratio`` is not a finite number in (0, 1].
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio):
        raise ValueError(f"{name} must be a finite number in (0, 1], got {ratio!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {ratio!r}")
    return float(ratio)


def check_range(name: str, value: object, low: float, high: float) -> float:
    """Validate a strategy's numeric setting (a threshold, a weight) against its closed range.

    Args:
        name: parameter name used in the error message.
        value: the setting.
        low: smallest accepted value.
        high: largest accepted value.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: if ``value`` is not a finite number in ``[low, high]`` (a bool is not a number here).
    """
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def check_video(frames: Tensor, name: str = "frames") -> None:
    """Validate one video's visual tokens.

    Args:
        frames: ``[T, P, D]`` floating-point tokens.
        name: argument name used in the error message.

    Raises:
        ValueError: wrong type or rank, an empty dimension, a non-floating dtype, or NaN/inf values.
    """
    if not isinstance(frames, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [T, P, D], got {type(frames).__name__}")
    if frames.dim() != 3:
        raise ValueError(f"{name} must have shape [T, P, D] (rank 3), got rank {frames.dim()} {tuple(frames.shape)}")
    if min(frames.shape) == 0:
        raise ValueError(f"{name} is empty: shape {tuple(frames.shape)}; T, P and D must all be >= 1")
    if not frames.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32, fp16 or bf16), got {frames.dtype}")
    # aminmax propagates NaN and surfaces ±inf in one pass, ~50x cheaper than isfinite(...).all() on [32, 196, 3584].
    low, high = torch.aminmax(frames)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise ValueError(f"{name} contains NaN or inf; visual tokens must be finite")


def keep_count(ratio: float, n: int) -> int:
    """Number of tokens a ratio keeps out of ``n``: round half up, at least 1 when ``n >= 1``.

    Python's ``round`` rounds half to even; a budget should not depend on the parity of ``n``.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(ratio * n + 0.5)))


@dataclass(frozen=True)
class VideoTokens:
    """One video's visual tokens after the projector, before separators (e.g. newline tokens) are added.

    The ``frame_*`` fields come from the vision tower, computed by the adapter only for strategies that declare them
    in ``vision_inputs`` (each backbone's adapter documents its source, and what stands in where the tower lacks it).
    Per-patch maps are pooled to the LLM grid exactly as the backbone pools its features.

    Attributes:
        tokens: ``[T, P, D]`` projected visual tokens in raster order within each frame.
        grid: ``(H, W)`` with ``H * W == P``.
        text: optional ``[M, D]`` embeddings of the prompt tokens, for query-conditioned pre-LLM methods.
        frame_global: ``[T, G]`` a global descriptor per frame: the output of SigLIP's attention-pooling head
            (FastVID's DySeg on LLaVA-OneVision).
        frame_head_attn: ``[T, P]`` that pooling head's attention over the patches (FastVID's salient tokens).
        frame_patch_attn: ``[T, P]`` attention each patch receives in the last vision layer the VLM uses, averaged
            over heads and query rows (VisionZip's dominant tokens, HoliTom).
        frame_patch_keys: ``[T, P, K]`` keys of that layer averaged over heads (VisionZip's merge metric).
    """

    tokens: Tensor
    grid: tuple[int, int]

    text: Tensor | None = None
    frame_global: Tensor | None = None
    frame_head_attn: Tensor | None = None
    frame_patch_attn: Tensor | None = None
    frame_patch_keys: Tensor | None = None

    def __post_init__(self) -> None:
        check_video(self.tokens, "VideoTokens.tokens")
        if len(self.grid) != 2 or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"grid must be (H, W) with H, W >= 1, got {self.grid!r}")
        h, w = (int(g) for g in self.grid)
        if h * w != self.tokens.shape[1]:
            raise ValueError(f"grid {h}x{w}={h * w} does not match P={self.tokens.shape[1]} tokens per frame")
        if self.text is not None and (self.text.dim() != 2 or self.text.shape[1] != self.tokens.shape[2]):
            raise ValueError(f"text must be [M, D={self.tokens.shape[2]}], got {tuple(self.text.shape)}")
        t, p = self.tokens.shape[:2]
        expect = {"frame_global": 2, "frame_head_attn": 2, "frame_patch_attn": 2, "frame_patch_keys": 3}
        for name, rank in expect.items():
            value = getattr(self, name)
            if value is None:
                continue
            lead = (t,) if name == "frame_global" else (t, p)
            if not isinstance(value, Tensor) or value.dim() != rank or tuple(value.shape[: len(lead)]) != lead:
                want = {"frame_global": "[T, G]", "frame_patch_keys": "[T, P, K]"}.get(name, "[T, P]")
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be {want} with T={t}, P={p}, got {got}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite floating point values")


def vision_inputs(strategy: object) -> frozenset[str]:
    """The vision-side :class:`VideoTokens` fields a strategy declares (``vision_inputs``; empty when undeclared).

    Raises:
        ValueError: a declared name is not one of :data:`VISION_INPUTS`.
    """
    names = frozenset(getattr(strategy, "vision_inputs", ()) or ())
    unknown = sorted(names - set(VISION_INPUTS))
    if unknown:
        raise ValueError(
            f"{getattr(strategy, 'name', strategy)!r} declares unknown vision_inputs {unknown}; known: {VISION_INPUTS}"
        )
    return names


def require_vision(video: VideoTokens, names: frozenset[str] | tuple[str, ...], method: str) -> None:
    """Fail with one line when a strategy's declared vision-side fields are missing from ``video``.

    Raises:
        ValueError: naming the missing fields and how they are filled.
    """
    missing = [n for n in VISION_INPUTS if n in names and getattr(video, n) is None]
    if missing:
        raise ValueError(
            f"{method} needs VideoTokens.{', '.join(missing)} from the vision tower; the backbone adapter fills them "
            "for strategies that declare vision_inputs (build VideoTokens with them when calling pre_llm directly)"
        )


@dataclass(frozen=True)
class Solved:
    """The knobs a budget solver chose for one sample (:mod:`prune.budget`), and what they achieve.

    Attributes:
        knobs: ``(field, value)`` pairs set on the strategy for this sample, pre-LLM knobs first.
        budget: the target fraction.
        measure: ``tokens_in``, ``final``, ``layer_avg`` or ``flops``.
        achieved: the achieved fraction under ``measure``.
        reachable: ``achieved`` is within the solver's tolerance of ``budget``; ``False`` means the method could not
            get closer (its structure or its integer counts) and ``achieved`` is the nearest value it can reach.
    """

    knobs: tuple[tuple[str, float], ...]
    budget: float
    measure: str
    achieved: float
    reachable: bool


@dataclass(frozen=True)
class PreLLMOutput:
    """What the pre-LLM stage hands to the adapter.

    Attributes:
        tokens: ``[n, D]`` the visual sequence to splice into the prompt, in LLM order.
        assignment: ``[N]`` long; for each input token (flattened ``t * P + p``), the index of the output token it
            was kept as or merged into, or -1 if it was dropped. Used for pictures and position bookkeeping.
        groups: sizes of consecutive groups of ``tokens`` (summing to ``n``) for strategies whose in-LLM stage selects
            per group (PruneVid: per segment the static group, then one dynamic group per frame). ``()`` means
            the strategy does not use groups.
        solved: the knobs a budget solver chose for this sample (``budget=`` runs); ``None`` otherwise.
        positions: ``"contiguous"`` (the adapter renumbers the shorter sequence) or ``"original"`` (each output token
            keeps the position of its representative, :meth:`sources`, in the unpruned prompt; FastVID).
        flops: FLOPs of the strategy's own pre-LLM work (similarity matrices, distances), counted in the records'
            pre-LLM FLOPs; 0 where a strategy does not count it.
        origin: ``[n]`` long, the input token (flattened ``t * P + p``) whose place each output token takes: its
            position with ``positions="original"`` and its frame for separators. ``None``: :meth:`sources`. Set it
            where a merged token sits at a member other than its smallest (FastVID's anchors).
    """

    tokens: Tensor
    assignment: Tensor
    groups: tuple[int, ...] = ()
    solved: Solved | None = None
    positions: Literal["contiguous", "original"] = "contiguous"
    flops: float = 0.0
    origin: Tensor | None = None

    def __post_init__(self) -> None:
        assert self.tokens.dim() == 2, f"tokens must be [n, D], got {tuple(self.tokens.shape)}"
        assert self.assignment.dim() == 1 and self.assignment.dtype == torch.long
        assert not self.groups or sum(self.groups) == self.tokens.shape[0], (self.groups, self.tokens.shape)
        assert self.positions in ("contiguous", "original"), self.positions
        assert self.origin is None or self.origin.shape == (self.tokens.shape[0],), "origin must be [n]"

    @property
    def n(self) -> int:
        """Number of visual tokens entering the LLM."""
        return int(self.tokens.shape[0])

    def origins(self) -> Tensor:
        """``[n]`` long: the input token whose place each output token takes (``origin``, else :meth:`sources`)."""
        return self.origin if self.origin is not None else self.sources()

    def sources(self) -> Tensor:
        """``[n]`` long: the smallest input index merged into each output token (its representative)."""
        n, big = self.n, self.assignment.numel()
        src = torch.full((n,), big, dtype=torch.long, device=self.assignment.device)
        kept = self.assignment >= 0
        idx = torch.arange(big, device=self.assignment.device)[kept]
        return src.scatter_reduce(0, self.assignment[kept], idx, reduce="amin")


@dataclass(frozen=True)
class LayerSpec:
    """Where and how an in-LLM stage scores the visual tokens.

    The adapter computes, at decoder layer ``layer`` during prefill, the attention probabilities of the chosen query
    rows over the whole sequence (softmax over all keys), slices the visual columns, reduces over heads and then
    over query rows, and passes the resulting ``[n]`` scores to ``Strategy.in_llm``. The kept set applies to layers
    ``layer + 1`` onwards, or to ``layer`` itself onwards with ``own_layer`` (:attr:`first_layer`).

    Attributes:
        layer: 0-based decoder layer whose attention provides the scores.
        queries: ``"last"`` the last prompt token (FastV code); ``"after_visual"`` every token after the visual
            span (PruneVid); ``"all"`` every token (FastV paper's column mean).
        head_reduce: reduction over heads (KV heads are repeated first under GQA).
        query_reduce: reduction over the query rows.
        rope: ``True`` for the post-RoPE queries and keys the layer uses; ``False`` for pre-RoPE (PruneVid).
        causal: ``True`` for the causal softmax of the forward pass; ``False`` for a softmax over the full row,
            future tokens included (PruneVid's score map).
        prune_past_kv: also drop the pruned (and absorbed) tokens from the KV cache of the layers before
            :attr:`first_layer` (PruneVid), so every layer decodes over the same kept set. ``False`` keeps the full
            cache there (FastV's in-place variant).
        own_layer: ``True``: score with layer ``layer``'s own queries and keys, projected from the hidden states
            entering it (its input norm, ``q_proj``/``k_proj``, RoPE at the current positions), before it runs, and
            apply the result from layer ``layer`` on (PyramidDrop's ``pdrop_rank_drop`` with ``layers[rank_layer]``).
            ``False``: the scores come from layer ``layer``'s own forward and apply from ``layer + 1`` (FastV).
        positions: ``"keep"``: survivors keep their original position ids, with gaps (FastV, PruneVid, HoliTom);
            ``"renumber"``: the shortened sequence is numbered ``0..S'-1`` and decoding continues from ``S'`` in the
            layers that see it (PyramidDrop).
        hidden: pass the current visual tokens' hidden states entering :attr:`first_layer` to ``in_llm``
            (``LayerInput.hidden``), for methods that merge by similarity.
        mid_layer: apply the stage inside layer ``layer``, after its attention and residual add and before its MLP
            (FrameFusion): ``hidden`` are those post-attention states and merged survivors enter the MLP merged. The
            MLP is per token, so the survivors' outputs are exact; the other tokens leave at ``layer + 1`` (their
            MLP output is discarded), and layer ``layer``'s KV cache holds them, as its attention ran first.
    """

    layer: int
    queries: Literal["last", "after_visual", "all"] = "last"
    head_reduce: Literal["mean", "max"] = "mean"
    query_reduce: Literal["mean", "max"] = "mean"
    rope: bool = True
    causal: bool = True
    prune_past_kv: bool = False
    own_layer: bool = False
    positions: Literal["keep", "renumber"] = "keep"
    hidden: bool = False
    mid_layer: bool = False

    def __post_init__(self) -> None:
        if self.own_layer and self.mid_layer:
            raise ValueError(f"LayerSpec at layer {self.layer}: own_layer and mid_layer exclude each other")

    @property
    def first_layer(self) -> int:
        """The first decoder layer that runs on the reduced sequence."""
        return self.layer if self.own_layer else self.layer + 1


@dataclass(frozen=True)
class LayerInput:
    """What ``Strategy.in_llm`` receives at one of its layers.

    Attributes:
        layer: the decoder layer the scores come from (``LayerSpec.layer``).
        scores: ``[n_cur]`` float score of each visual token still present, as the spec asked.
        visual: ``[n_cur]`` long, sorted indices of those tokens into ``pre.tokens``.
        pre: the pre-LLM output of this sample (for group-wise selection).
        hidden: ``[n_cur, D]`` hidden states of those tokens entering ``LayerSpec.first_layer`` (after the attention
            of ``layer`` for a ``mid_layer`` spec), when the spec asks for them (``LayerSpec.hidden``); else ``None``.
        state: a scratch dict, fresh for each sample and shared by all its stages in layer order, for methods whose
            later stages depend on earlier outcomes (FrameFusion's merge history); ``None`` outside a run.
    """

    layer: int
    scores: Tensor
    visual: Tensor
    pre: PreLLMOutput
    hidden: Tensor | None = None
    state: dict | None = None


@dataclass(frozen=True)
class LayerMerge:
    """An in-LLM merge: which visual tokens survive, and how each survivor's hidden state absorbs others.

    After the merge the survivor ``j`` carries ``sum_i weights[i] * hidden[i]`` over the tokens ``i`` with
    ``into[i] == j`` (its own state included), at its own position; tokens with ``into[i] == -1`` are dropped
    without being merged. The weights are the strategy's own rule (HoliTom's sequential pairwise averages,
    FrameFusion's group means); the adapter only applies them. The KV cache of earlier layers follows
    ``LayerSpec.prune_past_kv``: absorbed tokens are dropped there like pruned ones, survivors' entries are unchanged.

    Attributes:
        keep: ``[k]`` sorted, unique long indices into ``LayerInput.visual`` of the survivors.
        into: ``[n_cur]`` long, ``0..k-1`` the survivor absorbing each current token, or ``-1``;
            ``into[keep[j]] == j``.
        weights: ``[n_cur]`` float, each token's weight in its survivor's new state; non-negative, summing to 1
            over each survivor's group.
    """

    keep: Tensor
    into: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        k, n = self.keep.numel(), self.into.numel()
        if self.keep.dim() != 1 or self.into.dim() != 1 or self.weights.shape != self.into.shape:
            raise ValueError(
                f"LayerMerge needs keep [k], into [n] and weights [n], got {tuple(self.keep.shape)}, "
                f"{tuple(self.into.shape)}, {tuple(self.weights.shape)}"
            )
        if self.into.dtype != torch.long or self.keep.dtype != torch.long:
            raise ValueError("LayerMerge.keep and LayerMerge.into must be long tensors")
        if k and (int(self.keep.min()) < 0 or int(self.keep.max()) >= n):
            raise ValueError(f"LayerMerge.keep must index the {n} current tokens, got range {self.keep.min()}..")
        if k > 1 and not bool((self.keep[1:] > self.keep[:-1]).all()):
            raise ValueError("LayerMerge.keep must be sorted and unique")
        if n and (int(self.into.min()) < -1 or int(self.into.max()) >= k):
            raise ValueError(f"LayerMerge.into must be in -1..{k - 1}")
        if k and not torch.equal(self.into[self.keep], torch.arange(k, device=self.into.device)):
            raise ValueError("LayerMerge.into must map every survivor to itself (into[keep[j]] == j)")
        if n and float(self.weights.min()) < 0:
            raise ValueError("LayerMerge.weights must be non-negative")
        member = self.into >= 0
        sums = torch.zeros(k, dtype=torch.float64, device=self.weights.device)
        sums.index_add_(0, self.into[member], self.weights[member].double())
        if k and not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-5)):
            raise ValueError("LayerMerge.weights must sum to 1 over each survivor's group")


def kept_indices(result: Tensor | LayerMerge) -> Tensor:
    """The survivors of an ``in_llm`` result: the indices themselves, or ``LayerMerge.keep``."""
    return result.keep if isinstance(result, LayerMerge) else result


@dataclass(frozen=True)
class DecodeSpec:
    """Where a decode-time stage scores the cache (optional ``Strategy.decode_spec``).

    At every decode step the adapter computes the new token's attention at decoder layer ``layer`` over every cached
    key (softmax over all of them), reduces over heads and slices the visual entries; ``Strategy.in_decode`` then
    chooses which visual entries layers ``layer + 1 ..`` attend to. Text and separators are always attended.

    Attributes:
        layer: 0-based decoder layer whose attention scores the cache (DyCoke: ``L - 1`` for pruning from ``L``).
        head_reduce: reduction over heads (KV heads repeated first under GQA).
        evict: ``False``: the choice holds for this step only and the cache keeps every entry (DyCoke's gather over a
            full cache); ``True``: the unchosen visual entries are removed from the caches of layers ``> layer`` for
            good (KV bytes shrink).
    """

    layer: int
    head_reduce: Literal["mean", "max"] = "mean"
    evict: bool = False


@dataclass(frozen=True)
class DecodeInput:
    """What ``Strategy.in_decode`` receives at one decode step.

    Attributes:
        step: 1-based decode step (step 1 produces the second generated token; the first comes from the prefill).
        scores: ``[n_vis]`` attention of the new token over the visual entries in the cache of ``DecodeSpec.layer``.
        visual: ``[n_vis]`` long, index into ``pre.tokens`` of each of those entries (sorted).
        previous: ``[n_vis]`` the previous step's ``scores`` over the same entries, ``None`` at step 1 or when the set
            of entries changed (eviction).
        pre: the pre-LLM output of this sample.
    """

    step: int
    scores: Tensor
    visual: Tensor
    previous: Tensor | None
    pre: PreLLMOutput


def decode_spec(strategy: object) -> DecodeSpec | None:
    """The strategy's decode-time stage, or ``None`` (``decode_spec`` is optional on a :class:`Strategy`)."""
    spec = getattr(strategy, "decode_spec", None)
    if spec is not None and not isinstance(spec, DecodeSpec):
        raise ValueError(f"{getattr(strategy, 'name', strategy)!r}.decode_spec must be a DecodeSpec, got {spec!r}")
    return spec


@runtime_checkable
class Strategy(Protocol):
    """A visual-token pruning method. Implementations are frozen dataclasses; see the module docstring."""

    name: str
    ratio: float

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """In-LLM stages in layer order; ``()`` for a pre-LLM-only method."""
        ...

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Reduce one video's tokens before the LLM."""
        ...

    def in_llm(self, step: LayerInput) -> Tensor | LayerMerge:
        """Return ``[k]`` sorted, unique long indices into ``step.visual`` of the tokens that survive, or a merge."""
        ...

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        """Visual tokens each of the ``num_layers`` decoder layers processes, given the pre-LLM output."""
        ...


@dataclass(frozen=True)
class TokenBudget:
    """The achieved budget of one sample.

    Attributes:
        visual_in: ``N``, visual tokens before pruning.
        pre_llm: visual tokens entering the LLM.
        per_layer: visual tokens at every decoder layer.
        kept: for each in-LLM stage, ``[k]`` indices into ``PreLLMOutput.tokens`` of the survivors.
    """

    visual_in: int
    pre_llm: int
    per_layer: tuple[int, ...]
    kept: tuple[Tensor, ...] = ()

    @property
    def pre_llm_ratio(self) -> float:
        """Fraction of visual tokens entering the LLM."""
        return self.pre_llm / self.visual_in

    @property
    def layer_avg_ratio(self) -> float:
        """Layer-averaged fraction of visual tokens the LLM processes (HieraVid's and PDrop's accounting)."""
        return sum(self.per_layer) / (len(self.per_layer) * self.visual_in)


ScoreFn = Callable[[LayerSpec, Tensor, PreLLMOutput], Tensor]


def simulate(
    strategy: Strategy, video: VideoTokens, num_layers: int, score_fn: ScoreFn
) -> tuple[PreLLMOutput, TokenBudget]:
    """Run both stages of a strategy without a model, with scores from ``score_fn``.

    This is what an adapter does around the LLM, minus the LLM: tests, benchmarks and pictures use it.

    Args:
        strategy: the method.
        video: one video's tokens.
        num_layers: decoder layers of the (imagined) LLM.
        score_fn: ``(spec, visual [n_cur] indices into pre.tokens, pre) -> [n_cur]`` scores.

    Returns:
        The pre-LLM output and the achieved :class:`TokenBudget`.
    """
    pre = strategy.pre_llm(video)
    visual = torch.arange(pre.n, device=pre.tokens.device)
    counts = [pre.n] * num_layers
    kept = []
    state: dict = {}
    for spec in strategy.layer_specs:
        if not 0 <= spec.layer < num_layers - 1 + spec.own_layer:
            raise ValueError(
                f"{strategy.name}: stage at layer {spec.layer} (own_layer={spec.own_layer}) leaves no layer after "
                f"it in a {num_layers}-layer LLM"
            )
        hidden = pre.tokens[visual] if spec.hidden else None  # no LLM here: the input embeddings stand in
        step = LayerInput(spec.layer, score_fn(spec, visual, pre), visual, pre, hidden, state)
        keep = kept_indices(strategy.in_llm(step))
        visual = visual[keep]
        kept.append(visual)
        for layer in range(spec.first_layer, num_layers):
            counts[layer] = int(visual.numel())
    n_in = video.tokens.shape[0] * video.tokens.shape[1]
    return pre, TokenBudget(n_in, pre.n, tuple(counts), tuple(kept))


def group_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of consecutive groups with the given sizes."""
    out, start = [], 0
    for s in sizes:
        out.append((start, start + int(s)))
        start += int(s)
    return out
