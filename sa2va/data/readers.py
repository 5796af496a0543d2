"""Files that hold a whole frame sequence -> frames of one video, with the pixel spacing.

One reader layer for prediction, evaluation (through :mod:`sa2va.data.import_frames`) and the
importer: multi-frame DICOM (ophthalmic tomography or any multi-frame image; ``pydicom``),
video files (``av``, FFmpeg's bindings), and vendor OCT exports through the field's own
readers: Heidelberg ``.vol`` (``eyepy``), Heidelberg ``.e2e``, Topcon ``.fds``/``.fda`` and
Zeiss ``.img`` (``oct-converter``). Each B-scan or video frame becomes one frame. Every
failure is one :class:`InputError` line naming the file and the reason.

Spacing is in millimetres: ``row_mm`` (between image rows: axial for a B-scan), ``column_mm``
(between columns) and ``slice_mm`` (between frames: B-scans of a volume); a value the file
does not state is ``None``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
# vendor suffix -> (reader package, what the file is)
VENDOR_SUFFIXES = {
    ".vol": ("eyepy", "Heidelberg Heyex VOL"),
    ".e2e": ("oct_converter", "Heidelberg Heyex E2E"),
    ".fds": ("oct_converter", "Topcon FDS"),
    ".fda": ("oct_converter", "Topcon FDA"),
    ".img": ("oct_converter", "Zeiss Cirrus IMG (raw 1024 x 512 B-scans)"),
}
SEQUENCE_SUFFIXES = DICOM_SUFFIXES | VIDEO_SUFFIXES | frozenset(VENDOR_SUFFIXES)
INSTALL_HINT = "pip install 'sa2va[formats]'"


class InputError(ValueError):
    """An input that cannot be used; the message names the file and the problem."""


@dataclass
class FrameSequence:
    """The frames of one file (uint8, (H, W) or (H, W, 3)) and what the file says of them."""

    source: Path
    format: str
    frames: list[np.ndarray]
    spacing: dict[str, float | None] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description, written beside predictions and imported frames."""
        return {
            "source": str(self.source),
            "format": self.format,
            "n_frames": len(self.frames),
            "frame_hw": list(self.frames[0].shape[:2]),
            "spacing_mm": self.spacing,
        }


def frame_name(stem: str, index: int) -> str:
    """``<stem>_frame_<index>``: the name the default video pattern groups into one video."""
    return f"{stem}_frame_{index:06d}"


def _reason(error: BaseException) -> str:
    """A third-party error on one line (parsers such as construct print multi-line paths)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def available(package: str) -> bool:
    """Whether an optional reader package is installed (the ``formats`` extra)."""
    return importlib.util.find_spec(package) is not None


def is_sequence_file(path: Path) -> bool:
    return path.suffix.lower() in SEQUENCE_SUFFIXES


def _spacing(row: Any = None, column: Any = None, slice_: Any = None) -> dict[str, float | None]:
    def mm(value: Any) -> float | None:
        return None if value is None else float(value)

    return {"row_mm": mm(row), "column_mm": mm(column), "slice_mm": mm(slice_)}


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """8-bit as is; wider or float data min-max scaled over the whole volume (not per frame,
    so brightness stays comparable between B-scans)."""
    if volume.dtype == np.uint8:
        return volume
    data = volume.astype(np.float64)
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    scaled = (data - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(data)
    return np.rint(np.nan_to_num(scaled)).astype(np.uint8)


# ---------------------------------------------------------------------------- DICOM


def _dicom_spacing(ds: Any) -> dict[str, float | None]:
    """PixelSpacing is (row, column); enhanced multi-frame files (ophthalmic tomography)
    keep it in the shared functional groups' pixel measures."""
    measures = ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    if "PixelSpacing" not in ds and shared and "PixelMeasuresSequence" in shared[0]:
        measures = shared[0].PixelMeasuresSequence[0]
    row, column = measures.get("PixelSpacing", (None, None))
    between = measures.get("SpacingBetweenSlices", measures.get("SliceThickness"))
    return _spacing(row, column, between)


def read_dicom(path: Path) -> FrameSequence:
    if not available("pydicom"):
        raise InputError(f"{path}: reading DICOM files needs pydicom ({INSTALL_HINT})")
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable DICOM file ({_reason(e)})") from e
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM file without pixel data ({ds.get('Modality', '?')})")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises per-codec types for unsupported compression
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise InputError(f"{path}: cannot decode DICOM pixel data ({syntax}): {_reason(e)}") from e
    rgb = int(ds.get("SamplesPerPixel", 1)) == 3
    if int(ds.get("NumberOfFrames", 1)) == 1:
        pixels = pixels[None]
    if (pixels.ndim != 4) if rgb else (pixels.ndim != 3):
        raise InputError(f"{path}: unexpected DICOM pixel array shape {pixels.shape}")
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # 0 is white
        pixels = pixels.max() - pixels
    frames = to_uint8(pixels)
    return FrameSequence(path, "dicom", list(frames), _dicom_spacing(ds))


# ---------------------------------------------------------------------------- video


def read_video(path: Path) -> FrameSequence:
    if not available("av"):
        raise InputError(
            f"{path}: reading video files needs av (FFmpeg's bindings), which is not "
            f"installed ({INSTALL_HINT}), or extract the frames, e.g. "
            f"`ffmpeg -i {path.name} frames/{path.stem}_frame_%06d.png`, and pass input=frames/"
        )
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream in the file")
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except av.FFmpegError as e:
        raise InputError(f"{path}: cannot read video ({_reason(e)})") from e
    return FrameSequence(path, "video", frames, _spacing())


# --------------------------------------------------------------------------- vendors


def _eyepy_vol(path: Path) -> FrameSequence:
    import eyepy

    volume = eyepy.import_heyex_vol(path)
    spacing = _spacing(volume.scale_y, volume.scale_x, volume.scale_z)
    return FrameSequence(path, "heyex-vol", list(to_uint8(np.asarray(volume.data))), spacing)


def _oct_converter(path: Path) -> FrameSequence:
    """oct-converter's readers; their pixel_spacing orders differ per format."""
    from oct_converter.readers import E2E, FDA, FDS, IMG

    suffix = path.suffix.lower()
    if suffix == ".img":
        volume = IMG(path).read_oct_volume()
        spacing = _spacing()
    else:
        reader = {".e2e": E2E, ".fds": FDS, ".fda": FDA}[suffix](path)
        volumes = reader.read_oct_volume()
        volume = volumes[0] if isinstance(volumes, list) else volumes
        s = volume.pixel_spacing
        if s is None:
            spacing = _spacing()
        elif suffix == ".e2e":  # [column, row, slice]
            spacing = _spacing(s[1], s[0], s[2])
        else:  # Topcon: [column, slice, row]
            spacing = _spacing(s[2], s[0], s[1])
    frames = to_uint8(np.stack([np.asarray(b) for b in volume.volume]))
    return FrameSequence(path, suffix.lstrip("."), list(frames), spacing)


def read_vendor(path: Path) -> FrameSequence:
    package, what = VENDOR_SUFFIXES[path.suffix.lower()]
    if not available(package):
        raise InputError(f"{path}: reading {what} files needs {package} ({INSTALL_HINT})")
    read = _eyepy_vol if package == "eyepy" else _oct_converter
    try:
        return read(path)
    except InputError:
        raise
    except Exception as e:  # third-party parsers raise whatever their decoder hits
        raise InputError(f"{path}: cannot read as {what} ({_reason(e)})") from e


# ---------------------------------------------------------------------------- entry


def _reader(path: Path) -> Callable[[Path], FrameSequence]:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom
    if suffix in VIDEO_SUFFIXES:
        return read_video
    if suffix in VENDOR_SUFFIXES:
        return read_vendor
    raise InputError(
        f"{path}: unsupported file type {suffix!r} (sequence files: {sorted(SEQUENCE_SUFFIXES)})"
    )


def read_sequence(path: str | Path) -> FrameSequence:
    """Every frame of a DICOM, video or vendor OCT file, in order (see the module doc)."""
    path = Path(path).expanduser()
    read = _reader(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    sequence = read(path)
    if not sequence.frames:
        raise InputError(f"{path}: the file holds no frames")
    return sequence
