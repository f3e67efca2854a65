"""``random``: keep a uniformly random subset of the visual tokens before the LLM.

The control every pruning method should beat at the same budget (UniPruneBench and VTC-Bench run it next to every
method). FastV's masking variant with ``K = 0`` drops a random subset in the same way.

The subset depends only on ``seed`` and ``N = T * P``: a CPU ``torch.Generator`` seeded from ``seed`` draws it, so
the same seed gives the same positions on every device and in every run, and the global RNG is never touched.
Videos with the same shape therefore share one fixed random mask per seed; sweep ``seed`` for variance.

Shape legend: ``T`` frames, ``P`` tokens per frame, ``D`` hidden size, ``N = T * P``, ``k`` tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio, keep_count

__all__ = ["RandomPruning"]

# torch.Generator.manual_seed accepts 64-bit seeds; keep to the signed range so YAML ints round-trip everywhere.
_SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class RandomPruning:
    """Uniform random token selection at a fixed budget.

    Args:
        ratio: fraction of visual tokens kept, in (0, 1]; exactly ``keep_count(ratio, T * P)`` survive.
        seed: seed of the private CPU generator, in ``[0, 2**63 - 1]``.
    """

    ratio: float = 0.5
    seed: int = 0
    name: str = "random"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {self.seed!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return ()

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Keep ``keep_count(ratio, T * P)`` random tokens in their original time-then-raster order.

        Args:
            video: ``tokens`` is ``[T, P, D]``.

        Returns:
            ``tokens`` ``[k, D]`` (same dtype and device), ``assignment`` ``[N]`` with the output index of each kept
            token and -1 for dropped ones.
        """
        t, p, d = video.tokens.shape
        n = t * p
        k = keep_count(self.ratio, n)
        device = video.tokens.device
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        index = torch.randperm(n, generator=gen)[:k].sort().values.to(device)  # [k]
        assignment = torch.full((n,), -1, dtype=torch.long, device=device)
        assignment[index] = torch.arange(k, device=device)
        return PreLLMOutput(tokens=video.tokens.reshape(n, d).index_select(0, index), assignment=assignment)

    def in_llm(self, step: LayerInput) -> Tensor:
        """Never called (no in-LLM stage); keeps everything if an adapter calls it anyway."""
        return torch.arange(step.scores.numel(), device=step.scores.device)

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        return (pre.n,) * num_layers

    def planned_counts(self, n_in: int, num_layers: int) -> tuple[int, ...]:
        """Budget-exact: ``keep_count(ratio, N)`` at every layer, whatever the content (``prune.budget``)."""
        return (keep_count(self.ratio, n_in),) * num_layers
