"""FLOPs accounting for the LLM part of a video LLM, from the visual-token count at every decoder layer.

Convention (FastV, arXiv 2403.06764 §4; reused by PruneVid, HoliTom and the other video-pruning papers): one decoder
layer over ``n`` tokens with hidden size ``d`` and MLP size ``m`` costs

    F(n) = 4·n·d² + 2·n²·d + 2·n·d·m

(the Q/K/V/O projections, the two attention matmuls and a two-matrix MLP). A SwiGLU MLP really costs 3·n·d·m; the
papers keep 2·n·d·m and so do we, so ratios compare with their tables. Decode follows HoliTom's published formula
(cokeshao/HoliTom#2): each of R new tokens costs 4d² + 2dm per layer for the projections and MLP plus 2·d·(c + i) for
attention over the ``c`` cached tokens and the ``i`` already generated ones.

That convention counts multiply-accumulates of an MHA layer with a two-matrix MLP; it is what ``flops_ratio`` and
the tables use. :func:`exact_prefill_flops` and :func:`exact_decode_flops` count what the hardware executes, two FLOPs
per multiply-accumulate as ``torch.utils.flop_counter.FlopCounterMode`` does: GQA key/value projections, the SwiGLU
MLP's three matrices, both attention matmuls over the full ``n x n`` matrix (what an eager matmul computes; causal
kernels skip about half), the scoring rows a pruning method adds (:func:`scoring_flops`) and the LM head on the
tokens whose logits are read. Elementwise work (norms, RoPE, softmax) is left out by both.

Worked checks (tests/prune/test_flops.py): LLaVA-OV-7B (Qwen2-7B, 28 layers, d=3584, m=18944) over 6,272 tokens is
40.8 TFLOPs, HoliTom's "vanilla"; FastV with K=2 keeping 30 % of PLLaVA's 2,304 tokens on Vicuna-7B is 0.33×.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LLMShape",
    "SHAPES",
    "decode_flops",
    "exact_decode_flops",
    "exact_decode_flops_from_keys",
    "exact_layer_flops",
    "exact_prefill_flops",
    "flops_ratio",
    "layer_flops",
    "prefill_flops",
    "scoring_flops",
    "tokens_per_layer",
]


@dataclass(frozen=True)
class LLMShape:
    """Decoder dimensions needed for FLOPs.

    ``head_dim`` defaults to ``hidden // heads``; ``vocab`` (LM head) is used by the exact counts only.
    """

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int | None = None
    vocab: int = 0

    @property
    def hd(self) -> int:
        """Head dimension."""
        return self.head_dim or self.hidden // self.heads


# Published configs of the LLMs inside the four backbones.
SHAPES: dict[str, LLMShape] = {
    # LLaVA-OneVision, LLaVA-Video
    "qwen2-7b": LLMShape(layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064),
    # PLLaVA (LLaVA-1.6 vocabulary 32064), ST-LLM (Vicuna v1.1, 32000)
    "vicuna-7b": LLMShape(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32064),
}


def layer_flops(n: int, hidden: int, ffn: int) -> float:
    """FLOPs of one decoder layer over ``n`` tokens: 4·n·d² + 2·n²·d + 2·n·d·m."""
    if n < 0 or hidden <= 0 or ffn <= 0:
        raise ValueError(f"need n >= 0 and hidden, ffn > 0; got n={n}, hidden={hidden}, ffn={ffn}")
    n, d, m = float(n), float(hidden), float(ffn)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[int], hidden: int, ffn: int) -> float:
    """Prefill FLOPs: Σ over layers of F(n_l).

    Args:
        tokens_per_layer: the whole sequence length (text + visual) each decoder layer processes.
        hidden: hidden size d.
        ffn: MLP intermediate size m.
    """
    if len(tokens_per_layer) == 0:
        raise ValueError("tokens_per_layer is empty; give one token count per decoder layer")
    return sum(layer_flops(int(n), hidden, ffn) for n in tokens_per_layer)


def decode_flops(kv_per_layer: Sequence[int], hidden: int, ffn: int, new_tokens: int) -> float:
    """FLOPs of decoding ``new_tokens`` tokens over a cache of ``kv_per_layer[l]`` entries in layer ``l``.

    Σ_l [ R·(4d² + 2dm) + 2·d·Σ_{i=1..R} (c_l + i) ], which is HoliTom's ``R·((4d²+2dm) + 2(d·c + d(R+1)/2))``.
    """
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    r, d, m = float(new_tokens), float(hidden), float(ffn)
    return sum(r * (4 * d * d + 2 * d * m) + 2 * d * (r * float(c) + r * (r + 1) / 2) for c in kv_per_layer)


def flops_ratio(pruned: float, full: float) -> float:
    """``pruned / full``, the "FLOPs (×)" column of the papers' tables."""
    if full <= 0:
        raise ValueError(f"full FLOPs must be > 0, got {full}")
    return pruned / full


def tokens_per_layer(visual_per_layer: Sequence[int], text_tokens: int) -> list[int]:
    """Whole sequence length per layer: the visual count plus the text tokens, which are never pruned."""
    return [int(v) + int(text_tokens) for v in visual_per_layer]


# -- exact counts (2 FLOPs per multiply-accumulate, as FlopCounterMode) ------------------------------------------------


def exact_layer_flops(n: int, shape: LLMShape, keys: int | None = None) -> float:
    """Executed FLOPs of one decoder layer over ``n`` query tokens attending to ``keys`` tokens (default ``n``).

    ``2·n·d·(q + 2·kv) + 2·n·q·d`` (Q, K, V, O with GQA) ``+ 4·n·keys·q`` (QKᵀ and AV, full matrix)
    ``+ 6·n·d·m`` (SwiGLU gate, up, down), with ``q = heads·head_dim`` and ``kv = kv_heads·head_dim``.
    """
    keys = n if keys is None else keys
    if n < 0 or keys < 0:
        raise ValueError(f"need n >= 0 and keys >= 0, got n={n}, keys={keys}")
    d, m = float(shape.hidden), float(shape.ffn)
    q, kv = float(shape.heads * shape.hd), float(shape.kv_heads * shape.hd)
    n_, k_ = float(n), float(keys)
    return 2 * n_ * d * (q + 2 * kv) + 2 * n_ * q * d + 4 * n_ * k_ * q + 6 * n_ * d * m


def scoring_flops(rows: int, keys: int, shape: LLMShape, reproject: bool) -> float:
    """Extra FLOPs of a scoring layer: QKᵀ of ``rows`` query rows over ``keys`` keys in every head.

    With ``reproject`` (pre-RoPE scores, PruneVid) the rows' queries and all keys are projected again:
    ``2·rows·d·q + 2·keys·d·kv``.
    """
    q, kv, d = float(shape.heads * shape.hd), float(shape.kv_heads * shape.hd), float(shape.hidden)
    extra = 2 * float(rows) * float(keys) * q
    if reproject:
        extra += 2 * float(rows) * d * q + 2 * float(keys) * d * kv
    return extra


def exact_prefill_flops(
    tokens_per_layer: Sequence[int],
    shape: LLMShape,
    scoring: Sequence[tuple[int, int, bool]] = (),
    logits_rows: int = 1,
) -> float:
    """Executed prefill FLOPs: every layer over its tokens, the scoring rows, and the LM head on ``logits_rows``.

    Args:
        tokens_per_layer: sequence length each decoder layer processes (prefill attends within the layer's tokens).
        shape: the LLM.
        scoring: ``(rows, keys, reproject)`` per scoring stage (:class:`prune.adapters.llm.PrefillStats.scoring`).
        logits_rows: positions whose logits are computed (1: the first generated token).
    """
    if len(tokens_per_layer) == 0:
        raise ValueError("tokens_per_layer is empty; give one token count per decoder layer")
    total = sum(exact_layer_flops(int(n), shape) for n in tokens_per_layer)
    total += sum(scoring_flops(r, k, shape, bool(re)) for r, k, re in scoring)
    return total + 2.0 * logits_rows * shape.hidden * shape.vocab


def exact_decode_flops(kv_per_layer: Sequence[int], shape: LLMShape, new_tokens: int) -> float:
    """Executed FLOPs of decode steps after a prefill that left ``kv_per_layer[l]`` cache entries in layer ``l``.

    The first generated token comes from the prefill, so ``new_tokens - 1`` decode steps run; step ``i`` (1-based)
    attends to ``c_l + i`` keys and computes one row of logits.
    """
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    steps = max(new_tokens - 1, 0)
    total = 0.0
    for i in range(1, steps + 1):
        total += sum(exact_layer_flops(1, shape, keys=int(c) + i) for c in kv_per_layer)
    return total + 2.0 * steps * shape.hidden * shape.vocab


def exact_decode_flops_from_keys(
    keys_per_step: Sequence[Sequence[int]], shape: LLMShape, scoring_keys: Sequence[int] = ()
) -> float:
    """Executed FLOPs of decode steps whose layers attended a known number of keys (a decode-time stage).

    Args:
        keys_per_step: per decode step, the keys each layer attended (DyCoke's pruned layers attend fewer).
        shape: the LLM.
        scoring_keys: per decode step, the keys of the one extra scoring row (``QK^T`` of one query in every head).
    """
    total = 0.0
    for keys in keys_per_step:
        total += sum(exact_layer_flops(1, shape, keys=int(k)) for k in keys) + 2.0 * shape.hidden * shape.vocab
    q = float(shape.heads * shape.hd)
    return total + sum(2.0 * float(k) * q for k in scoring_keys)
