"""Per-image segmentation metrics (MONAI's) and their summary as busi-monai reports it.

Lesion metrics are means over images that have a lesion; Dice is undefined for an empty
truth, so normal images are judged by whether any lesion is predicted (false positive).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)

LESION_KEYS = ("dice", "iou", "precision", "recall", "hd95")
# Lesion size as a share of the image; on the shared BUSI copy the quartiles are about 2%, 4.5% and 9.5%.
LESION_SIZES = (("small (<2% of the image)", 0.0, 0.02), ("medium (2-8%)", 0.02, 0.08), ("large (>=8%)", 0.08, 1.01))


def image_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Metrics of one binary (H, W) prediction against its truth."""
    p = torch.as_tensor(np.asarray(pred) > 0, dtype=torch.float32)[None, None]
    t = torch.as_tensor(np.asarray(truth) > 0, dtype=torch.float32)[None, None]
    has_lesion = bool(t.any())
    predicted = bool(p.any())
    out = {
        "has_lesion": has_lesion,
        "predicted_lesion": predicted,
        "pixel_accuracy": float((p == t).float().mean()),
        "lesion_area": int(t.sum()),
        "predicted_area": int(p.sum()),
        "lesion_fraction": float(t.mean()),
    }
    if has_lesion:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty predictions; we handle them below
            out["dice"] = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
            out["iou"] = float(compute_iou(p, t, include_background=True, ignore_empty=False)[0, 0])
            tp, fp, tn, fn = get_confusion_matrix(p, t, include_background=True)[0, 0].tolist()
            out["precision"] = tp / (tp + fp) if (tp + fp) > 0 else 0.0
            out["recall"] = tp / (tp + fn)
            hd = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95)[0, 0]) if predicted else math.nan
            out["hd95"] = hd if math.isfinite(hd) else None
    return out


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _std(values):
    vals = [v for v in values if v is not None]
    return float(np.std(vals)) if vals else None


def summarize(records: list[dict]) -> dict:
    """Summary over records of :func:`image_metrics` (each may carry a ``class``)."""
    lesion = [r for r in records if r["has_lesion"]]
    normal = [r for r in records if not r["has_lesion"]]
    out = {
        "n_images": len(records),
        "n_lesion_images": len(lesion),
        "n_normal_images": len(normal),
        "lesion": {k: _mean(r.get(k) for r in lesion) for k in LESION_KEYS},
        "lesion_std": {k: _std(r.get(k) for r in lesion) for k in ("dice", "iou")},
        "lesion_missed": sum(1 for r in lesion if not r["predicted_lesion"]),
        "pixel_accuracy": _mean(r["pixel_accuracy"] for r in records),
        "normal_false_positive_rate": (sum(r["predicted_lesion"] for r in normal) / len(normal)) if normal else None,
    }
    out["per_size"] = {}
    for name, lo, hi in LESION_SIZES:
        sub = [r for r in lesion if lo <= r.get("lesion_fraction", 0.0) < hi]
        if sub:
            out["per_size"][name] = {
                "n": len(sub), "dice": _mean(r.get("dice") for r in sub), "missed": sum(not r["predicted_lesion"] for r in sub),
            }  # fmt: skip
    classes = sorted({r["class"] for r in records if r.get("class")})
    if classes:
        out["per_class"] = {}
        for c in classes:
            sub = [r for r in records if r.get("class") == c]
            s = summarize([{k: v for k, v in r.items() if k != "class"} for r in sub])
            s.pop("per_class", None)
            out["per_class"][c] = s
    return out
