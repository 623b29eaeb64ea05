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
    SpatialPadd,
)

from busi_monai.data.io import read_image, read_masks_union
from busi_monai.data.region import crop_to_scan, scan_view

IMAGE_RESIZE_MODE = "bilinear"
LABEL_RESIZE_MODE = "nearest"


class LoadBusiImaged(MapTransform):
    """Load an image (and its label) with :func:`busi_monai.data.io.read_image` as (1, H, W).

    Handles BUSI's mixed PNG modes and single-slice NIfTI/NRRD the same way everywhere. A
    label given as a list of files (BUSI's ``_mask``, ``_mask_1``, ...) is their union. An
    image with a scan region (ultrasound DICOM) and its label are cut to that region, as
    :class:`~busi_monai.inference.predictor.Predictor` cuts it.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = None
        for key in self.key_iterator(d):
            if key == "label":
                full = read_masks_union(d[key], None if image is None else image.shape)
                arr = (full if image is None else crop_to_scan(full, image)).astype(np.float32)
            else:
                image = read_image(d[key])
                arr = scan_view(image).array  # an ultrasound DICOM: its scan region only
            d[f"{key}_shape"] = arr.shape
            d[key] = arr[None]
        return d


def preprocess_list(image_size: int, keys: Sequence[str] = ("image", "label"), pad_square: bool = False) -> list:
    """Paper preprocessing of loaded (1, H, W) arrays: resize, then intensities to [0, 1].

    A flat list: a nested Compose counts as random for CacheDataset and would not be cached.

    Args:
        image_size: the network's square side.
        keys: ``image``, and ``label`` where there is one.
        pad_square: keep the aspect ratio: the longer side to ``image_size``, then zero padding
            (black, as ultrasound's background) on both sides to the square (:func:`square_box`).
    """
    has_label = "label" in keys
    modes = (IMAGE_RESIZE_MODE, LABEL_RESIZE_MODE) if has_label else (IMAGE_RESIZE_MODE,)
    anti_aliasing = (True, False)[: len(modes)]
    if not pad_square:
        return [
            Resized(keys=list(keys), spatial_size=(image_size, image_size), mode=modes, anti_aliasing=anti_aliasing),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
        ]
    return [
        Resized(keys=list(keys), spatial_size=image_size, size_mode="longest", mode=modes, anti_aliasing=anti_aliasing),
        ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),  # before padding: the padding stays 0
        SpatialPadd(keys=list(keys), spatial_size=(image_size, image_size), method="symmetric", value=0),
        EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
    ]


def preprocess_transforms(image_size: int, keys: Sequence[str] = ("image", "label"), pad_square: bool = False) -> Compose:
    return Compose(preprocess_list(image_size, keys, pad_square))


def preprocess_array(image: np.ndarray, image_size: int, pad_square: bool = False) -> torch.Tensor:
    """One (H, W) image to the network's (1, size, size) input in [0, 1] (``pad_square``: see :func:`preprocess_list`)."""
    out = preprocess_transforms(image_size, keys=("image",), pad_square=pad_square)({"image": np.asarray(image, np.float32)[None]})
    return out["image"]


def preprocess_mask(mask: np.ndarray, image_size: int, pad_square: bool = False) -> torch.Tensor:
    """One (H, W) binary mask to (1, size, size) {0, 1} through the image's geometry (a mask
    given to the network, such as the previous outline): resized like the image, then binarised."""
    x = {"mask": np.asarray(mask, np.float32)[None]}
    if not pad_square:
        x = Resized(keys="mask", spatial_size=(image_size, image_size), mode=IMAGE_RESIZE_MODE, anti_aliasing=True)(x)
    else:
        x = Resized(keys="mask", spatial_size=image_size, size_mode="longest", mode=IMAGE_RESIZE_MODE, anti_aliasing=True)(x)
        x = SpatialPadd(keys="mask", spatial_size=(image_size, image_size), method="symmetric", value=0)(x)
    return (torch.as_tensor(np.asarray(x["mask"])) > 0.5).float()


def square_box(shape: tuple[int, int], image_size: int) -> tuple[int, int, int, int]:
    """Where an image of ``shape`` (H, W) lies in its padded square: (top, left, height, width).

    The same arithmetic as MONAI's ``Resize(size_mode="longest")`` and symmetric ``SpatialPad``.
    """
    scale = image_size / max(shape)
    h, w = (round(s * scale) for s in shape)
    return (image_size - h) // 2, (image_size - w) // 2, h, w


def restore_size(prob: torch.Tensor, shape: tuple[int, int], pad_square: bool = False) -> torch.Tensor:
    """A (1, S, S) probability map back to the image's own (1, H, W), bilinear; ``pad_square``
    crops the padding away first."""
    if pad_square:
        top, left, h, w = square_box(tuple(shape), prob.shape[-1])
        prob = prob[..., top : top + h, left : left + w]
    return Resize(spatial_size=tuple(shape), mode="bilinear")(prob)
