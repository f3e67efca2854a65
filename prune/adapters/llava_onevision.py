"""LLaVA-OneVision family adapter: LLaVA-OneVision-7B and LLaVA-Video-7B-Qwen2 on one transformers class.

Both checkpoints share one module tree (SigLIP so400m/14 at 384 px, 26 layers → MLP projector → Qwen2-7B), so
``LlavaOnevisionForConditionalGeneration`` serves both; they differ in the video layout (backbones.md §1.1–1.2):

============  ======  =============================  ==========================================  ===============
layout        frames  pooling of the 27x27 grid      separators                                  visual tokens
============  ======  =============================  ==========================================  ===============
onevision     32      bilinear → 14x14 (HF           one ``image_newline`` after the whole video  T·196 + 1
                      ``apply_pooling``)
video         64      2x2 average → 13x13            one ``image_newline`` after every row         T·13·14 = T·182
                      (LLaVA-NeXT ``get_2dPool``,    (``mm_newline_position="grid"``)
                      eval ``mm_spatial_pool_mode
                      =average``)
============  ======  =============================  ==========================================  ===============

The adapter runs the vision tower and projector itself to expose one video's tokens as a grid ``[T, h, w, D]`` before
separators are added, calls ``strategy.pre_llm``, splices the result into the prompt's text embeddings (so the
number of ``<video>`` placeholders in the prompt does not matter: one, or the processor's T·196+1) and runs the LLM
through :class:`prune.adapters.llm.PrunedLM`.

**Newline policy after pruning.** Separators are never pruned and never counted as visual tokens.

* onevision: one newline after the (pruned) visual sequence, as the unpruned layout.
* video: when the pre-LLM stage keeps the grid as it is (``none``, ``fastv``), the original per-row newlines; when it
  changes the token set, the rows no longer exist, so one newline follows each run of output tokens from the same
  frame (the frame of a merged token is that of its earliest member). Sorted outputs (``random``, ``pool``,
  ``hieravid``) thus get one newline per frame, PruneVid one per frame of each segment (its static tokens join the
  segment's first frame), HoliTom one per frame too (its own ``add_newline_token`` puts one after every row that
  still has tokens: a documented deviation).

**Vision-side inputs** (``VideoTokens.frame_*``, computed only for strategies that declare them; see
:mod:`prune.adapters.vision`). The layer is the one whose output the VLM uses (``vision_feature_layer``; the last
layer of the 26 the VLM keeps).

* ``frame_patch_attn`` / ``frame_patch_keys``: that layer's attention received per patch (mean over its 16 heads and
  all 729 query rows) and its head-mean keys, recomputed from the layer's input; pooled to the grid like the features
  (bilinear for onevision, 2x2 average for video), as HoliTom's VisionZip port pools them with ``get_2dPool``.
* ``frame_global`` / ``frame_head_attn``: LLaVA-OneVision drops SigLIP's last layer and its attention-pooling head;
  FastVID restores ``post_layernorm`` + head from the original SigLIP checkpoint (``google/siglip-so400m-patch14-384``)
  and runs them on the tower's output. Pass that module as ``pooling_head``
  (:func:`prune.adapters.vision.load_siglip_pooling_head`; a seeded random one for the tiny model). The head's
  attention is pooled to the grid the same way as the features.

**Positions.** A pre-LLM output with ``positions="original"`` gives each token the position its representative had in
the unpruned prompt (``prefix + t·h·w + p``; with row newlines ``prefix + t·h·(w+1) + r·(w+1) + c``); a newline keeps
the position it had unpruned (the video's newline ``prefix + N``; a frame's newline that of the frame's last row
newline), and the text after the video keeps its original positions (FastVID's ``keep_indexs``).

Shape legend: ``T`` frames, ``h x w`` pooled grid, ``D`` LLM hidden size, ``S`` prompt length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.adapters.llm import Generation, PrunedLM, StageClock
from prune.adapters.vision import (
    attention_flops,
    attention_maps,
    capture_attention_input,
    pooling_head_outputs,
    tower_layer,
)
from prune.api import PreLLMOutput, Strategy, VideoTokens, vision_inputs

__all__ = [
    "LAYOUTS",
    "Generation",
    "LlavaOnevisionAdapter",
    "VideoLayout",
    "answer_logits",
    "load_llava_onevision",
    "tiny_llava_onevision",
]

HF_REPO_OV = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
VIDEO_TOKEN_ID = 151647  # llava-hf conversion: <image> 151646, <video> 151647
IMAGE_TOKEN_ID = 151646


@dataclass(frozen=True)
class VideoLayout:
    """How a checkpoint turns frame features into the LLM's visual tokens.

    Attributes:
        name: ``onevision`` or ``video``.
        pool: ``bilinear`` (HF ``apply_pooling``: interpolate to ceil(side/2)) or ``average`` (``avg_pool2d(2)``).
        newline: ``video`` (one newline after the video) or ``row`` (one after every row of every frame).
        num_frames: frames the checkpoint is evaluated with.
    """

    name: str
    pool: str
    newline: str
    num_frames: int


LAYOUTS = {
    "onevision": VideoLayout("onevision", pool="bilinear", newline="video", num_frames=32),
    "video": VideoLayout("video", pool="average", newline="row", num_frames=64),
}


class LlavaOnevisionAdapter:
    """Runs one ``LlavaOnevisionForConditionalGeneration`` with a pruning strategy, one video at a time.

    Args:
        model: the loaded model (eval mode).
        strategy: the pruning method; its in-LLM stages are installed on the language model.
        layout: ``"onevision"`` or ``"video"`` (see the module docstring), or a :class:`VideoLayout`.
        num_frames: frames per video this adapter accepts; defaults to the layout's.
        pooling_head: SigLIP's ``post_layernorm`` + attention-pooling head (:mod:`prune.adapters.vision`), needed only
            by strategies that declare ``frame_global`` or ``frame_head_attn``.
    """

    def __init__(
        self,
        model,
        strategy: Strategy,
        layout: str | VideoLayout = "onevision",
        num_frames: int | None = None,
        pooling_head=None,
    ) -> None:
        if isinstance(layout, str):
            if layout not in LAYOUTS:
                raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
            layout = LAYOUTS[layout]
        self.model, self.strategy, self.layout = model, strategy, layout
        self.num_frames = num_frames or layout.num_frames
        cfg = model.config
        self.side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 27 for 384/14
        self.grid = (math.ceil(self.side / 2),) * 2 if layout.pool == "bilinear" else (self.side // 2,) * 2
        self.llm = PrunedLM(model.model.language_model, model.lm_head, strategy)
        self.placeholder_id = cfg.video_token_id
        t, h = self.num_frames, self.grid[0]
        self.separators_unpruned = 1 if layout.newline == "video" else t * h
        self.needs = vision_inputs(strategy)
        self.pooling_head = pooling_head
        if self.needs & {"frame_global", "frame_head_attn"} and pooling_head is None:
            raise ValueError(
                f"{strategy.name} needs SigLIP's attention-pooling head, which LLaVA-OneVision drops; pass "
                "pooling_head="
                "prune.adapters.vision.load_siglip_pooling_head('google/siglip-so400m-patch14-384', ...) (FastVID "
                "restores it from the SigLIP checkpoint), or siglip_pooling_head(config) for a random tiny model"
            )
        self.vision_flops = 0.0

    # -- vision ----------------------------------------------------------------------------------------------------

    def video_grid(self, pixel_values_videos: Tensor) -> Tensor:
        """Visual tokens of one video before separators.

        Args:
            pixel_values_videos: ``[1, T, 3, 384, 384]`` normalised frames (``prune.adapters.preprocess``).

        Returns:
            ``[T, h, w, D]`` projected, pooled tokens.
        """
        self._check_pixels(pixel_values_videos)
        return self._encode(pixel_values_videos)[0]

    def video_tokens(self, pixel_values_videos: Tensor, text: Tensor | None = None) -> VideoTokens:
        """What ``strategy.pre_llm`` receives for this video: the grid and the declared vision-side fields."""
        self._check_pixels(pixel_values_videos)
        grid, extras = self._encode(pixel_values_videos)
        t, h, w, d = grid.shape
        return VideoTokens(grid.reshape(t, h * w, d), (h, w), text=text, **extras)

    def _check_pixels(self, pixel_values_videos: Tensor) -> None:
        cfg = self.model.config
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[0] != 1:
            raise ValueError(
                f"pixel_values_videos must be [1, T, 3, H, W] (batch size 1), got {tuple(pixel_values_videos.shape)}"
            )
        _, t, c, height, width = pixel_values_videos.shape
        size = cfg.vision_config.image_size
        if t != self.num_frames:
            raise ValueError(
                f"got {t} frames, this adapter expects {self.num_frames} ({self.layout.name} layout); sample them "
                "with prune.adapters.preprocess.sample_frame_indices or set num_frames"
            )
        if (c, height, width) != (3, size, size):
            raise ValueError(
                f"frames must be 3x{size}x{size}, got {c}x{height}x{width}; resize with prune.adapters.preprocess"
            )

    def _pool(self, x: Tensor) -> Tensor:
        """``[T, side*side, C]`` to ``[T, h*w, C]`` with the layout's pooling (features and vision-side maps alike)."""
        t = x.shape[0]
        if self.layout.pool == "bilinear":
            return self.model.model.apply_pooling(x).reshape(t, -1, x.shape[-1])  # HF OV: bilinear to ceil(side/2)
        grid = x.reshape(t, self.side, self.side, -1).permute(0, 3, 1, 2)  # LLaVA-NeXT get_2dPool(2, "average")
        return F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(t, -1, x.shape[-1])

    def _encode(self, pixel_values_videos: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``[T, h, w, D]`` grid and the vision-side fields the strategy declared (pooled to the grid)."""
        cfg, m = self.model.config, self.model.model
        pixels = pixel_values_videos[0].to(m.vision_tower.dtype)
        tower = m.vision_tower
        index = tower_layer(len(tower.encoder.layers), cfg.vision_feature_layer)
        want_attn = bool(self.needs & {"frame_patch_attn", "frame_patch_keys"})
        with capture_attention_input(tower.encoder.layers[index]) as box:
            out = tower(pixels, output_hidden_states=True)
        feats = out.hidden_states[cfg.vision_feature_layer]
        cls = cfg.vision_feature_select_strategy == "default"
        extras: dict[str, Tensor] = {}
        t, flops = feats.shape[0], 0.0
        if want_attn:
            attn = tower.encoder.layers[index].self_attn
            maps = attention_maps(attn, box["x"], cls=cls)
            extras["frame_patch_attn"] = self._pool(maps["received"].unsqueeze(-1)).squeeze(-1)
            extras["frame_patch_keys"] = self._pool(maps["keys"])
            flops += attention_flops(t, box["x"].shape[1], box["x"].shape[2], attn.num_heads, attn.head_dim)
        if self.needs & {"frame_global", "frame_head_attn"}:
            pooled, head_attn = pooling_head_outputs(self.pooling_head, feats[:, 1:] if cls else feats)
            extras["frame_global"] = pooled
            extras["frame_head_attn"] = self._pool(head_attn.unsqueeze(-1)).squeeze(-1)
            width, s = pooled.shape[1], head_attn.shape[1]
            flops += float(t) * (2 * 2 * s * width * width + 4 * s * width)  # K/V projections and the probe's row
        self.vision_flops = flops
        extras = {k: v for k, v in extras.items() if k in self.needs}
        if cls:
            feats = feats[:, 1:]
        feats = self._pool(m.multi_modal_projector(feats))  # [T, h*w, D]
        return feats.reshape(t, *self.grid, -1), extras

    def visual_sequence(self, pre: PreLLMOutput, grid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Add the layout's separators to the pre-LLM output.

        Returns:
            ``[n + m, D]`` tokens, ``[n + m]`` long index into ``pre.tokens`` (-1 for a separator), and ``[n + m]``
            long offset of each token in the unpruned visual span (for ``positions="original"``).
        """
        newline = self.model.model.image_newline.to(pre.tokens)
        n, d = pre.tokens.shape
        t, h, w, _ = grid.shape
        ids = torch.arange(n, device=pre.tokens.device)
        src = pre.origins()  # [n] flat t*h*w + p of the input token each output token stands at
        if self.layout.newline == "video":
            offsets = torch.cat([src, src.new_tensor([t * h * w])])
            return torch.cat([pre.tokens, newline[None]]), torch.cat([ids, ids.new_tensor([-1])]), offsets
        identity = n == t * h * w and torch.equal(pre.assignment, torch.arange(n, device=pre.assignment.device))
        if identity:  # the original grid layout: a newline after every row
            rows = torch.cat([pre.tokens.view(t * h, w, d), newline.expand(t * h, 1, d)], dim=1).reshape(-1, d)
            index = torch.cat([ids.view(t * h, w), ids.new_full((t * h, 1), -1)], dim=1).reshape(-1)
            return rows, index, torch.arange(rows.shape[0], device=ids.device)
        frame = src // (h * w)  # [n] frame of each output token's earliest member
        ends = torch.ones(n, dtype=torch.bool, device=ids.device)
        ends[:-1] = frame[1:] != frame[:-1]
        slot = ids + torch.cumsum(ends.long(), 0) - ends.long()  # where each token lands after the inserted newlines
        total = n + int(ends.sum())
        tokens = newline.expand(total, d).clone()
        index = ids.new_full((total,), -1)
        tokens[slot], index[slot] = pre.tokens, ids
        # unpruned offsets: token (t, r, c) sat at t*h*(w+1) + r*(w+1) + c; a frame's newline at its last row's end
        row, col = (src % (h * w)) // w, src % w
        offsets = ids.new_zeros(total)
        offsets[slot] = frame * h * (w + 1) + row * (w + 1) + col
        newline_slot = slot[ends] + 1
        offsets[newline_slot] = frame[ends] * h * (w + 1) + (h - 1) * (w + 1) + w
        return tokens, index, offsets

    # -- one sample ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values_videos: Tensor,
        max_new_tokens: int = 16,
        eos_token_ids: tuple[int, ...] = (),
        return_logits: bool = False,
    ) -> Generation:
        """Prune and answer one prompt about one video.

        Args:
            input_ids: ``[1, S]`` prompt ids with one contiguous run of ``<video>`` placeholders (any length >= 1).
            pixel_values_videos: ``[1, T, 3, 384, 384]``.
            max_new_tokens: most tokens to generate (greedy).
            eos_token_ids: stop after one of these.
            return_logits: keep every generated token's logits.

        Returns:
            The :class:`Generation`.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, S] (batch size 1), got {tuple(input_ids.shape)}")
        video_id = self.model.config.video_token_id
        where = (input_ids[0] == video_id).nonzero()[:, 0]
        if where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
            raise ValueError(f"input_ids must hold one contiguous run of <video> placeholders (id {video_id})")
        device = self.model.device
        prefix, suffix = input_ids[:, : int(where[0])].to(device), input_ids[:, int(where[-1]) + 1 :].to(device)

        clock = StageClock(device)
        clock.start()
        self._check_pixels(pixel_values_videos)
        grid, extras = self._encode(pixel_values_videos.to(device))
        clock.mark("vision")
        embed = self.model.get_input_embeddings()
        text = embed(torch.cat([prefix, suffix], dim=1))[0]
        t, h, w, d = grid.shape
        pre = self.strategy.pre_llm(VideoTokens(grid.reshape(t, h * w, d), (h, w), text=text, **extras))
        vis_tokens, vis_index, offsets = self.visual_sequence(pre, grid)
        clock.mark("pre_llm")

        embeds = torch.cat([embed(prefix)[0], vis_tokens.to(text.dtype), embed(suffix)[0]])[None]
        minus = vis_index.new_full((prefix.shape[1],), -1), vis_index.new_full((suffix.shape[1],), -1)
        visual = torch.cat([minus[0], vis_index, minus[1]])
        positions = None
        if pre.positions == "original":
            n_pre, span = prefix.shape[1], t * h * w + self.separators_unpruned
            after = torch.arange(suffix.shape[1], device=device) + n_pre + span
            positions = torch.cat([torch.arange(n_pre, device=device), offsets.to(device) + n_pre, after])
        tokens, stats, logits = self.llm.generate(
            embeds,
            visual,
            pre,
            max_new_tokens,
            eos_token_ids,
            return_logits=return_logits,
            clock=clock,
            positions=positions,
        )
        timings = clock.seconds()
        separators = int((vis_index < 0).sum())
        gen = Generation(tokens, t * h * w, pre.n, separators, stats, timings, logits, pre)
        gen.vision_flops = self.vision_flops
        return gen


def answer_logits(model, pixels: Tensor, prompts: Sequence[Sequence[int]], frame_index: Tensor | None = None) -> Tensor:
    """Batched, differentiable ``none`` forward: logits of the token after each prompt (for training the probe).

    The same computation as :class:`LlavaOnevisionAdapter` with ``prune=none`` (the
    ``onevision`` layout: vision tower, projector, bilinear pooling, one newline after the video, spliced at the
    ``<video>`` id, positions ``0..S-1``), batched for training; a test checks the two agree. Prompts are
    right-padded: causal attention keeps padding out of every real position.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration`` (the probe model, ``eval/probe.py``).
        pixels: ``[B, T, 3, 384, 384]`` preprocessed frames, or with ``frame_index`` ``[U, 3, 384, 384]`` distinct
            frames.
        prompts: ``B`` id lists, each with one ``<video>`` id.
        frame_index: ``[B, T]`` long, which of the ``U`` frames each video frame is. The vision tower sees one frame
            at a time, so a frame shown many times (the probe's empty background) is encoded once and its features
            (and gradients) shared; ``None``: every frame is its own.

    Returns:
        ``[B, V]`` logits at each prompt's last position.
    """
    cfg, m = model.config, model.model
    frames = pixels if frame_index is not None else pixels.flatten(0, 1)
    b, t = frame_index.shape if frame_index is not None else pixels.shape[:2]
    out = m.vision_tower(frames, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    feats = m.apply_pooling(m.multi_modal_projector(feats))  # [B*T or U, 196, D]
    if frame_index is not None:
        feats = feats[frame_index.flatten()]
    visual = torch.cat([feats.reshape(b, -1, feats.shape[-1]), m.image_newline.expand(b, 1, -1)], dim=1)
    embed = model.get_input_embeddings()
    rows, last = [], []
    for i, ids in enumerate(prompts):
        at = list(ids).index(cfg.video_token_id)
        ids_t = torch.tensor(ids, device=pixels.device)
        rows.append(torch.cat([embed(ids_t[:at]), visual[i], embed(ids_t[at + 1 :])]))
        last.append(rows[-1].shape[0] - 1)
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
    positions = torch.arange(length, device=pixels.device).expand(b, -1)
    hidden = m.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    return model.lm_head(hidden[torch.arange(b), torch.tensor(last)])


# -- building and loading -------------------------------------------------------------------------------------------


def tiny_config(
    vocab_size: int = 151_936,
    llm_layers: int = 4,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    rope_theta: float = 1_000_000.0,
):
    """A randomly initialisable LLaVA-OneVision config with the real geometry and tiny widths.

    SigLIP at 384 px with 14 px patches (27x27 patches → 14x14 or 13x13 after pooling), a Qwen2 with GQA (4 query /
    2 key-value heads), by default the real ``<image>``/``<video>`` ids, vocabulary size and RoPE base (Qwen2-7B's
    1e6), so real Qwen chat ids work. The trained probe model (``scripts/train_probe.py``) passes its small word
    vocabulary, its ids and a RoPE base of 1e4 (docs/probe.md: with 16-dim heads, 1e6 leaves almost no rotary
    frequency that orders 1,600 positions).
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", llm_layers: int = 4, **config):
    """Build the tiny model from config with random weights from ``seed`` (the global RNG is left as it was).

    ``config`` goes to :func:`tiny_config` (the probe model passes its vocabulary size and token ids).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = tiny_config(llm_layers=llm_layers, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(cfg)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.eval()


def load_llava_onevision(
    path_or_repo: str = HF_REPO_OV,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
):
    """Load a LLaVA-OneVision checkpoint in the llava-hf layout with ``from_pretrained``.

    Raises:
        FileNotFoundError: the weights are neither local nor downloadable; the message says how to get them.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    try:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path_or_repo,
            dtype=dtype,
            attn_implementation={"text_config": attn_implementation, "vision_config": "sdpa"},
            device_map=device_map,
        )
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load LLaVA-OneVision weights from {path_or_repo!r}: {err}. Download them first "
            f"(`huggingface-cli download {HF_REPO_OV}`, about 16 GB, into HF_HOME) or point to a local copy."
        ) from err
    return model.eval()
