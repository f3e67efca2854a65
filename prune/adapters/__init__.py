"""Backbone adapters: one file per model family; model surgery lives here, never in prune/strategies.

Every adapter satisfies :class:`VideoAdapter`, so the eval spine drives all backbones the same way: it builds the
prompt ids around one placeholder token, preprocesses ``T`` frames, and calls :meth:`VideoAdapter.generate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from prune.adapters.llm import Generation, PrunedLM
    from prune.api import Strategy

__all__ = ["VideoAdapter", "swap_strategy"]


@runtime_checkable
class VideoAdapter(Protocol):
    """One loaded video LLM with a pruning strategy installed, answering one prompt about one video.

    Attributes:
        model: the transformers model (eval mode).
        strategy: the pruning method.
        llm: the :class:`~prune.adapters.llm.PrunedLM` wrapping the decoder stack.
        num_frames: frames per video the adapter accepts.
        grid: ``(h, w)`` of the per-frame token grid handed to ``strategy.pre_llm``.
        placeholder_id: the prompt token id the visual tokens replace (one contiguous run of it, any length >= 1).
        separators_unpruned: separator tokens (e.g. newlines) of the unpruned visual span.
    """

    model: Any
    strategy: Strategy
    llm: PrunedLM
    num_frames: int
    grid: tuple[int, int]
    placeholder_id: int
    separators_unpruned: int

    def generate(
        self,
        input_ids: Tensor,
        pixel_values_videos: Tensor,
        max_new_tokens: int = 16,
        eos_token_ids: tuple[int, ...] = (),
        return_logits: bool = False,
        **inputs: Any,
    ) -> Generation:
        """Prune the video's tokens and answer greedily.

        Args:
            input_ids: ``[1, S]`` prompt ids with one contiguous run of ``placeholder_id``.
            pixel_values_videos: ``[1, T, 3, H, W]`` preprocessed frames.
            max_new_tokens: most tokens to generate.
            eos_token_ids: stop after one of these.
            return_logits: keep every generated token's ``[V]`` logits.
            **inputs: extra model inputs (ST-LLM: the Q-Former's question ids).
        """
        ...


def swap_strategy(adapter: VideoAdapter, strategy: Strategy) -> None:
    """Install ``strategy`` on a built adapter in place of one with the same in-LLM stages.

    The budget wrapper (``prune.budget.AtBudget``) needs the LLM's shape, known only once the model is loaded; its
    ``layer_specs`` are those of the strategy it wraps, so the hooks the adapter installed stay valid.

    Raises:
        ValueError: the two strategies score different layers or in different ways.
    """
    if tuple(strategy.layer_specs) != tuple(adapter.strategy.layer_specs):
        raise ValueError(
            f"cannot swap {adapter.strategy.name} for {strategy.name}: their layer_specs differ "
            f"({adapter.strategy.layer_specs} vs {strategy.layer_specs}); build a new adapter instead"
        )
    adapter.strategy = strategy
    adapter.llm.strategy = strategy
