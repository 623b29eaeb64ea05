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
            assert sum(p["picked_redrawn"]) == p["redrawn"] and len(p["picked_lesion"]) == 4
            assert sum(not les for les in p["picked_lesion"]) == p["picked_normal"]
    in_order = next(r for r in res["runs"] if r["strategy"] == "in_order")
    ids = [i for p in in_order["curve"][1:] for i in p["picked_ids"]]
    assert len(ids) == len(set(ids)) == 8
    s = res["summary"]
    assert s["hand_outline_clicks"] == cfg["hand_outline_clicks"]
    for name in ("random", "in_order"):
        assert len(s["strategies"][name]["cumulative_clicks_mean"]) == 3
        assert "clicks_to_label_pool" in s["strategies"][name] and "clicks_to_target" in s["strategies"][name]
    assert "paired_clicks_to_label_pool_vs_random" in s["strategies"]["in_order"]
    # Where the clicks went adds up to the clicks spent labelling the pool.
    where = s["strategies"]["random"]["where_clicks_go"]
    parts = ("initial_by_hand", "accepted_clicks", "redrawn_clicks", "normal_clicks")
    assert sum(where[k] for k in parts) == where["total"] == s["strategies"]["random"]["cumulative_clicks_mean"][-1]
    assert where["accepted_images"] + where["redrawn_images"] + where["normal_images"] == 8
    for png in ("curves.png", "effort.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-costing the run from the models it saved gives its clicks back (round r's picks with
    # round r - 1's model): wipe them first, so that only a real re-costing restores them.
    wiped = json.loads((out / "curves.json").read_text())
    for run in wiped["runs"]:
        for p in run["curve"][1:]:
            p.update(clicks=0, cumulative_clicks=0, picked_costs=[0] * len(p["picked_costs"]))
    (out / "curves.json").write_text(json.dumps(wiped))
    assert main(["al-recost", str(out), "--out", str(tmp_path / "recost")]) == 0
    again = json.loads((tmp_path / "recost" / "curves.json").read_text())
    assert again["recosted_from"] == str(out) and (tmp_path / "recost" / "effort.png").is_file()
    for before, after in zip(res["runs"], again["runs"]):
        for p, q in zip(before["curve"], after["curve"]):
            assert (q["labels"], q["cumulative_clicks"], q.get("picked_costs")) == (p["labels"], p["cumulative_clicks"], p.get("picked_costs"))


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


def _effort_run(strategy, seed, dice, cum, redrawn, dice_1, dice_3, labels=(4, 7, 10)):
    """A clicks-annotator run as al-simulate writes it: point 0 is the hand-outlined initial set."""
    curve = [{"labels": n, "dice": d, "normal_fp": 0.0, "cumulative_clicks": c, "redrawn": r, "click_dice_1": d1, "click_dice_3": d3}
             for n, d, c, r, d1, d3 in zip(labels, dice, cum, redrawn, dice_1, dice_3)]  # fmt: skip
    return {"strategy": strategy, "seed": seed, "curve": curve}


def _effort_result():
    # Two seeds; point 0 is shared per seed (the same initial model and hand outlines).
    runs = [
        _effort_run("random", 0, [0.5, 0.7, 0.8], [40, 70, 110], [3, 2, 1], [0.2, 0.5, 0.6], [0.5, 0.7, 0.8]),
        _effort_run("typiclust", 0, [0.5, 0.9, 0.9], [40, 70, 90], [3, 1, 0], [0.2, 0.6, 0.7], [None] * 3),
        _effort_run("random", 1, [0.4, 0.5, 0.6], [30, 60, 120], [2, 0, 3], [0.4, 0.7, None], [0.7, 0.9, 1.0]),
        _effort_run("typiclust", 1, [0.4, 0.6, 0.6], [30, 60, 106], [2, 1, 1], [0.4, 0.8, 0.9], [None] * 3),
    ]  # fmt: skip
    full = [{"seed": 0, "labels": 10, "dice": 0.8, "normal_fp": 0.0}, {"seed": 1, "labels": 10, "dice": 0.6, "normal_fp": 0.0}]
    return {"config": {"annotator": "clicks", "pool_size": 10, "hand_outline_clicks": 400}, "full": full, "runs": runs}


def test_where_the_clicks_go_has_hand_computed_answers():
    from busi_monai.active.simulation import clicks_breakdown

    rounds = [
        {"picked_costs": [0, 7, 31], "picked_lesion": [True, True, True], "picked_redrawn": [False, False, True]},
        {"picked_costs": [0, 3, 21, 12], "picked_lesion": [False, False, False, True], "picked_redrawn": [False, False, True, False]},
    ]  # fmt: skip
    run = {"curve": [{"cumulative_clicks": 50}, *rounds]}
    assert clicks_breakdown(run) == {
        "initial_by_hand": 50.0, "accepted_images": 3, "accepted_without_clicks": 1, "accepted_clicks": 19.0,
        "redrawn_images": 1, "redrawn_clicks": 31.0, "normal_images": 3, "normal_erased": 2, "normal_clicks": 24.0, "total": 124.0,
    }  # fmt: skip
    # Runs written before the per-image flags: no breakdown rather than a wrong one.
    assert clicks_breakdown({"curve": [{"cumulative_clicks": 50}, {"picked_costs": [1]}]}) is None


def test_summarize_effort_has_hand_computed_answers_on_two_seeds():
    from busi_monai.active.simulation import summarize

    s = summarize(_effort_result())
    assert s["hand_outline_clicks"] == 400
    assert s["target_dice"] == pytest.approx(0.665)  # 0.95 x mean(0.8, 0.6)
    rnd, typ = s["strategies"]["random"], s["strategies"]["typiclust"]
    # Per point, the mean over the two seeds.
    assert rnd["cumulative_clicks_mean"] == [35.0, 65.0, 115.0]
    assert typ["cumulative_clicks_mean"] == [35.0, 65.0, 98.0]
    # Images redrawn in the rounds, not the initial set's hand outlines: 2+1+0+3, 1+0+1+1.
    assert rnd["redrawn"] == 6 and typ["redrawn"] == 3
    # Click Dice: a missing seed is left out of its point's mean; all missing: None.
    assert rnd["click_dice_1_mean"] == pytest.approx([0.3, 0.6, 0.6])
    assert rnd["click_dice_3_mean"] == pytest.approx([0.6, 0.8, 0.9])
    assert typ["click_dice_1_mean"] == pytest.approx([0.3, 0.7, 0.8]) and typ["click_dice_3_mean"] is None
    # Clicks to label the pool: the last point's; random 110, 120; typiclust 90, 106.
    assert rnd["clicks_to_label_pool_per_seed"] == [110.0, 120.0] and rnd["clicks_to_label_pool"] == 115.0
    assert typ["clicks_to_label_pool_per_seed"] == [90.0, 106.0] and typ["clicks_to_label_pool"] == 98.0
    # Paired: -20 and -14: mean -17, SE |-20 - -14| / 2 = 3 (two seeds: SD |a-b|/sqrt2, over sqrt2).
    assert typ["paired_clicks_to_label_pool_vs_random"] == {
        "seeds": 2, "mean_difference": -17.0, "standard_error": pytest.approx(3.0), "fewer": 2, "unpaired": 0,
    }  # fmt: skip
    # Clicks to 95% of each seed's own all-labels Dice (0.76 for seed 0, 0.57 for seed 1):
    #   random s0: 70 + (0.76-0.7)/(0.8-0.7) x 40 = 94;   s1: 60 + (0.57-0.5)/(0.6-0.5) x 60 = 102
    #   typiclust s0: 40 + (0.76-0.5)/(0.9-0.5) x 30 = 59.5; s1: 30 + (0.57-0.4)/(0.6-0.4) x 30 = 55.5
    assert rnd["clicks_to_target_per_seed"] == pytest.approx([94.0, 102.0]) and rnd["clicks_to_target"] == pytest.approx(98.0)
    assert typ["clicks_to_target_per_seed"] == pytest.approx([59.5, 55.5]) and typ["clicks_to_target"] == pytest.approx(57.5)
    # Paired: -34.5 and -46.5: mean -40.5, SE 6.
    paired = typ["paired_clicks_to_target_vs_random"]
    assert paired == {"seeds": 2, "mean_difference": pytest.approx(-40.5), "standard_error": pytest.approx(6.0), "fewer": 2, "unpaired": 0}
    assert "paired_clicks_to_target_vs_random" not in rnd and "paired_clicks_to_label_pool_vs_random" not in rnd
    # On the mean curves, against 0.665 (not the per-seed targets):
    #   random: Dice 0.45, 0.6, 0.7 at 35, 65, 115 clicks: 65 + 0.065/0.1 x 50 = 97.5
    #   typiclust: Dice 0.45, 0.75, 0.75 at 35, 65, 98: 35 + 0.215/0.3 x 30 = 56.5
    assert rnd["clicks_to_target_mean_curve"] == pytest.approx(97.5)
    assert typ["clicks_to_target_mean_curve"] == pytest.approx(56.5)


def test_a_run_that_never_labelled_the_pool_is_left_out_of_the_pairing():
    from busi_monai.active.simulation import summarize

    result = _effort_result()
    result["runs"][3]["curve"][-1]["labels"] = 9  # typiclust, seed 1: one pool image short of 10
    typ = summarize(result)["strategies"]["typiclust"]
    assert typ["clicks_to_label_pool_per_seed"] == [90.0, None] and typ["clicks_to_label_pool"] is None
    # Only seed 0 pairs: 90 - 110; one seed has no standard error.
    assert typ["paired_clicks_to_label_pool_vs_random"] == {"seeds": 1, "mean_difference": -20.0, "standard_error": None, "fewer": 1, "unpaired": 1}
