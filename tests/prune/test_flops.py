"""FLOPs accounting against the numbers the papers publish (fastv_and_baselines.md §1.2, prunevid.md §6)."""

from __future__ import annotations

import pytest

from prune.flops import SHAPES, decode_flops, flops_ratio, layer_flops, prefill_flops, tokens_per_layer


def test_llava_ov_full_prefill_is_holitom_vanilla_40_8_tflops():
    qwen = SHAPES["qwen2-7b"]
    total = prefill_flops([6272] * qwen.layers, qwen.hidden, qwen.ffn)
    assert total == pytest.approx(40.8e12, rel=0.01)


def test_fastv_on_pllava_is_0_33x():
    vicuna = SHAPES["vicuna-7b"]
    text, visual, k = 50, 2304, 2
    kept = round(0.3 * visual)
    full = prefill_flops(tokens_per_layer([visual] * vicuna.layers, text), vicuna.hidden, vicuna.ffn)
    pruned_visual = [visual] * k + [kept] * (vicuna.layers - k)
    pruned = prefill_flops(tokens_per_layer(pruned_visual, text), vicuna.hidden, vicuna.ffn)
    assert flops_ratio(pruned, full) == pytest.approx(0.33, abs=0.01)


def test_prunevid_pllava_schedule_is_about_0_23x():
    # prunevid.md §6: 11 layers at 40.5 % and 21 layers at 16.2 % of 2,304 tokens, ~50 text tokens -> 0.235-0.242.
    v = SHAPES["vicuna-7b"]
    per_layer = [round(0.405 * 2304)] * 11 + [round(0.162 * 2304)] * 21
    full = prefill_flops(tokens_per_layer([2304] * 32, 50), v.hidden, v.ffn)
    ratio = flops_ratio(prefill_flops(tokens_per_layer(per_layer, 50), v.hidden, v.ffn), full)
    assert 0.23 <= ratio <= 0.245


def test_layer_formula_terms():
    n, d, m = 10, 4, 6
    assert layer_flops(n, d, m) == 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert layer_flops(0, d, m) == 0


def test_decode_matches_holitom_closed_form():
    d, m, r, c, layers = 3584, 18944, 100, 6322, 28
    holitom = layers * r * ((4 * d * d + 2 * d * m) + 2 * (d * c + d * (r + 1) / 2))
    assert decode_flops([c] * layers, d, m, r) == pytest.approx(holitom, rel=1e-12)
    # summing token by token gives the same
    by_step = sum(r_i for r_i in (4 * d * d + 2 * d * m + 2 * d * (c + i) for i in range(1, r + 1))) * layers
    assert decode_flops([c] * layers, d, m, r) == pytest.approx(by_step, rel=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        prefill_flops([], 8, 8)
    with pytest.raises(ValueError, match="n >= 0"):
        layer_flops(-1, 8, 8)
    with pytest.raises(ValueError, match="> 0"):
        flops_ratio(1.0, 0.0)
