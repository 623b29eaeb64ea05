"""Zoom-in refinement (RITM's ZoomIn, nnInteractive's AutoZoom): once there is an outline, a
click or a box, the network re-segments a square crop around them at its own input size, and
the result is pasted back at the image's resolution.

A crop is square in *normalised* image coordinates (a fraction of the height by the same
fraction of the width), so it is stretched to the network's square exactly as the whole image
is: the network sees lesions with the aspect ratio it was trained on, zoomed or not.

Inference works on one image in numpy (:func:`zoom_box`, :class:`ZoomBox`); training draws
jittered crops around the truth for a whole batch in torch (:func:`training_crops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The crop's margin on each side, as a share of the objects' extent; the smallest crop, as a
# share of the image's side (a click alone still gets context); a crop this close to the whole
# image is the whole image.
DEFAULT_MARGIN = 0.4
DEFAULT_MIN_SIDE = 0.25
WHOLE_VIEW = 0.9


@dataclass(frozen=True)
class ZoomBox:
    """A crop of an (H, W) image: rows ``top:top + height``, columns ``left:left + width``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def crop(self, arr: np.ndarray) -> np.ndarray:
        return arr[(..., *self.slices)]

    def to_crop(self, points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
        """(row, col) points of the image as (row, col) of the crop."""
        return [(float(r) - self.top, float(c) - self.left) for r, c in points]

    def paste(self, part: np.ndarray, shape: Sequence[int], fill: np.ndarray | float = 0.0) -> np.ndarray:
        """``part`` (the crop's size) placed in an image of ``shape``; ``fill`` elsewhere."""
        out = np.array(fill, dtype=np.float32, copy=True) if isinstance(fill, np.ndarray) else np.full(tuple(shape), fill, np.float32)
        out[self.slices] = part
        return out


def box_from_xyxy(x0: float, y0: float, x1: float, y1: float, shape: Sequence[int]) -> tuple[int, int, int, int]:
    """A box given by two corners (x the column, y the row, inclusive pixel indices, in any
    order) as (row0, col0, row1, col1) inclusive, clipped to an image of ``shape`` (H, W).
    ValueError when it is not a box on the image (not finite, no area, outside)."""
    h, w = int(shape[-2]), int(shape[-1])
    vals = [float(v) for v in (x0, y0, x1, y1)]
    if not all(np.isfinite(vals)):
        raise ValueError(f"box {vals}: not finite")
    c0, c1 = sorted(vals[0::2])
    r0, r1 = sorted(vals[1::2])
    if c1 < 0 or r1 < 0 or c0 > w - 1 or r0 > h - 1:
        raise ValueError(f"box x {c0:g}..{c1:g}, y {r0:g}..{r1:g} lies outside the {w}x{h} image")
    r0, c0 = max(int(np.floor(r0)), 0), max(int(np.floor(c0)), 0)
    r1, c1 = min(int(np.ceil(r1)), h - 1), min(int(np.ceil(c1)), w - 1)
    if r1 - r0 < 1 or c1 - c0 < 1:
        raise ValueError(f"box x {c0}..{c1}, y {r0}..{r1}: too small (at least 2x2 pixels)")
    return r0, c0, r1, c1


def box_mask(box: tuple[int, int, int, int], shape: Sequence[int]) -> np.ndarray:
    """A boolean (H, W) mask of an inclusive (row0, col0, row1, col1) box."""
    m = np.zeros(tuple(shape[-2:]), bool)
    m[box[0] : box[2] + 1, box[1] : box[3] + 1] = True
    return m


def zoom_box(
    shape: Sequence[int],
    points: Sequence[Sequence[float]] = (),
    mask: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
    margin: float = DEFAULT_MARGIN,
    min_side: float = DEFAULT_MIN_SIDE,
) -> ZoomBox | None:
    """The crop around ``points`` (row, col), ``mask``'s foreground and ``box`` (row0, col0,
    row1, col1 inclusive), widened by ``margin`` of their extent on each side, square in
    normalised coordinates and at least ``min_side`` of the image; None when there is nothing
    to zoom on or the crop would be nearly the whole image (the whole view then)."""
    h, w = int(shape[-2]), int(shape[-1])
    rows, cols = [], []
    for r, c in points:
        rows.append(float(r))
        cols.append(float(c))
    if mask is not None and np.any(mask):
        rr, cc = np.nonzero(np.asarray(mask))
        rows += [float(rr.min()), float(rr.max())]
        cols += [float(cc.min()), float(cc.max())]
    if box is not None:
        rows += [float(box[0]), float(box[2])]
        cols += [float(box[1]), float(box[3])]
    if not rows:
        return None
    # Normalised extents (pixel edges, so a single pixel has extent 1/H by 1/W).
    u0, u1 = min(rows) / h, (max(rows) + 1) / h
    v0, v1 = min(cols) / w, (max(cols) + 1) / w
    side = max(u1 - u0, v1 - v0) * (1 + 2 * margin)
    side = max(side, min_side)
    if side >= WHOLE_VIEW:
        return None
    cu, cv = (u0 + u1) / 2, (v0 + v1) / 2
    top_n = min(max(cu - side / 2, 0.0), 1.0 - side)
    left_n = min(max(cv - side / 2, 0.0), 1.0 - side)
    top, left = int(round(top_n * h)), int(round(left_n * w))
    height, width = max(int(round(side * h)), 2), max(int(round(side * w)), 2)
    return ZoomBox(min(top, h - height), min(left, w - width), min(height, h), min(width, w))


def training_crops(
    images: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    margin: float = DEFAULT_MARGIN,
    jitter: float = 0.15,
    min_side: float = DEFAULT_MIN_SIDE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoomed training views: for each (1, S', S') image of ``images`` (at any size, usually
    twice the network's) a square crop around its truth's bounding box, as :func:`zoom_box`
    would take it, with the margin drawn in [margin / 2, 1.5 margin] and the centre shifted by up
    to ``jitter`` of the side, resampled to ``size``. An image with an empty truth keeps its
    whole view.

    Returns (B, 1, size, size) images and labels ({0, 1}).
    """
    b, dev = images.shape[0], images.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    fg = labels[:, 0] > 0.5
    s_rows, s_cols = fg.shape[-2:]
    any_r, any_c = fg.any(dim=2), fg.any(dim=1)  # (B, H), (B, W)
    has = any_r.any(dim=1)
    ar_r = torch.arange(s_rows, device=dev).float()
    ar_c = torch.arange(s_cols, device=dev).float()
    big = float(max(s_rows, s_cols) + 1)
    r0 = torch.where(any_r, ar_r, big).amin(1) / s_rows
    r1 = (torch.where(any_r, ar_r, -1.0).amax(1) + 1) / s_rows
    c0 = torch.where(any_c, ar_c, big).amin(1) / s_cols
    c1 = (torch.where(any_c, ar_c, -1.0).amax(1) + 1) / s_cols
    rnd = torch.rand(b, 3, generator=generator, device=gen_device).to(dev)
    m = margin * (0.5 + rnd[:, 0])
    side = (torch.maximum(r1 - r0, c1 - c0) * (1 + 2 * m)).clamp(min=min_side, max=1.0)
    cu = (r0 + r1) / 2 + (rnd[:, 1] * 2 - 1) * jitter * side
    cv = (c0 + c1) / 2 + (rnd[:, 2] * 2 - 1) * jitter * side
    top = torch.minimum((cu - side / 2).clamp(min=0), 1 - side)
    left = torch.minimum((cv - side / 2).clamp(min=0), 1 - side)
    side = torch.where(has, side, torch.ones_like(side))
    top = torch.where(has, top, torch.zeros_like(top))
    left = torch.where(has, left, torch.zeros_like(left))
    # affine_grid maps the output's [-1, 1] onto the input's: scale by the side, shift to the centre.
    zero = torch.zeros_like(side)
    theta = torch.stack(
        [torch.stack([side, zero, 2 * (left + side / 2) - 1], 1), torch.stack([zero, side, 2 * (top + side / 2) - 1], 1)], 1
    )
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = (F.grid_sample(labels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return x, y
