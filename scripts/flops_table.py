"""Prefill FLOPs of PLLaVA-7B and ST-LLM-7B under the pruning schedules of PruneVid's Table 1, as a Markdown table.

``python scripts/flops_table.py [--text-tokens 50]`` prints the table that ``docs/backbones.md`` shows. FLOPs use the
papers' convention (:func:`prune.flops.prefill_flops`: ``4nd² + 2n²d + 2ndm`` per layer) on the Vicuna-7B shape
(``SHAPES["vicuna-7b"]``: 32 layers, d 4096, m 11008), ``text`` tokens that are never pruned plus the visual tokens
each layer sees; the ratio is against all 32 layers on the unpruned sequence.

Schedules (``shared/reference/prunevid.md`` §6):

- FastV: K = 2 layers on every visual token, then 30 % of them.
- PruneVid on PLLaVA: 11 layers (0..K with K = 10) on the stage-1 tokens, about 40.5 % of 2,304, then 21 layers at the
  published final 16.2 %. The 40.5 % is inferred from the paper's 16.2 % at α = 0.4 (16.2 / 0.4), not published.
- PruneVid on ST-LLM: its settings were never released; the same K and stage-1 share are assumed, with the published
  final 15.1 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune.flops import SHAPES, flops_ratio, prefill_flops  # noqa: E402

TEXT_TOKENS = 50  # prompt text around the video (prunevid.md §6 checks its formula with ≈ 50)
PRUNEVID_K = 10  # scoring layer of the official PLLaVA eval; layers 0..K run on the stage-1 tokens
PRUNEVID_STAGE1 = 0.405  # inferred stage-1 share (prunevid.md §2.7)

# backbone -> (visual tokens, {method: (retained %, FLOPs ×)} of PruneVid Table 1)
BACKBONES: dict[str, tuple[int, dict[str, tuple[float, float]]]] = {
    "PLLaVA-7B": (2304, {"none": (100.0, 1.00), "FastV": (30.0, 0.33), "PruneVid": (16.2, 0.23)}),
    "ST-LLM-7B": (2048, {"none": (100.0, 1.00), "FastV": (30.0, 0.37), "PruneVid": (15.1, 0.26)}),
}


def schedules(visual: int, final_pct: float) -> dict[str, tuple[str, list[int]]]:
    """Visual tokens per decoder layer for each method, with a short description of the schedule.

    Args:
        visual: visual tokens of the unpruned video.
        final_pct: PruneVid's published final retention for this backbone, in percent.
    """
    layers = SHAPES["vicuna-7b"].layers
    fastv = round(0.30 * visual)
    stage1, final = round(PRUNEVID_STAGE1 * visual), round(final_pct / 100 * visual)
    full = PRUNEVID_K + 1
    return {
        "none": (f"{layers} × {visual}", [visual] * layers),
        "FastV": (f"2 × {visual}, {layers - 2} × {fastv} (30 %)", [visual] * 2 + [fastv] * (layers - 2)),
        "PruneVid": (
            f"{full} × {stage1} (40.5 %), {layers - full} × {final} ({final_pct} %)",
            [stage1] * full + [final] * (layers - full),
        ),
    }


def rows(text_tokens: int = TEXT_TOKENS) -> list[dict[str, object]]:
    """One row per backbone and method: schedule, computed FLOPs ratio, and Table 1's published numbers."""
    shape = SHAPES["vicuna-7b"]
    out = []
    for backbone, (visual, published) in BACKBONES.items():
        full = prefill_flops([visual + text_tokens] * shape.layers, shape.hidden, shape.ffn)
        for method, (schedule, per_layer) in schedules(visual, published["PruneVid"][0]).items():
            flops = prefill_flops([v + text_tokens for v in per_layer], shape.hidden, shape.ffn)
            out.append(
                {
                    "backbone": backbone,
                    "method": method,
                    "schedule": schedule,
                    "tflops": flops / 1e12,
                    "ratio": flops_ratio(flops, full),
                    "published_retained": published[method][0],
                    "published_ratio": published[method][1],
                }
            )
    return out


def markdown(table: list[dict[str, object]], text_tokens: int = TEXT_TOKENS) -> str:
    """The rows as a Markdown table."""
    lines = [
        f"| backbone | method | visual tokens per layer (+ {text_tokens} text) | prefill TFLOPs | FLOPs × "
        "| Table 1 retained | Table 1 FLOPs × |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['schedule']} | {r['tflops']:.1f} | {r['ratio']:.3f} "
            f"| {r['published_retained']:.1f} % | {r['published_ratio']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="unpruned prompt text tokens")
    args = ap.parse_args(argv)
    print(markdown(rows(args.text_tokens), args.text_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
