"""Export a trained checkpoint to a self-contained folder; load it back for eval/predict.

    python -m sa2va.export ckpt_path=outputs/.../checkpoints/last.ckpt out=exports/run1
    python -m sa2va.export ckpt_path=.../last.ckpt/ out=... merge_lora=false   # DeepSpeed folder
    python -m sa2va.export ckpt_path=... out=... format=official   # the ByteDance/Sa2VA-* layout

``format=project`` (the default) writes this project's folder (temp name, renamed when
complete)::

    model.safetensors  every weight of the trained model (LoRA merged, or kept as an adapter)
    config.json        {"model_class", "model": the Sa2VA config, "freeze", "threshold"}
    mllm/              InternVL config.json, tokenizer, image processor (preprocessor_config.json)
    manifest.json      source checkpoint and its sha256, LoRA merged or not, weights sha256

``format=official`` writes the HF release layout of the official Sa2VA (LoRA merged first)::

    model.safetensors  official key names (sa2va.model.release_layout); sharded as
                       model-0000i-of-0000n.safetensors + model.safetensors.index.json
                       when larger than max_shard_size
    config.json        the official Sa2VAChatConfig fields
    tokenizer files    the trained tokenizer (with its added tokens)
    manifest.json      as above

The official modeling code is not part of this project (and this project never runs remote
code): copy the ``*.py`` files of the official ``projects/sa2va/hf/models/`` into the folder,
as the official ``tools/convert_to_hf.py`` does, and the official Sa2VA loads it from there.

An earlier failure (a converter that built the model from a pretrained file and loaded the
trained checkpoint with ``strict=False``, so two checkpoints exported the same model) cannot
happen here: the architecture is rebuilt from the checkpoint's own
config with ``load_pretrained=False`` (no pretrained file is opened) and every weight must
load strictly, so two different checkpoints always export different models.
"""

from __future__ import annotations

import errno
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

from sa2va.checkpointing import disk_full_error
from sa2va.model.checkpoints import (
    CheckpointMismatchError,
    LoadReport,
    build_untrained,
    load_trained,
)
from sa2va.model.release_layout import release_config, sa2va_to_release, write_release_weights
from sa2va.utils import CONF_DIR, atomic_write_json, git_sha

log = logging.getLogger(__name__)

EXPORT_FORMAT = "sa2va-export/1"
OFFICIAL_FORMAT = "sa2va-official-release/1"
FORMATS = ("project", "official")
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


def _write_project(folder: Path, model: nn.Module, meta: dict[str, Any], merged: bool) -> list[str]:
    """This project's export folder (see the module docstring); returns the weight files."""
    from safetensors.torch import save_model

    freeze = meta.get("freeze") or {}
    config = {
        "model_class": meta["model_class"],
        "model": meta["model"],
        # the LoRA structure load_exported must rebuild; nothing when merged or absent
        "freeze": freeze if freeze.get("lora") and not merged else None,
        "threshold": meta.get("threshold"),
    }
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    model.mllm.config.save_pretrained(folder / MLLM_DIR)
    model.tokenizer.save_pretrained(folder / MLLM_DIR)
    model.processor.image_processor.save_pretrained(folder / MLLM_DIR)
    atomic_write_json(folder / "config.json", config)
    return [WEIGHTS]


def write_official_release(
    model: nn.Module,
    folder: str | Path,
    template: str | None = None,
    max_shard_size: str | int = "5GB",
) -> list[str]:
    """Write ``model`` (a :class:`~sa2va.model.sa2va.Sa2VA`, LoRA merged) into ``folder`` in
    the official HF release layout (see the module docstring); returns the weight files.
    ``template`` (InternVL's prompt template name) defaults to the one the model prompts with."""
    folder = Path(folder)
    text = model.mllm.config.text_config
    state = sa2va_to_release(model.state_dict(), text.model_type, text.num_key_value_heads)
    files = write_release_weights(state, folder, max_shard_size)
    template = template or model.processor.template.name
    config = release_config(model.mllm.config, model.mllm.dtype, template)
    # the rows the file holds (official tools/convert_to_hf.py: len(tokenizer))
    config["llm_config"]["vocab_size"] = model.mllm.get_input_embeddings().num_embeddings
    atomic_write_json(folder / "config.json", config)
    model.tokenizer.save_pretrained(folder)
    return files


def export(
    ckpt_path: str | Path,
    out: str | Path,
    merge_lora: bool = True,
    mllm_path: str | None = None,
    format: str = "project",
    template: str | None = None,
    max_shard_size: str | int = "5GB",
) -> dict[str, Any]:
    """Write the export folder ``out`` (which must not exist) in ``format`` (``project`` or
    ``official``); returns its manifest. ``template`` and ``max_shard_size`` only concern
    ``official`` (InternVL prompt template name; default: the one the model prompts with)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {FORMATS}")
    if format == "official" and not merge_lora:
        raise ValueError("format=official needs merge_lora=true: the release holds no adapters")
    source, final = Path(ckpt_path).expanduser(), Path(out).expanduser()
    if final.exists():
        raise FileExistsError(f"{final}: already exists; choose another out=")
    if not source.exists():
        raise FileNotFoundError(f"{source}: checkpoint not found")
    model, meta = load_trained(source, mllm_path=mllm_path)
    has_lora = bool((meta.get("freeze") or {}).get("lora"))
    merged = has_lora and merge_lora
    if merged:
        model.merge_lora()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        if format == "project":
            weights = _write_project(tmp, model, meta, merged)
        else:
            weights = write_official_release(model, tmp, template, max_shard_size)
        manifest = {
            "format": EXPORT_FORMAT if format == "project" else OFFICIAL_FORMAT,
            "source_checkpoint": str(source.resolve()),
            "source_kind": "deepspeed" if source.is_dir() else "lightning",
            "source_sha256": checkpoint_sha256(source),
            "global_step": meta.get("global_step"),
            "lora": "merged" if merged else "adapter" if has_lora else "none",
            "merged_lora": merged,
            "weights_sha256": {name: file_sha256(tmp / name) for name in weights},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno != errno.ENOSPC:
            raise
        needed = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        raise disk_full_error(e.filename or final, needed, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s, LoRA %s)", source, final, format, manifest["lora"])
    if format == "official":
        log.info("copy the official projects/sa2va/hf/models/*.py into %s to run it", final)
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
    manifest = export(
        cfg.ckpt_path,
        cfg.out,
        cfg.merge_lora,
        cfg.mllm_path,
        cfg.format,
        cfg.template,
        cfg.max_shard_size,
    )
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
