from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prune.api import LayerSpec
from prune.attention import query_rows, visual_scores


def naive_scores(q, k, start, end, spec, scale=None):
    """Full [H, S, S] attention in fp64, the textbook way."""
    heads, seq, dim = q.shape
    scale = 1 / math.sqrt(dim) if scale is None else scale
    keys = k.double().repeat_interleave(heads // k.shape[0], dim=0)  # HF repeat_kv order
    logits = q.double() @ keys.transpose(1, 2) * scale
    if spec.causal:
        logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(-1)
    rows = {"last": slice(seq - 1, seq), "all": slice(0, seq), "after_visual": slice(end, seq)}[spec.queries]
    a = probs[:, rows, start:end]
    a = a.mean(0) if spec.head_reduce == "mean" else a.amax(0)
    return a.mean(0) if spec.query_reduce == "mean" else a.amax(0)


def make_qk(heads=4, kv=2, seq=13, dim=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(kv, seq, dim, generator=g).to(dtype)
    return q, k


COMBOS = list(itertools.product(("last", "after_visual", "all"), ("mean", "max"), ("mean", "max"), (True, False)))


@pytest.mark.parametrize(("queries", "head_reduce", "query_reduce", "causal"), COMBOS)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_matches_naive_full_matrix(queries, head_reduce, query_reduce, causal, chunk):
    q, k = make_qk()
    spec = LayerSpec(layer=0, queries=queries, head_reduce=head_reduce, query_reduce=query_reduce, causal=causal)
    got = visual_scores(q, k, 3, 9, spec, chunk=chunk)
    want = naive_scores(q, k, 3, 9, spec)
    assert got.shape == (6,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_gqa_uses_interleaved_kv_heads_and_custom_scale():
    # 6 query heads over 3 KV heads: query head h must use key head h // 2, not h % 3.
    q, k = make_qk(heads=6, kv=3, seq=10, dim=4, seed=1)
    spec = LayerSpec(layer=0, queries="all", head_reduce="max", query_reduce="max")
    got = visual_scores(q, k, 2, 7, spec, scale=0.3, chunk=4)
    torch.testing.assert_close(got.double(), naive_scores(q, k, 2, 7, spec, scale=0.3), rtol=1e-5, atol=1e-7)
    wrong = k.double().repeat(2, 1, 1)  # h % 3 mapping
    bad = naive_scores(q, wrong, 2, 7, spec, scale=0.3)
    assert not torch.allclose(got.double(), bad, rtol=1e-3)


def test_bf16_inputs_scored_in_fp32():
    q, k = make_qk(dtype=torch.bfloat16)
    spec = LayerSpec(layer=0, queries="all")
    got = visual_scores(q, k, 0, 13, spec, chunk=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_scores(q.float(), k.float(), 0, 13, spec), rtol=1e-5, atol=1e-7)
    assert q.dtype == torch.bfloat16  # inputs untouched


def test_causal_last_row_sees_everything_and_first_rows_see_no_future():
    # With causal masking, query row 0 only attends to key 0: a visual span [1, S) gets nothing from it.
    q, k = make_qk(seq=6)
    spec_all = LayerSpec(layer=0, queries="all", query_reduce="max")
    row0 = visual_scores(q[:, :1], k[:, :1], 0, 1, spec_all)
    torch.testing.assert_close(row0, torch.ones(1))  # a single key gets probability 1
    last_causal = visual_scores(q, k, 0, 6, LayerSpec(layer=0, queries="last", causal=True))
    last_full = visual_scores(q, k, 0, 6, LayerSpec(layer=0, queries="last", causal=False))
    torch.testing.assert_close(last_causal, last_full)
    torch.testing.assert_close(last_causal.sum(), torch.tensor(1.0))  # the whole row is the visual span


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(("queries", "chunk", "rows"), [("last", 256, 1), ("after_visual", 8, 8), ("all", 8, 8)])
def test_never_builds_seq_by_seq(queries, chunk, rows):
    # H * chunk * S and H * S * d are all well below S * S here, so any [S, S] (or [H, S, S]) intermediate shows.
    heads, seq, dim = 2, 64, 4
    q, k = make_qk(heads=heads, kv=1, seq=seq, dim=dim)
    spec = LayerSpec(layer=0, queries=queries, causal=True)
    with MaxNumel() as probe:
        visual_scores(q, k, 4, 40, spec, chunk=chunk)
    # Bounded by one chunk of scores or a copy of q/k (einsum may reshape them); both far below S * S.
    assert probe.largest <= max(heads * rows * seq, q.numel()) < seq * seq
    # The probe is not vacuous: the full-matrix computation trips it.
    with MaxNumel() as probe:
        naive_scores(q, k, 4, 40, spec)
    assert probe.largest >= seq * seq


def test_query_rows():
    assert query_rows(LayerSpec(0, queries="last"), 10, 6) == (9, 10)
    assert query_rows(LayerSpec(0, queries="after_visual"), 10, 6) == (6, 10)
    assert query_rows(LayerSpec(0, queries="all"), 10, 6) == (0, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv": 3}, "multiple"),
        ({"start": 5, "end": 5}, "visual span"),
        ({"end": 14}, "visual span"),
        ({"chunk": 0}, "chunk"),
        ({"queries": "after_visual", "end": 13}, "after the visual span"),
        ({"queries": "first"}, "queries"),
    ],
)
def test_rejects_bad_inputs(kwargs, match):
    q, k = make_qk(heads=4, kv=kwargs.get("kv", 2))
    spec = LayerSpec(layer=0, queries=kwargs.get("queries", "last"))
    with pytest.raises(ValueError, match=match):
        visual_scores(q, k, kwargs.get("start", 2), kwargs.get("end", 8), spec, chunk=kwargs.get("chunk", 4))
