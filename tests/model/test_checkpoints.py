"""Checkpoint loaders: every layout round-trips from a tiny model, every mismatch raises."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.checkpoints import LEGACY_LORA, LORA, LORA_SPEC, write_training_checkpoint
from safetensors.torch import load_file, save_file
from torch import Tensor

from sa2va.model.checkpoints import (
    CheckpointMismatchError,
    check_pretrained_files,
    load_official_sa2va,
    load_sam2_checkpoint,
    split_internlm2_wqkv,
)
from sa2va.model.mllm import build_mllm
from sa2va.model.sa2va import Sa2VA
from sa2va.model.sam2 import build_sam2
from sa2va.model.trained import load_trained
from sa2va.utils import to_plain


@pytest.fixture
def model_cfg(compose_cfg) -> dict:
    cfg = to_plain(compose_cfg().model)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build(model_cfg: dict, seed: int, **changes) -> Sa2VA:
    torch.manual_seed(seed)
    return Sa2VA(**{**model_cfg, **changes})


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


# ----------------------------------------------------------------- (a) HF InternVL folder


def test_hf_internvl_folder_loads_and_a_missing_tensor_fails(model_cfg, tmp_path):
    torch.manual_seed(0)
    parts = build_mllm(**model_cfg["mllm"])
    folder = tmp_path / "InternVL-tiny-hf"
    parts.model.save_pretrained(folder)
    parts.tokenizer.save_pretrained(folder)
    parts.image_processor.save_pretrained(folder)

    loaded = build_mllm(path=str(folder))
    assert_same_weights(parts.model, loaded.model)

    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "layers.0.mlp.up_proj" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing.*layers\.0\.mlp\.up_proj"):
        build_mllm(path=str(folder))


# ------------------------------------------------------------------------------ (b) SAM2


def test_sam2_checkpoint_round_trip_and_every_kind_of_mismatch(model_cfg, tmp_path):
    torch.manual_seed(0)
    trained = build_sam2(model_cfg["sam2"])
    state = trained.state_dict()
    good = tmp_path / "sam2.pt"
    torch.save({"model": state}, good)

    torch.manual_seed(1)
    fresh = build_sam2(model_cfg["sam2"])
    report = load_sam2_checkpoint(fresh, good)
    assert report.ok and len(report.loaded) == len(state)
    assert_same_weights(trained, fresh)

    key = "sam_mask_decoder.iou_token.weight"
    cases = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "sam_mask_decoder.extra.weight": torch.zeros(1)},
        "shape mismatch": {**state, key: torch.zeros(3, 3)},
    }
    for kind, bad_state in cases.items():
        torch.save({"model": bad_state}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointMismatchError, match=kind):
            load_sam2_checkpoint(build_sam2(model_cfg["sam2"]), tmp_path / "bad.pt")

    torch.save(cases["missing"], tmp_path / "flat.pt")  # not the {"model": ...} layout
    with pytest.raises(ValueError, match="expected \\{'model': state_dict\\}"):
        load_sam2_checkpoint(build_sam2(model_cfg["sam2"]), tmp_path / "flat.pt")

    torch.save({"model": cases["missing"]}, tmp_path / "partial.pt")
    report = load_sam2_checkpoint(fresh, tmp_path / "partial.pt", expected_missing=["sam_mask*"])
    assert report.expected_missing == [key]


# ------------------------------------------------------------------- (c) official Sa2VA
# The inverse of the key map, written out from the official layouts (not from our map).


def fuse_internlm2_qkv(q: Tensor, k: Tensor, v: Tensor, num_kv_heads: int) -> Tensor:
    """InternLM2's wqkv: per KV head, its query heads, then its key, then its value."""
    rows = []
    groups_q, ks, vs = q.chunk(num_kv_heads), k.chunk(num_kv_heads), v.chunk(num_kv_heads)
    for group_q, group_k, group_v in zip(groups_q, ks, vs, strict=True):
        rows += [group_q, group_k, group_v]
    return torch.cat(rows)


def to_official(model: Sa2VA) -> dict[str, Tensor]:
    """Our state dict in the official (xtuner training) layout."""
    text = model.mllm.config.text_config
    internlm2 = text.model_type == "llama"
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        fused_vision = re.match(r"mllm\.model\.vision_tower\..*attention\.[kv]_proj", key)
        fused_text = internlm2 and re.match(r"mllm\.model\.language_model\..*[kv]_proj", key)
        if fused_vision or fused_text:
            continue  # folded into the q_proj entry below
        if m := re.match(r"mllm\.model\.vision_tower\.encoder\.layer\.(\d+)\.(.*)", key):
            layer, rest = m.groups()
            prefix = f"mllm.model.vision_model.encoder.layers.{layer}."
            if rest.startswith("attention.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts)
                continue
            rest = (
                rest.replace("lambda_", "ls")
                .replace("attention.projection_layer", "attn.proj")
                .replace("layernorm_before", "norm1")
                .replace("layernorm_after", "norm2")
            )
            out[prefix + rest] = tensor
        elif key.startswith("mllm.model.vision_tower.embeddings."):
            rest = (
                key.removeprefix("mllm.model.vision_tower.embeddings.")
                .replace("cls_token", "class_embedding")
                .replace("position_embeddings", "position_embedding")
                .replace("patch_embeddings.projection", "patch_embedding")
            )
            out[f"mllm.model.vision_model.embeddings.{rest}"] = tensor
        elif key.startswith("mllm.model.multi_modal_projector."):
            rest = key.removeprefix("mllm.model.multi_modal_projector.")
            for ours, theirs in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
                rest = rest.replace(ours, theirs)
            out[f"mllm.model.mlp1.{rest}"] = tensor
        elif key.startswith("mllm.model.language_model."):
            rest = key.removeprefix("mllm.model.language_model.")
            if internlm2:
                if "self_attn.q_proj" in rest:
                    qkv = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                    fused = fuse_internlm2_qkv(*qkv, text.num_key_value_heads)
                    out[f"mllm.model.language_model.model.{rest}".replace(
                        "self_attn.q_proj", "attention.wqkv")] = fused  # fmt: skip
                    continue
                for ours, theirs in (
                    ("embed_tokens", "tok_embeddings"),
                    ("self_attn.o_proj", "attention.wo"),
                    ("mlp.gate_proj", "feed_forward.w1"),
                    ("mlp.up_proj", "feed_forward.w3"),
                    ("mlp.down_proj", "feed_forward.w2"),
                    ("input_layernorm", "attention_norm"),
                    ("post_attention_layernorm", "ffn_norm"),
                ):
                    rest = rest.replace(ours, theirs)
            out[f"mllm.model.language_model.model.{rest}"] = tensor
        elif key == "mllm.lm_head.weight":
            head = "output" if internlm2 else "lm_head"
            out[f"mllm.model.language_model.{head}.weight"] = tensor
        elif key.startswith("sam2."):
            out["grounding_encoder.sam2_model." + key.removeprefix("sam2.")] = tensor
        else:
            out[key] = tensor
    return out


def to_release(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """The HF release layout (ByteDance/Sa2VA-*): no `mllm.model.`, `.gamma` -> `.g_weight`."""
    return {
        k.removeprefix("mllm.model.").replace(".gamma", ".g_weight"): v.clone()
        for k, v in official.items()
    }


def test_internlm2_wqkv_split_follows_the_grouped_layout():
    # 4 query heads in 2 KV groups, head_dim 1: rows q0 q1 k0 v0 | q2 q3 k1 v1
    rows = torch.tensor([[0.0], [1.0], [10.0], [20.0], [2.0], [3.0], [11.0], [21.0]])
    q, k, v = split_internlm2_wqkv(rows, num_heads=4, num_kv_heads=2)
    assert q.flatten().tolist() == [0, 1, 2, 3]
    assert k.flatten().tolist() == [10, 11]
    assert v.flatten().tolist() == [20, 21]


@pytest.mark.parametrize("family", ["qwen2", "internlm2"])
@pytest.mark.parametrize("layout", ["training_pth", "hf_release"])
def test_official_sa2va_round_trip(model_cfg, tmp_path, family, layout):
    if family == "internlm2":
        text = {**model_cfg["mllm"]["config"]["text_config"], "model_type": "llama",
                "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
        mllm = {**model_cfg["mllm"], "config": {**model_cfg["mllm"]["config"], "text_config": text}}
        model_cfg = {**model_cfg, "mllm": mllm}
    model_cfg["mllm"]["config"]["vision_config"]["attention_bias"] = True  # qkv bias split too
    original = build(model_cfg, seed=0)
    official = to_official(original)
    if layout == "training_pth":
        path = tmp_path / "Sa2VA.pth"
        torch.save(official, path)
    else:
        path = tmp_path / "Sa2VA-hf"
        path.mkdir()
        save_file(to_release(official), path / "model-00001-of-00001.safetensors")
    fresh = build(model_cfg, seed=1)
    report = load_official_sa2va(fresh, path)
    assert report.ok and not report.expected_missing
    assert_same_weights(original, fresh)


def test_official_partial_load_and_mismatches(model_cfg, tmp_path):
    # a "26B" source for an "8B" target: LLM and projector shapes differ, SAM2 matches
    wide = {**model_cfg["mllm"]["config"]["text_config"], "hidden_size": 96}
    big_mllm = {**model_cfg["mllm"], "config": {**model_cfg["mllm"]["config"], "text_config": wide}}
    source = build(model_cfg, seed=0, mllm=big_mllm)
    path = tmp_path / "big.pth"
    torch.save(to_official(source), path)

    target = build(model_cfg, seed=1)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_official_sa2va(target, path)

    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_official_sa2va(target, path, include=["sam2."])
    assert report.loaded and all(k.startswith("sam2.") for k in report.loaded)
    after = target.state_dict()
    for key in after:
        expected = source.state_dict()[key] if key.startswith("sam2.") else before[key]
        assert torch.equal(after[key], expected), key

    lora = {
        **to_official(source),
        "mllm.model.language_model.base_model.model.x.lora_A.weight": torch.zeros(1),
    }
    torch.save(lora, path)
    with pytest.raises(ValueError, match="unmerged LoRA"):
        load_official_sa2va(target, path)


def test_model_config_can_start_from_an_official_checkpoint(model_cfg, tmp_path):
    source = build(model_cfg, seed=0)
    path = tmp_path / "Sa2VA.pth"
    torch.save(to_official(source), path)
    init = {"path": str(path), "include": ["sam2."]}
    model = build(model_cfg, seed=1, init_from_sa2va=init)
    assert model.config["init_from_sa2va"] == init  # recorded; rebuilt without reading it
    assert_same_weights(model.sam2, source.sam2)
    assert not torch.equal(model.text_hidden_fcs[0].weight, source.text_hidden_fcs[0].weight)
    missing = {**init, "path": str(tmp_path / "gone.pth")}
    assert build(model_cfg, seed=1, init_from_sa2va=missing, load_pretrained=False)


# --------------------------------------------------------------- (d) training checkpoints


@pytest.mark.parametrize("layout", ["model.lora", "legacy freeze.lora"])
def test_load_trained_round_trip_with_lora_and_no_pretrained_file(model_cfg, tmp_path, layout):
    """LoRA is architecture (``model.lora``); a checkpoint written when the freeze policy
    held it (``freeze.lora``) rebuilds the same adapters."""
    model = build(
        model_cfg,
        seed=0,
        sam2_ckpt=str(tmp_path / "gone.pt"),
        load_pretrained=False,
        lora=LORA_SPEC,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "trained.ckpt"
    if layout == "model.lora":
        write_training_checkpoint(path, model, LORA)
    else:
        write_training_checkpoint(path, model, LEGACY_LORA, {**model.config, "lora": None})

    loaded, meta = load_trained(path)
    assert_same_weights(model, loaded)
    freeze = LORA if layout == "model.lora" else LEGACY_LORA
    assert not loaded.training and meta["global_step"] == 7 and meta["freeze"] == freeze


def test_load_trained_refuses_mismatches(model_cfg, tmp_path):
    model = build(model_cfg, seed=0)
    checkpoint_path = tmp_path / "trained.ckpt"
    write_training_checkpoint(checkpoint_path, model, None)
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    state = checkpoint["state_dict"]
    dropped = "model.text_hidden_fcs.2.weight"
    variants = {
        "missing.*text_hidden_fcs": {k: v for k, v in state.items() if k != dropped},
        "unexpected.*extra": {**state, "model.extra.weight": torch.zeros(1)},
    }
    for message, bad in variants.items():
        torch.save({**checkpoint, "state_dict": bad}, checkpoint_path)
        with pytest.raises(CheckpointMismatchError, match=message):
            load_trained(checkpoint_path)

    torch.save({**checkpoint, "sa2va": {**checkpoint["sa2va"], "model_class": "os.system"}},
               checkpoint_path)  # fmt: skip
    with pytest.raises(ValueError, match="not one of this project's"):
        load_trained(checkpoint_path)

    config = {**checkpoint["sa2va"]["model"]}
    config["mllm"] = {**config["mllm"], "path": str(tmp_path / "moved-away")}
    torch.save({**checkpoint, "sa2va": {**checkpoint["sa2va"], "model": config}}, checkpoint_path)
    with pytest.raises(FileNotFoundError, match="moved-away: not found"):
        load_trained(checkpoint_path)


def test_real_models_refuse_to_train_without_local_files(compose_cfg, tmp_path):
    cfg = compose_cfg("model=sa2va_1b", "model.mllm.path=null", "model.sam2_ckpt=null")
    with pytest.raises(FileNotFoundError, match="model.mllm.path.*SA2VA_MLLM_PATH"):
        check_pretrained_files(cfg)
    cfg = compose_cfg("model=sa2va_1b", f"model.mllm.path={tmp_path}", "model.sam2_ckpt=/no.pt")
    with pytest.raises(FileNotFoundError, match="model.sam2_ckpt=/no.pt: not found"):
        check_pretrained_files(cfg)
    cfg = compose_cfg(
        "model=sa2va_1b", f"model.mllm.path={tmp_path}", f"model.sam2_ckpt={tmp_path / 'x.pt'}",
        "+model.init_from_sa2va.path=/no/Sa2VA-26B.pth",
    )  # fmt: skip
    (tmp_path / "x.pt").touch()
    with pytest.raises(FileNotFoundError, match="init_from_sa2va.path=/no/Sa2VA-26B.pth"):
        check_pretrained_files(cfg)
    check_pretrained_files(compose_cfg())  # the tiny model needs nothing
