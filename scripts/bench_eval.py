"""`make bench-eval`: what the input pipeline's prefetch and decode cache do to an eval's wall time (CPU).

    python scripts/bench_eval.py                  # default eval and a 5-cell sweep, 3 pipeline settings each
    python scripts/bench_eval.py --limit 1        # quicker

Three settings of the input pipeline: ``prefetch=0 cache=off`` (every run decodes its video inline, as lmms-eval's
own models do), ``prefetch=2 cache=off`` and ``prefetch=2 cache=on``. Each is run from a fresh results folder, so
nothing is resumed, one after another, in a child process timed as a whole:

1. **the default eval** (probe model × HieraVid 0.3 × probe, paired with ``none``), ``limit`` documents per family;
2. **a 5-cell sweep** as ``make sweep`` runs it (one Hydra multirun process): FastV, HieraVid, PruneVid, pool and
   random at 0.3 on the same documents, each paired with ``none`` (the ``none`` cell is evaluated with the first cell
   and reused, but still timed back-to-back, by the others).

Per run the report gives the process wall time, the model's request loop time per sample run
(``input_pipeline.generate_wall_s``), and per sample, from ``samples.jsonl``: the model's own time (the runs of the
pair, ``loop_s.run``, less the inline decodes they include when prefetch and cache are off), the decode and
preprocess time, and the time the loop waited for the video. Target (issue "scale"): loop time per sample within
15 % of the mean max(model, decode); a 5-cell sweep decodes every video once (``video_sources``). Writes
``results/bench/eval-<device>-<date>.{json,md}`` with the machine and its load average before and after: the machine
may be shared, and a loaded machine slows every setting, the overlapped ones most (their threads share the cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.records import cpu_name  # noqa: E402

SETTINGS = {
    "inline": ["prefetch=0", "cache=off"],
    "prefetch": ["prefetch=2", "cache=off"],
    "prefetch+cache": ["prefetch=2", "cache=on"],
}
SWEEP = "fastv,hieravid,prunevid,pool,random"
TARGET = 1.15  # loop time per sample <= 1.15 x max(model, decode)


def _run(args: list[str], results: Path, data: Path, limit: int, threads: int) -> float:
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "run_eval.py"),
        *args,
        f"results_dir={results}",
        f"benchmark.data_dir={data}",
        f"limit={limit}",
        f"threads={threads}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _cells(results: Path) -> list[Path]:
    return sorted(p.parent for p in (results / "runs").glob("*/*/*/*/record.json"))


def _summary(results: Path, wall_s: float, inline: bool) -> dict:
    """Per-sample model / decode / wait times and the loop time per sample over every cell of ``results``."""
    model, decode, wait, loop_s, n_run, sources = [], [], [], 0.0, 0, {}
    for cell in _cells(results):
        record = json.loads((cell / "record.json").read_text())
        pipe = record["input_pipeline"]
        for k, v in pipe["video_sources"].items():
            sources[k] = sources.get(k, 0) + v
        run_here = sum(pipe["video_sources"].values())
        if not run_here:
            continue  # a none cell rebuilt from its log: its samples ran inside the pruned cell's loop
        loop_s += pipe["generate_wall_s"]
        n_run += run_here
        for line in (cell / "samples.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry.get("failed") or "loop_s" not in entry:
                continue
            t = entry["stats"]["timings_s"]
            dec = t["video_decode"] + t["preprocess"]
            runs = 2 if entry.get("paired") else 1
            model.append(entry["loop_s"]["run"] - (runs * dec if inline else 0.0))
            decode.append(dec)
            wait.append(entry["loop_s"]["wait"])
    bound = [max(m, d) for m, d in zip(model, decode, strict=True)]
    per_sample = loop_s / n_run if n_run else None
    mean_bound = statistics.mean(bound) if bound else None
    return {
        "wall_s": wall_s,
        "samples_run": n_run,
        "loop_s_per_sample": per_sample,
        "model_s_mean": statistics.mean(model) if model else None,
        "decode_s_mean": statistics.mean(decode) if decode else None,
        "wait_s_mean": statistics.mean(wait) if wait else None,
        "max_model_decode_s_mean": mean_bound,
        "loop_over_bound": per_sample / mean_bound if per_sample and mean_bound else None,
        "video_sources": sources,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=2, help="documents per probe family (5 families)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model process")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vidprune-bench-eval-") as tmp:
        data = Path(tmp) / "probe"
        base = ["model=probe_llava_ov", "benchmark=probe", "prune=hieravid", "ratio=0.3"]
        # generates the probe set (not timed below) and fills the OS file cache with the code and the model
        _run([*base, "benchmark.build=true", "paired_baseline=false"], Path(tmp) / "warm", data, 1, 1)
        for name, setting in SETTINGS.items():
            results = Path(tmp) / f"eval-{name}"
            wall = _run([*base, *setting], results, data, args.limit, args.threads)
            rows[f"default eval, {name}"] = _summary(results, wall, inline=name == "inline")
            print(f"[bench-eval] default eval, {name}: {wall:.1f} s", flush=True)
        for name, setting in SETTINGS.items():
            results = Path(tmp) / f"sweep-{name}"
            sweep = ["--multirun", "model=probe_llava_ov", "benchmark=probe", f"prune={SWEEP}", "ratio=0.3"]
            wall = _run([*sweep, *setting], results, data, args.limit, args.threads)
            rows[f"5-cell sweep, {name}"] = _summary(results, wall, inline=name == "inline")
            print(f"[bench-eval] 5-cell sweep, {name}: {wall:.1f} s", flush=True)
    load_after = os.getloadavg()
    date = dt.datetime.now(dt.UTC)
    meta = {
        "date": date.isoformat(timespec="seconds"),
        "machine": f"{cpu_name()} ({os.cpu_count()} cores), host {platform.node()}",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "threads": args.threads,
        "limit_per_family": args.limit,
        "documents": 5 * args.limit,
        "git_sha": sha,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"eval-cpu-{date:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(meta, rows))
    print(f"[bench-eval] {stem}.json, {stem}.md")
    return 0


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _markdown(meta: dict, rows: dict[str, dict]) -> str:
    lines = [
        f"<!-- generated by scripts/bench_eval.py on {meta['date']}; do not edit -->",
        "# Bench: the eval's input pipeline (prefetch, decode cache) on the CPU",
        "",
        f"{meta['machine']}; {meta['threads']} torch thread(s) per process; probe model, {meta['documents']} probe "
        f"documents ({meta['limit_per_family']} per family), each paired with `none`; git {meta['git_sha'][:10]}.",
        f"Load average before {', '.join(f'{x:.1f}' for x in meta['load_average_before'])}, after "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_after'])}: **the machine is shared** with other jobs, so "
        "absolute times are inflated and noisy, and threads that should overlap compete for the same cores.",
        "",
        "| run | process wall s | samples run | loop s / sample | model s | decode s | wait s | max(model, decode) s "
        "| loop / max | video sources |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        sources = ", ".join(f"{k} {v}" for k, v in sorted(r["video_sources"].items()))
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['samples_run']} | {_fmt(r['loop_s_per_sample'])} | "
            f"{_fmt(r['model_s_mean'])} | {_fmt(r['decode_s_mean'])} | {_fmt(r['wait_s_mean'])} | "
            f"{_fmt(r['max_model_decode_s_mean'])} | {_fmt(r['loop_over_bound'], 2)} | {sources} |"
        )
    lines += [
        "",
        "`model s`: the model's own time per sample (both runs of the pair; inline decodes subtracted). `decode s`: "
        "decode + preprocess of one video as measured (a cache hit reports the time measured when it was written, so "
        "TTFTs stay comparable). `wait s`: time the loop waited for the video (inline: 0, the decode is inside the "
        f"runs). Target: `loop / max` <= {TARGET:.2f}; a sweep decodes every video once (video sources).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
