"""The official Sa2VA golden fixtures (tests/fixtures/official_sa2va, see its README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sa2va.model.sa2va import Sa2VA

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_sa2va"
# fixture 3: an official HF release folder (config.json, weights, tokenizer, image.png)
RELEASE = FIXTURES / "sa2va_chat_tiny"
SAM2_YAML = FIXTURES / "sam2_tiny_v2_0.yaml"


def tiny_sam2_config(**flags: Any) -> dict[str, Any]:
    """The fixtures' tiny SAM 2.0 architecture as a ``conf/model/sam2`` node: its yaml names
    the sam2 package's ``SAM2Base``; the project builds its [SEG]-prompted subclass."""
    cfg = OmegaConf.to_container(OmegaConf.load(SAM2_YAML).model)
    return {**cfg, "_target_": "sa2va.model.sam2.LanguagePromptedSAM2", **flags}


def build_release_model(release: Path = RELEASE, sam2_ckpt: str | None = None, **model) -> Sa2VA:
    """The project's Sa2VA from an official release folder, with the fixture's tiny SAM 2.0
    (weights from `sam2_ckpt` if given), in fp32 with eager attention as the fixture;
    `model` holds further `Sa2VA` arguments."""
    sam2 = tiny_sam2_config()
    model = Sa2VA(
        mllm={"path": str(release), "max_tiles": 12, "attn_implementation": "eager"},
        sam2=sam2,
        sam2_ckpt=sam2_ckpt,
        **model,
    )
    return model.eval()


def official_release_state() -> dict[str, torch.Tensor]:
    """The official tiny chat model as its release holds it: the MLLM file plus SAM 2 under
    ``grounding_encoder.sam2_model.`` with ``.gamma`` renamed ``.g_weight``."""
    state = load_file(RELEASE / "model.safetensors")
    for key, tensor in load_sam2_fixture().items():
        state["grounding_encoder.sam2_model." + key.replace(".gamma", ".g_weight")] = tensor
    return state


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def load_sam2_fixture() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "sam2_tiny_v2_0.pt", weights_only=True)["model"]
