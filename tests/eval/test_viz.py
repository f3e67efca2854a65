"""Token-selection pictures: masks from hand-built pre-LLM outputs, the drawing, and scripts/viz.py end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eval.runner import REPO
from eval.viz import GROUPS, PRE_LLM, benchmark_doc, draw_selection, selection_figure_size, selection_masks
from prune.api import PreLLMOutput

sys.path.insert(0, str(REPO / "scripts"))
import viz as viz_script  # noqa: E402


def _pre(assignment: list[int], n: int) -> PreLLMOutput:
    return PreLLMOutput(tokens=torch.zeros(n, 4), assignment=torch.tensor(assignment, dtype=torch.long))


def test_pruning_masks_are_the_exact_cells():
    # T=2 frames of a 2x3 grid: 12 cells; 5 survive the pre-LLM stage as tokens 0..4, in order.
    assignment = [0, -1, 1, -1, -1, 2, -1, 3, -1, -1, 4, -1]
    kept = [torch.tensor([1, 3, 4]), torch.tensor([3])]
    masks = selection_masks(_pre(assignment, 5), kept, num_frames=2, grid=(2, 3), layers=[3, 7])
    assert list(masks) == [PRE_LLM, "after layer 3", "after layer 7", GROUPS]
    expect_pre = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 0], [0, 1, 0]]], dtype=torch.bool)
    assert torch.equal(masks[PRE_LLM], expect_pre)
    # token 1 = cell (0,0,2), token 3 = (1,0,1), token 4 = (1,1,1)
    expect_3 = torch.zeros(2, 2, 3, dtype=torch.bool)
    expect_3[0, 0, 2] = expect_3[1, 0, 1] = expect_3[1, 1, 1] = True
    assert torch.equal(masks["after layer 3"], expect_3)
    expect_7 = torch.zeros(2, 2, 3, dtype=torch.bool)
    expect_7[1, 0, 1] = True
    assert torch.equal(masks["after layer 7"], expect_7)
    assert torch.equal(masks[GROUPS], torch.tensor(assignment).view(2, 2, 3))
    assert masks[PRE_LLM].dtype == torch.bool and masks[GROUPS].dtype == torch.long


def test_merged_tokens_keep_or_drop_all_their_cells():
    # T=2, grid 1x3. Token 0: a static location merged over both frames (cells (0,0,0) and (1,0,0)).
    # Token 1: a spatial merge of (0,0,1),(0,0,2). Token 2: (1,0,1). Cell (1,0,2) dropped.
    assignment = [0, 1, 1, 0, 2, -1]
    masks = selection_masks(_pre(assignment, 3), [torch.tensor([0, 2])], num_frames=2, grid=(1, 3))
    assert list(masks) == [PRE_LLM, "after stage 1", GROUPS]  # no layers given
    assert masks[PRE_LLM].flatten().tolist() == [True, True, True, True, True, False]
    assert masks["after stage 1"].flatten().tolist() == [True, False, False, True, True, False]
    groups = masks[GROUPS]
    assert groups[0, 0, 0] == groups[1, 0, 0] == 0 and groups[0, 0, 1] == groups[0, 0, 2] == 1


@pytest.mark.parametrize("seed", range(5))
def test_later_stages_are_subsets(seed):
    # A random merge-and-drop assignment with nested survivors, as PrunedLM produces them.
    g = torch.Generator().manual_seed(seed)
    t, h, w, n = 4, 5, 6, 40
    assignment = torch.randint(-1, n, (t * h * w,), generator=g)
    assignment[:n] = torch.arange(n)  # every token has a cell
    first = torch.sort(torch.randperm(n, generator=g)[:20]).values
    second = first[torch.sort(torch.randperm(20, generator=g)[:7]).values]
    masks = selection_masks(_pre(assignment.tolist(), n), [first, second], t, (h, w), layers=[2, 5])
    pre, a, b = masks[PRE_LLM], masks["after layer 2"], masks["after layer 5"]
    assert bool((a <= pre).all()) and bool((b <= a).all())
    assert masks[GROUPS][a].unique().tolist() == first.tolist()
    assert masks[GROUPS][b].unique().tolist() == second.tolist()


def test_mask_errors():
    with pytest.raises(ValueError, match="expected T\\*h\\*w"):
        selection_masks(_pre([0, 1, 2], 3), [], num_frames=2, grid=(1, 2))
    with pytest.raises(ValueError, match="outside 0..2"):
        selection_masks(_pre([0, 1, 2, -1], 3), [torch.tensor([3])], num_frames=2, grid=(1, 2))
    with pytest.raises(ValueError, match="1 layers for 2"):
        selection_masks(_pre([0, 1, 2, -1], 3), [torch.tensor([0]), torch.tensor([0])], 2, (1, 2), layers=[1])


def _frames(t: int = 6, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = np.full((t, h, w, 3), 40, np.uint8)
    frames[:, 4:12, 4:12] = rng.integers(150, 255, size=3, dtype=np.uint8)
    return frames


def test_draw_selection_layout_and_pixels(tmp_path):
    t, grid = 6, (2, 2)
    frames = _frames(t)
    # cell (0,0) dropped everywhere pre-LLM, the rest kept; after layer 1 only frame 0's cells survive.
    assignment = torch.arange(t * 4)
    assignment[0::4] = -1
    kept_cells = assignment[:4][assignment[:4] >= 0]
    masks = selection_masks(_pre(assignment.tolist(), t * 4), [kept_cells], t, grid, layers=[1])
    out = draw_selection(frames, masks, grid, tmp_path / "sub" / "sel.png", max_frames=4, title="test", svg=True)
    assert [p.name for p in out] == ["sel.png", "sel.svg"] and all(p.stat().st_size > 1000 for p in out)
    with Image.open(out[0]) as image:
        image.load()
        assert image.size == selection_figure_size(n_stages=2, n_frames=4, title=True)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # Sample the centre of cell (0,0) (dropped: washed out, light) and of cell (1,1) (kept: the dark background)
    # in the first panel of the pre-LLM row, from the same geometry draw_selection uses.
    from eval import viz

    dpi = viz.DPI
    x0 = round(viz.LABEL_IN * dpi)
    y0 = round((viz.TITLE_IN + viz.PANEL_IN) * dpi)  # top of row 2 (pre-LLM)
    quarter = round(viz.PANEL_IN * dpi / 4)
    dropped = pixels[y0 + quarter, x0 + quarter]
    kept = pixels[y0 + 3 * quarter, x0 + 3 * quarter]
    assert dropped.min() > 150 and kept.max() < 100, (dropped, kept)
    # After layer 1, frame 0 keeps (1,1); the next shown frame (2) keeps nothing: its (1,1) is washed out.
    y1 = y0 + round(viz.PANEL_IN * dpi)
    panel = round(viz.PANEL_IN * dpi)
    assert pixels[y1 + 3 * quarter, x0 + 3 * quarter].max() < 100
    assert pixels[y1 + 3 * quarter, x0 + panel + 3 * quarter].min() > 150


def test_draw_selection_subsamples_frames_and_checks_shapes(tmp_path):
    frames = _frames(10)
    masks = {PRE_LLM: torch.ones(10, 2, 2, dtype=torch.bool)}
    (png,) = draw_selection(torch.from_numpy(frames), masks, (2, 2), tmp_path / "a.png", max_frames=3)
    with Image.open(png) as image:
        assert image.size == selection_figure_size(1, 3, title=False)
    with pytest.raises(ValueError, match="expected \\[T, h, w\\]"):
        draw_selection(frames, {PRE_LLM: torch.ones(9, 2, 2, dtype=torch.bool)}, (2, 2), tmp_path / "b.png")
    with pytest.raises(ValueError, match="no stage mask"):
        draw_selection(frames, {GROUPS: torch.zeros(10, 2, 2, dtype=torch.long)}, (2, 2), tmp_path / "c.png")
    with pytest.raises(ValueError, match="frames must be"):
        draw_selection(frames[..., 0], masks, (2, 2), tmp_path / "d.png")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny_bench"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_bench.py"), "--out", str(out)], check=True)
    return out


def test_benchmark_doc_reads_each_benchmark(bundle):
    first = benchmark_doc(bundle, "mvbench", 0)  # object_interaction comes first in MVBENCH_SUBTASK_FOLDERS
    assert first.video.is_file() and first.label == "mvbench/object_interaction #0"
    assert first.question.splitlines() == [
        "Which object was taken by the person?",
        "(A) The cup/glass/bottle.",
        "(B) The book.",
        "(C) The towel.",
        "(D) The box.",
    ]
    assert benchmark_doc(bundle, "mvbench", 2).label == "mvbench/action_antonym #1"
    for name in ("videomme", "egoschema", "nextqa"):
        doc = benchmark_doc(bundle, name, 2)
        assert doc.video.is_file() and doc.video.suffix == ".mp4" and len(doc.question.splitlines()) >= 5, name
    with pytest.raises(ValueError, match="has 3 documents"):
        benchmark_doc(bundle, "videomme", 3)
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmark_doc(bundle, "nope", 0)


def test_script_end_to_end_on_the_tiny_model(bundle, tmp_path, capsys):
    out = tmp_path / "viz" / "pv.png"
    code = viz_script.main(
        [
            "--out",
            str(out),
            "--bench",
            "videomme",
            "--max-frames",
            "4",
            f"benchmark.data_dir={bundle}",
            "benchmark.build=false",
            "ratio=0.4",
            "threads=2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "videomme #0" in printed
    assert "[viz] pre-LLM:" in printed and "[viz] after layer 1:" in printed  # tiny PruneVid scores layer 1
    with Image.open(out) as image:
        image.load()
        assert image.size == selection_figure_size(n_stages=2, n_frames=4, title=True)


def test_script_overrides_replace_the_defaults():
    assert viz_script._overrides([]) == ["model=tiny_llava_ov", "prune=prunevid", "benchmark=tiny"]
    assert viz_script._overrides(["prune=fastv", "ratio=0.3"]) == [
        "model=tiny_llava_ov",
        "benchmark=tiny",
        "prune=fastv",
        "ratio=0.3",
    ]
    with pytest.raises(SystemExit):
        viz_script._overrides(["--oops"])
