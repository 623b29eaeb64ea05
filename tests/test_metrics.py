"""evaluate's numbers against hand-computed ones on tiny cases."""

import math

import numpy as np
import pytest

from busi_monai.evaluation.metrics import image_metrics, summarize


def _masks():
    truth = np.zeros((10, 10), np.uint8)
    truth[2:6, 2:6] = 1  # 16 pixels
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 2:4] = 1  # 8 pixels, all inside
    pred[8, 8] = 1  # 1 false positive
    return pred, truth


def test_hand_computed_lesion_metrics():
    pred, truth = _masks()
    m = image_metrics(pred, truth)
    tp, fp, fn = 8, 1, 8
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["pixel_accuracy"] == pytest.approx((100 - fp - fn) / 100)
    assert m["hd95"] > 0 and math.isfinite(m["hd95"])


def test_missed_lesion_and_normal_images():
    pred, truth = _masks()
    empty = np.zeros_like(truth)
    missed = image_metrics(empty, truth)
    assert missed["dice"] == 0 and missed["recall"] == 0 and missed["hd95"] is None
    records = [
        dict(image_metrics(pred, truth), **{"class": "benign"}),
        dict(missed, **{"class": "malignant"}),
        dict(image_metrics(pred, empty), **{"class": "normal"}),  # false lesion on a normal image
        dict(image_metrics(empty, empty), **{"class": "normal"}),
    ]
    s = summarize(records)
    assert s["n_images"] == 4 and s["n_lesion_images"] == 2
    assert s["lesion"]["dice"] == pytest.approx((16 / 25 + 0) / 2)
    assert s["lesion_missed"] == 1
    assert s["normal_false_positive_rate"] == pytest.approx(0.5)
    assert s["pixel_accuracy"] == pytest.approx((0.91 + 0.84 + 0.91 + 1.0) / 4)
    assert s["per_class"]["benign"]["lesion"]["dice"] == pytest.approx(0.64)
    assert s["per_class"]["normal"]["normal_false_positive_rate"] == pytest.approx(0.5)


def test_lesions_are_reported_by_size():
    pred, truth = _masks()  # the lesion covers 16% of the image
    small = np.zeros((100, 100), np.uint8)
    small[10:20, 10:20] = 1  # 1%
    records = [image_metrics(pred, truth), image_metrics(small, small), image_metrics(np.zeros_like(small), small)]
    sizes = summarize(records)["per_size"]
    assert sizes["small (<2% of the image)"] == {"n": 2, "dice": pytest.approx(0.5), "missed": 1}
    assert sizes["large (>=8%)"] == {"n": 1, "dice": pytest.approx(0.64), "missed": 0}
    assert "medium (2-8%)" not in sizes
