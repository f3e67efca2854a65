"""ST-LLM-7B adapter: EVA-CLIP ViT-g + BT-Adapter → InstructBLIP Q-Former → Vicuna-7B, on native transformers modules.

ST-LLM (Liu et al., "ST-LLM: Large Language Models Are Effective Temporal Learners", arXiv 2404.00308; code
``TencentARC/ST-LLM``, weights ``farewellthree/ST_LLM_weight``) has no transformers port. It is rebuilt here from
native 5.23 modules plus one hand-written block (backbones.md §1.4):

==================  =====================================================  =======================================
stage               official module (``stllm/models``)                     here
==================  =====================================================  =======================================
ViT                 ``EVAVisionTransformer_BTAdapter`` blocks: EVA ViT-g/14  ``InstructBlipVisionModel`` (embeddings
                    at 224 px, 39 blocks, 1408-d, 16 heads, MLP 6144,      + 39 ``InstructBlipEncoderLayer``; same
                    fused ``qkv`` with q/v biases, LayerNorm eps 1e-6      fused ``qkv`` + q/v bias, eps 1e-6)
BT-Adapter          ``BTAdapter_T/_S`` (3 each), ``BTAdapter_cls``,        :class:`BTAdapter` (hand-written; its
                    ``BTAdapter_position`` = ``nn.Embedding(64, 1408)``    attention/MLP are native modules)
``ln_vision``       ``nn.LayerNorm(1408)`` (eps 1e-5, computed in fp32)    ``vision.post_layernorm`` with eps set to
                                                                           1e-5, run in fp32
Q-Former            LAVIS ``BertLMHeadModel`` (BERT-base, 12 layers,       ``InstructBlipQFormerModel``
                    cross-attention every 2nd layer, 32 queries, the
                    question text as input, vocab 30523)
projector           ``llama_proj`` = ``Linear(768, 4096)``                 ``llama_proj``
LLM                 Vicuna-7B v1.1 (LLaMA-1, 32 layers, vocab 32001,       ``LlamaForCausalLM`` run by
                    fully fine-tuned)                                      :class:`prune.adapters.llm.PrunedLM`
==================  =====================================================  =======================================

**BT-Adapter** (``stllm/models/eva_btadapter.py``, read for this port; ``T`` frames, ``P = 256`` patches). It taps
the ViT after each of its last 3 blocks (36, 37, 38 of 39) and keeps a branch sequence ``[B, 1 + P·T, D]`` laid out
patch-major (token ``1 + p·T + t`` is patch ``p`` of frame ``t``) with one CLS for the whole video:

1. after block ``L-3``: the branch starts from the ViT patch tokens plus the ViT's own ``pos_embed``, plus a learned
   temporal embedding (``nn.Embedding(64, D)``, row ``t`` for frame ``t``); its CLS is the mean of (frame-mean ViT
   CLS) and (``BTAdapter_cls + pos_embed[0]``);
2. after blocks ``L-2``, ``L-1``: the ViT tokens (patch-major, CLS = frame-mean ViT CLS) are *added* to the branch;
3. at each tap: a temporal block (pre-norm attention over the ``T`` frames of each patch, then ``temporal_fc``, no
   MLP; residual on the patch tokens, CLS untouched), then a spatial block (an EVA block over each frame's ``1 + P``
   tokens with the video CLS copied to every frame, CLS outputs averaged over frames; LayerNorm eps 1e-5, the
   ``nn.LayerNorm`` default, unlike the ViT's 1e-6);
4. after the last block the ViT output (per frame) and the branch (CLS copied to every frame) are averaged:
   ``(x + branch) / 2``; then ``ln_vision``.

**Video tokens.** ``video_input: "all"`` (``config/instructblipbase_stllm_qa.yaml``): the Q-Former runs per frame on
the 257 ViT tokens with the question, the first 32 outputs go through ``llama_proj``, and the frames are concatenated:
``[T, 32, 4096]`` → ``T·32`` tokens, 2,048 at 64 frames. No separators.

**Grid.** There is no spatial grid: a frame is 32 learned-query outputs. The adapter hands strategies the tokens as
``[T, 32, D]`` on the grid ``(1, 32)`` (one row of 32 query slots). Consequences per strategy: ``none``/``fastv``/
``random`` ignore the grid; PruneVid and HieraVid never read it, but treat slot ``p`` of every frame as the same
"position" (static/dynamic detection, DySeg), which fits: slot ``p`` is always the same learned query; ``pool``
averages runs of adjacent query slots (1-D adaptive bins along the row) and, with ``temporal > 1``, the same slot over
consecutive frames. Adjacent slots share no spatial meaning, so spatial pooling here is a plain budget-matched
merge. ``(4, 8)`` was rejected: it would invent a 2-D neighbourhood between query slots.

**Prompt** (:func:`st_llm_prompt`). The QA evaluation of the ``instructblip_vicuna0_btadapter`` model uses
``CONV_instructblip_Vicuna0`` with ``instruction=False``, i.e. ``Chat.get_context_emb_sim``: the LLM input is the video
tokens **first**, then the text ``###Human: {question} ###Assistant: `` tokenized *with* BOS, where the official code
has remapped the tokenizer's BOS to ``</s>`` (id 2; ``STLLMModel.__init__`` adds ``bos_token='</s>'`` when
``qformer_text_input``), so the text starts with id 2. No ``<Video>…</Video>`` wrapper and, in the QA scripts
(``system=False``), no system text. The Q-Former gets the question (``Chat.upload_video(..., text=question)``),
tokenized by BERT ``bert-base-uncased`` with ``truncation_side="left"`` and ``max_length = max_txt_len = 256``.

**Left truncation** (``max_input_tokens``). ``Chat.answer(max_new_tokens=300, max_length=2000)`` keeps only the last
``2000 - 300 = 1700`` input embeddings. At 64 frames (2,048 visual + ~20 text tokens) that drops the first ~368
positions, all of them visual (the video comes first): about the first 11.5 frames. ``max_input_tokens=None`` (default)
keeps everything; ``OFFICIAL_MAX_INPUT_TOKENS`` (1700) reproduces the official behaviour. Truncation applies to the
spliced prompt *after* the pre-LLM stage (pruned prompts are truncated less or not at all); the dropped visual tokens
are removed from the :class:`~prune.api.PreLLMOutput` handed to the LLM (see :func:`drop_leading_visual`), so
``Generation.visual_pre_llm``, ``Generation.pre`` and the per-layer counts describe what the LLM actually saw;
``visual_in`` stays ``T·32``.

**Vision-side inputs** (``VideoTokens.frame_*``) are refused: the LLM sees Q-Former query outputs, not patches, so no
per-patch vision attention or pooling-head map lines up with its tokens; strategies that declare ``vision_inputs``
(VisionZip, FastVID) fail at construction with that reason. ``positions="original"`` is honoured: token ``t·32 + q``
sits at ``prefix + t·32 + q`` and the text after the video keeps its positions (left truncation then shifts all of
them so the first kept position is 0, as the official code renumbers the truncated prompt).

**Deviations** (documented in ``docs/st_llm.md``): greedy decoding (the QA scripts use beam search 5 and
repetition penalty 1.5; MVBench is greedy), bf16 instead of fp16 by default, single-token stops only
(:data:`EOS_TOKEN_IDS`; ``###`` also encodes as two tokens ``[2277, 29937]``).

Shape legend: ``T`` frames, ``P`` ViT patches (256), ``Q`` queries (32), ``Dv`` ViT width, ``Dq`` Q-Former width,
``D`` LLM width, ``M`` Q-Former text length, ``S`` prompt length.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prune.adapters.llm import Generation, PrunedLM, StageClock
from prune.adapters.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from prune.api import PreLLMOutput, Strategy, VideoTokens, vision_inputs

__all__ = [
    "EOS_TOKEN_IDS",
    "HF_REPO",
    "HF_SUBFOLDER",
    "IMAGE_PLACEHOLDER",
    "MAX_FRAMES",
    "OFFICIAL_MAX_INPUT_TOKENS",
    "PLACEHOLDER_ID",
    "QFORMER_MAX_LEN",
    "QFORMER_TOKENIZER",
    "QFORMER_TRUNCATION_SIDE",
    "TEXT_BOS_ID",
    "BTAdapter",
    "BTTemporalBlock",
    "StLlm",
    "StLlmAdapter",
    "drop_leading_visual",
    "preprocess_st_llm",
    "st_llm_config",
    "st_llm_input_ids",
    "st_llm_prompt",
    "tiny_config",
    "tiny_st_llm",
]

HF_REPO = "farewellthree/ST_LLM_weight"
HF_SUBFOLDER = "QA_weight"  # the MCQ/QA checkpoint (config/instructblipbase_stllm_qa.yaml); conversation_weight is VCG
PLACEHOLDER_ID = -200  # outside the vocabulary (as LLaVA's IMAGE_TOKEN_INDEX); replaced by the video tokens
IMAGE_PLACEHOLDER = "<ImageHere>"
TEXT_BOS_ID = 2  # the official tokenizer's BOS after ``add_special_tokens({'bos_token': '</s>'})``: ``</s>``
EOS_TOKEN_IDS = (2, 835)  # </s>, and "###" (its one-token form; the stop criterion also matches [2277, 29937])
QFORMER_TOKENIZER = "bert-base-uncased"  # Blip2Base.init_tokenizer (plus a [DEC] bos token that encoding never uses)
QFORMER_MAX_LEN = 256  # max_txt_len in config/instructblipbase_stllm_qa.yaml
QFORMER_TRUNCATION_SIDE = "left"  # STLLMModel: init_tokenizer(truncation_side="left")
OFFICIAL_MAX_INPUT_TOKENS = 2000 - 300  # Chat.answer(max_length=2000, max_new_tokens=300) keeps this many embeddings
MAX_FRAMES = 64  # rows of BTAdapter_position
IMAGE_SIZE = 224


# -- prompt and preprocessing ---------------------------------------------------------------------------------------


def st_llm_prompt(context: str) -> str:
    """The QA-evaluation prompt of ST-LLM around the video placeholder.

    ``Chat.get_context_emb_sim`` with ``system=False`` (``stllm/test/qabench/*_qa.py``): video first, then
    ``###Human: {context} ###Assistant: ``. To build ``input_ids`` split at :data:`IMAGE_PLACEHOLDER`: the part before
    is empty (no tokens, no BOS); tokenize the part after with the Vicuna tokenizer and ``add_special_tokens=False``
    and prepend :data:`TEXT_BOS_ID` (2, ``</s>``), which is what the official tokenizer emits as its (remapped) BOS.
    :func:`st_llm_input_ids` does exactly this. The Q-Former takes ``context`` itself (see :data:`QFORMER_TOKENIZER`).

    Args:
        context: the question (for multiple choice, the question with its options and any answer instruction).

    Returns:
        The prompt with one :data:`IMAGE_PLACEHOLDER`.
    """
    return f"{IMAGE_PLACEHOLDER}###Human: {context} ###Assistant: "


def st_llm_input_ids(tokenizer, context: str) -> Tensor:
    """``[1, S]`` LLM prompt ids for :func:`st_llm_prompt`: one :data:`PLACEHOLDER_ID`, ``</s>``, then the text.

    Args:
        tokenizer: the Vicuna-7B v1.1 (LLaMA) tokenizer, slow or fast.
        context: the question.
    """
    before, after = st_llm_prompt(context).split(IMAGE_PLACEHOLDER)
    assert before == ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return torch.tensor([[PLACEHOLDER_ID, TEXT_BOS_ID, *ids]])


def _resize_short_side(frame: np.ndarray, size: int) -> np.ndarray:
    """Reproduce torchvision ``Resize(size, BICUBIC)`` on a PIL image: short side to ``size``, long side truncated."""
    from PIL import Image

    h, w = frame.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return frame  # torchvision returns the image unchanged at the target size
    return np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))


def _center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Reproduce torchvision ``CenterCrop(size)`` for an image at least ``size`` per side (offsets: Python round)."""
    h, w = frame.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return frame[top : top + size, left : left + size]


def preprocess_st_llm(frames: np.ndarray) -> Tensor:
    """ST-LLM's evaluation transform, torchvision-free.

    ``Chat.transform`` and ``MVBench_dataset.transform`` (identical): per frame, PIL bicubic resize of the short side to
    224 (long side ``int(224 * long / short)``), centre crop 224x224, ``/ 255`` in float32, then
    ``(x - mean) / std`` with the OpenAI CLIP mean/std. Frame sampling is the caller's (the QA scripts take 64 frames,
    ``stllm/test/video_utils.py:get_seq_frames``).

    Args:
        frames: ``[T, H, W, 3]`` uint8 RGB frames.

    Returns:
        ``[1, T, 3, 224, 224]`` float32.

    Raises:
        ValueError: not a uint8 ``[T, H, W, 3]`` array, or no frames.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{type(frames).__name__} {getattr(frames, 'dtype', '')} {tuple(getattr(frames, 'shape', ()))}"
        raise ValueError(f"frames must be a uint8 numpy array [T, H, W, 3] (RGB), got {got}")
    if frames.shape[0] == 0 or min(frames.shape[1:3]) == 0:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {frames.shape}")
    out = np.stack([_center_crop(_resize_short_side(np.ascontiguousarray(f), IMAGE_SIZE), IMAGE_SIZE) for f in frames])
    x = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


# -- truncation -----------------------------------------------------------------------------------------------------


def drop_leading_visual(pre: PreLLMOutput, drop: int) -> PreLLMOutput:
    """Remove the first ``drop`` tokens of a pre-LLM output (left truncation of the prompt).

    Args:
        pre: ``tokens [n, D]``, ``assignment [N]``, ``groups``.
        drop: tokens to remove from the front, ``0 <= drop < n``.

    Returns:
        ``tokens [n - drop, D]``; ``assignment`` re-indexed, -1 for input tokens whose output was dropped; each group
        shrunk by its dropped tokens (empty groups removed).
    """
    if drop == 0:
        return pre
    assert 0 < drop < pre.n, (drop, pre.n)
    assignment = torch.where(pre.assignment >= drop, pre.assignment - drop, torch.full_like(pre.assignment, -1))
    groups, start = [], 0
    for size in pre.groups:
        kept = start + size - max(start, drop) if start + size > drop else 0
        if kept > 0:
            groups.append(kept)
        start += size
    origin = pre.origins()[drop:]
    return PreLLMOutput(
        pre.tokens[drop:], assignment, tuple(groups), positions=pre.positions, flops=pre.flops, origin=origin
    )


# -- building and loading -------------------------------------------------------------------------------------------


def tiny_config(llm_layers: int = 4):
    """An ST-LLM config with the real geometry and tiny widths.

    224 px / patch 14 (16x16 + CLS = 257 tokens), 4 ViT layers (the BT-Adapter taps the last 3), a 64-row temporal
    table, 32 queries, a 2-layer Q-Former with cross-attention every 2nd layer and the real BERT vocabulary (30523 with
    ``[DEC]``), a Llama with the real vocabulary (32001: Vicuna's 32000 + ``[PAD]``). Extra fields on the
    ``InstructBlipConfig``: ``btadapter_depth``, ``btadapter_frames``, ``btadapter_eps``, ``ln_vision_eps``.
    """
    from transformers import InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    vision = InstructBlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=14,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_act="gelu",
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=30523,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        cross_attention_frequency=2,
        encoder_hidden_size=32,
        max_position_embeddings=512,
    )
    text = LlamaConfig(
        vocab_size=32001,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return st_llm_config(vision, qformer, text)


def st_llm_config(vision, qformer, text, *, depth: int = 3, frames: int = MAX_FRAMES, num_query_tokens: int = 32):
    """Assemble an ``InstructBlipConfig`` with the BT-Adapter fields (``btadapter_*``, ``ln_vision_eps``)."""
    from transformers import InstructBlipConfig

    cfg = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
    )
    cfg.btadapter_depth = depth
    cfg.btadapter_frames = frames
    cfg.btadapter_eps = 1e-5  # BTAdapter_Spatial builds an EVA Block with the nn.LayerNorm default
    cfg.ln_vision_eps = 1e-5  # Blip2Base.init_vision_encoder: LayerNorm(num_features), default eps
    return cfg


def tiny_st_llm(seed: int = 0, attn_implementation: str = "sdpa", llm_layers: int = 4) -> StLlm:
    """The tiny model with random weights from ``seed`` (the global RNG is left as it was).

    Every parameter is random (normal, std 0.02 for the hand-written ones), including the BT-Adapter's CLS, temporal
    table and ``temporal_fc`` that the official code zero-initialises, so that every path changes the output.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StLlm(tiny_config(llm_layers=llm_layers), attn_implementation=attn_implementation)
        for p in (model.bt_adapter.cls_token, model.bt_adapter.time_embed.weight, model.query_tokens):
            nn.init.normal_(p, std=0.02)
        for block in model.bt_adapter.temporal:
            nn.init.normal_(block.fc.weight, std=0.02)
            nn.init.normal_(block.fc.bias, std=0.02)
        for module in model.modules():  # q/v biases and LayerNorm affine too, so eps and bias mapping matter
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, mean=1.0, std=0.1)
                nn.init.normal_(module.bias, std=0.1)
        for name, p in model.named_parameters():
            if name.endswith("qkv.bias"):
                with torch.no_grad():
                    d = p.numel() // 3
                    p.normal_(std=0.1)
                    p[d : 2 * d] = 0.0  # EVA has no key bias
    return model.eval()


# -- the BT-Adapter (the one hand-written block) ----------------------------------------------------------------------


class BTTemporalBlock(nn.Module):
    """``BTAdapter_Temp``: pre-norm attention over the frames of each patch, then ``temporal_fc``; no MLP.

    Args:
        config: the vision config (width, heads, q/v bias); attention is the native ``InstructBlipAttention``.
    """

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.instructblip.modeling_instructblip import InstructBlipAttention

        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # EVA norm_layer, eps 1e-6
        self.attn = InstructBlipAttention(config)
        self.fc = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, branch: Tensor, frames: int) -> Tensor:
        """Args: ``branch [B, 1 + P·T, D]`` (patch-major). Returns the same shape; the CLS is passed through."""
        b, n, d = branch.shape
        patches = branch[:, 1:]
        x = patches.reshape(b * (n - 1) // frames, frames, d)  # one sequence of T frames per patch
        x = self.fc(self.attn(self.norm(x))[0]).reshape(b, n - 1, d) + patches
        return torch.cat([branch[:, :1], x], dim=1)


class BTAdapter(nn.Module):
    """The BT-Adapter branch of ``EVAVisionTransformer_BTAdapter`` (see the module docstring for the data flow).

    Args:
        config: the ST-LLM config (``vision_config``, ``btadapter_depth``, ``btadapter_frames``, ``btadapter_eps``).
    """

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.instructblip.modeling_instructblip import InstructBlipEncoderLayer

        vision = config.vision_config
        spatial = copy.deepcopy(vision)
        spatial.layer_norm_eps = config.btadapter_eps
        self.depth, self.max_frames = config.btadapter_depth, config.btadapter_frames
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vision.hidden_size))  # BTAdapter_cls
        self.time_embed = nn.Embedding(self.max_frames, vision.hidden_size)  # BTAdapter_position
        self.temporal = nn.ModuleList(BTTemporalBlock(vision) for _ in range(self.depth))
        self.spatial = nn.ModuleList(InstructBlipEncoderLayer(spatial) for _ in range(self.depth))

    def start(self, x: Tensor, frames: int, pos_embed: Tensor) -> Tensor:
        """Branch input at the first tap (official ``init_input``).

        Args:
            x: ``[B·T, 1 + P, D]`` ViT hidden states after block ``L - depth``.
            frames: ``T``.
            pos_embed: ``[1, 1 + P, D]`` the ViT's position embedding (shared with the branch).

        Returns:
            ``[B, 1 + P·T, D]``.
        """
        bt, n, d = x.shape
        b = bt // frames
        x = x.view(b, frames, n, d)
        cls_video = x[:, :, 0].mean(dim=1, keepdim=True)  # [B, 1, D] frame-mean of the ViT CLS
        patches = x[:, :, 1:] + pos_embed[:, 1:]
        time = self.time_embed(torch.arange(frames, device=x.device))  # [T, D]
        patches = patches + time[None, :, None, :]
        patches = patches.transpose(1, 2).reshape(b, (n - 1) * frames, d)  # patch-major (p t)
        cls_branch = self.cls_token + pos_embed[:, :1]
        return torch.cat([(cls_video + cls_branch) / 2, patches], dim=1)

    def spatial_block(self, i: int, branch: Tensor, frames: int) -> Tensor:
        """``BTAdapter_Spatial``: an EVA block over each frame, the video CLS shared by all frames.

        Args: ``branch [B, 1 + P·T, D]``. Returns the same shape.
        """
        layer = self.spatial[i]
        b, n, d = branch.shape
        p = (n - 1) // frames
        cls = branch[:, :1].expand(b, frames, d).reshape(b * frames, 1, d)
        per_frame = branch[:, 1:].view(b, p, frames, d).transpose(1, 2).reshape(b * frames, p, d)
        h = layer.self_attn(layer.layer_norm1(torch.cat([cls, per_frame], dim=1)))[0]  # [B·T, 1 + P, D]
        cls_out = h[:, :1].reshape(b, frames, 1, d).mean(dim=1)
        patches = h[:, 1:].reshape(b, frames, p, d).transpose(1, 2).reshape(b, p * frames, d)
        x = branch + torch.cat([cls_out, patches], dim=1)
        return x + layer.mlp(layer.layer_norm2(x))

    def forward(self, x: Tensor, branch: Tensor | None, step: int, frames: int, pos_embed: Tensor) -> Tensor:
        """One tap (official ``forward_branch``) after ViT block ``L - depth + step``.

        Args:
            x: ``[B·T, 1 + P, D]`` ViT hidden states.
            branch: ``[B, 1 + P·T, D]`` the branch after the previous tap; ``None`` at ``step == 0``.
            step: ``0 .. depth - 1``.
            frames: ``T``.
            pos_embed: ``[1, 1 + P, D]``.

        Returns:
            ``[B, 1 + P·T, D]`` the new branch.
        """
        if step == 0:
            branch = self.start(x, frames, pos_embed)
        else:
            bt, n, d = x.shape
            b = bt // frames
            x = x.view(b, frames, n, d)
            cls = x[:, :, 0].mean(dim=1, keepdim=True)
            patches = x[:, :, 1:].transpose(1, 2).reshape(b, (n - 1) * frames, d)
            branch = torch.cat([cls, patches], dim=1) + branch
        branch = self.temporal[step](branch, frames)
        return self.spatial_block(step, branch, frames)

    @staticmethod
    def merge(x: Tensor, branch: Tensor, frames: int) -> Tensor:
        """Average the ViT output with the branch (official end of ``forward_features``).

        Args: ``x [B·T, 1 + P, D]``, ``branch [B, 1 + P·T, D]``. Returns ``[B·T, 1 + P, D]``.
        """
        bt, n, d = x.shape
        b = bt // frames
        cls = branch[:, :1].expand(b, frames, d).reshape(bt, 1, d)  # the video CLS for every frame
        patches = branch[:, 1:].view(b, n - 1, frames, d).transpose(1, 2).reshape(bt, n - 1, d)
        return (x + torch.cat([cls, patches], dim=1)) / 2


# -- the container --------------------------------------------------------------------------------------------------


class StLlm(nn.Module):
    """ST-LLM as native modules plus :class:`BTAdapter`.

    Submodules: ``vision`` (``InstructBlipVisionModel``; its ``post_layernorm`` is ``ln_vision``), ``bt_adapter``,
    ``query_tokens`` ``[1, Q, Dq]``, ``qformer`` (``InstructBlipQFormerModel``), ``llama_proj`` (``Linear(Dq, D)``),
    ``language_model`` (``LlamaForCausalLM``).

    Args:
        config: an ``InstructBlipConfig`` with the ``btadapter_*`` and ``ln_vision_eps`` fields (:func:`tiny_config`,
            :func:`st_llm_config`).
        attn_implementation: the LLM's attention; the vision tower, BT-Adapter and Q-Former use sdpa.
    """

    def __init__(self, config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers import InstructBlipQFormerModel, InstructBlipVisionModel, LlamaForCausalLM

        self.config = config
        config.vision_config._attn_implementation = "sdpa"
        config.qformer_config._attn_implementation = "sdpa"
        self.vision = InstructBlipVisionModel(config.vision_config)
        self.vision.post_layernorm.eps = config.ln_vision_eps  # ln_vision: nn.LayerNorm default eps, not the ViT's
        self.bt_adapter = BTAdapter(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel(config.qformer_config)
        self.llama_proj = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.language_model.set_attn_implementation(attn_implementation)

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def vit(self, pixels: Tensor) -> Tensor:
        """EVA ViT-g with the BT-Adapter, then ``ln_vision``.

        Args:
            pixels: ``[T, 3, 224, 224]`` frames of one video.

        Returns:
            ``[T, 1 + P, Dv]``.
        """
        frames = pixels.shape[0]
        emb = self.vision.embeddings
        x = emb(pixels.to(emb.patch_embedding.weight.dtype))
        layers = self.vision.encoder.layers
        first_tap = len(layers) - self.bt_adapter.depth
        branch = None
        for i, layer in enumerate(layers):
            x = layer(x)
            if i >= first_tap:
                branch = self.bt_adapter(x, branch, i - first_tap, frames, emb.position_embedding)
        x = self.bt_adapter.merge(x, branch, frames)
        ln = self.vision.post_layernorm  # LAVIS LayerNorm subclass: computed in fp32, cast back
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)

    def encode_video(self, pixels: Tensor, qformer_input_ids: Tensor, qformer_attention_mask: Tensor) -> Tensor:
        """Video tokens of one video, per frame (``STLLMModel.encode_img`` with ``qformer_text_input``).

        Args:
            pixels: ``[T, 3, 224, 224]``.
            qformer_input_ids: ``[1, M]`` BERT ids of the question, shared by every frame.
            qformer_attention_mask: ``[1, M]``.

        Returns:
            ``[T, Q, D]`` projected query outputs.
        """
        image = self.vit(pixels)
        frames = image.shape[0]
        queries = self.query_tokens.expand(frames, -1, -1)
        ones = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=image.device)
        out = self.qformer(
            input_ids=qformer_input_ids.expand(frames, -1),
            attention_mask=torch.cat([ones, qformer_attention_mask.expand(frames, -1)], dim=1),
            query_embeds=queries,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
        ).last_hidden_state
        return self.llama_proj(out[:, : queries.shape[1]])


# -- the adapter ----------------------------------------------------------------------------------------------------


class StLlmAdapter:
    """Runs one :class:`StLlm` with a pruning strategy, one video at a time.

    Args:
        model: the loaded model (eval mode).
        strategy: the pruning method; its in-LLM stages are installed on the Llama.
        num_frames: frames per video, ``1 .. 64`` (the BT-Adapter's temporal table has 64 rows).
        max_input_tokens: keep only the last this-many positions of the spliced prompt (official QA scripts:
            :data:`OFFICIAL_MAX_INPUT_TOKENS`); ``None`` keeps all.
    """

    def __init__(
        self, model: StLlm, strategy: Strategy, num_frames: int = 64, max_input_tokens: int | None = None
    ) -> None:
        max_frames = model.config.btadapter_frames
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= max_frames:
            raise ValueError(
                f"num_frames must be an int in 1..{max_frames} (BT-Adapter temporal table), got {num_frames}"
            )
        if max_input_tokens is not None and (
            isinstance(max_input_tokens, bool) or not isinstance(max_input_tokens, int) or max_input_tokens < 2
        ):
            raise ValueError(f"max_input_tokens must be None (no truncation) or an int >= 2, got {max_input_tokens!r}")
        needs = vision_inputs(strategy)
        if needs:
            raise ValueError(
                f"{strategy.name} needs {sorted(needs)} from the vision tower, but ST-LLM's visual tokens are Q-Former "
                "query outputs, not patches: no per-patch vision attention or pooling-head map lines up with them"
            )
        self.model, self.strategy = model, strategy
        self.num_frames, self.max_input_tokens = num_frames, max_input_tokens
        self.num_queries = model.config.num_query_tokens
        self.grid = (1, self.num_queries)
        self.placeholder_id = PLACEHOLDER_ID
        self.separators_unpruned = 0
        lm = model.language_model
        self.llm = PrunedLM(lm.model, lm.lm_head, strategy)

    def _check_qformer(self, ids: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if ids is None:
            raise ValueError(
                "qformer_input_ids is required: the Q-Former reads the question (BERT ids of st_llm_prompt's context, "
                f"tokenizer {QFORMER_TOKENIZER!r}, truncation_side={QFORMER_TRUNCATION_SIDE!r}, "
                f"max_length={QFORMER_MAX_LEN})"
            )
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        qcfg = self.model.config.qformer_config
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 or ids.is_floating_point():
            raise ValueError(f"qformer_input_ids must be integer [1, M] or [M] with M >= 1, got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= qcfg.vocab_size:
            raise ValueError(f"qformer_input_ids must lie in 0..{qcfg.vocab_size - 1} (BERT vocabulary)")
        if ids.shape[1] > qcfg.max_position_embeddings:
            raise ValueError(f"qformer_input_ids has {ids.shape[1]} tokens, at most {qcfg.max_position_embeddings}")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(1, -1)
        if mask.shape != ids.shape:
            raise ValueError(
                f"qformer_attention_mask must match qformer_input_ids {tuple(ids.shape)}, got {mask.shape}"
            )
        return ids.long(), mask.long()

    def video_grid(
        self, pixel_values_videos: Tensor, qformer_input_ids: Tensor, qformer_attention_mask: Tensor | None = None
    ) -> Tensor:
        """Visual tokens of one video.

        Args:
            pixel_values_videos: ``[1, T, 3, 224, 224]`` (:func:`preprocess_st_llm`).
            qformer_input_ids: ``[1, M]`` BERT ids of the question.
            qformer_attention_mask: ``[1, M]`` or ``None`` (all ones).

        Returns:
            ``[T, Q, D]`` projected Q-Former outputs.
        """
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[0] != 1:
            raise ValueError(
                "pixel_values_videos must be [1, T, 3, 224, 224] (batch size 1), "
                f"got {tuple(pixel_values_videos.shape)}"
            )
        _, t, c, h, w = pixel_values_videos.shape
        if t != self.num_frames:
            raise ValueError(
                f"got {t} frames, this adapter expects num_frames={self.num_frames} (any of 1..{MAX_FRAMES} can be "
                "set; ST-LLM's QA evaluation uses 64)"
            )
        size = self.model.config.vision_config.image_size
        if (c, h, w) != (3, size, size):
            raise ValueError(f"frames must be 3x{size}x{size}, got {c}x{h}x{w}; use preprocess_st_llm")
        ids, mask = self._check_qformer(qformer_input_ids, qformer_attention_mask)
        device = self.model.device
        return self.model.encode_video(pixel_values_videos[0].to(device), ids.to(device), mask.to(device))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values_videos: Tensor,
        max_new_tokens: int = 16,
        eos_token_ids: Sequence[int] = (),
        return_logits: bool = False,
        *,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        **inputs,
    ) -> Generation:
        """Prune and answer one prompt about one video (greedy).

        Args:
            input_ids: ``[1, S]`` Vicuna ids with one contiguous run of :data:`PLACEHOLDER_ID`
                (:func:`st_llm_input_ids`).
            pixel_values_videos: ``[1, T, 3, 224, 224]``.
            max_new_tokens: most tokens to generate.
            eos_token_ids: stop after one of these (ST-LLM: :data:`EOS_TOKEN_IDS`).
            return_logits: keep every generated token's logits.
            qformer_input_ids: ``[1, M]`` BERT ids of the question (required).
            qformer_attention_mask: ``[1, M]`` or ``None``.
            **inputs: must be empty; any other keyword raises.

        Returns:
            The :class:`Generation`; ``separators`` is always 0.
        """
        if inputs:
            raise ValueError(
                f"unexpected inputs {sorted(inputs)}; ST-LLM accepts qformer_input_ids and qformer_attention_mask"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, S] (batch size 1), got {tuple(input_ids.shape)}")
        where = (input_ids[0] == PLACEHOLDER_ID).nonzero()[:, 0]
        if where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
            raise ValueError(
                f"input_ids must hold one contiguous run of the placeholder id {PLACEHOLDER_ID} where "
                f"{IMAGE_PLACEHOLDER} was (see st_llm_input_ids)"
            )
        vocab = self.model.config.text_config.vocab_size
        text_ids = torch.cat([input_ids[0, : int(where[0])], input_ids[0, int(where[-1]) + 1 :]])
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= vocab):
            raise ValueError(f"input_ids outside the placeholder must lie in 0..{vocab - 1}")
        device = self.model.device
        prefix, suffix = input_ids[:, : int(where[0])].to(device), input_ids[:, int(where[-1]) + 1 :].to(device)

        clock = StageClock(device)
        clock.start()
        grid = self.video_grid(pixel_values_videos, qformer_input_ids, qformer_attention_mask)  # [T, Q, D]
        clock.mark("vision")
        embed = self.model.language_model.get_input_embeddings()
        text = embed(torch.cat([prefix, suffix], dim=1))[0]
        t, q, _ = grid.shape
        pre = self.strategy.pre_llm(VideoTokens(grid, self.grid, text=text))
        embeds = torch.cat([embed(prefix)[0], pre.tokens.to(text.dtype), embed(suffix)[0]])
        n_prefix = prefix.shape[1]
        positions = None
        if pre.positions == "original":
            after = torch.arange(suffix.shape[1], device=device) + n_prefix + t * q
            positions = torch.cat([torch.arange(n_prefix, device=device), pre.origins().to(device) + n_prefix, after])
        if self.max_input_tokens is not None and embeds.shape[0] > self.max_input_tokens:
            cut = embeds.shape[0] - self.max_input_tokens  # Chat.answer: embs[:, begin_idx:]
            drop = max(0, cut - n_prefix)
            if drop >= pre.n:
                raise ValueError(
                    f"max_input_tokens={self.max_input_tokens} leaves no visual token (prompt {embeds.shape[0]}, "
                    f"visual {pre.n}, text after the video {suffix.shape[1]})"
                )
            pre = drop_leading_visual(pre, drop)
            embeds, n_prefix = embeds[cut:], max(0, n_prefix - cut)
            if positions is not None:
                positions = positions[cut:] - positions[cut]
        minus = torch.full((n_prefix,), -1, device=device), torch.full((suffix.shape[1],), -1, device=device)
        visual = torch.cat([minus[0], torch.arange(pre.n, device=device), minus[1]])
        clock.mark("pre_llm")

        tokens, stats, logits = self.llm.generate(
            embeds[None],
            visual,
            pre,
            max_new_tokens,
            eos_token_ids,
            return_logits=return_logits,
            clock=clock,
            positions=positions,
        )
        timings = clock.seconds()
        return Generation(tokens, t * q, pre.n, 0, stats, timings, logits, pre)
