"""Every config option composes; the tiny ones instantiate; bad choices fail with Hydra's list of options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from eval.backbones import BackboneUnavailable
from eval.runner import compose_config, make_backbone, make_strategy

CONFIGS = Path(__file__).parents[2] / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_groups_have_the_required_options():
    assert set(_options("model")) >= {
        "llava_ov",
        "llava_video",
        "pllava",
        "st_llm",
        "tiny_llava_ov",
        "tiny_llava_video",
        "tiny_pllava",
        "tiny_st_llm",
    }
    assert set(_options("prune")) >= {"none", "fastv", "prunevid", "hieravid", "random", "pool"}
    assert set(_options("benchmark")) >= {"mvbench", "videomme", "egoschema", "nextqa", "tiny"}


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("prune", _options("prune"))
def test_every_model_x_prune_composes_and_the_strategy_fits_the_llm(model, prune):
    cfg = compose_config([f"model={model}", f"prune={prune}", "ratio=0.3"])
    OmegaConf.resolve(cfg)
    strategy = make_strategy(cfg)
    layers = cfg.model.llm_layers
    for spec in strategy.layer_specs:  # the specialisation group keeps every scoring layer inside the LLM
        assert 0 <= spec.layer and (0 if spec.own_layer else 1) <= spec.first_layer <= layers - 1, (model, prune)
    if prune in ("hieravid", "pdrop", "framefusion"):
        assert strategy.num_layers == layers


@pytest.mark.parametrize("benchmark", _options("benchmark"))
def test_every_benchmark_composes(benchmark):
    cfg = compose_config([f"benchmark={benchmark}"])
    assert cfg.benchmark.name == benchmark and cfg.benchmark.mode in ("online", "offline")


def test_the_design_card_override_syntax():
    cfg = compose_config(["model=llava_ov", "prune=hieravid", "ratio=0.3"])
    assert (cfg.model.name, cfg.prune.ratio, cfg.prune.num_layers) == ("llava_ov", 0.3, 28)
    assert cfg.model.checkpoint == "llava-hf/llava-onevision-qwen2-7b-ov-hf"


def test_defaults_are_the_known_answer_probe():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.benchmark.name, cfg.benchmark.mode) == ("probe_llava_ov", "probe", "offline")
    assert (cfg.prune._target_.rsplit(".", 1)[-1], cfg.ratio, cfg.paired_baseline) == ("HieraVid", 0.3, True)
    assert (cfg.prune.num_layers, list(cfg.prune.boundaries)) == (4, [1, 2, 3])  # the probe's model_prune entry


@pytest.mark.parametrize("model", ["tiny_llava_ov", "tiny_llava_video"])
def test_tiny_models_instantiate_with_the_real_geometry(model):
    backbone = make_backbone(compose_config([f"model={model}", "prune=fastv", "ratio=0.5"]))
    assert backbone.adapter.grid == ((14, 14) if model == "tiny_llava_ov" else (13, 13))
    assert backbone.num_frames == (32 if model == "tiny_llava_ov" else 64)
    backbone.adapter.llm.remove()


def test_unknown_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["prune=fastvv"])
    message = str(err.value)
    assert "fastvv" in message and "fastv" in message and "hieravid" in message


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2"])
def test_ratio_outside_the_range_is_a_clear_error(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make_strategy(compose_config(["prune=fastv", f"ratio={ratio}"]))


@pytest.mark.parametrize("model", ["llava_ov", "llava_video"])
def test_real_models_without_weights_fail_fast_with_instructions(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable, match="huggingface-cli download"):
        make_backbone(compose_config([f"model={model}", "prune=hieravid", "ratio=0.3"]))


@pytest.mark.parametrize(
    ("model", "family", "frames", "checkpoint"),
    [("pllava", "pllava", 16, "ermu2001/pllava-7b"), ("st_llm", "st_llm", 64, "farewellthree/ST_LLM_weight")],
)
def test_pllava_and_st_llm_compose(model, family, frames, checkpoint):
    cfg = compose_config([f"model={model}", "prune=prunevid", "ratio=0.4"])
    assert (cfg.model.family, cfg.model.loader, cfg.model.checkpoint) == (family, "checkpoint", checkpoint)
    assert (cfg.model.num_frames, cfg.model.llm_layers, cfg.prune.layer) == (frames, 32, 10)
    if model == "pllava":
        assert cfg.model.lora_alpha == 14  # PruneVid's eval.sh; PLLaVA's own scripts use 4
    else:
        assert cfg.model.max_input_tokens is None  # the official 1700-token truncation is opt-in


# What each message must name: the download command for the release (and for ST-LLM the Q-Former's tokenizer).
DOWNLOADS = {
    "pllava": ["huggingface-cli download ermu2001/pllava-7b", "llava-hf/llava-v1.6-vicuna-7b-hf"],
    "st_llm": [
        "huggingface-cli download farewellthree/ST_LLM_weight --include 'QA_weight/*'",
        "huggingface-cli download bert-base-uncased",
    ],
}


@pytest.mark.parametrize("model", ["pllava", "st_llm"])
def test_pllava_and_st_llm_without_weights_fail_fast_naming_the_downloads(model, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):  # failing fast means deciding from local files, before any fetch
        raise AssertionError("tried to fetch from the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(BackboneUnavailable, match="huggingface-cli download") as err:
        make_backbone(compose_config([f"model={model}", "prune=prunevid", "ratio=0.4"]))
    for needle in DOWNLOADS[model]:
        assert needle in str(err.value)


@pytest.mark.parametrize("model", ["pllava", "st_llm"])
def test_pllava_and_st_llm_local_folder_without_files_names_them(model, tmp_path):
    with pytest.raises(BackboneUnavailable, match=r"config\.json") as err:
        make_backbone(compose_config([f"model={model}", f"model.checkpoint={tmp_path}"]))
    assert "tokenizer" in str(err.value)
