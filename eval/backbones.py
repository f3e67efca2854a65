"""Backbones for the eval spine: load a model per ``configs/model/*.yaml`` and answer one prompt about one video.

A :class:`Backbone` decodes the video with decord, samples frames uniformly (lmms-eval's ``linspace``), preprocesses
them with its family's transform, builds the family's chat prompt, runs the pruned model through its adapter and
returns the answer with the per-sample stats the records need. Model surgery stays in ``prune/adapters``.

This module is the part every family shares. What differs between families (adapter, loaders, preprocessing, prompt,
tokenizers, the fail-fast check for missing weights) is one :class:`~eval.families.contract.Family` entry, ``FAMILY``,
in the family's own module ``eval/families/<family>.py``; :data:`FAMILIES` collects them by discovery (every module
of that package that defines ``FAMILY``), and :func:`build_backbone` is the same for all. Adding a backbone touches no
line here (docs/backbones.md, "Adding a backbone").
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from eval import families
from eval.families.contract import BackboneUnavailable, ByteIdTokenizer, Family
from eval.frames import load_frames
from prune.adapters import VideoAdapter
from prune.api import Strategy
from prune.flops import LLMShape

__all__ = [
    "FAMILIES",
    "IMPLEMENTED",
    "Backbone",
    "BackboneUnavailable",
    "ByteIdTokenizer",
    "Family",
    "Visual",
    "build_backbone",
    "check_available",
    "decode_visual",
    "flops_of",
    "load_frames",
]


@dataclass
class Visual:
    """One video decoded, sampled and preprocessed: what every strategy's run of a sample shares.

    Attributes:
        pixels: ``[1, T, 3, H, W]`` preprocessed frames.
        frames_in_video: the video's own frame count.
        timings: seconds of ``video_decode`` and ``preprocess`` as measured when it was decoded (each stage's own
            time, in the worker thread that ran it: never the time the model waited for it).
        frames: ``[T, H0, W0, 3]`` uint8 sampled frames, or None when it came from the decode cache.
        source: ``decoded`` (this run decoded it) or ``cache`` (read from the decode cache, ``eval.frame_cache``).
    """

    pixels: torch.Tensor
    frames_in_video: int
    timings: dict[str, float]
    frames: Any = None
    source: str = "decoded"


def decode_visual(video: str, num_frames: int, preprocess: Callable[[Any], torch.Tensor]) -> Visual:
    """Decode ``num_frames`` frames of ``video`` and preprocess them, timing each stage on its own clock."""
    t0 = time.perf_counter()
    frames, total = load_frames(video, num_frames)
    t1 = time.perf_counter()
    pixels = preprocess(frames)
    t2 = time.perf_counter()
    return Visual(pixels, total, {"video_decode": t1 - t0, "preprocess": t2 - t1}, frames)


@dataclass
class Prepared:
    """One sample's model inputs, before the adapter runs.

    Attributes:
        input_ids: ``[1, S]`` prompt ids with the adapter's placeholder.
        pixels: ``[1, T, 3, H, W]`` preprocessed frames.
        inputs: extra model inputs the family's prompt builds (none for most families).
        frames: ``[T, H0, W0, 3]`` uint8 sampled frames as decoded (for pictures).
        frames_in_video: the video's own frame count.
        timings: seconds of ``video_decode`` and ``preprocess``.
    """

    input_ids: torch.Tensor
    pixels: torch.Tensor
    inputs: dict[str, Any]
    frames: Any
    frames_in_video: int
    timings: dict[str, float]


@dataclass
class Backbone:
    """One loaded model with a strategy installed, answering one (video, prompt) at a time.

    Attributes:
        name: the model config's name.
        adapter: the family's :class:`~prune.adapters.VideoAdapter`.
        tokenizer: ``encode``/``decode``/``eos_token_ids``.
        num_frames: frames sampled per video.
        device: where the model runs.
        preprocess: ``[T, H, W, 3]`` uint8 frames to ``[1, T, 3, h, w]`` model pixels (the family's transform).
        prompt: ``(backbone, context)`` to ``([1, S]`` prompt ids, extra model inputs).
    """

    name: str
    adapter: VideoAdapter
    tokenizer: Any
    num_frames: int
    device: torch.device
    preprocess: Callable[[Any], torch.Tensor]
    prompt: Callable[[Backbone, str], tuple[torch.Tensor, dict[str, Any]]]
    warm: bool = False

    @property
    def llm_shape(self) -> LLMShape:
        """LLM dimensions for FLOPs (:mod:`prune.flops`)."""
        c = self.adapter.llm.lm.config
        heads = c.num_attention_heads
        return LLMShape(
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab=c.vocab_size,
        )

    def prompt_ids(self, context: str) -> torch.Tensor:
        """The family's chat prompt around ``context`` with one placeholder, as ``[1, S]`` ids."""
        return self.prompt(self, context)[0]

    def check_context(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError when the unpruned prompt (text + every visual token) exceeds the LLM's context.

        Checked on the unpruned count: the paired ``none`` run must fit for a fair comparison. The runner records
        the message as the sample's failure. An adapter with its own length rule (a ``max_input_tokens`` attribute:
        a family whose official code runs past the LLM's trained positions, or left-truncates the prompt) is left to
        that rule.
        """
        if hasattr(self.adapter, "max_input_tokens"):
            return
        context = getattr(self.adapter.llm.lm.config, "max_position_embeddings", None)
        h, w = self.adapter.grid
        visual = self.adapter.num_frames * h * w + self.adapter.separators_unpruned
        text = int((input_ids != self.adapter.placeholder_id).sum())
        if context and text + visual > context:
            raise ValueError(
                f"prompt too long: {text + visual} tokens ({text} text + {visual} visual) exceed the model's context "
                f"of {context} tokens"
            )

    def decode(self, video: str) -> Visual:
        """Decode, sample and preprocess ``video`` (:func:`decode_visual` with this backbone's frames and transform)."""
        return decode_visual(video, self.num_frames, self.preprocess)

    def prepare(self, video: str, context: str, visual: Visual | None = None) -> Prepared:
        """Decode, sample and preprocess ``video`` (unless ``visual`` already holds it) and build the prompt."""
        visual = visual if visual is not None else self.decode(video)
        ids, inputs = self.prompt(self, context)
        return Prepared(ids, visual.pixels, inputs, visual.frames, visual.frames_in_video, dict(visual.timings))

    def answer(
        self,
        video: str,
        context: str,
        gen_kwargs: Mapping[str, Any],
        evidence: Sequence[int] | None = None,
        evidence_grid: int | None = None,
        visual: Visual | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Answer ``context`` about ``video`` greedily.

        Args:
            video: path of the video (or frame folder).
            context: the task's prompt text.
            gen_kwargs: lmms-eval generation kwargs; ``max_new_tokens`` (default 16) and ``until`` are used.
            evidence: input visual-token indices (``[T*h*w]`` time-then-raster) the answer depends on (known-answer
                probe documents, :func:`eval.probe.evidence_tokens`); adds ``evidence_retention`` to the stats.
            evidence_grid: the side of the token grid ``evidence`` was computed for; must be the adapter's.
            visual: ``video`` already decoded and preprocessed (the input pipeline's prefetch or the decode cache);
                its measured stage times stand in the TTFT. None decodes it here.

        Returns:
            The answer text and the per-sample stats.
        """
        sample = self.prepare(video, context, visual)
        self.check_context(sample.input_ids)
        max_new = int(gen_kwargs.get("max_new_tokens") or 16)
        run = functools.partial(
            self.adapter.generate,
            sample.input_ids,
            sample.pixels,
            eos_token_ids=self.tokenizer.eos_token_ids,
            **sample.inputs,
        )
        if not self.warm:
            # Warm-up, untimed: the first call of a process pays for kernel selection, allocator growth and lazy
            # initialisation; every recorded sample is measured warm.
            run(max_new_tokens=2)
            self.warm = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = run(max_new_tokens=max_new)
        text = self.tokenizer.decode(gen.tokens)
        for stop in gen_kwargs.get("until") or []:
            if stop and stop in text:
                text = text[: text.index(stop)]
        timings = {**sample.timings, **gen.timings}
        ttft = sum(timings[k] for k in ("video_decode", "preprocess", "vision", "pre_llm", "prefill"))
        steps = gen.llm.new_tokens - 1  # the first token comes from the prefill
        stats = {
            "frames": self.num_frames,
            "frames_in_video": sample.frames_in_video,
            # decoded: by this run (inline or by the prefetch workers); cache: read from the decode cache, its stage
            # times measured when it was decoded in this timing environment (eval.frame_cache)
            "video_source": visual.source if visual is not None else "decoded",
            "text_tokens": int((sample.input_ids != self.adapter.placeholder_id).sum()),
            "visual_in": gen.visual_in,
            "visual_pre_llm": gen.visual_pre_llm,
            "separators": gen.separators,
            "separators_unpruned": self.adapter.separators_unpruned,
            "visual_per_layer": gen.llm.visual_per_layer,
            "tokens_per_layer": gen.llm.tokens_per_layer,
            "scoring": [list(s) for s in gen.llm.scoring],
            "kv_len_per_layer": gen.llm.kv_len_per_layer,
            "kv_bytes": gen.llm.kv_bytes,
            "kv_bytes_end": gen.llm.kv_bytes_end,
            "decode_keys": gen.llm.decode_keys,
            "decode_scoring": gen.llm.decode_scoring,
            "decode_visual": gen.llm.decode_visual,
            "vision_flops": gen.vision_flops,
            "pre_llm_flops": float(gen.pre.flops) if gen.pre is not None else 0.0,
            "new_tokens": gen.llm.new_tokens,
            # budget= runs: the knobs solved for this sample and what they achieve (prune.budget)
            "budget": asdict(gen.pre.solved) if gen.pre is not None and gen.pre.solved else None,
            "timings_s": timings,
            "ttft_s": ttft,
            "decode_s_per_token": timings["decode"] / steps if steps > 0 else None,
            # GPU: torch.cuda.max_memory_allocated over this sample's generate (reset above). CPU: the process's peak
            # resident set so far (it never decreases, so it bounds this sample's peak from above).
            "peak_mem_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if evidence is not None:
            from eval.probe import evidence_retention

            grid = getattr(self.adapter, "grid", None)
            if evidence_grid is not None and grid is not None and tuple(grid) != (evidence_grid, evidence_grid):
                raise ValueError(
                    f"the probe's evidence is on a {evidence_grid}x{evidence_grid} grid, this backbone pools to "
                    f"{grid[0]}x{grid[1]}; generate the set with benchmark.grid={grid[0]}"
                )
            if evidence and max(evidence) >= gen.visual_in:
                raise ValueError(
                    f"evidence token {max(evidence)} is outside this backbone's {gen.visual_in} visual tokens: the "
                    "probe set was generated for another frame count or grid (benchmark.num_frames / benchmark.grid)"
                )
            stats["evidence_retention"] = evidence_retention(evidence, gen.pre.assignment, gen.llm.kept)
        return text, stats


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError as err:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}") from err


def _discover_families() -> dict[str, Family]:
    """The ``FAMILY`` entry of every module in ``eval/families/``, by name, in module order."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(families.__path__), key=lambda m: m.name):
        entry = getattr(importlib.import_module(f"eval.families.{info.name}"), "FAMILY", None)
        if entry is None:
            continue  # the contract module, helpers
        if not isinstance(entry, Family):
            raise TypeError(f"eval/families/{info.name}.py: FAMILY must be a Family, got {type(entry).__name__}")
        if entry.name in found:
            raise ValueError(f"eval/families/{info.name}.py: family name {entry.name!r} is taken by another module")
        found[entry.name] = entry
    return found


FAMILIES: dict[str, Family] = _discover_families()
IMPLEMENTED = tuple(FAMILIES)


def check_available(cfg: Mapping[str, Any]) -> Family:
    """The family of a ``configs/model`` entry once its loader, tokenizer and weights check out (local files only).

    Raises:
        BackboneUnavailable: unknown family, or the weights or tokenizers are missing; the message says what to do.
        ValueError: an unknown loader or tokenizer for the family.
    """
    family_name, loader_name = cfg["family"], cfg["loader"]
    family = FAMILIES.get(family_name)
    if family is None:
        models = ", ".join(m for f in FAMILIES.values() for m in f.models)
        raise BackboneUnavailable(
            f"backbone {cfg['name']!r} (family {family_name!r}) has no adapter; available families: {IMPLEMENTED} "
            f"(models {models})"
        )
    if loader_name not in family.loaders:
        raise ValueError(f"model.loader must be one of {sorted(family.loaders)} for {family_name}, got {loader_name!r}")
    tokenizer_kind = cfg.get("tokenizer", "bytes")
    if tokenizer_kind not in ("bytes", "checkpoint"):
        raise ValueError(f"model.tokenizer must be bytes or checkpoint, got {tokenizer_kind!r}")
    if loader_name != "tiny" and not cfg.get("download", False):
        family.check(cfg)  # before anything slow: a missing checkpoint must not cost a model load or a network wait
    return family


def build_backbone(cfg: Mapping[str, Any], strategy: Strategy, device: str = "auto") -> Backbone:
    """Load the model a ``configs/model`` entry describes and install ``strategy`` on it.

    Args:
        cfg: the model config (``family``, ``loader``, ``checkpoint``, ``num_frames``, ``dtype``, ``tokenizer``, and
            the family's own keys, which its ``eval/families`` module reads).
        strategy: the pruning method to install.
        device: ``auto`` (CUDA when available), or a torch device string.

    Raises:
        BackboneUnavailable: unknown family, or the weights or tokenizers are missing; the message says what to do.
        ValueError: an unknown loader or dtype for the family.
    """
    family = check_available(cfg)
    tokenizer_kind, loader_name = cfg.get("tokenizer", "bytes"), cfg["loader"]
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    dtype = _dtype(cfg.get("dtype", "float32"))
    try:
        model = family.loaders[loader_name](cfg, dev, dtype, cfg.get("attn_implementation", "sdpa"))
    except FileNotFoundError as err:  # the converters name what to download
        raise BackboneUnavailable(str(err)) from err
    tokenizer = family.tiny_tokenizer() if tokenizer_kind == "bytes" else family.tokenizer(cfg)
    adapter = family.adapter(model, strategy, cfg)
    return Backbone(
        cfg["name"],
        adapter,
        tokenizer,
        int(cfg["num_frames"]),
        dev,
        preprocess=family.preprocess,
        prompt=family.prompt(cfg),
    )


def flops_of(stats: Mapping[str, Any], shape: LLMShape) -> dict[str, float]:
    """FLOPs of one sample from its logged per-layer token counts (:mod:`prune.flops`).

    Returns:
        ``prefill``/``prefill_full``: the papers' convention (FastV) as run and unpruned, for ``flops_ratio``;
        ``prefill_exact``/``prefill_exact_full``: executed FLOPs (GQA, SwiGLU, LM head) as run and unpruned, the run
        including the scoring rows of the in-LLM stages (``scoring``); ``decode_exact``: the decode steps as run
        (with a decode-time stage, from the keys every layer attended at every step, plus its scoring rows);
        ``pre_llm``: the method's work outside the LLM (vision-side inputs and the strategy's own pre-LLM FLOPs).
    """
    from prune.flops import (
        exact_decode_flops,
        exact_decode_flops_from_keys,
        exact_prefill_flops,
        prefill_flops,
        tokens_per_layer,
    )

    per_layer = stats.get("tokens_per_layer") or tokens_per_layer(
        stats["visual_per_layer"], stats["text_tokens"] + stats["separators"]
    )
    full_n = stats["text_tokens"] + stats["separators_unpruned"] + stats["visual_in"]
    full = [full_n] * shape.layers
    scoring = [tuple(s) for s in stats.get("scoring", [])]
    prefill_exact = exact_prefill_flops(per_layer, shape, scoring)
    return {
        "prefill": prefill_flops(per_layer, shape.hidden, shape.ffn),
        "prefill_full": prefill_flops(full, shape.hidden, shape.ffn),
        "prefill_exact": prefill_exact,
        "prefill_exact_full": exact_prefill_flops(full, shape),
        "scoring": prefill_exact - exact_prefill_flops(per_layer, shape),
        "decode_exact": (
            exact_decode_flops_from_keys(stats["decode_keys"], shape, stats.get("decode_scoring", ()))
            if stats.get("decode_keys")
            else exact_decode_flops(stats["kv_len_per_layer"], shape, stats["new_tokens"])
        ),
        "pre_llm": float(stats.get("vision_flops", 0.0)) + float(stats.get("pre_llm_flops", 0.0)),
    }
