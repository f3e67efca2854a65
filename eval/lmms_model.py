"""The lmms-eval model: a simple (batch 1) model wrapping a backbone and a pruning strategy.

Two ways in:

* the Hydra runner (``eval.runner``) builds the backbone and hands an instance to ``simple_evaluate``;
* the lmms-eval CLI finds it through the ``lmms_eval.models`` entry point (``manifests`` below)::

      lmms-eval --model vidprune --model_args model=tiny_llava_ov,prune=fastv,ratio=0.3 --tasks ...

  which composes ``configs/eval.yaml`` with those overrides (``overrides="prune.layer=3 seed=1"`` adds more).

Every sample is guarded: a missing or corrupt video (the built-in Video-MME and EgoSchema tasks call ``sys.exit`` on a
missing file) or a failing generation is recorded as a failed sample with its error and the run goes on. A failed
sample returns ``FAILED_ANSWER``, which no task parses as an option, and the harness's own accuracy counts it wrong
(MVBench's aggregation would otherwise drop empty answers from its denominator).
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from eval.backbones import Backbone
from eval.benchmarks import DATA_ERROR, guarded_doc_to_visual
from eval.frame_cache import FrameCache
from eval.keys import answer_key, timing_key, video_fingerprint
from eval.pipeline import VisualSource
from eval.records import SampleLog

__all__ = ["FAILED_ANSWER", "Partner", "VidPruneLMM", "manifests"]

FAILED_ANSWER = "[vidprune: sample failed]"


def manifests():
    """Entry-point payload for ``lmms_eval.models`` (lmms-eval >= 0.6 reads ``ModelManifest`` objects)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vidprune", simple_class_path="eval.lmms_model.VidPruneLMM")]


def _evidence(doc: Any) -> dict[str, Any]:
    """``Backbone.answer``'s evidence arguments for a probe document (``evidence`` cells on a ``grid``), else {}."""
    if not isinstance(doc, dict) or "evidence" not in doc or "grid" not in doc:
        return {}
    from eval.probe import evidence_tokens

    grid = int(doc["grid"])
    return {"evidence": evidence_tokens(doc["evidence"], grid), "evidence_grid": grid}


@dataclass
class Partner:
    """The paired ``none`` run timed back-to-back with each pruned sample (``paired_timing``).

    Attributes:
        backbone: the ``none`` backbone, sharing the pruned backbone's weights.
        log: the ``none`` cell's sample log; a sample it has no reusable answer for is appended to it.
    """

    backbone: Backbone
    log: SampleLog


class VidPruneLMM(lmms):
    """lmms-eval simple model over a pruned backbone.

    Args:
        backbone: a built :class:`~eval.backbones.Backbone` (runner route).
        sample_log: where finished samples are appended and looked up for resume (runner route; optional).
        model, prune, ratio, overrides: CLI route: names of ``configs/model`` and ``configs/prune`` options, the ratio
            and extra Hydra overrides (space separated), composed from ``configs/eval.yaml``.
        budget, budget_measure: CLI route: a target achieved budget instead of ``ratio`` (the method's knobs are then
            solved per sample, ``prune/budget.py``); giving both ``ratio`` and ``budget`` is an error.
        max_new_tokens: overrides the task's generation length when set.
        timing: this run's :func:`eval.keys.timing_env` (runner route).
        retime: re-run a sample whose answer is reusable but was timed in another environment.
        partner: the ``none`` run to time back-to-back with every sample (runner route, paired timing).
        prefetch: videos decoded ahead in background threads (:mod:`eval.pipeline`); 0 decodes inline.
        cache: the decode cache (:mod:`eval.frame_cache`), or None.
    """

    is_simple = True

    def __init__(
        self,
        backbone: Backbone | None = None,
        sample_log: SampleLog | None = None,
        model: str = "tiny_llava_ov",
        prune: str = "none",
        ratio: float | None = None,
        overrides: str = "",
        budget: float | None = None,
        budget_measure: str = "flops",
        max_new_tokens: int | None = None,
        progress: bool = True,
        timing: dict[str, Any] | None = None,
        retime: bool = True,
        partner: Partner | None = None,
        prefetch: int = 0,
        cache: FrameCache | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs.get("batch_size") not in (None, 1, "1"):
            raise ValueError(f"vidprune runs one video at a time: batch_size must be 1, got {kwargs['batch_size']!r}")
        if backbone is None:
            from eval.config import compose_config, make_backbone

            extra = [o for o in str(overrides).split() if o]
            local = os.environ.get("LOCAL_RANK")  # `accelerate launch lmms-eval ...`: one GPU per rank
            if local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
                extra.append(f"device=cuda:{int(local)}")
            knob = [f"ratio={ratio}"] if ratio is not None else []
            if budget is not None:
                knob += [f"budget={budget}", f"budget_measure={budget_measure}"]
            cfg = compose_config([f"model={model}", f"prune={prune}", *(knob or ["ratio=1.0"]), *extra])
            backbone = make_backbone(cfg)
        self.backbone, self.log, self.max_new_tokens, self.progress = backbone, sample_log, max_new_tokens, progress
        self.timing = dict(timing or {})
        self.timing_key = timing_key(self.timing)
        self.retime, self.partner = retime, partner
        self.prefetch, self.cache = int(prefetch), cache
        self.decode_sources: Counter[str] = Counter()  # where the visuals of the samples run here came from
        self.loop_s = 0.0  # wall time of generate_until: planning, decoding and the model, as the run experienced it
        self.n_failed = 0
        self.used: dict[tuple[str, int], dict[str, Any]] = {}  # this run's entry of every sample, for scoring
        self.resume: Counter[str] = Counter()  # how each sample was obtained (see runner's record field "resume")
        self._timed = 0  # samples timed in this process: alternates which of a pair goes first

    @property
    def device(self):
        """Where the model runs (lmms-eval's multi-process route gathers request counts on it)."""
        return self.backbone.device

    def generate_until(self, requests) -> list[str]:
        """Answer every request in order; videos come through the input pipeline (:mod:`eval.pipeline`).

        Every request is planned first (its keys, and whether the log already holds a reusable answer), so the
        pipeline decodes only the videos of samples that will run, ahead of the model when ``prefetch`` > 0.
        """
        start = time.perf_counter()
        plans = [self._plan(request) for request in requests]
        jobs = [p for p in plans if p is not None and p.get("run")]
        for i, plan in enumerate(jobs):
            plan["job"] = i
        # prefetch=0 and no cache: each run decodes its own video inline (Backbone.answer), as lmms-eval's models do
        piped = bool(self.prefetch or self.cache is not None)
        source = VisualSource(
            self.backbone,
            [(p["video"], p["fingerprint"]) for p in jobs] if piped else [],
            prefetch=self.prefetch,
            cache=self.cache,
            timing_key=self.timing_key,
        )
        answers = []
        with source:
            for plan in tqdm(plans, desc=f"vidprune {self.backbone.name}", disable=not self.progress):
                if plan is None:  # lmms-eval's padding request (a rank with fewer documents): dropped by lmms-eval
                    answers.append(FAILED_ANSWER)
                    continue
                entry = self._sample(plan, source if piped else None)
                self.used[(plan["task"], plan["doc_id"])] = entry
                answers.append(entry["prediction"])
        self.loop_s += time.perf_counter() - start
        return answers

    def _plan(self, request) -> dict[str, Any] | None:
        """One request's keys and resume decision, before anything is decoded; None for a padding request."""
        metadata = getattr(request, "metadata", None)
        if isinstance(metadata, dict) and metadata.get("__padding_only__"):
            return None
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        doc_id = int(doc_id)
        gen_kwargs = dict(gen_kwargs)
        if self.max_new_tokens:
            gen_kwargs["max_new_tokens"] = self.max_new_tokens
        doc = self.task_dict[task][split][doc_id]
        visuals, error = guarded_doc_to_visual(doc_to_visual, doc)
        if error is None and (not visuals or not isinstance(visuals[0], str)):
            error = f"expected one video path from doc_to_visual, got {visuals!r}"
        data_error = doc.get(DATA_ERROR) if isinstance(doc, dict) else None
        video = visuals[0] if error is None else None
        fingerprint = video_fingerprint(video)
        settings = self.log.hash if self.log is not None else ""
        key = answer_key(settings, task, doc_id, doc, context, gen_kwargs, video, fingerprint)
        base = {"task": task, "doc_id": doc_id, "split": split, "answer_key": key}
        if video is not None:
            base["video"] = video
        plan = {"task": task, "doc_id": doc_id, "base": base, "context": context, "gen_kwargs": gen_kwargs}
        if self.log is not None:
            previous, reason = self.log.lookup(task, doc_id, key, self.timing_key, self.retime)
            if reason == "reuse":
                self.resume["reused"] += 1
                if self.timing_key != previous.get("timing_key"):
                    self.resume["reused_timed_elsewhere"] += 1
                return {**plan, "reuse": previous}
            self.resume[reason] += 1
            plan["retried"] = previous is not None and bool(previous.get("failed"))
        if data_error is not None:  # a bad annotation row: recorded, counted, never sent to the model
            error = data_error
        plan.update(
            error=error,
            video=video,
            fingerprint=fingerprint,
            evidence=_evidence(doc),
            partner=self._partner_key(task, doc_id, doc, context, gen_kwargs, video, fingerprint),
            run=error is None,
        )
        return plan

    def _sample(self, plan: dict[str, Any], source: VisualSource | None) -> dict[str, Any]:
        """This run's entry for one planned sample: reused from the log, or computed and appended."""
        if "reuse" in plan:
            return plan["reuse"]
        base, partner = plan["base"], plan["partner"]
        again = self.used.get((plan["task"], plan["doc_id"]))  # the same sample twice in one run: the first stands
        if again is not None and again.get("answer_key") == base["answer_key"] and not again.get("failed"):
            return again
        if plan["error"] is not None:
            entry = self._failed(base, plan["error"])
            if partner is not None:
                self._partner_append(partner, {**base, "answer_key": partner[0]}, error=plan["error"])
        else:
            t0 = time.perf_counter()
            try:
                visual, failure = (source.get(plan["job"]) if source is not None else None), None
            except Exception as err:  # a bad video: the sample's recorded failure (both runs of a pair fail alike)
                visual, failure = None, (f"{type(err).__name__}: {err}", traceback.format_exc(limit=5))
            t1 = time.perf_counter()
            if failure is not None:
                entry = self._failed(base, *failure)
                if partner is not None:
                    self._partner_append(partner, {**base, "answer_key": partner[0]}, *failure)
            else:
                self.decode_sources[visual.source if visual is not None else "inline"] += 1
                entry = self._run(
                    base, plan["video"], plan["context"], plan["gen_kwargs"], partner, plan["evidence"], visual
                )
                # The loop's own clock (scripts/bench_eval.py): seconds it waited for the decoded video, and seconds
                # of the runs (both of a pair; with prefetch=0 and no cache they include the inline decodes).
                entry["loop_s"] = {"wait": t1 - t0, "run": time.perf_counter() - t1}
        if plan.get("retried"):
            self.resume["retried_failed"] += 1
            self.resume["retried_still_failed"] += int(bool(entry["failed"]))
        if self.log is not None:
            entry["rank"] = self.rank  # which process of a multi-process cell (nproc) answered it
            self.log.append(entry)
        return entry

    def _partner_key(self, task, doc_id, doc, context, gen_kwargs, video, fingerprint):
        if self.partner is None:
            return None
        plog = self.partner.log
        key = answer_key(plog.hash, task, doc_id, doc, context, gen_kwargs, video, fingerprint)
        previous, reason = plog.lookup(task, doc_id, key, self.timing_key, self.retime)
        return key, reason

    def _failed(self, base: dict[str, Any], error: str, trace: str | None = None) -> dict[str, Any]:
        self.n_failed += 1
        entry = {**base, "prediction": FAILED_ANSWER, "failed": True, "error": error}
        if trace:
            entry["traceback"] = trace
        return entry

    def _timed_answer(self, backbone: Backbone, video: str, context: str, gen_kwargs, extra, visual) -> tuple:
        try:
            given = {"visual": visual} if visual is not None else {}  # None: the backbone decodes inline
            text, stats = backbone.answer(video, context, gen_kwargs, **given, **extra)
            return text, stats, None
        except Exception as err:  # recorded per sample; the run goes on
            return None, None, (f"{type(err).__name__}: {err}", traceback.format_exc(limit=5))

    def _run(self, base, video, context, gen_kwargs, partner, extra, visual) -> dict[str, Any]:
        """Answer one sample; with a partner, time ``none`` back-to-back, alternating which one goes first.

        Both runs of a pair take the one decoded ``visual`` (the same frames, and the same measured decode and
        preprocess times in both TTFTs); what alternates and is timed back-to-back is the model's own work.
        """
        stamp = {"timing_key": self.timing_key, "timing_env": self.timing}
        none_first = partner is not None and self._timed % 2 == 0
        self._timed += 1
        runs = {}
        order = ("none", "pruned") if none_first else ("pruned", "none") if partner is not None else ("pruned",)
        for which in order:
            backbone = self.backbone if which == "pruned" else self.partner.backbone
            runs[which] = self._timed_answer(backbone, video, context, gen_kwargs, extra, visual)
        text, stats, failure = runs["pruned"]
        entry = (
            self._failed(base, *failure) if failure else {**base, "prediction": text, "failed": False, "stats": stats}
        )
        entry.update(stamp)
        if partner is not None:
            ntext, nstats, nfailure = runs["none"]
            nbase = {**base, "answer_key": partner[0]}
            if partner[1] != "reuse":
                if nfailure:
                    self._partner_append(partner, nbase, *nfailure)
                else:
                    self.partner.log.append({**nbase, "prediction": ntext, "failed": False, "stats": nstats, **stamp})
            if not failure and not nfailure:
                entry["paired"] = {
                    "none_ttft_s": nstats["ttft_s"],
                    "ttft_s": stats["ttft_s"],
                    "first": "none" if none_first else "pruned",
                }
        return entry

    def _partner_append(self, partner, base: dict[str, Any], error: str, trace: str | None = None) -> None:
        if partner[1] == "reuse":
            return
        entry = {**base, "prediction": FAILED_ANSWER, "failed": True, "error": error}
        if trace:
            entry["traceback"] = trace
        self.partner.log.append({**entry, "timing_key": self.timing_key, "timing_env": self.timing})

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "vidprune evaluates generation tasks only (mvbench, videomme, egoschema_subset, nextqa_mc_test); "
            "loglikelihood tasks such as egoschema_mcppl are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vidprune evaluates single-turn generation tasks only")
