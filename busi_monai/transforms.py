"""MONAI transforms of the paper's preprocessing, the augmentation and the processed mask.

Preprocessing (paper): resize to ``size x size`` and scale intensities to [0, 1]. The same
functions serve training, the CLI, the MONAI Label app and (as configs) the bundle.
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    FillHoles,
    MapTransform,
    RemoveSmallObjects,
    Resize,
    Resized,
    ScaleIntensityd,
)

from .io import read_image, read_masks_union

IMAGE_RESIZE_MODE = "bilinear"
LABEL_RESIZE_MODE = "nearest"


class LoadBusiImaged(MapTransform):
    """Load an image (and its label) with :func:`busi_monai.io.read_image` as (1, H, W).

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


class BatchAugment(torch.nn.Module):
    """Ultrasound augmentation of whole (B, 1, S, S) batches on their own device.

    Per-sample MONAI dictionary transforms cost ~1 ms of Python per image, which dominates a
    GPU epoch; the same operations as batched tensor ops cost microseconds. Each sample draws
    its own parameters: horizontal flip (the probe is at the top, so no vertical flip), an
    affine (+-15 deg, scale 0.85-1.15, shift +-6%), gamma 0.7-1.5, brightness/contrast,
    blur (MONAI's GaussianFilter) and multiplicative speckle-like noise. With ``p_elastic``, an
    elastic warp too (a smooth random displacement, ``elastic_sigma`` of the half-width at
    each point of a ``elastic_grid``-square control grid, bicubic between), through the same
    sampling grid as the affine so image and mask move together.
    """

    def __init__(
        self, p_affine: float = 0.7, p_gamma: float = 0.3, p_contrast: float = 0.3, p_blur: float = 0.2, p_noise: float = 0.3,
        p_elastic: float = 0.0, elastic_sigma: float = 0.04, elastic_grid: int = 5,
    ):  # fmt: skip
        super().__init__()
        from monai.networks.layers import GaussianFilter

        self.p = dict(affine=p_affine, gamma=p_gamma, contrast=p_contrast, blur=p_blur, noise=p_noise, elastic=p_elastic)
        self.elastic_sigma, self.elastic_grid = elastic_sigma, elastic_grid
        self.blur = GaussianFilter(spatial_dims=2, sigma=1.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import math

        import torch.nn.functional as F

        b, dev = x.shape[0], x.device

        def chance(p):
            return (torch.rand(b, device=dev) < p).view(b, 1, 1, 1)

        flip = chance(0.5)
        x = torch.where(flip, x.flip(-1), x)
        y = torch.where(flip, y.flip(-1), y)
        use = (torch.rand(b, device=dev) < self.p["affine"]).float()
        ang = (torch.rand(b, device=dev) * 2 - 1) * math.radians(15) * use
        scale = 1 + (torch.rand(b, device=dev) * 2 - 1) * 0.15 * use
        shift = (torch.rand(b, 2, device=dev) * 2 - 1) * 0.12 * use[:, None]
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if self.p["elastic"] > 0:  # drawn only when on, so `ultrasound` keeps its random stream
            g = self.elastic_grid
            coarse = torch.randn(b, 2, g, g, device=dev) * self.elastic_sigma * chance(self.p["elastic"])
            grid = grid + F.interpolate(coarse, size=tuple(x.shape[-2:]), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).to(y.dtype)
        gamma = torch.exp((torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.4)
        x = torch.where(chance(self.p["gamma"]), x.clamp(min=1e-6) ** gamma, x)
        a = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.15
        c = (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.08
        x = torch.where(chance(self.p["contrast"]), x * a + c, x)
        x = torch.where(chance(self.p["blur"]), self.blur(x), x)
        sigma = torch.rand(b, 1, 1, 1, device=dev) * 0.12
        x = torch.where(chance(self.p["noise"]), x * (1 + sigma * torch.randn_like(x)), x)
        return x.clamp_(0, 1), y


# A recipe's ``augment`` names one of these; adding a kind is one entry here.
AUGMENTATIONS: dict[str, Callable[[], BatchAugment | None]] = {
    "none": lambda: None,  # the paper's
    "ultrasound": BatchAugment,
    "ultrasound+elastic": lambda: BatchAugment(p_elastic=0.3),  # and an elastic warp in 30% of the samples
}


def augmentation(kind: str) -> BatchAugment | None:
    """The batched augmentation a recipe's ``augment`` names (None: no augmentation)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[kind]()


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
