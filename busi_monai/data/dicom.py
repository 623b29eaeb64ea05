"""Ultrasound DICOM: one frame as grey values, with its scan region and pixel spacing.

A scanner's US frame is usually RGB or YBR and holds burned-in text, rulers and a colour bar
around the scan; the Sequence of Ultrasound Regions (0018,6011) says where the scan is and how
large its pixels are (PhysicalDeltaX/Y in cm). This module reads that with pydicom; it knows
nothing of the rest of the package (:func:`busi_monai.data.io.read_image` calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # the weights io uses for colour PNGs
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")
CM = 3  # PhysicalUnitsX/YDirection code for centimetres
TISSUE, SPATIAL_2D = 1, 1  # RegionDataType and RegionSpatialFormat of a B-mode image


class DicomError(ValueError):
    """A DICOM file that cannot be read as one ultrasound frame; the message names the file."""


@dataclass
class UltrasoundFrame:
    array: np.ndarray  # (H, W) float32 grey values of the whole frame
    spacing: tuple[float, float] | None  # (x, y) in mm, from the scan region; None if unknown
    region: tuple[int, int, int, int] | None  # (top, left, height, width) of the scan in the frame
    frames: int = 1  # frames in the file


def is_dicom(path: str | Path) -> bool:
    """The DICOM preamble's ``DICM`` marker (files without an extension, as PACS exports write)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def scan_region(ds, shape: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, tuple[float, float] | None]:
    """(region box, spacing in mm) from the Sequence of Ultrasound Regions, or (None, None).

    Of several regions (a B-mode beside a Doppler spectrum, a split screen) the largest 2D
    tissue region is the scan; without those codes, the largest region. The box is clipped to
    the frame; the spacing is given only when both directions are in centimetres."""
    regions = list(getattr(ds, "SequenceOfUltrasoundRegions", None) or [])
    boxes = []
    h, w = shape
    for r in regions:
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        if x1 <= x0 or y1 <= y0:
            continue
        is_scan = getattr(r, "RegionSpatialFormat", None) == SPATIAL_2D and getattr(r, "RegionDataType", None) == TISSUE
        boxes.append((is_scan, (y1 - y0 + 1) * (x1 - x0 + 1), (y0, x0, y1 - y0 + 1, x1 - x0 + 1), r))
    if not boxes:
        return None, None
    _, _, box, r = max(boxes, key=lambda b: (b[0], b[1]))
    spacing = None
    try:
        if int(r.PhysicalUnitsXDirection) == CM and int(r.PhysicalUnitsYDirection) == CM:
            dx, dy = abs(float(r.PhysicalDeltaX)) * 10.0, abs(float(r.PhysicalDeltaY)) * 10.0
            if dx > 0 and dy > 0 and np.isfinite(dx) and np.isfinite(dy):
                spacing = (dx, dy)
    except (AttributeError, TypeError, ValueError):
        pass
    return box, spacing


def _grey(arr: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixel_data_handlers.util import convert_color_space

    if photometric.startswith("YBR"):
        # pydicom hands YBR data back as stored (4:2:2 already expanded); make it RGB first.
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            arr = arr[..., 0]
        else:
            arr = arr[..., :3] @ LUMA
    return arr


def read_ultrasound(path: str | Path, frame: int | None = None, max_pixels: int | None = None) -> UltrasoundFrame:
    """One frame of a DICOM file as grey values with its scan region and spacing.

    Multi-frame files (cine loops) need ``frame`` (0-based); without it they are refused,
    since which frame holds the lesion is the user's call. Raises :class:`DicomError`."""
    path = str(path)
    try:
        return _read_frame(path, frame, max_pixels)
    except DicomError:
        raise
    except Exception as e:  # pydicom raises many kinds on damaged files (struct, value, index errors...)
        raise DicomError(f"{path}: not a readable DICOM file ({type(e).__name__}: {str(e)[:200]})") from None


def _read_frame(path: str, frame: int | None, max_pixels: int | None) -> UltrasoundFrame:
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise DicomError(f"{path}: DICOM file without pixel data (a report or a structured document?)")
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip()
    if photometric not in PHOTOMETRICS:
        raise DicomError(f"{path}: photometric interpretation {photometric or 'missing'!r} is not supported (expected one of {', '.join(PHOTOMETRICS)})")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if max_pixels is not None and rows * cols > max_pixels:
        raise DicomError(f"{path}: image of {cols}x{rows} pixels is above the limit of {max_pixels} pixels")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1 and frame is None:
        raise DicomError(f"{path}: a multi-frame DICOM ({frames} frames, a cine loop?); choose one with --frame N (0 to {frames - 1})")
    if frame is not None and not 0 <= frame < frames:
        raise DicomError(f"{path}: --frame {frame} is out of range; the file has {frames} frame(s) (0 to {frames - 1})")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder for a compressed transfer syntax, truncated pixel data
        raise DicomError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {e})") from None
    if frames > 1:
        arr = arr[frame]
    arr = _grey(arr, photometric)
    if arr.ndim != 2:
        raise DicomError(f"{path}: expected one 2D frame, got an array of shape {arr.shape}")
    if photometric == "MONOCHROME1":  # bright means low: flip, so lesions look as in MONOCHROME2
        arr = arr.max() + arr.min() - arr
    if not np.all(np.isfinite(arr)):
        raise DicomError(f"{path}: image contains NaN or infinite values")
    region, spacing = scan_region(ds, arr.shape)
    if spacing is None and "PixelSpacing" in ds:  # (row, column) in mm
        try:
            sy, sx = (float(v) for v in ds.PixelSpacing)
            spacing = (sx, sy) if sx > 0 and sy > 0 else None
        except (TypeError, ValueError):
            spacing = None
    return UltrasoundFrame(np.ascontiguousarray(arr, dtype=np.float32), spacing, region, frames)
