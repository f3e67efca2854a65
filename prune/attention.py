"""Model-agnostic reference scorer for in-LLM stages: attention received by the visual tokens.

An adapter hands :func:`visual_scores` the queries and keys one decoder layer uses (post- or pre-RoPE, as the
strategy's :class:`~prune.api.LayerSpec` asks; applying RoPE is the adapter's business) and gets back the ``[n]``
scores that ``Strategy.in_llm`` expects. Only the query rows the spec names are computed, so video sequences of
6k-13k tokens never materialise the ``[H, S, S]`` attention matrix that eager attention would (the memory argument
of FastV's maintainer in ``pkunlp-icler/FastV#25``).

Shape legend: ``H`` query heads, ``H_kv`` key/value heads (GQA), ``S`` sequence length, ``d`` head dim, ``n`` visual
tokens (columns ``visual_start:visual_end``), ``r`` query rows in one chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prune.api import LayerSpec

__all__ = ["query_rows", "visual_scores"]


def query_rows(spec: LayerSpec, seq_len: int, visual_end: int) -> tuple[int, int]:
    """The contiguous range ``[start, end)`` of query rows a spec averages over.

    Args:
        spec: the layer spec; only ``spec.queries`` is read.
        seq_len: ``S``, the prefill sequence length.
        visual_end: one past the last visual token.

    Returns:
        ``(start, end)`` row bounds.

    Raises:
        ValueError: unknown ``spec.queries``, or ``"after_visual"`` with no token after the visual span.
    """
    if spec.queries == "last":
        return seq_len - 1, seq_len
    if spec.queries == "all":
        return 0, seq_len
    if spec.queries == "after_visual":
        if visual_end >= seq_len:
            raise ValueError(
                f"queries='after_visual' needs at least one token after the visual span, but visual_end={visual_end} "
                f"equals the sequence length {seq_len}"
            )
        return visual_end, seq_len
    raise ValueError(f"spec.queries must be one of 'last', 'after_visual', 'all', got {spec.queries!r}")


def visual_scores(
    q: Tensor,
    k: Tensor,
    visual_start: int,
    visual_end: int,
    spec: LayerSpec,
    *,
    scale: float | None = None,
    chunk: int = 256,
    q_start: int = 0,
) -> Tensor:
    """Attention the visual tokens receive from the query rows a spec names, reduced to one score per token.

    For each named query row the softmax runs over the whole row (all ``S`` keys, causally masked if
    ``spec.causal``), in fp32, like the eager attention of HF decoders. The visual columns are then sliced, reduced
    over heads (``spec.head_reduce``) and over the query rows (``spec.query_reduce``). Rows are processed ``chunk``
    at a time and the query reduction is accumulated, so the extra memory is ``O(H * min(chunk, rows) * S)``:
    one row for ``"last"``, never ``S x S``.

    ``spec.rope`` is not read: the caller passes the queries and keys the spec asks for.

    Args:
        q: ``[H, S, d]`` queries of the layer (one sample).
        k: ``[H_kv, S, d]`` keys; under GQA query head ``h`` uses key head ``h // (H // H_kv)`` (HF ``repeat_kv``).
        visual_start: first visual column.
        visual_end: one past the last visual column.
        spec: which rows, reductions and mask to use.
        scale: softmax temperature; ``1 / sqrt(d)`` when ``None``.
        chunk: query rows per block for ``"all"`` and ``"after_visual"``.
        q_start: ``q`` holds only the query rows ``q_start..S-1`` (``[H, S - q_start, d]``), so a caller that projects
            queries itself (pre-RoPE scoring) computes just the rows it needs.

    Returns:
        ``[n]`` float32 scores, ``n = visual_end - visual_start``, on ``q``'s device.

    Raises:
        ValueError: bad ranks or shapes, ``H`` not a multiple of ``H_kv``, an empty or out-of-range visual span,
            ``chunk < 1``, or an unknown reduction.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [H, S, d] and k [H_kv, S, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_heads, _, head_dim = q.shape
    num_kv, seq_len = k.shape[0], k.shape[1]
    if k.shape[2] != head_dim or q.shape[1] + q_start != seq_len or q_start < 0:
        raise ValueError(
            f"q {tuple(q.shape)} must hold rows {q_start}..S-1 of k's S={seq_len} with the same head dim {k.shape[2]}"
        )
    if num_kv < 1 or num_heads % num_kv != 0:
        raise ValueError(f"query heads H={num_heads} must be a positive multiple of key heads H_kv={num_kv}")
    if not 0 <= visual_start < visual_end <= seq_len:
        raise ValueError(f"visual span must satisfy 0 <= start < end <= S={seq_len}: [{visual_start}, {visual_end})")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if spec.head_reduce not in ("mean", "max") or spec.query_reduce not in ("mean", "max"):
        raise ValueError(
            f"head_reduce and query_reduce must be 'mean' or 'max', got {spec.head_reduce!r}, {spec.query_reduce!r}"
        )
    row_start, row_end = query_rows(spec, seq_len, visual_end)
    if row_start < q_start:
        raise ValueError(f"spec.queries={spec.queries!r} needs rows from {row_start}, but q starts at row {q_start}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    group = num_heads // num_kv
    # [H_kv, S, d] fp32 once (same size as k); queries are upcast chunk by chunk. Grouping the query heads by their
    # key head avoids materialising the repeated keys.
    k32 = k.float()
    cols = torch.arange(seq_len, device=q.device)
    acc: Tensor | None = None
    for start in range(row_start, row_end, chunk):
        end = min(start + chunk, row_end)
        rows = end - start
        q_blk = q[:, start - q_start : end - q_start].float().reshape(num_kv, group, rows, head_dim)
        logits = torch.einsum("grqd,gsd->grqs", q_blk, k32).reshape(num_heads, rows, seq_len) * scale  # [H, r, S]
        if spec.causal:
            # Row i (absolute position) sees keys 0..i; the last row sees everything.
            future = cols[None, :] > torch.arange(start, end, device=q.device)[:, None]  # [r, S]
            logits = logits.masked_fill(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[:, :, visual_start:visual_end]  # [H, r, n]
        per_row = probs.mean(0) if spec.head_reduce == "mean" else probs.amax(0)  # [r, n]
        if spec.query_reduce == "mean":
            part = per_row.sum(0)
            acc = part if acc is None else acc + part
        else:
            part = per_row.amax(0)
            acc = part if acc is None else torch.maximum(acc, part)
    assert acc is not None  # the row range is never empty
    if spec.query_reduce == "mean":
        acc = acc / (row_end - row_start)
    return acc
