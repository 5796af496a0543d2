"""Sequence files written with the libraries the readers use: multi-frame DICOM (pydicom),
mp4 (av) and a raw Zeiss .img volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
MULTIFRAME_GREY = "1.2.840.10008.5.1.4.1.1.7.2"  # multi-frame grayscale byte secondary capture


def write_dicom(
    path: Path,
    frames: np.ndarray,
    spacing: tuple[float, float, float] = (0.0039, 0.0117, 0.12),
    enhanced: bool = True,
) -> Path:
    """(T, H, W) uint8/uint16 frames as one multi-frame DICOM file. ``enhanced``: an
    ophthalmic tomography image with the spacing in the shared functional groups; otherwise a
    plain multi-frame image with top-level PixelSpacing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = OPHTHALMIC_TOMOGRAPHY if enhanced else MULTIFRAME_GREY
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OPT" if enhanced else "OT"
    ds.PatientID = "synthetic"
    ds.set_pixel_data(frames, "MONOCHROME2", frames.dtype.itemsize * 8)
    row, column, between = (f"{v:g}" for v in spacing)
    if enhanced:
        measures = Dataset()
        measures.PixelSpacing = [row, column]
        measures.SliceThickness = between
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
    else:
        ds.PixelSpacing = [row, column]
        ds.SpacingBetweenSlices = between
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mp4(path: Path, frames: np.ndarray, fps: int = 5) -> Path:
    """(T, H, W) uint8 grey frames as an H.264 mp4 (lossy; sizes even, as yuv420p needs)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_zeiss_img(path: Path, frames: np.ndarray) -> Path:
    """A Zeiss Cirrus .img: headerless uint8 B-scans, (rows, cols, slices) in Fortran order."""
    path.write_bytes(np.ascontiguousarray(frames.transpose(1, 2, 0)).tobytes(order="F"))
    return path
