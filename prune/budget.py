"""Equal-budget runs: solve each method's own knob so that its *achieved* budget hits a target.

A method's ``ratio`` is its own knob (FastV's kept fraction at layer K, PruneVid's per-group α, HieraVid's layer
average), so "every method at 30 %" is not one budget. Here a budget is an achieved quantity, measured four ways on
the visual-token counts of every decoder layer (``counts``, ``N`` = visual tokens before pruning):

==============  ===========================================================================  =========================
measure         definition                                                                   used by
==============  ===========================================================================  =========================
``tokens_in``   visual tokens entering the LLM, ``counts[0] / N``                            HoliTom "before-LLM",
                                                                                             VisionZip, FastVID, DyCoke
``final``       visual tokens after the last in-LLM prune, ``counts[-1] / N``                PruneVid Table 1
                                                                                             "Retained", FastV
``layer_avg``   layer-averaged visual tokens, ``sum(counts) / (L * N)``                      HieraVid, PyramidDrop
``flops``       prefill FLOPs against the unpruned prompt, text included (FastV convention,  FastV, PruneVid, HoliTom
                :mod:`prune.flops`)                                                          "FLOPs"
==============  ===========================================================================  =========================

:func:`solve` finds, for one sample, the knob values whose achieved budget is nearest the target (within
``TOLERANCE`` relative when the method's structure allows it; otherwise the nearest achievable value, flagged
``reachable=False`` and warned about, never an error). It needs no model call and no per-method switch; a strategy
tells it what it needs through the contract:

1. ``layer_counts(pre, num_layers)`` (every strategy): given the real pre-LLM output, the solver searches the last
   knob (``ratio`` by default) over it. This is the per-sample solve of content-dependent methods (PruneVid's α after
   its stage 1; HieraVid's stage counts after its pre-LLM levels kept what the content allowed).
2. optional :class:`PlannedCounts` (``planned_counts(n_in, num_layers)``): methods whose counts follow from ``N``
   alone (budget-exact: ``random``, ``pool``, ``fastv``; HieraVid's plan) are solved from that formula before
   ``pre_llm`` runs, so the pre-LLM stage already produces the right count.
3. optional ``budget_knobs`` class attribute: the fields the solver may move, pre-LLM knobs first, the knob
   ``layer_counts`` depends on last. Default ``("ratio",)``. PruneVid declares ``("cluster_ratio", "ratio")``: its
   stage-1 merging (γ) is re-run only when the target needs it (``tokens_in``, or a target α alone cannot reach on
   the stage-1 output), then α is solved on the stage-1 output.

4. optional ``ratio_measure`` class attribute, for a strategy whose counts are known only after the prefill (its
   ``layer_counts`` raises; FrameFusion's merges follow hidden-state similarity inside the LLM): the measure its
   ``ratio`` equals by construction (FrameFusion: ``layer_avg``, the official ``cost``). That measure is solved in
   closed form (``ratio = budget``); any other cannot be solved without running the LLM and is refused with one line
   when the wrapper is built (:func:`check_solvable`), before any work.

Every knob is a fraction in (0, 1] and every count must be non-decreasing in it; the search is a bisection over
(0, 1] that keeps the best value seen. A knob must not change ``layer_specs`` (the adapter installs those once).

:class:`AtBudget` wraps a strategy and does this in its ``pre_llm``; the knobs it chose travel with the sample in
``PreLLMOutput.solved`` (:class:`prune.api.Solved`), so ``in_llm`` and ``layer_counts`` use them and the harness
records them per sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from prune.api import (
    DecodeInput,
    DecodeSpec,
    LayerInput,
    LayerSpec,
    PreLLMOutput,
    Solved,
    Strategy,
    VideoTokens,
    check_ratio,
    decode_spec,
    vision_inputs,
)
from prune.flops import prefill_flops

__all__ = [
    "MEASURES",
    "TOLERANCE",
    "AtBudget",
    "BudgetWarning",
    "PlannedCounts",
    "achieved",
    "all_measures",
    "budget_knobs",
    "check_measure",
    "check_solvable",
    "ratio_measure",
    "solve",
    "solve_monotone",
]

MEASURES = ("tokens_in", "final", "layer_avg", "flops")
TOLERANCE = 0.02  # relative: a solved budget within ±2 % of the target counts as hit
_KNOB_MIN = 1e-4  # smallest knob value searched; every knob is a fraction in (0, 1]
_ITERS_CHEAP = 24  # bisection steps over layer_counts / planned_counts: knob to 6e-8, below one token in 10^7
_REFINE = (0.95, 1.05, 0.9, 1.1)  # pre-LLM knob factors tried when steps miss the target
_ITERS_PRE_LLM = 9  # bisection steps that re-run pre_llm (PruneVid's stage 1): γ to 2e-3, below 1/144


class BudgetWarning(UserWarning):
    """A target the method cannot reach (structurally or by integer counts): the nearest value is used."""


@runtime_checkable
class PlannedCounts(Protocol):
    """Optional: a strategy whose per-layer counts follow from ``N`` before it sees the content."""

    def planned_counts(self, n_in: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens each decoder layer will process for ``n_in`` input tokens."""
        ...


def check_measure(measure: str) -> str:
    """Validate a budget measure name.

    Raises:
        ValueError: not one of :data:`MEASURES`.
    """
    if measure not in MEASURES:
        raise ValueError(f"budget_measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    return measure


def achieved(
    counts: Sequence[int], visual_in: int, measure: str, other_tokens: int = 0, hidden: int = 0, ffn: int = 0
) -> float:
    """The achieved budget of per-layer visual counts under one measure, as a fraction.

    Args:
        counts: visual tokens at each decoder layer (``Strategy.layer_counts``).
        visual_in: ``N``, visual tokens before pruning.
        measure: one of :data:`MEASURES`.
        other_tokens: tokens besides the visual ones at every layer (prompt text and separators); ``flops`` only.
        hidden: LLM hidden size ``d``; ``flops`` only.
        ffn: LLM MLP size ``m``; ``flops`` only.

    Returns:
        The fraction (1.0 = unpruned).
    """
    if visual_in <= 0 or not counts:
        raise ValueError(f"need visual_in > 0 and one count per layer, got {visual_in} and {len(counts)} counts")
    if measure == "tokens_in":
        return counts[0] / visual_in
    if measure == "final":
        return counts[-1] / visual_in
    if measure == "layer_avg":
        return sum(counts) / (len(counts) * visual_in)
    if measure == "flops":
        if hidden <= 0 or ffn <= 0:
            raise ValueError(f"the flops measure needs the LLM's hidden and ffn sizes, got {hidden} and {ffn}")
        pruned = prefill_flops([int(c) + other_tokens for c in counts], hidden, ffn)
        return pruned / prefill_flops([visual_in + other_tokens] * len(counts), hidden, ffn)
    raise ValueError(check_measure(measure))


def all_measures(
    counts: Sequence[int], visual_in: int, other_tokens: int = 0, hidden: int = 0, ffn: int = 0
) -> dict[str, float]:
    """Every measure of :data:`MEASURES` (``flops`` only when ``hidden`` and ``ffn`` are given)."""
    names = MEASURES if hidden > 0 and ffn > 0 else MEASURES[:-1]
    return {m: achieved(counts, visual_in, m, other_tokens, hidden, ffn) for m in names}


def solve_monotone(
    value: Callable[[float], float | None], target: float, lo: float = _KNOB_MIN, hi: float = 1.0, iters: int = 40
) -> tuple[float, float]:
    """The knob in ``[lo, hi]`` whose value is nearest ``target``, for a non-decreasing step function.

    Bisection for the smallest knob reaching the target; the answer is the better of the two points bracketing it
    (on a tie the one below the target: a budget is a cap). ``value`` returns ``None`` where the knob is invalid
    (e.g. keeps no token); such points are never chosen.

    Args:
        value: knob -> achieved value (or ``None``).
        target: the value wanted.
        lo: smallest knob.
        hi: largest knob.
        iters: bisection steps.

    Returns:
        ``(knob, value)``.

    Raises:
        ValueError: no knob in the range is valid.
    """
    seen: dict[float, float | None] = {}

    def at(v: float) -> float | None:
        if v not in seen:
            seen[v] = value(v)
        return seen[v]

    a, b = lo, hi
    high = at(b)
    if high is not None and high >= target:
        low = at(a)
        if low is None or low < target:
            for _ in range(iters):
                mid = 0.5 * (a + b)
                got = at(mid)
                if got is not None and got >= target:
                    b = mid
                else:
                    a = mid
    valid = [(v, x) for v, x in seen.items() if x is not None]
    if not valid:
        raise ValueError(f"no valid knob value in [{lo}, {hi}]")
    # nearest; ties: under the target first, then the smaller knob
    return min(valid, key=lambda vx: (abs(vx[1] - target), vx[1] > target, vx[0]))


def budget_knobs(strategy: Strategy) -> tuple[str, ...]:
    """The fields the solver may move, pre-LLM knobs first (``strategy.budget_knobs``, default ``("ratio",)``)."""
    knobs = tuple(getattr(strategy, "budget_knobs", ("ratio",)))
    fields = {f.name for f in dataclasses.fields(strategy)} if dataclasses.is_dataclass(strategy) else set()
    missing = [k for k in knobs if k not in fields]
    if not knobs or missing:
        raise ValueError(
            f"{strategy.name}: budget= needs dataclass fields to solve; budget_knobs {knobs} are not all fields "
            f"({sorted(fields)})"
        )
    return knobs


def ratio_measure(strategy: Strategy) -> str | None:
    """The measure ``ratio`` equals by construction for a strategy whose counts are known only after the prefill.

    ``None`` for every strategy whose ``layer_counts`` works before the LLM runs (the solver searches those).
    """
    measure = getattr(strategy, "ratio_measure", None)
    return None if measure is None else check_measure(measure)


def check_solvable(strategy: Strategy, measure: str) -> None:
    """Refuse a target the solver cannot reach before the LLM runs (one line naming the measures it accepts).

    Raises:
        ValueError: ``strategy`` declares a ``ratio_measure`` and ``measure`` is another one.
    """
    own = ratio_measure(strategy)
    if own is not None and check_measure(measure) != own:
        raise ValueError(
            f"{strategy.name}: its per-layer counts are known only after the prefill (they follow the LLM's hidden "
            f"states), so budget_measure={measure} cannot be solved before it runs; accepted: budget_measure={own} "
            f"(its ratio is the {own} budget by construction)"
        )


def _with(strategy: Strategy, **knobs: float) -> Strategy:
    return dataclasses.replace(strategy, **knobs)  # type: ignore[type-var]  # strategies are frozen dataclasses


def solve(
    strategy: Strategy,
    video: VideoTokens,
    budget: float,
    measure: str,
    num_layers: int,
    other_tokens: int = 0,
    hidden: int = 0,
    ffn: int = 0,
) -> tuple[Strategy, PreLLMOutput, Solved]:
    """Solve ``strategy``'s knobs for one video so that its achieved ``measure`` is nearest ``budget``.

    Args:
        strategy: the method at its configured settings (a frozen dataclass).
        video: one video's ``[T, P, D]`` tokens.
        budget: target fraction in (0, 1].
        measure: one of :data:`MEASURES`.
        num_layers: decoder layers of the LLM.
        other_tokens: non-visual tokens at every layer (prompt text and separators), for ``flops``.
        hidden: LLM hidden size, for ``flops``.
        ffn: LLM MLP size, for ``flops``.

    Returns:
        The strategy with the solved knobs, its pre-LLM output for ``video`` (with ``solved`` set) and the
        :class:`~prune.api.Solved` record. A target outside what the method can reach gives the nearest achievable
        value with ``reachable=False`` and a :class:`BudgetWarning`.
    """
    check_ratio(budget, "budget")
    check_measure(measure)
    knobs = budget_knobs(strategy)
    t, p, _ = video.tokens.shape
    n_in = t * p
    if ratio_measure(strategy) is not None:  # counts known only after the prefill: closed form or refused
        return _solve_by_construction(strategy, video, budget, measure, knobs)

    def measure_of(counts: Sequence[int]) -> float | None:
        # a configuration that leaves a layer without any visual token is not one the adapters can run
        if min(counts) < 1:
            return None
        return achieved(counts, n_in, measure, other_tokens, hidden, ffn)

    last = knobs[-1]
    s = strategy
    # 1. Budget-exact methods: solve from the count formula before the pre-LLM stage runs.
    if isinstance(s, PlannedCounts):
        args = (s, last, n_in, num_layers, budget, measure, other_tokens, hidden, ffn)
        try:
            v = _solve_planned(*args)  # content-free, so the same for every sample of a shape and prompt length
        except TypeError:  # a strategy with an unhashable field: solve without the cache
            v = _solve_planned.__wrapped__(*args)
        if v is not None:
            s = _with(s, **{last: v})
    pre = s.pre_llm(video)

    # 2. Content-dependent pre-LLM knobs (PruneVid's γ): re-run the pre-LLM stage only when the target needs it.
    for knob in knobs[:-1]:
        s, pre, bracketed = _solve_pre_knob(
            s, knob, last, pre, video, budget, measure == "tokens_in", measure_of, num_layers
        )
        if bracketed:  # this knob spans the target (integer steps may still miss it): later ones stay as configured
            break

    # 3. The last knob on the real pre-LLM output (per sample; a no-op for pre-LLM-only methods).
    s, moved = _solve_last(s, last, pre, budget, measure_of, num_layers)
    if not moved and not isinstance(s, PlannedCounts):
        # The knob acts before the LLM only and the method gives no count formula: search it by re-running pre_llm.
        s, pre = _solve_pre_only(s, last, pre, video, budget, measure_of, num_layers)
    got = achieved(s.layer_counts(pre, num_layers), n_in, measure, other_tokens, hidden, ffn)
    reachable = abs(got - budget) <= TOLERANCE * budget

    # 4. Integer counts can leave the target between two steps of the last knob (PruneVid: every frame's dynamic
    # group has the same size, so the kept count moves in steps of T). Nearby pre-LLM knob values change the group
    # sizes; try a few and keep the nearest result.
    for knob in knobs[:-1][:1]:  # the first pre-LLM knob only: later ones are for targets out of its range
        if reachable:
            break
        base = float(getattr(s, knob))
        for factor in _REFINE:
            v = min(1.0, max(_KNOB_MIN, base * factor))
            cand_pre = _with(s, **{knob: v}).pre_llm(video)
            cand, _ = _solve_last(_with(s, **{knob: v}), last, cand_pre, budget, measure_of, num_layers)
            cand_got = achieved(cand.layer_counts(cand_pre, num_layers), n_in, measure, other_tokens, hidden, ffn)
            if abs(cand_got - budget) < abs(got - budget):
                s, pre, got = cand, cand_pre, cand_got
                reachable = abs(got - budget) <= TOLERANCE * budget
                if reachable:
                    break

    solved = Solved(
        knobs=tuple((k, float(getattr(s, k))) for k in knobs),
        budget=float(budget),
        measure=measure,
        achieved=float(got),
        reachable=reachable,
    )
    if not reachable:
        warnings.warn(
            f"{strategy.name}: budget {measure}={budget:g} is not reachable within ±{TOLERANCE:.0%} on this sample; "
            f"using the nearest achievable value {got:.4f} ({', '.join(f'{k}={v:.4g}' for k, v in solved.knobs)})",
            BudgetWarning,
            stacklevel=2,
        )
    return s, dataclasses.replace(pre, solved=solved), solved


def _solve_by_construction(
    strategy: Strategy, video: VideoTokens, budget: float, measure: str, knobs: tuple[str, ...]
) -> tuple[Strategy, PreLLMOutput, Solved]:
    """A strategy whose ``ratio`` is its ``ratio_measure`` budget by construction: ``ratio = budget``.

    ``achieved`` is that construction's value (the target); the measured counts of the prefill are recorded per sample
    by the harness next to it.
    """
    check_solvable(strategy, measure)
    if knobs != ("ratio",):
        raise ValueError(f"{strategy.name}: a ratio_measure strategy is solved through ratio alone, not {knobs}")
    s = _with(strategy, ratio=float(budget))
    solved = Solved(((("ratio", float(budget)),)), float(budget), measure, achieved=float(budget), reachable=True)
    return s, dataclasses.replace(s.pre_llm(video), solved=solved), solved


@functools.lru_cache(maxsize=1024)
def _solve_planned(
    s: Strategy,
    last: str,
    n_in: int,
    num_layers: int,
    budget: float,
    measure: str,
    other_tokens: int,
    hidden: int,
    ffn: int,
) -> float | None:
    """The last knob solved over ``planned_counts`` (``None``: it does not move the measure)."""

    def plan(v: float) -> float | None:
        counts = _with(s, **{last: v}).planned_counts(n_in, num_layers)
        return None if min(counts) < 1 else achieved(counts, n_in, measure, other_tokens, hidden, ffn)

    return solve_monotone(plan, budget, iters=_ITERS_CHEAP)[0] if _moves(plan) else None


def _solve_pre_knob(
    s: Strategy,
    knob: str,
    last: str,
    pre: PreLLMOutput,
    video: VideoTokens,
    budget: float,
    tokens_in: bool,
    measure_of: Callable[[Sequence[int]], float | None],
    num_layers: int,
) -> tuple[Strategy, PreLLMOutput, bool]:
    """Move one content-dependent pre-LLM knob (re-running ``pre_llm``) when the last knob alone cannot do it.

    The knob moves only when the target lies outside what the last knob can reach on the current pre-LLM output
    (for ``tokens_in``, outside the tolerance of the pre-LLM count itself), to the evaluated value that brings the
    target inside (or nearest to it), closest to the configured one (for ``tokens_in``: nearest the target).
    Pre-LLM knobs are tried in the order the strategy lists them; a knob that brackets the target ends the list
    (the next ones are for targets it cannot span, e.g. PruneVid's τ on a static video).

    Returns:
        The strategy, its pre-LLM output, and whether this knob brackets the target.
    """
    n_in = int(pre.assignment.numel())
    cache: dict[float, PreLLMOutput] = {float(getattr(s, knob)): pre}
    ranges: dict[float, tuple[float | None, float | None]] = {}

    def pre_at(v: float) -> PreLLMOutput:
        if v not in cache:
            cache[v] = _with(s, **{knob: v}).pre_llm(video)
        return cache[v]

    def reach(v: float) -> tuple[float | None, float | None]:
        """Smallest and largest valid value the last knob gives on the pre-LLM output at ``knob = v``."""
        if v not in ranges:
            out = pre_at(v)
            if tokens_in:  # the last knob cannot move the count entering the LLM
                ranges[v] = (out.n / n_in, out.n / n_in)
            else:

                def at(x: float) -> float | None:
                    return measure_of(_with(s, **{last: x}).layer_counts(out, num_layers))

                ranges[v] = (_lowest(at), at(1.0))
        return ranges[v]

    def gap(v: float) -> float:
        """How far the target lies outside what the last knob can reach at ``knob = v`` (0: within tolerance)."""
        low, high = reach(v)
        if high is None:
            return math.inf
        low = high if low is None else low
        return max(0.0, low - budget * (1 + TOLERANCE), budget * (1 - TOLERANCE) - high)

    v0 = float(getattr(s, knob))
    if gap(v0) == 0.0:
        return s, pre, True
    # Bisect on whichever end of the range misses the target, then keep the evaluated knob with the smallest gap.
    # The low end is not always monotone in the knob (PruneVid: a bigger group lets a small α keep a single token),
    # so the gap decides, not the bisection's own answer.
    end = 1 if (reach(v0)[1] or 0.0) < budget else 0
    solve_monotone(lambda v: reach(v)[end], budget, iters=_ITERS_PRE_LLM)
    if tokens_in:
        v = min(cache, key=lambda k: (gap(k), abs(reach(k)[1] - budget), abs(k - v0)))
        seen = [reach(k)[1] for k in cache]
        bracketed = min(seen) <= budget * (1 + TOLERANCE) and max(seen) >= budget * (1 - TOLERANCE)
    else:
        v = min(cache, key=lambda k: (gap(k), abs(k - v0)))
        bracketed = gap(v) == 0.0
    return _with(s, **{knob: v}), pre_at(v), bracketed


def _solve_last(
    s: Strategy,
    last: str,
    pre: PreLLMOutput,
    budget: float,
    measure_of: Callable[[Sequence[int]], float | None],
    num_layers: int,
) -> tuple[Strategy, bool]:
    """Solve the last knob over ``layer_counts`` on a fixed pre-LLM output; unchanged when it has no effect there.

    Returns:
        The strategy and whether the knob moves the measure on this output.
    """

    def on_pre(v: float) -> float | None:
        return measure_of(_with(s, **{last: v}).layer_counts(pre, num_layers))

    if not _moves(on_pre):  # the knob keeps its configured value (e.g. FastV's ratio under tokens_in) if it can
        if on_pre(float(getattr(s, last))) is None and on_pre(1.0) is not None:
            return _with(s, **{last: 1.0}), False
        return s, False
    return _with(s, **{last: solve_monotone(on_pre, budget, iters=_ITERS_CHEAP)[0]}), True


def _solve_pre_only(
    s: Strategy,
    knob: str,
    pre: PreLLMOutput,
    video: VideoTokens,
    budget: float,
    measure_of: Callable[[Sequence[int]], float | None],
    num_layers: int,
) -> tuple[Strategy, PreLLMOutput]:
    """Search a knob that only the pre-LLM stage reads, re-running ``pre_llm`` (a method without a count formula)."""
    cache: dict[float, PreLLMOutput] = {float(getattr(s, knob)): pre}

    def value(v: float) -> float | None:
        if v not in cache:
            cache[v] = _with(s, **{knob: v}).pre_llm(video)
        return measure_of(_with(s, **{knob: v}).layer_counts(cache[v], num_layers))

    if not _moves(value):
        return s, pre
    v, _ = solve_monotone(value, budget, iters=_ITERS_CHEAP)
    return _with(s, **{knob: v}), cache[v]


def _moves(value: Callable[[float], float | None]) -> bool:
    """Whether the knob changes the measure at all (over the range where it is valid)."""
    return _lowest(value) != value(1.0)


def _lowest(value: Callable[[float], float | None], iters: int = _ITERS_CHEAP) -> float | None:
    """The value at the smallest valid knob of a non-decreasing ``value`` (``None`` where invalid)."""
    a, b = _KNOB_MIN, 1.0
    if (got := value(a)) is not None or value(b) is None:
        return got
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if value(mid) is None:
            a = mid
        else:
            b = mid
    return value(b)


@dataclass(frozen=True)
class AtBudget:
    """A strategy run at a target achieved budget: its knobs are solved per sample (see the module docstring).

    Args:
        strategy: the method (a frozen dataclass satisfying :class:`prune.api.Strategy`).
        budget: target fraction in (0, 1].
        measure: one of :data:`MEASURES`.
        num_layers: decoder layers of the LLM.
        hidden: LLM hidden size (``flops`` only).
        ffn: LLM MLP size (``flops`` only).
        separators: separator tokens of the visual span (e.g. LLaVA-OV's newline), counted with the prompt text for
            ``flops``; the prompt's text tokens come with each sample (``VideoTokens.text``).
    """

    strategy: Strategy
    budget: float
    measure: str = "flops"
    num_layers: int = 1
    hidden: int = 0
    ffn: int = 0
    separators: int = 0

    def __post_init__(self) -> None:
        check_ratio(self.budget, "budget")
        check_measure(self.measure)
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")
        if self.measure == "flops" and (self.hidden <= 0 or self.ffn <= 0):
            raise ValueError(
                f"budget_measure=flops needs the LLM's hidden and ffn sizes, got {self.hidden} and {self.ffn}"
            )
        knobs = budget_knobs(self.strategy)
        check_solvable(self.strategy, self.measure)
        probe = _with(self.strategy, **dict.fromkeys(knobs, 0.5))
        if tuple(probe.layer_specs) != tuple(self.strategy.layer_specs):
            raise ValueError(f"{self.strategy.name}: budget knobs {knobs} change layer_specs; they cannot be solved")

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def ratio(self) -> float:
        """The configured (nominal) knob; the solved one is in each sample's ``PreLLMOutput.solved``."""
        return self.strategy.ratio

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return self.strategy.layer_specs

    @property
    def vision_inputs(self) -> frozenset[str]:
        """The wrapped strategy's vision-side fields (VisionZip, FastVID): the adapter fills them for the wrapper."""
        return vision_inputs(self.strategy)

    @property
    def decode_spec(self) -> DecodeSpec | None:
        """The wrapped strategy's decode-time stage (DyCoke), if any."""
        return decode_spec(self.strategy)

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Solve the knobs for this video and run the pre-LLM stage with them."""
        text = 0 if video.text is None else int(video.text.shape[0])
        _, pre, _ = solve(
            self.strategy,
            video,
            self.budget,
            self.measure,
            self.num_layers,
            other_tokens=text + self.separators,
            hidden=self.hidden,
            ffn=self.ffn,
        )
        return pre

    def solved(self, pre: PreLLMOutput) -> Strategy:
        """The wrapped strategy with the knobs solved for the sample of ``pre``."""
        return _with(self.strategy, **dict(pre.solved.knobs)) if pre.solved is not None else self.strategy

    def in_llm(self, step: LayerInput) -> Tensor:
        return self.solved(step.pre).in_llm(step)

    def in_decode(self, step: DecodeInput) -> Tensor | None:
        return self.solved(step.pre).in_decode(step)  # type: ignore[attr-defined]  # only with a decode_spec

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return self.solved(pre).layer_counts(pre, num_layers)
