"""`make bench`: time-to-first-token of every pruning method against ``none`` on a backbone's LLM shape.

    python scripts/bench.py                               # CPU default: 4-layer Qwen2 at d=1024, 6,272 visual tokens
    python scripts/bench.py --preset llava_ov --ratios 0.3  # on a GPU: Qwen2-7B, 32 x 196 tokens, bf16, FA2 if present
    python scripts/bench.py --preset pllava --methods prunevid --ratios 0.4   # PruneVid at the paper's PLLaVA setting

The LLM of the backbone's shape is built from its config with random weights (no download); the visual tokens are
synthetic at the backbone's real count and grid, with the temporal redundancy of real video (scenes, a static half
of the locations with small noise), so PruneVid's segmentation and merging and HieraVid's stages have real work to
do. What is timed is the part pruning changes: the pre-LLM stage (``strategy.pre_llm`` plus building the LLM input)
and the LLM prefill with the in-LLM stages, up to the first token's logits. The vision encoder is the same for every
method and is left out. Every method runs once untimed (warm-up), then all methods run ``--repeats`` times
interleaved in one process, each repeat in a rotated order, so drift in clock speed or cache state is shared.

Per method the report gives the median TTFT, the speed-up vs ``none``, the FLOPs ratio (papers' convention, from the
per-layer token counts the run logged), the efficiency = FLOPs ratio / TTFT ratio (1.0 = all the promised speed-up
is realised), the pre-LLM time as % of the unpruned prefill, the pre-LLM FLOPs (FlopCounterMode, matmul-class ops)
and memory: ``torch.cuda.max_memory_allocated`` per run on a GPU, the KV-cache bytes and the process peak RSS on a
CPU. Targets (issue "efficiency") are checked and, where missed, the report names the stage that holds the time.
Writes ``results/bench/<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.records import cpu_name, environment  # noqa: E402
from eval.runner import compose_config, make_strategy  # noqa: E402
from prune.adapters.llm import PrunedLM, StageClock  # noqa: E402
from prune.api import VideoTokens  # noqa: E402
from prune.flops import LLMShape, exact_prefill_flops, prefill_flops  # noqa: E402

# preset -> (LLM shape, frames, grid (h, w), model config whose model_prune specialisations set the layers)
# LLaVA-Video's 11,648 = 64 x 13 x 14: its per-row newline is one more token per row (backbones.md §1.2); here it is
# a visual token of a 13 x 14 grid, which prunes it like the rest (the harness never prunes separators).
PRESETS = {
    "cpu": (LLMShape(4, 1024, 5376, 8, 2, vocab=151936), 32, (14, 14), "tiny_llava_ov"),
    "tiny": (LLMShape(4, 64, 128, 4, 2, vocab=1000), 4, (14, 14), "tiny_llava_ov"),  # tests only
    "llava_ov": (LLMShape(28, 3584, 18944, 28, 4, vocab=152064), 32, (14, 14), "llava_ov"),
    "llava_video": (LLMShape(28, 3584, 18944, 28, 4, vocab=152064), 64, (13, 14), "llava_video"),
    "pllava": (LLMShape(32, 4096, 11008, 32, 32, vocab=32064), 16, (12, 12), "pllava"),
    "st_llm": (LLMShape(32, 4096, 11008, 32, 32, vocab=32000), 64, (1, 32), "st_llm"),
}
TEXT_BEFORE, TEXT_AFTER = 14, 50  # system prompt before the video; question and options after it
TARGET_EFFICIENCY = 1 / 1.2  # TTFT ratio <= 1.2 x FLOPs ratio
TARGET_PRE_LLM_PCT = 2.0  # pre-LLM time <= 2 % of the unpruned prefill
GPU_TARGETS = {("pllava", "prunevid"): 3.0, ("llava_ov", "hieravid"): 2.8}  # speed-up on the LLM + pruning part


def build_llm(shape: LLMShape, device: torch.device, dtype: torch.dtype, attn: str, seed: int):
    """A Qwen2 (GQA) or Llama (MHA) causal LM of ``shape`` with random weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    if shape.kv_heads != shape.heads:
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(rope_theta=1_000_000.0, **common)
    else:
        cls, cfg = LlamaForCausalLM, LlamaConfig(**common)
    cfg._attn_implementation = attn
    default = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def make_video(frames: int, grid: tuple[int, int], dim: int, seed: int, device, dtype) -> torch.Tensor:
    """``[T, P, D]`` synthetic tokens: 4 scenes; per scene half of the locations static (+ 5 % noise), half random."""
    g = torch.Generator().manual_seed(seed)
    p = grid[0] * grid[1]
    x = torch.randn(frames, p, dim, generator=g)
    scenes = torch.linspace(0, 4, frames + 1)[:-1].long().clamp(max=3)  # [T] scene of each frame
    for s in range(4):
        idx = (scenes == s).nonzero()[:, 0]
        static = torch.randn(p // 2, dim, generator=g)
        x[idx, : p // 2] = static + 0.05 * torch.randn(len(idx), p // 2, dim, generator=g)
    return x.to(device, dtype)


def video_tokens(strategy, video: torch.Tensor, grid, text: torch.Tensor) -> VideoTokens:
    """The strategy's input; vision-side fields (VisionZip, FastVID) are synthetic here: there is no vision tower.

    ``frame_global`` is the frame's mean token and the attention maps are seeded uniform noise, so the selection is
    exercised at the real shapes; the tower-side cost of computing the real maps is in the records, not here.
    """
    from prune.api import vision_inputs

    needs = vision_inputs(strategy)
    if not needs:
        return VideoTokens(video, grid, text=text)
    g = torch.Generator().manual_seed(0)
    t, p, _ = video.shape
    fields = {
        "frame_global": video.float().mean(dim=1),
        "frame_head_attn": torch.rand(t, p, generator=g).to(video.device),
        "frame_patch_attn": torch.rand(t, p, generator=g).to(video.device),
        "frame_patch_keys": torch.randn(t, p, 72, generator=g).to(video.device),  # SigLIP so400m head width
    }
    return VideoTokens(video, grid, text=text, **{k: v for k, v in fields.items() if k in needs})


def run_once(llm: PrunedLM, strategy, video: torch.Tensor, grid, text: torch.Tensor) -> dict:
    """One pre-LLM stage + prefill to the first token's logits; seconds per stage, token counts, memory."""
    device = video.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StageClock(device)
    clock.start()
    pre = strategy.pre_llm(video_tokens(strategy, video, grid, text))
    embeds = torch.cat([text[:TEXT_BEFORE], pre.tokens.to(text.dtype), text[TEXT_BEFORE:]])[None]
    ids = torch.arange(pre.n, device=device)
    visual = torch.cat([ids.new_full((TEXT_BEFORE,), -1), ids, ids.new_full((TEXT_AFTER,), -1)])
    clock.mark("pre_llm")
    positions = None
    if pre.positions == "original":  # FastVID: the unpruned position ids, gaps included
        n_in = video.shape[0] * video.shape[1]
        after = torch.arange(TEXT_AFTER, device=device) + TEXT_BEFORE + n_in
        positions = torch.cat([torch.arange(TEXT_BEFORE, device=device), pre.origins() + TEXT_BEFORE, after])
    _, stats, _ = llm.generate(embeds, visual, pre, max_new_tokens=1, clock=clock, positions=positions)
    seconds = clock.seconds()
    return {
        "pre_llm_s": seconds["pre_llm"],
        "prefill_s": seconds["prefill"],
        "ttft_s": seconds["pre_llm"] + seconds["prefill"],
        "tokens_per_layer": stats.tokens_per_layer,
        "visual_pre_llm": pre.n,
        "scoring": stats.scoring,
        "kv_bytes": stats.kv_bytes,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def pre_llm_gflops(strategy, video: torch.Tensor, grid, text: torch.Tensor) -> float:
    """Matmul-class FLOPs of the pre-LLM stage (FlopCounterMode; distance and norm work beyond matmuls is not seen)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = video_tokens(strategy, video, grid, text)
    with FlopCounterMode(display=False) as counter:
        strategy.pre_llm(inputs)
    return counter.get_total_flops() / 1e9


def _device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def summarise(name: str, ratio: float | None, runs: list[dict], base: dict | None, shape: LLMShape) -> dict:
    """Medians of one method's repeats and its ratios against ``none`` (``base``; None for ``none`` itself)."""
    first = runs[0]
    med = {k: statistics.median(r[k] for r in runs) for k in ("pre_llm_s", "prefill_s", "ttft_s")}
    paper = prefill_flops(first["tokens_per_layer"], shape.hidden, shape.ffn)
    exact = exact_prefill_flops(first["tokens_per_layer"], shape, first["scoring"])
    row = {
        "method": name,
        "ratio": ratio,
        "visual_pre_llm": first["visual_pre_llm"],
        "tokens_per_layer": first["tokens_per_layer"],
        "pre_llm_ms": 1000 * med["pre_llm_s"],
        "prefill_ms": 1000 * med["prefill_s"],
        "ttft_ms": 1000 * med["ttft_s"],
        "ttft_ms_all": [1000 * r["ttft_s"] for r in runs],
        "prefill_tflops": paper / 1e12,
        "prefill_exact_tflops": exact / 1e12,
        "kv_bytes": first["kv_bytes"],
        "peak_mem_bytes": max((r["peak_mem_bytes"] for r in runs if r["peak_mem_bytes"] is not None), default=None),
    }
    if base is not None:
        row["speedup"] = base["ttft_ms"] / row["ttft_ms"]
        row["flops_ratio"] = paper / (base["prefill_tflops"] * 1e12)
        row["flops_ratio_exact"] = exact / (base["prefill_exact_tflops"] * 1e12)
        row["efficiency"] = row["flops_ratio"] / (row["ttft_ms"] / base["ttft_ms"])
        row["pre_llm_pct_of_unpruned_prefill"] = 100 * row["pre_llm_ms"] / base["prefill_ms"]
    return row


def check_targets(preset: str, rows: list[dict], device: torch.device) -> list[dict]:
    """The issue's targets for every pruned row; a miss names the stage that holds the time."""
    base = next(r for r in rows if r["method"] == "none")
    checks = []
    for r in rows:
        if r["method"] == "none":
            continue
        tests = []
        if r["method"] in ("fastv", "prunevid", "hieravid", "pdrop") and r["ratio"] == 0.3:
            tests.append(("TTFT ratio <= 1.2 x FLOPs ratio", r["efficiency"] >= TARGET_EFFICIENCY))
        pct = r["pre_llm_pct_of_unpruned_prefill"]
        tests.append((f"pre-LLM <= {TARGET_PRE_LLM_PCT:g} % of unpruned prefill", pct <= TARGET_PRE_LLM_PCT))
        if device.type == "cuda":
            want = GPU_TARGETS.get((preset, r["method"]))
            if want is not None:
                tests.append((f"speed-up >= {want:g}x", r["speedup"] >= want))
            if r["peak_mem_bytes"] is not None and base["peak_mem_bytes"] is not None:
                tests.append(("peak memory <= none's", r["peak_mem_bytes"] <= base["peak_mem_bytes"]))
        for what, ok in tests:
            entry = {"method": r["method"], "ratio": r["ratio"], "target": what, "met": bool(ok)}
            if not ok:
                expected = base["prefill_ms"] * r["flops_ratio"]
                entry["where"] = (
                    f"pre-LLM {r['pre_llm_ms']:.1f} ms ({100 * r['pre_llm_ms'] / r['ttft_ms']:.0f} % of TTFT); LLM "
                    f"prefill {r['prefill_ms']:.1f} ms vs {expected:.1f} ms expected from the FLOPs ratio"
                )
            checks.append(entry)
    return checks


def markdown(meta: dict, rows: list[dict], checks: list[dict]) -> str:
    """The report as a Markdown table plus the target checks."""
    shape = meta["shape"]
    lines = [
        f"<!-- generated by scripts/bench.py on {meta['date']}; do not edit -->",
        f"# Bench: {meta['preset']} on {meta['machine']}",
        "",
        f"LLM {shape['layers']} layers, d={shape['hidden']}, MLP {shape['ffn']}, {shape['heads']}/{shape['kv_heads']} "
        f"query/key-value heads; {meta['visual_tokens']} visual tokens ({meta['frames']} frames x {meta['grid']}), "
        f"{meta['dtype']}, attention {meta['attn']}, {meta['threads']} threads, {meta['repeats']} repeats, "
        f"torch {meta['versions']['torch']}, git {str(meta['git_sha'])[:10]}."
        + (
            f" Load average (1/5/15 min) {'/'.join(map(str, meta['load_avg_1_5_15_start']))} at the start, "
            f"{'/'.join(map(str, meta['load_avg_1_5_15_end']))} at the end."
            if "load_avg_1_5_15_start" in meta
            else ""
        ),
        "",
        "| method | ratio | visual in LLM | TTFT ms (median) | speed-up | FLOPs x | efficiency | pre-LLM ms "
        "| pre-LLM % of prefill | pre-LLM GFLOPs | KV MiB | peak mem MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for r in rows:
        mib = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['method']} | {fmt(r['ratio'], 'g')} | {r['visual_pre_llm']} | {r['ttft_ms']:.1f} "
            f"| {fmt(r.get('speedup'), '.2f')} | {fmt(r.get('flops_ratio'), '.3f')} "
            f"| {fmt(r.get('efficiency'), '.2f')} "
            f"| {r['pre_llm_ms']:.1f} | {fmt(r.get('pre_llm_pct_of_unpruned_prefill'), '.2f')} "
            f"| {fmt(r.get('pre_llm_gflops'), '.2f')} | {r['kv_bytes'] / 2**20:.1f} | {fmt(mib, '.0f')} |"
        )
    if meta.get("process_peak_rss_bytes"):
        lines += ["", f"Process peak RSS over the whole bench: {meta['process_peak_rss_bytes'] / 2**30:.2f} GiB."]
    lines += ["", "| method | ratio | target | met | where the time is |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c['method']} | {c['ratio']:g} | {c['target']} | {'yes' if c['met'] else 'NO'} | {c.get('where', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: llava_ov on CUDA, cpu on CPU")
    ap.add_argument(
        "--methods",
        default="fastv,prunevid,hieravid,pdrop,framefusion,holitom,visionzip,vidcom2,fastvid,dycoke,pool,random",
        help="compared against none",
    )
    ap.add_argument("--ratios", default="0.3", help="comma-separated; each method runs at each ratio")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attn", default=None, help="default: flash_attention_2 when flash-attn is installed, else sdpa")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--tokens-scale", type=float, default=1.0, help="scale the frame count (quick runs only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()  # the machine's load while timing (shared machines): recorded with the results

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("llava_ov" if device.type == "cuda" else "cpu")
    shape, frames, grid, model_name = PRESETS[preset]
    frames = max(1, round(frames * args.tokens_scale))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.attn:
        attn = args.attn
    else:
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2" if device.type == "cuda" else "sdpa"
        except ImportError:
            attn = "sdpa"
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = [m for m in args.methods.split(",") if m and m != "none"]

    print(f"[bench] {preset}: building the {shape.layers}-layer LLM (d={shape.hidden}) on {device} ...", flush=True)
    model = build_llm(shape, device, dtype, attn, args.seed)
    video = make_video(frames, grid, shape.hidden, args.seed, device, dtype)
    text = torch.randn(TEXT_BEFORE + TEXT_AFTER, shape.hidden, generator=torch.Generator().manual_seed(args.seed + 1))
    text = text.to(device, dtype)

    cells = [("none", None)] + [(m, r) for m in methods for r in ratios]
    strategies = {}
    for name, ratio in cells:
        cfg = compose_config([f"model={model_name}", f"prune={name}", f"ratio={ratio if ratio is not None else 1.0}"])
        strategies[(name, ratio)] = make_strategy(cfg)
    runs: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    gflops = {}
    with torch.no_grad():
        for rep in range(-1, args.repeats):  # rep -1: warm-up, untimed
            order = cells[rep % len(cells) :] + cells[: rep % len(cells)] if rep >= 0 else cells
            for cell in order:
                llm = PrunedLM(model.model, model.lm_head, strategies[cell])
                try:
                    result = run_once(llm, strategies[cell], video, grid, text)
                finally:
                    llm.remove()
                if rep >= 0:
                    runs[cell].append(result)
                    print(f"[bench] repeat {rep + 1}/{args.repeats} {cell[0]:9s} {1000 * result['ttft_s']:9.1f} ms")
                else:
                    gflops[cell] = pre_llm_gflops(strategies[cell], video, grid, text)
    base = summarise("none", None, runs[("none", None)], None, shape)
    base["pre_llm_gflops"] = gflops[("none", None)]
    rows = [base]
    for cell in cells[1:]:
        rows.append(summarise(cell[0], cell[1], runs[cell], base, shape) | {"pre_llm_gflops": gflops[cell]})
    checks = check_targets(preset, rows, device)

    env = environment(device.type)
    machine = env["machine"] if device.type == "cuda" else f"{cpu_name()} ({env['threads']} threads)"
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "preset": preset,
        "shape": asdict(shape),
        "frames": frames,
        "grid": list(grid),
        "visual_tokens": frames * grid[0] * grid[1],
        "text_tokens": TEXT_BEFORE + TEXT_AFTER,
        "dtype": str(dtype).removeprefix("torch."),
        "attn": attn,
        "repeats": args.repeats,
        "seed": args.seed,
        "platform": platform.platform(),
        **env,
        "machine": machine,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_avg_1_5_15_start": [round(v, 2) for v in load_start],
        "load_avg_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
    }
    report = markdown(meta, rows, checks)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    # results/bench/<device>-<date>: the CPU default and the GPU default keep the plain name; other presets add theirs
    tag = "" if preset in ("cpu", "llava_ov") else f"-{preset}"
    stem = args.out / f"{_device_slug(device)}{tag}-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report)
    print(f"[bench] wrote {stem.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
