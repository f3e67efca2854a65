"""Pictures of which visual tokens a strategy keeps, stage by stage, on the video frames (``make viz``).

:func:`selection_masks` turns one sample's pre-LLM output and in-LLM survivors into per-stage masks over the input
grid; :func:`draw_selection` draws them under the frames, like the PruneVid project-page picture: one row per stage
(the frames, pre-LLM, after each scoring layer), one column per shown frame. Kept cells appear as they are, dropped
cells washed out; cells merged into one token (a spatial cluster, or a static location averaged over a segment's
frames) share a tint and have no outline between them, so merges are visible within and across frames.

Shape legend: ``T`` frames, ``h x w`` token grid of one frame, ``N = T·h·w`` input visual tokens, ``n`` tokens
entering the LLM, ``k`` survivors of one in-LLM stage, ``H0 x W0`` decoded frame size, ``S`` displayed frame side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from prune.api import PreLLMOutput  # noqa: E402

__all__ = [
    "GROUPS",
    "PRE_LLM",
    "BenchmarkDoc",
    "benchmark_doc",
    "draw_selection",
    "selection_figure_size",
    "selection_masks",
]

PRE_LLM = "pre-LLM"
"""Key of the mask of the tokens that enter the LLM."""
GROUPS = "groups"
"""Key of the ``[T, h, w]`` long map: output token of each cell, -1 if dropped before the LLM."""

PANEL_IN = 1.92  # one frame panel, inches (192 px at DPI: half the 384 px model input, so 2-px outlines stay visible)
LABEL_IN = 1.8  # left strip for the row labels
TITLE_IN = 0.5  # top strip for the title and column labels (0.3 without a title)
FOOT_IN = 0.3  # bottom strip for the key
RIGHT_IN = 0.1  # right margin
DPI = 100
WASH = np.array([235.0, 235.0, 235.0])  # dropped cells are pulled towards this light grey
WASH_KEEP = 0.25  # ... keeping this much of the pixel
TINT_ALPHA = 0.3  # tint strength of merged tokens
# tab20 without the greys: distinct tints for neighbouring merged tokens
PALETTE = np.array(
    [matplotlib.colors.to_rgb(c) for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (14, 15)]
)


def selection_masks(
    pre: PreLLMOutput,
    kept: Sequence[Tensor],
    num_frames: int,
    grid: tuple[int, int],
    layers: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Which input grid cells survive each stage of one sample.

    Args:
        pre: the sample's pre-LLM output; ``pre.assignment`` ``[N]`` maps every input token (``t*h*w + i*w + j``)
            to the output token it was kept as or merged into, -1 if dropped.
        kept: one ``[k]`` long tensor per in-LLM stage, indices into ``pre.tokens`` of the survivors
            (``Generation.llm.kept``).
        num_frames: ``T``.
        grid: ``(h, w)``.
        layers: the scoring layer of each stage (``[s.layer for s in strategy.layer_specs]``); names the stages
            ``"after layer K"``. Without it they are ``"after stage i"``.

    Returns:
        ``{"pre-LLM": [T, h, w] bool, "after layer K": [T, h, w] bool, ..., "groups": [T, h, w] long}`` on the
        CPU, stages in order. A cell survives a stage when its output token does; a merged token's cells survive or
        go together, so every later mask is a subset of the earlier ones.

    Raises:
        ValueError: ``assignment`` does not cover ``T·h·w`` cells, an index of ``kept`` is outside ``0..n-1``, or
            ``layers`` and ``kept`` differ in length.
    """
    h, w = (int(g) for g in grid)
    assign = pre.assignment.detach().cpu().long()
    if assign.numel() != num_frames * h * w:
        raise ValueError(
            f"assignment has {assign.numel()} entries, expected T*h*w = {num_frames}*{h}*{w} = {num_frames * h * w}"
        )
    if layers is not None and len(layers) != len(kept):
        raise ValueError(f"{len(layers)} layers for {len(kept)} in-LLM stages")
    n = pre.n
    groups = assign.view(num_frames, h, w)
    masks = {PRE_LLM: groups >= 0}
    safe = groups.clamp(min=0)  # dropped cells index token 0; masked out by `groups >= 0`
    for i, survivors in enumerate(kept):
        survivors = survivors.detach().cpu().long().reshape(-1)
        if survivors.numel() and (int(survivors.min()) < 0 or int(survivors.max()) >= n):
            raise ValueError(f"kept[{i}] has indices outside 0..{n - 1}")
        alive = torch.zeros(n, dtype=torch.bool)
        alive[survivors] = True
        name = f"after layer {layers[i]}" if layers is not None else f"after stage {i + 1}"
        masks[name] = masks[PRE_LLM] & alive[safe]
    masks[GROUPS] = groups.clone()
    return masks


def selection_figure_size(n_stages: int, n_frames: int, title: bool = True, dpi: int = DPI) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of :func:`draw_selection`'s PNG: ``1 + n_stages`` rows, ``n_frames`` columns."""
    width = LABEL_IN + n_frames * PANEL_IN + RIGHT_IN
    height = (TITLE_IN if title else 0.3) + (1 + n_stages) * PANEL_IN + FOOT_IN
    return round(width * dpi), round(height * dpi)


def _square(frame: np.ndarray, size: int) -> np.ndarray:
    """``[H0, W0, 3]`` uint8 -> ``[S, S, 3]`` float, as the model's square input (bilinear)."""
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR), dtype=np.float64)


def _render(
    image: np.ndarray, keep: np.ndarray, groups: np.ndarray, sizes: np.ndarray, cell_rows: np.ndarray, cell_cols
) -> np.ndarray:
    """One panel: ``image`` ``[S, S, 3]``, per-cell ``keep``/``groups`` ``[h, w]`` -> ``[S, S, 3]`` uint8."""
    keep_px = keep[cell_rows[:, None], cell_cols[None, :]]  # [S, S] cell of every pixel, evenly spread
    group_px = groups[cell_rows[:, None], cell_cols[None, :]]
    out = image.copy()
    # Merged tokens (more than one cell, in this frame or across frames): same tint for all their cells.
    merged = keep_px & (sizes[np.clip(group_px, 0, None)] > 1) & (group_px >= 0)
    tint = PALETTE[np.clip(group_px, 0, None) % len(PALETTE)] * 255
    out[merged] = (1 - TINT_ALPHA) * out[merged] + TINT_ALPHA * tint[merged]
    out[~keep_px] = WASH_KEEP * out[~keep_px] + (1 - WASH_KEEP) * WASH
    # Outline token boundaries inside kept areas: a 2-px line where the cell to the right/below is another token.
    edge = np.zeros_like(keep_px)
    right = group_px[:, 1:] != group_px[:, :-1]
    down = group_px[1:, :] != group_px[:-1, :]
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    edge[1:, :] |= down
    edge[:-1, :] |= down
    edge &= keep_px
    out[edge] = 0.5 * out[edge] + 0.5 * 255
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_selection(
    frames,
    masks: Mapping[str, Tensor],
    grid: tuple[int, int],
    out_path: str | Path,
    max_frames: int = 8,
    title: str | None = None,
    display_size: int = 384,
    svg: bool = False,
) -> list[Path]:
    """Draw the frames and, under them, the cells each stage keeps.

    Args:
        frames: ``[T, H0, W0, 3]`` uint8 frames as sampled (``Prepared.frames``), numpy or torch.
        masks: from :func:`selection_masks`: stage name -> ``[T, h, w]`` bool, in row order, and optionally
            ``"groups"`` ``[T, h, w]`` long (tints and outlines merged tokens).
        grid: ``(h, w)``.
        out_path: the PNG to write (parents created).
        max_frames: most frames shown; an even subsample of the ``T`` frames when ``T`` is larger.
        title: figure title.
        display_size: side ``S`` each frame is resized to for display (the model's square input); the ``h x w``
            grid divides it evenly.
        svg: also write the figure as SVG next to the PNG.

    Returns:
        ``[png]`` or ``[png, svg]``.

    Raises:
        ValueError: frames not ``[T, H0, W0, 3]``, no stage mask, or a mask not ``[T, h, w]``.
    """
    frames = np.asarray(frames.cpu() if isinstance(frames, Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    frames = frames.astype(np.uint8, copy=False)
    t, (h, w) = frames.shape[0], (int(g) for g in grid)
    stages = {k: v for k, v in masks.items() if k != GROUPS}
    if not stages:
        raise ValueError("masks holds no stage mask")
    for name, mask in masks.items():
        if tuple(mask.shape) != (t, h, w):
            raise ValueError(f"mask {name!r} is {tuple(mask.shape)}, expected [T, h, w] = {(t, h, w)}")
    if GROUPS in masks:
        groups = masks[GROUPS].cpu().numpy().astype(np.int64)
    else:  # no merge information: every cell its own token
        groups = np.arange(t * h * w).reshape(t, h, w)
    sizes = np.bincount(groups[groups >= 0], minlength=max(1, int(groups.max()) + 1))  # cells per output token
    shown = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    cell_rows = np.arange(display_size) * h // display_size  # [S] grid row of every pixel row
    cell_cols = np.arange(display_size) * w // display_size

    width, height = selection_figure_size(len(stages), len(shown), title is not None)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    top = (TITLE_IN if title is not None else 0.3) * DPI / height
    panel_w, panel_h = PANEL_IN * DPI / width, PANEL_IN * DPI / height
    left = LABEL_IN * DPI / width
    total = t * h * w
    rows = [("original frames", None), *stages.items()]
    for r, (name, mask) in enumerate(rows):
        keep = None if mask is None else mask.cpu().numpy().astype(bool)
        if keep is None:
            label = f"original frames\n{frames.shape[2]}×{frames.shape[1]} px\nshown {display_size}²"
        else:
            tokens = np.unique(groups[keep]).size
            label = f"{name}\n{tokens} tokens\n({100 * tokens / total:.1f} % of {total})"
        for c, f in enumerate(shown):
            ax = fig.add_axes((left + c * panel_w, 1 - top - (r + 1) * panel_h, panel_w, panel_h))
            image = _square(frames[f], display_size)
            if keep is not None:
                image = _render(image, keep[f], groups[f], sizes, cell_rows, cell_cols)
            ax.imshow(image.astype(np.uint8), interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_linewidth(0.5)
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=9, pad=3)
        fig.text(0.01, 1 - top - (r + 0.5) * panel_h, label, ha="left", va="center", fontsize=9)
    if title is not None:
        fig.suptitle(title, y=1 - 0.05 * DPI / height, va="top", fontsize=10)
    fig.text(
        0.01,
        0.5 * FOOT_IN * DPI / height,
        f"kept: as is · dropped: washed out · tokens merged from several cells: one tint, no inner outline · "
        f"counts over all {t} frames",
        ha="left",
        va="center",
        fontsize=8,
        color="0.3",
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png")]
    fig.savefig(paths[0], dpi=DPI, metadata={"Software": None})
    if svg:
        paths.append(out.with_suffix(".svg"))
        with plt.rc_context({"svg.hashsalt": "vidprune"}):
            fig.savefig(paths[1], dpi=DPI, metadata={"Date": None})
    plt.close(fig)
    return paths


def benchmark_doc(data_dir: str | Path, benchmark: str, index: int) -> BenchmarkDoc:
    """One document of a local benchmark copy (the tiny bundle's layout, ``eval.benchmarks.BENCHMARKS``).

    The question text lists the options the way the task shows them, but it is not lmms-eval's exact prompt (that
    needs the task's own ``doc_to_text``); question-guided stages (PruneVid's layer-K scores) may select slightly
    differently than in an eval run.

    Args:
        data_dir: the benchmark folder (``data/tiny_bench``).
        benchmark: ``mvbench``, ``videomme``, ``egoschema`` or ``nextqa``.
        index: document number; MVBench counts through its subtasks in ``MVBENCH_SUBTASK_FOLDERS`` order.

    Returns:
        The :class:`BenchmarkDoc`.

    Raises:
        ValueError: unknown benchmark, or ``index`` out of range (the message gives the count).
        FileNotFoundError: no annotation file.
    """
    from eval.benchmarks import BENCHMARKS, MVBENCH_SUBTASK_FOLDERS

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}")
    bench, root = BENCHMARKS[benchmark], Path(data_dir).resolve()
    subs = (
        [s for s in MVBENCH_SUBTASK_FOLDERS if bench.annotation_path(root, s).is_file()]
        if benchmark == "mvbench"
        else [None]
    )
    docs = []
    for sub in subs:
        path = bench.annotation_path(root, sub)
        if not path.is_file():
            raise FileNotFoundError(f"no {benchmark} annotations at {path}")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        docs += [(sub, doc_id, json.loads(line)) for doc_id, line in enumerate(lines)]
    if not docs:
        raise FileNotFoundError(f"no {benchmark} annotations under {root}")
    if not 0 <= index < len(docs):
        raise ValueError(f"--doc {index} is out of range: {benchmark} under {root} has {len(docs)} documents")
    sub, doc_id, doc = docs[index]
    letters = "ABCDEFGH"
    if benchmark == "mvbench":
        video = root / bench.video_dir / MVBENCH_SUBTASK_FOLDERS[sub] / doc["video"]
        options = [f"({letters[i]}) {c}" for i, c in enumerate(doc["candidates"])]
    elif benchmark == "videomme":
        video = root / bench.video_dir / f"{doc['videoID']}.mp4"
        options = list(doc["options"])
    elif benchmark == "egoschema":
        video = root / bench.video_dir / f"{doc['video_idx']}.mp4"
        options = list(doc["option"])
    else:
        video = root / bench.video_dir / f"{str(doc['video']).removesuffix('.mp4')}.mp4"
        options = [f"{letters[i]}. {doc[f'a{i}']}" for i in range(5)]
    label = f"{benchmark}/{sub} #{doc_id}" if sub else f"{benchmark} #{doc_id}"
    return BenchmarkDoc(video=video, question="\n".join([doc["question"], *options]), label=label)


@dataclass(frozen=True)
class BenchmarkDoc:
    """One document to draw.

    Attributes:
        video: path of its video.
        question: the question with its options, one per line.
        label: ``<benchmark>[/<subtask>] #<doc_id>`` for titles; ``doc_id`` is the document's number in its own
            (sub)task, as lmms-eval and ``scores.jsonl`` number it.
    """

    video: Path
    question: str
    label: str
