"""SAM2 checkpoints: SAM 2.0 vs 2.1 mismatches say why, and the HF release's names load.

Small synthetic state dicts: the tiny SAM 2.0 of the official fixtures (tests/fixtures)
and the same model with SAM 2.1's flags.
"""

from __future__ import annotations

import pytest
import torch
from helpers.official_fixtures import tiny_sam2_config

from sa2va.model.checkpoints import CheckpointMismatchError, load_sam2_checkpoint
from sa2va.model.sam2 import build_sam2, sam2_version_mismatch

SAM2_1_FLAGS = {
    "no_obj_embed_spatial": True,
    "add_tpos_enc_to_obj_ptrs": True,
    "proj_tpos_enc_in_obj_ptrs": True,
    "use_signed_tpos_enc_to_obj_ptrs": True,
}


def tiny_sam2(version: str):
    torch.manual_seed(0)
    return build_sam2(tiny_sam2_config(**(SAM2_1_FLAGS if version == "2.1" else {})))


def save(tmp_path, state, name="sam2.pt"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def test_sam2_1_file_in_a_sam2_0_config_says_why(tmp_path):
    path = save(tmp_path, tiny_sam2("2.1").state_dict())
    message = r"SAM 2\.1 checkpoint given to a SAM 2\.0 config: use model/sam2=hiera_.*_v2_1"
    with pytest.raises(CheckpointMismatchError, match=message) as error:
        load_sam2_checkpoint(tiny_sam2("2.0"), path)
    assert "unexpected in the checkpoint: " in str(error.value)  # the keys are still listed
    assert "no_obj_embed_spatial" in str(error.value)


def test_sam2_0_file_in_a_sam2_1_config_says_why(tmp_path):
    path = save(tmp_path, tiny_sam2("2.0").state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"SAM 2\.0 checkpoint .* SAM 2\.1 config"):
        load_sam2_checkpoint(tiny_sam2("2.1"), path)


def test_other_mismatches_give_no_version_cause(tmp_path):
    state = tiny_sam2("2.0").state_dict()
    state.pop("sam_mask_decoder.iou_token.weight")
    with pytest.raises(CheckpointMismatchError) as error:
        load_sam2_checkpoint(tiny_sam2("2.0"), save(tmp_path, state))
    assert "SAM 2." not in str(error.value) and "iou_token" in str(error.value)


def test_the_cause_names_the_config_of_the_file_s_size():
    hiera_l = [f"image_encoder.trunk.blocks.{i}.attn.qkv.weight" for i in range(48)]
    sam2_1 = ["no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"]
    assert sam2_version_mismatch(hiera_l, hiera_l + sam2_1) == (
        "SAM 2.1 checkpoint given to a SAM 2.0 config: use model/sam2=hiera_l_v2_1"
    )
    assert sam2_version_mismatch(hiera_l + sam2_1, hiera_l).endswith("use model/sam2=hiera_l")
    assert sam2_version_mismatch(hiera_l, hiera_l) is None


def test_official_hf_release_names_g_weight_load_as_gamma(tmp_path):
    source = tiny_sam2("2.0")
    state = {k.replace(".gamma", ".g_weight"): v for k, v in source.state_dict().items()}
    assert sum(k.endswith(".g_weight") for k in state) == 2  # the memory fuser's 2 CXBlocks
    target = tiny_sam2("2.0")
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    report = load_sam2_checkpoint(target, save(tmp_path, state))
    assert report.ok
    loaded = target.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(loaded[name], value), name
