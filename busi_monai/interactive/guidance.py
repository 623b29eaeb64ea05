"""Click maps: the two extra input channels (foreground clicks, background clicks) of the
click-guided network, and the mapping of clicks between an original image and the network's
input size.

Coordinates are (row, col) in pixels everywhere in this package, row 0 at the top, col 0 at
the left; a user interface that speaks X,Y means X = col, Y = row (see :func:`rowcol_from_xy`).

Batched clicks are two tensors: ``coords`` (B, K, 2) holding (row, col) and ``labels`` (B, K)
holding :data:`POSITIVE` (foreground), :data:`NEGATIVE` (background) or :data:`NO_CLICK` (a
padding slot), so that images with different numbers of clicks share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

POSITIVE = 1
NEGATIVE = 0
NO_CLICK = -1
# DeepEdit's default sigma (AddGuidanceSignalDeepEditd), in pixels at the network's input size.
DEFAULT_SIGMA = 3.0

Click = tuple[float, float]


def rowcol_from_xy(points: Sequence[Sequence[float]]) -> list[Click]:
    """(x, y) points, as a viewer or a command line gives them, as (row, col) = (y, x)."""
    return [(float(p[1]), float(p[0])) for p in points]


def rowcol_inside(x: float, y: float, shape: Sequence[int]) -> Click:
    """A click given as (x, y) = (column, row), as the command line and Slicer give it, checked to
    lie on an image of ``shape`` (H, W) and returned as (row, col); ValueError otherwise."""
    h, w = int(shape[-2]), int(shape[-1])
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"lies outside the {w}x{h} image (x is the column, y the row)")
    return (float(y), float(x))


def scale_clicks(clicks: Sequence[Sequence[float]], from_shape: Sequence[int], to_shape: Sequence[int]) -> list[Click]:
    """Clicks on an image of ``from_shape`` (H, W) moved onto the same image resized to ``to_shape``.

    Images are resized, not padded, to the network's square input, so each axis has its own
    factor. Pixel centres map onto pixel centres (as an align_corners=False resize maps them),
    and the result is clipped into the target image. Swap the shapes to map back.
    """
    out = []
    for p in clicks:
        rc = []
        for v, n_from, n_to in zip(p[:2], from_shape[-2:], to_shape[-2:]):
            rc.append(min(max((float(v) + 0.5) * n_to / n_from - 0.5, 0.0), n_to - 1.0))
        out.append((rc[0], rc[1]))
    return out


def clicks_to_tensors(
    fg_clicks: Sequence[Sequence[float]], bg_clicks: Sequence[Sequence[float]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's click lists as batched ``coords`` (1, K, 2) and ``labels`` (1, K)."""
    pts = [tuple(map(float, p[:2])) for p in fg_clicks] + [tuple(map(float, p[:2])) for p in bg_clicks]
    coords = torch.tensor(pts, dtype=torch.float32, device=device).reshape(1, len(pts), 2)
    labels = torch.tensor([POSITIVE] * len(fg_clicks) + [NEGATIVE] * len(bg_clicks), dtype=torch.long, device=device)
    return coords, labels.reshape(1, len(pts))


def click_maps_batch(
    coords: torch.Tensor, labels: torch.Tensor, shape: Sequence[int], sigma: float = DEFAULT_SIGMA
) -> torch.Tensor:
    """Click maps (B, 2, H, W) for batched clicks: channel 0 foreground, channel 1 background.

    Each click is a Gaussian of ``sigma`` pixels centred on its (rounded, clipped) pixel, peaking
    at exactly 1 there; a channel's clicks are max-combined, so maps lie in [0, 1] and are all
    zero without clicks. Runs on ``coords``' device with no loop over clicks or pixels.

    MONAI's AddGuidanceSignald / AddGuidanceSignalDeepEditd draw the same Gaussian for a single
    click, but they are not used here: they work one image at a time in numpy, and they sum a
    channel's clicks and min-max normalise the sum, so a click's height there depends on where
    the other clicks are (two close clicks halve every other click's peak).

    Args:
        coords: (B, K, 2) (row, col) at the map's size; K may be 0.
        labels: (B, K) POSITIVE, NEGATIVE or NO_CLICK.
        shape: (H, W) of the maps (the network's input size).
        sigma: Gaussian standard deviation in pixels.
    """
    h, w = int(shape[-2]), int(shape[-1])
    b, k = labels.shape[:2]
    device = coords.device
    maps = torch.zeros(b, 2, h, w, device=device)
    if k == 0:
        return maps
    lim = torch.tensor([h - 1, w - 1], device=device, dtype=torch.float32)
    # Round half up (floor(x + 0.5)) so that the pixel is the same on every device.
    rc = torch.minimum(torch.floor(coords.float() + 0.5).clamp_min(0), lim)
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    # Separable: exp(-(dr^2 + dc^2) / 2s^2) = exp(-dr^2/2s^2) * exp(-dc^2/2s^2); (B, K, H) and (B, K, W).
    gr = torch.exp(-((rows.view(1, 1, h) - rc[..., 0:1]) ** 2) / (2 * sigma**2))
    gc = torch.exp(-((cols.view(1, 1, w) - rc[..., 1:2]) ** 2) / (2 * sigma**2))
    for channel, label in enumerate((POSITIVE, NEGATIVE)):
        keep = (labels == label).float()  # (B, K)
        g = (gr * keep.unsqueeze(-1)).unsqueeze(-1) * gc.unsqueeze(-2)  # (B, K, H, W)
        maps[:, channel] = g.amax(dim=1)
    return maps


def click_maps(
    shape: Sequence[int], fg_clicks: Sequence[Sequence[float]], bg_clicks: Sequence[Sequence[float]], sigma: float = DEFAULT_SIGMA
) -> np.ndarray:
    """One image's click maps (2, H, W) float32: :func:`click_maps_batch` for a single image, so
    inference sees exactly the maps training saw.

    Args:
        shape: (H, W) of the maps (the network's input size).
        fg_clicks: (row, col) foreground clicks at that size.
        bg_clicks: (row, col) background clicks at that size.
        sigma: Gaussian standard deviation in pixels.
    """
    coords, labels = clicks_to_tensors(fg_clicks, bg_clicks)
    return click_maps_batch(coords, labels, shape, sigma)[0].numpy()
