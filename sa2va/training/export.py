"""Writing a trained checkpoint as a self-contained folder (project format or an official Sa2VA
release layout)."""

from __future__ import annotations

import errno
import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from sa2va.model.release_layout import release_config, sa2va_to_release, write_release_weights
from sa2va.model.sa2va import Sa2VA
from sa2va.model.trained import EXPORT_FORMAT, MLLM_DIR, WEIGHTS, disk_full_error, load_trained
from sa2va.training.model_card import model_card
from sa2va.utils import atomic_dir, atomic_write_json, git_sha

log = logging.getLogger(__name__)

OFFICIAL_FORMAT = "sa2va-official-release/1"
FORMATS = ("project", "official")


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


def _write_project(folder: Path, model: nn.Module, meta: dict[str, Any]) -> list[str]:
    """This project's export folder (see the module docstring); returns the weight files."""
    from safetensors.torch import save_model

    config = {
        "model_class": meta["model_class"],
        # the architecture as loaded (its LoRA spec: adapters load_exported rebuilds; none
        # once merged)
        "model": model.config,
        "threshold": meta.get("threshold"),
    }
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    model.save_pretrained_files(folder / MLLM_DIR)  # Sa2VA's InternVL files; baselines: none
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
    if format == "official" and not isinstance(model, Sa2VA):
        raise ValueError(
            f"format=official is the Sa2VA release layout; {source} holds a "
            f"{type(model).__name__}: export it with format=project"
        )
    has_lora = bool(model.config.get("lora"))
    merged = has_lora and merge_lora
    if merged:
        model.merge_lora()
    try:
        with atomic_dir(final) as tmp:
            if format == "project":
                weights = _write_project(tmp, model, meta)
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
            model_card(source, final, meta, manifest).save(tmp / "README.md")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        needed = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        raise disk_full_error(e.filename or final, needed, e) from e
    log.info("exported %s -> %s (%s, LoRA %s)", source, final, format, manifest["lora"])
    if format == "official":
        log.info("copy the official projects/sa2va/hf/models/*.py into %s to run it", final)
    return manifest
