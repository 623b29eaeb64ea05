"""A click model that learns, in CI: the `interactive` recipe (click maps, the previous outline,
zoom-in crops) trained for a few epochs on synthetic images with two look-alike discs, one of
which is the lesion. Without guidance the network cannot know which disc is meant; one click
or a box tells it, and the Dice must rise by a clear margin. Trained in fp32 on a fixed seed,
so the verdict does not depend on the CPU's instruction set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busi_monai.data.packs import CachedData
from busi_monai.inference.predictor import Predictor
from busi_monai.interactive.protocol import dice, evaluate_clicks
from busi_monai.interactive.zoom import box_mask
from busi_monai.training.loop import fit
from busi_monai.training.recipes import get_recipe

SIZE = 48


def _two_discs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (SIZE, SIZE) images in [0, 1] with two bright discs on speckle, and masks of one
    of them, chosen at random."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = [], []
    for _ in range(n):
        img = rng.random((SIZE, SIZE)) * 0.3
        discs = []
        while len(discs) < 2:
            r = rng.uniform(5, 9)
            c = rng.uniform(r + 1, SIZE - r - 1, 2)
            if all(np.hypot(*(c - d[0])) > r + d[1] + 3 for d in discs):
                discs.append((c, r))
        for c, r in discs:
            img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r**2] += 0.6
        c, r = discs[int(rng.integers(2))]
        masks.append(((yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r**2).astype(np.uint8))
        images.append(np.clip(img, 0, 1).astype(np.float32))
    return np.stack(images), np.stack(masks)


@pytest.fixture(scope="module")
def click_model(tmp_path_factory):
    torch.manual_seed(0)
    images, masks = _two_discs(96, seed=1)
    items = [{"id": str(i), "class": "benign"} for i in range(len(images))]
    data = CachedData(torch.from_numpy(images)[:, None], torch.from_numpy(masks)[:, None].float(), items)
    recipe = get_recipe("interactive").with_overrides(image_size=SIZE, epochs=16, batch_size=8, augment="none", learning_rate=3e-3)
    out = tmp_path_factory.mktemp("click-model")
    fit(data, data.subset([]), out, "interactive", recipe, device="cpu", progress=False, amp=False, seed=0)
    return Predictor(out / "model.pt", device="cpu", amp=False)


def test_one_click_and_a_box_each_gain_dice_over_the_automatic_outline(click_model):
    images, masks = _two_discs(16, seed=7)

    def network_only(image, fg, bg, box=None, previous=None):  # before the clicks are honoured
        return click_model.predict_clicks(image, fg, bg, box=box, previous=previous).raw_mask.astype(np.float32)

    res = evaluate_clicks(network_only, list(images), list(masks), max_clicks=3, with_previous=True)
    automatic, one, three = res.dice.mean(0)[[0, 1, 3]]
    assert one >= automatic + 0.05, f"one click: {automatic:.3f} -> {one:.3f}"
    assert three >= automatic + 0.10, f"three clicks: {automatic:.3f} -> {three:.3f}"
    boxes, filled = [], []
    for m in masks:
        rows, cols = np.nonzero(m)
        boxes.append((rows.min() - 2, cols.min() - 2, rows.max() + 2, cols.max() + 2))
        filled.append(dice(box_mask(boxes[-1], m.shape), m))
    boxed = np.mean([dice(click_model.predict_clicks(im, box=b).mask, m) for im, m, b in zip(images, masks, boxes)])
    assert boxed >= automatic + 0.15, f"a box: {automatic:.3f} -> {boxed:.3f}"
    assert boxed >= np.mean(filled) + 0.08, f"the outline follows the disc inside the box ({boxed:.3f}), not the box ({np.mean(filled):.3f})"
