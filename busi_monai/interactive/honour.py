"""Clicks are always honoured: a foreground click lies inside the returned outline and a
background click outside it, whatever the network says.

A weak or early model sometimes ignores a click (an outline elsewhere, or none); the clinician
must never see the outline refuse the point they just placed. So, after the network:

1. with any foreground click, only the components that hold a foreground click or overlap the
   previous outline are kept (the clicked lesion, not an unrelated island);
2. with background clicks only (no foreground click, no box), the outline stays within the
   previous one: "not here" takes away, it never draws somewhere new;
3. a foreground click outside the outline adds a disc around it (the region the network
   ignored), joined to the outline where it touches;
4. a background click on the outline cuts a disc around the click where the user said the
   component is a lesion (a foreground click in it, or a box); elsewhere it cuts the click's
   whole component. Were the previous outline a claim too, a false outline on a normal scan
   would shrink a little with each click instead of going (docs/interactive.md).

A pixel clicked both ways keeps its foreground click (the disc cut skips foreground clicks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def _disc(shape: Sequence[int], r: float, c: float, radius: float) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - r) ** 2 + (cc - c) ** 2 <= radius**2


def _pixel(p: Sequence[float], shape: Sequence[int]) -> tuple[int, int]:
    return min(max(int(np.floor(float(p[0]) + 0.5)), 0), shape[0] - 1), min(max(int(np.floor(float(p[1]) + 0.5)), 0), shape[1] - 1)


def honour_clicks(
    mask: np.ndarray,
    foreground: Sequence[Sequence[float]] = (),
    background: Sequence[Sequence[float]] = (),
    radius: float = 3.0,
    previous: np.ndarray | None = None,
    boxed: bool = False,
) -> np.ndarray:
    """``mask`` (H, W) changed as little as needed so that every click is honoured.

    Args:
        mask: the network's processed mask.
        foreground: (row, col) foreground clicks on the mask's grid.
        background: (row, col) background clicks.
        radius: pixels of the disc added or cut around an ignored click.
        previous: the outline before these clicks: its components stay with a foreground
            click (step 1), and bound the outline with background clicks only (step 2).
        boxed: the user drew a box: what lies in it is a lesion until clicked otherwise.

    Returns:
        a uint8 mask in which each foreground click's pixel is 1 and each background click's 0.
    """
    out = np.asarray(mask).astype(bool).copy()
    shape = out.shape
    fg = [_pixel(p, shape) for p in foreground]
    bg = [_pixel(p, shape) for p in background]
    had = previous is not None and bool(np.any(previous))
    if bg and not fg and not boxed and had:
        out &= np.asarray(previous).astype(bool)
    if fg:
        labels, n = ndimage.label(out, structure=_EIGHT)
        if n:
            keep = {labels[p] for p in fg} - {0}
            if had:
                keep |= set(np.unique(labels[np.asarray(previous).astype(bool)])) - {0}
            out = np.isin(labels, sorted(keep))
        for r, c in fg:
            if not out[r, c]:
                out |= _disc(shape, r, c, radius)
    if bg:
        labels, _ = ndimage.label(out, structure=_EIGHT)
        claimed = {labels[p] for p in fg}
        for r, c in bg:
            lab = labels[r, c]
            if lab == 0 or not out[r, c]:
                continue
            if lab in claimed or boxed:
                out &= ~_disc(shape, r, c, radius)
            else:
                out &= labels != lab
    for p in fg:  # a foreground click wins over a background disc cut on top of it
        out[p] = True
    return out.astype(np.uint8)
