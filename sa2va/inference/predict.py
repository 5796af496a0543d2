"""Prediction on new frames and videos: inputs, model loading, thresholds, and the written masks
and overlays."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from sa2va.data.datamodule import load_rgb
from sa2va.data.interchange import EXPORT_FORMATS, AnnotatedImage, mask_to_polygons, write_exports
from sa2va.data.readers import (
    SEQUENCE_SUFFIXES,
    InputError,
    frame_name,
    is_sequence_file,
    read_sequence,
)
from sa2va.figures import overlay_masks, png_bytes
from sa2va.inference.video import VIDEO_MODES, predict_frames
from sa2va.utils import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_record,
    to_plain,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
PROB_FORMATS = (None, "png16", "npy")

# ---------------------------------------------------------------------- model loading


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(ckpt_path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A trained model in eval mode on ``device`` and the checkpoint's metadata, through
    :func:`sa2va.model.trained.load_trained` (or :func:`sa2va.model.trained.load_exported` for an
    export folder): nothing pretrained is read and every weight loads strictly, so a
    checkpoint never falls back to pretrained weights."""
    from sa2va.model.trained import load_trained

    path = Path(ckpt_path).expanduser()
    if not path.exists():  # a file, or a DeepSpeed checkpoint / export folder
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if (path / "manifest.json").is_file():
        from sa2va.model.trained import exported_meta, load_exported

        return load_exported(path).to(device), exported_meta(path)
    return load_trained(path, map_location=device)


# ------------------------------------------------------------------ tuned threshold


def threshold_path(ckpt_path: str | Path) -> Path:
    """Where the threshold tuned for a checkpoint lives: ``<ckpt>.threshold.json``."""
    return checkpoint_record(ckpt_path, "threshold")


def checkpoint_fingerprint(ckpt_path: str | Path) -> dict[str, int]:
    """Size and mtime: a re-written checkpoint (e.g. ``last.ckpt``) invalidates its threshold."""
    stat = Path(ckpt_path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def save_tuned_threshold(ckpt_path: str | Path, record: Mapping[str, Any]) -> Path:
    path = threshold_path(ckpt_path)
    atomic_write_json(path, {**record, "checkpoint": checkpoint_fingerprint(ckpt_path)})
    return path


def load_tuned_threshold(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The saved tuning record, or None when absent or made for another checkpoint version."""
    path = threshold_path(ckpt_path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("checkpoint") != checkpoint_fingerprint(ckpt_path):
        log.warning("%s: ignored, the checkpoint changed after the threshold was tuned", path)
        return None
    return record


def resolve_threshold(
    explicit: float | None, ckpt_path: str | Path, meta: Mapping[str, Any]
) -> tuple[float, str]:
    """Explicit value > threshold tuned on val (``<ckpt>.threshold.json``) > checkpoint's."""
    if explicit is not None:
        return float(explicit), "predict.threshold"
    tuned = load_tuned_threshold(ckpt_path)
    if tuned is not None:
        return float(tuned["threshold"]), str(threshold_path(ckpt_path))
    return float(meta.get("threshold", 0.5)), "checkpoint"


# -------------------------------------------------------------------------- inputs


@dataclass
class InputItem:
    """One sequence to segment: image files in order, or one file holding a sequence (video,
    DICOM, vendor OCT export: :mod:`sa2va.data.readers`); ``metadata`` is filled when read."""

    name: str
    images: list[Path] = field(default_factory=list)
    video: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def discover_inputs(
    source: str | Path, sequence: str | bool = "auto", video_pattern: str | None = None
) -> list[InputItem]:
    """An image, a sequence file (video, DICOM, vendor OCT), or a folder of those -> sequences.

    A folder's sequence files are one sequence each. Its images form one sequence
    (``sequence=true``), one each (``false``), or with ``auto`` those matching
    ``video_pattern`` (``<video>_frame_<n>.jpg``) are grouped into videos by name and the rest
    are single images. Order is natural (frame_2 < frame_10).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return [InputItem(path.stem, images=[path])]
        if is_sequence_file(path):
            return [InputItem(path.stem, video=path)]
        raise InputError(
            f"{path}: unsupported file type {path.suffix.lower()!r} (images: "
            f"{sorted(IMAGE_SUFFIXES)}; sequence files: {sorted(SEQUENCE_SUFFIXES)})"
        )
    files = sorted((p for p in path.iterdir() if p.is_file()), key=_natural_key)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    sequences = [InputItem(p.stem, video=p) for p in files if is_sequence_file(p)]
    if not images and not sequences:
        raise InputError(
            f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or sequence files "
            "(video, DICOM, vendor OCT) in folder"
        )
    return _image_items(path, images, sequence, video_pattern) + sequences


def _image_items(
    folder: Path, images: list[Path], sequence: str | bool, video_pattern: str | None
) -> list[InputItem]:
    if not images:
        return []
    if sequence is True or sequence == "true":
        return [InputItem(folder.name, images=images)]
    if sequence is False or sequence == "false" or not video_pattern:
        return [InputItem(p.stem, images=[p]) for p in images]
    if sequence != "auto":
        raise ValueError(f"predict.sequence must be auto, true or false, got {sequence!r}")
    pattern = re.compile(video_pattern)
    videos: dict[str, list[Path]] = defaultdict(list)
    singles = []
    for image in images:
        match = pattern.match(image.name)
        if match:
            videos[match.group("video")].append(image)
        else:
            singles.append(InputItem(image.stem, images=[image]))
    return [InputItem(name, images=frames) for name, frames in videos.items()] + singles


def read_frames(item: InputItem) -> list[tuple[str, Image.Image]]:
    """(frame name, RGB image) pairs; unreadable files raise :class:`InputError`."""
    if item.video is None:
        frames = []
        for path in item.images:
            try:
                frames.append((path.stem, load_rgb(path)))
            except (OSError, ValueError) as error:
                raise InputError(f"{path}: cannot read image ({error})") from error
        return frames
    sequence = read_sequence(item.video)
    item.metadata = sequence.metadata()
    return [
        (frame_name(item.name, i), Image.fromarray(a).convert("RGB"))
        for i, a in enumerate(sequence.frames)
    ]


# ---------------------------------------------------------------------------- output


def object_name(prompt: str, index: int) -> str:
    """The object a prompt asks for, as exports name it: ``Please segment the blood vessel.``
    -> ``blood vessel``; ``p<index>`` when the prompt does not say ``segment ...``."""
    match = re.search(r"segment (?:the |all )?([^<>\[\]]+?)[.!?]*$", prompt.strip(), re.I)
    return match[1] if match else f"p{index}"


def annotated_frame(
    image_name: str,
    probs: np.ndarray,
    owners: Sequence[int],
    names: Sequence[str],
    threshold: float,
) -> AnnotatedImage:
    """A frame's non-empty masks as polygons, each named after the prompt that owns it."""
    frame = AnnotatedImage(image_name, probs.shape[1:])
    for prob, owner in zip(probs, owners, strict=True):
        mask = prob > threshold
        if mask.any():
            frame.instances.append((names[owner], mask_to_polygons(mask)))
    return frame


def mask_labels(owners: Sequence[int]) -> list[str]:
    """File labels of a frame's masks: ``p<i>``, or ``p<i>_<j>`` when prompt i owns several."""
    counts = Counter(owners)
    seen: dict[int, int] = defaultdict(int)
    labels = []
    for owner in owners:
        labels.append(f"p{owner}" if counts[owner] == 1 else f"p{owner}_{seen[owner]}")
        seen[owner] += 1
    return labels


def _write_frame(
    out: Path,
    name: str,
    image: Image.Image,
    probs: np.ndarray,
    labels: Sequence[str],
    threshold: float,
    save_probs: str | None,
    overlays: bool,
) -> dict[str, str]:
    """Masks (+ probabilities, overlay) of one frame; returns label -> mask file."""
    files = {}
    for prob, label in zip(probs, labels, strict=True):
        mask_file = out / "masks" / f"{name}_{label}.png"
        atomic_write_bytes(mask_file, png_bytes(((prob > threshold) * 255).astype(np.uint8)))
        files[label] = str(mask_file.relative_to(out))
        if save_probs == "png16":
            quantised = np.round(prob * 65535).astype(np.uint16)
            atomic_write_bytes(out / "probs" / f"{name}_{label}.png", png_bytes(quantised))
        elif save_probs == "npy":
            (out / "probs").mkdir(parents=True, exist_ok=True)
            np.save(out / "probs" / f"{name}_{label}.npy", prob.astype(np.float32))
    if overlays:
        overlay = overlay_masks(np.asarray(image), [p > threshold for p in probs])
        atomic_write_bytes(out / "overlays" / f"{name}.png", png_bytes(overlay))
    return files


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Segment every input sequence; all outputs appear together or not at all."""
    pcfg = cfg.predict
    prompts = to_plain(cfg.prompt)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt must be a non-empty string or list of strings, got {prompts!r}")
    if pcfg.save_probs not in PROB_FORMATS:
        raise ValueError(f"predict.save_probs must be one of {PROB_FORMATS}, got {pcfg.save_probs}")
    exports = list(pcfg.get("export") or [])
    if not set(exports) <= set(EXPORT_FORMATS):
        raise ValueError(f"predict.export: choose from {EXPORT_FORMATS}, got {exports}")
    if pcfg.video_mode not in VIDEO_MODES:
        raise ValueError(f"predict.video_mode must be one of {VIDEO_MODES}, got {pcfg.video_mode}")
    items = discover_inputs(cfg.input, pcfg.sequence, pcfg.video_pattern)
    final = Path(pcfg.output_dir).expanduser()
    if final.exists():
        raise FileExistsError(f"{final}: already exists; choose another predict.output_dir")

    model, meta = load_model(cfg.ckpt_path, resolve_device(pcfg.device))
    threshold, source = resolve_threshold(pcfg.threshold, cfg.ckpt_path, meta)
    log.info("threshold %.3f (from %s)", threshold, source)
    answers = to_plain(pcfg.answer)
    object_names = [object_name(p, i) for i, p in enumerate(prompts)]
    annotated: list[AnnotatedImage] = []

    summary: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt_path),
        "threshold": threshold,
        "threshold_source": source,
        "mode": pcfg.mode,
        "video_mode": pcfg.video_mode,
        "prompts": prompts,
        "sequences": [],
    }
    with atomic_dir(final) as tmp:
        for item in tqdm(items, desc="predict", unit="sequence"):
            names, frames = zip(*read_frames(item), strict=True)
            predicted = predict_frames(model, frames, prompts, answers, pcfg)
            records = []
            for t, (name, image, pred) in enumerate(zip(names, frames, predicted, strict=True)):
                labels = mask_labels(pred.owners)
                if exports:
                    source = item.images[t].name if item.video is None else f"{name}.png"
                    annotated.append(
                        annotated_frame(source, pred.probs, pred.owners, object_names, threshold)
                    )
                files = _write_frame(
                    tmp, name, image, pred.probs, labels, threshold, pcfg.save_probs, pcfg.overlays
                )
                records.append({"frame": name, "answers": pred.answers, "masks": files})
            summary["sequences"].append({"name": item.name, **item.metadata, "frames": records})
        summary["exports"] = [
            str(p.relative_to(tmp)) for p in write_exports(annotated, tmp, exports)
        ]
        atomic_write_json(tmp / "predictions.json", summary)
    n_frames = sum(len(s["frames"]) for s in summary["sequences"])
    log.info("wrote %d frames of predictions to %s", n_frames, final)
    return {**summary, "output_dir": str(final), "n_frames": n_frames}
