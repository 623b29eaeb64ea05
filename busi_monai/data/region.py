"""The scan region of an ultrasound frame: what the network sees, and how its output goes back.

An image read with a region (:attr:`busi_monai.data.io.Image2D.region`, from a DICOM's
Sequence of Ultrasound Regions) is cropped to it before the network (training's loader and
:class:`busi_monai.inference.predictor.Predictor` both call :func:`scan_view`), and every map
the network returns is pasted back into the full frame with zeros around it
(:func:`to_full_frame`): masks keep the frame's geometry and nothing lies outside the scan.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from busi_monai.data.io import Image2D


def crop_to_scan(array: np.ndarray, image: Image2D) -> np.ndarray:
    """``array`` (the frame's (H, W), e.g. its mask) cut to ``image``'s scan region."""
    if image.region is None:
        return array
    top, left, h, w = image.region
    return array[top : top + h, left : left + w]


def scan_view(image: Image2D) -> Image2D:
    """The scan region as an image of its own, placed where it lies in the frame (origin moved
    along the frame's axes), so that a file written ``like=`` it overlays the frame in Slicer."""
    if image.region is None:
        return image
    top, left, _, _ = image.region
    offset = np.asarray(image.direction, float)[:2, :2] @ (np.array([left, top], float) * np.asarray(image.spacing, float))
    origin = tuple((np.asarray(image.origin, float) + offset).tolist())
    return replace(image, array=np.ascontiguousarray(crop_to_scan(image.array, image)), origin=origin, region=None, volume3d=None)


def to_full_frame(array: np.ndarray, image: Image2D) -> np.ndarray:
    """A map of the scan region pasted into a zero frame of ``image``'s full size."""
    if image.region is None:
        return array
    top, left, h, w = image.region
    if tuple(array.shape) != (h, w):
        raise ValueError(f"{image.path}: a map of shape {array.shape} does not fit the scan region of {h}x{w}")
    out = np.zeros(image.shape, dtype=array.dtype)
    out[top : top + h, left : left + w] = array
    return out


def outside_scan(array: np.ndarray, image: Image2D) -> int:
    """How many non-zero pixels of ``array`` (the frame's (H, W)) lie outside the scan region."""
    if image.region is None:
        return 0
    return int(np.count_nonzero(array)) - int(np.count_nonzero(crop_to_scan(array, image)))
