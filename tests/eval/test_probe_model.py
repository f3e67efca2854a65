"""The committed probe model on a small probe subset: targets, blind control, broken pipelines, ratio 1.0, training.

CI never trains the committed model: it loads tests/fixtures/probe_llava_ov. Samples come from the evaluation seed of
configs/benchmark/probe.yaml, rendered in memory and run through the same Backbone (prompt, preprocessing, adapter)
as `make eval`, without lmms-eval around it, so a check costs seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from eval.probe import BACKGROUND, CHANCE, FAMILIES, LETTERS, OPTIONS, ProbeTokenizer, generate, model_vocab, render
from eval.runner import compose_config, make_backbone
from prune.adapters.llava_onevision import LlavaOnevisionAdapter, answer_logits, tiny_llava_onevision
from prune.strategies.none import NoPruning

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "tests" / "fixtures" / "probe_llava_ov"
EVAL_SEED = yaml.safe_load((ROOT / "configs" / "benchmark" / "probe.yaml").read_text())["seed"]
PER_FAMILY = 8
sys.path.insert(0, str(ROOT / "scripts"))
import train_probe  # noqa: E402


def _backbone(prune: str = "none", ratio: float = 1.0, *extra: str):
    return make_backbone(
        compose_config(["model=probe_llava_ov", f"prune={prune}", f"ratio={ratio}", "device=cpu", *extra])
    )


def _predict(backbone, samples, frames=lambda video: video) -> list[str]:
    out = []
    for s in samples:
        ids = backbone.prompt_ids(s.question)
        gen = backbone.adapter.generate(ids, backbone.preprocess(frames(render(s))), max_new_tokens=1)
        out.append(backbone.tokenizer.decode(gen.tokens))
    return out


def _accuracy(samples, predictions, family: str | None = None) -> float:
    pairs = [(s, p) for s, p in zip(samples, predictions, strict=True) if family in (None, s.family)]
    return sum(s.answer == p for s, p in pairs) / len(pairs)


@pytest.fixture(scope="module")
def samples():
    return generate(EVAL_SEED, PER_FAMILY)


@pytest.fixture(scope="module")
def none_backbone():
    """The unpruned probe model, built once for every check that runs it (the tests do not change it)."""
    return _backbone()


@pytest.fixture(scope="module")
def none_predictions(none_backbone, samples):
    return _predict(none_backbone, samples)


def test_checkpoint_matches_its_sha256():
    expected = (CKPT / "SHA256").read_text().split()[0]
    assert hashlib.sha256((CKPT / "model.safetensors").read_bytes()).hexdigest() == expected
    assert (CKPT / "model.safetensors").stat().st_size <= 2 * 1024 * 1024


def test_none_reaches_the_target(samples, none_predictions):
    """The issue's target for ``none``, >= 90 % on every family, at the granularity of 8 samples a family: at least 7
    of 8 on each (87.5 %) and >= 90 % overall. The committed model (docs/probe.md, 20 a family of the evaluation
    seed: 100 / 100 / 95 / 100 / 100 %) gets 8, 8, 7, 8 and 8 of 8 here."""
    accuracy = {f: _accuracy(samples, none_predictions, f) for f in FAMILIES}
    assert all(a >= 7 / 8 for a in accuracy.values()), accuracy
    assert _accuracy(samples, none_predictions) >= 0.9, accuracy


def test_blind_control_is_near_chance(none_backbone, samples):
    """The no-video control (``benchmark.blank=true``: every frame empty, same prompts) scores chance: no question is
    answerable from the text."""
    predictions = _predict(none_backbone, samples, frames=lambda video: np.full_like(video, BACKGROUND))
    for f in FAMILIES:  # within 10 points of chance, up to the one-sample granularity of 8 samples (12.5 points)
        assert abs(_accuracy(samples, predictions, f) - CHANCE[f]) <= 0.125, (f, predictions)


def test_one_random_visual_token_is_near_chance():
    """The issue's blind control: ``random`` at 0.0005 keeps one of 1,568 visual tokens, and the model answers within
    10 points of chance on every family (20 samples a family; the committed model: 5, 5, 6, 5 and 9 of 20). A model
    can fail this and still be sound: SigLIP's attention spreads a frame's content into every patch token, and the
    previous checkpoint read 51 % on detail from one background token (docs/probe.md, Targets)."""
    backbone = _backbone("random", 0.0005)
    few = generate(EVAL_SEED, 20)
    predictions = _predict(backbone, few)
    for f in FAMILIES:
        assert abs(_accuracy(few, predictions, f) - CHANCE[f]) <= 0.1 + 1e-9, (f, predictions)


def test_reversed_frames_lose_order_and_flip_motion(none_backbone, samples, none_predictions):
    """Reversed frames make the second colour come first and the square move the other way: a model that reads the
    frame order names the second colour and the opposite direction."""
    order = [s for s in samples if s.family == "order"]
    reversed_predictions = _predict(none_backbone, order, frames=lambda video: video[::-1].copy())
    second = [LETTERS[OPTIONS["order"].index(s.boxes[1].colour)] for s in order]
    assert _accuracy(order, reversed_predictions) <= 0.25, reversed_predictions
    # and names the second colour in most cases (the committed model: 8 of 8, and 8 of 8 right unreversed)
    assert sum(p == q for p, q in zip(reversed_predictions, second, strict=True)) >= 6, (reversed_predictions, second)
    motion = [s for s in samples if s.family == "motion"]
    assert _accuracy(samples, none_predictions, "motion") >= 7 / 8
    flipped = _predict(none_backbone, motion, frames=lambda video: video[::-1].copy())
    assert _accuracy(motion, flipped) <= 1 / 8, flipped  # committed model: 0 of 8 (every direction flipped)


def _kept_forward(adapter, pixels, ids, keep: torch.Tensor, renumber: bool) -> int:
    """The none splice with only the visual tokens ``keep``; positions original (gapped) or renumbered."""
    model = adapter.model
    grid = adapter.video_grid(pixels)
    visual = torch.cat([grid.reshape(-1, grid.shape[-1])[keep], model.model.image_newline[None]])
    at = ids.index(model.config.video_token_id)
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(ids[:at])), visual, embed(torch.tensor(ids[at + 1 :]))])[None]
    full = torch.arange(len(ids) - 1 + grid.shape[0] * grid.shape[1] * grid.shape[2] + 1)
    vis_pos = at + torch.cat([keep, torch.tensor([grid.shape[0] * grid.shape[1] * grid.shape[2]])])
    positions = torch.cat([full[:at], vis_pos, full[at + 1 + int(vis_pos[-1]) - at :]])
    if renumber:
        positions = torch.arange(embeds.shape[1])
    hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions[None]).last_hidden_state
    return int(model.lm_head(hidden[0, -1]).argmax())


def test_renumbered_positions_after_a_drop_lose_motion_and_count(none_backbone):
    """After a random 90 % drop, survivors at their original (gapped) positions keep ``motion`` and part of ``count``;
    renumbered contiguously they lose both: the probe sees what a method does to position ids. 20 samples a family
    (on 8 a difference of a few samples is within one seed's noise)."""
    backbone = none_backbone
    tok = backbone.tokenizer
    hits = {}
    with torch.no_grad():
        for family in ("motion", "count"):
            gen = torch.Generator().manual_seed(0)
            for s in generate(EVAL_SEED, 20, families=[family]):
                pixels = backbone.preprocess(render(s))
                ids = backbone.prompt_ids(s.question)[0].tolist()
                n = pixels.shape[1] * 196
                keep = torch.randperm(n, generator=gen)[: n // 10].sort().values  # a random 10 % survives
                for renumber in (False, True):
                    answer = tok.decode([_kept_forward(backbone.adapter, pixels, ids, keep, renumber)])
                    hits[family, renumber] = hits.get((family, renumber), 0) + (answer == s.answer)
    # Committed model (docs/probe.md): motion 17 of 20 gapped, 5 renumbered (chance 10: the direction flips); count
    # 11 and 5 (chance 5). Order keeps 15 of 20 either way: this model reads which colour came first without the
    # positions (the first checkpoints lost order here; reversed frames still flip it, above).
    assert hits["motion", False] >= 14 and hits["motion", True] <= hits["motion", False] - 6, hits
    assert hits["count", False] >= 8 and hits["count", True] <= hits["count", False] - 4, hits


STRATEGIES = sorted(p.stem for p in (ROOT / "configs" / "prune").glob("*.yaml") if p.stem != "none")
# Strategies whose ratio 1.0 is not a keep-everything setting, by their official design (docs/probe.md).
NOT_IDENTITY_AT_ONE = {
    "prunevid": "ratio is alpha, stage 2's per-group keep fraction; stage 1 (static merging at tau, DPC-KNN "
    "clustering at cluster_ratio, clusters in centre-score order) runs at every alpha, as in the official code",
}


@pytest.mark.parametrize("prune", STRATEGIES)
def test_ratio_one_gives_the_none_predictions(samples, none_predictions, prune):
    """ratio 1.0 of every strategy answers exactly as none (its first sample of each family, for time)."""
    few = [i for i, s in enumerate(samples) if s.index == 0]
    backbone = _backbone(prune, 1.0)
    if prune in NOT_IDENTITY_AT_ONE:
        # What holds instead: the in-LLM stage keeps every token that entered the LLM, while the pre-LLM stage
        # still merges the probe's static background.
        gen = backbone.adapter.generate(
            backbone.prompt_ids(samples[0].question), backbone.preprocess(render(samples[0])), max_new_tokens=1
        )
        assert gen.visual_pre_llm < gen.visual_in
        assert set(gen.llm.visual_per_layer) == {gen.visual_pre_llm}
        return
    assert _predict(backbone, [samples[i] for i in few]) == [none_predictions[i] for i in few]


def test_training_forward_equals_the_adapter_none_path():
    model = tiny_llava_onevision(seed=3, **model_vocab())
    sample = generate(1, 1, families=["order"], num_frames=2)[0]
    pixels = train_probe.pixels_of(render(sample))[None]
    ids = train_probe.prompt_ids(ProbeTokenizer(), sample.question)
    adapter = LlavaOnevisionAdapter(model, NoPruning(), num_frames=2)
    gen = adapter.generate(torch.tensor([ids]), pixels, max_new_tokens=1, return_logits=True)
    with torch.no_grad():
        batched = answer_logits(model, torch.cat([pixels, pixels]), [ids, ids])
    torch.testing.assert_close(batched[0], gen.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[1], batched[0])


def _args(out: Path, phases: str) -> argparse.Namespace:
    return train_probe.parse_args(["--out", str(out), "--phases", phases])


def test_training_is_deterministic(tmp_path):
    digests = [(train_probe.train(_args(tmp_path / str(i), "2:2")) / "SHA256").read_text() for i in range(2)]
    assert digests[0] == digests[1]


def test_phases_alternate_clip_lengths_and_restrict_families(tmp_path, monkeypatch):
    """``--phases 2/3:2:count+motion,2:1``: the first phase alternates 2- and 3-frame clips of count and motion only,
    the second takes every family of the mix."""
    assert train_probe.parse_phases("2:300,4/8:400,8:75:count") == [
        ((2,), 300, ()),
        ((4, 8), 400, ()),
        ((8,), 75, ("count",)),
    ]
    for bad in ("2", "2:x", "1:5", "2:0", "2:5:nope", "2:5:count:1", "2/x:5"):
        with pytest.raises(SystemExit, match="--phases must look like"):
            train_probe.parse_phases(bad)
    seen = []
    real_batch = train_probe.batch

    def spy(rng, step, size, frames, tok, mix):
        seen.append((frames, sorted(set(mix))))
        return real_batch(rng, step, 2, frames, tok, mix)  # batch 2: this checks the schedule, not learning

    monkeypatch.setattr(train_probe, "batch", spy)
    out = train_probe.train(_args(tmp_path, "2/3:2:count+motion,2:1"))
    assert seen == [(2, ["count", "motion"]), (3, ["count", "motion"]), (2, sorted(FAMILIES))]
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["frames"]) for r in curve] == [(0, 2), (0, 3), (1, 2)]


def _blind_loss(step: int, batch: int, frames: int = 2) -> float:
    """The best letter loss a video-blind model can reach on training step ``step``: ln(options the family can have)
    averaged over the batch (families cycle through the mix; a 2-frame ``count`` can only be one or two)."""
    mix = train_probe.phase_mix(train_probe.parse_mix(train_probe.MIX), frames, train_probe.COUNT_FRAMES)
    families = [mix[(step * batch + i) % len(mix)] for i in range(batch)]
    options = {f: len(OPTIONS[f]) for f in FAMILIES} | {"count": min(4, frames)}
    return sum(math.log(options[f]) for f in families) / batch


def test_a_short_training_run_falls_below_the_answer_prior(tmp_path):
    """The recipe (its seed and batch) still learns: the letter loss of the last 10 of 100 steps at 2 frames ends
    below what the best video-blind answer scores (1.04 nats with the weighted mix)."""
    steps = 100
    args = _args(tmp_path, f"2:{steps}")
    out = train_probe.train(args)
    losses = [json.loads(line)["loss"] for line in (out / "curve.jsonl").read_text().splitlines()]
    prior = sum(_blind_loss(s, args.batch) for s in range(steps - 10, steps)) / 10
    assert sum(losses[-10:]) / 10 < prior, (losses[-10:], prior)
