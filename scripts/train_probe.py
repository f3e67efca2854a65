"""Train the probe model (``model=probe_llava_ov``) on generated probe videos: ``make probe-model``.

The recipe (docs/probe.md): cross-entropy on the answer letter only; AdamW (lr 3e-3, weight decay 0.01), linear
warm-up then cosine decay to 0, gradient clipping at 1.0; batches of 16; a curriculum over clip length (2 -> 4 -> 8
frames), each phase a fixed number of steps (never a time budget), every batch a fresh draw of all five families from
a training seed (``--seed`` and the step: never the evaluation seeds of ``configs/benchmark/probe.yaml``). One
thread count and one seed give the same weights.

Writes ``<out>/config.json`` + ``model.safetensors`` (``from_pretrained`` reads them), ``<out>/vocab.json`` (the
tokenizer's words), ``<out>/SHA256`` and the training curve ``<out>/curve.jsonl`` (loss per step) next to them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.families.llava_onevision import qwen_prompt  # noqa: E402
from eval.probe import (  # noqa: E402
    BACKGROUND,
    FAMILIES,
    PAINT,
    PROBE_VOCAB,
    ProbeSample,
    ProbeTokenizer,
    model_vocab,
    sample_family,
)
from prune.adapters.llava_onevision import answer_logits, tiny_llava_onevision  # noqa: E402

PHASES = "2:300,4:400,8:250"  # frames:steps of the curriculum (docs/probe.md)
MIX = "needle:1,detail:1,order:2,count:2,motion:2"  # family:weight of a batch's samples, in turn
COUNT_FRAMES = 2  # count is trained on clips of at least this many frames (docs/probe.md)
ROPE_THETA = 1e4  # the Qwen2 RoPE base of the probe model (Qwen2-7B: 1e6; docs/probe.md)
SEED = 1  # the committed checkpoint's training seed (seed 0 counts worse; docs/probe.md, "What training taught us")
BATCH = 16  # samples a step
EVAL_SEEDS = range(0, 1000)  # generator seeds reserved for evaluation; training streams are named apart anyway


def parse_phases(text: str) -> list[tuple[tuple[int, ...], int, tuple[str, ...]]]:
    """``"2:300,4/8:400,8:75:count"`` -> ``[(frames, steps, families), ...]``, one per curriculum phase.

    ``frames`` is one clip length or several that alternate step by step (``4/8``: 4, 8, 4, ...); the optional
    third field restricts the phase to some families (``count`` or ``count+motion``; default: all of ``--mix``).
    """
    usage = "--phases must look like 2:300,4/8:400,8:75:count (frames[/frames]:steps[:family+family],...)"
    phases = []
    for part in text.split(","):
        fields = part.split(":")
        try:
            frames = tuple(int(f) for f in fields[0].split("/"))
            steps = int(fields[1])
        except (ValueError, IndexError) as err:
            raise SystemExit(f"{usage}, got {text!r}") from err
        only = tuple(fields[2].split("+")) if len(fields) == 3 else ()
        if len(fields) > 3 or min(frames) < 2 or steps < 1 or any(f not in FAMILIES for f in only):
            raise SystemExit(f"{usage}, with frames >= 2, steps >= 1 and families among {FAMILIES}; got {part!r}")
        phases.append((frames, steps, only))
    return phases


def parse_mix(text: str) -> list[str]:
    """``"needle:1,order:2"`` -> ``["needle", "order", "order"]``: the families of a batch's samples, in turn."""
    try:
        pairs = [(name, int(weight)) for name, weight in (part.split(":") for part in text.split(","))]
    except ValueError as err:
        raise SystemExit(f"--mix must look like needle:1,order:2 (family:weight,...), got {text!r}") from err
    if sorted(name for name, _ in pairs) != sorted(FAMILIES) or any(w < 1 for _, w in pairs):
        raise SystemExit(f"--mix needs every family of {FAMILIES} once with an integer weight >= 1, got {text!r}")
    return [name for name, weight in pairs for _ in range(weight)]


def phase_mix(mix: Sequence[str], frames: int, count_frames: int) -> list[str]:
    """``mix`` for a phase of ``frames``-frame clips: without ``count`` below ``count_frames`` (``--count-frames``)."""
    return [f for f in mix if f != "count" or frames >= count_frames] or list(mix)


def prompt_ids(tok: ProbeTokenizer, question: str) -> list[int]:
    """The backbone's own Qwen chat prompt (``qwen_prompt``) around ``question``, as the eval builds it."""
    backbone = SimpleNamespace(tokenizer=tok, adapter=SimpleNamespace(placeholder_id=tok.ids["<video>"]))
    return qwen_prompt(backbone, question)[0][0].tolist()


def batch(rng: random.Random, step: int, size: int, frames: int, tok: ProbeTokenizer, mix: Sequence[str] = FAMILIES):
    """``size`` fresh samples cycling through ``mix`` (:func:`parse_mix`), with random answers.

    Returns ``(pixels [U, 3, 384, 384], frame_index [B, T], prompts, targets [B])``: the batch's distinct frames
    rendered straight to the model's pixels (:func:`sample_pixels`) and which one each video frame is (the empty
    background is one frame however often it is shown).
    """
    samples = [
        sample_family(mix[(step * size + i) % len(mix)], rng.randrange(1 << 30), rng, frames) for i in range(size)
    ]
    pixels, frame_index = sample_pixels(samples)
    prompts = [prompt_ids(tok, s.question) for s in samples]
    targets = torch.tensor([tok.ids[s.answer] for s in samples])
    return pixels, frame_index, prompts, targets


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """``[3, 1, 1]``: one colour as ``preprocess_video`` normalises it (SigLIP mean 0.5, std 0.5)."""
    return ((torch.tensor(rgb, dtype=torch.uint8).float() - 127.5) / 127.5)[:, None, None]


def sample_pixels(samples: Sequence[ProbeSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The videos of ``samples`` as the model's pixels, drawn without PNG files or the image processor.

    The same boxes as :func:`eval.probe.render`, painted in normalised colours: at the probe's 384 px the processor's
    resize is the identity and its normalisation is per pixel, so this equals ``preprocess_video(render(sample))``
    exactly (tests/eval/test_probe.py checks it against the eval path: PNG frames, ``load_frames``, the backbone's
    preprocessing, and HF's video processor). Frames with the same boxes are drawn once.

    Returns:
        ``([U, 3, S, S] float32, [B, T] long)``: the distinct frames and which one each video frame is.
    """
    distinct: dict[tuple, int] = {}
    index = torch.empty(len(samples), samples[0].num_frames, dtype=torch.long)
    for i, s in enumerate(samples):
        by_frame: dict[int, list] = {}
        for b in s.boxes:
            by_frame.setdefault(b.frame, []).append((b.x, b.y, b.side, b.colour))
        for f in range(s.num_frames):
            index[i, f] = distinct.setdefault((s.size, tuple(by_frame.get(f, ()))), len(distinct))
    pixels = torch.empty(len(distinct), 3, samples[0].size, samples[0].size)
    pixels[:] = _normalised(BACKGROUND)
    for (_, boxes), u in distinct.items():
        for x, y, side, colour in boxes:  # painted in drawing order, as render does
            pixels[u, :, y : y + side, x : x + side] = _normalised(PAINT[colour])
    return pixels, index


def pixels_of(video) -> torch.Tensor:
    """``[T, 3, 384, 384]``: ``preprocess_video`` of 384-px uint8 frames (its resize is then the identity)."""
    return (torch.from_numpy(video).permute(0, 3, 1, 2).float() - 127.5) / 127.5


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    phases = parse_phases(args.phases)
    total = sum(steps for _, steps, _ in phases)
    mix = parse_mix(args.mix)
    model = tiny_llava_onevision(
        seed=args.seed, llm_layers=args.layers, rope_theta=args.rope_theta, **model_vocab()
    ).train()
    tok = ProbeTokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(f"vidprune-probe-train/{args.seed}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curve = (out / "curve.jsonl").open("w")
    step, start = 0, time.time()
    for phase, (clip_lengths, steps, only) in enumerate(phases):
        for k in range(steps):
            frames = clip_lengths[k % len(clip_lengths)]
            families = phase_mix([f for f in mix if not only or f in only], frames, args.count_frames)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.warmup, args.lr)
            pixels, frame_index, prompts, targets = batch(rng, step, args.batch, frames, tok, families)
            logits = answer_logits(model, pixels, prompts, frame_index)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            acc = float((logits.argmax(-1) == targets).float().mean())
            row = {
                "step": step,
                "phase": phase,
                "frames": frames,
                "loss": float(loss.detach()),
                "acc": acc,
                "lr": opt.param_groups[0]["lr"],
            }
            curve.write(json.dumps({**row, "s": round(time.time() - start, 1)}) + "\n")
            curve.flush()
            if step % 10 == 0:
                print(f"step {step}/{total} frames {frames} loss {float(loss.detach()):.3f} acc {acc:.2f} "
                      f"{time.time() - start:.0f}s", flush=True)  # fmt: skip
            step += 1
    curve.close()
    model.eval().save_pretrained(out, safe_serialization=True)
    (out / "vocab.json").write_text(json.dumps(list(PROBE_VOCAB)) + "\n")  # the loader checks it is eval.probe's
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "SHA256").write_text(f"{digest}  model.safetensors\n")
    plot_curve(out / "curve.jsonl", out / "curve.png", args.batch)
    print(f"wrote {out} (sha256 {digest}, {time.time() - start:.0f}s)")
    return out


def plot_curve(curve: Path, out: Path, batch: int = BATCH) -> Path:
    """The training curve (letter loss and batch accuracy per step, 10-step means; phases shaded) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in curve.read_text().splitlines()]
    steps = [r["step"] for r in rows]

    def smooth(key: str) -> list[float]:
        return [
            sum(r[key] for r in rows[max(0, i - 9) : i + 1]) / len(rows[max(0, i - 9) : i + 1])
            for i in range(len(rows))
        ]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100, layout="constrained")
    ax1.plot(steps, [r["loss"] for r in rows], color="tab:blue", alpha=0.25, linewidth=0.8)
    ax1.plot(steps, smooth("loss"), color="tab:blue", label="letter loss (10-step mean)")
    ax1.axhline(math.log(4), color="black", linestyle="--", linewidth=1, label="answer prior ln 4")
    ax2.plot(steps, smooth("acc"), color="tab:green", label="batch accuracy (10-step mean)")
    ax2.axhline(0.25, color="black", linestyle="--", linewidth=1, label="chance")
    for ax in (ax1, ax2):
        start = 0
        for phase in dict.fromkeys(r.get("phase", r["frames"]) for r in rows):  # older curves: one phase per length
            in_phase = [r for r in rows if r.get("phase", r["frames"]) == phase]
            end, frames = in_phase[-1]["step"], sorted({r["frames"] for r in in_phase})
            ax.axvspan(start, end, alpha=0.06 * frames[-1].bit_length(), color="grey", linewidth=0)
            label = "/".join(map(str, frames)) + " fr"
            ax.text((start + end) / 2, ax.get_ylim()[1] if ax is ax2 else 3.5, label, ha="center", fontsize=8)
            start = end
        ax.set_xlabel(f"step (batch of {batch})")
        ax.legend(fontsize=7)
    ax1.set_ylim(0, 4.5)
    ax2.set_ylim(0, 1.05)
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``make probe-model``; its defaults are the committed checkpoint's recipe."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="tests/fixtures/probe_llava_ov")
    p.add_argument("--seed", type=int, default=SEED, help="the training seed (weights and data stream)")
    p.add_argument("--phases", default=PHASES, help="frames[/frames]:steps[:family+family] per curriculum phase")
    p.add_argument("--mix", default=MIX, help="family:weight of a batch's samples, taken in turn")
    p.add_argument(
        "--count-frames", type=int, default=COUNT_FRAMES, help="count is trained on clips this long or longer"
    )
    p.add_argument("--rope-theta", type=float, default=ROPE_THETA, help="the Qwen2 RoPE base (1e6 in Qwen2-7B)")
    p.add_argument("--batch", type=int, default=BATCH, help="samples a step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main() -> None:
    train(parse_args())


if __name__ == "__main__":
    main()
