"""Every supported official checkpoint, in its exact key names and shapes, loads strictly
into the project config shaped like it, and maps back to the same keys.

The synthetic checkpoints come from :mod:`sa2va.model.releases`: key names and shapes
written out from the official module layout and the releases' published ``config.json``
numbers (sources in its docstring), never from this project's model; the formulas are
checked against the official tiny chat model (``tests/fixtures/official_sa2va``). Tensors
live on the meta device, so a 26B release costs no memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers.official_fixtures import RELEASE as CHAT
from helpers.official_fixtures import (
    SAM2_YAML,
    assert_bit_equal,
    load_sam2_fixture,
    official_release_state,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from sa2va.model.checkpoints import (
    compare_state_dict,
    official_to_sa2va,
    read_state_dict,
    split_internlm2_wqkv,
)
from sa2va.model.release_layout import (
    NoOfficialNameError,
    fuse_internlm2_wqkv,
    sa2va_to_official,
    sa2va_to_release,
    write_release_weights,
)
from sa2va.model.releases import (
    RELEASES,
    Release,
    TextSpec,
    VisionSpec,
    on_meta,
    release_from_config,
    release_shapes,
    sam2_shapes,
    sam2_yaml_path,
    synthetic_state,
)
from sa2va.model.sam2 import build_sam2
from sa2va.utils import CONF_DIR, to_plain


def test_shapes_match_the_official_tiny_chat_model():
    """The shape formulas reproduce a checkpoint the official code wrote, key for key."""
    release = release_from_config(
        "sa2va_chat_tiny", json.loads((CHAT / "config.json").read_text()), None
    )
    official = {k: tuple(v.shape) for k, v in load_file(CHAT / "model.safetensors").items()}
    sam2 = {k: tuple(v.shape) for k, v in load_sam2_fixture().items()}
    assert sam2_shapes(SAM2_YAML) == sam2
    shapes = release_shapes(release, sam2)
    grounding = {k: s for k, s in shapes.items() if k.startswith("grounding_encoder.")}
    assert {k: s for k, s in shapes.items() if k not in grounding} == official
    # SAM 2 is not in the fixture's file; the release holds it with .gamma -> .g_weight
    assert len(grounding) == len(sam2)
    assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight" in grounding


def test_an_unsupported_family_is_refused_by_name():
    config = json.loads((CHAT / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Qwen3ForCausalLM"]
    with pytest.raises(ValueError, match="Qwen3-VL based Sa2VA models are not supported"):
        release_from_config("Sa2VA-Qwen3-VL-4B", config, None)


def project_model(compose_cfg, release: Release) -> torch.nn.Module:
    """``conf/model/<release.config>.yaml`` on the meta device. Its vocabulary is a Sa2VA
    release's (the base model's + the 5 Sa2VA tokens); an original InternVL folder has the
    base vocabulary, and loading it adds the 5 tokens to the tokenizer and resizes."""
    cfg = compose_cfg(f"model={release.config}")
    if release.layout != "internvl":
        assert cfg.model.mllm.config.text_config.vocab_size == release.vocab, release.config
    with open_dict(cfg):
        cfg.model.mllm.path = None
        cfg.model.mllm.config.text_config.vocab_size = release.vocab
        cfg.model.lora = None  # a release holds no adapters (training adds them: model.lora)
    with on_meta():
        return instantiate(to_plain(cfg.model), load_pretrained=False, _convert_="all")


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_layout_loads_strictly_into_its_config(compose_cfg, name):
    release = RELEASES[name]
    state = synthetic_state(release_shapes(release))
    model = project_model(compose_cfg, release)
    text = model.mllm.config.text_config
    assert text.model_type == {"qwen2": "qwen2", "internlm2": "llama"}[release.text.family]
    ours = official_to_sa2va(
        state, text.model_type, text.num_attention_heads, text.num_key_value_heads
    )
    optional = ["sam2.*", "text_hidden_fcs.*"] if release.layout == "internvl" else []
    report = compare_state_dict(model, ours, name, expected_missing=optional)
    assert report.ok, report.summary()
    assert bool(report.expected_missing) == (release.layout == "internvl")
    # ... and back out in the release's own layout, key for key and shape for shape
    to_layout = sa2va_to_official if release.layout == "xtuner" else sa2va_to_release
    back = to_layout(ours, text.model_type, text.num_key_value_heads)
    assert {k: tuple(v.shape) for k, v in back.items()} == release_shapes(release)


# ------------------------------------------------------------- bit-exact round trips


def test_official_fixture_round_trip_is_bit_exact():
    official = official_release_state()
    ours = official_to_sa2va(official, "qwen2", num_heads=2, num_kv_heads=1)
    assert any(k.endswith("attention.k_proj.weight") for k in ours)  # InternViT qkv was split
    assert_bit_equal(sa2va_to_release(ours, "qwen2", num_kv_heads=1), official)


# InternViT-6B style vision (no qkv bias, qk-norm, RMSNorm) and InternLM2 text with 4 query
# heads per KV head: the layouts of Sa2VA-26B at a size whose real tensors cost nothing.
SMALL_INTERNLM2 = Release(
    "small-InternLM2-Sa2VA",
    VisionSpec(16, 2, 2, 32, qkv_bias=False, qk_norm=True, norm="rms_norm", image=56, patch=14),
    TextSpec("internlm2", 64, 2, 8, 2, 96, 40),
    config="",
)


@pytest.mark.parametrize("layout", ["hf_release", "xtuner"])
def test_internlm2_and_sam2_round_trip_is_bit_exact(layout, tmp_path):
    """Written as the release writes its files (a safetensors folder, or xtuner's
    ``{"state_dict": ...}`` .pth), read by the project's reader, mapped in and back out."""
    release = dataclasses.replace(SMALL_INTERNLM2, layout=layout)
    sam2 = {k: tuple(v.shape) for k, v in load_sam2_fixture().items()}
    official = synthetic_state(release_shapes(release, sam2), device="cpu", seed=3)
    assert any(k.endswith("attention.wqkv.weight") for k in official)
    gamma = ".g_weight" if layout == "hf_release" else ".gamma"
    assert any(k.endswith(f"fuser.layers.0{gamma}") for k in official)
    if layout == "hf_release":
        path = tmp_path / "Sa2VA-small"
        write_release_weights(official, path, max_shard_size=100_000)
    else:
        path = tmp_path / "Sa2VA-small.pth"
        torch.save({"state_dict": official, "meta": {"iter": 1}}, path)
    ours = official_to_sa2va(read_state_dict(path), "llama", num_heads=8, num_kv_heads=2)
    assert "mllm.model.language_model.layers.0.self_attn.k_proj.weight" in ours
    assert "sam2.memory_encoder.fuser.layers.0.gamma" in ours
    back = (sa2va_to_release if layout == "hf_release" else sa2va_to_official)(ours, "llama", 2)
    assert_bit_equal(back, official)


def test_wqkv_fusion_is_the_inverse_of_the_split():
    rows = torch.arange(16.0).view(8, 2)  # 2 KV groups of rows [q, q, k, v], width 2
    q, k, v = split_internlm2_wqkv(rows, num_heads=4, num_kv_heads=2)
    assert torch.equal(fuse_internlm2_wqkv(q, k, v, num_kv_heads=2), rows)


def test_keys_without_an_official_name_are_refused():
    ours = official_to_sa2va(official_release_state(), "qwen2", num_heads=2, num_kv_heads=1)
    with pytest.raises(NoOfficialNameError, match="extra.weight: no official name"):
        sa2va_to_release({**ours, "extra.weight": torch.zeros(1)}, "qwen2", 1)
    vision_k = "mllm.model.vision_tower.encoder.layer.0.attention.k_proj.weight"
    with pytest.raises(NoOfficialNameError, match="cannot fuse q/k/v"):
        sa2va_to_release({k: v for k, v in ours.items() if k != vision_k}, "qwen2", 1)
    lora = "mllm.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
    with pytest.raises(ValueError, match="unmerged LoRA"):
        sa2va_to_release({**ours, lora: torch.zeros(1)}, "qwen2", 1)


def test_large_weights_are_sharded_with_an_index(tmp_path):
    official = official_release_state()
    files = write_release_weights(official, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"]) == set(official)
    assert sorted(set(index["weight_map"].values())) == sorted(files[:-1])
    assert_bit_equal(read_state_dict(tmp_path), official)
    single = tmp_path / "single"
    single.mkdir()
    assert write_release_weights(official, single) == ["model.safetensors"]


# ------------------------------------------------------------ SAM 2 release files


def project_sam2(name: str) -> torch.nn.Module:
    """``conf/model/sam2/<name>.yaml`` as this project builds it, on meta."""
    config = OmegaConf.load(Path(CONF_DIR) / "model" / "sam2" / f"{name}.yaml")
    with on_meta():
        return build_sam2(OmegaConf.to_container(config))


@pytest.mark.parametrize(
    "release_yaml, config",
    [("sam2/sam2_hiera_l.yaml", "hiera_l"), ("sam2.1/sam2.1_hiera_l.yaml", "hiera_l_v2_1")],
    ids=["sam2_hiera_large.pt", "sam2.1_hiera_large.pt"],
)
def test_sam2_release_files_load_strictly(release_yaml, config):
    """Meta's ``{"model": state_dict}`` files, shapes from the sam2 package's own yamls."""
    release = {"model": synthetic_state(sam2_shapes(sam2_yaml_path(release_yaml)))}
    report = compare_state_dict(project_sam2(config), release["model"], release_yaml)
    assert report.ok, report.summary()


def test_a_sam2_0_file_does_not_fit_a_sam2_1_graph():
    sam2_0 = synthetic_state(sam2_shapes(sam2_yaml_path("sam2/sam2_hiera_l.yaml")))
    report = compare_state_dict(project_sam2("hiera_l_v2_1"), sam2_0, "sam2_hiera_large.pt")
    assert sorted(report.missing) == [
        "no_obj_embed_spatial",
        "obj_ptr_tpos_proj.bias",
        "obj_ptr_tpos_proj.weight",
    ]
