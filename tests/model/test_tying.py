"""lm_head is tied to the embeddings exactly when the model's text config says so.

transformers' `InternVLConfig` ties at the top level by default, whatever its text config
says; a load then silently copies one matrix over the other (fixture 3: [SEG] hidden state off
by 2.27, greedy ids changed). Every build path must follow the text config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.official_fixtures import RELEASE
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sa2va.model.mllm import build_mllm, build_tiny_tokenizer, internvl_config
from sa2va.utils import CONF_DIR

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("sa2va_*.yaml"))


def mllm_config(name: str) -> dict:
    """``model.mllm.config`` of preset ``name`` as composed (presets extend conf/model/base/)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.model.mllm.config)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_ties_as_its_text_config_says(name):
    config = mllm_config(name)
    assert "tie_word_embeddings" in config["text_config"], f"{name}: say it explicitly"
    hf_config = internvl_config(config, build_tiny_tokenizer())
    assert hf_config.tie_word_embeddings is config["text_config"]["tie_word_embeddings"]


@pytest.mark.parametrize("tied", [False, True])
def test_built_model_shares_the_matrix_only_when_tied(tied):
    config = mllm_config("sa2va_tiny")
    config["text_config"]["tie_word_embeddings"] = tied
    model = build_mllm(config=config).model
    shared = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared is tied


def test_hf_folder_with_distinct_matrices_keeps_them_distinct(tmp_path):
    torch.manual_seed(0)
    parts = build_mllm(config=mllm_config("sa2va_tiny"))
    with torch.no_grad():  # make the two matrices clearly different
        parts.model.lm_head.weight.normal_()
    for saved in (parts.model, parts.tokenizer, parts.image_processor):
        saved.save_pretrained(tmp_path)
    loaded = build_mllm(path=str(tmp_path)).model
    embed, head = loaded.get_input_embeddings().weight, loaded.lm_head.weight
    assert torch.equal(embed, parts.model.get_input_embeddings().weight)
    assert torch.equal(head, parts.model.lm_head.weight)
    assert not torch.equal(embed, head)


def test_release_folder_with_distinct_matrices_keeps_them_distinct():
    weights = load_file(RELEASE / "model.safetensors")
    model = build_mllm(path=str(RELEASE)).model
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert torch.equal(embed, weights["language_model.model.embed_tokens.weight"])
    assert torch.equal(head, weights["language_model.lm_head.weight"])
