"""Official folders other than fixture 3's release itself, built from it: an InternVL original
(`internvl_chat`, no Sa2VA tokens or heads), a release holding SAM 2, broken releases, and the
Qwen-VL based Sa2VA variants that are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.official_fixtures import RELEASE, build_release_model
from safetensors.torch import load_file, save_file

from sa2va.model.checkpoints import CheckpointMismatchError
from sa2va.model.mllm import SA2VA_SPECIAL_TOKENS, build_mllm, official_internvl_config
from sa2va.model.sam2 import build_sam2

N_SA2VA = len(SA2VA_SPECIAL_TOKENS)


def copy_release(tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(RELEASE, folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def internvl_original(tmp_path: Path) -> Path:
    """The release as an `OpenGVLab/InternVL*` original: model_type internvl_chat, InternVL's
    own template name, no Sa2VA tokens, no text_hidden_fcs."""
    folder = copy_release(tmp_path)
    weights = load_file(folder / "model.safetensors")
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    vocab = next(a["id"] for a in added if a["content"] == SA2VA_SPECIAL_TOKENS[0])
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        weights[key] = weights[key][:vocab].clone()
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("text_hidden_fcs.")},
        folder / "model.safetensors",
    )

    def as_internvl(cfg: dict) -> None:
        cfg.update(model_type="internvl_chat", template="internvl2_5")
        cfg["llm_config"]["vocab_size"] = vocab

    edit_json(folder / "config.json", as_internvl)
    edit_json(
        folder / "tokenizer.json",
        lambda t: t.update(added_tokens=[a for a in t["added_tokens"] if a["id"] < vocab]),
    )
    return folder


def test_internvl_original_gets_the_sa2va_vocabulary_and_keeps_its_weights(tmp_path):
    release = build_mllm(path=str(RELEASE))
    original = build_mllm(path=str(internvl_original(tmp_path)))
    assert len(original.tokenizer) == len(release.tokenizer)
    assert original.tokenizer.convert_tokens_to_ids(SA2VA_SPECIAL_TOKENS) == (
        release.tokenizer.convert_tokens_to_ids(SA2VA_SPECIAL_TOKENS)
    )
    assert original.model.get_input_embeddings().num_embeddings == len(release.tokenizer)
    kept = len(release.tokenizer) - N_SA2VA
    ours, theirs = original.model.state_dict(), release.model.state_dict()
    for key, value in theirs.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(ours[key][:kept], value[:kept]), key
        else:
            assert torch.equal(ours[key], value), key
    assert original.template == release.template  # InternVL's own template -> qwen_chat


def test_release_with_sam2_loads_it_and_refuses_a_second_sam2(tmp_path):
    folder = copy_release(tmp_path)
    torch.manual_seed(1)
    sam2_cfg = build_release_model().config["sam2"]
    sam2_state = build_sam2(sam2_cfg).state_dict()
    weights = load_file(folder / "model.safetensors")
    for key, value in sam2_state.items():  # the release converter's naming
        weights["grounding_encoder.sam2_model." + key.replace(".gamma", ".g_weight")] = value
    save_file(weights, folder / "model.safetensors")

    model = build_release_model(folder)
    for key, value in model.sam2.state_dict().items():
        assert torch.equal(value, sam2_state[key]), key
    with pytest.raises(ValueError, match="sam2_ckpt=null"):
        build_release_model(folder, sam2_ckpt=str(tmp_path / "other.pt"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop", r"missing.*layers\.1\.mlp\.up_proj"),
        ("extra", r"unexpected.*model\.language_model\.extra"),
        ("drop_head", r"missing.*text_hidden_fcs\.2\.bias"),
    ],
)
def test_broken_release_fails_naming_the_keys(tmp_path, damage, message):
    folder = copy_release(tmp_path)
    weights = load_file(folder / "model.safetensors")
    if damage == "drop":
        del weights["language_model.model.layers.1.mlp.up_proj.weight"]
    elif damage == "extra":
        weights["language_model.model.extra"] = torch.zeros(1)
    else:
        del weights["text_hidden_fcs.2.bias"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=message):
        build_release_model(folder)


def test_qwen_vl_based_sa2va_is_refused_plainly(tmp_path):
    folder = copy_release(tmp_path)

    def as_qwen_vl(cfg: dict) -> None:
        cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
        cfg["vision_config"] = {"architectures": ["Qwen2_5_VisionTransformerPretrainedModel"]}

    edit_json(folder / "config.json", as_qwen_vl)
    with pytest.raises(ValueError, match="Qwen2.5-VL / Qwen3-VL are not"):
        build_mllm(path=str(folder))


def test_internlm2_and_intern_vit_6b_configs_convert_to_hf_native():
    """Sa2VA-26B's shape of config.json (InternViT-6B: RMSNorm, QK-norm, no qkv bias;
    InternLM2 with dynamic RoPE scaling) -> Llama text config, untied as it says."""
    cfg = json.loads((RELEASE / "config.json").read_text())
    cfg["vision_config"].update(norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
    cfg["llm_config"] = {
        "model_type": "internlm2",
        "architectures": ["InternLM2ForCausalLM"],
        "vocab_size": 92558,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "bias": False,
        "tie_word_embeddings": False,
    }
    hf = official_internvl_config(cfg, image_token_id=92546, source="test")
    vision, text = hf.vision_config, hf.text_config
    assert vision.norm_type == "rms_norm" and vision.use_qk_norm and not vision.attention_bias
    assert text.model_type == "llama" and text.vocab_size == 92558
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.rope_parameters["rope_type"] == "dynamic" and not text.attention_bias
    assert hf.tie_word_embeddings is False and hf.image_token_id == 92546
