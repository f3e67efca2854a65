"""``pdrop``: PyramidDrop (Xing et al., CVPR 2025, arXiv:2410.17247), staged visual-token drops inside the LLM.

Official code: ``Cooperx521/PyramidDrop`` (``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward`` and
``pdrop_rank_drop``; schedule from ``llava/eval/model_vqa_loader.py``). Our reading of it:

* **Stages.** ``layer_list = [b_1, ..., b_S]`` splits the decoder into ``S + 1`` stages. After layer ``b_s - 1``
  runs (``rank_layer = layer_idx + 1 in layer_list``), the visual tokens are ranked and only
  ``int(N * ratio_list[s])`` survive, ``N`` the visual tokens entering the LLM and ``ratio_list = [lambda,
  lambda^2, ...]`` (the README's ``[0.5, 0.25, 0.125]`` at ``[8, 16, 24]`` for 32-layer LLaMA, ``lambda = 0.5``).
  Counts come from the original ``N`` each time, not compounded from the previous stage's integer.
* **Score.** At boundary ``b`` the code takes layer ``b``'s *own* ``input_layernorm``, ``q_proj`` and ``k_proj``
  (``self.layers[rank_layer]``) on the hidden states entering it, applies RoPE at the current position ids, and
  computes the causal softmax of the *last instruction token*'s query row (at inference the last prompt token,
  ``prompt_len + image_tokens - 1``) over the whole sequence, averaged over heads, then sliced to the visual span.
  ``topk`` of that row keeps the survivors, re-sorted into sequence order. Layer ``b`` then runs on the shorter
  sequence. The adapter implements this as ``LayerSpec(own_layer=True)``.
* **Positions.** After each drop the code rebuilds ``position_ids = arange(0, cur_len)``: the shortened sequence is
  numbered contiguously (``LayerSpec(positions="renumber")``). During decoding it subtracts the number of tokens
  dropped at each boundary from the position ids of the layers after it, so a new token sits right after the
  renumbered prompt in every layer.
* **KV cache.** Only prefill drops; the caches of the layers before a boundary keep every token they saw
  (``prune_past_kv=False``), the layers after it cache the survivors.

``ratio`` maps onto ``lambda``: it is the layer-averaged fraction of visual tokens the LLM processes,
``(b_1 + sum_s (b_{s+1} - b_s) * lambda^s) / L`` with ``b_{S+1} = L`` (PDrop's own accounting, "average token
number"), solved for ``lambda`` by bisection. PDrop's README setting (``lambda = 0.5`` at ``[8, 16, 24]``, ``L = 32``)
is ``ratio = 15/32 = 0.469``. The first stage always runs on every token, so ``ratio`` below ``b_1 / L`` is out of
reach: it gives ``lambda = 0`` (one token per later stage), the nearest schedule, and the achieved budget says so.

Deviations: ties keep the earlier token (``topk`` leaves them unspecified); the softmax and the head mean stay in
fp32 (the code casts the probabilities back to the model dtype before averaging); every stage keeps at least one
token (``int`` could give 0); ``N`` excludes separator tokens (LLaVA-OV's newline), which always stay, as text does.
PDrop's released code is image-only (LLaVA-1.5/NeXT); on video the visual span is all frames concatenated, ranked
globally, as in the PDrop rows of the HoliTom table.

Shape legend: ``n`` visual tokens present at a stage, ``k`` tokens kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio

__all__ = ["PyramidDrop", "layer_average", "solve_lambda"]


def layer_average(layers: tuple[int, ...], lam: float, num_layers: int) -> float:
    """Layer-averaged retention of a PDrop schedule: ``(b_1 + sum_s w_s * lambda^s) / L``.

    Args:
        layers: boundaries ``b_1 < ... < b_S`` in ``1..L-1``.
        lam: per-stage keep fraction ``lambda`` in [0, 1].
        num_layers: ``L``.
    """
    edges = (*layers, num_layers)
    total = float(layers[0]) + sum((edges[s + 1] - edges[s]) * lam ** (s + 1) for s in range(len(layers)))
    return total / num_layers


def solve_lambda(ratio: float, layers: tuple[int, ...], num_layers: int) -> float:
    """``lambda`` whose schedule has layer-averaged retention ``ratio`` (bisection; exact 1.0 at ``ratio = 1``).

    Below ``b_1 / L`` (what the layers before the first boundary cost on their own) no ``lambda`` reaches the target:
    the answer is 0, the nearest schedule (one token per later stage), as FastV's layers before K are a floor too.
    The achieved budget is measured and recorded; the equal-budget solver warns about it.
    """
    if ratio >= 1.0:
        return 1.0
    if ratio <= layers[0] / num_layers:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if layer_average(layers, mid, num_layers) <= ratio:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class PyramidDrop:
    """PyramidDrop: at each boundary layer keep the ``int(N * lambda^s)`` tokens the last prompt token attends most.

    Args:
        ratio: layer-averaged fraction of the visual tokens the LLM processes, in (0, 1]; sets ``lambda``
            (below ``b_1 / L`` the nearest schedule, ``lambda = 0``).
        layers: boundary layers ``b_s`` (PDrop's ``layer_list``), strictly increasing in ``1..num_layers-1``;
            tokens are dropped before each, scored with that layer's own Q/K.
        num_layers: decoder layers of the LLM (28 for the Qwen2-7B backbones; PDrop's LLaMA-7B has 32).
    """

    ratio: float = 0.5
    layers: tuple[int, ...] = (7, 14, 21)
    num_layers: int = 28
    name: str = "pdrop"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")
        try:
            layers = tuple(self.layers)  # Hydra hands a ListConfig
        except TypeError:
            raise ValueError(f"layers must be a sequence of ints, got {self.layers!r}") from None
        object.__setattr__(self, "layers", layers)
        top = self.num_layers - 1
        bad = any(isinstance(b, bool) or not isinstance(b, int) for b in layers)
        if bad or not layers or any(not 1 <= b <= top for b in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(
                f"layers must be strictly increasing ints in 1..{top} (num_layers={self.num_layers}), got {layers!r}"
            )
        object.__setattr__(self, "_lambda", solve_lambda(float(self.ratio), layers, self.num_layers))

    @property
    def stage_keep(self) -> float:
        """``lambda``, the per-stage keep fraction ``ratio`` maps to."""
        return self._lambda  # type: ignore[attr-defined]

    def stage_counts(self, n: int) -> tuple[int, ...]:
        """Tokens kept after each boundary: ``max(1, int(n * lambda^s))`` (PDrop's ``keep_length``), ``s = 1..S``."""
        if n <= 0:
            return (0,) * len(self.layers)
        return tuple(min(n, max(1, math.floor(n * self.stage_keep**s))) for s in range(1, len(self.layers) + 1))

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """One stage per boundary: the layer's own post-RoPE Q/K, last prompt token, heads averaged, renumbered."""
        return tuple(
            LayerSpec(
                layer=b,
                queries="last",
                head_reduce="mean",
                query_reduce="mean",
                rope=True,
                causal=True,
                prune_past_kv=False,
                own_layer=True,
                positions="renumber",
            )
            for b in self.layers
        )

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Identity: flatten ``[T, P, D]`` to ``[T * P, D]`` (a view)."""
        t, p, d = video.tokens.shape
        index = torch.arange(t * p, device=video.tokens.device)
        return PreLLMOutput(tokens=video.tokens.reshape(t * p, d), assignment=index)

    def in_llm(self, step: LayerInput) -> Tensor:
        """Keep the stage's count of highest-scoring tokens; ties keep the earlier token.

        Returns:
            ``[k]`` sorted long indices into ``step.visual``.

        Raises:
            ValueError: a layer that is not a boundary, or scores that are not ``[n]`` finite values.
        """
        if step.layer not in self.layers:
            raise ValueError(f"pdrop drops at layers {list(self.layers)}, got layer {step.layer}")
        scores = step.scores
        if scores.dim() != 1 or scores.numel() != step.visual.numel():
            raise ValueError(f"scores must be [n_cur={step.visual.numel()}], got {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores contain NaN or inf; check the adapter's attention computation")
        k = min(self.stage_counts(step.pre.n)[self.layers.index(step.layer)], scores.numel())
        order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
        return torch.sort(order).values

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        """``pre.n`` visual tokens up to the first boundary, then each stage's count.

        Raises:
            ValueError: ``num_layers`` differs from the one the schedule was built for.
        """
        return self.planned_counts(pre.n, num_layers)

    def planned_counts(self, n_in: int, num_layers: int) -> tuple[int, ...]:
        """Budget-exact (``prune.budget.PlannedCounts``): every token enters the LLM, so counts follow from ``N``.

        Raises:
            ValueError: ``num_layers`` differs from the one the schedule was built for.
        """
        if num_layers != self.num_layers:
            raise ValueError(f"pdrop was configured for num_layers={self.num_layers}, got {num_layers}")
        counts = (n_in, *self.stage_counts(n_in))
        edges = (0, *self.layers, num_layers)
        out: list[int] = []
        for s, count in enumerate(counts):
            out.extend([count] * (edges[s + 1] - edges[s]))
        return tuple(out)
