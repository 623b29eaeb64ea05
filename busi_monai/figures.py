"""Figures people look at: an ultrasound image for display, a mask or a heatmap over it.
Shared by ``explain`` (per-image figures) and ``report`` (case galleries)."""

from __future__ import annotations

import numpy as np

TRUTH_COLOUR = "#00e000"
PRED_COLOUR = "#ff3030"


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def display_image(image: np.ndarray) -> np.ndarray:
    """Image intensities to [0, 1] for display (1st-99.5th percentile window)."""
    a = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(a, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1
    return np.clip((a - lo) / (hi - lo), 0, 1)


def mask_overlay(ax, img, mask, colour, truth=None):
    """``mask`` filled and outlined in ``colour`` over the display image; ``truth`` dashed."""
    import matplotlib.colors as mcolors

    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    m = np.asarray(mask) > 0
    if m.any():
        rgba = np.zeros((*m.shape, 4), dtype=np.float32)
        rgba[m] = (*mcolors.to_rgb(colour), 0.45)
        ax.imshow(rgba, interpolation="nearest")
        ax.contour(m.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
    if truth is not None and np.any(truth):
        ax.contour((np.asarray(truth) > 0).astype(float), levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.2, linestyles="--")


def heat_overlay(ax, img, heat, mask=None, cmap="jet", alpha=0.45, vmax=1.0):
    """A heatmap over the display image, ``mask`` outlined in white; returns the image artist."""
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    h = ax.imshow(heat, cmap=cmap, vmin=0, vmax=vmax, alpha=alpha, interpolation="bilinear")
    if mask is not None and np.any(mask):
        ax.contour((np.asarray(mask) > 0).astype(float), levels=[0.5], colors=["white"], linewidths=0.9)
    return h
