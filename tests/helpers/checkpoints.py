"""Training checkpoints written by tests (with and without LoRA) for loading and export tests."""

from __future__ import annotations

from pathlib import Path

import torch

from sa2va.model.sa2va import Sa2VA

LORA_SPEC = {"r": 4, "alpha": 8, "dropout": 0.0}  # model.lora: small adapters
# a freeze policy training the adapters alone, as a checkpoint records it
LORA = {
    "name": "lora",
    "default_trainable": False,
    "rules": [{"pattern": "lora_", "trainable": True}],
}
# ... and as checkpoints recorded it before LoRA moved into the model config (model.lora)
LEGACY_LORA = {**LORA, "lora": LORA_SPEC}


def write_training_checkpoint(
    path: Path, model: Sa2VA, freeze: dict | None, model_config: dict | None = None
) -> None:
    """What Sa2VAModule.on_save_checkpoint + Lightning write (the keys load_trained reads);
    ``model_config`` replaces the model's own (e.g. to write an older checkpoint's)."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "global_step": 7,
            "sa2va": {
                "model": model.config if model_config is None else model_config,
                "model_class": "sa2va.model.sa2va.Sa2VA",
                "freeze": freeze,
                "threshold": 0.5,
            },
        },
        path,
    )


def lora_checkpoint(compose_cfg, tmp_path: Path) -> tuple[Sa2VA, Path]:
    """The default model with a LoRA adapter that matters, saved as a training checkpoint."""
    cfg = compose_cfg()
    torch.manual_seed(0)
    model = Sa2VA(**{k: v for k, v in cfg.model.items() if not k.startswith("_")}, lora=LORA_SPEC)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = tmp_path / "lora.ckpt"
    write_training_checkpoint(ckpt, model, LORA)
    return model, ckpt
