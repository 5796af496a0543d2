"""Export a trained checkpoint to a self-contained folder; load it back for eval/predict.

    python -m sa2va.export ckpt_path=outputs/.../checkpoints/last.ckpt out=exports/run1
    python -m sa2va.export ckpt_path=.../last.ckpt/ out=... merge_lora=false   # DeepSpeed folder

The folder (written under a temp name, renamed when complete)::

    model.safetensors  every weight of the trained model (LoRA merged, or kept as an adapter)
    config.json        {"model_class", "model": the Sa2VA config, "freeze", "threshold"}
    mllm/              InternVL config.json, tokenizer, image processor (preprocessor_config.json)
    manifest.json      source checkpoint and its sha256, LoRA merged or not, weights sha256

Seed 001 §6.1 cannot happen here: the architecture is rebuilt from the checkpoint's own
config with ``load_pretrained=False`` (no pretrained file is opened) and every weight must
load strictly, so two different checkpoints always export different models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sa2va.model.checkpoints import (
    CheckpointMismatchError,
    LoadReport,
    build_untrained,
    load_trained,
)
from sa2va.utils import CONF_DIR, atomic_write_json, git_sha

log = logging.getLogger(__name__)

EXPORT_FORMAT = "sa2va-export/1"
WEIGHTS = "model.safetensors"
MLLM_DIR = "mllm"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; of a DeepSpeed folder, the sha256 of its sorted
    ``<relative path> <file sha256>`` lines (every file of the folder)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    lines = [
        f"{file.relative_to(path).as_posix()} {file_sha256(file)}\n"
        for file in sorted(p for p in path.rglob("*") if p.is_file())
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def export(
    ckpt_path: str | Path,
    out: str | Path,
    merge_lora: bool = True,
    mllm_path: str | None = None,
) -> dict[str, Any]:
    """Write the export folder ``out`` (which must not exist); returns its manifest."""
    from safetensors.torch import save_model

    source, final = Path(ckpt_path).expanduser(), Path(out).expanduser()
    if final.exists():
        raise FileExistsError(f"{final}: already exists; choose another out=")
    if not source.exists():
        raise FileNotFoundError(f"{source}: checkpoint not found")
    model, meta = load_trained(source, mllm_path=mllm_path)
    freeze = meta.get("freeze") or {}
    has_lora = bool(freeze.get("lora"))
    if has_lora and merge_lora:
        model.merge_lora()
    config = {
        "model_class": meta["model_class"],
        "model": meta["model"],
        # the LoRA structure load_exported must rebuild; nothing when merged or absent
        "freeze": freeze if has_lora and not merge_lora else None,
        "threshold": meta.get("threshold"),
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.mllm.config.save_pretrained(tmp / MLLM_DIR)
        model.tokenizer.save_pretrained(tmp / MLLM_DIR)
        model.processor.image_processor.save_pretrained(tmp / MLLM_DIR)
        atomic_write_json(tmp / "config.json", config)
        manifest = {
            "format": EXPORT_FORMAT,
            "source_checkpoint": str(source.resolve()),
            "source_kind": "deepspeed" if source.is_dir() else "lightning",
            "source_sha256": checkpoint_sha256(source),
            "global_step": meta.get("global_step"),
            "lora": "merged" if has_lora and merge_lora else "adapter" if has_lora else "none",
            "merged_lora": has_lora and merge_lora,
            "weights_sha256": file_sha256(tmp / WEIGHTS),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (LoRA %s)", source, final, manifest["lora"])
    return manifest


def load_exported(path: str | Path) -> nn.Module:
    """The exported model (eval mode, CPU): architecture from ``config.json`` and ``mllm/``
    with ``load_pretrained=False``, every weight of ``model.safetensors`` loaded strictly."""
    from safetensors.torch import load_model

    folder = Path(path).expanduser()
    for name in ("config.json", "manifest.json", WEIGHTS, MLLM_DIR):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: not a sa2va export (no {name})")
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder}: export format {manifest.get('format')!r}, not {EXPORT_FORMAT}")
    config = json.loads((folder / "config.json").read_text())
    model = build_untrained(config, mllm_path=str(folder / MLLM_DIR))
    missing, unexpected = load_model(model, folder / WEIGHTS, strict=False)
    report = LoadReport(
        str(folder / WEIGHTS), missing=sorted(missing), unexpected=sorted(unexpected)
    )
    if not report.ok:
        raise CheckpointMismatchError(report.summary())
    return model.eval()


def exported_meta(path: str | Path) -> dict[str, Any]:
    """What eval/predict read from a training checkpoint's metadata, for an export folder
    (the data settings of training are not exported)."""
    folder = Path(path).expanduser()
    manifest = json.loads((folder / "manifest.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    return {**config, "datamodule": None, "global_step": manifest.get("global_step")}


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    manifest = export(cfg.ckpt_path, cfg.out, cfg.merge_lora, cfg.mllm_path)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
