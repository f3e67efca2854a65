"""In-LLM pruning for Hugging Face decoder-only LLMs (Qwen2, Llama) in transformers 5.x, without forking a model file.

What a strategy's :class:`~prune.api.LayerSpec` asks for is done with four mechanisms (backbones.md §2b):

1. **A registered attention kernel** (``vidprune_sdpa``, ``vidprune_eager``, ``vidprune_flash_attention_2``) wraps the
   stock kernel and returns its output unchanged. At a scoring layer, during prefill only, it also computes the
   attention of the query rows the spec names over the whole sequence, never the ``S x S`` matrix
   (:func:`prune.attention.visual_scores`): FastV one row, PruneVid the rows after the video. Pre-RoPE scores
   (PruneVid) re-project the layer's normalised input with its own ``q_proj``/``k_proj``, exactly the official
   ``query_states``/``key_states`` before ``apply_rotary_pos_emb``. Own-layer stages (PyramidDrop) are scored in
   the layer's pre-hook instead, before it runs: its input norm, ``q_proj``/``k_proj`` and RoPE at the current
   positions.
2. **Decoder-layer pre-hooks** ask the strategy (with the visual hidden states when the spec wants them), drop the
   pruned tokens from the hidden states at the first layer that sees the reduced sequence, write merged states into
   the survivors' slots (:class:`~prune.api.LayerMerge`), and slice RoPE ``(cos, sin)``, ``position_ids`` and any
   4-D mask at every later layer. Survivors keep their original positions (gaps allowed), or the sequence is
   renumbered contiguously (``positions="renumber"``); a merged token sits at its survivor's position.
   A mid-layer stage (FrameFusion) is decided in a forward hook on the layer's attention instead: the survivors'
   attention output is rewritten so that ``residual + attention`` is their merged state, the MLP (per token) runs on
   it, and the other tokens leave at the next layer's pre-hook; that layer's cache holds every token, as its
   attention ran before the merge.
3. **KV-cache edits**: with ``prune_past_kv`` the caches of the layers before the drop are index-selected to the
   survivors (PruneVid); otherwise they keep every token (FastV's in-place variant). Absorbed tokens count as
   dropped; the survivors' cached entries before the merge are those of their own unmerged states.
4. **Decode positions**: :meth:`PrunedLM.generate`'s own greedy loop passes ``position_ids`` explicitly: decode step
   ``i`` sits at position ``S + i`` (``S`` = unpruned prefill length), as FastV and PruneVid's ``original_number``
   do, whatever the pruned cache length. In layers after a renumbering stage the pre-hook moves it down by the
   tokens the renumbering removed (PyramidDrop's decode-time ``position_ids`` update), recomputing RoPE there.

The caller may give the prefill its own (gapped) position ids (a pre-LLM output with ``positions="original"``);
decode then continues after the last prompt position.

A strategy with a :class:`~prune.api.DecodeSpec` gets a decode-time stage through the same kernel: at every decode
step, at the spec's layer, the new token's attention over the cache is scored and ``strategy.in_decode`` picks the
visual entries that layers ``> layer`` attend to in that step (the kernel gathers those keys and values, as DyCoke's
``PrunableDynamicCache`` does), or evicts the others from those layers' caches for good (``evict=True``). The keys
each layer attended at every step are recorded for the decode FLOPs.

Shape legend: ``S`` prefill length, ``D`` hidden size, ``H`` heads, ``n`` visual tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prune.api import (
    DecodeInput,
    DecodeSpec,
    LayerInput,
    LayerMerge,
    PreLLMOutput,
    Strategy,
    decode_spec,
    kept_indices,
)
from prune.attention import query_rows, visual_scores

__all__ = [
    "Generation",
    "PrefillStats",
    "PrunedLM",
    "SCORING_KERNELS",
    "StageClock",
    "register_scoring_kernels",
]

# Stock kernel name -> our wrapper's name. The mask function of the stock kernel is reused under the new name, or
# create_causal_mask would not know how to build masks for it.
SCORING_KERNELS = {
    "sdpa": "vidprune_sdpa",
    "eager": "vidprune_eager",
    "flash_attention_2": "vidprune_flash_attention_2",
}


def _scoring_wrapper(base):
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        handle = getattr(module, "_vidprune", None)
        if handle is not None:
            handle._maybe_score(module, query, key)
            key, value, attention_mask = handle._decode_select(module, query, key, value, attention_mask)
        return base(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    return attention


def register_scoring_kernels() -> None:
    """Register the ``vidprune_*`` attention kernels with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for stock, ours in SCORING_KERNELS.items():
        base = AttentionInterface._global_mapping.get(stock)
        if stock == "eager":
            from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward as base
        if base is None:  # flash-attn not installed
            continue
        AttentionInterface.register(ours, _scoring_wrapper(base))
        mask = AttentionMaskInterface._global_mapping.get(stock)
        if mask is not None:
            AttentionMaskInterface.register(ours, mask)


@dataclass
class PrefillStats:
    """What one prefill did.

    Attributes:
        seq_len: unpruned prefill length ``S``.
        visual_per_layer: visual tokens each decoder layer processed.
        kv_len_per_layer: KV-cache length of every layer after prefill.
        kv_bytes: bytes of all key and value tensors after prefill.
        prefill_s: wall time of the prefill forward up to the first token's logits.
        decode_s: wall time of the decode steps.
        new_tokens: tokens generated.
        kept: for each in-LLM stage, ``[k]`` indices into ``PreLLMOutput.tokens`` of the survivors.
        tokens_per_layer: whole sequence length (text + separators + visual) each layer processed.
        scoring: per in-LLM stage, ``(query rows, keys, reprojected)`` of the extra scoring work
            (:func:`prune.flops.scoring_flops`).
        decode_keys: with a decode-time stage, per decode step the keys every layer attended (else empty).
        decode_scoring: with a decode-time stage, per decode step the keys of the one scoring row.
        decode_visual: with a decode-time stage, per decode step the visual entries the pruned layers attended.
        kv_bytes_end: bytes of all key and value tensors after decoding.
    """

    seq_len: int
    visual_per_layer: list[int]
    kv_len_per_layer: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    kept: list[Tensor] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    scoring: list[tuple[int, int, bool]] = field(default_factory=list)
    decode_keys: list[list[int]] = field(default_factory=list)
    decode_scoring: list[int] = field(default_factory=list)
    decode_visual: list[int] = field(default_factory=list)
    kv_bytes_end: int = 0


@dataclass
class Generation:
    """One sample's output and the per-sample stats the harness records.

    Attributes:
        tokens: generated token ids (greedy).
        visual_in: visual tokens of the unpruned grid (``T·h·w``; separators excluded).
        visual_pre_llm: visual tokens entering the LLM.
        separators: newline tokens in the visual span.
        llm: prefill stats: visual tokens per layer, KV length and bytes after prefill, prefill and decode time.
        timings: seconds per stage: ``vision`` (tower + projector + pooling), ``pre_llm``, ``prefill``, ``decode``.
        logits: ``[V]`` logits of every generated token when asked for.
        pre: the pre-LLM output (its ``assignment`` maps every input token to its output token; with
            ``llm.kept`` it tells which input tokens survive each stage, for pictures of the selection).
        vision_flops: FLOPs of the vision-side inputs computed for the strategy (``VideoTokens.frame_*``), beyond
            the tower's normal forward.
    """

    tokens: list[int]
    visual_in: int
    visual_pre_llm: int
    separators: int
    llm: PrefillStats
    timings: dict[str, float]
    logits: list[Tensor] = field(default_factory=list)
    pre: PreLLMOutput | None = None
    vision_flops: float = 0.0


@dataclass
class _Run:
    """Mutable per-sample prefill state, alive only during one prefill."""

    pre: PreLLMOutput
    seq_len: int
    cur: Tensor  # [S_cur] original positions of the tokens currently in the sequence
    pos: Tensor  # [S_cur] the RoPE positions they have now (== cur unless a stage renumbered)
    visual: Tensor  # [S_cur] long: index into pre.tokens of each current token, -1 for text and separators
    counts: list[int]
    cache: object
    lengths: list[int] = field(default_factory=list)
    scoring: list[tuple[int, int, bool]] = field(default_factory=list)
    # first layer (or ("mid", layer)) -> (spec, scores [n_cur], vis_local), or ("drop", ...) decided mid-layer
    pending: dict = field(default_factory=dict)
    layer_pos: dict[int, Tensor] = field(default_factory=dict)  # original positions cached by each layer
    last_pos: dict[int, int] = field(default_factory=dict)  # RoPE position of the last prompt token in each layer
    renumbered: bool = False
    state: dict = field(default_factory=dict)  # the strategy's per-sample scratch (LayerInput.state)
    layer_input: Tensor | None = None  # [1, S_cur, D] input of the current layer, for mid-layer stages
    attn_input: Tensor | None = None
    kept: list[Tensor] = field(default_factory=list)
    gapped: bool = False  # the prefill's own position ids have gaps (positions="original")


@dataclass
class _Decode:
    """Mutable decode-time state of one sample (strategies with a :class:`~prune.api.DecodeSpec`)."""

    spec: DecodeSpec
    pre: PreLLMOutput
    cache: object
    entries: list[Tensor]  # per layer, [kv_len] long: index into pre.tokens of each cached entry, -1 for text
    step: int = 0
    chosen: Tensor | None = None  # visual entries (indices into pre.tokens) attended by layers > spec.layer this step
    previous: Tensor | None = None
    keys: list[list[int]] = field(default_factory=list)
    scoring: list[int] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)


class PrunedLM:
    """A decoder-only LLM with a strategy's in-LLM stages installed.

    Args:
        language_model: the decoder stack (``Qwen2Model``, ``LlamaModel``): ``embed_tokens``, ``layers``, ``norm``,
            ``rotary_emb`` and a config with ``_attn_implementation``.
        lm_head: the output projection.
        strategy: the pruning method.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, strategy: Strategy) -> None:
        self.lm, self.lm_head, self.strategy = language_model, lm_head, strategy
        self.num_layers = len(language_model.layers)
        specs = tuple(strategy.layer_specs)
        self.specs = {spec.layer: spec for spec in specs if not spec.own_layer}  # scored in the attention kernel
        self.own_specs = {spec.layer: spec for spec in specs if spec.own_layer}  # scored in the layer's pre-hook
        firsts = [spec.first_layer for spec in specs]
        self.mid_specs = {spec.layer for spec in specs if spec.mid_layer}  # applied after the layer's attention
        self.decode = decode_spec(strategy)
        if self.decode is not None and not 0 <= self.decode.layer < self.num_layers - 1:
            raise ValueError(
                f"{strategy.name} scores layer {self.decode.layer} while decoding, but this LLM has {self.num_layers} "
                f"layers (valid: 0..{self.num_layers - 2}); set the strategy's layer for this backbone"
            )
        for spec in specs:
            if not (0 if spec.own_layer else 1) <= spec.first_layer <= self.num_layers - 1 or spec.layer < 0:
                valid = f"0..{self.num_layers - 1}" if spec.own_layer else f"0..{self.num_layers - 2}"
                raise ValueError(
                    f"{strategy.name} scores layer {spec.layer}, but this LLM has {self.num_layers} layers "
                    f"(valid: {valid}); set the strategy's layer for this backbone"
                )
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"{strategy.name}: two in-LLM stages apply at the same layer ({sorted(firsts)})")
        self._run: _Run | None = None
        self._shift: list[int] = []  # per layer: decode position offset left by renumbered stages
        self._dec: _Decode | None = None
        self._handles = []
        impl = language_model.config._attn_implementation
        if self.specs or self.decode:
            register_scoring_kernels()
            if impl in SCORING_KERNELS:
                language_model.config._attn_implementation = impl = SCORING_KERNELS[impl]
            if impl not in SCORING_KERNELS.values():
                raise ValueError(
                    f"strategy {strategy.name!r} needs attention scores, but the LLM runs attn_implementation="
                    f"{impl!r}, which vidprune cannot wrap; load the model with attn_implementation in "
                    f"{sorted(SCORING_KERNELS)} (the scoring kernel wraps it; 'sdpa' is the default)"
                )
        uniform = all(spec.prune_past_kv for spec in specs) and not (self.decode and self.decode.evict)
        if (specs or self.decode) and impl in ("eager", SCORING_KERNELS["eager"]) and not uniform:
            raise ValueError(
                f"{strategy.name}: eager attention builds one decode mask for all layers, so every layer's KV "
                "cache must have the same length; enable the strategy's KV pruning (e.g. fastv prune_kv=true) "
                "or use attn_implementation='sdpa'"
            )
        self.attn_implementation = impl
        for i, layer in enumerate(language_model.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            layer.self_attn._vidprune = self
            if i in self.specs and not self.specs[i].rope:
                self._handles.append(layer.self_attn.register_forward_pre_hook(self._capture_input, with_kwargs=True))
            if i in self.mid_specs:
                self._handles.append(layer.self_attn.register_forward_hook(self._mid_hook(i), with_kwargs=True))

    def remove(self) -> None:
        """Uninstall the hooks (the attention implementation name stays; it behaves as the stock kernel)."""
        for h in self._handles:
            h.remove()
        for layer in self.lm.layers:
            layer.self_attn._vidprune = None
        self._handles = []

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _capture_input(self, module, args, kwargs):
        if self._run is not None:
            self._run.attn_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            run = self._run
            if run is None:
                return self._decode_positions(i, args, kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            stage = run.pending.pop(i, None)
            if stage is not None and stage[0] == "drop":  # decided inside layer i - 1 (mid-layer stage)
                hidden = self._commit(run, i, hidden, *stage[1:3], None, *stage[3:])
            else:
                if stage is None and i in self.own_specs:
                    stage = self._score_own(module, self.own_specs[i], hidden, kwargs["position_embeddings"])
                if stage is not None:
                    hidden = self._commit(run, i, hidden, *self._decide(run, *stage, hidden))
            if i in self.mid_specs:
                run.layer_input = hidden  # the residual stream the mid-layer stage adds the attention output to
            run.counts[i] = int((run.visual >= 0).sum())
            run.lengths[i] = int(run.cur.numel())
            run.layer_pos[i] = run.cur
            run.last_pos[i] = int(run.pos[-1])
            if run.cur.numel() != run.seq_len or run.renumbered:
                # slice everything indexed by sequence position (RoPE tables, mask) to the tokens still present;
                # after a renumbering stage RoPE is recomputed at the new contiguous positions
                kwargs["position_embeddings"] = self._rope(run, hidden, kwargs["position_embeddings"])
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = run.pos[None]
                if "flash" in self.attn_implementation:
                    # FA2 reads gapped position_ids as packed sequences; RoPE already comes from position_embeddings.
                    kwargs["position_ids"] = None
                mask = kwargs.get("attention_mask")
                if isinstance(mask, Tensor) and mask.dim() == 4:
                    kwargs["attention_mask"] = mask[:, :, run.cur][:, :, :, run.cur]
            elif run.gapped and "flash" in self.attn_implementation:
                kwargs["position_ids"] = None
            return (hidden, *args[1:]), kwargs

        return hook

    def _mid_hook(self, i: int):
        """After layer ``i``'s attention: decide, and write merged survivors into the attention output (FrameFusion)."""

        def hook(module, args, kwargs, output):
            run = self._run
            stage = None if run is None else run.pending.pop(("mid", i), None)
            if stage is None:
                return None
            attn_out = output[0]
            residual = run.layer_input
            keep, keep_local, merged, spec, vis_local = self._decide(run, *stage, residual + attn_out)
            if merged is not None:
                # residual + attn_out becomes the merged state in the survivors' slots; the MLP is per token
                slots = vis_local[keep]
                attn_out = attn_out.clone()
                attn_out[0, slots] = (merged.float() - residual[0, slots].float()).to(attn_out.dtype)
            run.pending[i + 1] = ("drop", keep, keep_local, spec, vis_local)
            return (attn_out, *output[1:])

        return hook

    def _decode_positions(self, i: int, args, kwargs):
        """Decode step: layers after a renumbering stage see the new token ``shift`` positions earlier (PDrop)."""
        shift = self._shift[i] if i < len(self._shift) else 0
        if not shift:
            return None
        pos = kwargs.get("position_ids")
        if pos is None:
            raise RuntimeError("decoding after a renumbering stage needs explicit position_ids (PrunedLM.generate)")
        hidden = args[0] if args else kwargs["hidden_states"]
        pos = pos - shift
        kwargs["position_embeddings"] = self.lm.rotary_emb(hidden, pos)
        kwargs["position_ids"] = None if "flash" in self.attn_implementation else pos
        return args, kwargs

    def _prune_past_kv(self, run: _Run, upto: int) -> None:
        """Index-select the caches of layers ``< upto`` to the tokens still present (PruneVid: layers 0..K)."""
        for j in range(upto):
            layer = run.cache.layers[j]
            keep = torch.searchsorted(run.layer_pos[j], run.cur)  # run.cur is a sorted subset of layer_pos[j]
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
            run.layer_pos[j] = run.cur

    def _visual_span(self, run: _Run) -> tuple[Tensor, int, int]:
        vis_local = (run.visual >= 0).nonzero()[:, 0]  # [n_cur] positions of visual tokens in the current sequence
        return vis_local, int(vis_local[0]), int(vis_local[-1]) + 1

    def _maybe_score(self, module: nn.Module, query: Tensor, key: Tensor) -> None:
        run = self._run
        spec = self.specs.get(module.layer_idx)
        if run is None or spec is None or query.shape[2] != run.cur.numel():
            return  # not prefill, or not a scoring layer
        vis_local, start, end = self._visual_span(run)
        seq = run.cur.numel()
        if spec.rope:
            q, k, q_start = query[0], key[0, :, -seq:], 0
        else:  # PruneVid: Q and K before RoPE, from the attention input the pre-hook captured
            q_start = query_rows(spec, seq, end)[0]
            x = run.attn_input[0]
            hd = module.head_dim
            q = module.q_proj(x[q_start:]).view(seq - q_start, -1, hd).transpose(0, 1)
            k = module.k_proj(x).view(seq, -1, hd).transpose(0, 1)
        span = visual_scores(q, k, start, end, spec, scale=module.scaling, q_start=q_start)
        row_start, row_end = query_rows(spec, seq, end)
        run.scoring.append((row_end - row_start, seq, not spec.rope))
        # decided where the hidden states the stage may merge are at hand: after this layer's attention (mid-layer
        # stages) or in the pre-hook of the next layer
        key = ("mid", spec.layer) if spec.mid_layer else spec.first_layer
        run.pending[key] = (spec, span[vis_local - start], vis_local)

    def _score_own(self, layer: nn.Module, spec, hidden: Tensor, rope: tuple[Tensor, Tensor]):
        """PyramidDrop: the layer's own post-RoPE Q (named rows) and K, projected from its normalised input."""
        run = self._run
        vis_local, start, end = self._visual_span(run)
        seq = run.cur.numel()
        attn = layer.self_attn
        hd = attn.head_dim
        q_start, q_end = query_rows(spec, seq, end)
        x = layer.input_layernorm(hidden)[0]  # [S_cur, D]
        q = attn.q_proj(x[q_start:]).view(seq - q_start, -1, hd).transpose(0, 1)
        k = attn.k_proj(x).view(seq, -1, hd).transpose(0, 1)
        cos, sin = self._rope(run, hidden, rope)
        cos, sin = cos[0].to(q.dtype), sin[0].to(q.dtype)  # [S_cur, hd]
        q = q * cos[q_start:] + _rotate_half(q) * sin[q_start:]
        k = k * cos + _rotate_half(k) * sin
        span = visual_scores(q, k, start, end, spec, scale=attn.scaling, q_start=q_start)
        run.scoring.append((q_end - q_start, seq, True))
        return spec, span[vis_local - start], vis_local

    def _rope(self, run: _Run, hidden: Tensor, full: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` ``[1, S_cur, hd]`` of the current tokens at the positions they now have."""
        if run.renumbered:
            return self.lm.rotary_emb(hidden, run.pos[None])
        return full[0][:, run.cur], full[1][:, run.cur]  # the model's tables, indexed by sequence position

    def _decide(self, run: _Run, spec, scores: Tensor, vis_local: Tensor, hidden: Tensor):
        """Ask the strategy for one stage.

        Returns:
            ``keep`` (indices into the visual tokens), ``keep_local`` (into the current sequence), the survivors'
            ``[k, D]`` merged states or ``None``, then ``spec`` and ``vis_local`` for :meth:`_commit`.
        """
        states = hidden[0, vis_local] if spec.hidden else None
        step = LayerInput(spec.layer, scores, run.visual[vis_local], run.pre, states, run.state)
        result = self.strategy.in_llm(step)
        keep = kept_indices(result)
        if keep.dim() != 1 or (keep.numel() and (keep.min() < 0 or keep.max() >= vis_local.numel())):
            raise RuntimeError(f"{self.strategy.name}.in_llm returned indices outside 0..{vis_local.numel() - 1}")
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise RuntimeError(f"{self.strategy.name}.in_llm must return sorted, unique indices")
        if keep.numel() == 0:
            raise RuntimeError(f"{self.strategy.name}.in_llm kept no visual token at layer {spec.layer}")
        keep_mask = run.visual < 0  # text and separators always stay
        keep_mask[vis_local[keep]] = True
        keep_local = keep_mask.nonzero()[:, 0]
        merged = None
        if isinstance(result, LayerMerge):
            if result.into.numel() != vis_local.numel():
                n_cur = vis_local.numel()
                raise RuntimeError(f"{self.strategy.name}.in_llm merge covers {result.into.numel()} of {n_cur} tokens")
            member = result.into >= 0
            h = hidden[0, vis_local[member]].float() * result.weights[member].float().unsqueeze(1)
            merged = torch.zeros(keep.numel(), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
            merged = merged.index_add_(0, result.into[member], h).to(hidden.dtype)
        return keep, keep_local, merged, spec, vis_local

    def _commit(self, run: _Run, i: int, hidden: Tensor, keep, keep_local, merged, spec, vis_local) -> Tensor:
        """Drop the non-survivors before layer ``i``, merged states into the survivors' slots; ``[1, S', D]`` out."""
        out = hidden[:, keep_local]
        if merged is not None:
            out = out.clone()  # the pre-hook's input may be the previous layer's output, still referenced
            out[0, torch.searchsorted(keep_local, vis_local[keep])] = merged
        run.kept.append(run.visual[vis_local[keep]])
        run.cur, run.visual = run.cur[keep_local], run.visual[keep_local]
        run.pos = run.pos[keep_local]
        if spec.positions == "renumber":
            contiguous = torch.arange(keep_local.numel(), device=keep_local.device) + run.pos[0]
            if not torch.equal(contiguous, run.pos):  # nothing dropped: the model's own RoPE tables still hold
                run.pos, run.renumbered = contiguous, True
        if spec.prune_past_kv:
            self._prune_past_kv(run, i)
        return out

    def _decode_select(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask):
        """Decode-time stage: score at the spec's layer, then gather (or evict) visual entries in later layers."""
        dec = self._dec
        if dec is None or query.shape[2] != 1:
            return key, value, mask
        li = module.layer_idx
        entries = dec.entries[li]
        if key.shape[2] == entries.numel() + 1:  # the new token's own key/value were just appended
            entries = dec.entries[li] = torch.cat([entries, entries.new_full((1,), -1)])
        if key.shape[2] != entries.numel():
            raise RuntimeError(f"decode stage lost track of layer {li}'s cache: {key.shape[2]} keys, {entries.numel()}")
        spec = dec.spec
        if li == spec.layer:
            self._decode_decide(dec, module, query, key, entries)
        if li > spec.layer and dec.chosen is not None:
            sel = ((entries < 0) | torch.isin(entries, dec.chosen)).nonzero()[:, 0]
            key, value = key[:, :, sel], value[:, :, sel]
            if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[-1] == entries.numel():
                mask = mask[..., sel]
            if spec.evict:
                layer = dec.cache.layers[li]
                layer.keys, layer.values = layer.keys[:, :, sel], layer.values[:, :, sel]
                dec.entries[li] = entries[sel]
        dec.keys[-1][li] = int(key.shape[2])
        if li == self.num_layers - 1:
            vis = dec.entries[li] if dec.chosen is None or spec.evict else entries[torch.isin(entries, dec.chosen)]
            dec.visual.append(int((vis >= 0).sum()))
        return key, value, mask

    def _decode_decide(self, dec: _Decode, module: nn.Module, query: Tensor, key: Tensor, entries: Tensor) -> None:
        dec.step += 1
        vis = (entries >= 0).nonzero()[:, 0]
        k = key[0]
        rep = query.shape[1] // k.shape[0]  # GQA: repeat the KV heads
        k = k.repeat_interleave(rep, dim=0) if rep > 1 else k
        logits = (query[0].float() @ k.float().transpose(1, 2)) * module.scaling  # [H, 1, K]
        probs = torch.softmax(logits, dim=-1)[:, 0]  # [H, K]
        row = probs.mean(0) if dec.spec.head_reduce == "mean" else probs.amax(0)
        dec.scoring.append(int(key.shape[2]))
        scores = row[vis]
        visual = entries[vis]
        keep = self.strategy.in_decode(DecodeInput(dec.step, scores, visual, dec.previous, dec.pre))
        dec.previous = scores
        if keep is None:
            dec.chosen = None
            return
        if keep.dim() != 1 or (keep.numel() and (keep.min() < 0 or keep.max() >= visual.numel())):
            raise RuntimeError(f"{self.strategy.name}.in_decode returned indices outside 0..{visual.numel() - 1}")
        dec.chosen = None if keep.numel() == visual.numel() else visual[keep]

    # -- prefill and greedy decoding -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        visual: Tensor,
        pre: PreLLMOutput,
        max_new_tokens: int = 16,
        eos_token_ids: Sequence[int] = (),
        return_logits: bool = False,
        clock: StageClock | None = None,
        positions: Tensor | None = None,
    ) -> tuple[list[int], PrefillStats, list[Tensor]]:
        """Prefill with pruning, then decode greedily.

        Args:
            inputs_embeds: ``[1, S, D]`` the whole prompt with the visual tokens spliced in.
            visual: ``[S]`` long, index into ``pre.tokens`` of each position, -1 for text and separators.
            pre: the pre-LLM output (for group-wise in-LLM stages).
            max_new_tokens: most tokens to generate.
            eos_token_ids: stop after generating one of these.
            return_logits: also return the ``[V]`` fp32 logits of every generated token.
            clock: marks ``prefill`` and ``decode`` on the caller's clock (a fresh one when ``None``); the stats'
                ``prefill_s`` and ``decode_s`` are read from it.
            positions: ``[S]`` increasing long position ids of the prompt (gaps allowed); ``None`` is ``0 .. S-1``.

        Returns:
            Generated token ids, the :class:`PrefillStats`, and the logits (empty unless asked).
        """
        from transformers import DynamicCache

        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
            raise ValueError(f"batch size must be 1 (inputs_embeds [1, S, D]), got {tuple(inputs_embeds.shape)}")
        seq = inputs_embeds.shape[1]
        if visual.shape != (seq,):
            raise ValueError(f"visual must be [S={seq}], got {tuple(visual.shape)}")
        device = inputs_embeds.device
        clock = clock or StageClock(device)
        if (self.specs or self.decode) and not bool((visual >= 0).any()):
            raise ValueError("the prompt has no visual token to prune")
        cache = DynamicCache(config=self.lm.config)
        index = torch.arange(seq, device=device)
        gapped = positions is not None and not torch.equal(positions.to(device), index)
        if positions is None:
            positions = index
        positions = positions.to(device=device, dtype=torch.long)
        if positions.shape != (seq,) or (seq > 1 and not bool((positions[1:] > positions[:-1]).all())):
            raise ValueError(f"positions must be [S={seq}] strictly increasing ids, got {tuple(positions.shape)}")
        run = _Run(pre, seq, index, positions, visual.to(device), [0] * self.num_layers, cache)
        run.lengths = [0] * self.num_layers
        run.gapped = gapped
        self._run, self._shift = run, []
        try:
            clock.start()
            out = self.lm(
                inputs_embeds=inputs_embeds, position_ids=positions[None], past_key_values=cache, use_cache=True
            )
            logits = self.lm_head(out.last_hidden_state[:, -1]).float()[0]
            clock.mark("prefill")  # recorded before the argmax syncs: the first token's logits exist here
            token = int(logits.argmax())
        finally:
            self._run = None
        # decode step i sits at S + i in layers that kept positions, and right after the renumbered prompt elsewhere
        last = int(positions[-1])
        self._shift = [last - run.last_pos.get(i, last) for i in range(self.num_layers)]
        stats = PrefillStats(seq, run.counts, kept=run.kept, tokens_per_layer=run.lengths, scoring=run.scoring)
        stats.kv_len_per_layer = [int(layer.keys.shape[2]) for layer in cache.layers]
        stats.kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        tokens, all_logits = [token], [logits] if return_logits else []
        embed = self.lm.embed_tokens
        last = int(positions[-1])
        visual_dev = visual.to(device)
        if self.decode is not None:
            entries = [visual_dev[run.layer_pos[j]] for j in range(self.num_layers)]
            self._dec = _Decode(self.decode, pre, cache, entries)
        try:
            while len(tokens) < max_new_tokens and tokens[-1] not in eos_token_ids:
                step = torch.tensor([[tokens[-1]]], device=device)
                pos = torch.tensor([[last + len(tokens)]], device=device)
                if self._dec is not None:
                    self._dec.keys.append([0] * self.num_layers)
                out = self.lm(inputs_embeds=embed(step), position_ids=pos, past_key_values=cache, use_cache=True)
                logits = self.lm_head(out.last_hidden_state[:, -1]).float()[0]
                tokens.append(int(logits.argmax()))
                if return_logits:
                    all_logits.append(logits)
        finally:
            self._shift = []
            dec, self._dec = self._dec, None
        if dec is not None:
            stats.decode_keys, stats.decode_scoring, stats.decode_visual = dec.keys, dec.scoring, dec.visual
        stats.kv_bytes_end = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        clock.mark("decode")
        times = clock.seconds()
        stats.prefill_s, stats.decode_s = times["prefill"], times["decode"]
        stats.new_tokens = len(tokens)
        return tokens, stats, all_logits


def _rotate_half(x: Tensor) -> Tensor:
    """RoPE's rotation of the two halves of the head dimension (HF ``rotate_half``, Llama and Qwen2 alike)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StageClock:
    """Durations of consecutive stages of one sample: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

    ``start()`` opens the clock (once; later calls are ignored); ``mark(name)`` closes the stage ``name`` that began
    at the previous mark. On CUDA the events are recorded on the current stream and read only in :meth:`seconds`,
    which synchronises once, so timing adds no synchronisation between stages.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Open the clock (no-op when already open)."""
        if not self._marks:
            self._marks.append(("", self._now()))

    def mark(self, name: str) -> None:
        """Close stage ``name`` (it began at the previous mark or at :meth:`start`)."""
        if not self._marks:
            raise RuntimeError("StageClock.mark before start()")
        self._marks.append((name, self._now()))

    def seconds(self) -> dict[str, float]:
        """Seconds per stage, in order of the marks."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self._marks, self._marks[1:], strict=False):
            out[name] = a.elapsed_time(b) / 1000 if self.cuda else b - a
        return out
