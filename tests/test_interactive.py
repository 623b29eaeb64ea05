"""Click-guided interactive segmentation (busi_monai.interactive): click maps, click
simulators and the evaluation protocol. All fast and deterministic; coordinates are (row, col)."""

from __future__ import annotations

import json

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


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are small: a second thread only adds waits when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# --- the protocol's click -------------------------------------------------------------------

from busi_monai.interactive.simulation import (  # noqa: E402
    ProtocolClick,
    chessboard_depth,
    label_regions,
    protocol_click,
    sample_corrective_clicks,
    sample_initial_clicks,
    simulate_training_clicks,
)


def _square(shape, r0, c0, side):
    m = np.zeros(shape, bool)
    m[r0 : r0 + side, c0 : c0 + side] = True
    return m


def test_protocol_click_on_a_missed_square_is_positive_at_its_centre():
    truth = _square((40, 40), 5, 5, 11) | _square((40, 40), 25, 25, 9)
    pred = _square((40, 40), 25, 25, 9)  # the small lesion found, the large one missed
    assert protocol_click(pred, truth) == ProtocolClick(10, 10, True)


def test_protocol_click_on_a_false_region_is_negative_at_its_centre():
    truth = _square((40, 40), 2, 2, 5)
    pred = truth | _square((40, 40), 20, 21, 7)
    assert protocol_click(pred.astype(np.float32) * 0.9, truth) == ProtocolClick(23, 24, False)


def test_protocol_click_takes_the_larger_error_region_and_a_missed_one_on_a_tie():
    truth = _square((40, 40), 0, 0, 20)
    pred = truth.copy()
    pred[5:10, 5:10] = False  # missed: 25 pixels
    pred |= _square((40, 40), 30, 30, 6)  # false: 36 pixels
    assert protocol_click(pred, truth).positive is False
    pred[30:36, 30:36] = False
    pred |= _square((40, 40), 30, 30, 5)  # false: 25 pixels, as many as missed
    assert protocol_click(pred, truth) == ProtocolClick(7, 7, True)


def test_no_protocol_click_on_a_perfect_prediction():
    truth = _square((20, 20), 4, 4, 6)
    assert protocol_click(truth.astype(np.uint8), truth) is None
    assert protocol_click(np.zeros((20, 20)), np.zeros((20, 20))) is None


def test_protocol_click_keeps_off_the_image_edge_and_handles_a_one_pixel_region():
    truth = np.zeros((20, 30), bool)
    truth[:, 20:] = True  # a lesion the frame cuts off on three sides, all missed
    click = protocol_click(np.zeros_like(truth), truth)
    assert click.positive and 20 < click.col < 29 and 0 < click.row < 19
    pred = truth.copy()
    pred[3, 3] = True
    assert protocol_click(pred, truth) == ProtocolClick(3, 3, False)


def test_a_normal_image_gets_only_negative_protocol_clicks():
    truth = np.zeros((20, 20), bool)
    assert protocol_click(_square((20, 20), 10, 10, 3), truth) == ProtocolClick(11, 11, False)


# --- the batched training clicks --------------------------------------------------------------


def test_chessboard_depth_matches_scipy_with_the_image_edge_as_border():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    masks = rng.random((3, 24, 31)) < 0.8
    ours = chessboard_depth(torch.from_numpy(masks), max_depth=100).numpy()
    for m, d in zip(masks, ours):
        ref = ndimage.distance_transform_cdt(np.pad(m, 1), metric="chessboard")[1:-1, 1:-1]
        np.testing.assert_array_equal(d, ref)
    assert chessboard_depth(torch.ones(1, 20, 20, dtype=torch.bool), max_depth=4).max() == 4


def test_label_regions_matches_scipy_eight_connected_components():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    masks = rng.random((4, 20, 25)) < 0.45
    ours = label_regions(torch.from_numpy(masks)).numpy()
    for m, lab in zip(masks, ours):
        ref, _ = ndimage.label(m, structure=np.ones((3, 3)))
        assert ((lab > 0) == m).all()
        # The same partition: each of ours is exactly one of scipy's.
        pairs = {(a, b) for a, b in zip(lab[m], ref[m])}
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def _truths():
    t = torch.zeros(4, 32, 40, dtype=torch.bool)
    t[0, 4:20, 6:30] = True
    t[1, 10:13, 10:13] = True  # tiny
    t[3, 20:, 25:] = True  # touching the image's corner; t[2] is a normal image
    return t


def test_initial_clicks_are_inside_the_truth_when_positive_and_outside_when_negative():
    truth = _truths()
    coords, labels = sample_initial_clicks(truth, num_positive=3, num_negative=2, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (4, 5, 2) and labels.shape == (4, 5)
    for b in range(4):
        for (r, c), lab in zip(coords[b].long().tolist(), labels[b].tolist()):
            if lab == POSITIVE:
                assert truth[b, r, c]
            elif lab == NEGATIVE:
                assert not truth[b, r, c]
    assert (labels[2, :3] == NO_CLICK).all() and (labels[2, 3:] == NEGATIVE).all()  # normal image
    assert (labels[[0, 1, 3], :3] == POSITIVE).all()


def test_initial_clicks_favour_the_lesion_interior():
    truth = torch.zeros(1, 64, 64, dtype=torch.bool)
    truth[0, 8:56, 8:56] = True
    coords, _ = sample_initial_clicks(truth.expand(200, -1, -1), generator=torch.Generator().manual_seed(0))
    r, c = coords[:, 0, 0], coords[:, 0, 1]
    ring = ((r < 12) | (r >= 52) | (c < 12) | (c >= 52)).float().mean()
    # The 4-pixel rim is 31% of the lesion's area; drawn by depth it gets far fewer clicks.
    assert ring < 0.15


def test_training_clicks_are_reproducible_with_the_same_seed():
    truth = _truths()
    a = sample_initial_clicks(truth, 2, 2, generator=torch.Generator().manual_seed(7))
    b = sample_initial_clicks(truth, 2, 2, generator=torch.Generator().manual_seed(7))
    c = sample_initial_clicks(truth, 2, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_corrective_clicks_land_in_the_largest_error_region_with_its_sign():
    truth = _truths()
    pred = truth.clone()
    pred[0, 4:20, 6:12] = False  # image 0: a missed strip
    pred[1, 0:8, 30:40] = True  # image 1: a false region larger than the tiny lesion it missed
    pred[1, 10:13, 10:13] = False
    pred[3, 0:2, 0:2] = True  # image 3: a small false corner; image 2 is perfect
    coords, labels = sample_corrective_clicks(pred.float(), truth, generator=torch.Generator().manual_seed(0))
    assert labels[:, 0].tolist() == [POSITIVE, NEGATIVE, NO_CLICK, NEGATIVE]
    (r0, c0), (r1, c1), _, (r3, c3) = coords[:, 0].long().tolist()
    assert 4 <= r0 < 20 and 6 <= c0 < 12
    assert 0 <= r1 < 8 and 30 <= c1 < 40
    assert r3 < 2 and c3 < 2


def test_simulated_training_clicks_mix_automatic_and_corrected_images():
    truth = _truths().repeat(4, 1, 1)  # 16 images
    images = torch.rand(16, 1, 32, 40, generator=torch.Generator().manual_seed(0))
    calls = []

    def predict(x):  # a model that always predicts the left half
        calls.append(x.shape)
        out = torch.zeros(x.shape[0], 1, 32, 40)
        out[..., :20] = 1.0
        return out

    def run(seed):
        return simulate_training_clicks(predict, images, truth, generator=torch.Generator().manual_seed(seed), p_no_clicks=0.3, max_rounds=3)

    first, again = run(3), run(3)
    assert torch.equal(first.maps, again.maps) and torch.equal(first.labels, again.labels)
    assert first.maps.shape == (16, 2, 32, 40)
    assert calls[0] == (16, 3, 32, 40)
    without = (first.labels == NO_CLICK).all(dim=1)
    assert 0 < int(without.sum()) < 16
    assert not first.maps[without].any() and first.maps[~without].any()
    assert first.rounds >= 1 and len(calls) == 2 * first.rounds  # two runs
    assert first.labels.shape[1] == 1 + first.rounds
    for b in range(16):
        for (r, c), lab in zip(first.coords[b].long().tolist(), first.labels[b].tolist()):
            assert lab == NO_CLICK or bool(truth[b, r, c]) == (lab == POSITIVE)


# --- the evaluation protocol ------------------------------------------------------------------

from busi_monai.interactive.protocol import (  # noqa: E402
    dice,
    evaluate_clicks,
    plot_dice_vs_clicks,
    summarize,
)


def _lesions():
    """(image, truth) pairs: one-region lesions of several shapes, one touching the edge."""
    shape = (48, 64)
    truths = [_square(shape, 10, 12, 15), _square(shape, 0, 40, 20)]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truths.append((yy - 24) ** 2 / 14**2 + (xx - 30) ** 2 / 22**2 <= 1)
    images = [np.full(shape, i, np.float32) for i in range(len(truths))]
    return images, truths


def _oracle(truths):
    """Fills the region of the truth under each positive click, and nothing else."""
    from scipy import ndimage

    def predict(image, fg, bg):
        labels, _ = ndimage.label(truths[int(image[0, 0])])
        return np.isin(labels, [labels[r, c] for r, c in fg if labels[r, c] > 0]).astype(np.float32)

    return predict


def test_dice_counts_two_empty_masks_as_a_match():
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert dice(np.ones((4, 4)), np.zeros((4, 4))) == 0.0
    assert dice(_square((8, 8), 0, 0, 2), _square((8, 8), 0, 0, 4)) == pytest.approx(2 * 4 / 20)


def test_a_perfect_oracle_reaches_dice_one_after_one_click():
    images, truths = _lesions()
    result = evaluate_clicks(_oracle(truths), images, truths, max_clicks=5)
    s = result.summary
    assert s["dice_after"] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert s["noc_85"] == s["noc_90"] == 1.0 and s["failed_90"] == 0
    assert s["images"] == 3 and s["max_clicks"] == 5
    assert [len(c) for c in result.clicks] == [1, 1, 1]  # no clicks once perfect
    assert all(c[0].positive and truths[i][c[0].row, c[0].col] for i, c in enumerate(result.clicks))
    assert (result.clicks[0][0].row, result.clicks[0][0].col) == (17, 19)  # the square's centre


def test_a_predictor_that_ignores_clicks_stays_flat_and_never_reaches_the_thresholds():
    images, truths = _lesions()
    calls = []

    def predict(image, fg, bg):
        calls.append(len(fg) + len(bg))
        half = truths[int(image[0, 0])].copy()
        half[: half.shape[0] // 2 + 12] = False  # the lower part of each lesion only
        return half * 0.8

    result = evaluate_clicks(predict, images, truths, max_clicks=4)
    s = result.summary
    assert len(set(s["dice_after"])) == 1 and 0 < s["dice_after"][0] < 0.85
    assert s["noc_85"] == s["noc_90"] == 4.0 and s["failed_90"] == 3
    assert calls == [0, 1, 2, 3, 4] * 3  # every click is passed on, positive ones here
    assert all(np.isfinite(v) for v in s["dice_after"] + [s["noc_85"], s["noc_90"]])


def test_an_automatic_prediction_that_is_already_good_needs_no_clicks():
    images, truths = _lesions()
    result = evaluate_clicks(lambda image, fg, bg: truths[int(image[0, 0])].astype(float), images, truths, max_clicks=3)
    assert result.summary["noc_90"] == 0.0 and result.clicks == [[], [], []]


def test_the_protocol_gives_identical_results_on_two_runs():
    images, truths = _lesions()

    def predict(image, fg, bg):  # depends on every click, positive and negative
        out = np.zeros(truths[0].shape, np.float32)
        out[20:40, 10:50] = 1.0
        for r, c in fg:
            out[max(r - 6, 0) : r + 7, max(c - 6, 0) : c + 7] = 1.0
        for r, c in bg:
            out[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4] = 0.0
        return out

    a = evaluate_clicks(predict, images, truths, max_clicks=6)
    b = evaluate_clicks(predict, images, truths, max_clicks=6)
    np.testing.assert_array_equal(a.dice, b.dice)
    assert a.clicks == b.clicks and a.summary == b.summary
    assert any(not c.positive for cs in a.clicks for c in cs)


def test_clicks_correct_a_given_starting_outline():
    # Another model's automatic outline starts the protocol: Dice after 0 clicks is its own,
    # and the first click's request carries it as the previous outline.
    images, truths = _lesions()
    starts = [t.copy() for t in truths]
    for s in starts:
        rows = np.nonzero(s.any(axis=1))[0]
        s[rows[len(rows) // 2] :] = False  # the upper half of each lesion
    seen = []

    def predict(image, fg, bg, previous=None):
        seen.append(None if previous is None else previous.copy())
        return truths[int(image[0, 0])].astype(float)

    result = evaluate_clicks(predict, images, truths, max_clicks=3, with_previous=True, starts=starts)
    expected = [dice(s, t) for s, t in zip(starts, truths)]
    assert all(0.5 < e < 0.8 for e in expected)  # about 2/3: half the lesion
    np.testing.assert_allclose(result.dice[:, 0], expected)
    np.testing.assert_array_equal(result.dice[:, 1:], 1.0)
    assert len(seen) == 3 and all(np.array_equal(p, s) for p, s in zip(seen, starts)), "each first click corrects the given outline"
    with pytest.raises(ValueError, match="starts"):
        evaluate_clicks(predict, images, truths, max_clicks=1, starts=starts[:1])


def test_the_protocol_refuses_normal_images_and_wrongly_shaped_predictions():
    images, truths = _lesions()
    with pytest.raises(ValueError, match="lesion images only"):
        evaluate_clicks(_oracle(truths), images[:1], [np.zeros((48, 64))], max_clicks=2)
    with pytest.raises(ValueError, match="shape"):
        evaluate_clicks(lambda image, fg, bg: np.zeros((4, 4)), images, truths, max_clicks=2)


def test_summary_counts_never_reached_as_n_clicks():
    s = summarize(np.array([[0.5, 0.86, 0.95], [0.2, 0.3, 0.4]]))
    assert s["noc_85"] == pytest.approx((1 + 2) / 2) and s["noc_90"] == pytest.approx((2 + 2) / 2)
    assert s["failed_90"] == 1 and s["dice_after"] == pytest.approx([0.35, 0.58, 0.675])


def test_the_plot_is_a_png_with_one_curve_per_model(tmp_path):
    images, truths = _lesions()
    oracle = evaluate_clicks(_oracle(truths), images, truths, max_clicks=3).summary
    flat = summarize(np.full((3, 4), 0.5))
    for summaries, name in [(oracle, "one.png"), ({"oracle": oracle, "flat": flat}, "two.png"), ([oracle, flat], "list.png")]:
        path = plot_dice_vs_clicks(summaries, tmp_path / name)
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_the_seeds_summary_has_hand_computed_means_and_spreads(tmp_path):
    from gpu_scripts import load_script

    mod = load_script("clicks_seeds")

    def metrics(auto, d, noc90, failed):
        return {"lesion": {"dice": auto}, "lesion_missed": 1, "normal_false_positive_rate": 0.5,
                "clicks": {"dice_after": d, "noc_85": noc90 - 1, "noc_90": noc90, "failed_90": failed, "images": 2}}  # fmt: skip

    files = []
    for i, m in enumerate([metrics(0.4, [0.4, 0.6, 0.9], 2.0, 1), metrics(0.6, [0.6, 0.8, 1.0], 1.0, 0)]):
        files.append(tmp_path / f"s{i}.json")
        files[-1].write_text(json.dumps(m))
    box = []
    for i, b in enumerate([0.7, 0.9]):
        box.append(tmp_path / f"b{i}.json")
        box[-1].write_text(json.dumps({"box": {"dice": b, "jitter_px": 10.0}, "clicks": {"dice_after": [b, b + 0.05, b + 0.1]}}))
    out = tmp_path / "out"
    assert mod.main(["--run", f"own={files[0]},{files[1]}", "--box", f"{box[0]},{box[1]}", "--out", str(out)]) == 0
    res = json.loads((out / "seeds.json").read_text())
    own = res["runs"]["own"]
    # mean of (0.4, 0.6) is 0.5; the sample standard deviation sqrt(((-0.1)^2 + 0.1^2) / 1) = 0.1414
    assert own["automatic_lesion_dice"]["mean"] == pytest.approx(0.5) and own["automatic_lesion_dice"]["sd"] == pytest.approx(0.02**0.5)
    assert own["noc_90"] == pytest.approx({"mean": 1.5, "sd": 0.5**0.5, "min": 1.0, "max": 2.0, "n": 2})
    assert own["mean_dice_after"] == pytest.approx([0.5, 0.7, 0.95]) and own["failed_90"]["mean"] == pytest.approx(0.5)
    assert res["box"]["box_alone"]["mean"] == pytest.approx(0.8) and res["box"]["box_then_2"]["mean"] == pytest.approx(0.9)
    assert (out / "dice_vs_clicks.png").read_bytes()[:4] == b"\x89PNG"
