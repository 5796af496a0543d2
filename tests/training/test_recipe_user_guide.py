"""The user's training guide recipe trains a step, from stand-ins of its three files.

The guide starts an 8B Sa2VA from

(a) ``OpenGVLab/InternVL3-8B`` in its original layout as ``model.mllm.path``: ``config.json``
    (``internvl_chat``), a tokenizer without the Sa2VA tokens, ``model.safetensors`` with
    ``vision_model.*``, ``mlp1.*``, ``language_model.*``;
(b) ``Sa2VA-26B.pth`` as ``model.init_from_sa2va={path, include: [sam2.]}``: xtuner's
    ``{"state_dict": ...}`` with ``mllm.model.*`` (InternViT-6B, InternLM2 LLM),
    ``grounding_encoder.sam2_model.*`` (Meta's names, ``.gamma``) and ``text_hidden_fcs.*``;
(c) ``sam2_hiera_large.pt`` (SAM 2.0, ``{"model": state_dict}``) as ``model.sam2_ckpt``.

The stand-ins hold the real key names, written by :mod:`sa2va.model.releases` from the
official module layouts, at reduced width and depth. (a) is the InternViT-300M + Qwen2.5
(GQA, untied) layout of InternVL3-8B with the numbers of the fixture's official tiny chat
model; (b) has InternViT-6B's layout (qk-norm, RMSNorm, no qkv bias) and an InternLM2 wider
than (a)'s LLM, as 6144 is wider than 3584; both SAM 2 files have the fixture's tiny SAM 2.0
graph, which the model uses. The model config is ``model=sa2va_8b`` with those files.

Which SAM 2 wins: ``Sa2VA`` loads ``sam2_ckpt`` first and ``init_from_sa2va`` after it, so with
``include: [sam2.]`` the .pth's SAM 2 replaces every SAM 2 tensor of the .pt; the .pt must
still load strictly (a wrong file fails), and matters only when ``include`` leaves SAM 2 out.
Of the 26B's ``text_hidden_fcs`` (Linear(6144, 6144), Linear(6144, 256)) only the last bias
(256,) fits an 8B model; the recipe takes SAM 2 only, so the [SEG] projector starts fresh
(``include: [sam2., text_hidden_fcs.2.bias]`` would take that bias too).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers.configs import FAST_DATA
from helpers.official_fixtures import RELEASE as CHAT
from helpers.official_fixtures import SAM2_YAML
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import sa2va.training.run
from sa2va.model import checkpoints
from sa2va.model.checkpoints import CheckpointMismatchError, read_state_dict
from sa2va.model.mllm import SA2VA_SPECIAL_TOKENS
from sa2va.model.release_layout import write_release_weights
from sa2va.model.releases import (
    Release,
    TextSpec,
    VisionSpec,
    release_from_config,
    release_shapes,
    sam2_shapes,
    synthetic_state,
)

# Sa2VA-26B's layout at reduced size: InternViT-6B-like vision, an InternLM2 wider than (a)'s
SA2VA_26B = Release(
    "Sa2VA-26B.pth",
    VisionSpec(48, 2, 2, 96, qkv_bias=False, qk_norm=True, norm="rms_norm", image=56),
    TextSpec("internlm2", 96, 2, 4, 2, 160, 60),
    config="sa2va_26b",
    layout="xtuner",
)


def internvl3_8b() -> Release:
    """InternVL3-8B's layout with the numbers of the fixture's official tiny chat config."""
    release = release_from_config("OpenGVLab/InternVL3-8B", read_json(CHAT / "config.json"), None)
    return dataclasses.replace(release, config="sa2va_8b", layout="internvl")


def read_json(file: Path) -> dict:
    return json.loads(file.read_text())


def write_internvl3_folder(folder: Path) -> Path:
    """(a): config.json, tokenizer and weights of an OpenGVLab/InternVL3 original folder."""
    folder.mkdir()
    tokenizer = read_json(CHAT / "tokenizer.json")  # Qwen2 BPE; InternVL ships no [SEG]
    tokenizer["added_tokens"] = [
        t for t in tokenizer["added_tokens"] if t["content"] not in SA2VA_SPECIAL_TOKENS
    ]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_bytes((CHAT / "tokenizer_config.json").read_bytes())
    release = internvl3_8b()
    config = read_json(CHAT / "config.json")
    config.pop("auto_map")
    config.update(model_type="internvl_chat", architectures=["InternVLChatModel"])
    config.update(template="internvl2_5")  # InternVL's own template name, not Sa2VA's
    config["llm_config"]["vocab_size"] = release.vocab
    (folder / "config.json").write_text(json.dumps(config))
    write_release_weights(synthetic_state(release_shapes(release), "cpu", seed=1), folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed002")
    sam2 = sam2_shapes(SAM2_YAML)
    sa2va_26b = root / "Sa2VA-26B.pth"
    state = synthetic_state(release_shapes(SA2VA_26B, sam2), "cpu", seed=2)
    torch.save({"state_dict": state, "meta": {"iter": 1}}, sa2va_26b)
    sam2_large = root / "sam2_hiera_large.pt"
    torch.save({"model": synthetic_state(sam2, "cpu", seed=3)}, sam2_large)
    return {
        "internvl3": write_internvl3_folder(root / "InternVL3-8B"),
        "sa2va_26b": sa2va_26b,
        "sam2": sam2_large,
    }


def recipe_cfg(compose_cfg, files: dict[str, Path], include: str = "sam2."):
    """``model=sa2va_8b`` on the stand-ins, user's-guide freezing, one step on tiny data."""
    cfg = compose_cfg(
        "model=sa2va_8b",
        "freeze=user_guide",
        *FAST_DATA,
        f"model.mllm.path='{files['internvl3']}'",
        f"model.sam2_ckpt='{files['sam2']}'",
        f"model.init_from_sa2va={{path:'{files['sa2va_26b']}',include:[{include}]}}",
        "model.mllm.dtype=float32",  # the 8B config trains in bf16; fp32 compares exactly
        "model.mllm.max_tiles=1",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
    )
    sam2 = OmegaConf.load(SAM2_YAML).model  # the stand-ins' SAM 2.0 graph
    sam2._target_ = "sa2va.model.sam2.LanguagePromptedSAM2"
    with open_dict(cfg):
        cfg.model.sam2 = sam2
    return cfg


def plain_name(key: str) -> str:
    """A model key without peft's LoRA wrapping (``base_model.model.``, ``.base_layer``)."""
    return key.replace("base_model.model.", "").replace(".base_layer", "")


def train_recorded(cfg, monkeypatch) -> dict:
    """One step through ``sa2va.training.run.train``; records the model as built (and its state),
    and what the SAM 2 ``.pt`` load reported."""
    recorded: dict = {}
    build, load_sam2 = sa2va.training.run.build, checkpoints.load_sam2_checkpoint

    def recording_build(cfg):
        module, datamodule = build(cfg)
        recorded["module"] = module
        recorded["before"] = {k: v.clone() for k, v in module.model.state_dict().items()}
        return module, datamodule

    def recording_load_sam2(sam2, path, *args, **kwargs):
        recorded["sam2_report"] = load_sam2(sam2, path, *args, **kwargs)
        return recorded["sam2_report"]

    monkeypatch.setattr(sa2va.training.run, "build", recording_build)
    monkeypatch.setattr(checkpoints, "load_sam2_checkpoint", recording_load_sam2)
    recorded["summary"] = sa2va.training.run.train(cfg)
    recorded["after"] = recorded["module"].model.state_dict()
    return recorded


def test_seed002_recipe_loads_every_file_and_trains_one_step(compose_cfg, files, monkeypatch):
    run = train_recorded(recipe_cfg(compose_cfg, files), monkeypatch)
    assert run["summary"]["status"] == "completed" and run["summary"]["global_step"] == 1
    assert run["summary"]["skipped_steps"] == 0  # a finite loss and finite gradients
    before, after = run["before"], run["after"]
    plain = {plain_name(k): k for k in before}

    # (a) InternVL3-8B original: hand-written names (the project's map is not used here)
    internvl = read_state_dict(files["internvl3"])
    vision = "mllm.model.vision_tower."
    patch = internvl["vision_model.embeddings.patch_embedding.weight"]
    assert torch.equal(before[vision + "embeddings.patch_embeddings.projection.weight"], patch)
    q, k, v = internvl["vision_model.encoder.layers.1.attn.qkv.weight"].chunk(3)
    for name, part in zip("qkv", (q, k, v), strict=True):
        key = f"{vision}encoder.layer.1.attention.{name}_proj.weight"
        assert torch.equal(before[key], part), key
    text = "mllm.model.language_model."
    for ours, theirs in [
        ("layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight"),
        ("layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
        ("norm.weight", "model.norm.weight"),
    ]:
        assert torch.equal(before[plain[text + ours]], internvl["language_model." + theirs])
    projector = internvl["mlp1.1.weight"]
    assert torch.equal(before["mllm.model.multi_modal_projector.linear_1.weight"], projector)
    # the 5 Sa2VA tokens are new rows after the file's vocabulary, as official resizes
    vocab = internvl["language_model.model.embed_tokens.weight"].shape[0]
    for ours, theirs in [
        (plain[text + "embed_tokens.weight"], "language_model.model.embed_tokens.weight"),
        ("mllm.lm_head.weight", "language_model.lm_head.weight"),
    ]:
        assert before[ours].shape[0] == vocab + len(SA2VA_SPECIAL_TOKENS)
        assert torch.equal(before[ours][:vocab], internvl[theirs])

    # (c) the SAM 2 .pt loads strictly, every key; (b) the .pth's SAM 2 then replaces it all
    pt = read_state_dict(files["sam2"], key="model")
    assert run["sam2_report"].ok and sorted(run["sam2_report"].loaded) == sorted(pt)
    pth = read_state_dict(files["sa2va_26b"])
    sam2 = {k.removeprefix("grounding_encoder.sam2_model."): t for k, t in pth.items()}
    sam2 = {k: t for k, t in sam2.items() if k in pt}
    assert sam2.keys() == pt.keys()  # Meta's names (.gamma) in both files
    for key, tensor in sam2.items():
        assert torch.equal(before["sam2." + key], tensor), key
        assert not torch.equal(before["sam2." + key], pt[key]), key

    # the step changes trainable weights only, and every part the policy trains (measured:
    # 150 of 171 trainable tensors; SAM 2's IoU head gets no gradient, as its output only
    # picks the mask, nor do the biases of the two mask tokens not picked)
    trainable = {n for n, p in run["module"].model.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, sorted(changed - trainable)
    for part in (
        "lora_B",
        "multi_modal_projector.",
        "embed_tokens.",
        "lm_head.",
        "text_hidden_fcs.",
        "sam2.sam_mask_decoder.",
    ):
        assert any(part in k for k in changed), part
    assert not any(
        k.startswith(("mllm.model.vision_tower.", "sam2.image_encoder.")) for k in trainable
    )


def test_of_the_26b_projector_only_the_last_bias_fits_an_8b(compose_cfg, files):
    """``text_hidden_fcs`` = Linear(H, H), Linear(H, 256): only the last bias (256,) does not
    follow the LLM width. Asking for the whole projector fails, naming each misfit."""
    whole = recipe_cfg(compose_cfg, files, include="sam2.,text_hidden_fcs.")
    with pytest.raises(InstantiationException) as error:
        instantiate(whole.model)
    assert isinstance(error.value.__cause__, CheckpointMismatchError)
    for misfit in ("0.weight checkpoint (96, 96) vs model (64, 64)", "0.bias", "2.weight"):
        assert f"text_hidden_fcs.{misfit}" in str(error.value.__cause__)
    assert "text_hidden_fcs.2.bias" not in str(error.value.__cause__)
    model = instantiate(
        recipe_cfg(compose_cfg, files, include="sam2.,text_hidden_fcs.2.bias").model
    )
    bias = read_state_dict(files["sa2va_26b"])["text_hidden_fcs.2.bias"]
    assert torch.equal(model.text_hidden_fcs[2].bias, bias)
