"""Draw which visual tokens a strategy keeps on one video: frames, pre-LLM survivors, survivors after each layer.

    python scripts/viz.py [--doc 0] [--bench mvbench] [--out PATH] [key=value ...]
    make viz ARGS="ratio=0.3 prune=hieravid"

Defaults: model=tiny_llava_ov prune=prunevid benchmark=tiny, document 0 of the tiny bundle (built if missing). Any
Hydra override of `configs/eval.yaml` passes through (`ratio=0.3`, `model=tiny_llava_video`, `prune.layer=2`).
`--video PATH [--question TEXT]` draws any video instead of a benchmark document. Writes
`results/viz/<model>-<prune>-<ratio>.png` unless `--out` says otherwise, and prints the path and per-stage counts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

DEFAULTS = {"model": "tiny_llava_ov", "prune": "prunevid", "benchmark": "tiny"}


def _overrides(extra: list[str]) -> list[str]:
    """The defaults, replaced by any user override of the same key (Hydra rejects a key given twice)."""
    for item in extra:
        if "=" not in item:
            raise SystemExit(f"viz.py: overrides are key=value, got {item!r}")
    keys = {item.split("=", 1)[0].lstrip("+~") for item in extra}
    return [f"{k}={v}" for k, v in DEFAULTS.items() if k not in keys] + extra


def _document(cfg, args):
    """(video, question, label) of the sample to draw."""
    from eval.viz import benchmark_doc

    if args.video:
        return Path(args.video), args.question or "Describe the video.", Path(args.video).name
    bench = cfg.benchmark
    if bench.mode != "offline" or not bench.data_dir:
        raise SystemExit(
            f"viz.py: benchmark={bench.name} reads its videos online (lmms-eval's hub cache); pass --video PATH "
            "[--question TEXT], or use an offline benchmark (benchmark=tiny, or benchmark.mode=offline "
            "benchmark.data_dir=...)"
        )
    data_dir = (ROOT / bench.data_dir).resolve()
    if bench.get("build"):  # as eval.runner._prepare_tasks: idempotent, writes only what is missing
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_bench.py"), "--out", str(data_dir)], check=True
        )
    name = args.bench or bench.benchmarks[0]
    if name not in bench.benchmarks:
        raise SystemExit(f"viz.py: --bench {name} is not in benchmark={bench.name}: {list(bench.benchmarks)}")
    doc = benchmark_doc(data_dir, name, args.doc)
    return doc.video, doc.question, doc.label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=int, default=0, help="document number in the benchmark (default 0)")
    parser.add_argument("--bench", help="which benchmark of the config's bundle (default: its first)")
    parser.add_argument("--video", help="draw this video instead of a benchmark document")
    parser.add_argument("--question", help="prompt for --video (default: 'Describe the video.')")
    parser.add_argument("--out", type=Path, help="PNG to write (default results/viz/<model>-<prune>-<ratio>.png)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames shown (an even subsample)")
    parser.add_argument("--max-new-tokens", type=int, default=1, help="tokens to generate (the picture needs 1)")
    parser.add_argument("--svg", action="store_true", help="also write an SVG")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    args = parser.parse_args(argv)

    import torch

    from eval.runner import compose_config, make_backbone
    from eval.viz import GROUPS, draw_selection, selection_masks

    cfg = compose_config(_overrides(args.overrides))
    torch.manual_seed(int(cfg.seed))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    video, question, label = _document(cfg, args)
    start = time.perf_counter()
    backbone = make_backbone(cfg)
    strategy = backbone.adapter.strategy
    sample = backbone.prepare(str(video), question)
    gen = backbone.adapter.generate(
        sample.input_ids,
        sample.pixels,
        max_new_tokens=args.max_new_tokens,
        eos_token_ids=backbone.tokenizer.eos_token_ids,
        **sample.inputs,
    )
    if gen.pre is None:
        raise SystemExit(f"viz.py: the {backbone.name} adapter returned no pre-LLM output to draw")
    layers = [spec.layer for spec in strategy.layer_specs]
    grid = tuple(backbone.adapter.grid)
    masks = selection_masks(gen.pre, gen.llm.kept, backbone.num_frames, grid, layers)
    ratio = "1.0" if strategy.name == "none" else f"{float(cfg.ratio):g}"
    out = args.out or ROOT / "results" / "viz" / f"{cfg.model.name}-{strategy.name}-{ratio}.png"
    title = f"{cfg.model.name} · {strategy.name} (ratio {ratio}) · {label}"
    paths = draw_selection(sample.frames, masks, grid, out, max_frames=args.max_frames, title=title, svg=args.svg)
    total = gen.visual_in
    groups = masks[GROUPS]
    print(f"[viz] {label}: {video} ({sample.frames_in_video} frames, {backbone.num_frames} sampled, grid {grid})")
    for name, mask in masks.items():
        if name == GROUPS:
            continue
        tokens = int(groups[mask].unique().numel())
        print(f"[viz] {name}: {tokens} tokens from {int(mask.sum())} of {total} cells ({100 * tokens / total:.1f} %)")
    print(f"[viz] {time.perf_counter() - start:.1f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
