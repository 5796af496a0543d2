"""Reading what training and export wrote: CRC-checked Lightning checkpoint files, DeepSpeed
ZeRO folders and export folders, back into a model built from its own recorded config."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sa2va.model.checkpoints import CheckpointMismatchError, LoadReport, load_checked
from sa2va.model.lora import lora_spec


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


class DiskFullError(CheckpointError):
    """A write that ran out of disk space; the previous file at the path is untouched."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested container: what a checkpoint write needs, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(path: str | Path, needed: int, error: OSError) -> DiskFullError:
    """The one-line error for an ``ENOSPC`` while writing ``path`` (``needed`` bytes)."""
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return DiskFullError(
        f"{path}: no space left on device ({error.strerror}): the write needs about "
        f"{_mib(needed)}, {_mib(free)} free in {folder}; the previous file (if any) is unchanged"
    )


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete torch archive whose CRCs
    match (a truncated file has no zip directory; flipped bytes fail their record's CRC)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({e}); "
            "resume from an earlier checkpoint of the run"
        ) from e
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {bad})")


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", verify: bool = True
) -> dict[str, Any]:
    """A Lightning checkpoint file, CRC-checked, holding only tensors and plain containers
    (anything else would be code run by the unpickler); every failure names the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if verify:
        verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: cannot load checkpoint: it holds a pickled "
            f"{found[1] if found else 'Python object'}, which could run code when loaded; "
            "refused (only tensors and plain containers load)"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CheckpointError(f"{path}: cannot load checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


# keys of a DeepSpeed model-states file that are DeepSpeed's own, not Lightning's checkpoint
DEEPSPEED_STATE_KEYS = frozenset(
    {
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "csr_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config",
        "ds_version",
    }
)


def _read_deepspeed_checkpoint(path: Path) -> dict[str, Any]:
    """A DeepSpeed ZeRO checkpoint folder (as Lightning's DeepSpeedStrategy writes it) as one
    Lightning checkpoint dict: DeepSpeed consolidates the fp32 weights; our metadata comes from
    the rank-0 model-states file, read with ``weights_only=True``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = path / "latest"
    if not latest.is_file():
        raise ValueError(f"{path}: a folder but not a DeepSpeed checkpoint (no 'latest' file)")
    tag_dir = path / latest.read_text().strip()
    states = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise ValueError(f"{tag_dir}: no DeepSpeed model-states file")
    client = torch.load(states[0], map_location="cpu", weights_only=True)
    checkpoint = {k: v for k, v in client.items() if k not in DEEPSPEED_STATE_KEYS}
    weights = get_fp32_state_dict_from_zero_checkpoint(str(path))
    # Lightning < 2.1 wrapped the module as `_forward_module`
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in weights.items()}
    return checkpoint


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint file (CRC-checked, ``weights_only=True``) or a DeepSpeed ZeRO
    checkpoint folder, as a dict with ``state_dict`` and this project's ``sa2va`` metadata."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_deepspeed_checkpoint(path)
    return load_checkpoint(path, map_location="cpu")


def build_untrained(info: Mapping[str, Any], mllm_path: str | None = None) -> nn.Module:
    """The architecture recorded in ``info`` (``checkpoint["sa2va"]``), LoRA adapters included
    (so the keys match), without reading any pretrained weights.

    A real-size model still reads its tokenizer and ``config.json`` (never its weights) from
    ``model.mllm.path``; ``mllm_path`` points elsewhere when the checkpoint moved machines.
    """
    from hydra.utils import get_class

    model_class = str(info.get("model_class", ""))
    if not model_class.startswith("sa2va."):
        raise ValueError(f"model class {model_class!r} is not one of this project's (sa2va.*)")
    config = dict(info["model"])
    if mllm_path is not None and "mllm" in config:  # models without an InternVL have none
        config["mllm"] = {**config["mllm"], "path": mllm_path}
    path = (config.get("mllm") or {}).get("path")  # models without an MLLM have none
    if path is not None and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"model.mllm.path={path}: not found. The trained model's tokenizer and InternVL "
            "config.json (not its weights) are read from there: pass the folder's new place "
            "(mllm_path=...)"
        )
    lora = lora_spec(info)
    if lora:
        config["lora"] = lora
    return get_class(model_class)(**config, load_pretrained=False)


def load_trained(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu", mllm_path: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a checkpoint (eval mode, on ``map_location``) and its metadata.

    Only the checkpoint is read (see :func:`build_untrained` for ``mllm_path``): the
    architecture comes from its own config with ``load_pretrained=False``, and every weight
    must be present with the right shape.
    """
    checkpoint = read_training_checkpoint(ckpt_path)
    info = checkpoint.get("sa2va")
    if not isinstance(info, Mapping) or not info.get("model"):
        raise ValueError(f"{ckpt_path}: not a sa2va training checkpoint (no 'sa2va' model config)")
    model = build_untrained(info, mllm_path)
    weights = checkpoint["state_dict"]
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    load_checked(model, state, f"training checkpoint {ckpt_path}")
    meta = {
        **info,
        "datamodule": checkpoint.get("datamodule_hyper_parameters"),
        "global_step": checkpoint.get("global_step"),
    }
    return model.to(map_location).eval(), meta


EXPORT_FORMAT = "sa2va-export/1"


WEIGHTS = "model.safetensors"


MLLM_DIR = "mllm"


def load_exported(path: str | Path) -> nn.Module:
    """The exported model (eval mode, CPU): architecture from ``config.json`` (and ``mllm/``
    when the model has an InternVL) with ``load_pretrained=False``, every weight of
    ``model.safetensors`` loaded strictly."""
    from safetensors.torch import load_model

    folder = Path(path).expanduser()
    for name in ("config.json", "manifest.json", WEIGHTS):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: not a sa2va export (no {name})")
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder}: export format {manifest.get('format')!r}, not {EXPORT_FORMAT}")
    config = json.loads((folder / "config.json").read_text())
    # the InternVL files of models that have one (``save_pretrained_files``)
    mllm_dir = folder / MLLM_DIR
    model = build_untrained(config, mllm_path=str(mllm_dir) if mllm_dir.is_dir() else None)
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
