"""The Hydra runner: compose model × prune × benchmark, evaluate through lmms-eval, write the record and the tables.

``python scripts/run_eval.py model=llava_ov prune=hieravid ratio=0.3 benchmark=videomme`` (``make eval`` passes its
variables through). One run evaluates one cell, ``results/runs/<model>/<benchmark>/<prune>/<ratio>/``, and, unless
``paired_baseline=false``, first the ``none`` cell of the same model and benchmark on the same samples, so the
table shows Δaccuracy and TTFT speed-up from one setup. Finished samples are never recomputed: both cells resume
from their ``samples.jsonl``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval.config import CONFIGS, REPO, compose_config, make_backbone, make_strategy
from eval.records import SampleLog, build_record, config_hash, environment

__all__ = ["compose_config", "make_backbone", "run", "run_cell"]


def _seed_everything(seed: int, threads: int | None) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))


def _prepare_tasks(cfg: DictConfig) -> tuple[list[str], str | None]:
    """lmms-eval task names (and an include path for local tasks) for ``cfg.benchmark``."""
    from eval.benchmarks import BENCHMARKS, write_local_tasks

    names = list(cfg.benchmark.benchmarks)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    if cfg.benchmark.mode == "online":
        return [t for n in names for t in BENCHMARKS[n].online_tasks], None
    if cfg.benchmark.mode != "offline":
        raise ValueError(f"benchmark.mode must be online or offline, got {cfg.benchmark.mode!r}")
    if not cfg.benchmark.data_dir:
        raise ValueError("benchmark.mode=offline needs benchmark.data_dir: the folder with annotations and videos")
    data_dir = (REPO / cfg.benchmark.data_dir).resolve()
    if names == ["probe"]:
        return _prepare_probe(cfg.benchmark, data_dir)
    if "probe" in names:
        raise ValueError("benchmark.benchmarks: the probe runs on its own (benchmark=probe), not mixed with others")
    if cfg.benchmark.get("build"):  # idempotent: writes only what is missing
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_tiny_bench.py"), "--out", str(data_dir)], check=True
        )
    if not data_dir.is_dir():
        raise FileNotFoundError(f"benchmark.data_dir {data_dir} does not exist")
    # Everything offline: local JSON annotations, videos under data_dir, no hub look-ups.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    include, tasks = write_local_tasks(data_dir, names)
    return tasks, str(include)


def _prepare_probe(bench: DictConfig, data_dir: Path) -> tuple[list[str], str]:
    """Generate (or reuse) the probe set of ``benchmark.seed`` under ``data_dir/seed<seed>`` and its tasks."""
    from eval.probe import write_probe

    if not isinstance(bench.seed, int) or isinstance(bench.seed, bool):
        raise ValueError(f"benchmark.seed must be an int (the probe generator's seed), got {bench.seed!r}")
    folder = data_dir / f"seed{bench.seed}_t{bench.num_frames}_n{bench.per_family}"
    if not bench.get("build") and not folder.is_dir():
        raise FileNotFoundError(f"probe set {folder} does not exist; run with benchmark.build=true to generate it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    include, tasks = write_probe(
        folder,
        seed=int(bench.seed),
        per_family=int(bench.per_family),
        families=list(bench.families),
        num_frames=int(bench.num_frames),
        size=int(bench.size),
        grid=int(bench.grid),
    )
    return tasks, str(include)


def _cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide a sample's answer; their hash keys resume."""
    prune = OmegaConf.to_container(cfg.prune, resolve=True)
    if prune.get("_target_") == "prune.strategies.none.NoPruning":
        prune.pop("ratio", None)  # none ignores it: the paired baseline of every ratio is one cell, computed once
    cell = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "prune": prune,
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens,
    }
    if list(cfg.benchmark.benchmarks) == ["probe"]:  # generated documents: the generator settings decide them
        cell["probe"] = {k: cfg.benchmark[k] for k in ("seed", "num_frames", "size", "grid")}
    return cell


def run_cell(cfg: DictConfig, tasks: list[str], include_path: str | None, baseline: dict | None = None) -> dict:
    """Evaluate one cell and write its record; return the record."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    from eval.backbones import flops_of
    from eval.benchmarks import PROCESS_DOCS_PARALLEL, parse_ok, sample_score, task_metric
    from eval.lmms_model import VidPruneLMM

    _seed_everything(int(cfg.seed), cfg.threads)
    backbone = make_backbone(cfg)
    strategy_name = backbone.adapter.strategy.name
    ratio_dir = "1.0" if strategy_name == "none" else f"{float(cfg.ratio):g}"
    run_dir = REPO / cfg.results_dir / "runs" / cfg.model.name / cfg.benchmark.name / strategy_name / ratio_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment("cuda" if _cuda(cfg.device) else "cpu")
    cell = _cell_config(cfg)
    log = SampleLog(run_dir / "samples.jsonl", config_hash(cell))
    print(f"[vidprune] {cfg.model.name} × {strategy_name} (ratio {ratio_dir}) × {cfg.benchmark.name} -> {run_dir}")
    print(f"[vidprune] {len(log.done)} finished samples found in {log.path.name}; they are not recomputed")
    lmm = VidPruneLMM(backbone=backbone, sample_log=log, max_new_tokens=cfg.max_new_tokens)
    tracker = EvaluationTracker(output_path=str(run_dir / "lmms_eval"))
    start = time.time()
    results = simple_evaluate(
        model=lmm,
        tasks=tasks,
        task_manager=TaskManager(include_path=include_path, model_name="vidprune"),
        limit=cfg.limit,
        log_samples=True,
        bootstrap_iters=0,
        evaluation_tracker=tracker,
        random_seed=int(cfg.seed),
        numpy_random_seed=int(cfg.seed),
        torch_random_seed=int(cfg.seed),
        # 1: EgoSchema/NExT-QA fall back to random.choice; scoring on threads would make that irreproducible
        process_docs_parallel=PROCESS_DOCS_PARALLEL,
    )
    samples_by_task = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples_by_task, datetime_str=results["date"])
    for task, task_samples in samples_by_task.items():
        tracker.save_results_samples(task_name=task, samples=task_samples)

    scored, flops = [], []
    for task, task_samples in samples_by_task.items():
        metric = task_metric(task)[0]
        split = next(iter(lmm.task_dict[task]))
        for s in task_samples:
            entry = log.get(task, s["doc_id"])
            if entry is None:
                raise RuntimeError(f"lmms-eval scored {task}/{s['doc_id']}, which the model never answered")
            failed = bool(entry["failed"])
            doc = lmm.task_dict[task][split][s["doc_id"]]
            parsed = not failed and bool(parse_ok(task, entry["prediction"], doc))
            # Correct only when the answer parsed: EgoSchema and NExT-QA score a random letter for unparsable output,
            # and a failed sample counts as wrong (MVBench's own aggregation drops it from the denominator).
            correct = parsed and (sample_score(task, s[metric]) or 0.0) == 1.0
            row = {
                "task": task,
                "doc_id": s["doc_id"],
                "prediction": entry["prediction"],
                "failed": failed,
                "error": entry.get("error"),
                "score": 1.0 if correct else 0.0,
                "parse_ok": parsed,
                "stats": entry.get("stats"),
            }
            scored.append(row)
            if not failed:
                flops.append(flops_of(entry["stats"], backbone.llm_shape))
    with (run_dir / "scores.jsonl").open("w") as f:
        for row in scored:
            f.write(json.dumps({k: v for k, v in row.items() if k != "stats"}) + "\n")
    meta = {
        "model": cfg.model.name,
        "prune": strategy_name,
        "ratio": float(ratio_dir),
        "benchmark": cfg.benchmark.name,
        "tasks": tasks,
        "seed": int(cfg.seed),
        "limit": cfg.limit,
        "config_hash": log.hash,
        "config": OmegaConf.to_container(cfg, resolve=True),
        **env,
        "wall_s": time.time() - start,
        "lmms_eval_results": {k: v for k, v in results.get("results", {}).items()},
    }
    record = build_record(meta=meta, samples=scored, llm_shape=backbone.llm_shape, flops=flops)
    if baseline is not None:
        record["baseline"] = {
            "record": str(Path(baseline["_path"]).relative_to(REPO / cfg.results_dir)),
            "delta_accuracy": _sub(record["accuracy"], baseline["accuracy"]),
            "ttft_speedup": _div(baseline["ttft_ms_median"], record["ttft_ms_median"]),
        }
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    path = run_dir / "record.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)  # atomic: a finished record is never half-written
    print(
        f"[vidprune] {record['n_samples']} samples ({record['n_failed']} failed, {record['n_parse_failed']} "
        f"unparsed): accuracy {record['accuracy']:.1f}, FLOPs ×{record['flops_ratio'] or float('nan'):.3f}, "
        f"TTFT {record['ttft_ms_median'] or float('nan'):.0f} ms -> {path}"
    )
    _maybe_wandb(cfg, record, run_dir)
    del backbone, lmm
    return {**record, "_path": str(path)}


def _sub(a, b):
    return None if a is None or b is None else a - b


def _div(a, b):
    return None if a is None or not b else a / b


def _cuda(device: str) -> bool:
    import torch

    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _maybe_wandb(cfg: DictConfig, record: dict, run_dir: Path) -> None:
    if cfg.logger == "none":
        return
    if cfg.logger != "wandb":
        raise ValueError(f"logger must be none or wandb, got {cfg.logger!r}")
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")  # no login needed; `wandb sync` uploads later
    scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    name = f"{record['model']}-{record['benchmark']}-{record['prune']}-{record['ratio']:g}"
    with wandb.init(project="vidprune", name=name, dir=str(run_dir), mode=mode, config=record["config"]) as wb:
        wb.log(scalars)


def run(cfg: DictConfig) -> dict:
    """Evaluate ``cfg`` (and its paired ``none`` baseline), then rebuild ``results/tables``."""
    from eval.tables import write_tables

    tasks, include_path = _prepare_tasks(cfg)
    baseline = None
    strategy_name = make_strategy(cfg).name
    if cfg.paired_baseline and strategy_name != "none":
        base_cfg = copy.deepcopy(cfg)
        OmegaConf.set_struct(base_cfg, False)
        base_cfg.prune = OmegaConf.load(CONFIGS / "prune" / "none.yaml")
        baseline = run_cell(base_cfg, tasks, include_path)
    record = run_cell(cfg, tasks, include_path, baseline)
    tables = write_tables(REPO / cfg.results_dir)
    print(f"[vidprune] tables: {', '.join(str(p) for p in tables)}")
    return record
