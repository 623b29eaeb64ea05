"""What labelling one image costs a clinician, in clicks (``al-simulate --annotator clicks``).

The cost model (issue #21), applied to each image a strategy asks for, with the current model:

* **Lesion image**: the model's automatic outline is shown; the clinician clicks as the click
  protocol does (:func:`busi_monai.interactive.protocol.evaluate_clicks`: each click on the
  deepest point of the largest error region) until Dice >= ``target`` (0.90) or ``max_clicks``
  (20). Reached: the cost is the clicks made (0 if the automatic outline is already good
  enough). Not reached: the image is redrawn by hand, and the cost is the clicks already made
  **plus** a hand outline, :func:`polygon_clicks` of the truth (time spent clicking is spent).
* **Normal image**: one look, 0 clicks, if the model leaves it empty; otherwise negative
  protocol clicks until the mask is empty. Never empty within ``max_clicks``: the clicks made
  plus :data:`ERASE_BY_HAND` (select the segment and delete it).
* **Hand outline**: the vertices of a polygon tracing every outline of the mask (holes too)
  within ``tolerance`` (2) pixels, i.e. one click per vertex of a polygon tool.

Clicks land on the image at the resolution it is given in; the simulator passes the images
and masks at their own size, as the clinician sees them in 3D Slicer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from busi_monai.interactive.protocol import Predictor as ClickPredict
from busi_monai.interactive.protocol import evaluate_clicks

MAX_CLICKS = 20
TARGET_DICE = 0.90
OUTLINE_TOLERANCE = 2.0  # pixels between a hand polygon and the true outline
ERASE_BY_HAND = 1  # select the false segment, delete it


def polygon_clicks(mask: np.ndarray, tolerance: float = OUTLINE_TOLERANCE) -> int:
    """Vertices of polygons tracing every outline of ``mask`` (outer ones and holes) within
    ``tolerance`` pixels: what outlining it by hand costs. 0 for an empty mask."""
    from skimage.measure import approximate_polygon, find_contours

    m = np.asarray(mask) > 0.5
    if not m.any():
        return 0
    # Padding closes the contours of regions that touch the image's edge.
    total = 0
    for contour in find_contours(np.pad(m, 1).astype(np.float32), 0.5):
        poly = approximate_polygon(contour, tolerance)
        closed = len(poly) > 1 and np.allclose(poly[0], poly[-1])
        total += max(len(poly) - int(closed), 3)  # no polygon has fewer than 3 vertices
    return int(total)


def hand_outline_cost(masks: Iterable[np.ndarray], tolerance: float = OUTLINE_TOLERANCE) -> int:
    """Clicks to outline every mask by hand (the baseline without any model)."""
    return int(sum(polygon_clicks(m, tolerance) for m in masks))


def image_cost(
    predict_clicks: ClickPredict,
    image: Any,
    truth: np.ndarray,
    max_clicks: int = MAX_CLICKS,
    target: float = TARGET_DICE,
    threshold: float = 0.5,
    tolerance: float = OUTLINE_TOLERANCE,
    with_previous: bool = False,
) -> dict:
    """The clicks a clinician spends labelling one image, by the rules of this module.

    Args:
        predict_clicks: ``predict(image, fg_clicks, bg_clicks)`` -> foreground probability of
            the truth's shape; no clicks is the automatic model.
        image: whatever ``predict_clicks`` takes.
        truth: the true mask (H, W); empty for a normal image.
        max_clicks: the most clicks before the clinician gives up and draws by hand.
        target: the Dice at which a lesion outline is accepted.
        threshold: a pixel is foreground where the probability is > threshold.
        tolerance: pixels of the hand polygon's fit (:func:`polygon_clicks`).
        with_previous: ``predict_clicks`` also takes ``previous=`` (the last outline), as a
            model with the previous-outline channel does.

    Returns:
        ``clicks`` (protocol clicks made), ``redrawn`` (the clicks never got there: drawn or
        erased by hand), ``cost`` (all clicks, the hand work included), ``dice_before`` (the
        automatic outline's Dice) and ``dice_after`` (the last clicked outline's, before any
        redraw); on a normal image Dice is 1 when the mask is empty, else 0.
    """
    truth = np.asarray(truth) > 0.5
    lesion = bool(truth.any())
    goal = target if lesion else 1.0  # a normal image is done when its mask is empty
    res = evaluate_clicks(predict_clicks, [image], [truth], max_clicks, threshold, stop_at=goal, allow_empty=True, with_previous=with_previous)
    dice = res.dice[0]
    clicks = len(res.clicks[0])
    redrawn = not bool(dice[-1] >= goal)
    by_hand = (polygon_clicks(truth, tolerance) if lesion else ERASE_BY_HAND) if redrawn else 0
    return {
        "lesion": lesion,
        "clicks": clicks,
        "redrawn": redrawn,
        "cost": clicks + by_hand,
        "dice_before": float(dice[0]),
        "dice_after": float(dice[-1]),
    }
