"""What labelling costs a clinician (active/effort.py) and ``al-simulate --annotator clicks``."""

import itertools
import json

import numpy as np
import pytest

from busi_monai.active.effort import (
    ERASE_BY_HAND,
    hand_outline_cost,
    image_cost,
    polygon_clicks,
)

SIZE = 64


def _disc(r: int, centre=(32, 32), size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2


def _square(lo: int, hi: int, size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_polygon_clicks_counts_the_vertices_of_each_outline():
    square, disc = _square(10, 40), _disc(20)
    assert 4 <= polygon_clicks(square) <= 6
    assert polygon_clicks(disc) > polygon_clicks(square)
    two = _square(5, 20) | (_square(30, 60) & ~_square(0, 29))
    assert polygon_clicks(two) == polygon_clicks(_square(5, 20)) + polygon_clicks(_square(30, 60) & ~_square(0, 29))
    ring = disc & ~_disc(8)
    assert polygon_clicks(ring) > polygon_clicks(disc)  # the hole is outlined too
    assert polygon_clicks(_square(0, 20)) >= 4  # a lesion cut by the image's edge is closed
    assert polygon_clicks(np.zeros((SIZE, SIZE))) == 0
    assert hand_outline_cost([square, np.zeros((SIZE, SIZE)), disc]) == polygon_clicks(square) + polygon_clicks(disc)


def _stub(automatic: np.ndarray, radius: int = 20, listens: bool = True):
    """A click model: the automatic mask, plus a disc around each foreground click, minus a disc
    around each background click (or the automatic mask whatever the clicks, ``listens`` False)."""

    def predict(image, fg, bg):
        m = automatic.copy()
        if listens:
            for r, c in fg:
                m |= _disc(radius, (r, c))
            for r, c in bg:
                m &= ~_disc(radius, (r, c))
        return m.astype(np.float32)

    return predict


def test_a_lesion_the_model_missed_takes_one_click():
    truth = _disc(20)
    cost = image_cost(_stub(np.zeros_like(truth)), None, truth)
    assert cost == {"lesion": True, "clicks": 1, "redrawn": False, "cost": 1, "dice_before": 0.0, "dice_after": 1.0}
    # Already good enough: one look, no click.
    assert image_cost(_stub(truth), None, truth)["cost"] == 0


def test_a_model_that_ignores_clicks_gets_the_lesion_redrawn_after_the_clicks_spent():
    truth = _disc(20)
    cost = image_cost(_stub(np.zeros_like(truth), listens=False), None, truth, max_clicks=5)
    assert cost["redrawn"] and cost["clicks"] == 5
    assert cost["cost"] == 5 + polygon_clicks(truth)  # time spent clicking is spent
    assert cost["dice_after"] == 0.0


def test_normal_images_cost_nothing_when_left_empty_and_clicks_to_erase_a_false_outline():
    empty = np.zeros((SIZE, SIZE), bool)
    assert image_cost(_stub(empty), None, empty) == {
        "lesion": False, "clicks": 0, "redrawn": False, "cost": 0, "dice_before": 1.0, "dice_after": 1.0,
    }
    blob = _disc(6, (20, 40))
    erased = image_cost(_stub(blob, radius=8), None, empty)
    assert erased["clicks"] == 1 and erased["cost"] == 1 and not erased["redrawn"]
    stuck = image_cost(_stub(blob, listens=False), None, empty, max_clicks=3)
    assert stuck["redrawn"] and stuck["cost"] == 3 + ERASE_BY_HAND


def test_image_cost_is_deterministic():
    truth = _disc(14, (30, 26)) | _disc(6, (50, 50))
    predict = _stub(_disc(10, (30, 30)), radius=5)
    assert image_cost(predict, None, truth) == image_cost(predict, None, truth)


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory):
    from busi_monai.cli import main

    root = tmp_path_factory.mktemp("effort-data")
    assert main(["synth", "--out", str(root / "busi"), "--count", "24", "--seed", "3"]) == 0
    assert main(["prepare", "--busi-root", str(root / "busi"), "--out", str(root / "prepared")]) == 0
    return root / "prepared"


TINY = ["--initial", "6", "--step", "4", "--rounds", "2", "--image-size", "32", "--epochs-initial", "1",
        "--epochs-per-round", "1", "--epochs-full", "1", "--mc-passes", "2", "--device", "cpu", "--seeds", "0"]  # fmt: skip


def test_al_simulate_with_the_clicks_annotator_writes_clicks_against_dice(synthetic_prepared, tmp_path):
    from busi_monai.cli import main

    out = tmp_path / "al"
    rc = main(["al-simulate", "--data", str(synthetic_prepared), "--out", str(out), "--strategy", "random,in_order",
               "--annotator", "clicks", "--max-clicks", "4", "--click-test-images", "2", *TINY])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "curves.json").read_text())
    cfg = res["config"]
    assert cfg["annotator"] == "clicks" and cfg["preset"] == "interactive" and "+clicks" in cfg["recipe"]["network"]
    assert cfg["hand_outline_clicks"] > 0
    for run in res["runs"]:
        cum = [p["cumulative_clicks"] for p in run["curve"]]
        assert all(np.isfinite(cum)) and cum[0] > 0 and all(b >= a for a, b in itertools.pairwise(cum)) and cum[-1] > cum[0]
        assert [p["labels"] for p in run["curve"]] == [6, 10, 14]
        for p in run["curve"][1:]:
            assert p["cumulative_clicks"] - p["clicks"] in cum and len(p["picked_costs"]) == 4
            assert 0 <= p["redrawn"] <= 4 and 0.0 <= p["click_dice_1"] <= 1.0 and 0.0 <= p["click_dice_3"] <= 1.0
    in_order = next(r for r in res["runs"] if r["strategy"] == "in_order")
    ids = [i for p in in_order["curve"][1:] for i in p["picked_ids"]]
    assert len(ids) == len(set(ids)) == 8
    s = res["summary"]
    assert s["hand_outline_clicks"] == cfg["hand_outline_clicks"]
    for name in ("random", "in_order"):
        assert len(s["strategies"][name]["cumulative_clicks_mean"]) == 3
        assert "clicks_to_label_pool" in s["strategies"][name] and "clicks_to_target" in s["strategies"][name]
    assert "paired_clicks_to_label_pool_vs_random" in s["strategies"]["in_order"]
    for png in ("curves.png", "effort.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_clicks_annotator_needs_a_click_network(synthetic_prepared, tmp_path):
    from busi_monai.active.simulation import SimulationSettings

    with pytest.raises(ValueError, match="needs a click network"):
        SimulationSettings(preset="fast", annotator="clicks").recipe()
    assert SimulationSettings(annotator="clicks").preset_name == "interactive"
    assert SimulationSettings().preset_name == "fast"


def test_the_oracle_annotator_keeps_its_output(synthetic_prepared, tmp_path):
    from busi_monai.cli import main

    out = tmp_path / "oracle"
    assert main(["al-simulate", "--data", str(synthetic_prepared), "--out", str(out), "--strategy", "random", "--no-full", *TINY]) == 0
    res = json.loads((out / "curves.json").read_text())
    assert "annotator" not in res["config"] and res["config"]["preset"] == "fast"
    assert set(res["runs"][0]["curve"][1]) == {
        "round", "labels", "dice", "normal_fp", "train_s", "select_s", "picked_normal", "picked_near_duplicates", "picked_ids",
    }
    assert "hand_outline_clicks" not in res["summary"] and not (out / "effort.png").exists()


def test_paired_click_differences_and_the_clicks_to_a_target_have_hand_computed_answers():
    from busi_monai.active.simulation import labels_to_reach, paired_difference

    runs = [
        {"strategy": "random", "seed": 0, "clicks": 100.0}, {"strategy": "typiclust", "seed": 0, "clicks": 90.0},
        {"strategy": "random", "seed": 1, "clicks": 120.0}, {"strategy": "typiclust", "seed": 1, "clicks": 126.0},
        {"strategy": "typiclust", "seed": 2, "clicks": 50.0},  # no random run to pair with: left out
    ]  # fmt: skip
    d = paired_difference(runs, "typiclust", measure=lambda r: r["clicks"])
    # Differences -10 and +6: mean -2, sample SD sqrt(128) = 11.31, SE 11.31 / sqrt(2) = 8.0.
    assert d == {"seeds": 2, "mean_difference": -2.0, "standard_error": pytest.approx(8.0), "fewer": 1, "unpaired": 0}
    # Cumulative clicks 0, 100, 300 at Dice 0.2, 0.6, 0.8: Dice 0.7 is reached halfway between.
    assert labels_to_reach([0, 100, 300], [0.2, 0.6, 0.8], 0.7) == pytest.approx(200.0)
    assert labels_to_reach([0, 100, 300], [0.2, 0.6, 0.8], 0.9) is None
