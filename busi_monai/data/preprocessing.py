"""The paper's preprocessing as MONAI transforms: read, resize to ``size x size``, scale to [0, 1];
and back to the image's own size. The same functions serve training, the CLI, the MONAI Label app
and (as configs) the bundle.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Resize,
    Resized,
    ScaleIntensityd,
)

from busi_monai.data.io import read_image, read_masks_union

IMAGE_RESIZE_MODE = "bilinear"
LABEL_RESIZE_MODE = "nearest"


class LoadBusiImaged(MapTransform):
    """Load an image (and its label) with :func:`busi_monai.data.io.read_image` as (1, H, W).

    Handles BUSI's mixed PNG modes and single-slice NIfTI/NRRD the same way everywhere. A
    label given as a list of files (BUSI's ``_mask``, ``_mask_1``, ...) is their union.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        shape = None
        for key in self.key_iterator(d):
            if key == "label":
                arr = read_masks_union(d[key], shape).astype(np.float32)
            else:
                arr = read_image(d[key]).array
                shape = arr.shape
            d[f"{key}_shape"] = arr.shape
            d[key] = arr[None]
        return d


def preprocess_list(image_size: int, keys: Sequence[str] = ("image", "label")) -> list:
    """Paper preprocessing of loaded (1, H, W) arrays: resize, then intensities to [0, 1].

    A flat list: a nested Compose counts as random for CacheDataset and would not be cached.
    """
    has_label = "label" in keys
    modes = (IMAGE_RESIZE_MODE, LABEL_RESIZE_MODE) if has_label else (IMAGE_RESIZE_MODE,)
    return [
        Resized(keys=list(keys), spatial_size=(image_size, image_size), mode=modes, anti_aliasing=(True, False)[: len(modes)]),
        ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
        EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
    ]


def preprocess_transforms(image_size: int, keys: Sequence[str] = ("image", "label")) -> Compose:
    return Compose(preprocess_list(image_size, keys))


def preprocess_array(image: np.ndarray, image_size: int) -> torch.Tensor:
    """One (H, W) image to the network's (1, size, size) input in [0, 1]."""
    out = preprocess_transforms(image_size, keys=("image",))({"image": np.asarray(image, np.float32)[None]})
    return out["image"]


def restore_size(prob: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A (1, S, S) probability map back to the image's own (1, H, W), bilinear."""
    return Resize(spatial_size=tuple(shape), mode="bilinear")(prob)
