"""The paper's processed mask: small islands removed, holes filled."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.transforms import (
    FillHoles,
    RemoveSmallObjects,
)


def processed_mask(
    mask: np.ndarray, min_area_fraction: float = 0.001, keep_fraction: float = 0.1, fill_holes: bool = True, largest_only: bool = False
) -> np.ndarray:
    """The paper's "processed mask": a clinically plausible outline from the raw mask.

    Drops specks below ``min_area_fraction`` of the image, keeps only components at least
    ``keep_fraction`` of the largest one, and fills holes. Never adds a component.

    Args:
        mask: (H, W) raw mask.
        min_area_fraction: specks below this share of the image go.
        keep_fraction: components below this share of the largest one go.
        fill_holes: fill the holes of what is kept.
        largest_only: keep the largest component alone (a recipe's ``largest_component``).
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
        keep = [int(np.argmax(areas)) + 1] if largest_only else np.flatnonzero(areas >= keep_fraction * areas.max()) + 1
        arr = np.isin(labels, keep)
    if fill_holes:
        arr = np.asarray(FillHoles()(torch.as_tensor(arr[None]))[0], dtype=bool)
    return arr.astype(np.uint8)
