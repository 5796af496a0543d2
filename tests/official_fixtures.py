"""The official Sa2VA golden fixtures (tests/fixtures/official_sa2va, see its README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

FIXTURES = Path(__file__).parent / "fixtures" / "official_sa2va"
# fixture 3: an official HF release folder (config.json, weights, tokenizer, image.png)
RELEASE = FIXTURES / "sa2va_chat_tiny"
SAM2_YAML = FIXTURES / "sam2_tiny_v2_0.yaml"


def tiny_sam2_config(**flags: Any) -> dict[str, Any]:
    """The fixtures' tiny SAM 2.0 architecture as a ``conf/model/sam2`` node: its yaml names
    the sam2 package's ``SAM2Base``; the project builds its [SEG]-prompted subclass."""
    cfg = OmegaConf.to_container(OmegaConf.load(SAM2_YAML).model)
    return {**cfg, "_target_": "sa2va.model.sam2.LanguagePromptedSAM2", **flags}
