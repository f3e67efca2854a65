"""Model-agnostic visual-token pruning methods for video LLMs and their contract (``prune.api``).

Apart from the methods (``prune.strategies``), ``prune.adapters`` holds the model surgery, one module per family.
"""

from prune.api import (
    LayerInput,
    LayerSpec,
    PreLLMOutput,
    Strategy,
    TokenBudget,
    VideoTokens,
    check_ratio,
    check_video,
    keep_count,
    simulate,
)

__all__ = [
    "LayerInput",
    "LayerSpec",
    "PreLLMOutput",
    "Strategy",
    "TokenBudget",
    "VideoTokens",
    "check_ratio",
    "check_video",
    "keep_count",
    "simulate",
]
