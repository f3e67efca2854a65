"""FLOPs accounting for the LLM part of a video LLM, from the visual-token count at every decoder layer.

Convention (FastV, arXiv 2403.06764 §4; reused by PruneVid, HoliTom and the other video-pruning papers): one decoder
layer over ``n`` tokens with hidden size ``d`` and MLP size ``m`` costs

    F(n) = 4·n·d² + 2·n²·d + 2·n·d·m

(the Q/K/V/O projections, the two attention matmuls and a two-matrix MLP). A SwiGLU MLP really costs 3·n·d·m; the
papers keep 2·n·d·m and so do we, so ratios compare with their tables. Decode follows HoliTom's published formula
(cokeshao/HoliTom#2): each of R new tokens costs 4d² + 2dm per layer for the projections and MLP plus 2·d·(c + i) for
attention over the ``c`` cached tokens and the ``i`` already generated ones.

Worked checks (tests/prune/test_flops.py): LLaVA-OV-7B (Qwen2-7B, 28 layers, d=3584, m=18944) over 6,272 tokens is
40.8 TFLOPs, HoliTom's "vanilla"; FastV with K=2 keeping 30 % of PLLaVA's 2,304 tokens on Vicuna-7B is 0.33×.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LLMShape", "SHAPES", "decode_flops", "flops_ratio", "layer_flops", "prefill_flops", "tokens_per_layer"]


@dataclass(frozen=True)
class LLMShape:
    """Decoder dimensions needed for FLOPs. ``heads``/``kv_heads`` are recorded for the benchmarks."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int


# Published configs of the LLMs inside the four backbones.
SHAPES: dict[str, LLMShape] = {
    "qwen2-7b": LLMShape(layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4),  # LLaVA-OneVision, LLaVA-Video
    "vicuna-7b": LLMShape(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32),  # PLLaVA, ST-LLM
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
