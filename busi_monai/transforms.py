"""MONAI transforms of the paper's preprocessing, the augmentation and the processed mask.

Preprocessing (paper): resize to ``size x size`` and scale intensities to [0, 1]. The same
functions serve training, the CLI, the MONAI Label app and (as configs) the bundle.
"""

from __future__ import annotations

import warnings

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    FillHoles,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RemoveSmallObjects,
    Resize,
    Resized,
    ScaleIntensityd,
)

from .io import read_image, read_mask

IMAGE_RESIZE_MODE = "bilinear"
LABEL_RESIZE_MODE = "nearest"


class LoadBusiImaged(MapTransform):
    """Load an image (and its label) with :func:`busi_monai.io.read_image` as (1, H, W).

    Handles BUSI's mixed PNG modes and single-slice NIfTI/NRRD the same way everywhere.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        shape = None
        for key in self.key_iterator(d):
            if key == "label":
                arr = read_mask(d[key], expected_shape=shape).astype(np.float32)
            else:
                arr = read_image(d[key]).array
                shape = arr.shape
            d[f"{key}_shape"] = arr.shape
            d[key] = arr[None]
        return d


def preprocess_transforms(image_size: int, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Paper preprocessing of loaded (1, H, W) arrays: resize, then intensities to [0, 1]."""
    has_label = "label" in keys
    modes = (IMAGE_RESIZE_MODE, LABEL_RESIZE_MODE) if has_label else (IMAGE_RESIZE_MODE,)
    return Compose(
        [
            Resized(keys=list(keys), spatial_size=(image_size, image_size), mode=modes, anti_aliasing=(True, False)[: len(modes)]),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
        ]
    )


def preprocess_array(image: np.ndarray, image_size: int) -> torch.Tensor:
    """One (H, W) image to the network's (1, size, size) input in [0, 1]."""
    out = preprocess_transforms(image_size, keys=("image",))({"image": np.asarray(image, np.float32)[None]})
    return out["image"]


def restore_size(prob: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A (1, S, S) probability map back to the image's own (1, H, W), bilinear."""
    return Resize(spatial_size=tuple(shape), mode="bilinear")(prob)


def augmentation_transforms(kind: str) -> Compose | None:
    """Random transforms on (1, S, S) image/label tensors; ``none`` is the paper's choice."""
    if kind == "none":
        return None
    if kind != "ultrasound":
        raise ValueError(f"unknown augmentation {kind!r}")
    keys = ["image", "label"]
    return Compose(
        [
            # Lesions appear on either side; the probe is always at the top, so no vertical flip.
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandAffined(
                keys,
                prob=0.7,
                rotate_range=0.26,  # +-15 degrees
                scale_range=0.15,
                translate_range=(16, 16),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
            RandScaleIntensityd("image", prob=0.3, factors=0.15),
            RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
            RandGaussianNoised("image", prob=0.3, std=0.04),
        ]
    )


def processed_mask(
    mask: np.ndarray, min_area_fraction: float = 0.001, keep_fraction: float = 0.1, fill_holes: bool = True
) -> np.ndarray:
    """The paper's "processed mask": a clinically plausible outline from the raw mask.

    Drops specks below ``min_area_fraction`` of the image, keeps only components at least
    ``keep_fraction`` of the largest one, and fills holes. Never adds a component.
    """
    from scipy import ndimage

    m = torch.as_tensor(np.asarray(mask, dtype=bool)[None])
    min_size = max(1, int(round(min_area_fraction * mask.size)))
    with warnings.catch_warnings():  # scikit-image renamed min_size; MONAI still passes it
        warnings.simplefilter("ignore", FutureWarning)
        m = RemoveSmallObjects(min_size=min_size, connectivity=2)(m)
    arr = np.asarray(m[0], dtype=bool)
    labels, n = ndimage.label(arr, structure=np.ones((3, 3)))
    if n > 1:
        areas = ndimage.sum(arr, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(areas >= keep_fraction * areas.max()) + 1
        arr = np.isin(labels, keep)
    if fill_holes:
        arr = np.asarray(FillHoles()(torch.as_tensor(arr[None]))[0], dtype=bool)
    return arr.astype(np.uint8)
