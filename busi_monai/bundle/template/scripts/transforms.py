"""Transforms of this bundle that MONAI does not ship, in plain numpy/torch (no scipy, no scikit-image).

* ``PilConverter``: PILReader converter; palette PNGs become RGBA (their colours, not their indices).
* ``ToGrayscaled``: a channel-first image to one intensity channel, as busi-monai reads BUSI PNGs
  (alpha dropped; RGB that is really gray -> its first channel; colour overlays -> luminance).
* ``UltrasoundReader``: a LoadImage reader for ultrasound DICOM (``scripts/dicom.py``, pydicom): one
  grey frame in PILReader's orientation, its scan region and pixel spacing (mm) in the meta data.
* ``ScanRegiond``: crops an image to that scan region (what the network was trained on) and, as
  an inverse, pads the prediction back into the full frame with zeros.
* ``ProcessedMaskd``: the paper's "processed mask" from the thresholded one: drop specks of at
  most ``min_area_fraction`` of the image (rounded to pixels), keep only components at least ``keep_fraction`` of the
  largest (8-connected), fill holes (background not 8-connected to the border). It reproduces
  ``busi_monai.inference.postprocessing.processed_mask`` (MONAI RemoveSmallObjects + FillHoles) pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import BorderPad, InvertibleTransform, MapTransform, SpatialCrop
from monai.utils import convert_to_dst_type

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class PilConverter:
    """For MONAI's PILReader: palette images to RGBA so their colours, not indices, are read.

    A class (configs say ``{"_target_": "scripts.transforms.PilConverter"}``) rather than a
    ``$scripts...`` expression, so ``scripts`` is imported lazily, after ``monai.bundle run`` has
    put the bundle root on ``sys.path``: the bundle then runs from any working directory."""

    def __call__(self, img):
        if img.mode in ("P", "PA"):
            return img.convert("RGBA")
        return img


def to_grayscale(img):
    """(C, *spatial) -> (1, *spatial) float32."""
    arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=np.float32)
    if arr.shape[0] == 1:
        out = arr
    else:
        colour = arr[:3] if arr.shape[0] >= 3 else arr[:1]
        if colour.shape[0] == 3 and not (np.array_equal(colour[0], colour[1]) and np.array_equal(colour[1], colour[2])):
            out = (np.moveaxis(colour, 0, -1) @ LUMA)[None]
        else:
            out = colour[:1]
    out = np.ascontiguousarray(out, dtype=np.float32)
    return convert_to_dst_type(out, img, dtype=torch.float32)[0] if isinstance(img, torch.Tensor) else out


class ToGrayscaled(MapTransform):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_grayscale(d[key])
        return d


class UltrasoundReader(ImageReader):
    """DICOM files (by extension or by their ``DICM`` marker) read as one grey frame, transposed
    as PILReader hands images over, with ``scan_region`` (top, left, height, width) and the
    region's spacing in mm (as the affine) in the meta data. ``frame``: of a multi-frame file."""

    def __init__(self, frame: int | None = None):
        super().__init__()
        self.frame = frame

    def verify_suffix(self, filename) -> bool:
        from .dicom import is_dicom

        names = [str(f) for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
        return all(n.lower().endswith((".dcm", ".dicom")) or is_dicom(n) for n in names)

    def read(self, data, **kwargs):
        from .dicom import read_ultrasound

        return read_ultrasound(str(data[0] if isinstance(data, (list, tuple)) else data), frame=self.frame)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arr = np.ascontiguousarray(img.array.T)  # (W, H), as PILReader's reverse indexing gives it
        sx, sy = img.spacing or (1.0, 1.0)
        affine = np.diag([sx, sy, 1.0, 1.0])
        meta = {
            "spatial_shape": np.asarray(arr.shape),
            "original_channel_dim": float("nan"),
            "affine": affine,
            "original_affine": affine.copy(),
            "scan_region": list(img.region) if img.region is not None else [],
        }
        return arr, meta


class ScanRegiond(MapTransform, InvertibleTransform):
    """Crop a channel-first (C, H, W) image to its ``scan_region`` meta data (none: unchanged);
    the inverse pads a prediction back to the full frame with zeros (through ``Invertd``)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            region = list(getattr(d[key], "meta", {}).get("scan_region", []) or [])
            if len(region) == 4:
                top, left, h, w = (int(v) for v in region)
                d[key] = SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            ops = getattr(d[key], "applied_operations", None)
            if ops and ops[-1].get("class") == "SpatialCrop":
                cropped = self.pop_transform(d[key], check=False)["extra_info"]["cropped"]
                pad = BorderPad(cropped)  # as Crop.inverse pads, for a crop this instance made
                with pad.trace_transform(False):
                    d[key] = pad(d[key])
        return d


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of a 2D bool mask: each foreground pixel gets its component's largest
    flat index + 1, background 0. Vectorised union-find (max hooking + pointer jumping)."""
    h, w = mask.shape
    fg = mask.bool().reshape(-1)
    n = h * w
    parent = torch.arange(n, dtype=torch.int64)
    idx = parent[fg]
    while True:
        # Largest parent among each foreground pixel's 8 neighbours (and itself).
        p = torch.where(fg, parent, torch.full_like(parent, -1)).reshape(1, h, w)
        pad = F.pad(p, (1, 1, 1, 1), value=-1)[0]
        best = p[0].clone()
        for dy in range(3):
            for dx in range(3):
                best = torch.maximum(best, pad[dy : dy + h, dx : dx + w])
        best = best.reshape(-1)[fg]
        if torch.equal(best, parent[idx]):
            break
        # Hook each pixel's root onto the largest neighbouring root, then flatten the trees.
        parent.scatter_reduce_(0, parent[idx], best, reduce="amax")
        while True:
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
    out = torch.zeros(n, dtype=torch.int64)
    out[fg] = parent[fg] + 1
    return out.reshape(h, w)


def outside_background(mask: torch.Tensor) -> torch.Tensor:
    """Background pixels 8-connected to the image border (as scipy binary_dilation with
    border_value=1 and a full structure, which MONAI FillHoles uses)."""
    bg = ~mask.bool()
    lab = label_components(bg)
    border = torch.cat([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    border = torch.unique(border[border > 0])
    return torch.isin(lab, border) & bg


def processed_mask(
    mask, min_area_fraction: float = 0.001, keep_fraction: float = 0.1, fill_holes: bool = True, largest_only: bool = False
) -> torch.Tensor:
    """A 2D {0,1} mask -> the processed {0,1} uint8 mask (same shape, torch); ``largest_only``
    keeps the largest component alone (a recipe's ``largest_component``)."""
    full = torch.as_tensor(np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask) > 0)
    min_size = max(1, int(round(min_area_fraction * full.numel())))
    out = torch.zeros(full.shape, dtype=torch.uint8)
    if not full.any():
        return out
    # Work on the mask's bounding box plus a one-pixel background ring: the ring is connected to
    # the image border through the (all background) rest of the image, so nothing changes.
    rows, cols = torch.nonzero(full.any(1)).flatten(), torch.nonzero(full.any(0)).flatten()
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, full.shape[0])
    c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, full.shape[1])
    m = full[r0:r1, c0:c1]
    lab = label_components(m)
    ids, counts = torch.unique(lab[m], return_counts=True)
    # Components of at most `min_size` pixels go: MONAI RemoveSmallObjects passes min_size
    # positionally, which scikit-image >= 0.26 reads as its inclusive `max_size`.
    ids, counts = ids[counts > min_size], counts[counts > min_size]
    if len(ids) > 1 and largest_only:
        # Ties go to the component reached first in raster order, as scipy's labelling does.
        flat = torch.arange(m.numel()).view(m.shape)
        first = torch.stack([flat[(lab == i) & m].min() for i in ids])
        best = [j for j in range(len(ids)) if counts[j] == counts.max()]
        ids = ids[[min(best, key=lambda j: int(first[j]))]]
    elif len(ids) > 1:
        ids = ids[counts >= keep_fraction * counts.max()]
    m = torch.isin(lab, ids) & m
    if fill_holes and m.any():
        m = ~outside_background(m)
    out[r0:r1, c0:c1] = m.to(torch.uint8)
    return out


class ProcessedMaskd(MapTransform):
    """Apply :func:`processed_mask` to each channel of a channel-first 2D mask."""

    def __init__(
        self,
        keys: KeysCollection,
        min_area_fraction: float = 0.001,
        keep_fraction: float = 0.1,
        fill_holes: bool = True,
        allow_missing_keys: bool = False,
        largest_only: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.kwargs = dict(min_area_fraction=min_area_fraction, keep_fraction=keep_fraction, fill_holes=fill_holes, largest_only=largest_only)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            out = torch.stack([processed_mask(c, **self.kwargs) for c in torch.as_tensor(img)])
            d[key] = convert_to_dst_type(out, img, dtype=torch.float32)[0]
        return d
