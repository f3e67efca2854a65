"""Known-answer probe: synthetic videos whose answer and evidence are known, written as local lmms-eval tasks.

Published designs this follows (``../shared/reference/probe.md``): VideoNIAH / VNBench (arXiv 2406.09367) inserts
unrelated "needles" into haystack videos and generates the question by rule, so where the answer lives is known;
its retrieval, ordering and counting tasks are the ``needle``, ``order`` and ``count`` families here. We add
``detail`` (a small object present in every frame: what spatial pooling or merging destroys) and ``motion`` (an
object crossing the frame top to bottom or bottom to top: what frame dropping and temporal merging destroy).

Every video is ``num_frames`` frames of ``size x size`` pixels on a fixed plain grey background, stored losslessly as
a folder of PNG frames, so the backbone samples each frame exactly once (``load_frames`` reads frame folders) and no
codec blurs a small object. A family is one multiple-choice task ``probe_<family>`` whose options are the same four
words (``motion``: two) in the same order in every sample (:data:`OPTIONS`), so a letter names an answer; the answer
cycles through the options over a family's samples, so every letter is right equally often and any letter prior
scores chance (25 %, motion 50 %).
Fixed options are a deliberate choice for a probe model trained from scratch in minutes: with shuffled options the
model must also learn to look an answer word up among the options (a text skill no pruning method touches), and in
our CPU budget it did not get past the letter prior (docs/probe.md); with fixed options all it must learn is the
video. Circular evaluation (VNBench) is therefore not needed: no letter bias can score above chance.

========  ============================================================  ===========================  ======
family    video                                                         question (options)           chance
========  ============================================================  ===========================  ======
needle    one big square in one frame (or a 2-frame span), else empty   its colour (4 colours)       1/4
order     two big squares of different colours in different frames      which colour came first (4)  1/4
count     the whole frame white in 1-4 of the frames                    how many flashes (one-four)  1/4
detail    one small square at one place in every frame                  its colour (4 colours)       1/4
motion    one big square crossing the whole frame up or down            direction (2)                1/2
========  ============================================================  ===========================  ======

``chance`` is one over the options a video-blind model cannot rule out from the question: answers are uniform, so
the no-video control (``write_probe(blank=True)``, ``benchmark.blank=true``: the same documents over empty frames)
scores chance on every family. So does one random visual token with the committed model, though it need not: the
vision tower's attention mixes a frame's content into every patch token (docs/probe.md). ``motion`` is 2-way, as
the issue allows: with up and down too it stayed at chance in the first trained model.

**Evidence.** Each sample records the frames and the cells of the pooled ``grid x grid`` token grid (the
backbone's 14x14 after pooling for LLaVA-OneVision) whose pixels overlap what the answer depends on, as
``[[frame, [cell, ...]], ...]`` with ``cell = row * grid + col``. Flattened in the time-then-raster order of
:class:`prune.api.VideoTokens` (``frame * grid * grid + cell``) they are visual-token indices, from which
:func:`evidence_retention` computes the fraction that survives each stage of a pruning method.

The generator is deterministic from ``seed`` (a private ``random.Random``); the evaluation set uses one seed,
training uses others (:func:`sample_family` draws samples without files for the training script).

**Haystacks.** ``write_probe(haystack_dir=...)`` (``benchmark.haystack_dir``) paints the same samples over frames of
real videos instead of the grey background, as VNBench inserts needles into real footage: for real checkpoints (the
probe model was trained on grey only).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHANCE",
    "COLOURS",
    "FAMILIES",
    "FLASH_COLOUR",
    "LETTERS",
    "OPTIONS",
    "PAINT",
    "PROBE_VOCAB",
    "ProbeSample",
    "ProbeTokenizer",
    "evidence_cells",
    "evidence_retention",
    "evidence_tokens",
    "haystack_frames",
    "haystack_identity",
    "haystack_videos",
    "model_vocab",
    "render",
    "sample_family",
    "write_probe",
]

FAMILIES = ("needle", "order", "count", "detail", "motion")
LETTERS = "ABCD"
BACKGROUND = (128, 128, 128)  # fixed plain grey: varying backgrounds made nothing visual learnable at this size
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
COLOUR_NAMES = tuple(COLOURS)
FLASH_COLOUR = "white"  # count's flashes (see FLASH below)
PAINT = {**COLOURS, FLASH_COLOUR: (255, 255, 255)}  # every colour a box can have
COUNT_WORDS = ("one", "two", "three", "four")
# 2-way and vertical: the LLM reads a frame in raster order, so a square one row lower sits 14 positions later, one
# column to the right only 1 later; up/down was learned in 100 steps where left/right stayed at chance (docs/probe.md).
DIRECTIONS = ("up", "down")
OPTIONS = {
    "needle": COLOUR_NAMES,
    "order": COLOUR_NAMES,
    "count": COUNT_WORDS,
    "detail": COLOUR_NAMES,
    "motion": DIRECTIONS,
}  # fixed per family: the letter names the answer itself (see the module docstring)
CHANCE = {family: 1 / len(options) for family, options in OPTIONS.items()}
QUESTIONS = {
    "needle": "What colour was the flash?",
    "order": "Which colour came first?",
    "count": "How many flashes were there?",
    "detail": "What colour is the small dot?",
    "motion": "Which way does the square move?",
}
POST_PROMPT = "Answer with the option's letter."
BIG, SMALL = 112, 36  # square sides in pixels at size 384: ~4x4 and ~1.3x1.3 cells of the 14x14 grid
# count's flashes fill the whole frame (all 14x14 cells): the model counts by how much of the clip is coloured. With
# 112-px squares one flash moved that by ~1 % of the visual tokens, with 192-px ones by ~3 %, and count stayed at
# chance next to the other four families; whole frames move it by 12.5 % (docs/probe.md, "What training taught us").
# They are white, a colour no other family draws and no answer names: in one of the four answer colours count stayed
# at 55-70 % (adjacent counts confused), in white it reached 95-100 % (docs/probe.md)
FLASH = 384


@dataclass(frozen=True)
class Box:
    """An axis-aligned filled square, in pixels of a ``size x size`` frame.

    Attributes:
        frame: frame index.
        x, y: top-left corner (column, row).
        side: side length.
        colour: a key of :data:`PAINT` (an answer colour, or count's white).
    """

    frame: int
    x: int
    y: int
    side: int
    colour: str


@dataclass(frozen=True)
class ProbeSample:
    """One generated question with its video description and evidence.

    Attributes:
        family: one of :data:`FAMILIES`.
        index: position within the family (the answer is ``OPTIONS[family][index % len(OPTIONS[family])]``).
        options: the option texts in letter order (:data:`OPTIONS` of the family: 4, or 2 for ``motion``).
        answer: the correct letter.
        boxes: everything drawn; a frame without a box is plain background.
        evidence_boxes: indices into ``boxes`` of what the answer depends on.
        num_frames: frames in the video.
        size: frame side in pixels.
    """

    family: str
    index: int
    options: tuple[str, ...]
    answer: str
    boxes: tuple[Box, ...]
    evidence_boxes: tuple[int, ...]
    num_frames: int
    size: int

    @property
    def question(self) -> str:
        """The prompt text: question, lettered options and the post-prompt."""
        lines = [
            QUESTIONS[self.family],
            *(f"{letter}. {opt}" for letter, opt in zip(LETTERS, self.options, strict=False)),
        ]
        return "\n".join([*lines, POST_PROMPT])


# -- sampling -------------------------------------------------------------------------------------------------------


def _place(rng: random.Random, side: int, size: int) -> tuple[int, int]:
    return rng.randrange(0, size - side + 1), rng.randrange(0, size - side + 1)


def sample_family(family: str, index: int, rng: random.Random, num_frames: int = 8, size: int = 384) -> ProbeSample:
    """Draw one sample of ``family`` with ``rng`` (no files).

    Args:
        family: one of :data:`FAMILIES`.
        index: position within the family; decides the answer (``OPTIONS[family][index % len(OPTIONS[family])]``).
        rng: the generator's private random stream.
        num_frames: frames of the video (>= 2; ``count`` asks up to ``min(4, num_frames)`` flashes).
        size: frame side in pixels.

    Raises:
        ValueError: unknown family or fewer than 2 frames.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown probe family {family!r}; known: {FAMILIES}")
    if num_frames < 2:
        raise ValueError(f"probe videos need at least 2 frames, got {num_frames}")
    t = num_frames
    big = round(BIG * size / 384)
    # The answer cycles through the family's fixed options, so every letter is right as often; a clip of fewer than 4
    # frames cannot show 3 or 4 flashes, so count then cycles through the counts it can show (the training curriculum
    # starts at 2 frames; the evaluation videos have 8).
    answer = index % (min(4, t) if family == "count" else len(OPTIONS[family]))
    if family == "needle":
        colour = COLOUR_NAMES[answer]
        span = 2 if t >= 4 and rng.random() < 0.5 else 1
        start = rng.randrange(0, t - span + 1)
        x, y = _place(rng, big, size)
        boxes = tuple(Box(start + k, x, y, big, colour) for k in range(span))
        evidence = tuple(range(span))
    elif family == "order":
        first = COLOUR_NAMES[answer]
        second = rng.choice([c for c in COLOUR_NAMES if c != first])
        i, j = sorted(rng.sample(range(t), 2))
        (x1, y1), (x2, y2) = _place(rng, big, size), _place(rng, big, size)
        boxes = (Box(i, x1, y1, big, first), Box(j, x2, y2, big, second))
        evidence = (0, 1)
    elif family == "count":
        k = answer + 1
        frames = sorted(rng.sample(range(t), k))
        colour = FLASH_COLOUR
        flash = round(FLASH * size / 384)
        x, y = _place(rng, flash, size)
        boxes = tuple(Box(f, x, y, flash, colour) for f in frames)
        evidence = tuple(range(k))
    elif family == "detail":
        colour = COLOUR_NAMES[answer]
        small = round(SMALL * size / 384)
        x, y = _place(rng, small, size)
        boxes = tuple(Box(f, x, y, small, colour) for f in range(t))
        evidence = tuple(range(t))
    else:  # motion: a big square crosses the frame up or down, linearly over the frames, in one column
        colour = rng.choice(COLOUR_NAMES)
        track = np.linspace(0, size - big, t).round().astype(int)
        if DIRECTIONS[answer] == "up":
            track = track[::-1]
        x = rng.randrange(0, size - big + 1)
        boxes = tuple(Box(f, x, int(track[f]), big, colour) for f in range(t))
        evidence = tuple(range(t))
    return ProbeSample(family, index, OPTIONS[family], LETTERS[answer], boxes, evidence, t, size)


def generate(
    seed: int, per_family: int, families: Sequence[str] = FAMILIES, num_frames: int = 8, size: int = 384
) -> list[ProbeSample]:
    """Every sample of a probe set: ``per_family`` of each family, deterministic from ``seed``.

    Each family draws from its own stream (seeded by ``seed`` and the family name), so adding a family or changing
    ``per_family`` of one does not change another family's samples.
    """
    samples = []
    for family in families:
        rng = random.Random(f"vidprune-probe/{seed}/{family}")
        samples += [sample_family(family, i, rng, num_frames, size) for i in range(per_family)]
    return samples


# -- the probe model's tokenizer ------------------------------------------------------------------------------------

# Every word of the Qwen chat template (eval.families.llava_onevision.QWEN_SYSTEM/QWEN_ASSISTANT) and of the
# questions, fixed here because the committed checkpoint's embedding rows are indexed by it (a test checks that no
# prompt hits <unk>).
PROBE_VOCAB = (
    "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "\n", ".", "?", "'", ",",
    *LETTERS, *COLOURS, *COUNT_WORDS, *DIRECTIONS,
    "system", "You", "are", "a", "helpful", "assistant", "user",
    "What", "Which", "How", "colour", "was", "the", "flash", "came", "first", "many", "flashes", "were", "there",
    "is", "small", "dot", "way", "does", "square", "move", "Answer", "with", "option", "s", "letter",
)  # fmt: skip


class ProbeTokenizer:
    """Word-level ids over :data:`PROBE_VOCAB` for the probe model (``tokenizer: probe``).

    Words, single punctuation marks, newlines and the chat markers are tokens; spaces are dropped; anything else is
    ``<unk>``. Decoding joins the words with spaces (the model answers one letter).
    """

    _split = re.compile(r"<\|im_start\|>|<\|im_end\|>|<video>|<image>|\n|[A-Za-z]+|[^\sA-Za-z]")

    def __init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(PROBE_VOCAB)}
        self.unk_id = self.ids["<unk>"]
        self.eos_token_ids = (self.ids["<|im_end|>"],)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in self._split.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        words = [PROBE_VOCAB[i] for i in ids if 0 <= i < len(PROBE_VOCAB) and i not in self.eos_token_ids]
        return " ".join(w for w in words if w != "<pad>")


# -- rendering and evidence -----------------------------------------------------------------------------------------


def render(sample: ProbeSample, background: np.ndarray | None = None) -> np.ndarray:
    """The video as ``[T, size, size, 3]`` uint8 frames.

    The boxes are painted over ``background`` (``[T, size, size, 3]`` uint8, e.g. :func:`haystack_frames`), or over
    the plain grey :data:`BACKGROUND` when it is None.
    """
    shape = (sample.num_frames, sample.size, sample.size, 3)
    if background is not None and background.shape != shape:
        raise ValueError(f"background frames have shape {background.shape}; the sample needs {shape}")
    video = np.empty(shape, dtype=np.uint8)
    video[:] = BACKGROUND if background is None else background
    for b in sample.boxes:
        video[b.frame, b.y : b.y + b.side, b.x : b.x + b.side] = PAINT[b.colour]
    return video


def _cells(lo: int, hi: int, size: int, grid: int) -> range:
    """Grid indices whose pixel span ``[i*size/grid, (i+1)*size/grid)`` overlaps pixels ``[lo, hi)``."""
    return range(lo * grid // size, min(grid, -(-hi * grid // size)))


def evidence_cells(sample: ProbeSample, grid: int = 14) -> list[list[Any]]:
    """``[[frame, [cell, ...]], ...]``: the cells of the ``grid x grid`` pooled token grid that hold the evidence.

    A cell counts when its pixel span overlaps an evidence box (pooling mixes every overlapping pixel into it).
    """
    by_frame: dict[int, set[int]] = {}
    for i in sample.evidence_boxes:
        b = sample.boxes[i]
        cells = by_frame.setdefault(b.frame, set())
        for r in _cells(b.y, b.y + b.side, sample.size, grid):
            cells.update(r * grid + c for c in _cells(b.x, b.x + b.side, sample.size, grid))
    return [[f, sorted(c)] for f, c in sorted(by_frame.items())]


def evidence_tokens(evidence: Iterable[Sequence[Any]], grid: int = 14) -> list[int]:
    """Visual-token indices (time-then-raster, ``frame * grid**2 + cell``) of ``evidence_cells`` output."""
    return sorted(int(f) * grid * grid + int(c) for f, cells in evidence for c in cells)


def evidence_retention(
    evidence: Sequence[int], assignment: Any, kept: Sequence[Any] = ()
) -> dict[str, float | list[float]]:
    """Fraction of the evidence tokens that survive each stage of a pruning method.

    A merged token survives when it contains an evidence token, so evidence "survives" the pre-LLM stage when its
    input token is assigned to some output token, and an in-LLM stage when that output token is still kept.

    Args:
        evidence: ``[E]`` input visual-token indices of the evidence.
        assignment: ``[N]`` long, ``PreLLMOutput.assignment``: the output token each input token became, -1 if dropped.
        kept: per in-LLM stage, ``[k]`` indices into the pre-LLM output of the survivors (``PrefillStats.kept``).

    Returns:
        ``{"pre_llm": f, "stages": [f, ...]}``, each the fraction of ``evidence`` still present after that stage
        (cumulative: a token dropped earlier stays dropped); 1.0 for all when there is no evidence.
    """
    import torch

    ev = torch.as_tensor(list(evidence), dtype=torch.long)
    assignment = torch.as_tensor(assignment).cpu()
    if ev.numel() == 0:
        return {"pre_llm": 1.0, "stages": [1.0] * len(kept)}
    out = assignment[ev]
    alive = out >= 0
    result: dict[str, Any] = {"pre_llm": float(alive.float().mean()), "stages": []}
    for k in kept:
        survivors = torch.as_tensor(k).cpu()
        alive = alive & torch.isin(out, survivors)
        result["stages"].append(float(alive.float().mean()))
    return result


# -- real-video haystacks (benchmark.haystack_dir) ---------------------------------------------------------------

HAYSTACK_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")  # video files (decord); or folders of .jpg/.png frames


def haystack_videos(haystack_dir: Path | str) -> list[Path]:
    """The haystack videos of a folder, sorted by name: video files and folders of frame images, one level deep.

    Raises:
        ValueError: the folder does not exist or holds no video (the message lists what is accepted).
    """
    from eval.frames import FRAME_SUFFIXES

    folder = Path(haystack_dir).expanduser()
    accepted = f"video files ({' '.join(HAYSTACK_SUFFIXES)}) or folders of .jpg/.png frames"
    if not folder.is_dir():
        raise ValueError(
            f"benchmark.haystack_dir={str(haystack_dir)!r} is not a folder; expected a folder of {accepted}"
        )
    videos = sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() and p.suffix.lower() in HAYSTACK_SUFFIXES)
        or (p.is_dir() and any(q.suffix.lower() in FRAME_SUFFIXES for q in p.iterdir()))
    )
    if not videos:
        raise ValueError(f"benchmark.haystack_dir={str(haystack_dir)!r} holds no video; expected {accepted}")
    return videos


def haystack_identity(videos: Sequence[Path]) -> str:
    """12 hex digits naming a haystack.

    Hashes every video's name and fingerprint (size, mtime, edge bytes; frame folders: their files'), so a changed,
    added or re-copied video names another probe set and never reuses this one's.
    """
    from eval.keys import stable_hash, video_fingerprint

    return stable_hash([(p.name, video_fingerprint(p)) for p in videos], 12)


def pick_haystack(videos: Sequence[Path], seed: int, sample: ProbeSample) -> Path:
    """The haystack video of one sample.

    Drawn from its own stream (``seed``, family, index), so the samples themselves (boxes, answers, evidence) are
    those of the plain set of ``seed`` and adding haystack videos moves no needle.
    """
    rng = random.Random(f"vidprune-probe-haystack/{seed}/{sample.family}/{sample.index}")
    return videos[rng.randrange(len(videos))]


def haystack_frames(path: Path | str, num_frames: int, size: int) -> np.ndarray:
    """``[T, size, size, 3]`` uint8: a haystack video as the probe's frames.

    ``num_frames`` frames sampled uniformly over the whole video (as the backbones sample,
    :func:`eval.frames.load_frames`), each centre-cropped to a square and resized to ``size`` (bicubic), so the
    needle boxes keep their pixel geometry and evidence cells.

    Raises:
        ValueError: the video cannot be decoded (the message names it).
    """
    from PIL import Image

    from eval.frames import load_frames

    try:
        frames, _ = load_frames(str(path), num_frames)
    except (OSError, ValueError) as err:
        raise ValueError(f"haystack video {path} cannot be read: {err}") from err
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        h, w = frame.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = Image.fromarray(np.ascontiguousarray(frame[top : top + side, left : left + side]))
        out[t] = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))
    return out


# -- writing the lmms-eval tasks ------------------------------------------------------------------------------------

_UTILS = '''"""Generated by eval.probe.write_probe: the known-answer probe tasks, scored by exact letter match."""

import os
import re

DATA_DIR = {data_dir!r}


def probe_doc_to_visual(doc):
    """[path] of the sample's frame folder."""
    return [os.path.join(DATA_DIR, doc["video"])]


def probe_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question with its lettered options and the post-prompt."""
    return doc["question"]


def probe_parse(response):
    """The first standalone option letter A-D in the response, or "" when none."""
    found = re.search(r"\\b([ABCD])\\b", response or "")
    return found.group(1) if found else ""


def probe_process_results(doc, results):
    """1.0 when the parsed letter is the answer."""
    return {{"probe_accuracy": float(probe_parse(results[0]) == doc["answer"])}}
'''

_TASK = """# Generated by eval.probe.write_probe; edits are overwritten.
task: probe_{family}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {annotation}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.probe_doc_to_visual
doc_to_text: !function utils.probe_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  until: []
  do_sample: false
process_results: !function utils.probe_process_results
metric_list:
  - metric: probe_accuracy
    aggregation: mean
    higher_is_better: true
"""


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_probe(
    data_dir: Path | str,
    seed: int,
    per_family: int,
    families: Sequence[str] = FAMILIES,
    num_frames: int = 8,
    size: int = 384,
    grid: int = 14,
    blank: bool = False,
    haystack_dir: Path | str | None = None,
) -> tuple[Path, list[str]]:
    """Write a probe set and its lmms-eval tasks under ``data_dir`` (idempotent: same inputs, same bytes).

    Layout::

        <data_dir>/videos/<family>_<index>/<frame>.png     # one folder of PNG frames per sample
        <data_dir>/probe/<family>.jsonl                    # one document per sample (question, answer, evidence)
        <data_dir>/lmms_tasks/probe/probe_<family>.yaml    # the local lmms-eval task
        <data_dir>/lmms_tasks/probe/utils.py

    Args:
        data_dir: output folder; one folder per (seed, frames, size) set, since a rewrite replaces the documents.
        seed: the generator seed (the evaluation set uses one, training others).
        per_family: samples per family (a multiple of 4 keeps every letter equally often right).
        families: which families to write.
        num_frames: frames per video; set it to the model's frame count, so frame sampling is the identity.
        size: frame side in pixels (384 for SigLIP-384 backbones: no resize).
        grid: side of the backbone's pooled token grid, for the evidence cells.
        blank: the no-video control: every frame is the empty background, the questions, answers and evidence are
            the set's own (``benchmark.blank=true``; the documents say ``"blank": true``, so no record of the real
            set is reused for it).
        haystack_dir: a folder of real videos (:func:`haystack_videos`): each sample's boxes are painted over
            ``num_frames`` frames of one of them (:func:`pick_haystack`, :func:`haystack_frames`) instead of the
            grey background; the samples, answers and evidence are the plain set's, and the documents name the video
            (``"haystack"``). With ``blank`` the frames are the haystack alone (the no-needle control).

    Returns:
        ``(include_path, task_names)`` for ``lmms_eval.tasks.TaskManager(include_path=...)``.

    Raises:
        ValueError: an unknown family, fewer than one sample per family, a haystack folder without videos, or a
            haystack video that cannot be read.
    """
    from PIL import Image

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown probe families {unknown}; known: {FAMILIES}")
    if per_family < 1:
        raise ValueError(f"benchmark.per_family must be >= 1, got {per_family}")
    videos = haystack_videos(haystack_dir) if haystack_dir is not None else []
    identities = {video: haystack_identity([video]) for video in videos}  # fingerprinted once, not once a sample
    data_dir = Path(data_dir).resolve()
    root = data_dir / "lmms_tasks" / "probe"
    by_family: dict[str, list[ProbeSample]] = {}
    for s in generate(seed, per_family, families, num_frames, size):
        by_family.setdefault(s.family, []).append(s)
    tasks = []
    for family, samples in by_family.items():
        docs = []
        for s in samples:
            video = f"videos/{family}_{s.index:04d}"
            folder = data_dir / video
            hay = pick_haystack(videos, seed, s) if videos else None
            # what the frames show; re-rendered when it differs (a plain set's stamp is what it was before haystacks)
            stamp = json.dumps({**asdict(s), "blank": blank, **({"haystack": identities[hay]} if hay else {})})
            if not (folder / "done").is_file() or (folder / "done").read_text() != stamp:
                background = haystack_frames(hay, num_frames, size) if hay else None  # fails before any write
                folder.mkdir(parents=True, exist_ok=True)
                video_frames = render(replace(s, boxes=()) if blank else s, background)
                for f, frame in enumerate(video_frames):
                    Image.fromarray(frame).save(folder / f"{f:04d}.png")
                (folder / "done").write_text(stamp)
            docs.append(
                {
                    "id": f"{family}_{s.index:04d}",
                    "family": family,
                    "video": video,
                    "question": s.question,
                    "options": list(s.options),
                    "answer": s.answer,
                    "evidence": evidence_cells(s, grid),
                    "grid": grid,
                    "seed": seed,
                    **({"blank": True} if blank else {}),
                    **({"haystack": hay.name} if hay else {}),
                }
            )
        annotation = data_dir / "probe" / f"{family}.jsonl"
        _write_if_changed(annotation, "".join(json.dumps(d) + "\n" for d in docs).encode())
        _write_if_changed(root / f"probe_{family}.yaml", _TASK.format(family=family, annotation=annotation).encode())
        tasks.append(f"probe_{family}")
    _write_if_changed(root / "utils.py", _UTILS.format(data_dir=str(data_dir)).encode())
    return root.parent, tasks


def model_vocab() -> dict[str, int]:
    """The probe model's vocabulary settings for :func:`prune.adapters.llava_onevision.tiny_config`."""
    return {
        "vocab_size": len(PROBE_VOCAB),
        "image_token_id": PROBE_VOCAB.index("<image>"),
        "video_token_id": PROBE_VOCAB.index("<video>"),
    }
