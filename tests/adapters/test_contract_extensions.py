"""Contract extensions on the tiny backbones: vision-side inputs, original positions, the decode-time stage."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prune.adapters.llava_onevision import VIDEO_TOKEN_ID, LlavaOnevisionAdapter, tiny_llava_onevision
from prune.adapters.pllava import IMAGE_TOKEN_ID, PllavaAdapter, tiny_pllava
from prune.adapters.st_llm import PLACEHOLDER_ID, StLlmAdapter, tiny_st_llm
from prune.adapters.vision import attention_maps, pooling_head_outputs, siglip_pooling_head
from prune.api import DecodeInput, DecodeSpec, LayerSpec, PreLLMOutput, VideoTokens
from prune.strategies.none import NoPruning

T = 4
PREFIX = [151644, 872, 198]
SUFFIX = [198, 3838, 374, 279, 1697, 3730, 30, 198, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def ov():
    return tiny_llava_onevision(seed=0)


@pytest.fixture(scope="module")
def video():
    return torch.randn(1, T, 3, 384, 384, generator=torch.Generator().manual_seed(1))


def _ids():
    return torch.tensor([PREFIX + [VIDEO_TOKEN_ID] + SUFFIX])


@dataclass(frozen=True)
class Probe:
    """Test strategy: declares vision inputs, records what it received, keeps every ``stride``-th token."""

    vision_inputs: frozenset = frozenset()
    stride: int = 1
    positions: str = "contiguous"
    ratio: float = 1.0
    name: str = "probe"
    seen: list = None  # type: ignore[assignment]

    @property
    def layer_specs(self):
        return ()

    def pre_llm(self, video: VideoTokens) -> PreLLMOutput:
        if self.seen is not None:
            self.seen.append(video)
        t, p, d = video.tokens.shape
        keep = torch.arange(0, t * p, self.stride)
        assignment = torch.full((t * p,), -1, dtype=torch.long)
        assignment[keep] = torch.arange(keep.numel())
        return PreLLMOutput(video.tokens.reshape(t * p, d)[keep], assignment, positions=self.positions)

    def in_llm(self, step):
        return torch.arange(step.scores.numel())

    def layer_counts(self, pre, num_layers):
        return (pre.n,) * num_layers


# --- vision-side inputs ----------------------------------------------------------------------------------------------


def test_video_tokens_validate_vision_fields():
    x = torch.randn(2, 4, 8)
    VideoTokens(x, (2, 2), frame_global=torch.randn(2, 5), frame_patch_attn=torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"frame_patch_attn must be \[T, P\]"):
        VideoTokens(x, (2, 2), frame_patch_attn=torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"frame_patch_keys must be \[T, P, K\]"):
        VideoTokens(x, (2, 2), frame_patch_keys=torch.rand(2, 4))
    with pytest.raises(ValueError, match="finite"):
        VideoTokens(x, (2, 2), frame_head_attn=torch.full((2, 4), float("nan")))


def test_attention_maps_match_hf_eager_attention(ov, video):
    """``frame_patch_attn`` before pooling is HF's own eager attention of the layer, mean over heads and rows."""
    tower = ov.model.vision_tower
    layer = tower.encoder.layers[-1]
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(video[0], output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    x = layer.layer_norm1(out.hidden_states[-2])
    maps = attention_maps(layer.self_attn, x, cls=False)
    torch.testing.assert_close(maps["received"], out.attentions[-1].mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
    keys = layer.self_attn.k_proj(x).view(T, 729, 2, 16).mean(dim=2)
    torch.testing.assert_close(maps["keys"], keys, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["onevision", "video"])
def test_ov_fills_declared_fields_pooled_like_features(ov, video, layout):
    seen = []
    names = frozenset({"frame_patch_attn", "frame_patch_keys", "frame_global", "frame_head_attn"})
    head = siglip_pooling_head(ov.config.vision_config)
    adapter = LlavaOnevisionAdapter(ov, Probe(names, seen=seen), layout, num_frames=T, pooling_head=head)
    try:
        adapter.generate(_ids(), video, max_new_tokens=1)
    finally:
        adapter.llm.remove()
    got = seen[0]
    p = 196 if layout == "onevision" else 169
    assert got.frame_patch_attn.shape == (T, p) and got.frame_patch_keys.shape == (T, p, 16)
    assert got.frame_global.shape == (T, 32) and got.frame_head_attn.shape == (T, p)
    # the head's attention and the patch attention are distributions over the 729 patches before pooling
    with torch.no_grad():
        feats = ov.model.vision_tower(video[0]).last_hidden_state
    pooled, attn = pooling_head_outputs(head, feats)
    torch.testing.assert_close(attn.sum(-1), torch.ones(T))
    torch.testing.assert_close(got.frame_global, pooled)
    torch.testing.assert_close(got.frame_head_attn, adapter._pool(attn.unsqueeze(-1)).squeeze(-1))
    assert adapter.vision_flops > 0


def test_fields_are_absent_unless_declared(ov, video):
    seen = []
    adapter = LlavaOnevisionAdapter(ov, Probe(seen=seen), "onevision", num_frames=T)
    try:
        out = adapter.generate(_ids(), video, max_new_tokens=1)
    finally:
        adapter.llm.remove()
    assert all(getattr(seen[0], n) is None for n in ("frame_global", "frame_head_attn", "frame_patch_attn"))
    assert out.vision_flops == 0.0


def test_pooling_head_is_required_where_the_vlm_drops_it(ov):
    with pytest.raises(ValueError, match="pooling head"):
        LlavaOnevisionAdapter(ov, Probe(frozenset({"frame_global"})), "onevision", num_frames=T)


def test_unknown_vision_input_is_refused(ov):
    with pytest.raises(ValueError, match="unknown vision_inputs"):
        LlavaOnevisionAdapter(ov, Probe(frozenset({"frame_cls"})), "onevision", num_frames=T)


def test_pllava_stands_in_cls_attention_and_pooled_output():
    model = tiny_pllava(seed=0)
    pix = torch.randn(1, 16, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    seen = []
    names = frozenset({"frame_patch_attn", "frame_head_attn", "frame_global", "frame_patch_keys"})
    adapter = PllavaAdapter(model, Probe(names, seen=seen))
    try:
        adapter.generate(torch.tensor([[1, 2, IMAGE_TOKEN_ID, 3, 4]]), pix, max_new_tokens=1)
    finally:
        adapter.llm.remove()
    got = seen[0]
    assert got.frame_patch_attn.shape == (16, 144) and got.frame_head_attn.shape == (16, 144)
    with torch.no_grad():
        out = model.model.vision_tower(pix[0], output_hidden_states=True)
    torch.testing.assert_close(got.frame_global, out.pooler_output)
    # the CLS row over 576 patches sums to 1 minus the CLS's self-attention; the 2x2 average keeps the mean
    assert bool((got.frame_head_attn.sum(-1) * 4 <= 1.0 + 1e-5).all())


def test_st_llm_refuses_vision_inputs_with_the_reason():
    model = tiny_st_llm(seed=0)
    with pytest.raises(ValueError, match="Q-Former"):
        StLlmAdapter(model, Probe(frozenset({"frame_patch_attn"})), num_frames=T)


# --- original positions ----------------------------------------------------------------------------------------------


def _positions_seen(adapter, run):
    seen = []
    hook = adapter.llm.lm.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"][0].clone()), with_kwargs=True
    )
    try:
        run()
    finally:
        hook.remove()
        adapter.llm.remove()
    return seen


@pytest.mark.parametrize("layout", ["onevision", "video"])
def test_original_positions_keep_the_unpruned_ids(ov, video, layout):
    adapter = LlavaOnevisionAdapter(ov, Probe(stride=3, positions="original"), layout, num_frames=T)
    seen = _positions_seen(adapter, lambda: adapter.generate(_ids(), video, max_new_tokens=2))
    prefill, decode = seen[0], seen[1]
    n = len(PREFIX)
    if layout == "onevision":
        kept = torch.arange(0, T * 196, 3)
        expected = torch.cat([torch.arange(n), kept + n, torch.tensor([n + T * 196])])
        full = n + T * 196 + 1 + len(SUFFIX)
    else:
        kept = torch.arange(0, T * 169, 3)
        t, r, c = kept // 169, (kept % 169) // 13, kept % 13
        newline = []  # one newline per frame at the position of that frame's last row newline
        for f in range(T):
            newline.append(f * 13 * 14 + 12 * 14 + 13)
        body = sorted((t * 182 + r * 14 + c).tolist() + newline)
        expected = torch.cat([torch.arange(n), torch.tensor(body) + n])
        full = n + T * 182 + len(SUFFIX)
    expected = torch.cat([expected, torch.arange(full - len(SUFFIX), full)])
    assert torch.equal(prefill, expected)
    assert decode.tolist() == [full]


def test_original_positions_on_the_identity_equal_none(ov, video):
    a = LlavaOnevisionAdapter(ov, Probe(positions="original"), "video", num_frames=T)
    b = LlavaOnevisionAdapter(ov, NoPruning(), "video", num_frames=T)
    try:
        x = a.generate(_ids(), video, max_new_tokens=4, return_logits=True)
        y = b.generate(_ids(), video, max_new_tokens=4, return_logits=True)
    finally:
        a.llm.remove()
        b.llm.remove()
    assert x.tokens == y.tokens
    torch.testing.assert_close(x.logits[0], y.logits[0])


def test_original_positions_change_the_answer_of_a_pruned_prompt(ov, video):
    outs = []
    for positions in ("contiguous", "original"):
        adapter = LlavaOnevisionAdapter(ov, Probe(stride=2, positions=positions), "onevision", num_frames=T)
        try:
            outs.append(adapter.generate(_ids(), video, max_new_tokens=1, return_logits=True).logits[0])
        finally:
            adapter.llm.remove()
    assert not torch.allclose(outs[0], outs[1])


def test_pllava_and_st_llm_honour_original_positions():
    model = tiny_pllava(seed=0)
    pix = torch.randn(1, 16, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    adapter = PllavaAdapter(model, Probe(stride=4, positions="original"))
    seen = _positions_seen(
        adapter, lambda: adapter.generate(torch.tensor([[1, 2, IMAGE_TOKEN_ID, 3, 4]]), pix, max_new_tokens=1)
    )
    assert torch.equal(seen[0], torch.cat([torch.arange(2), torch.arange(0, 2304, 4) + 2, torch.tensor([2306, 2307])]))
    st = tiny_st_llm(seed=0)
    adapter = StLlmAdapter(st, Probe(stride=4, positions="original"), num_frames=T)
    pix = torch.randn(1, T, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[2, PLACEHOLDER_ID, 5, 6]])
    seen = _positions_seen(
        adapter, lambda: adapter.generate(ids, pix, max_new_tokens=1, qformer_input_ids=torch.tensor([[101, 102]]))
    )
    assert torch.equal(
        seen[0], torch.cat([torch.tensor([0]), torch.arange(0, T * 32, 4) + 1, torch.tensor([129, 130])])
    )


# --- the decode-time stage -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeKeep:
    """Test strategy: no prefill pruning; at every decode step keep the given visual tokens (``None``: all)."""

    keep: tuple[int, ...] | None
    layer: int = 1
    evict: bool = False
    ratio: float = 1.0
    name: str = "decode_keep"
    calls: list = None  # type: ignore[assignment]

    @property
    def layer_specs(self):
        return ()

    @property
    def decode_spec(self):
        return DecodeSpec(layer=self.layer, evict=self.evict)

    def pre_llm(self, video):
        return NoPruning().pre_llm(video)

    def in_llm(self, step):
        return torch.arange(step.scores.numel())

    def in_decode(self, step: DecodeInput):
        if self.calls is not None:
            self.calls.append(step)
        if self.keep is None:
            return None
        return torch.tensor(self.keep)

    def layer_counts(self, pre, num_layers):
        return (pre.n,) * num_layers


def _gen(model, strategy, video, n=5):
    adapter = LlavaOnevisionAdapter(model, strategy, "onevision", num_frames=T)
    try:
        return adapter.generate(_ids(), video, max_new_tokens=n, return_logits=True)
    finally:
        adapter.llm.remove()


def test_decode_stage_keeping_everything_equals_none(ov, video):
    calls = []
    x = _gen(ov, DecodeKeep(None, calls=calls), video)
    y = _gen(ov, NoPruning(), video)
    assert x.tokens == y.tokens
    for a, b in zip(x.logits, y.logits, strict=True):
        torch.testing.assert_close(a, b)
    assert [c.step for c in calls] == [1, 2, 3, 4] and calls[0].previous is None
    torch.testing.assert_close(calls[1].previous, calls[0].scores)
    # scores: the new token's head-mean attention at layer 1 over the T*196 visual entries of the cache
    assert calls[0].scores.shape == (T * 196,) and 0 < float(calls[0].scores.sum()) <= 1.0
    assert torch.equal(calls[0].visual, torch.arange(T * 196))


def test_decode_stage_gathers_for_later_layers_only(ov, video):
    keep = tuple(range(0, T * 196, 7))
    out = _gen(ov, DecodeKeep(keep), video)
    seq = out.llm.seq_len
    text = seq - T * 196
    for i, keys in enumerate(out.llm.decode_keys, start=1):
        assert keys[:2] == [seq + i] * 2  # layers 0..1 (the scoring layer) attend the whole cache
        assert keys[2:] == [text + len(keep) + i] * 2  # later layers: text, the kept visual entries, new tokens
    assert out.llm.decode_visual == [len(keep)] * 4
    assert out.llm.kv_bytes_end > out.llm.kv_bytes  # the cache keeps every entry (gather, not eviction)
    assert out.llm.decode_scoring == [seq + i for i in range(1, 5)]
    full = _gen(ov, NoPruning(), video)
    assert not torch.allclose(out.logits[1], full.logits[1])  # the second token is decoded over fewer keys
    torch.testing.assert_close(out.logits[0], full.logits[0])  # the first comes from the unpruned prefill


def test_decode_eviction_equals_gathering_the_same_set(ov, video):
    keep = tuple(range(0, T * 196, 5))
    gathered = _gen(ov, DecodeKeep(keep), video)
    evicted = _gen(ov, DecodeKeep(keep, evict=True), video)
    assert gathered.tokens == evicted.tokens
    for a, b in zip(gathered.logits, evicted.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert evicted.llm.kv_bytes_end < gathered.llm.kv_bytes_end


def test_decode_layer_outside_the_llm_is_refused(ov):
    with pytest.raises(ValueError, match="valid: 0..2"):
        LlavaOnevisionAdapter(ov, DecodeKeep(None, layer=3), "onevision", num_frames=T)


def test_decode_stage_with_in_llm_pruning_tracks_the_pruned_cache(ov, video):
    """A prefill stage that cut the shallow cache and a decode stage together: entries stay aligned."""

    @dataclass(frozen=True)
    class Both(DecodeKeep):
        @property
        def layer_specs(self):
            return (LayerSpec(layer=0, prune_past_kv=True),)

        def in_llm(self, step):
            return torch.arange(0, step.scores.numel(), 2)

    calls = []
    _gen(ov, Both(None, calls=calls), video, n=3)
    assert torch.equal(calls[0].visual, torch.arange(0, T * 196, 2))


def test_decode_gather_under_eager_agrees_with_sdpa(ov, video):
    """Eager builds one 4-D decode mask for all layers; the gathered layers slice it to their keys."""
    keep = tuple(range(0, T * 196, 3))
    eager = tiny_llava_onevision(seed=0, attn_implementation="eager")
    a = _gen(ov, DecodeKeep(keep), video, n=4)
    b = _gen(eager, DecodeKeep(keep), video, n=4)
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["visionzip", "vidcom2", "fastvid", "dycoke"])
@pytest.mark.parametrize("layout", ["onevision", "video"])
def test_ratio_one_reproduces_none(ov, video, name, layout):
    """The acceptance rule ratio=1.0 == none, end to end (pre-LLM, positions, decode-time stage)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"ratio": 1.0, "prune": OmegaConf.load(f"configs/prune/{name}.yaml")})
    head = siglip_pooling_head(ov.config.vision_config)
    outs = []
    for strategy in (instantiate(cfg.prune), NoPruning()):
        adapter = LlavaOnevisionAdapter(ov, strategy, layout, num_frames=T, pooling_head=head)
        try:
            outs.append(adapter.generate(_ids(), video, max_new_tokens=4, return_logits=True))
        finally:
            adapter.llm.remove()
    assert outs[0].tokens == outs[1].tokens
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["onevision", "video"])
def test_holitom_ratio_one_reproduces_none(ov, video, layout):
    """ratio=1.0 == none end to end for HoliTom (no static merge, no inner merge, positions untouched)."""
    from prune.strategies.holitom import HoliTom

    outs = []
    for strategy in (HoliTom(ratio=1.0, merge_layer=3), NoPruning()):
        adapter = LlavaOnevisionAdapter(ov, strategy, layout, num_frames=T)
        try:
            outs.append(adapter.generate(_ids(), video, max_new_tokens=4, return_logits=True))
        finally:
            adapter.llm.remove()
    assert outs[0].tokens == outs[1].tokens
    assert outs[0].llm.visual_per_layer == outs[1].llm.visual_per_layer
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
