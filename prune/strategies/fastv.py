"""``fastv``: FastV, "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv:2403.06764).

Official code: ``pkunlp-icler/FastV`` (``LlamaModel.forward`` of its patched transformers, "inplace" variant).

Decoder layers ``0..K-1`` run on every visual token. The attention of layer ``K-1`` scores each visual token, and
only the ``keep = keep_count(ratio, n)`` best survive into layers ``K..L-1``; survivors keep their original position
ids (the official ``position_ids = keep_indexs``, which the adapter implements).

Scoring (``queries``):

* ``"last"`` (default, the official code and every downstream re-implementation): the head-averaged attention row
  of the last prompt token.
* ``"all"`` (the paper's wording, "the average attention-score one token received from all other tokens"): the mean
  over heads and over every query row. Under the causal mask rows before a token contribute zeros to its mean, as
  they would in the paper's column mean of the causal attention matrix.

For video the visual span is all frames concatenated, ranked globally: there is no per-frame quota, as in the FastV
rows of the PruneVid and HoliTom tables.

Shape legend: ``H`` heads, ``q`` query rows, ``S`` sequence length, ``n`` visual tokens, ``k`` tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prune.api import LayerInput, LayerSpec, PreLLMOutput, VideoTokens, check_ratio, keep_count

__all__ = ["FastV", "fastv_scores", "top_k_indices"]

_QUERIES = ("last", "all")


def fastv_scores(attn: Tensor, visual_start: int, visual_end: int) -> Tensor:
    """FastV scores from attention probabilities: mean over heads, then over the given query rows.

    Pass ``attn[:, -1:]`` for the official last-token rule, or every row for the paper's column mean.

    Args:
        attn: ``[H, q, S]`` attention probabilities of ``q`` query rows over the whole sequence.
        visual_start: first visual column.
        visual_end: one past the last visual column.

    Returns:
        ``[n]`` float32 scores, ``n = visual_end - visual_start``.

    Raises:
        ValueError: ``attn`` is not rank 3 with at least one head and row, or the span is empty or out of range.
    """
    if attn.dim() != 3 or attn.shape[0] == 0 or attn.shape[1] == 0:
        raise ValueError(f"attn must be [H, q, S] with H, q >= 1, got {tuple(attn.shape)}")
    seq_len = attn.shape[2]
    if not 0 <= visual_start < visual_end <= seq_len:
        raise ValueError(f"visual span must satisfy 0 <= start < end <= S={seq_len}: [{visual_start}, {visual_end})")
    # fp32 accumulation: bf16 means over 28 heads x thousands of rows would lose the ordering of close scores.
    return attn[:, :, visual_start:visual_end].float().mean(dim=(0, 1))


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` highest scores; on equal scores the earlier token wins.

    The official code uses ``torch.topk``, whose order among ties is unspecified; a stable descending sort makes the
    choice deterministic on every device.

    Args:
        scores: ``[n]`` finite scores.
        k: how many to keep, ``0 <= k <= n``.

    Returns:
        ``[k]`` long indices in increasing order, on ``scores``' device.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


@dataclass(frozen=True)
class FastV:
    """FastV: keep the visual tokens that receive the most attention at layer ``K - 1``.

    Args:
        ratio: fraction of the visual tokens kept from layer ``K`` on, in (0, 1]
            (``keep = keep_count(ratio, n)``; the HF-LLaVA demo's ``R`` is ``1 - ratio``).
        layer: ``K`` >= 1; tokens are dropped before decoder layer ``K``, scored with layer ``K - 1``'s attention.
            The paper's headline setting is ``K = 2``; its lmms-eval table uses ``K = 3``.
        queries: ``"last"`` (official code) or ``"all"`` (paper text); see the module docstring.
        prune_kv: also drop the pruned tokens from the KV cache of layers ``< K``. ``False`` is the official inplace
            variant: those layers keep their full cache during decoding.
    """

    ratio: float = 0.5
    layer: int = 2
    queries: str = "last"
    prune_kv: bool = False
    name: str = "fastv"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            # K = 0 would need scores from a layer before the first one (the official masking variant then drops a
            # random subset; that is the ``random`` strategy here).
            raise ValueError(f"layer (K) must be an int >= 1 (scores come from layer K-1 >= 0), got {self.layer!r}")
        if self.queries not in _QUERIES:
            raise ValueError(f"queries must be one of {_QUERIES}, got {self.queries!r}")
        if not isinstance(self.prune_kv, bool):
            raise ValueError(f"prune_kv must be a bool, got {self.prune_kv!r}")

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """One stage: layer ``K - 1``'s post-RoPE causal attention, mean over heads and query rows."""
        return (
            LayerSpec(
                layer=self.layer - 1,
                queries=self.queries,  # type: ignore[arg-type]  # validated in __post_init__
                head_reduce="mean",
                query_reduce="mean",
                rope=True,
                causal=True,
                prune_past_kv=self.prune_kv,
            ),
        )

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        """Identity: flatten ``[T, P, D]`` to ``[T * P, D]`` in time-then-raster order (a view, never a copy)."""
        t, p, d = video.tokens.shape
        index = torch.arange(t * p, device=video.tokens.device)
        return PreLLMOutput(tokens=video.tokens.reshape(t * p, d), assignment=index)

    def in_llm(self, step: LayerInput) -> Tensor:
        """Keep the ``keep_count(ratio, n)`` highest-scoring tokens, ranked over all frames together.

        Args:
            step: ``step.scores`` is ``[n]``, the score of each visual token still present.

        Returns:
            ``[k]`` sorted long indices into ``step.visual``; on equal scores the earlier token wins.

        Raises:
            ValueError: ``scores`` is not 1-D or contains NaN/inf.
        """
        scores = step.scores
        if scores.dim() != 1:
            raise ValueError(f"scores must be [n], got {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores contain NaN or inf; check the adapter's attention computation")
        return top_k_indices(scores, keep_count(self.ratio, scores.numel()))

    def layer_counts(self, pre: PreLLMOutput, num_layers: int) -> tuple[int, ...]:
        """``n`` visual tokens in layers ``< K``, ``keep_count(ratio, n)`` in layers ``>= K``.

        Raises:
            ValueError: ``K >= num_layers`` (no layer would see the pruned sequence).
        """
        return self.planned_counts(pre.n, num_layers)

    def planned_counts(self, n_in: int, num_layers: int) -> tuple[int, ...]:
        """Budget-exact: ``N`` before layer K, ``keep_count(ratio, N)`` from K on (``prune.budget``)."""
        if self.layer >= num_layers:
            raise ValueError(f"fastv: layer K={self.layer} must be in 1..{num_layers - 1} for {num_layers} layers")
        keep = keep_count(self.ratio, n_in)
        return (n_in,) * self.layer + (keep,) * (num_layers - self.layer)
