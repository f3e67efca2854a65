"""The analytic FLOPs of ``prune.flops`` against ``torch.utils.flop_counter.FlopCounterMode`` on a tiny pruned LLM.

FlopCounterMode counts matmul-class ops (linear, bmm, einsum) at two FLOPs per multiply-accumulate. The LLM runs
eager attention, whose two attention matmuls it sees (the CPU SDPA kernel has no FLOP formula in torch 2.13), so the
count covers exactly the linear + attention terms of :func:`prune.flops.exact_prefill_flops`, the scoring rows the
pruning stage adds, and the LM head. The per-layer token counts fed to the formula are the ones the run logged.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prune.adapters.llava_onevision import tiny_llava_onevision
from prune.adapters.llm import PrunedLM
from prune.api import VideoTokens
from prune.flops import LLMShape, exact_decode_flops, exact_prefill_flops
from prune.strategies.fastv import FastV
from prune.strategies.none import NoPruning
from prune.strategies.prunevid import PruneVid

T, H, W = 8, 14, 14
TEXT_BEFORE, TEXT_AFTER = 14, 20


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision(seed=0, attn_implementation="eager")


def _shape(lm) -> LLMShape:
    c = lm.config
    return LLMShape(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        ffn=c.intermediate_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        vocab=c.vocab_size,
    )


def _counted(model, strategy, new_tokens: int):
    g = torch.Generator().manual_seed(0)
    d = model.config.text_config.hidden_size
    base = torch.randn(1, H * W, d, generator=g)
    frames = base + 0.3 * torch.randn(T, H * W, d, generator=g)  # temporally redundant, as real video
    text = torch.randn(TEXT_BEFORE + TEXT_AFTER, d, generator=g)
    pre = strategy.pre_llm(VideoTokens(frames, (H, W), text=text))
    embeds = torch.cat([text[:TEXT_BEFORE], pre.tokens, text[TEXT_BEFORE:]])[None]
    n = pre.n
    visual = torch.cat([torch.full((TEXT_BEFORE,), -1), torch.arange(n), torch.full((TEXT_AFTER,), -1)])
    llm = PrunedLM(model.model.language_model, model.lm_head, strategy)
    try:
        with FlopCounterMode(display=False) as counter:
            _, stats, _ = llm.generate(embeds, visual, pre, max_new_tokens=new_tokens)
    finally:
        llm.remove()
    return counter.get_total_flops(), stats


STRATEGIES = {
    "none": lambda: NoPruning(),
    "fastv": lambda: FastV(ratio=0.3, layer=2, prune_kv=True),
    "fastv_all_rows": lambda: FastV(ratio=0.3, layer=2, queries="all", prune_kv=True),
    "prunevid": lambda: PruneVid(ratio=0.4, layer=1),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_exact_prefill_flops_match_flop_counter_within_5_percent(model, name):
    strategy = STRATEGIES[name]()
    counted, stats = _counted(model, strategy, new_tokens=1)
    shape = _shape(model.model.language_model)
    analytic = exact_prefill_flops(stats.tokens_per_layer, shape, stats.scoring)
    assert analytic == pytest.approx(counted, rel=0.05)
    if name != "none":  # the run really pruned, and the scoring rows are part of what matched
        assert stats.tokens_per_layer[-1] < stats.tokens_per_layer[0] and stats.scoring
        no_scoring = exact_prefill_flops(stats.tokens_per_layer, shape)
        assert analytic > no_scoring


def test_the_flop_counter_check_fails_on_unpruned_counts(model):
    """The match above is not loose: feeding the unpruned length to every layer misses by far more than 5 %."""
    counted, stats = _counted(model, FastV(ratio=0.3, layer=1, prune_kv=True), new_tokens=1)
    shape = _shape(model.model.language_model)
    unpruned = exact_prefill_flops([stats.tokens_per_layer[0]] * shape.layers, shape)
    assert abs(unpruned - counted) / counted > 0.2


@pytest.mark.parametrize("name", ["none", "prunevid"])
def test_exact_decode_flops_match_flop_counter(model, name):
    prefill_only, stats1 = _counted(model, STRATEGIES[name](), new_tokens=1)
    total, stats = _counted(model, STRATEGIES[name](), new_tokens=5)
    assert stats.new_tokens == 5 and stats.tokens_per_layer == stats1.tokens_per_layer
    shape = _shape(model.model.language_model)
    decode = exact_decode_flops(stats.kv_len_per_layer, shape, stats.new_tokens)
    assert decode == pytest.approx(total - prefill_only, rel=0.05)
