"""PLLaVA-7B adapter on native transformers 5.23 modules (no forked model file).

PLLaVA (Xu et al., "PLLaVA: Parameter-free LLaVA Extension from Images to Videos for Video Dense Captioning",
arXiv 2404.16994; official code ``magic-research/PLLaVA``) turns LLaVA-1.6-Vicuna-7B into a video model by
adaptive average pooling of the projected frame features in space and time. It is the backbone of PruneVid's
released code (``Visual-AI/PruneVid``). The video path, following ``backbones.md`` §1.3 and
``models/pllava/modeling_pllava.py`` (``PllavaForConditionalGeneration.forward``, ``PllavaMultiModalProjector``):

1. ``T = 16`` frames, each 336x336 (:func:`preprocess_pllava`), go through CLIP ViT-L/14-336; the hidden states
   of the second-to-last layer (``hidden_states[-2]``) without the CLS token give ``[T, 576, 1024]``.
2. The projector runs **before** pooling: Linear 1024->4096, GELU (exact erf, ``ACT2FN["gelu"]``), Linear
   4096->4096, giving ``[T, 576, 4096]``. (``LlavaNextVideo`` pools before its projector; with a GELU in between
   the orders differ, so that class cannot hold PLLaVA's weights.)
3. ``AdaptiveAvgPool3d((16, 12, 12))`` over ``(T, 24, 24)``: an exact 2x2 spatial average, identity over the 16
   frames, flattened frame by frame: ``[T * 144 = 2304, 4096]``.
4. The tokens replace the single ``<image>`` placeholder (id 32000) of the prompt; no separators, positions
   contiguous. The LLM is Vicuna-7B v1.5 (Llama, 32 layers, MHA) with a LoRA on ``q_proj``/``v_proj`` that
   :mod:`prune.adapters.convert_pllava` merges at load time (``lora_alpha`` 14 by default, PruneVid's MCQ value).

The container is ``LlavaForConditionalGeneration`` (``CLIPVisionModel`` + ``multi_modal_projector.linear_1 / act /
linear_2`` + ``LlamaModel`` + ``lm_head``) with ``vision_feature_layer=-2`` and ``vision_feature_select_strategy=
"default"``: exactly PLLaVA's modules and order. Its own ``get_image_features`` stops before pooling, so this
adapter runs the tower and projector itself and pools in 3-D (step 3); the LLM runs through
:class:`prune.adapters.llm.PrunedLM`, which handles Llama as it does Qwen2. The pre-LLM hook sits between pooling
and the splice, where PruneVid's ``merge_frames_dynamic`` sits in its fork (``backbones.md`` §2a).

**Vision-side inputs** (only for strategies that declare them; :mod:`prune.adapters.vision`), from the CLIP layer
the VLM uses (layer -2), pooled to the 12x12 grid by the same 2x2 average as the features:

* ``frame_patch_attn`` / ``frame_patch_keys``: attention each patch receives (mean over heads and all 577 query rows,
  CLS row included) and the patches' head-mean keys;
* ``frame_head_attn``: CLIP has no attention-pooling head; its CLS token plays that role, so the CLS row's head-mean
  attention over the patches in that layer stands in (VisionZip's own CLIP signal);
* ``frame_global``: CLIP's pooled output (``post_layernorm`` of the last layer's CLS) stands in for SigLIP's pooled
  descriptor.

**Positions.** ``positions="original"`` gives each token the position of its representative in the unpruned prompt
(``prefix + t·144 + p``) and keeps the text after the video at its original positions.

Shape legend: ``T`` frames, ``P = 144`` tokens per frame (12x12), ``D`` LLM hidden size, ``S`` prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prune.adapters.convert_pllava import DEFAULT_LORA_ALPHA, HUB_REPO, load_original
from prune.adapters.llm import Generation, PrunedLM, StageClock
from prune.adapters.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _as_tensor, _to_channels_first
from prune.adapters.vision import attention_flops, attention_maps, capture_attention_input, tower_layer
from prune.api import Strategy, VideoTokens, vision_inputs

__all__ = [
    "HF_REPO",
    "IMAGE_TOKEN_ID",
    "NUM_FRAMES",
    "POOL_GRID",
    "SYSTEM_MVBENCH",
    "SYSTEM_VIDEOMME",
    "PllavaAdapter",
    "load_pllava",
    "pllava_prompt",
    "pllava_resize_shape",
    "preprocess_pllava",
    "tiny_config",
    "tiny_pllava",
]

HF_REPO = HUB_REPO  # "ermu2001/pllava-7b"
IMAGE_TOKEN_ID = 32000  # <image> in the llava-hf Vicuna tokenizer (vocabulary padded to 32064)
VOCAB_SIZE = 32064
NUM_FRAMES = 16  # PLLaVA / PruneVid eval: --num_frames 16 --pooling_shape 16-12-12
POOL_GRID = (12, 12)  # spatial part of pooling_shape 16-12-12
IMAGE_SIZE = 336
SHORTEST_EDGE = 336  # CLIPImageProcessor size["shortest_edge"] and crop_size
MAX_LONG_EDGE = 640  # PllavaProcessor.resize_crop_longshort caps the long side at 640 before the CLIP processor

# System prompts of PruneVid's eval conversations (tasks/eval/eval_utils.py: conv_eval_mvbench, conv_eval_videomme).
SYSTEM_MVBENCH = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that accurately "
    "addresses the question.\n"
)
SYSTEM_VIDEOMME = (
    "Select the best answer to the following multiple-choice question based on the video. Respond with only the "
    "letter (A, B, C, or D) of the correct option.\n"
)
_SYSTEMS = {"mvbench": SYSTEM_MVBENCH, "videomme": SYSTEM_VIDEOMME}


# -- prompt -------------------------------------------------------------------------------------------------------


def pllava_prompt(
    context: str,
    task: str = "mvbench",
    post_query: str = "\nOnly give the best option.",
    answer_prefix: str = "Best option:(",
) -> str:
    r"""PLLaVA's multiple-choice eval prompt around one ``<image>`` placeholder.

    This is the prompt PruneVid's MVBench and VideoMME evals build (``Visual-AI/PruneVid:tasks/eval/mvbench/
    pllava_eval_mvbench.py`` and ``videomme/pllava_eval_videomme.py``, both with ``--conv_mode eval_mvbench`` /
    ``eval_videomme`` in ``scripts/eval.sh``): the conversation template ``conv_eval_mvbench`` (roles ``"USER: "`` and
    ``"ASSISTANT:"``, separators ``" "`` and ``"</s>"``, the media token ``"<image>\n"`` as its own user turn),
    ``post_query_prompt="\nOnly give the best option."`` and ``answer_prompt="Best option:("``. ``Conversation.
    get_prompt`` then yields::

        {system} USER: <image>\n USER: {context} \nOnly give the best option. ASSISTANT:Best option:(

    The two consecutive ``USER:`` turns are the official layout, kept on purpose. PLLaVA's own scripts use the same
    MVBench template. The tokenizer adds ``<s>`` in front (the official processor tokenizes with special tokens);
    ``<image>`` must map to the single id :data:`IMAGE_TOKEN_ID`.

    Args:
        context: the question and its options, e.g. ``"Question: ...\nOptions:\n(A) ...\n(B) ..."`` (the official
            ``qa_template``).
        task: ``"mvbench"`` (also EgoSchema in PruneVid's script) or ``"videomme"``: selects the system prompt.
        post_query: appended to the question after a space; ``""`` appends nothing (no space either).
        answer_prefix: text after ``ASSISTANT:`` that the answer continues; ``""`` for a free answer.

    Returns:
        The prompt string.

    Raises:
        ValueError: for an unknown ``task``, or a ``context`` that already holds ``<image>``.
    """
    if task not in _SYSTEMS:
        raise ValueError(f"task must be one of {sorted(_SYSTEMS)}, got {task!r}")
    if "<image>" in context:
        raise ValueError("context must not contain <image>; pllava_prompt places the single video placeholder itself")
    query = f"{context} {post_query}" if post_query else context
    return f"{_SYSTEMS[task]} USER: <image>\n USER: {query} ASSISTANT:{answer_prefix}"


# -- preprocessing ------------------------------------------------------------------------------------------------


def pllava_resize_shape(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Sizes of ``PllavaProcessor.resize_crop_longshort`` for one video of ``height x width`` frames.

    The short side goes to ``max(336, min(short, int(min(640, long) / (long / short))))``, i.e. the long side is
    capped at 640 px but the short side never drops below 336; the long side follows the aspect ratio, truncated
    (HF ``get_resize_output_image_size``). The processor then slices the long side of the resized frame to
    ``int(short' * (long / short))`` pixels from offset ``((resized_long - crop_long) // 2) // 2``. For a single video
    the two long sides agree unless floating point makes them differ by a pixel, so the slice is a no-op in practice.

    Args:
        height: frame height ``H``.
        width: frame width ``W``.

    Returns:
        ``((resized_h, resized_w), (crop_h, crop_w))``.
    """
    short, long = min(height, width), max(height, width)
    rate = long / short
    out_short = max(min(short, int(min(MAX_LONG_EDGE, long) / rate)), SHORTEST_EDGE)
    # HF get_resize_output_image_size(size=out_short, default_to_square=False, max_size=9999)
    new_long = long if out_short == short else int(out_short * long / short)
    resized = (new_long, out_short) if width <= height else (out_short, new_long)
    target_long = int(out_short * rate)
    crop = (target_long, out_short) if height > width else (out_short, target_long)
    return resized, crop


def _pil_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 ``[H, W, 3]`` frame as transformers' ``image_transforms.resize`` does (PIL bicubic)."""
    from PIL import Image

    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


def preprocess_pllava(
    frames: np.ndarray | Tensor,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> Tensor:
    """Turn decoded frames into PLLaVA's ``pixel_values``, as ``PllavaProcessor`` + ``CLIPImageProcessor`` do.

    Per frame (``magic-research/PLLaVA:models/pllava/processing_pllava.py`` with transformers 4.37's
    ``CLIPImageProcessor``, size 336, crop 336):

    1. ``resize_crop_longshort``: PIL bicubic resize of the short side to ``max(336, min(short, 640 / aspect))``,
       i.e. the long side capped at 640 px (:func:`pllava_resize_shape`), then the processor's long-side slice;
    2. CLIP: PIL bicubic resize of the short side to 336 (long side ``int(336 * long / short)``), centre crop
       336x336 (offset ``(size - 336) // 2``);
    3. ``uint8 * (1/255)`` in float64, cast to float32, ``(x - mean) / std`` in float32 with CLIP's mean/std.

    Frame sampling is not done here (PLLaVA's MVBench loader takes 16 segment midpoints). No torchvision needed.

    Args:
        frames: ``[T, H, W, 3]`` (or ``[T, 3, H, W]``) uint8 RGB frames, numpy array or tensor; ``H, W >= 1``.
        mean: per-channel mean on the ``[0, 1]`` scale (CLIP's by default).
        std: per-channel std on the ``[0, 1]`` scale.

    Returns:
        ``[1, T, 3, 336, 336]`` float32 on CPU.

    Raises:
        ValueError: for a rank other than 4, a channel count other than 3, zero frames, an empty image, or a dtype
            other than uint8.
    """
    video = _to_channels_first(_as_tensor(frames))
    if video.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB (PLLaVA resizes uint8 images with PIL), got {video.dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {len(mean)} and {len(std)}")
    array = video.permute(0, 2, 3, 1).cpu().numpy()  # [T, H, W, 3]
    height, width = array.shape[1:3]
    (rh, rw), (ch, cw) = pllava_resize_shape(height, width)
    # The processor slices along the long side of the resized frame (hslice when taller than wide).
    if rh > rw:
        start = ((rh - ch) // 2) // 2
        rows, cols = slice(start, start + ch), slice(None)
    else:
        start = ((rw - cw) // 2) // 2
        rows, cols = slice(None), slice(start, start + cw)
    mean_a, std_a = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    out = np.empty((len(array), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, frame in enumerate(array):
        frame = _pil_resize(np.ascontiguousarray(frame), rh, rw)[rows, cols]
        h, w = frame.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = long if short == SHORTEST_EDGE else int(SHORTEST_EDGE * long / short)
        nh, nw = (new_long, SHORTEST_EDGE) if w <= h else (SHORTEST_EDGE, new_long)
        frame = _pil_resize(frame, nh, nw)
        top, left = (nh - IMAGE_SIZE) // 2, (nw - IMAGE_SIZE) // 2
        frame = frame[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
        scaled = (frame.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = ((scaled - mean_a) / std_a).transpose(2, 0, 1)
    return torch.from_numpy(out)[None]


# -- the adapter --------------------------------------------------------------------------------------------------


class PllavaAdapter:
    """Runs one PLLaVA (a ``LlavaForConditionalGeneration``) with a pruning strategy, one video at a time.

    Args:
        model: the loaded model (:func:`load_pllava` or :func:`tiny_pllava`), eval mode.
        strategy: the pruning method; its in-LLM stages are installed on the Llama.
        num_frames: frames per video; pooling keeps them all (``AdaptiveAvgPool3d((num_frames, 12, 12))``). PLLaVA
            and PruneVid evaluate with 16.
    """

    def __init__(self, model, strategy: Strategy, num_frames: int = NUM_FRAMES) -> None:
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(
                "PLLaVA takes one CLIP layer without its CLS token: the config needs vision_feature_layer=<int> "
                f"and vision_feature_select_strategy='default', got {cfg.vision_feature_layer!r} and "
                f"{cfg.vision_feature_select_strategy!r}"
            )
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer (PLLaVA: 16), got {num_frames!r}")
        self.model, self.strategy, self.num_frames = model, strategy, num_frames
        self.side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 24 for 336/14
        self.grid = POOL_GRID
        self.placeholder_id = cfg.image_token_id
        self.separators_unpruned = 0
        self.llm = PrunedLM(model.model.language_model, model.lm_head, strategy)
        self.needs = vision_inputs(strategy)
        self.vision_flops = 0.0
        self._extras: dict[str, Tensor] = {}

    def _pool(self, x: Tensor) -> Tensor:
        """``[T, 576, C]`` to ``[T, 144, C]``: the 2x2 average of ``AdaptiveAvgPool3d((T, 12, 12))``."""
        t, _, c = x.shape
        grid = x.reshape(t, self.side, self.side, c).permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(grid, self.grid).permute(0, 2, 3, 1).reshape(t, -1, c)

    def video_grid(self, pixel_values_videos: Tensor) -> Tensor:
        """PLLaVA's visual tokens of one video: CLIP layer -2 without CLS, projector, then 3-D average pooling.

        Args:
            pixel_values_videos: ``[1, T, 3, 336, 336]`` normalised frames (:func:`preprocess_pllava`).

        Returns:
            ``[T, 12, 12, D]`` projected, pooled tokens.
        """
        cfg, m = self.model.config, self.model.model
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[0] != 1:
            raise ValueError(
                f"pixel_values_videos must be [1, T, 3, H, W] (batch size 1), got {tuple(pixel_values_videos.shape)}"
            )
        _, t, c, height, width = pixel_values_videos.shape
        size = cfg.vision_config.image_size
        if t != self.num_frames:
            raise ValueError(
                f"got {t} frames, this adapter expects {self.num_frames} (PLLaVA evaluates 16); sample that many "
                "frames or build the adapter with num_frames"
            )
        if (c, height, width) != (3, size, size):
            raise ValueError(f"frames must be 3x{size}x{size}, got {c}x{height}x{width}; use preprocess_pllava")
        tower = m.vision_tower
        index = tower_layer(len(tower.encoder.layers), cfg.vision_feature_layer)
        with capture_attention_input(tower.encoder.layers[index]) as box:
            out = tower(pixel_values_videos[0].to(tower.dtype), output_hidden_states=True)
        self._extras, self.vision_flops = {}, 0.0
        if self.needs & {"frame_patch_attn", "frame_patch_keys", "frame_head_attn"}:
            attn = tower.encoder.layers[index].self_attn
            maps = attention_maps(attn, box["x"], cls=True)
            self._extras["frame_patch_attn"] = self._pool(maps["received"].unsqueeze(-1)).squeeze(-1)
            self._extras["frame_patch_keys"] = self._pool(maps["keys"])
            self._extras["frame_head_attn"] = self._pool(maps["cls"].unsqueeze(-1)).squeeze(-1)
            self.vision_flops = attention_flops(t, box["x"].shape[1], box["x"].shape[2], attn.num_heads, attn.head_dim)
        if "frame_global" in self.needs:
            self._extras["frame_global"] = out.pooler_output.float()
        self._extras = {k: v for k, v in self._extras.items() if k in self.needs}
        feats = out.hidden_states[cfg.vision_feature_layer][:, 1:]  # [T, 576, Dv], CLS dropped
        feats = m.multi_modal_projector(feats)  # [T, 576, D]: PLLaVA projects before pooling
        video = feats.view(t, self.side, self.side, -1).permute(3, 0, 1, 2)[None]  # [1, D, T, 24, 24]
        pooled = F.adaptive_avg_pool3d(video, (t, *self.grid))  # identity over T, 2x2 average in space
        return pooled[0].permute(1, 2, 3, 0)  # [T, 12, 12, D]

    def video_tokens(self, pixel_values_videos: Tensor, text: Tensor | None = None) -> VideoTokens:
        """What ``strategy.pre_llm`` receives for this video: the grid and the declared vision-side fields."""
        grid = self.video_grid(pixel_values_videos)
        t, h, w, d = grid.shape
        return VideoTokens(grid.reshape(t, h * w, d), (h, w), text=text, **self._extras)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values_videos: Tensor,
        max_new_tokens: int = 16,
        eos_token_ids: tuple[int, ...] = (),
        return_logits: bool = False,
        **inputs: Any,
    ) -> Generation:
        """Prune and answer one prompt about one video (greedy).

        Args:
            input_ids: ``[1, S]`` prompt ids with one contiguous run of ``<image>`` (id 32000; normally one token,
                as :func:`pllava_prompt` produces).
            pixel_values_videos: ``[1, T, 3, 336, 336]``.
            max_new_tokens: most tokens to generate.
            eos_token_ids: stop after one of these (Vicuna: ``</s>`` = 2).
            return_logits: keep every generated token's ``[V]`` logits.
            **inputs: accepted for the :class:`~prune.adapters.VideoAdapter` contract; PLLaVA uses none.

        Returns:
            The :class:`Generation` (``separators`` is always 0).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, S] (batch size 1), got {tuple(input_ids.shape)}")
        where = (input_ids[0] == self.placeholder_id).nonzero()[:, 0]
        if where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
            raise ValueError(
                f"input_ids must hold one contiguous run of <image> placeholders (id {self.placeholder_id}); "
                "build the prompt with pllava_prompt"
            )
        device = self.model.device
        prefix, suffix = input_ids[:, : int(where[0])].to(device), input_ids[:, int(where[-1]) + 1 :].to(device)

        clock = StageClock(device)
        clock.start()
        grid = self.video_grid(pixel_values_videos.to(device))
        clock.mark("vision")
        embed = self.model.get_input_embeddings()
        text = embed(torch.cat([prefix, suffix], dim=1))[0]
        t, h, w, d = grid.shape
        pre = self.strategy.pre_llm(VideoTokens(grid.reshape(t, h * w, d), (h, w), text=text, **self._extras))
        clock.mark("pre_llm")

        embeds = torch.cat([embed(prefix)[0], pre.tokens.to(text.dtype), embed(suffix)[0]])[None]
        visual = torch.cat(
            [
                torch.full((prefix.shape[1],), -1, dtype=torch.long, device=device),
                torch.arange(pre.n, device=device),
                torch.full((suffix.shape[1],), -1, dtype=torch.long, device=device),
            ]
        )
        positions = None
        if pre.positions == "original":
            n_pre = prefix.shape[1]
            after = torch.arange(suffix.shape[1], device=device) + n_pre + t * h * w
            positions = torch.cat([torch.arange(n_pre, device=device), pre.origins().to(device) + n_pre, after])
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
        gen = Generation(tokens, t * h * w, pre.n, 0, stats, timings, logits, pre)
        gen.vision_flops = self.vision_flops
        return gen


# -- building and loading -----------------------------------------------------------------------------------------


def tiny_config(llm_layers: int = 4):
    """A randomly initialisable PLLaVA config: the real geometry with tiny widths.

    CLIP at 336 px with 14 px patches (24x24 patches -> 12x12 after pooling, 16 frames -> 2,304 visual tokens), two
    CLIP layers (layer -2 is the first), a Llama with MHA like Vicuna, the real vocabulary size 32064 and the real
    ``<image>`` id 32000, so real Vicuna prompt ids work.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def tiny_pllava(seed: int = 0, attn_implementation: str = "sdpa", llm_layers: int = 4):
    """Build the tiny PLLaVA with random weights from ``seed`` (the global RNG is left as it was)."""
    from transformers import LlavaForConditionalGeneration

    cfg = tiny_config(llm_layers=llm_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.eval()


def load_pllava(
    path_or_repo: str = HF_REPO,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    device_map: str | dict | None = None,
    **kwargs: Any,
):
    """Load the released PLLaVA-7B (or a local copy) with its LoRA merged at scale ``lora_alpha / r``.

    Conversion and the choice of ``lora_alpha`` (14 = PruneVid's MVBench/VideoMME/EgoSchema setting; PLLaVA's own
    scripts use 4) are documented in :mod:`prune.adapters.convert_pllava`.

    Args:
        path_or_repo: checkpoint directory or hub repo id (``ermu2001/pllava-7b``).
        dtype: parameter dtype.
        attn_implementation: the LLM's attention kernel.
        lora_alpha: LoRA α.
        device_map: passed to ``from_pretrained``.
        **kwargs: ``revision``, ``vision_config`` (see :func:`~prune.adapters.convert_pllava.load_original`).

    Raises:
        FileNotFoundError: the weights are neither local nor downloadable; the message names the repo and its size.
    """
    return load_original(
        path_or_repo,
        lora_alpha=lora_alpha,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device_map=device_map,
        **kwargs,
    )
