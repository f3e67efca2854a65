"""Write the tiny offline benchmark bundle: a few documents per benchmark, in its own format, with real MP4s.

    python scripts/make_tiny_bench.py --out data/tiny_bench [--seed 0] [--force]

Layout: the built-in lmms-eval tasks' `$HF_HOME` layout (see `eval.benchmarks.BENCHMARKS`), so
`eval.benchmarks.write_local_tasks(<out>, ...)` turns it into offline tasks::

    <out>/mvbench/<sub>.jsonl          <out>/mvbench_video/<DATA_LIST[sub]>/<video>
    <out>/videomme/videomme.jsonl      <out>/videomme/data/<videoID>.mp4
    <out>/egoschema/subset.jsonl       <out>/egoschema/videos/<video_idx>.mp4
    <out>/nextqa/mc_test.jsonl         <out>/nextqa/NExTVideo/<video>.mp4

Videos are 64x48 px, 24-48 frames at 8 fps, MPEG-4 Part 2 (`mpeg4`, FFmpeg's built-in encoder, so every PyAV
wheel has it): two coloured squares moving over a coloured background, all drawn from the seed, so consecutive
frames differ. Encoding is deterministic, so files are compared byte for byte and only rewritten when they
change (or with --force); every MP4 is checked with decord after writing. No network, well under a second.

`write_mp4`, `write_corrupt_mp4` and `write_zero_frame_mp4` are reusable for bad-input tests.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zlib
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from eval.benchmarks import BENCHMARKS, MVBENCH_SUBTASK_FOLDERS  # noqa: E402

HEIGHT, WIDTH, FPS = 48, 64, 8
FRAME_COUNTS = (24, 32, 40, 48)  # cycled over the videos, so frame sampling sees different lengths
CODEC = "mpeg4"


# --------------------------------------------------------------------------------------------------------------
# Video writers
# --------------------------------------------------------------------------------------------------------------


def render_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Deterministic synthetic clip: two squares moving (wrapping around) over a flat background.

    Args:
        num_frames: frames T.
        height: frame height H in pixels.
        width: frame width W in pixels.
        seed: chooses colours, sizes, start positions and velocities.

    Returns:
        [T, H, W, 3] uint8 RGB frames.
    """
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = rng.integers(0, 120, size=3, dtype=np.uint8)  # darkish background keeps the squares visible
    squares = [
        (
            int(rng.integers(max(2, height // 6), max(3, height // 3))),  # side
            rng.integers(130, 256, size=3, dtype=np.uint8),  # colour
            rng.integers(0, [height, width]),  # start (y, x)
            rng.integers(1, 4, size=2) * rng.choice([-1, 1], size=2),  # velocity (dy, dx), never zero
        )
        for _ in range(2)
    ]
    for t in range(num_frames):
        for side, colour, start, velocity in squares:
            y, x = (start + t * velocity) % [height, width]
            rows = np.arange(y, y + side) % height
            cols = np.arange(x, x + side) % width
            frames[t][np.ix_(rows, cols)] = colour
    return frames


def encode_mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """Encode [T, H, W, 3] uint8 RGB frames (H, W even) as an MPEG-4 Part 2 MP4, in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 1_000_000  # ample for 64x48: clean edges, still a few KiB per clip
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> Path:
    """Write atomically (a crash leaves no half-written video behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def write_mp4(path: Path, num_frames: int, height: int, width: int, seed: int, fps: int = FPS) -> Path:
    """Write a decodable synthetic MP4 (see `render_frames`); decord reads exactly `num_frames` frames.

    Args:
        path: file to (over)write; parent folders are created.
        num_frames: frames in the clip.
        height: frame height, even.
        width: frame width, even.
        seed: content seed; the same arguments give the same bytes.
        fps: frame rate.

    Returns:
        `path`.
    """
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {height}x{width}")
    return _write_bytes(path, encode_mp4(render_frames(num_frames, height, width, seed), fps))


def write_corrupt_mp4(path: Path) -> Path:
    """Write a file that starts like an MP4 (an `ftyp` box) but holds no movie.

    decord 0.6.0: `VideoReader` raises a plain `RuntimeError` ("Error reading <path>...", not `DECORDError`);
    PyAV: `av.open` raises `av.error.InvalidDataError` (FFmpeg logs "moov atom not found").
    """
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + (512).to_bytes(4, "big") + b"isommp41"
    return _write_bytes(path, ftyp + b"vidprune: deliberately not a video\n" * 8)


def write_zero_frame_mp4(path: Path, height: int = HEIGHT, width: int = WIDTH) -> Path:
    """Write a valid MP4 whose video track has no frames.

    A plain MP4 muxer drops a track without samples, which leaves no video stream at all; a fragmented MP4
    (`empty_moov`) writes the track header up front, so the file declares one video stream with 0 frames. MJPEG,
    unlike mpeg4, gets its frame size read back (64x48) without any coded frame.

    Readers (checked with decord 0.6.0, PyAV 15.1): decord cannot open it, `VideoReader` raises `decord.DECORDError`
    ("Cannot create buffer source": with no frame decoded, the pixel format is unknown, -1); PyAV opens it and sees
    one 64x48 video stream whose decode yields no frames; lmms-eval's `read_video` (PyAV backend) raises
    `av.error.PermissionError` ([Errno 1], from FFmpeg's decoder).
    """
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as container:
        stream = container.add_stream("mjpeg", rate=FPS)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuvj420p"
        container.start_encoding()
    return _write_bytes(path, buffer.getvalue())


def verify_mp4(path: Path, num_frames: int, height: int, width: int) -> None:
    """Check with decord (the reader the LLaVA wrappers use) that the video has the expected frames.

    Raises:
        RuntimeError: a different frame count or frame shape.
    """
    import decord  # imported here: only this check needs it

    reader = decord.VideoReader(str(path))
    shape = tuple(reader[0].shape)
    if len(reader) != num_frames or shape != (height, width, 3):
        raise RuntimeError(
            f"{path}: decord reads {len(reader)} frames of {shape}, expected {num_frames} of {(height, width, 3)}"
        )


# --------------------------------------------------------------------------------------------------------------
# Documents, in each benchmark's own format (fields as the HF datasets have them; see lmms_eval.md section 2.1)
# --------------------------------------------------------------------------------------------------------------

MVBENCH_DOCS = {
    "action_antonym": [
        {
            "video": "vp_tiny_ssv2_0001.mp4",
            "question": "What is the action performed by the person in the video?",
            "candidates": ["Not sure", "Pushing something from left to right", "Pushing something from right to left"],
            "answer": "Pushing something from left to right",
        },
        {
            "video": "vp_tiny_ssv2_0002.mp4",
            "question": "What is the action performed by the person in the video?",
            "candidates": ["Lifting something up", "Not sure", "Putting something down"],
            "answer": "Putting something down",
        },
    ],
    "object_interaction": [
        {
            "video": "vp_tiny_star_0001.mp4",
            "question": "Which object was taken by the person?",
            "candidates": ["The cup/glass/bottle.", "The book.", "The towel.", "The box."],
            "answer": "The cup/glass/bottle.",
            "start": 0.0,
            "end": 3.0,
        },
    ],
}

_VIDEOMME_COMMON = {"duration": "short", "url": "https://example.invalid/vidprune/tiny"}
VIDEOMME_DOCS = [
    {
        **_VIDEOMME_COMMON,
        "video_id": "001",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "videoID": "vpTinyVid01",
        "question_id": "001-1",
        "task_type": "Counting Problem",
        "question": "How many squares move across the video?",
        "options": ["A. One.", "B. Three.", "C. Two.", "D. None."],
        "answer": "C",
    },
    {
        **_VIDEOMME_COMMON,
        "video_id": "001",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "videoID": "vpTinyVid01",
        "question_id": "001-2",
        "task_type": "Object Recognition",
        "question": "Which shape appears in the video?",
        "options": ["A. Squares.", "B. Circles.", "C. Triangles.", "D. Stars."],
        "answer": "A",
    },
    {
        **_VIDEOMME_COMMON,
        "video_id": "002",
        "domain": "Life Record",
        "sub_category": "Daily Life",
        "videoID": "vpTinyVid02",
        "question_id": "002-1",
        "task_type": "Action Recognition",
        "question": "What do the shapes do over time?",
        "options": ["A. They stay still.", "B. They fade out.", "C. They grow.", "D. They move."],
        "answer": "D",
    },
]

EGOSCHEMA_DOCS = [
    {
        "question_idx": "0",
        "question": "What is the overall behaviour of the objects in the video?",
        "video_idx": "7f3c0a52-0000-4000-8000-000000000001",
        "option": [
            "A. They remain still throughout.",
            "B. They disappear halfway.",
            "C. They change shape.",
            "D. They merge into one.",
            "E. They keep moving across the frame.",
        ],
        "answer": 4,
    },
    {
        "question_idx": "1",
        "question": "How does the scene's background change during the video?",
        "video_idx": "7f3c0a52-0000-4000-8000-000000000002",
        "option": [
            "A. It flickers between colours.",
            "B. It stays the same colour.",
            "C. It becomes darker.",
            "D. It becomes brighter.",
            "E. It is replaced by text.",
        ],
        "answer": 1,
    },
    {
        "question_idx": "2",
        "question": "How many distinct moving objects can be seen?",
        "video_idx": "7f3c0a52-0000-4000-8000-000000000003",
        "option": ["A. Two.", "B. One.", "C. Four.", "D. Five.", "E. None."],
        "answer": 0,
    },
]

NEXTQA_DOCS = [
    {
        "video": 4010069381,
        "frame_count": 0,  # filled in from the video by bundle_files
        "width": WIDTH,
        "height": HEIGHT,
        "question": "what do the squares do after they appear",
        "answer": 2,
        "qid": 1,
        "type": "TN",
        "a0": "stop",
        "a1": "vanish",
        "a2": "move across",
        "a3": "turn red",
        "a4": "shrink",
    },
    {
        "video": 4010069382,
        "frame_count": 0,
        "width": WIDTH,
        "height": HEIGHT,
        "question": "why does the picture change between frames",
        "answer": 0,
        "qid": 2,
        "type": "CW",
        "a0": "the squares move",
        "a1": "the camera zooms",
        "a2": "the light turns off",
        "a3": "a person walks in",
        "a4": "it starts raining",
    },
    {
        "video": 4010069383,
        "frame_count": 0,
        "width": WIDTH,
        "height": HEIGHT,
        "question": "how many squares are there",
        "answer": 3,
        "qid": 3,
        "type": "DC",
        "a0": "five",
        "a1": "zero",
        "a2": "three",
        "a3": "two",
        "a4": "one",
    },
]


def _jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs).encode()


def bundle_files(seed: int) -> tuple[dict[str, bytes], dict[str, int]]:
    """Every file of the bundle, in memory.

    Returns:
        `(files, videos)`: relative path -> content, and relative path -> frame count of each MP4.
    """
    mvbench, videomme, egoschema, nextqa = (BENCHMARKS[name] for name in ("mvbench", "videomme", "egoschema", "nextqa"))
    clips = [
        *(
            f"{mvbench.video_dir}/{MVBENCH_SUBTASK_FOLDERS[sub]}/{doc['video']}"
            for sub, d in MVBENCH_DOCS.items()
            for doc in d
        ),
        *sorted({f"{videomme.video_dir}/{doc['videoID']}.mp4" for doc in VIDEOMME_DOCS}),
        *(f"{egoschema.video_dir}/{doc['video_idx']}.mp4" for doc in EGOSCHEMA_DOCS),
        *(f"{nextqa.video_dir}/{doc['video']}.mp4" for doc in NEXTQA_DOCS),
    ]
    videos = {clip: FRAME_COUNTS[i % len(FRAME_COUNTS)] for i, clip in enumerate(clips)}
    # NExT-QA documents carry their video's frame count.
    nextqa_docs = [{**doc, "frame_count": videos[f"{nextqa.video_dir}/{doc['video']}.mp4"]} for doc in NEXTQA_DOCS]

    files = {mvbench.annotation.format(sub=sub): _jsonl(docs) for sub, docs in MVBENCH_DOCS.items()}
    files[videomme.annotation] = _jsonl(VIDEOMME_DOCS)
    files[egoschema.annotation] = _jsonl(EGOSCHEMA_DOCS)
    files[nextqa.annotation] = _jsonl(nextqa_docs)
    for clip, num_frames in videos.items():
        # A per-clip seed from the path (crc32 is stable across runs, unlike hash()).
        clip_seed = zlib.crc32(f"{seed}:{clip}".encode())
        files[clip] = encode_mp4(render_frames(num_frames, HEIGHT, WIDTH, clip_seed))
    return files, videos


def make_tiny_bench(out: Path, seed: int = 0, force: bool = False) -> dict[str, int]:
    """Write (or refresh) the bundle under `out`; files already holding the right bytes are left alone.

    Returns:
        Counts: `documents`, `videos`, `written`, `unchanged`, `bytes` (total size of the bundle's files).
    """
    out = Path(out)
    files, videos = bundle_files(seed)
    written = 0
    for rel, data in files.items():
        path = out / rel
        if force or not path.is_file() or path.read_bytes() != data:
            _write_bytes(path, data)
            written += 1
    for rel, num_frames in videos.items():
        verify_mp4(out / rel, num_frames, HEIGHT, WIDTH)
    documents = sum(data.count(b"\n") for rel, data in files.items() if rel.endswith(".jsonl"))
    return {
        "documents": documents,
        "videos": len(videos),
        "written": written,
        "unchanged": len(files) - written,
        "bytes": sum(len(data) for data in files.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tiny_bench", help="bundle folder")
    parser.add_argument("--seed", type=int, default=0, help="video content seed")
    parser.add_argument("--force", action="store_true", help="rewrite every file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stats = make_tiny_bench(args.out, args.seed, args.force)
    print(
        f"tiny bench in {args.out}: {stats['documents']} documents, {stats['videos']} MP4s ({CODEC}, "
        f"{WIDTH}x{HEIGHT}, decord-checked), {stats['bytes'] / 1024:.0f} KiB; {stats['written']} files written, "
        f"{stats['unchanged']} unchanged; {time.perf_counter() - start:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
