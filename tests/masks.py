"""Comparing lesion masks that two paths made from the same image (two processes, two batch
sizes, the CLI, the server, the bundle, Predictor), and checking that a mask outlines a lesion.

The same weights on the same pixels give probabilities that differ by float noise from one path
to another (fp32 kernels chosen by batch size, MONAI's resize against torch's): about 1e-6,
never 1e-5 (``test_bundle_probability_equals_predictor``). A pixel whose probability lies that
close to the threshold may then land on either side, on any machine. So two masks agree when
they are equal everywhere except at pixels whose probability is within ``tol`` of the
threshold, and those pixels are a small share of the image: a mask that differs at a pixel
far from the threshold, or at many pixels, is a real difference and fails.

The post-processed mask (specks dropped, holes filled) follows its raw mask; a pixel at the
threshold that joins a speck or closes a hole could move more pixels, which this refuses: a
very rare failure that would be worth reading, not hiding.
"""

from __future__ import annotations

import numpy as np

# Far above the float noise between paths (about 1e-6), far below what a change of weights,
# preprocessing or resizing moves a probability by.
PROB_TOL = 1e-3
# The most pixels that may differ (all of them at the threshold), as a share of the image.
MAX_FLIP_SHARE = 1e-3


def as_mask(mask) -> np.ndarray:
    """A (H, W) bool mask from a mask array in any of the suite's forms: 0/1 or 0/255, with a
    leading single slice (a volume as Slicer and ITK write it)."""
    arr = np.asarray(mask)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr > 0


def as_prob(prob) -> np.ndarray:
    """A (H, W) float64 probability map, without a leading single slice or channel."""
    arr = np.asarray(prob, dtype=np.float64)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def dice(a, b) -> float:
    """Dice of two masks; 1.0 when both are empty."""
    a, b = as_mask(a), as_mask(b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def assert_masks_agree(
    mask_a, mask_b, prob, threshold: float = 0.5, tol: float = PROB_TOL, prob_b=None, max_share: float = MAX_FLIP_SHARE, what: str = ""
) -> None:
    """``mask_a`` and ``mask_b`` are the same lesion mask up to pixels at the threshold.

    Args:
        mask_a, mask_b: the two masks (see :func:`as_mask`).
        prob: the probability map behind them (one path's, e.g. Predictor's in the test).
        threshold: the probability above which a pixel is lesion.
        tol: how far from the threshold a pixel may be and still differ; also how far apart
            ``prob`` and ``prob_b`` may be.
        prob_b: the other path's probability map, where it has one.
        max_share: the most pixels that may differ, as a share of the image.
        what: names the image in the failure message.
    """
    a, b = as_mask(mask_a), as_mask(mask_b)
    p = as_prob(prob)
    assert a.shape == b.shape == p.shape, f"{what}: shapes {a.shape}, {b.shape}, probability {p.shape}"
    if prob_b is not None:
        pb = as_prob(prob_b)
        assert pb.shape == p.shape, f"{what}: probability shapes {p.shape} and {pb.shape}"
        gap = float(np.abs(p - pb).max())
        assert gap <= tol, f"{what}: probabilities differ by up to {gap:.2e} (> {tol:.0e})"
    differ = a != b
    far = differ & (np.abs(p - threshold) > tol)
    if far.any():
        r, c = np.argwhere(far)[0]
        raise AssertionError(
            f"{what}: masks differ at {int(far.sum())} pixels whose probability is more than {tol:.0e} from "
            f"{threshold} (e.g. at ({r}, {c}): probability {p[r, c]:.4f}, masks {int(a[r, c])} and {int(b[r, c])})"
        )
    n, limit = int(differ.sum()), max_share * differ.size
    assert n <= limit, f"{what}: masks differ at {n} pixels at the threshold, more than {max_share:.1%} of the image"


def assert_outlines(mask, truth, min_dice: float, what: str = "") -> None:
    """``mask`` outlines the lesion of ``truth``: not empty, Dice at least ``min_dice``."""
    m = as_mask(mask)
    assert m.any(), f"{what}: empty mask, no lesion found"
    d = dice(m, truth)
    assert d >= min_dice, f"{what}: lesion Dice {d:.3f} < {min_dice}"


def dice_range(mask, truth, prob, threshold: float = 0.5, tol: float = PROB_TOL) -> tuple[float, float]:
    """The lowest and highest Dice with ``truth`` of the masks that agree with ``mask`` (see
    :func:`assert_masks_agree`): what another path's Dice of the same image may be. A pixel at
    the threshold in the truth raises Dice when on, one outside it lowers Dice."""
    m, t, p = as_mask(mask), as_mask(truth), as_prob(prob)
    band = np.abs(p - threshold) <= tol
    fixed = m & ~band
    ends = [dice(fixed | (band & ~t), t), dice(fixed | (band & t), t), dice(m, t)]
    return min(ends), max(ends)
