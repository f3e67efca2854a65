"""The Hydra runner: compose model × prune × benchmark, evaluate through lmms-eval, write the record and the tables.

``python scripts/run_eval.py model=llava_ov prune=hieravid ratio=0.3 benchmark=videomme`` (``make eval`` passes its
variables through). One run evaluates one cell, ``results/runs/<model>/<benchmark>/<prune>/<ratio>/``, and, unless
``paired_baseline=false``, first the ``none`` cell of the same model and benchmark on the same samples, so the
table shows Δaccuracy and TTFT speed-up from one setup. Finished samples are never recomputed: both cells resume
from their ``samples.jsonl``. ``nproc=N`` runs the cell on N ranks (:mod:`eval.distributed`): each rank answers its
shard of the documents, rank 0 holds the cells' locks and writes the records. Answers do not depend on the shard: no
strategy keeps random state across samples (those that draw seed a private generator per call).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval import distributed
from eval.config import CONFIGS, REPO, budget_of, compose_config, make_backbone, make_paired_backbones, make_strategy
from eval.keys import stable_hash, timing_env
from eval.options import OptionError, switch, validate
from eval.records import (
    CellLocked,
    SampleLog,
    StorageError,
    build_record,
    cell_dir,
    cell_lock,
    config_hash,
    environment,
    knob_folder,
    storage_error,
    write_atomic,
)

__all__ = ["budget_of", "compose_config", "make_backbone", "make_paired_backbones", "run", "run_cell", "run_paired"]


def _seed_everything(seed: int, threads: int | None) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))


def _results_root(cfg: DictConfig) -> Path:
    return Path(os.path.abspath(REPO / Path(str(cfg.results_dir)).expanduser()))


def _data_dir(cfg: DictConfig) -> Path | None:
    if cfg.benchmark.mode != "offline":
        return None
    return (REPO / Path(str(cfg.benchmark.data_dir)).expanduser()).resolve()


def _prepare_tasks(cfg: DictConfig) -> tuple[list[str], str | None]:
    """lmms-eval task names (and an include path for local tasks) for ``cfg.benchmark``.

    Offline, the generated task files go to ``<results_dir>/.cache/lmms_tasks/<data_dir hash>/``, never into the
    (possibly read-only) data folder; bad annotation rows become recorded per-sample failures (``eval.benchmarks``).
    """
    from eval.benchmarks import BENCHMARKS, write_local_tasks
    from eval.keys import stable_hash

    names = list(cfg.benchmark.benchmarks)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise OptionError(f"option benchmark.benchmarks={unknown}: expected names among {sorted(BENCHMARKS)}")
    if cfg.benchmark.mode == "online":
        return [t for n in names for t in BENCHMARKS[n].online_tasks], None
    if cfg.benchmark.mode != "offline":
        raise OptionError(f"option benchmark.mode={cfg.benchmark.mode!r}: expected one of online, offline")
    if not cfg.benchmark.data_dir:
        raise OptionError("option benchmark.data_dir=None: mode=offline needs the folder with annotations and videos")
    data_dir = _data_dir(cfg)
    if names == ["probe"]:
        return _prepare_probe(cfg.benchmark, data_dir)
    if "probe" in names:
        raise OptionError(
            f"option benchmark.benchmarks={names}: the probe runs on its own (benchmark=probe), not mixed with others"
        )
    if cfg.benchmark.get("build"):  # idempotent: writes only what is missing
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_tiny_bench.py"), "--out", str(data_dir)], check=True
        )
    if not data_dir.is_dir():
        raise FileNotFoundError(f"benchmark.data_dir {data_dir} does not exist")
    # Everything offline: local JSON annotations, videos under data_dir, no hub look-ups.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = _results_root(cfg) / ".cache" / "lmms_tasks" / stable_hash(str(data_dir), 12)
    include, tasks = write_local_tasks(data_dir, names, out_dir=out)
    return tasks, str(include)


def _prepare_probe(bench: DictConfig, data_dir: Path) -> tuple[list[str], str]:
    """Generate (or reuse) the probe set of ``benchmark.seed`` under ``data_dir/seed<seed>`` and its tasks."""
    from eval.probe import haystack_identity, haystack_videos, write_probe

    if not isinstance(bench.seed, int) or isinstance(bench.seed, bool):
        raise OptionError(f"option benchmark.seed={bench.seed!r}: expected an int (the probe generator's seed)")
    blank = bench.get("blank", False)
    if not isinstance(blank, bool):
        raise OptionError(f"option benchmark.blank={blank!r}: expected true or false (true: the no-video control)")
    haystack = bench.get("haystack_dir")
    if haystack is not None and not isinstance(haystack, str):
        raise OptionError(f"option benchmark.haystack_dir={haystack!r}: expected a folder path or null")
    suffix = "_blank" if blank else ""
    if haystack:  # one set per haystack: another folder, or changed videos, never reuse this one's frames
        haystack = (REPO / Path(haystack).expanduser()).resolve()
        try:
            suffix += f"_hay{haystack_identity(haystack_videos(haystack))}"
        except ValueError as err:
            raise OptionError(f"option {err}") from err
    folder = data_dir / f"seed{bench.seed}_t{bench.num_frames}_n{bench.per_family}{suffix}"
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
        blank=blank,
        haystack_dir=haystack or None,
    )
    return tasks, str(include)


def _data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The benchmark data a run reads: the resolved data_dir and the SHA-256 of every annotation file (offline)."""
    from eval.benchmarks import BENCHMARKS, MVBENCH_SUBTASK_FOLDERS
    from eval.keys import file_sha256

    data_dir = _data_dir(cfg)
    if data_dir is None:
        return {"data_dir": None, "annotations": {}}
    annotations = {}
    for name in cfg.benchmark.benchmarks:
        bench = BENCHMARKS[name]
        for sub in MVBENCH_SUBTASK_FOLDERS if name == "mvbench" else [None]:
            path = bench.annotation_path(data_dir, sub)
            if path.is_file():
                annotations[str(path.relative_to(data_dir))] = file_sha256(path)
    return {"data_dir": str(data_dir), "annotations": annotations}


def _strategy_name(cfg: DictConfig) -> str:
    return make_strategy(cfg).name


def _prune_settings(cfg: DictConfig) -> dict[str, Any]:
    prune = OmegaConf.to_container(cfg.prune, resolve=True)
    if prune.get("_target_") == "prune.strategies.none.NoPruning":
        prune.pop("ratio", None)  # none ignores it: the paired baseline of every ratio and budget is one cell
    elif budget_of(cfg) is not None:
        prune.pop("ratio", None)  # solved per sample: the budget decides the answer, not the nominal knob
    return prune


def _cell_config(cfg: DictConfig, data_dir: str | None = None) -> dict[str, Any]:
    """The cell-level settings that decide a sample's answer (:func:`eval.keys.answer_settings`)."""
    from eval.keys import answer_settings

    settings = answer_settings(
        OmegaConf.to_container(cfg.model, resolve=True),
        _prune_settings(cfg),
        int(cfg.seed),
        cfg.max_new_tokens,
        OmegaConf.to_container(cfg.benchmark, resolve=True),
        data_dir,
    )
    if list(cfg.benchmark.benchmarks) == ["probe"]:  # generated documents: the generator settings decide them
        settings["probe"] = {k: cfg.benchmark[k] for k in ("seed", "num_frames", "size", "grid")}
    budget = _cell_budget(cfg)
    if budget is not None:  # a budget= answer is never reused for another target or measure
        settings["budget"] = {"target": budget[0], "measure": budget[1]}
    return settings


def _cell_budget(cfg: DictConfig) -> tuple[float, str] | None:
    """``(target, measure)`` of a ``budget=`` cell; ``None`` for a ratio cell and for ``none``."""
    if cfg.prune.get("_target_") == "prune.strategies.none.NoPruning":
        return None
    return budget_of(cfg)


@dataclass
class _Cell:
    """One cell folder while a run holds its lock: paths, the sample log, this run's environment."""

    cfg: DictConfig
    strategy: str
    run_dir: Path
    ratio_dir: str
    log: SampleLog
    data: dict[str, Any]
    env: dict[str, Any]
    timing: dict[str, Any]
    previous: dict[str, Any] | None  # the record.json already there, if any
    budget: tuple[float, str] | None = None  # (target, measure) of a budget= cell

    @property
    def limit(self) -> int | None:
        """The requested limit, never below the existing record's (same settings): a record never shrinks."""
        prev = self.previous
        if prev is None or prev.get("config_hash") != self.log.hash:
            return self.cfg.limit
        return _max_limit(self.cfg.limit, prev.get("limit"))


def _max_limit(*limits: int | None) -> int | None:
    return None if any(v is None for v in limits) else max(limits)


def _cell_path(cfg: DictConfig) -> tuple[str, str, Path]:
    """The strategy name, the ratio folder and the cell folder of ``cfg``."""
    strategy = _strategy_name(cfg)
    budget = None if strategy == "none" else _cell_budget(cfg)
    ratio_dir = knob_folder(strategy, float(cfg.ratio), *(budget or (None, None)))
    return strategy, ratio_dir, cell_dir(_results_root(cfg), cfg.model.name, cfg.benchmark.name, strategy, ratio_dir)


@contextlib.contextmanager
def _cell_held(run_dir: Path, wait: float) -> Iterator[None]:
    """The cell's lock for this run: taken by rank 0 for all ranks of a multi-process cell, the others waiting for it.

    A rank that learns that rank 0 could not take it exits quietly (rank 0 prints the one line).
    """
    if distributed.rank() != 0:
        if distributed.broadcast(None) is not None:
            raise SystemExit(1)
        yield
        return
    held = contextlib.ExitStack()
    try:
        held.enter_context(cell_lock(run_dir, wait))
    except (CellLocked, StorageError) as err:
        distributed.broadcast(str(err))  # only this failure is told: a later error ends its rank, and the launch
        raise
    with held:
        distributed.broadcast(None)
        yield


@contextlib.contextmanager
def _open_cell(cfg: DictConfig, data: dict[str, Any]) -> Iterator[_Cell]:
    strategy, ratio_dir, run_dir = _cell_path(cfg)
    budget = None if strategy == "none" else _cell_budget(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(run_dir, err) from err
    with _cell_held(run_dir, float(cfg.get("lock_wait", 0))):
        env = environment("cuda" if _cuda(cfg.device) else "cpu")
        timing = timing_env(
            env, cfg.model.get("dtype"), processes=distributed.world_size(), prefetch=int(cfg.get("prefetch", 0))
        )
        log = SampleLog(run_dir / "samples.jsonl", config_hash(_cell_config(cfg, data["data_dir"])))
        if log.torn_bytes:
            print(f"[vidprune] cut a torn last line ({log.torn_bytes} bytes) off {log.path}")
        path = run_dir / "record.json"
        try:
            previous = json.loads(path.read_text()) if path.exists() else None
        except (OSError, json.JSONDecodeError):
            previous = None
        yield _Cell(cfg, strategy, run_dir, ratio_dir, log, data, env, timing, previous, budget)


def _frame_cache(cfg: DictConfig):
    """The decode cache of ``cfg``'s results folder (``cache=on``), else None."""
    if not switch("cache", cfg.get("cache", False)):
        return None
    from eval.frame_cache import FrameCache

    return FrameCache(_results_root(cfg) / ".cache" / "frames", int(float(cfg.get("cache_gb", 20)) * 1e9))


def _lmm(cell: _Cell, backbone, partner=None):
    from eval.lmms_model import VidPruneLMM

    lmm = VidPruneLMM(
        backbone=backbone,
        sample_log=cell.log,
        max_new_tokens=cell.cfg.max_new_tokens,
        timing=cell.timing,
        retime=bool(cell.cfg.get("retime", True)),
        partner=partner,
        progress=distributed.rank() == 0,
        prefetch=int(cell.cfg.get("prefetch", 0)),
        cache=_frame_cache(cell.cfg),
    )
    if _ACCELERATOR is not None:  # lmms-eval's multi-process route gathers request counts through it
        lmm.accelerator = _ACCELERATOR
    return lmm


def run_cell(
    cfg: DictConfig, tasks: list[str], include_path: str | None, baseline: dict | None = None, backbone=None
) -> dict | None:
    """Evaluate one cell and write its record (times from this cell's own samples); return the record.

    In a multi-process cell every rank calls it; rank 0 writes and returns the record, the others return None.
    """
    _seed_everything(int(cfg.seed), cfg.threads)
    with _open_cell(cfg, _data_identity(cfg)) as cell:
        lmm = _lmm(cell, backbone if backbone is not None else make_backbone(cfg))
        evaluated = _evaluate(cell, lmm, tasks, include_path, cell.limit)
        return None if evaluated is None else _write_record(cell, lmm, evaluated, baseline)


def run_paired(cfg: DictConfig, base_cfg: DictConfig, tasks: list[str], include_path: str | None) -> dict | None:
    """Evaluate a pruned cell with ``none`` timed back-to-back on every sample; write both records.

    Each sample is answered by both backbones in one process, alternating which goes first, so load drift
    cancels from the per-sample TTFT ratio. The ``none`` answers go to the ``none`` cell's log (unless already
    there), whose record is then rebuilt from it.
    """
    _seed_everything(int(cfg.seed), cfg.threads)
    data = _data_identity(cfg)
    none_bb, pruned_bb = make_paired_backbones(cfg, base_cfg)
    from eval.lmms_model import Partner

    with _open_cell(base_cfg, data) as none_cell, _open_cell(cfg, data) as cell:
        limit = cell.limit
        lmm = _lmm(cell, pruned_bb, Partner(none_bb, none_cell.log))
        evaluated = _evaluate(cell, lmm, tasks, include_path, limit)
        none_lmm = _lmm(none_cell, none_bb)
        none_evaluated = _evaluate(none_cell, none_lmm, tasks, include_path, _max_limit(limit, none_cell.limit))
        if evaluated is None:  # not rank 0 of a multi-process cell: rank 0 writes both records
            return None
        base = _write_record(none_cell, none_lmm, none_evaluated)
        return _write_record(cell, lmm, evaluated, base)


def _evaluate(cell: _Cell, lmm, tasks: list[str], include_path: str | None, limit: int | None) -> dict | None:
    """Run lmms-eval over the cell's samples and score each from this run's entries.

    In a multi-process cell, lmms-eval gives each rank its shard; the entries of every rank are then gathered on rank
    0, which scores them all. The other ranks return None.
    """
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    from eval.backbones import flops_of
    from eval.benchmarks import PROCESS_DOCS_PARALLEL, parse_ok, sample_score, task_metric

    cfg = cell.cfg
    if limit != cfg.limit:
        print(
            f"[vidprune] {cell.run_dir}: its record covers limit={limit}; evaluating limit={limit} instead of "
            f"{cfg.limit} so that it does not shrink (finished samples are reused)"
        )
    if distributed.rank() == 0:
        budget = cell.budget
        knob = f"budget {budget[1]}={budget[0]:g}, knobs solved per sample" if budget else f"ratio {cell.ratio_dir}"
        name = f"{cfg.model.name} × {cell.strategy} ({knob}) × {cfg.benchmark.name}"
        print(f"[vidprune] {name} -> {cell.run_dir}")
        print(f"[vidprune] {len(cell.log.done)} samples recorded under these settings in {cell.log.path.name}")
    tracker = EvaluationTracker(output_path=str(cell.run_dir / "lmms_eval"))
    start = time.time()
    results = simple_evaluate(
        model=lmm,
        tasks=tasks,
        task_manager=TaskManager(include_path=include_path, model_name="vidprune"),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        evaluation_tracker=tracker,
        random_seed=int(cfg.seed),
        numpy_random_seed=int(cfg.seed),
        torch_random_seed=int(cfg.seed),
        # 1: EgoSchema/NExT-QA fall back to random.choice; scoring on threads would make that irreproducible
        process_docs_parallel=PROCESS_DOCS_PARALLEL,
    )
    parts = distributed.gather(
        {
            "used": lmm.used,
            "resume": dict(lmm.resume),
            "video_sources": dict(lmm.decode_sources),
            "loop_s": lmm.loop_s,
            "device": distributed.device_description(lmm.backbone.device, cell.env.get("machine")),
        }
    )
    if parts is None:  # not rank 0: its samples are logged and now on rank 0, which writes the record
        return None
    lmm.used, lmm.resume, lmm.decode_sources = {}, Counter(), Counter()
    for part in parts:  # every rank's answers, resume counts and video sources, in rank order
        lmm.used.update(part["used"])
        lmm.resume.update(part["resume"])
        lmm.decode_sources.update(part["video_sources"])
    devices = [part["device"] for part in parts]
    lmm.loop_s = max(part["loop_s"] for part in parts)  # the slowest rank's: what the cell waited for
    samples_by_task = results.pop("samples")
    try:
        tracker.save_results_aggregated(results=results, samples=samples_by_task, datetime_str=results["date"])
        for task, task_samples in samples_by_task.items():
            tracker.save_results_samples(task_name=task, samples=task_samples)
    except OSError as err:
        raise storage_error(cell.run_dir / "lmms_eval", err) from err

    scored, flops = [], []
    shape = lmm.backbone.llm_shape
    for task, task_samples in samples_by_task.items():
        metric = task_metric(task)[0]
        split = next(iter(lmm.task_dict[task]))
        for s in task_samples:
            entry = lmm.used.get((task, int(s["doc_id"])))
            if entry is None:
                raise RuntimeError(f"lmms-eval scored {task}/{s['doc_id']}, which the model never answered")
            failed = bool(entry["failed"])
            doc = lmm.task_dict[task][split][s["doc_id"]]
            parsed = not failed and bool(parse_ok(task, entry["prediction"], doc))
            # Correct only when the answer parsed: EgoSchema and NExT-QA score a random letter for unparsable output,
            # and a failed sample counts as wrong (MVBench's own aggregation drops it from the denominator).
            correct = parsed and (sample_score(task, s[metric]) or 0.0) == 1.0
            scored.append(
                {
                    "task": task,
                    "doc_id": s["doc_id"],
                    "prediction": entry["prediction"],
                    "failed": failed,
                    "error": entry.get("error"),
                    "score": 1.0 if correct else 0.0,
                    "parse_ok": parsed,
                    "stats": entry.get("stats"),
                    "timing_key": entry.get("timing_key"),
                    "timing_env": entry.get("timing_env"),
                    "paired": entry.get("paired"),
                    # budget= runs: the knobs solved for this sample, the target and what was achieved
                    "budget": (entry.get("stats") or {}).get("budget"),
                }
            )
            if not failed:
                flops.append(flops_of(entry["stats"], shape))
    return {
        "results": results,
        "scored": scored,
        "flops": flops,
        "limit": limit,
        "wall_s": time.time() - start,
        "devices": devices,
    }


def _write_record(cell: _Cell, lmm, evaluated: dict[str, Any], baseline: dict | None = None) -> dict:
    """``scores.jsonl``, ``config.yaml`` and ``record.json`` of a cell, each written atomically."""
    from eval.keys import timing_key
    from eval.stats import paired_bootstrap, ratio_ci

    cfg, run_dir, scored = cell.cfg, cell.run_dir, evaluated["scored"]
    resume = dict(lmm.resume)
    meta = {
        "model": cfg.model.name,
        "prune": cell.strategy,
        "ratio": None if cell.budget else float(cell.ratio_dir),  # budget= runs: solved per sample (budget_knobs)
        "budget_target": cell.budget[0] if cell.budget else None,
        "budget_measure": cell.budget[1] if cell.budget else None,
        "benchmark": cfg.benchmark.name,
        "tasks": sorted({r["task"] for r in scored}),
        "seed": int(cfg.seed),
        "limit": evaluated["limit"],
        "limit_requested": cfg.limit,
        "config_hash": cell.log.hash,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": cell.data,
        **cell.env,
        "wall_s": evaluated["wall_s"],
        "nproc": len(evaluated["devices"]),
        "devices": evaluated["devices"],  # every rank: host, torch device, what it is
        "input_pipeline": {
            "prefetch": int(cfg.get("prefetch", 0)),
            "cache": switch("cache", cfg.get("cache", False)),
            # where the videos of the samples run here came from: decoded (prefetched or not), cache, inline
            "video_sources": dict(lmm.decode_sources),
            # wall time of the model's request loop (the slowest rank's): decoding, waiting and the model together
            "generate_wall_s": lmm.loop_s,
        },
        "resume": resume,
        "n_retried": resume.get("retried_failed", 0),
        "n_retried_still_failed": resume.get("retried_still_failed", 0),
        "lmms_eval_results": dict(evaluated["results"].get("results", {})),
    }
    record = build_record(
        meta=meta, samples=scored, llm_shape=lmm.backbone.llm_shape, flops=evaluated["flops"], timing=cell.timing
    )
    # Per-sample TTFT ratio of a back-to-back pair, only for samples timed in the record's timing environment.
    key = timing_key(record["timing_env"]) if record.get("timing_env") else None
    for r in scored:
        pair = r.get("paired")
        ok = pair and not r["failed"] and r.get("timing_key") == key and pair["ttft_s"] > 0
        r["ttft_ratio"] = pair["none_ttft_s"] / pair["ttft_s"] if ok else None
    keep = ("task", "doc_id", "prediction", "failed", "error", "score", "parse_ok", "ttft_ratio", "budget")
    write_atomic(run_dir / "scores.jsonl", "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in scored))
    if baseline is not None:
        record["baseline"] = _baseline(cfg, record, scored, baseline, paired_bootstrap, ratio_ci)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    path = run_dir / "record.json"
    old = cell.previous
    if old is not None and old.get("config_hash") != record["config_hash"]:  # other settings: keep it, aside
        aside = run_dir / "superseded" / f"record-{old.get('config_hash', 'unknown')}.json"
        aside.parent.mkdir(exist_ok=True)
        os.replace(path, aside)
        print(f"[vidprune] the record of other settings moved to {aside}")
    write_atomic(path, json.dumps(record, indent=2, default=str))
    ttft, acc = record["ttft_ms_median"], record["accuracy"]
    print(
        f"[vidprune] {record['n_samples']} samples ({record['n_failed']} failed, {record['n_parse_failed']} "
        f"unparsed, {record['n_retried']} retried): accuracy {float('nan') if acc is None else acc:.1f}, "
        f"FLOPs ×{record['flops_ratio'] or float('nan'):.3f}, "
        f"TTFT {float('nan') if ttft is None else ttft:.0f} ms -> {path}"
    )
    if record.get("timing_stale"):
        print(f"[vidprune] times come from another environment ({record['timing_env']}); retime=true re-times them")
    _maybe_wandb(cfg, record, run_dir)
    return {**record, "_path": str(path), "_scored": scored}


def _baseline(cfg, record, scored, baseline, paired_bootstrap, ratio_ci) -> dict[str, Any]:
    """Δaccuracy over the paired samples with its bootstrap CI, and the TTFT speed-up (paired when timed so)."""
    base_scores = {(r["task"], r["doc_id"]): r["score"] for r in baseline["_scored"]}
    ours = {(r["task"], r["doc_id"]): r["score"] for r in scored}
    out: dict[str, Any] = {
        "record": str(Path(baseline["_path"]).relative_to(_results_root(cfg))),
        "delta_accuracy": _sub(record["accuracy"], baseline["accuracy"]),
        "ttft_speedup": _div(baseline["ttft_ms_median"], record["ttft_ms_median"]),
        "ttft_speedup_paired": False,
    }
    if ours and set(ours) & set(base_scores):
        delta = paired_bootstrap(ours, base_scores, n_boot=2000, seed=int(cfg.seed))
        out.update(delta_accuracy=delta.delta, delta_ci=[delta.low, delta.high], n_paired=delta.n_paired)
    ratios = [r["ttft_ratio"] for r in scored if r.get("ttft_ratio") is not None]
    if ratios:
        ci = ratio_ci(ratios, seed=int(cfg.seed))
        out.update(
            ttft_speedup=ci["median"],
            ttft_speedup_ci=[ci["low"], ci["high"]],
            ttft_speedup_significant=ci["significant"],
            ttft_speedup_paired=True,
            ttft_speedup_n=len(ratios),
        )
    return out


def _sub(a, b):
    return None if a is None or b is None else a - b


def _div(a, b):
    return None if a is None or not b else a / b


def _cuda(device: str) -> bool:
    import torch

    return str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _maybe_wandb(cfg: DictConfig, record: dict, run_dir: Path) -> None:
    if cfg.logger == "none":
        return
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")  # no login needed; `wandb sync` uploads later
    scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    target = record.get("budget_target")
    knob = f"{record['budget_measure']}-{target:g}" if target else f"{record['ratio']:g}"
    name = f"{record['model']}-{record['benchmark']}-{record['prune']}-{knob}"
    with wandb.init(project="vidprune", name=name, dir=str(run_dir), mode=mode, config=record["config"]) as wb:
        wb.log(scalars)


def _none_config(cfg: DictConfig) -> DictConfig:
    base_cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(base_cfg, False)
    base_cfg.prune = OmegaConf.load(CONFIGS / "prune" / "none.yaml")
    base_cfg.budget = None  # the unpruned reference is the same cell for every ratio and budget
    return base_cfg


_ACCELERATOR = None  # this process's accelerate Accelerator when it is one rank of a multi-process cell


def run(cfg: DictConfig) -> dict | None:
    """Validate every option, evaluate ``cfg`` (and its paired ``none`` baseline), then rebuild ``results/tables``.

    With ``nproc`` > 1 this process launches the ranks (:mod:`eval.distributed`) and returns the record rank 0 wrote;
    in a rank it runs its shard, and rank 0 writes the records and tables (the other ranks return None).
    """
    global _ACCELERATOR
    from eval.tables import write_tables

    strategy = validate(cfg)  # one line per bad option, before any data or model is touched
    paired = bool(cfg.paired_baseline and strategy.name != "none")
    if int(cfg.get("nproc", 1)) > 1 and not distributed.is_rank():
        return _launch(cfg, paired)
    _ACCELERATOR = distributed.start(_cuda(cfg.device))
    if _ACCELERATOR is not None:
        cfg = _rank_config(cfg, _ACCELERATOR)
    tasks, include_path = _on_rank0(lambda: _prepare_tasks(cfg))
    if paired:
        base_cfg = _none_config(cfg)
        if cfg.get("paired_timing", True):
            record = run_paired(cfg, base_cfg, tasks, include_path)
        else:
            baseline = run_cell(base_cfg, tasks, include_path)
            record = run_cell(cfg, tasks, include_path, baseline)
    else:
        record = run_cell(cfg, tasks, include_path)
    if distributed.rank() == 0:
        tables = write_tables(_results_root(cfg))
        print(f"[vidprune] tables: {', '.join(str(p) for p in tables)}")
    distributed.barrier()
    return record


def _on_rank0(fn):
    """``fn()`` computed by rank 0 only (files it writes are written once) and handed to every rank."""
    if not distributed.is_rank():
        return fn()
    result, error = None, None
    if distributed.rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks learned of it
            error = err
    result, failed = distributed.broadcast((result, error is not None))
    if error is not None:
        raise error
    if failed:
        raise SystemExit(1)  # rank 0 prints the one line
    return result


def _rank_config(cfg: DictConfig, accelerator) -> DictConfig:
    """``cfg`` for this rank: its own GPU (``cuda:<local rank>``) or the CPU."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.device = str(accelerator.device) if accelerator.device.type == "cuda" else "cpu"
    return cfg


def _launch(cfg: DictConfig, paired: bool) -> dict:
    """Run ``cfg`` on ``nproc`` ranks; return the record rank 0 wrote.

    Before anything starts, the launching process checks what it can so that errors keep their one line and exit
    code: the weights (exit 2) and the cells' locks (exit 3: another run holds one).
    """
    from eval.backbones import check_available

    check_available(OmegaConf.to_container(cfg.model, resolve=True))
    cells = [_cell_path(cfg)[2]] + ([_cell_path(_none_config(cfg))[2]] if paired else [])
    for run_dir in cells:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(run_dir, err) from err
        with cell_lock(run_dir, float(cfg.get("lock_wait", 0))):
            pass  # free now; rank 0 takes it for the run
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = _results_root(cfg) / ".cache" / "launch" / f"{stable_hash(text)}.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(path.parent, err) from err
    write_atomic(path, text)
    distributed.launch(path, int(cfg.nproc), REPO / "scripts" / "run_eval.py")
    record_path = cells[0] / "record.json"
    return {**json.loads(record_path.read_text()), "_path": str(record_path)}
