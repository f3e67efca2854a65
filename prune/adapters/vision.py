"""Vision-side inputs for strategies (``VideoTokens.frame_*``), computed from a backbone's own ViT tower.

Family-agnostic pieces; each family adapter decides which layer, which token is the CLS, and how maps are pooled to
its LLM grid (the same pooling as its features), and documents what stands in where the tower lacks something.

* :func:`capture_attention_input` records what a ViT layer's attention module receives (its normalised input) during
  the tower's normal forward, so nothing runs twice;
* :func:`attention_maps` recomputes that layer's softmax attention from the captured input with the layer's own
  ``q_proj``/``k_proj`` (fp32, a few frames at a time) and returns the attention each token *receives*, averaged over
  heads and query rows (``frame_patch_attn``; ``attn_weights.mean(1).mean(1)`` in HoliTom and its VisionZip port),
  the CLS row (CLIP stand-in for a pooling head's attention), and the keys averaged over heads (VisionZip's
  ``metric``, ``raw_key_states.mean(1)``);
* :func:`pooling_head_outputs` runs SigLIP's attention-pooling head (restored from the SigLIP checkpoint where the VLM
  drops it, as FastVID's ``SigLipVisionAbstract`` does): ``post_layernorm`` then the head; returns the pooled
  descriptor (``frame_global``) and the head's head-averaged attention over the patches (``frame_head_attn``).

Shape legend: ``T`` frames, ``S`` tokens of the ViT layer (patches, plus a CLS where the tower has one), ``C`` ViT
width, ``K`` head dimension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "SIGLIP_REPO",
    "attention_maps",
    "attention_flops",
    "capture_attention_input",
    "load_siglip_pooling_head",
    "pooling_head_outputs",
    "siglip_pooling_head",
    "tower_layer",
]

SIGLIP_REPO = (
    "google/siglip-so400m-patch14-384"  # the vision tower of LLaVA-OneVision and LLaVA-Video (mm_vision_tower)
)
# Frames per chunk when recomputing a ViT layer's attention: [chunk, heads, S, S] fp32 stays near 100 MB for SigLIP.
_CHUNK = 4


def tower_layer(num_layers: int, feature_layer: int) -> int:
    """Index of the encoder layer whose output is ``hidden_states[feature_layer]`` (index 0 is the embeddings)."""
    index = feature_layer - 1 if feature_layer > 0 else num_layers + feature_layer
    if not 0 <= index < num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside a {num_layers}-layer tower")
    return index


@contextlib.contextmanager
def capture_attention_input(layer: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the ``hidden_states`` a ViT encoder layer's ``self_attn`` receives during the enclosed forward.

    Yields:
        A dict that holds ``"x"``: ``[T, S, C]`` after the forward.
    """
    box: dict[str, Tensor] = {}

    def hook(module, args, kwargs):
        box["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@torch.no_grad()
def attention_maps(attn: nn.Module, x: Tensor, cls: bool) -> dict[str, Tensor]:
    """Softmax attention of one ViT attention module over its input, reduced per frame.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``).
        x: ``[T, S, C]`` its input (see :func:`capture_attention_input`).
        cls: the first token is a CLS token (CLIP): it is dropped from the returned columns.

    Returns:
        ``received``: ``[T, P]`` attention each patch receives, mean over heads and all query rows (CLS included);
        ``cls``: ``[T, P]`` head-mean attention of the CLS row over the patches (only when ``cls``);
        ``keys``: ``[T, P, K]`` the patches' keys averaged over heads. ``P = S - 1`` with a CLS, else ``S``.
    """
    t, s, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    skip = 1 if cls else 0
    received, cls_rows, keys = [], [], []
    for start in range(0, t, _CHUNK):
        chunk = x[start : start + _CHUNK]
        b = chunk.shape[0]
        q = attn.q_proj(chunk).view(b, s, heads, hd).transpose(1, 2).float()
        k = attn.k_proj(chunk).view(b, s, heads, hd).transpose(1, 2).float()
        probs = torch.softmax((q @ k.transpose(2, 3)) * attn.scale, dim=-1)  # [b, H, S, S]
        received.append(probs.mean(dim=(1, 2))[:, skip:])
        if cls:
            cls_rows.append(probs[:, :, 0, 1:].mean(dim=1))
        keys.append(k.mean(dim=1)[:, skip:])
    out = {"received": torch.cat(received), "keys": torch.cat(keys)}
    if cls:
        out["cls"] = torch.cat(cls_rows)
    return out


def attention_flops(frames: int, tokens: int, width: int, heads: int, head_dim: int) -> float:
    """FLOPs of :func:`attention_maps`: the Q and K projections and ``QK^T`` (2 per multiply-accumulate)."""
    inner = heads * head_dim
    return float(frames) * (2 * 2 * tokens * width * inner + 2 * tokens * tokens * inner)


def siglip_pooling_head(vision_config, seed: int = 0) -> nn.ModuleDict:
    """A randomly initialised SigLIP ``post_layernorm`` + attention-pooling head for ``vision_config`` (tiny models).

    The global RNG is left as it was.
    """
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.ModuleDict(
            {
                "post_layernorm": nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps),
                "head": SiglipMultiheadAttentionPoolingHead(vision_config),
            }
        )
    return head.eval()


def load_siglip_pooling_head(source: str, vision_config, dtype: torch.dtype, device: torch.device) -> nn.ModuleDict:
    """SigLIP's ``post_layernorm`` and attention-pooling head, loaded from the SigLIP vision checkpoint.

    ``google/siglip-so400m-patch14-384`` for LLaVA-OneVision and LLaVA-Video, as FastVID's ``SigLipVisionAbstract``
    loads them.

    Args:
        source: a local folder or a hub id already in the Hugging Face cache.
        vision_config: the VLM's vision config (widths of the head).
        dtype: parameter dtype.
        device: where the head runs.

    Raises:
        FileNotFoundError: the checkpoint or its head weights are missing; the message names what to download.
    """
    from prune.adapters.checkpoint import read_safetensors, resolve_dir

    def hint(repo: str = SIGLIP_REPO) -> str:
        return f"download the SigLIP vision checkpoint (`huggingface-cli download {repo}`, about 3.5 GB)"

    folder = resolve_dir(source, None, ["*.safetensors", "*.json"], hint)
    wanted = ("vision_model.post_layernorm.", "vision_model.head.")
    state = {k: v for k, v in read_safetensors(folder, hint()).items() if k.startswith(wanted)}
    if not state:
        raise FileNotFoundError(
            f"{source!r} has no vision_model.head.* weights; the SigLIP pooling head comes from the original SigLIP "
            "checkpoint (`huggingface-cli download google/siglip-so400m-patch14-384`)"
        )
    module = siglip_pooling_head(vision_config)
    renamed = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise FileNotFoundError(f"SigLIP pooling head from {source!r}: missing {missing}, unexpected {unexpected}")
    return module.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def pooling_head_outputs(head: nn.ModuleDict, feats: Tensor) -> tuple[Tensor, Tensor]:
    """SigLIP's pooled output and the pooling head's attention over the patches.

    Args:
        head: ``post_layernorm`` and ``head`` (:func:`siglip_pooling_head`, :func:`load_siglip_pooling_head`).
        feats: ``[T, S, C]`` the tower's output the VLM uses (before any post-layernorm).

    Returns:
        ``[T, C]`` pooled descriptors and ``[T, S]`` the head's attention of its probe over the patches, averaged
        over heads (``nn.MultiheadAttention``'s default ``average_attn_weights=True``, as the official code reads it).
    """
    pool = head["head"]
    x = head["post_layernorm"](feats.to(pool.probe.dtype))
    probe = pool.probe.repeat(x.shape[0], 1, 1)
    h, weights = pool.attention(probe, x, x, need_weights=True, average_attn_weights=True)
    h = h + pool.mlp(pool.layernorm(h))
    return h[:, 0].float(), weights[:, 0].float()
