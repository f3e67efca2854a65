"""In-LLM stages on the LLM of every tiny backbone: PyramidDrop's own-layer scoring and renumbered positions, and the
merge contract (``LayerMerge``), each checked against a from-scratch forward that applies the same rules by hand.

The LLMs are those of the four tiny backbones (LLaVA-OneVision and LLaVA-Video: Qwen2; PLLaVA and ST-LLM: Llama),
driven through :class:`prune.adapters.llm.PrunedLM` with a synthetic prompt: ``PREFIX`` text tokens, ``N`` visual
embeddings, ``SUFFIX`` text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prune.adapters.llm import PrunedLM, _rotate_half
from prune.api import LayerInput, LayerMerge, LayerSpec, PreLLMOutput, VideoTokens
from prune.strategies.pdrop import PyramidDrop

PREFIX, N, SUFFIX = 3, 40, 6
BACKBONES = ["tiny_llava_ov", "tiny_llava_video", "tiny_pllava", "tiny_st_llm"]


def _llm(backbone: str, attn: str = "sdpa"):
    if backbone in ("tiny_llava_ov", "tiny_llava_video"):  # one class, two layouts: the LLM is the same
        from prune.adapters.llava_onevision import tiny_llava_onevision

        model = tiny_llava_onevision(seed=0, attn_implementation=attn)
        return model.model.language_model, model.lm_head
    if backbone == "tiny_pllava":
        from prune.adapters.pllava import tiny_pllava

        model = tiny_pllava(seed=0, attn_implementation=attn)
        return model.model.language_model, model.lm_head
    from prune.adapters.st_llm import tiny_st_llm

    lm = tiny_st_llm(seed=0, attn_implementation=attn).language_model
    return lm.model, lm.lm_head


@pytest.fixture(scope="module", params=BACKBONES)
def llm(request):
    return _llm(request.param)


def _prompt(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = lm.config.hidden_size
    vocab = min(lm.config.vocab_size, 256)
    ids = torch.randint(3, vocab, (PREFIX + SUFFIX,), generator=g)
    with torch.no_grad():
        text = lm.embed_tokens(ids)
    visual = torch.randn(N, d, generator=g) * text.std()
    x = torch.cat([text[:PREFIX], visual, text[PREFIX:]])[None]
    vis = torch.full((x.shape[1],), -1, dtype=torch.long)
    vis[PREFIX : PREFIX + N] = torch.arange(N)
    pre = PreLLMOutput(visual, torch.arange(N))
    return x, vis, pre


def _generate(lm, head, strategy, steps=4):
    x, vis, pre = _prompt(lm)
    pruned = PrunedLM(lm, head, strategy)
    try:
        tokens, stats, logits = pruned.generate(x, vis, pre, max_new_tokens=steps, return_logits=True)
    finally:
        pruned.remove()
    return x, tokens, stats, logits


def _reference(lm, head, x, generated, stages, renumber, hide_from_new=False, merges=None, vis=None):
    """One eager forward over prompt + generated tokens with the stages applied by hand.

    ``stages``: ``(first_layer, kept visual indices into the current visual tokens)``; before ``first_layer`` the
    other visual tokens leave the sequence (``merges[first_layer]``: ``(into, weights)`` combine hidden states as
    ``LayerMerge`` says). With ``renumber`` the remaining sequence (prompt and generated tokens) is numbered
    ``0..S'-1``; otherwise every token keeps its position. ``hide_from_new`` hides the dropped tokens from the
    generated tokens in the layers before the drop (``prune_past_kv``). ``vis``: the prompt's visual index per
    position (-1 for text and separators), default ``PREFIX`` text then ``N`` visual tokens.
    """
    merges = merges or {}
    s = x.shape[1]
    with torch.no_grad():
        new = lm.embed_tokens(torch.tensor(generated[:-1]))[None]
        h = torch.cat([x, new], 1)
        total = h.shape[1]
        orig = torch.arange(total)  # original index of each current token
        pos = torch.arange(total)
        visual = torch.full((total,), -1)
        if vis is None:
            visual[PREFIX : PREFIX + N] = torch.arange(N)
        else:
            visual[:s] = vis
        where = (visual >= 0).nonzero()[:, 0]  # sequence position of each visual token, in visual order
        allowed = torch.ones(total, total, dtype=torch.bool).tril()
        stage_at = dict(stages)
        if hide_from_new:  # the generated tokens never see what any stage removed
            cur = torch.arange(N)
            for _, keep in stages:
                gone = cur[~torch.isin(torch.arange(cur.numel()), keep)]
                allowed[s:, where[gone]] = False
                cur = cur[keep]
        mask_full = torch.zeros(total, total).masked_fill(~allowed, float("-inf"))
        for i, layer in enumerate(lm.layers):
            if i in stage_at:
                vis_local = (visual >= 0).nonzero()[:, 0]
                keep = stage_at[i]
                if i in merges:
                    into, weights = merges[i]
                    merged = torch.zeros(keep.numel(), h.shape[-1])
                    member = into >= 0
                    merged.index_add_(0, into[member], h[0, vis_local[member]] * weights[member, None])
                    h = h.clone()
                    h[0, vis_local[keep]] = merged
                keep_mask = visual < 0
                keep_mask[vis_local[keep]] = True
                idx = keep_mask.nonzero()[:, 0]
                h, orig, visual = h[:, idx], orig[idx], visual[idx]
                pos = torch.arange(idx.numel()) if renumber else pos[idx]
            mask = mask_full[orig][:, orig][None, None]
            cos, sin = lm.rotary_emb(h, pos[None])
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
        logits = head(lm.norm(h))[0].float()
    return logits[-len(generated) :]


# --- PyramidDrop ---------------------------------------------------------------------------------------------------


def _pdrop_scores(lm, h, pos, b):
    """PDrop's rank score by hand: layer b's input norm, q/k projections, RoPE at ``pos``, last row, head mean."""
    layer = lm.layers[b]
    attn = layer.self_attn
    x = layer.input_layernorm(h)[0]
    hd = attn.head_dim
    q = attn.q_proj(x).view(x.shape[0], -1, hd).transpose(0, 1)
    k = attn.k_proj(x).view(x.shape[0], -1, hd).transpose(0, 1)
    cos, sin = lm.rotary_emb(h, pos[None])
    q = q * cos[0] + _rotate_half(q) * sin[0]
    k = k * cos[0] + _rotate_half(k) * sin[0]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    probs = torch.softmax((q[:, -1:] @ k.transpose(1, 2)).float() * attn.scaling, -1)  # last row sees everything
    return probs.mean(0)[0]


def _pdrop_reference_kept(lm, x, strategy):
    """Run PDrop's prefill by hand (dense layers, renumbered positions) and return each stage's kept indices."""
    with torch.no_grad():
        h, pos = x, torch.arange(x.shape[1])
        visual = torch.full((x.shape[1],), -1)
        visual[PREFIX : PREFIX + N] = torch.arange(N)
        kept = []
        counts = strategy.stage_counts(N)
        for i, layer in enumerate(lm.layers):
            if i in strategy.layers:
                vis_local = (visual >= 0).nonzero()[:, 0]
                scores = _pdrop_scores(lm, h, pos, i)[vis_local]
                k = counts[strategy.layers.index(i)]
                top = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values
                kept.append(top)
                keep_mask = visual < 0
                keep_mask[vis_local[top]] = True
                idx = keep_mask.nonzero()[:, 0]
                h, visual = h[:, idx], visual[idx]
                pos = torch.arange(idx.numel())  # renumbered
            seq = h.shape[1]
            mask = torch.zeros(seq, seq).masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
            cos, sin = lm.rotary_emb(h, pos[None])
            h = layer(h, attention_mask=mask[None, None], position_embeddings=(cos, sin), position_ids=pos[None])
    return kept


def test_pdrop_keeps_what_its_own_layer_score_selects_and_decodes_like_a_recompute(llm):
    lm, head = llm
    strategy = PyramidDrop(ratio=0.5, layers=(1, 2, 3), num_layers=4)
    x, tokens, stats, logits = _generate(lm, head, strategy)
    ref_kept = _pdrop_reference_kept(lm, x, strategy)
    # stats.kept holds indices into pre.tokens; turn the hand-run local indices into those
    cur = torch.arange(N)
    for mine, local in zip(stats.kept, ref_kept, strict=True):
        cur = cur[local]
        assert torch.equal(mine, cur)
    counts = strategy.stage_counts(N)
    assert stats.visual_per_layer == [N, *counts]
    assert stats.kv_len_per_layer == [PREFIX + c + SUFFIX for c in (N, *counts)]  # earlier caches keep everything
    assert [r for r, _, reproj in stats.scoring] == [1, 1, 1] and all(reproj for *_, reproj in stats.scoring)
    # decoding over the pruned caches with PDrop's shifted positions == one forward with every stage applied
    local_stages = list(zip(strategy.layers, ref_kept, strict=True))
    ref = _reference(lm, head, x, tokens, local_stages, renumber=True)
    for step, row in enumerate(logits):
        torch.testing.assert_close(row, ref[step], rtol=1e-4, atol=1e-4)


def test_renumbering_changes_the_decode_and_keeping_positions_matches_its_own_reference(llm):
    lm, head = llm

    @dataclass(frozen=True)
    class Keep:
        positions: str
        ratio: float = 1.0
        name: str = "keep"

        @property
        def layer_specs(self):
            return (LayerSpec(layer=2, own_layer=True, positions=self.positions),)

        def pre_llm(self, video):  # pragma: no cover - not used at the LLM level
            raise NotImplementedError

        def in_llm(self, step):
            return torch.arange(0, step.visual.numel(), 3)

        def layer_counts(self, pre, num_layers):  # pragma: no cover
            raise NotImplementedError

    keep = torch.arange(0, N, 3)
    x, tok_r, _, log_r = _generate(lm, head, Keep("renumber"))
    _, tok_k, _, log_k = _generate(lm, head, Keep("keep"))
    ref_k = _reference(lm, head, x, tok_k, [(2, keep)], renumber=False)
    ref_r = _reference(lm, head, x, tok_r, [(2, keep)], renumber=True)
    for a, b in zip(log_k, ref_k, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(log_r, ref_r, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(log_k[0], log_r[0], atol=1e-4)  # the rule is not a no-op


def test_pdrop_ratio_one_equals_no_pruning(llm):
    lm, head = llm
    from prune.strategies.none import NoPruning

    _, base, _, base_logits = _generate(lm, head, NoPruning())
    _, toks, stats, logits = _generate(lm, head, PyramidDrop(ratio=1.0, layers=(1, 2, 3), num_layers=4))
    assert toks == base and stats.visual_per_layer == [N] * 4
    for a, b in zip(logits, base_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --- the merge contract --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedMerge:
    """Test strategy: at ``layer`` keep ``keep`` and merge the others as ``into``/``weights`` say."""

    keep: tuple[int, ...]
    into: tuple[int, ...]
    weights: tuple[float, ...]
    layer: int = 1
    prune_past_kv: bool = False
    mid_layer: bool = False
    ratio: float = 1.0
    name: str = "fixed_merge"

    @property
    def layer_specs(self):
        spec = LayerSpec(layer=self.layer, prune_past_kv=self.prune_past_kv, hidden=True, mid_layer=self.mid_layer)
        return (spec,)

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:  # pragma: no cover - LLM level only
        raise NotImplementedError

    def in_llm(self, step: LayerInput) -> LayerMerge:
        assert step.hidden is not None and step.hidden.shape[0] == step.visual.numel()
        return LayerMerge(torch.tensor(self.keep), torch.tensor(self.into), torch.tensor(self.weights))

    def layer_counts(self, pre, num_layers):  # pragma: no cover
        raise NotImplementedError


def _mean_merge(keep, n=N):
    """Every dropped token joins the survivor before it (the first survivor takes those before it); plain means."""
    keep_t = torch.tensor(keep)
    into = torch.searchsorted(keep_t, torch.arange(n), right=True) - 1
    into = into.clamp_min(0)
    sizes = torch.bincount(into, minlength=len(keep)).float()
    return tuple(into.tolist()), tuple((1.0 / sizes[into]).tolist())


def test_identity_merge_equals_no_merge(llm):
    lm, head = llm
    from prune.strategies.none import NoPruning

    _, base, _, base_logits = _generate(lm, head, NoPruning())
    ident = FixedMerge(tuple(range(N)), tuple(range(N)), (1.0,) * N)
    _, toks, stats, logits = _generate(lm, head, ident)
    assert toks == base and stats.visual_per_layer == [N] * 4
    for a, b in zip(logits, base_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("prune_past_kv", [False, True])
def test_merged_kv_decoding_equals_recompute_on_the_merged_sequence(llm, prune_past_kv):
    lm, head = llm
    keep = tuple(range(0, N, 4))
    into, weights = _mean_merge(keep)
    strategy = FixedMerge(keep, into, weights, layer=1, prune_past_kv=prune_past_kv)
    x, tokens, stats, logits = _generate(lm, head, strategy, steps=5)
    assert stats.visual_per_layer == [N, N, len(keep), len(keep)]
    ref = _reference(
        lm,
        head,
        x,
        tokens,
        [(2, torch.tensor(keep))],
        renumber=False,
        hide_from_new=prune_past_kv,
        merges={2: (torch.tensor(into), torch.tensor(weights))},
    )
    for step, row in enumerate(logits):
        torch.testing.assert_close(row, ref[step], rtol=1e-4, atol=1e-4)
    # and the merge matters: dropping without merging decodes differently (checked below with separators too)
    is_kept = torch.isin(torch.arange(N), torch.tensor(keep))
    drop = FixedMerge(keep, tuple(torch.tensor(into).where(is_kept, -1).tolist()), tuple(is_kept.float().tolist()))
    _, _, _, drop_logits = _generate(lm, head, drop, steps=1)
    assert not torch.allclose(drop_logits[0], logits[0], atol=1e-4)


def test_layer_merge_rejects_inconsistent_assignments():
    keep = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="sum to 1"):
        LayerMerge(keep, torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.4, 1.0]))
    with pytest.raises(ValueError, match="itself"):
        LayerMerge(keep, torch.tensor([1, 0, 0]), torch.tensor([0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="-1"):
        LayerMerge(keep, torch.tensor([0, 2, 1]), torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="sorted"):
        LayerMerge(torch.tensor([2, 0]), torch.tensor([1, 0, 0]), torch.tensor([1.0, 0.0, 1.0]))


def test_hieravid_layer_rules_schedule_the_same_counts_with_their_own_specs(llm):
    from prune.strategies.hieravid import HieraVid

    lm, head = llm
    fast = HieraVid(ratio=0.6, boundaries=(1, 2, 3), num_layers=4)
    pdrop = HieraVid(ratio=0.6, boundaries=(1, 2, 3), num_layers=4, layer_rule="pdrop")
    assert [s.layer for s in fast.layer_specs] == [0, 1, 2] and not any(s.own_layer for s in fast.layer_specs)
    assert [s.layer for s in pdrop.layer_specs] == [1, 2, 3]
    assert all(s.own_layer and s.positions == "renumber" for s in pdrop.layer_specs)
    _, _, stats_f, _ = _generate(lm, head, fast, steps=2)
    _, _, stats_p, _ = _generate(lm, head, pdrop, steps=2)
    pre = PreLLMOutput(torch.zeros(N, 1), torch.arange(N))
    assert tuple(stats_f.visual_per_layer) == tuple(stats_p.visual_per_layer) == fast.layer_counts(pre, 4)
    assert [r[2] for r in stats_f.scoring] == [False] * 3 and [r[2] for r in stats_p.scoring] == [True] * 3


# --- mid-layer stages and FrameFusion ------------------------------------------------------------------------------


def _split_layer(layer, h, mask, pos, lm):
    """One decoder layer in two halves: ``residual + attention``, then the MLP block (Llama and Qwen2 alike)."""
    cos, sin = lm.rotary_emb(h, pos[None])
    normed = layer.input_layernorm(h)
    attn = layer.self_attn(hidden_states=normed, attention_mask=mask, position_embeddings=(cos, sin))[0]
    mid = h + attn

    def mlp(x):
        return x + layer.mlp(layer.post_attention_layernorm(x))

    return mid, mlp


def _ff_prompt(lm, t=4, p=10, seed=0):
    """``t`` frames of ``p`` tokens: the first half of the positions nearly static across frames, the rest random."""
    g = torch.Generator().manual_seed(seed)
    d = lm.config.hidden_size
    ids = torch.randint(3, min(lm.config.vocab_size, 256), (PREFIX + SUFFIX,), generator=g)
    with torch.no_grad():
        text = lm.embed_tokens(ids)
    scale = text.std()
    video = torch.randn(t, p, d, generator=g)
    video[:, : p // 2] = torch.randn(p // 2, d, generator=g) + 0.05 * video[:, : p // 2]
    visual = (video * scale).reshape(t * p, d)
    x = torch.cat([text[:PREFIX], visual, text[PREFIX:]])[None]
    vis = torch.full((x.shape[1],), -1, dtype=torch.long)
    vis[PREFIX : PREFIX + t * p] = torch.arange(t * p)
    return x, vis, PreLLMOutput(visual, torch.arange(t * p), (p,) * t)


def _dense_stages(lm, head, strategy, x, pre, generated):
    """A dense forward over prompt + generated tokens that runs ``strategy``'s stages by hand, in spec order:
    own-layer stages before the layer, mid-layer stages after its attention; scores = the last prompt token's
    head-mean attention of that layer over the current sequence (the generated tokens never score)."""
    n_prompt = x.shape[1]
    with torch.no_grad():
        new = lm.embed_tokens(torch.tensor(generated[:-1]))[None]
        h = torch.cat([x, new], 1)
        total = h.shape[1]
        orig, pos = torch.arange(total), torch.arange(total)
        visual = torch.full((total,), -1)
        visual[PREFIX : PREFIX + pre.n] = torch.arange(pre.n)
        full_mask = torch.zeros(total, total).masked_fill(~torch.ones(total, total, dtype=torch.bool).tril(), -1e30)
        kinds = {s: "own" if s.own_layer else "mid" if s.mid_layer else "after" for s in strategy.layer_specs}
        specs = {(kind, s.layer): s for s, kind in kinds.items()}
        state: dict = {}
        kept: list[torch.Tensor] = []

        def stage(spec, h_now, layer_scores):
            vis_local = (visual >= 0).nonzero()[:, 0]
            step = LayerInput(spec.layer, layer_scores, visual[vis_local], pre, h_now[0, vis_local], state)
            result = strategy.in_llm(step)
            keep = result.keep if isinstance(result, LayerMerge) else result
            if isinstance(result, LayerMerge):
                member = result.into >= 0
                merged = torch.zeros(keep.numel(), h_now.shape[-1]).index_add_(
                    0, result.into[member], h_now[0, vis_local[member]] * result.weights[member, None]
                )
                h_now = h_now.clone()
                h_now[0, vis_local[keep]] = merged
            keep_mask = visual < 0
            keep_mask[vis_local[keep]] = True
            kept.append(visual[vis_local[keep]])
            return h_now, keep_mask.nonzero()[:, 0]

        def last_row_scores(layer_idx, h_in):
            layer = lm.layers[layer_idx]
            attn = layer.self_attn
            xn = layer.input_layernorm(h_in)[0]
            hd = attn.head_dim
            last = int((orig < n_prompt).nonzero()[-1])  # the last prompt token
            q = attn.q_proj(xn[last : last + 1]).view(1, -1, hd).transpose(0, 1)
            k = attn.k_proj(xn[: last + 1]).view(last + 1, -1, hd).transpose(0, 1)
            cos, sin = lm.rotary_emb(h_in, pos[None])
            q = q * cos[0, last : last + 1] + _rotate_half(q) * sin[0, last : last + 1]
            k = k * cos[0, : last + 1] + _rotate_half(k) * sin[0, : last + 1]
            k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            probs = torch.softmax((q @ k.transpose(1, 2)).float() * attn.scaling, -1).mean(0)[0]
            return probs[(visual[: last + 1] >= 0).nonzero()[:, 0]]

        for i, layer in enumerate(lm.layers):
            if ("own", i) in specs:
                scores = last_row_scores(i, h)
                h, idx = stage(specs[("own", i)], h, scores)
                h, orig, pos, visual = h[:, idx], orig[idx], pos[idx], visual[idx]
            mask = full_mask[orig][:, orig][None, None]
            if ("mid", i) in specs:
                scores = last_row_scores(i, h)
                mid, mlp = _split_layer(layer, h, mask, pos, lm)
                mid, idx = stage(specs[("mid", i)], mid, scores)
                h, orig, pos, visual = mlp(mid[:, idx]), orig[idx], pos[idx], visual[idx]
            else:
                cos, sin = lm.rotary_emb(h, pos[None])
                h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
        logits = head(lm.norm(h))[0].float()
    return kept, logits[-len(generated) :]


def test_framefusion_in_the_adapter_equals_its_stages_run_by_hand(llm):
    from prune.strategies.framefusion import FrameFusion

    lm, head = llm
    strategy = FrameFusion(ratio=0.5, num_layers=4)
    x, vis, pre = _ff_prompt(lm)
    pruned = PrunedLM(lm, head, strategy)
    try:
        tokens, stats, logits = pruned.generate(x, vis, pre, max_new_tokens=4, return_logits=True)
    finally:
        pruned.remove()
    kept, ref = _dense_stages(lm, head, strategy, x, pre, tokens)
    assert len(stats.kept) == len(kept) == 4
    for mine, theirs in zip(stats.kept, kept, strict=True):
        assert torch.equal(mine, theirs)
    for step, row in enumerate(logits):
        torch.testing.assert_close(row, ref[step], rtol=1e-4, atol=1e-4)
    # the static half merged before layer 0, and a later stage pruned: fewer tokens, layer average at the budget
    counts = stats.visual_per_layer
    assert counts[0] < pre.n and counts[-1] < counts[0]
    assert abs(sum(counts) / (4 * pre.n) - 0.5) <= 0.02


def test_mid_layer_merge_caches_the_unmerged_layer_and_ratio_one_is_none(llm):
    from prune.strategies.framefusion import FrameFusion
    from prune.strategies.none import NoPruning

    lm, head = llm
    x, vis, pre = _ff_prompt(lm)
    outs = []
    for strategy in (NoPruning(), FrameFusion(ratio=1.0, num_layers=4)):
        pruned = PrunedLM(lm, head, strategy)
        try:
            outs.append(pruned.generate(x, vis, pre, max_new_tokens=4, return_logits=True))
        finally:
            pruned.remove()
    (base, _, base_logits), (toks, stats, logits) = outs
    assert toks == base and stats.visual_per_layer == [pre.n] * 4
    for a, b in zip(logits, base_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    pruned = PrunedLM(lm, head, FrameFusion(ratio=0.5, num_layers=4))
    try:
        _, stats, _ = pruned.generate(x, vis, pre, max_new_tokens=1)
    finally:
        pruned.remove()
    # a mid-layer stage in layer l leaves layer l's cache whole: each layer caches what entered it
    assert stats.kv_len_per_layer == [PREFIX + c + SUFFIX for c in stats.visual_per_layer]


@pytest.mark.parametrize("layer", [0, 2])
def test_mid_layer_merge_equals_merging_between_attention_and_mlp_by_hand(llm, layer):
    lm, head = llm
    x, vis, pre = _ff_prompt(lm)
    keep = tuple(range(0, pre.n, 3))
    into, weights = _mean_merge(keep, pre.n)
    strategy = FixedMerge(keep, into, weights, layer=layer, mid_layer=True)
    pruned = PrunedLM(lm, head, strategy)
    try:
        tokens, stats, logits = pruned.generate(x, vis, pre, max_new_tokens=4, return_logits=True)
    finally:
        pruned.remove()
    kept, ref = _dense_stages(lm, head, strategy, x, pre, tokens)
    assert torch.equal(stats.kept[0], kept[0]) and stats.visual_per_layer[layer + 1] == len(keep)
    assert stats.kv_len_per_layer[layer] == x.shape[1]  # its attention ran before the merge
    for step, row in enumerate(logits):
        torch.testing.assert_close(row, ref[step], rtol=1e-4, atol=1e-4)


# --- HoliTom's inner merge ------------------------------------------------------------------------------------------


def _holitom_by_hand(lm, head, x, generated, merge_layer, merge_ratio):
    """HoliTom's ``Qwen2Model_holitom.forward`` by hand over prompt + generated tokens: layer ``k - 1``'s attention of
    the last prompt token (head mean) keeps ``round(n * (1 - r))`` visual tokens; every other visual token is averaged
    into its most cosine-similar survivor one by one in index order (``h = (h + h_t) / 2``, the official loop); the
    survivors keep their positions, the generated tokens see every token in the layers before ``k``."""
    s = x.shape[1]
    with torch.no_grad():
        new = lm.embed_tokens(torch.tensor(generated[:-1]))[None]
        h = torch.cat([x, new], 1)
        total = h.shape[1]
        orig = pos = torch.arange(total)
        mask_full = torch.zeros(total, total).masked_fill(~torch.ones(total, total, dtype=torch.bool).tril(), -1e30)
        keep, entering = None, {}
        for i, layer in enumerate(lm.layers):
            if i == merge_layer:  # layer k - 1's own attention: its q/k on the states that entered it
                scores = _pdrop_scores(lm, entering[i - 1][:, :s], pos[:s], i - 1)[PREFIX : PREFIX + N]
                k = round(N * (1 - merge_ratio))
                keep = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values
                vis = h[0, PREFIX : PREFIX + N].clone()
                absorbed = [t for t in range(N) if t not in set(keep.tolist())]
                unit = torch.nn.functional.normalize(vis, dim=-1)
                for t in absorbed:  # similarities from the states entering layer k, before any merge
                    j = int(keep[int((unit[keep] @ unit[t]).argmax())])
                    vis[j] = (vis[j] + vis[t]) / 2
                h = h.clone()
                h[0, PREFIX : PREFIX + N] = vis
                idx = torch.cat([torch.arange(PREFIX), PREFIX + keep, torch.arange(PREFIX + N, total)])
                h, orig, pos = h[:, idx], orig[idx], pos[idx]
            entering[i] = h
            mask = mask_full[orig][:, orig][None, None]
            cos, sin = lm.rotary_emb(h, pos[None])
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
        logits = head(lm.norm(h))[0].float()
    return keep, logits[-len(generated) :]


@pytest.mark.parametrize("merge_layer", [1, 3])
def test_holitom_merge_decodes_like_the_official_loop_recomputed(llm, merge_layer):
    """On every tiny backbone's LLM: HoliTom's inner merge through the adapter (scores, survivors, sequential
    averaging as LayerMerge weights, kept positions, full caches before layer k) decodes the same logits as the
    official loop recomputed on the merged sequence."""
    from prune.strategies.holitom import HoliTom

    lm, head = llm
    strategy = HoliTom(ratio=0.3, merge_layer=merge_layer, merge_ratio=0.5)
    x, vis, _ = _prompt(lm)
    pre = PreLLMOutput(x[0, PREFIX : PREFIX + N], torch.arange(2 * N) // 2)  # an outer stage that pruned (n < N)
    pruned = PrunedLM(lm, head, strategy)
    try:
        tokens, stats, logits = pruned.generate(x, vis, pre, max_new_tokens=5, return_logits=True)
    finally:
        pruned.remove()
    keep, ref = _holitom_by_hand(lm, head, x, tokens, merge_layer, 0.5)
    assert stats.visual_per_layer == [N] * merge_layer + [N // 2] * (4 - merge_layer)
    assert torch.equal(stats.kept[0], keep)
    for step, row in enumerate(logits):
        torch.testing.assert_close(row, ref[step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prune_past_kv", [False, True])
def test_merged_kv_decoding_with_separators_inside_the_visual_span(llm, prune_past_kv):
    """LLaVA-Video's layout after pre-LLM pruning: a newline after every frame's tokens, inside the visual span. The
    separators stay (never merged), and decoding over the merged cache equals one forward over the merged sequence."""
    lm, head = llm
    x0, _, pre = _prompt(lm)
    per_frame = 10
    newline = x0[0, :1]  # any fixed embedding stands in for image_newline
    parts, vis = [x0[0, :PREFIX]], [-1] * PREFIX
    for f in range(N // per_frame):
        parts += [x0[0, PREFIX + f * per_frame : PREFIX + (f + 1) * per_frame], newline]
        vis += list(range(f * per_frame, (f + 1) * per_frame)) + [-1]
    parts.append(x0[0, PREFIX + N :])
    vis += [-1] * SUFFIX
    x, vis = torch.cat(parts)[None], torch.tensor(vis)
    keep = tuple(range(0, N, 4))
    into, weights = _mean_merge(keep)
    strategy = FixedMerge(keep, into, weights, layer=1, prune_past_kv=prune_past_kv)
    pruned = PrunedLM(lm, head, strategy)
    try:
        tokens, stats, logits = pruned.generate(x, vis, pre, max_new_tokens=5, return_logits=True)
    finally:
        pruned.remove()
    assert stats.visual_per_layer == [N, N, len(keep), len(keep)]
    merges = {2: (torch.tensor(into), torch.tensor(weights))}
    ref = _reference(lm, head, x, tokens, [(2, torch.tensor(keep))], False, prune_past_kv, merges, vis=vis)
    for step, row in enumerate(logits):
        torch.testing.assert_close(row, ref[step], rtol=1e-4, atol=1e-4)
