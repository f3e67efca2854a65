"""``dycoke``: DyCoke, dynamic compression of tokens for video LLMs (Tao et al., CVPR 2025, arXiv 2411.15024).

Paper: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models".

Official code: ``KD-TAO/DyCoke``: ``llava/model/llava_arch.py`` (``dycole_ttm``, called on the flattened
LLaVA-OneVision frame tokens before the newline) and ``llava/model/language_model/modeling_qwen2.py``
(``PrunableDynamicCache``, ``Qwen2Model.forward``). Main setting (README): ``dycoke_l = 3, dycoke_p = 0.7,
dycoke_k = 0.7``. Our reading, rule by rule (``docs/methods/dycoke.md`` has the full list):

**Stage 1, temporal token merging (TTM), before the LLM.** ``m = int((1 - k) · P)`` tokens survive in a pruned frame.

1. Pairs ``(i, i+1)`` for ``i = 0, 2, 4, ..``: frame ``i`` stays whole; in frame ``i+1`` the ``m`` positions whose
   token has the *lowest* cosine similarity to the same position in frame ``i`` survive.
2. Then for ``i = 0, 4, 8, .. < T - 4``: frame ``i+2`` is cut the same way against frame ``i`` (both original
   tokens), replacing its whole version from step 1.
3. Output: frames in order; a pruned frame's survivors in ascending order of that similarity (``topk(largest=False)``
   order, not raster order); nothing is averaged despite the name; positions renumbered contiguously.

**Stage 2, dynamic KV-cache pruning, during decoding** (:class:`~prune.api.DecodeSpec` at layer ``L - 1``). At
every decode step (never in prefill, so the first answer token is unaffected):

1. the new token's attention at layer ``L - 1`` (mean over heads) over the visual entries of the cache;
2. its cosine similarity with the previous step's vector (0 at the first step);
3. below 0.9: layers ``L ..`` attend, in this step, to the text, the generated tokens and the
   ``int(n · (1 - p))`` visual entries with the highest attention (``n`` = visual tokens after TTM); otherwise they
   attend to the *whole* cache. The cache itself keeps every entry (``torch.gather`` over the full cache).

Note on (3): the official loop resets the kept set (``kv_cache = None``) at every layer below ``L`` of every step, so
a step whose attention is stable runs unpruned; the paper describes reusing the previous pruned cache instead. We
follow the code.

``ratio`` is the keep fraction of both knobs, ``1 - k = 1 - p``: ``ratio = 0.3`` is the paper's main setting. The
pre-LLM count is content-independent: of ``T`` frames, ``ceil(T/2) - floor((T - 1) / 4)`` stay whole (9 of 32) and
the rest keep ``int(ratio · P)``, i.e. 49 % of LLaVA-OV's 6,272 tokens at 0.3 (the equal-budget solver reads it from
``layer_counts``). The decode stage acts on the KV cache, not on the prefill, so it is outside ``layer_counts`` and
is counted in the decode FLOPs.

Deviations (why): cosines in fp32 and stable ordering (equal similarities keep the lower position first); an odd
``T`` keeps its last, unpaired frame whole (the official loop silently drops it); the official visual span ends one
token early (``image_token_length = len - 1``, so the last visual token is never pruned at decode) and its attention
history is never reset between samples (a new sample's first step compares with the previous sample's last), both
fixed here; ``ratio = 1.0`` keeps every frame in raster order and the decode stage keeps everything, so it equals
``none``. The prefix length comes from the prompt instead of the hard-coded ``image_token_start_index = 14``.

Shape legend: ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``m`` tokens kept in a pruned frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prune.api import DecodeInput, DecodeSpec, LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio

__all__ = ["DyCoke", "ttm_plan"]


def ttm_plan(num_frames: int) -> list[int | None]:
    """Reference frame of every frame under TTM: ``None`` for a whole frame, else the frame it is compared with."""
    ref: list[int | None] = [None] * num_frames
    for i in range(0, num_frames - 1, 2):
        ref[i + 1] = i
    for i in range(0, num_frames - 4, 4):
        ref[i + 2] = i
    return ref


@dataclass(frozen=True)
class DyCoke:
    """DyCoke (see the module docstring).

    Args:
        ratio: keep fraction of TTM's pruned frames and of the decode-time visual cache (``1 - k = 1 - p``), (0, 1].
        layer: ``L`` (``dycoke_l``, official 3): decode-time pruning applies from layer ``L``, scored at ``L - 1``.
        threshold: attention-change threshold below which a decode step prunes (official 0.9).
    """

    ratio: float
    layer: int = 3
    threshold: float = 0.9
    name: str = "dycoke"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (pruning from layer L, scored at L-1), got {self.layer!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    @property
    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec(layer=self.layer - 1, head_reduce="mean", evict=False)

    def in_llm(self, step: LayerInput) -> Tensor:
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Temporal token merging (TTM).

        Returns:
            ``[n, D]`` frames in order, a pruned frame's survivors in ascending similarity; ``assignment`` maps kept
            tokens to their output index and dropped ones to ``-1``.
        """
        tokens = video.tokens
        t, p, d = tokens.shape
        device = tokens.device
        keep = min(p, int(self.ratio * p))
        pieces = []
        flops = 0.0
        for frame, ref in enumerate(ttm_plan(t)):
            if ref is None or keep == p:
                pieces.append(torch.arange(p, device=device) + frame * p)
                continue
            sim = F.cosine_similarity(tokens[ref].float(), tokens[frame].float(), dim=-1)  # [P]
            pieces.append(torch.sort(sim, stable=True).indices[:keep] + frame * p)
            flops += 6.0 * p * d
        index = torch.cat(pieces)
        assignment = torch.full((t * p,), -1, dtype=torch.long, device=device)
        assignment[index] = torch.arange(index.numel(), device=device)
        return PreLLMOutput(tokens.reshape(t * p, d)[index], assignment, flops=flops)

    def in_decode(self, step: DecodeInput) -> Tensor | None:
        """Keep the top ``int(n · ratio)`` visual entries when attention moved (cosine < threshold), else all.

        Returns:
            ``[k]`` sorted indices into ``step.visual``, or ``None`` (attend to every entry in this step).
        """
        scores = step.scores.float()
        if step.previous is None:
            similarity = 0.0
        else:
            similarity = float(F.cosine_similarity(scores, step.previous.float(), dim=0))
        if similarity >= self.threshold:
            return None
        k = int(scores.numel() * self.ratio)
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return torch.sort(order).values
