"""CPU (or GPU) time of every strategy's pre-LLM stage at the real token shapes, without a model.

    python scripts/bench_prune.py                 # PLLaVA [16, 144, 4096] and LLaVA-OV [32, 196, 3584], fp32
    python scripts/bench_prune.py --repeats 5 --threads 2 --out results/bench

Inputs are random tokens plus a static background (half the locations constant over time), so PruneVid's
segmentation and static/dynamic split have real work to do. Prints a Markdown table and, with --out, writes
``<out>/prune-<device>-<date>.json`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from eval.records import cpu_name
from prune.api import VideoTokens

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"pllava": (16, 12, 12, 4096, 32), "llava_ov": (32, 14, 14, 3584, 28)}  # T, H, W, D, LLM layers


def make_video(t: int, h: int, w: int, d: int, seed: int, device: str) -> VideoTokens:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h * w, d, generator=g)
    x[:, : h * w // 2] = torch.randn(h * w // 2, d, generator=g)  # static background
    return VideoTokens(x.to(device), (h, w))


def strategy(name: str, ratio: float, layers: int):
    cfg = OmegaConf.create({"ratio": ratio, "prune": OmegaConf.load(ROOT / "configs" / "prune" / f"{name}.yaml")})
    if "num_layers" in cfg.prune:
        cfg.prune.num_layers = layers
    return instantiate(cfg.prune)


def time_pre_llm(s, video: VideoTokens, repeats: int) -> list[float]:
    s.pre_llm(video)  # warm-up
    times = []
    for _ in range(repeats):
        if video.tokens.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        s.pre_llm(video)
        if video.tokens.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="prunevid,hieravid,pool,random,fastv,none")
    ap.add_argument("--shapes", default="pllava,llava_ov")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    rows = []
    for shape in args.shapes.split(","):
        t, h, w, d, layers = SHAPES[shape]
        video = make_video(t, h, w, d, 0, args.device)
        for name in args.methods.split(","):
            s = strategy(name, args.ratio, layers)
            times = time_pre_llm(s, video, args.repeats)
            n_out = s.pre_llm(video).n
            rows.append(
                {
                    "shape": shape,
                    "input": [t, h * w, d],
                    "method": name,
                    "median_ms": 1000 * statistics.median(times),
                    "min_ms": 1000 * min(times),
                    "tokens_in": t * h * w,
                    "tokens_out": n_out,
                }
            )
            print(f"{shape:9s} {name:9s} {rows[-1]['median_ms']:9.1f} ms  {t * h * w} -> {n_out}", flush=True)

    print(f"\n{machine}, {args.threads} threads, torch {torch.__version__}, fp32, ratio {args.ratio}\n")
    print("| shape | input [T, P, D] | method | pre-LLM median ms | tokens in -> out |")
    print("|---|---|---|---|---|")
    for r in rows:
        shape_s = "[" + ", ".join(map(str, r["input"])) + "]"
        counts = f"{r['tokens_in']} -> {r['tokens_out']}"
        print(f"| {r['shape']} | {shape_s} | {r['method']} | {r['median_ms']:.1f} | {counts} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        today = dt.date.today().isoformat()
        path = args.out / f"prune-{args.device}-{today}.json"
        meta = {"machine": machine, "device": args.device, "threads": args.threads, "torch": torch.__version__}
        path.write_text(json.dumps({"meta": meta | {"platform": platform.platform()}, "rows": rows}, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
