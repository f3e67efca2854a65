"""Backbones for the eval spine: load a model per ``configs/model/*.yaml`` and answer one prompt about one video.

A :class:`Backbone` decodes the video with decord, samples frames uniformly (lmms-eval's ``linspace``), preprocesses
them without torchvision, builds the chat prompt, runs the pruned model through its adapter and returns the answer
with the per-sample stats the records need. Model surgery stays in ``prune/adapters``; this module is glue.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune.adapters import VideoAdapter
from prune.adapters.llava_onevision import LlavaOnevisionAdapter
from prune.adapters.preprocess import preprocess_video, sample_frame_indices
from prune.api import Strategy
from prune.flops import LLMShape

__all__ = ["Backbone", "BackboneUnavailable", "ByteTokenizer", "build_backbone", "load_frames"]

IM_START, IM_END = 151644, 151645  # Qwen2 chat special tokens
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
IMPLEMENTED = ("llava_onevision",)


class BackboneUnavailable(RuntimeError):
    """The backbone cannot be built here: missing weights or no adapter yet. The message says what to do."""


class ByteTokenizer:
    """Tokenizer-free ids for tiny random models: UTF-8 bytes as ids 0..255, Qwen chat markers as their real ids.

    Decoding maps every id to ``id % 256`` as a byte, so a random model's output is deterministic garbage text.
    """

    eos_token_ids = (IM_END,)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split("<|im_start|>")):
            if i:
                ids.append(IM_START)
            for j, piece in enumerate(part.split("<|im_end|>")):
                if j:
                    ids.append(IM_END)
                ids += list(piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids if i not in self.eos_token_ids).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tok) -> None:
        self.tok = tok
        ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        self.eos_token_ids = tuple(i for i in ids if isinstance(i, int) and i >= 0)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_frames(path: str, num_frames: int) -> tuple[Any, int]:
    """Decode ``num_frames`` uniformly sampled frames (lmms-eval's ``linspace`` over the whole clip).

    Args:
        path: an MP4 (any container decord reads) or a folder of frame images (MVBench's TVQA subtask).
        num_frames: frames to sample; a shorter video repeats frames, as ``np.linspace`` with int cast does.

    Returns:
        ``[T, H, W, 3]`` uint8 frames and the video's own frame count.

    Raises:
        FileNotFoundError: no such file. ValueError: the video has no decodable frame.
    """
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):  # a folder of frames
        from PIL import Image

        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise ValueError(f"frame folder has no .jpg/.png frames: {path}")
        idx = sample_frame_indices(len(files), num_frames)
        return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in idx]), len(files)
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as err:  # decord raises its own DECORDError for corrupt files
        raise ValueError(f"cannot decode video {path}: {err}") from err
    total = len(reader)
    if total == 0:
        raise ValueError(f"video has no frames: {path}")
    return reader.get_batch(sample_frame_indices(total, num_frames)).asnumpy(), total


@dataclass
class Prepared:
    """One sample's model inputs, before the adapter runs.

    Attributes:
        input_ids: ``[1, S]`` prompt ids with the adapter's placeholder.
        pixels: ``[1, T, 3, H, W]`` preprocessed frames.
        inputs: extra model inputs (ST-LLM: Q-Former question ids).
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
    preprocess: Callable[[Any], torch.Tensor] = preprocess_video
    prompt: Callable[[Backbone, str], tuple[torch.Tensor, dict[str, Any]]] = field(default=None)  # type: ignore[assignment]
    warm: bool = False

    def __post_init__(self) -> None:
        if self.prompt is None:
            self.prompt = qwen_prompt

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

    def prepare(self, video: str, context: str) -> Prepared:
        """Decode, sample and preprocess ``video`` and build the prompt for ``context``."""
        t0 = time.perf_counter()
        frames, total = load_frames(video, self.num_frames)
        t1 = time.perf_counter()
        pixels = self.preprocess(frames)
        t2 = time.perf_counter()
        ids, inputs = self.prompt(self, context)
        return Prepared(ids, pixels, inputs, frames, total, {"video_decode": t1 - t0, "preprocess": t2 - t1})

    def answer(self, video: str, context: str, gen_kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Answer ``context`` about ``video`` greedily.

        Args:
            video: path of the video (or frame folder).
            context: the task's prompt text.
            gen_kwargs: lmms-eval generation kwargs; ``max_new_tokens`` (default 16) and ``until`` are used.

        Returns:
            The answer text and the per-sample stats.
        """
        sample = self.prepare(video, context)
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
            "new_tokens": gen.llm.new_tokens,
            "timings_s": timings,
            "ttft_s": ttft,
            "decode_s_per_token": timings["decode"] / steps if steps > 0 else None,
            # GPU: torch.cuda.max_memory_allocated over this sample's generate (reset above). CPU: the process's peak
            # resident set so far (it never decreases, so it bounds this sample's peak from above).
            "peak_mem_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        return text, stats


def qwen_prompt(backbone: Backbone, context: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Qwen chat prompt (lmms-eval's ``qwen_1_5`` template) with one ``<video>`` placeholder before the text."""
    prefix = backbone.tokenizer.encode(QWEN_SYSTEM)
    suffix = backbone.tokenizer.encode("\n" + context + QWEN_ASSISTANT)
    return torch.tensor([prefix + [backbone.adapter.placeholder_id] + suffix]), {}


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError as err:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}") from err


def _require_local(checkpoint: str, download: bool) -> None:
    """Fail fast, before any network wait, when a hub checkpoint is not on this machine."""
    if download or os.path.isdir(checkpoint):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(checkpoint, "config.json"), str):
        raise BackboneUnavailable(
            f"weights for {checkpoint!r} are not on this machine (looked in {checkpoint!r} as a folder and in the "
            f"Hugging Face cache under HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). Get them with "
            f"`huggingface-cli download {checkpoint}`, or pass model.download=true to let from_pretrained fetch them."
        )


def build_backbone(cfg: Mapping[str, Any], strategy: Strategy, device: str = "auto") -> Backbone:
    """Load the model a ``configs/model`` entry describes and install ``strategy`` on it.

    Raises:
        BackboneUnavailable: no adapter for this family yet, or the weights are missing; the message says what to do.
    """
    family, loader = cfg["family"], cfg["loader"]
    if family not in IMPLEMENTED:
        raise BackboneUnavailable(
            f"backbone {cfg['name']!r} (family {family!r}) has no adapter yet; available families: {IMPLEMENTED} "
            "(models llava_ov, llava_video, tiny_llava_ov, tiny_llava_video)"
        )
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    dtype = _dtype(cfg.get("dtype", "float32"))
    attn = cfg.get("attn_implementation", "sdpa")
    if loader == "tiny":
        from prune.adapters.llava_onevision import tiny_llava_onevision

        model = tiny_llava_onevision(
            seed=int(cfg.get("seed", 0)), attn_implementation=attn, llm_layers=cfg["llm_layers"]
        )
        model = model.to(dev, dtype)
    elif loader == "hf":
        from prune.adapters.llava_onevision import load_llava_onevision

        _require_local(cfg["checkpoint"], bool(cfg.get("download", False)))
        model = load_llava_onevision(cfg["checkpoint"], dtype=dtype, attn_implementation=attn).to(dev)
    elif loader == "llava_video":
        from prune.adapters.convert_llava_video import load_llava_video

        _require_local(cfg["checkpoint"], bool(cfg.get("download", False)))
        model = load_llava_video(cfg["checkpoint"], dtype=dtype, attn_implementation=attn).to(dev)
    else:
        raise ValueError(f"model.loader must be tiny, hf or llava_video for {family}, got {loader!r}")
    if cfg.get("tokenizer", "bytes") == "bytes":
        tokenizer: Any = ByteTokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(cfg["checkpoint"]))
    adapter = LlavaOnevisionAdapter(model, strategy, cfg["layout"], num_frames=int(cfg["num_frames"]))
    return Backbone(cfg["name"], adapter, tokenizer, int(cfg["num_frames"]), dev)


def flops_of(stats: Mapping[str, Any], shape: LLMShape) -> dict[str, float]:
    """FLOPs of one sample from its logged per-layer token counts (:mod:`prune.flops`).

    Returns:
        ``prefill``/``prefill_full``: the papers' convention (FastV) as run and unpruned, for ``flops_ratio``;
        ``prefill_exact``/``prefill_exact_full``: executed FLOPs (GQA, SwiGLU, LM head) as run and unpruned, the run
        including the scoring rows of the in-LLM stages (``scoring``); ``decode_exact``: the decode steps as run.
    """
    from prune.flops import exact_decode_flops, exact_prefill_flops, prefill_flops, tokens_per_layer

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
        "decode_exact": exact_decode_flops(stats["kv_len_per_layer"], shape, stats["new_tokens"]),
    }
