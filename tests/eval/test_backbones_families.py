"""The PLLaVA and ST-LLM families through the eval spine: tiny models with the real geometry, prompts, one answer."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf

from eval.backbones import FAMILIES, IMPLEMENTED, ByteIdTokenizer, flops_of
from eval.runner import REPO, compose_config, make_backbone
from prune.adapters.pllava import IMAGE_TOKEN_ID, PllavaAdapter
from prune.adapters.st_llm import PLACEHOLDER_ID, QFORMER_MAX_LEN, TEXT_BOS_ID, StLlmAdapter

sys.path.insert(0, str(REPO / "scripts"))
from make_tiny_bench import write_mp4  # noqa: E402

CONTEXT = "Question: What moves?\nOptions:\n(A) a square\n(B) a circle"
# model -> (adapter class, frames, per-frame grid, visual tokens)
GEOMETRY = {
    "tiny_pllava": (PllavaAdapter, 16, (12, 12), 2304),
    "tiny_st_llm": (StLlmAdapter, 64, (1, 32), 2048),
}


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    # Fewer frames than the model samples, at an odd aspect: sampling repeats frames and both resizes crop.
    return str(write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", 12, 48, 80, seed=3))


def _backbone(model: str, prune: str, *extra: str):
    return make_backbone(compose_config([f"model={model}", f"prune={prune}", "ratio=0.5", *extra]))


def test_the_family_table_lists_the_three_families():
    assert IMPLEMENTED == ("llava_onevision", "pllava", "st_llm")
    assert set(FAMILIES["pllava"].loaders) == set(FAMILIES["st_llm"].loaders) == {"tiny", "checkpoint"}
    assert set(FAMILIES["llava_onevision"].loaders) == {"tiny", "hf", "llava_video", "probe"}


def test_every_model_config_names_a_discovered_family_and_one_of_its_loaders():
    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        family = FAMILIES.get(cfg.family)
        assert family is not None, f"{path.name}: family {cfg.family!r} has no eval/families module ({IMPLEMENTED})"
        assert cfg.loader in family.loaders, f"{path.name}: loader {cfg.loader!r} not in {sorted(family.loaders)}"
        assert cfg.name in family.models, f"{path.name}: add {cfg.name!r} to FAMILY.models of {cfg.family}"


def test_a_new_family_module_is_discovered_and_builds(tmp_path, monkeypatch):
    # docs/backbones.md, "Adding a backbone": one new eval/families module, no table to edit.
    import eval.backbones as backbones
    from eval import families
    from prune.strategies.none import NoPruning

    (tmp_path / "fifth.py").write_text(
        "import dataclasses\n"
        "from eval.families.llava_onevision import FAMILY as OV\n"
        "FAMILY = dataclasses.replace(OV, name='fifth', models=('tiny_fifth',))\n"
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "eval.families.fifth", raising=False)
    try:
        found = backbones._discover_families()
        assert tuple(found) == ("fifth", *IMPLEMENTED)  # in module order
        monkeypatch.setattr(backbones, "FAMILIES", found)
        cfg = OmegaConf.to_container(compose_config(["model=tiny_llava_ov"]).model, resolve=True)
        backbone = backbones.build_backbone({**cfg, "name": "tiny_fifth", "family": "fifth"}, NoPruning(), "cpu")
        assert backbone.name == "tiny_fifth" and backbone.prompt_ids("hi").shape[0] == 1
        backbone.adapter.llm.remove()
    finally:
        sys.modules.pop("eval.families.fifth", None)


@pytest.mark.parametrize("model", sorted(GEOMETRY))
def test_tiny_models_instantiate_with_the_real_geometry(model):
    cls, frames, grid, tokens = GEOMETRY[model]
    backbone = _backbone(model, "none")
    try:
        assert isinstance(backbone.adapter, cls)
        assert backbone.num_frames == backbone.adapter.num_frames == frames
        assert backbone.adapter.grid == grid and frames * grid[0] * grid[1] == tokens
        shape = backbone.llm_shape  # read from the Llama config of either container
        assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads) == (4, 64, 4, 4)
        assert shape.vocab == (32064 if model == "tiny_pllava" else 32001)
    finally:
        backbone.adapter.llm.remove()


@pytest.mark.parametrize("model", sorted(GEOMETRY))
@pytest.mark.parametrize("prune", ["fastv", "prunevid"])
def test_answer_runs_end_to_end_with_per_layer_counts_and_timings(model, prune, video):
    _, frames, _, tokens = GEOMETRY[model]
    backbone = _backbone(model, prune)
    try:
        text, stats = backbone.answer(video, CONTEXT, {"max_new_tokens": 3, "until": []})
    finally:
        backbone.adapter.llm.remove()
    assert isinstance(text, str)
    assert stats["frames"] == frames and stats["frames_in_video"] == 12
    assert stats["visual_in"] == tokens and stats["separators"] == stats["separators_unpruned"] == 0
    per_layer, pre = stats["visual_per_layer"], stats["visual_pre_llm"]
    assert len(per_layer) == 4 and len(stats["kv_len_per_layer"]) == 4
    if prune == "fastv":  # K=2: every visual token in layers 0-1, keep_count(0.5, n) from layer 2
        assert pre == tokens and per_layer == [tokens, tokens, tokens // 2, tokens // 2]
    else:  # tiny PruneVid scores layer 1: layers 0-1 on the stage-1 sequence, fewer tokens after
        assert per_layer[0] == per_layer[1] == pre <= tokens and per_layer[2] == per_layer[3] <= pre
    assert stats["tokens_per_layer"] == [v + stats["text_tokens"] for v in per_layer]
    assert {"video_decode", "preprocess", "vision", "pre_llm", "prefill", "decode"} <= set(stats["timings_s"])
    assert all(s >= 0 for s in stats["timings_s"].values()) and stats["ttft_s"] > 0
    assert 1 <= stats["new_tokens"] <= 3
    flops = flops_of(stats, backbone.llm_shape)
    assert 0 < flops["prefill"] < flops["prefill_full"]


def test_pllava_prompt_is_the_official_template_with_bos_and_one_image_id():
    backbone = _backbone("tiny_pllava", "none")
    try:
        ids = backbone.prompt_ids(CONTEXT)[0].tolist()
    finally:
        backbone.adapter.llm.remove()
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_ID) == 1  # <s> as PllavaProcessor; <image> = 32000
    tail = bytes(ids[ids.index(IMAGE_TOKEN_ID) + 1 :]).decode()
    assert tail.startswith("\n USER: Question: What moves?") and tail.endswith(" ASSISTANT:Best option:(")


def test_st_llm_prompt_has_video_first_and_the_question_for_the_qformer():
    backbone = _backbone("tiny_st_llm", "none")
    try:
        ids, inputs = backbone.prompt(backbone, CONTEXT)
        long_ids, long_inputs = backbone.prompt(backbone, "x" * 300 + "END")
    finally:
        backbone.adapter.llm.remove()
    assert ids[0, :2].tolist() == [PLACEHOLDER_ID, TEXT_BOS_ID]
    assert bytes(ids[0, 2:].tolist()).decode() == f"###Human: {CONTEXT} ###Assistant: "
    assert inputs["qformer_input_ids"].tolist() == [list(CONTEXT.encode())]
    assert inputs["qformer_attention_mask"].shape == inputs["qformer_input_ids"].shape
    q = long_inputs["qformer_input_ids"][0].tolist()  # left truncation keeps the end of a long question
    assert len(q) == QFORMER_MAX_LEN and bytes(q[-3:]) == b"END"


def test_st_llm_max_input_tokens_is_a_model_config_key():
    backbone = _backbone("tiny_st_llm", "none", "model.max_input_tokens=1700")
    try:
        assert backbone.adapter.max_input_tokens == 1700
    finally:
        backbone.adapter.llm.remove()
    backbone = _backbone("tiny_st_llm", "none")
    try:
        assert backbone.adapter.max_input_tokens is None
    finally:
        backbone.adapter.llm.remove()


def test_pllava_checkpoint_loader_passes_lora_alpha(monkeypatch):
    import prune.adapters.pllava as pllava

    seen = {}

    def fake_load(path, dtype, attn_implementation, lora_alpha):
        seen.update(path=path, dtype=dtype, lora_alpha=lora_alpha)
        return pllava.tiny_pllava(llm_layers=32)

    monkeypatch.setattr(pllava, "load_pllava", fake_load)
    overrides = ("model.download=true", "model.tokenizer=bytes", "model.dtype=float32")
    backbone = _backbone("pllava", "none", *overrides)
    backbone.adapter.llm.remove()
    assert seen == {"path": "ermu2001/pllava-7b", "dtype": torch.float32, "lora_alpha": 14.0}


def test_byte_tokenizer_maps_the_specials_and_decodes_bytes():
    tok = ByteIdTokenizer({"<s>": 1, "</s>": 2, "<image>": IMAGE_TOKEN_ID}, bos_token_id=1, eos_token_ids=(2,))
    assert tok("a<image>b")["input_ids"] == [1, 97, IMAGE_TOKEN_ID, 98]
    assert tok("a<image>b", add_special_tokens=False)["input_ids"] == [97, IMAGE_TOKEN_ID, 98]
    assert tok.decode([104, 105, 2, 33]) == "hi!"
    cut = ByteIdTokenizer(stops=("###",))
    assert cut.decode(list(b"B) yes###Human")) == "B) yes"
    with pytest.raises(ValueError, match="truncation_side"):
        ByteIdTokenizer(truncation_side="middle")


def _word_tokenizer(folder, words: dict[str, int], template: str, specials: list[tuple[str, int]], **kw):
    """Save a word-level fast tokenizer: a stand-in for the real Llama/BERT files, which are not on test machines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(words, unk_token=next(iter(words))))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.save_pretrained(folder)
    return fast


def test_checkpoint_tokenizers_build_the_prompts(tmp_path):
    import types

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    llama = _word_tokenizer(tmp_path / "QA_weight", words, "<s> $A", [("<s>", 1)], bos_token="<s>", eos_token="</s>")
    llama.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 32000, as in the llava-hf vocabulary
    llama.save_pretrained(tmp_path)

    tok = FAMILIES["pllava"].tokenizer({"checkpoint": str(tmp_path)})
    ids, extra = FAMILIES["pllava"].prompt({})(types.SimpleNamespace(tokenizer=tok), "Question: w5")
    assert tok.eos_token_ids == (2,) and extra == {}
    assert ids[0, 0] == 1 and int((ids == IMAGE_TOKEN_ID).sum()) == 1

    bert = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, **{f"q{i}": i for i in range(3, 400)}}
    sep = [("[CLS]", 1), ("[SEP]", 2)]
    _word_tokenizer(tmp_path / "bert", bert, "[CLS] $A [SEP]", sep, cls_token="[CLS]", sep_token="[SEP]")
    tok = FAMILIES["st_llm"].tokenizer({"checkpoint": str(tmp_path)})  # from QA_weight/
    prompt = FAMILIES["st_llm"].prompt({"tokenizer": "checkpoint", "qformer_tokenizer": str(tmp_path / "bert")})
    ids, extra = prompt(types.SimpleNamespace(tokenizer=tok), " ".join(f"q{i}" for i in range(3, 303)))
    assert tok.eos_token_ids == (2, 835) and ids[0, :2].tolist() == [PLACEHOLDER_ID, TEXT_BOS_ID]
    q = extra["qformer_input_ids"][0].tolist()  # BERT specials kept, the question's start dropped
    assert len(q) == QFORMER_MAX_LEN and q[:2] == [1, 49] and q[-2:] == [302, 2]
