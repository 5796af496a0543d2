"""Every supported official checkpoint, in its exact key names and shapes, loads strictly
into the project config shaped like it, and maps back to the same keys.

The synthetic checkpoints come from :mod:`sa2va.model.releases`: key names and shapes
written out from the official module layout and the releases' published ``config.json``
numbers (sources in its docstring), never from this project's model; the formulas are
checked against the official tiny chat model (``tests/fixtures/official_sa2va``). Tensors
live on the meta device, so a 26B release costs no memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors import safe_open

from sa2va.model.checkpoints import compare_state_dict, official_to_sa2va
from sa2va.model.release_layout import sa2va_to_official, sa2va_to_release
from sa2va.model.releases import (
    RELEASES,
    Release,
    on_meta,
    release_from_config,
    release_shapes,
    sam2_shapes,
    synthetic_state,
)
from sa2va.utils import to_plain

FIXTURE = Path(__file__).parent / "fixtures" / "official_sa2va"
CHAT = FIXTURE / "sa2va_chat_tiny"
# SAM 2.0 (every official Sa2VA) has neither of SAM 2.1's no_obj_embed_spatial and
# obj_ptr_tpos_proj. Until conf/model/sam2 holds a SAM 2.0 Hiera-L for the sa2va_* configs
# to default to, these flags turn the configured SAM 2.1 Hiera-L into SAM 2.0's graph.
SAM2_V2_0_FLAGS = {
    "no_obj_embed_spatial": False,
    "add_tpos_enc_to_obj_ptrs": False,
    "proj_tpos_enc_in_obj_ptrs": False,
    "use_signed_tpos_enc_to_obj_ptrs": False,
}


def test_shapes_match_the_official_tiny_chat_model():
    """The shape formulas reproduce a checkpoint the official code wrote, key for key."""
    release = release_from_config("sa2va_chat_tiny", json.loads((CHAT / "config.json").read_text()), None)
    with safe_open(CHAT / "model.safetensors", "pt") as f:
        official = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sam2 = torch.load(FIXTURE / "sam2_tiny_v2_0.pt", weights_only=True)["model"]
    sam2 = {k: tuple(v.shape) for k, v in sam2.items()}
    assert sam2_shapes(FIXTURE / "sam2_tiny_v2_0.yaml") == sam2
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
    """``conf/model/<release.config>.yaml`` on the meta device; the vocabulary is the
    release's (Sa2VA's 5 added tokens are the tokenizer's business, not the config's)."""
    cfg = compose_cfg(f"model={release.config}")
    with open_dict(cfg):
        cfg.model.mllm.path = None
        cfg.model.mllm.config.text_config.vocab_size = release.vocab
        cfg.model.sam2.update(SAM2_V2_0_FLAGS)
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
