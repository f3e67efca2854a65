"""``none``: the unpruned baseline. Every visual token enters the LLM and every layer keeps all of them.

``ratio`` is accepted so that every strategy takes the same knob, and validated, but it has no effect: ``none``
always keeps 100 %. Its end-to-end scores must equal the unwrapped backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio

__all__ = ["NoPruning"]


@dataclass(frozen=True)
class NoPruning:
    """Identity strategy.

    Args:
        ratio: validated and ignored (``none`` keeps everything).
    """

    ratio: float = 1.0
    name: str = "none"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Flatten ``[T, P, D]`` to ``[T * P, D]`` in time-then-raster order (a view, never a copy)."""
        t, p, d = video.tokens.shape
        index = torch.arange(t * p, device=video.tokens.device)
        return PreLLMOutput(tokens=video.tokens.reshape(t * p, d), assignment=index)

    def in_llm(self, step: LayerInput) -> Tensor:
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers
