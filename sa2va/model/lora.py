"""The LoRA adapter spec of a model's LLM: part of the architecture (``model.lora``), so a
checkpoint rebuilds its adapters from the model config alone, without any training code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# the official Sa2VA's LoRA targets: every attention and MLP projection of the LLM
LLM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """peft LoRA on the LLM (official Sa2VA: r=128, alpha=256, dropout 0.05)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLM_PROJECTIONS))

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


def lora_settings(spec: Mapping[str, Any] | None) -> LoraSettings | None:
    """``model.lora`` (a mapping or null) as settings; an unknown key is an error naming it."""
    if not spec:
        return None
    known = [f.name for f in fields(LoraSettings)]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"model.lora: unknown key(s) {unknown}; LoRA takes {known}")
    return LoraSettings(**spec)


def lora_spec(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The LoRA spec recorded with a trained model: ``model.lora``, or, in checkpoints written
    before LoRA moved into the model config, ``freeze.lora``."""
    spec = (info.get("model") or {}).get("lora") or (info.get("freeze") or {}).get("lora")
    return asdict(lora_settings(spec)) if spec else None
