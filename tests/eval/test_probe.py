"""The known-answer probe generator: determinism, balance, rendering, evidence cells and retention, tasks. CPU, fast."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from eval.backbones import load_frames
from eval.benchmarks import parse_ok, sample_score, task_benchmark, task_metric
from eval.families.llava_onevision import QWEN_ASSISTANT, QWEN_SYSTEM
from eval.probe import (
    BACKGROUND,
    CHANCE,
    COLOURS,
    FAMILIES,
    FLASH_COLOUR,
    LETTERS,
    OPTIONS,
    PAINT,
    PROBE_VOCAB,
    ProbeTokenizer,
    evidence_cells,
    evidence_retention,
    evidence_tokens,
    generate,
    haystack_frames,
    haystack_identity,
    haystack_videos,
    render,
    sample_family,
    write_probe,
)
from prune.adapters.preprocess import SIGLIP_MEAN, SIGLIP_STD, preprocess_video

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny_bench import write_corrupt_mp4, write_mp4  # noqa: E402
from train_probe import pixels_of, sample_pixels  # noqa: E402


def test_same_seed_same_set_other_seed_other_set():
    a, b, c = generate(3, 8), generate(3, 8), generate(4, 8)
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) > 30
    # A family's samples do not depend on which other families are drawn or how many.
    assert generate(3, 4, families=["count"]) == [s for s in a if s.family == "count"][:4]


@pytest.mark.parametrize("family", FAMILIES)
def test_letters_are_balanced_and_the_answer_is_what_the_video_shows(family):
    samples = generate(0, 16, families=[family])
    letters = LETTERS[: len(OPTIONS[family])]
    assert Counter(s.answer for s in samples) == dict.fromkeys(letters, 16 // len(letters))
    for s in samples:
        assert s.options == OPTIONS[family]
        correct = s.options[LETTERS.index(s.answer)]
        boxes = s.boxes
        if family in ("needle", "detail"):
            assert {b.colour for b in boxes} == {correct}
        elif family == "order":
            assert boxes[0].frame < boxes[1].frame and boxes[0].colour == correct != boxes[1].colour
        elif family == "count":
            assert ["one", "two", "three", "four"][len({b.frame for b in boxes}) - 1] == correct
            assert {b.colour for b in boxes} == {FLASH_COLOUR} and FLASH_COLOUR not in COLOURS  # no answer colour
        else:
            first, last = min(boxes, key=lambda b: b.frame), max(boxes, key=lambda b: b.frame)
            moved = {"down": last.y - first.y, "up": first.y - last.y}  # y grows downwards
            assert moved[correct] > 200 and first.x == last.x


def test_short_clips_ask_only_counts_they_can_show():
    rng = random.Random(0)
    for t in (2, 3):
        counts = {len(sample_family("count", i, rng, num_frames=t).boxes) for i in range(8)}
        assert counts == set(range(1, t + 1))
    assert [s.answer for s in generate(0, 4, families=["count"], num_frames=2)] == ["A", "B", "A", "B"]


def test_render_draws_exactly_the_boxes_on_a_plain_background():
    s = sample_family("order", 0, random.Random(1), num_frames=8)
    video = render(s)
    assert video.shape == (8, 384, 384, 3) and video.dtype == np.uint8
    drawn = {b.frame for b in s.boxes}
    for f in range(8):
        if f not in drawn:
            assert (video[f] == BACKGROUND).all()
    b = s.boxes[0]
    assert (video[b.frame, b.y : b.y + b.side, b.x : b.x + b.side] == PAINT[b.colour]).all()
    assert (video[b.frame] != BACKGROUND).any(-1).sum() == b.side * b.side


def test_training_pixels_equal_the_eval_path(tmp_path):
    """Training draws frames straight to the model's pixels; evaluation writes PNG frames, reads them back with
    ``load_frames`` and preprocesses them with the backbone's ``preprocess_video``: bit-identical. HF's own video
    processor (SigLIP mean/std) agrees within 1e-5 where torchvision imports."""
    samples = generate(2, 2, num_frames=4)
    write_probe(tmp_path, 2, 2, num_frames=4)
    pixels, index = sample_pixels(samples)
    assert pixels.shape[0] < index.numel()  # the empty background is drawn once
    videos = []
    for i, s in enumerate(samples):
        video, count = load_frames(str(tmp_path / "videos" / f"{s.family}_{s.index:04d}"), 4)
        assert count == 4
        assert torch.equal(pixels[index[i]], preprocess_video(video)[0])
        assert torch.equal(pixels[index[i]], pixels_of(render(s)))
        videos.append(video)
    try:
        import torchvision  # noqa: F401
        from transformers import LlavaOnevisionVideoProcessor
    except Exception:  # noqa: BLE001  (the registry torchvision is a CUDA build that may fail with more than ImportError)
        return
    processor = LlavaOnevisionVideoProcessor(image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    for i, video in enumerate(videos):
        expected = processor(video, return_tensors="pt")["pixel_values_videos"][0]
        torch.testing.assert_close(pixels[index[i]], expected, atol=1e-5, rtol=0)


def test_evidence_cells_cover_the_box_on_the_pooled_grid():
    s = sample_family("detail", 0, random.Random(0), num_frames=2)
    b = s.boxes[0]
    cells = evidence_cells(s, grid=14)
    assert [f for f, _ in cells] == [0, 1]
    step = 384 / 14
    expect = sorted(
        r * 14 + c
        for r in range(14)
        for c in range(14)
        if r * step < b.y + b.side and (r + 1) * step > b.y and c * step < b.x + b.side and (c + 1) * step > b.x
    )
    assert cells[0][1] == expect
    assert evidence_tokens(cells, 14) == expect + [196 + c for c in expect]


def test_evidence_retention_counts_merged_and_dropped_tokens_per_stage():
    # 6 input tokens; evidence = 0, 1, 4. Pre-LLM: 0 -> out 0, 1 merged into out 0, 4 dropped; then stage 1 keeps
    # out 0 and out 2, stage 2 keeps out 2 only.
    assignment = torch.tensor([0, 0, 1, 2, -1, 3])
    r = evidence_retention([0, 1, 4], assignment, [torch.tensor([0, 2]), torch.tensor([2])])
    assert r == {"pre_llm": pytest.approx(2 / 3), "stages": [pytest.approx(2 / 3), 0.0]}
    assert evidence_retention([], assignment, [torch.tensor([0])]) == {"pre_llm": 1.0, "stages": [1.0]}


def test_every_prompt_tokenizes_without_unknown_words():
    tok = ProbeTokenizer()
    for s in generate(0, 8):
        ids = tok.encode(QWEN_SYSTEM + "\n" + s.question + QWEN_ASSISTANT)
        assert tok.unk_id not in ids, [PROBE_VOCAB[i] for i in ids]
    assert tok.decode([tok.ids["C"], tok.ids["<|im_end|>"]]) == "C"


def test_write_probe_writes_tasks_documents_and_frames_idempotently(tmp_path):
    include, tasks = write_probe(tmp_path, seed=5, per_family=4, num_frames=4)
    assert tasks == [f"probe_{f}" for f in FAMILIES]
    doc = json.loads((tmp_path / "probe" / "order.jsonl").read_text().splitlines()[0])
    assert doc["answer"] == "A" and doc["grid"] == 14 and len(doc["evidence"]) == 2
    frames = sorted((tmp_path / doc["video"]).glob("*.png"))
    assert len(frames) == 4
    task = yaml.load((include / "probe" / "probe_order.yaml").read_text(), Loader=yaml.BaseLoader)
    assert task["task"] == "probe_order" and task["generation_kwargs"]["max_new_tokens"] == "1"
    mtime = frames[0].stat().st_mtime_ns
    write_probe(tmp_path, seed=5, per_family=4, num_frames=4)
    assert frames[0].stat().st_mtime_ns == mtime  # unchanged samples are not re-rendered
    with pytest.raises(ValueError, match="unknown probe families"):
        write_probe(tmp_path, seed=5, per_family=4, families=["nope"])


def test_blank_control_keeps_the_questions_and_empties_the_frames(tmp_path):
    """``benchmark.blank=true``: the same documents (answers, evidence) over empty frames, marked so no record of the
    real set is reused for it."""
    write_probe(tmp_path / "real", seed=5, per_family=4, num_frames=4)
    write_probe(tmp_path / "blank", seed=5, per_family=4, num_frames=4, blank=True)

    def docs(which: str, family: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / which / "probe" / f"{family}.jsonl").read_text().splitlines()]

    for family in FAMILIES:
        real, blank = docs("real", family), docs("blank", family)
        assert [{**d, "blank": True} for d in real] == blank
        for doc in blank:
            video, _ = load_frames(str(tmp_path / "blank" / doc["video"]), 4)
            assert (video == BACKGROUND).all()


def _haystack(folder: Path) -> Path:
    """Two real-video stand-ins, not square: an MP4 (48x64) and a folder of noise frames (40x30)."""
    write_mp4(folder / "b_clip.mp4", num_frames=12, height=48, width=64, seed=1)
    frames = folder / "a_frames"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not a video")  # ignored
    return folder


def test_haystack_paints_the_plain_sets_needles_over_real_frames(tmp_path):
    """``benchmark.haystack_dir``: the same documents as the plain set (plus the video's name), each sample's boxes over
    frames of one haystack video, cropped square and resized to the probe's size."""
    hay = _haystack(tmp_path / "hay")
    videos = haystack_videos(hay)
    assert [v.name for v in videos] == ["a_frames", "b_clip.mp4"]
    write_probe(tmp_path / "plain", seed=5, per_family=4, num_frames=4, size=84, grid=6)
    write_probe(tmp_path / "hay_set", seed=5, per_family=4, num_frames=4, size=84, grid=6, haystack_dir=hay)
    write_probe(
        tmp_path / "hay_blank", seed=5, per_family=4, num_frames=4, size=84, grid=6, haystack_dir=hay, blank=True
    )
    samples = {f"{s.family}_{s.index:04d}": s for s in generate(5, 4, num_frames=4, size=84)}
    used = set()
    for family in FAMILIES:
        plain, real = ([json.loads(x) for x in (tmp_path / d / "probe" / f"{family}.jsonl").read_text().splitlines()]
                       for d in ("plain", "hay_set"))  # fmt: skip
        assert [{k: v for k, v in d.items() if k != "haystack"} for d in real] == plain
        for doc in real:
            used.add(doc["haystack"])
            background = haystack_frames(hay / doc["haystack"], 4, 84)
            assert background.shape == (4, 84, 84, 3) and not (background == BACKGROUND).all()
            video, _ = load_frames(str(tmp_path / "hay_set" / doc["video"]), 4)
            np.testing.assert_array_equal(video, render(samples[doc["id"]], background))
            covered = render(samples[doc["id"]]) != BACKGROUND  # where a box is drawn (no box colour is grey)
            assert (video[~covered] == background[~covered]).all()  # the rest is the real video
            empty, _ = load_frames(str(tmp_path / "hay_blank" / doc["video"]), 4)
            np.testing.assert_array_equal(empty, background)  # no-needle control: the haystack alone
    assert used == {"a_frames", "b_clip.mp4"}
    with pytest.raises(ValueError, match="background frames have shape"):
        render(samples["needle_0000"], background[:2])
    # deterministic, and a changed haystack is another haystack
    assert haystack_identity(videos) == haystack_identity(haystack_videos(hay))
    write_mp4(hay / "c_clip.mp4", num_frames=12, height=48, width=64, seed=2)
    assert haystack_identity(haystack_videos(hay)) != haystack_identity(videos)


def test_haystack_folders_are_checked_before_any_video_is_written(tmp_path):
    from omegaconf import OmegaConf

    from eval.options import OptionError
    from eval.runner import _prepare_probe

    (tmp_path / "empty").mkdir()
    bench = {"seed": 1000, "blank": False, "build": True, "per_family": 4, "num_frames": 4, "size": 84, "grid": 6}
    out = tmp_path / "out"
    for bad, message in [
        (tmp_path / "missing", "is not a folder"),
        (tmp_path / "empty", "holds no video"),
        (3, "path or null"),
    ]:
        with pytest.raises(OptionError, match=f"benchmark.haystack_dir=.*{message}"):
            _prepare_probe(OmegaConf.create({**bench, "haystack_dir": str(bad) if bad != 3 else 3}), out)
    assert not out.exists()
    # a video that cannot be decoded is named
    write_corrupt_mp4(tmp_path / "broken" / "x.mp4")
    with pytest.raises(ValueError, match="haystack video .*x.mp4 cannot be read"):
        write_probe(
            out, seed=5, per_family=1, families=["needle"], num_frames=4, size=84, haystack_dir=tmp_path / "broken"
        )
    # a good haystack gets its own set folder, named by the haystack's identity
    hay = _haystack(tmp_path / "hay")
    tasks, _ = _prepare_probe(OmegaConf.create({**bench, "haystack_dir": str(hay), "families": ["needle"]}), out)
    assert tasks == ["probe_needle"]
    assert [p.name for p in out.iterdir()] == [f"seed1000_t4_n4_hay{haystack_identity(haystack_videos(hay))}"]


@pytest.mark.parametrize(("key", "value"), [("seed", "1000"), ("blank", "yes")])
def test_probe_options_of_the_wrong_type_stop_before_any_video_is_written(tmp_path, key, value):
    from omegaconf import OmegaConf

    from eval.options import OptionError
    from eval.runner import _prepare_probe

    bench = OmegaConf.create(
        {"seed": 1000, "blank": False, "build": True, "per_family": 4, "num_frames": 4} | {key: value}
    )
    with pytest.raises(OptionError, match=f"benchmark.{key}="):
        _prepare_probe(bench, tmp_path)
    assert not any(tmp_path.iterdir())


def test_probe_tasks_score_exact_letters():
    assert task_benchmark("probe_motion") == "probe" and task_metric("probe_count") == ("probe_accuracy", 1.0)
    assert sample_score("probe_needle", 1.0) == 1.0 and sample_score("probe_needle", 0.0) == 0.0
    assert parse_ok("probe_needle", "B", {}) and parse_ok("probe_needle", " C.", {})
    assert not parse_ok("probe_needle", "red", {}) and not parse_ok("probe_needle", "", {})
    with pytest.raises(ValueError):
        task_benchmark("probe_nope")
    assert CHANCE == {**dict.fromkeys(FAMILIES, 0.25), "motion": 0.5}
