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

import traceback
from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm

from eval.backbones import Backbone
from eval.benchmarks import guarded_doc_to_visual
from eval.records import SampleLog

__all__ = ["FAILED_ANSWER", "VidPruneLMM", "manifests"]

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


class VidPruneLMM(lmms):
    """lmms-eval simple model over a pruned backbone.

    Args:
        backbone: a built :class:`~eval.backbones.Backbone` (runner route).
        sample_log: where finished samples are appended and looked up for resume (runner route; optional).
        model, prune, ratio, overrides: CLI route: names of ``configs/model`` and ``configs/prune`` options, the ratio
            and extra Hydra overrides (space separated), composed from ``configs/eval.yaml``.
        max_new_tokens: overrides the task's generation length when set.
    """

    is_simple = True

    def __init__(
        self,
        backbone: Backbone | None = None,
        sample_log: SampleLog | None = None,
        model: str = "tiny_llava_ov",
        prune: str = "none",
        ratio: float = 1.0,
        overrides: str = "",
        max_new_tokens: int | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs.get("batch_size") not in (None, 1, "1"):
            raise ValueError(f"vidprune runs one video at a time: batch_size must be 1, got {kwargs['batch_size']!r}")
        if backbone is None:
            from eval.config import compose_config, make_backbone

            extra = [o for o in str(overrides).split() if o]
            cfg = compose_config([f"model={model}", f"prune={prune}", f"ratio={ratio}", *extra])
            backbone = make_backbone(cfg)
        self.backbone, self.log, self.max_new_tokens, self.progress = backbone, sample_log, max_new_tokens, progress
        self.n_failed = 0

    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in tqdm(requests, desc=f"vidprune {self.backbone.name}", disable=not self.progress):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            cached = self.log.get(task, doc_id) if self.log else None
            if cached is not None:  # resume: this configuration already answered this sample
                answers.append(cached["prediction"])
                continue
            answers.append(self._answer(context, dict(gen_kwargs), doc_to_visual, doc_id, task, split))
        return answers

    def _answer(self, context, gen_kwargs, doc_to_visual, doc_id, task, split) -> str:
        if self.max_new_tokens:
            gen_kwargs["max_new_tokens"] = self.max_new_tokens
        entry: dict[str, Any] = {"task": task, "doc_id": int(doc_id), "split": split}
        doc = self.task_dict[task][split][doc_id]
        visuals, error = guarded_doc_to_visual(doc_to_visual, doc)
        if error is None and (not visuals or not isinstance(visuals[0], str)):
            error = f"expected one video path from doc_to_visual, got {visuals!r}"
        if error is None:
            entry["video"] = visuals[0]
            try:
                text, stats = self.backbone.answer(visuals[0], context, gen_kwargs, **_evidence(doc))
                entry.update(prediction=text, failed=False, stats=stats)
            except Exception as err:  # recorded per sample; the run goes on
                error = f"{type(err).__name__}: {err}"
                entry["traceback"] = traceback.format_exc(limit=5)
        if error is not None:
            self.n_failed += 1
            entry.update(prediction=FAILED_ANSWER, failed=True, error=error)
        if self.log is not None:
            self.log.append(entry)
        return entry["prediction"]

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "vidprune evaluates generation tasks only (mvbench, videomme, egoschema_subset, nextqa_mc_test); "
            "loglikelihood tasks such as egoschema_mcppl are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vidprune evaluates single-turn generation tasks only")
