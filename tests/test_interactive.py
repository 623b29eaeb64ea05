"""Click-guided interactive segmentation (busi_monai.interactive): click maps, click
simulators and the evaluation protocol. All fast and deterministic; coordinates are (row, col)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busi_monai.interactive.guidance import (
    NEGATIVE,
    NO_CLICK,
    POSITIVE,
    click_maps,
    click_maps_batch,
    rowcol_from_xy,
    scale_clicks,
)

# --- click maps ---------------------------------------------------------------------------


def test_click_maps_are_all_zero_without_clicks():
    maps = click_maps((32, 48), [], [])
    assert maps.shape == (2, 32, 48) and maps.dtype == np.float32
    assert not maps.any()


def test_click_maps_peak_at_one_on_each_click_in_its_own_channel():
    maps = click_maps((32, 48), fg_clicks=[(5, 40), (20, 10)], bg_clicks=[(30, 2)], sigma=2.0)
    assert maps.min() >= 0 and maps.max() <= 1
    for r, c in [(5, 40), (20, 10)]:
        assert maps[0, r, c] == pytest.approx(1.0)
        assert maps[0, r - 3 : r + 4, c - 3 : c + 4].max() == maps[0, r, c]
    assert maps[1, 30, 2] == pytest.approx(1.0)
    assert np.unravel_index(maps[1].argmax(), maps[1].shape) == (30, 2)
    # Channels do not leak: far from every foreground click, the foreground channel is ~0.
    assert maps[0, 30, 2] < 1e-6 and maps[1, 5, 40] < 1e-6


def test_a_click_keeps_its_height_beside_a_close_click():
    # Max-combined, not summed and renormalised as MONAI's AddGuidanceSignald does.
    alone = click_maps((32, 32), [(25, 25)], [], sigma=3.0)
    crowded = click_maps((32, 32), [(25, 25), (5, 5), (5, 6)], [], sigma=3.0)
    assert crowded[0, 25, 25] == pytest.approx(1.0)
    np.testing.assert_allclose(crowded[0, 18:, 18:], alone[0, 18:, 18:], atol=1e-6)


def test_a_single_click_map_is_deepgrows_gaussian_signal():
    from monai.apps.deepgrow.transforms import AddGuidanceSignald

    image = np.zeros((1, 40, 56), np.float32)
    out = AddGuidanceSignald(sigma=3)({"image": image, "guidance": [[[12, 30]], [[35, 3]]]})["image"]
    ours = click_maps((40, 56), [(12, 30)], [(35, 3)], sigma=3.0)
    np.testing.assert_allclose(ours, out[1:], atol=1e-2)  # MONAI's kernel is erf-sampled and truncated


def test_batched_maps_match_single_image_maps_and_skip_padding_slots():
    coords = torch.tensor([[[3.0, 4.0], [10.0, 11.0], [0.0, 0.0]], [[7.0, 7.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[POSITIVE, NEGATIVE, NO_CLICK], [NEGATIVE, NO_CLICK, NO_CLICK]])
    maps = click_maps_batch(coords, labels, (16, 20))
    assert maps.shape == (2, 2, 16, 20)
    np.testing.assert_array_equal(maps[0].numpy(), click_maps((16, 20), [(3, 4)], [(10, 11)]))
    np.testing.assert_array_equal(maps[1].numpy(), click_maps((16, 20), [], [(7, 7)]))
    assert click_maps_batch(torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.long), (8, 8)).shape == (3, 2, 8, 8)


def test_click_maps_round_to_the_nearest_pixel_and_clip_into_the_image():
    maps = click_maps((10, 10), [(2.6, 3.4)], [(-4, 12.0)])
    assert np.unravel_index(maps[0].argmax(), (10, 10)) == (3, 3)
    assert np.unravel_index(maps[1].argmax(), (10, 10)) == (0, 9)


def test_scaling_clicks_scales_each_axis_by_its_own_factor():
    # A 400 x 600 (H x W) image resized to 256 x 256: rows shrink by 0.64, columns by ~0.427.
    (r, c), = scale_clicks([(200, 300)], (400, 600), (256, 256))
    assert r == pytest.approx((200.5) * 256 / 400 - 0.5) and c == pytest.approx((300.5) * 256 / 600 - 0.5)
    # Corners stay in the image, the centre stays the centre, and the round trip comes back.
    assert scale_clicks([(0, 0), (399, 599)], (400, 600), (256, 256)) == [(0.0, 0.0), (255.0, 255.0)]
    assert scale_clicks([(199.5, 299.5)], (400, 600), (256, 256)) == [(127.5, 127.5)]
    back = scale_clicks(scale_clicks([(123, 456)], (400, 600), (256, 256)), (256, 256), (400, 600))
    assert back[0] == pytest.approx((123, 456))


def test_xy_points_become_row_col():
    assert rowcol_from_xy([(10, 3), [7.5, 2]]) == [(3.0, 10.0), (2.0, 7.5)]
