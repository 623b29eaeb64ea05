"""Zoom-in refinement, Slicer-style boxes and honoured clicks, with known answers: the crop's
geometry (square in normalised coordinates, margins, the smallest crop, clamping), the
training crops around the truth, the box's parsing, the rules that honour a click, and the
protocol's box and previous-outline context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busi_monai.interactive.honour import honour_clicks
from busi_monai.interactive.protocol import evaluate_clicks
from busi_monai.interactive.zoom import ZoomBox, box_from_xyxy, box_mask, training_crops, zoom_box


def test_zoom_box_is_square_in_normalised_coordinates_with_the_margin():
    # A 10x20 object at rows 40-49, cols 100-119 of a 200x400 image: extents 0.05 and 0.05.
    mask = np.zeros((200, 400), bool)
    mask[40:50, 100:120] = True
    z = zoom_box(mask.shape, mask=mask, margin=0.5, min_side=0.0)
    # side = 0.05 * (1 + 2 * 0.5) = 0.1 of each axis: 20 rows by 40 columns, centred on the object.
    assert (z.height, z.width) == (20, 40)
    assert (z.top, z.left) == (35, 90)
    assert z.crop(mask).sum() == mask.sum(), "the whole object is inside the crop"


def test_zoom_box_smallest_side_clamping_and_the_whole_view():
    z = zoom_box((100, 100), points=[(2, 97)], min_side=0.3)  # one click near the top-right corner
    assert (z.height, z.width) == (30, 30) and z.top == 0 and z.left == 70, "kept on the image, not shrunk"
    assert zoom_box((100, 100), points=[(5, 5), (95, 95)]) is None, "a crop of nearly the whole image is the whole view"
    assert zoom_box((100, 100)) is None, "nothing to zoom on"
    box = (10, 20, 29, 59)  # rows 10-29, cols 20-59
    z = zoom_box((100, 100), box=box, margin=0.25, min_side=0.0)
    assert z.crop(box_mask(box, (100, 100))).sum() == 20 * 40 and z.height == z.width == 60


def test_zoom_box_paste_and_points_round_trip():
    z = ZoomBox(10, 20, 30, 40)
    part = np.ones((30, 40), np.float32)
    full = z.paste(part, (100, 100))
    assert full.sum() == 1200 and full[10, 20] == 1 and full[9, 20] == 0 and full[40, 60] == 0
    assert z.to_crop([(15.0, 25.0)]) == [(5.0, 5.0)]


def test_training_crops_zoom_on_the_lesion_and_keep_normals_whole():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 64, 64)
    labels = torch.zeros(3, 1, 64, 64)
    labels[0, 0, 10:18, 40:50] = 1  # a small lesion, off-centre
    labels[1, 0, 30:34, 5:9] = 1  # a tiny one at the edge
    x, y = training_crops(images, labels, 32, torch.Generator().manual_seed(0), margin=0.4, jitter=0.1, min_side=0.2)
    assert x.shape == y.shape == (3, 1, 32, 32)
    for i in (0, 1):
        assert y[i].mean() > 4 * labels[i].mean(), "the lesion fills much more of the zoomed view"
    whole = torch.nn.functional.interpolate(images[2:], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[2:], whole, atol=1e-5, rtol=0), "a normal image keeps its whole view"
    assert not y[2].any()
    again = training_crops(images, labels, 32, torch.Generator().manual_seed(0), margin=0.4, jitter=0.1, min_side=0.2)
    torch.testing.assert_close(again[0], x)


def test_box_from_corners_in_any_order_clipped_and_refused_when_not_a_box():
    assert box_from_xyxy(30, 10, 60, 40, (100, 200)) == (10, 30, 40, 60)
    assert box_from_xyxy(60, 40, 30, 10, (100, 200)) == (10, 30, 40, 60), "reversed corners: the same box"
    assert box_from_xyxy(-5, 90, 250, 120, (100, 200)) == (90, 0, 99, 199), "clipped to the image"
    with pytest.raises(ValueError, match="outside"):
        box_from_xyxy(300, 10, 400, 40, (100, 200))
    with pytest.raises(ValueError, match="too small"):
        box_from_xyxy(30, 10, 30, 40, (100, 200))
    with pytest.raises(ValueError, match="not finite"):
        box_from_xyxy(float("nan"), 10, 30, 40, (100, 200))


def _two_blobs() -> np.ndarray:
    m = np.zeros((60, 80), np.uint8)
    m[10:30, 10:30] = 1  # A
    m[40:50, 60:75] = 1  # B
    return m


def test_honour_keeps_the_clicked_component_and_adds_an_ignored_click():
    m = _two_blobs()
    out = honour_clicks(m, foreground=[(20, 20)])
    assert out[20, 20] == 1 and out[45, 65] == 0, "the island without a click goes"
    out = honour_clicks(m, foreground=[(20, 20)], previous=m)
    assert out[45, 65] == 1, "an island of the previous outline stays"
    out = honour_clicks(np.zeros((60, 80), np.uint8), foreground=[(5, 70)], radius=3)
    assert out[5, 70] == 1 and out.sum() == np.sum((np.mgrid[:60, :80][0] - 5) ** 2 + (np.mgrid[:60, :80][1] - 70) ** 2 <= 9)


def test_honour_cuts_under_a_background_click_as_little_as_needed():
    m = _two_blobs()
    out = honour_clicks(m, background=[(45, 65)])
    assert out[40:50, 60:75].sum() == 0 and out[10:30, 10:30].all(), "an island nothing claims goes whole"
    out = honour_clicks(m, background=[(45, 65)], previous=m, radius=2)
    assert out[40:50, 60:75].sum() == 0 and out[10:30, 10:30].all(), "the previous outline claims nothing: the clicked component goes"
    out = honour_clicks(m, foreground=[(42, 62)], background=[(45, 65)], previous=m, radius=2)
    assert out[45, 65] == 0 and out[40:50, 60:75].sum() == 150 - 13, "a foreground click claims its component: a disc of radius 2"
    grown = m.copy()
    grown[5:8, 50:70] = 1  # C: drawn by the network after the click, nowhere in the previous outline
    grown[30:35, 10:30] = 1  # A grown downwards
    out = honour_clicks(grown, background=[(45, 65)], previous=m)
    assert not (out.astype(bool) & ~m.astype(bool)).any(), "background clicks only: nothing outside the previous outline"
    assert out[10:30, 10:30].all() and out[40:50, 60:75].sum() == 0
    out = honour_clicks(grown, foreground=[(20, 20)], background=[(45, 65)], previous=m)
    assert out[32, 20] == 1, "with a foreground click the outline may grow"
    out = honour_clicks(m, foreground=[(20, 20)], background=[(20, 20)])
    assert out[20, 20] == 1, "a pixel clicked both ways keeps its foreground click"
    assert honour_clicks(m, background=[(45, 65)], boxed=True)[40:50, 60:75].sum() > 100, "in a box: a disc, not the component"


def test_the_protocol_passes_the_box_then_the_previous_outline():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    seen = []

    def predict(image, fg, bg, box=None, previous=None):
        seen.append((len(fg) + len(bg), box, None if previous is None else int(previous.sum())))
        out = np.zeros((40, 40), np.float32)
        r0, c0, r1, c1 = box
        out[r0 : r1 + 1, c0 : c1 + 1] = 1  # the box itself, then each click adds nothing
        return out

    res = evaluate_clicks(predict, [None], [truth], max_clicks=2, boxes=[(10, 10, 34, 29)], with_previous=True)
    assert seen[0] == (0, (10, 10, 34, 29), None), "the first prediction is the box's alone"
    assert seen[1][2] == 25 * 20, "the next one gets the box's outline as the previous outline"
    assert res.dice[0, 0] == pytest.approx(2 * 400 / (400 + 500))
