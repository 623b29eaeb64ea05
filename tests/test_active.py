"""Active learning: the strategies pick what they should, and al-simulate writes its curves."""

import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from busi_monai.active.simulation import labels_to_reach
from busi_monai.active.strategies import (
    ORACLE,
    ORACLE_LESIONS,
    SIMULATION_DEFAULT_STRATEGY,
    STRATEGIES,
    diverse_top_k,
    k_center_greedy,
    kmeans,
    select,
    true_scores,
    typical_clusters,
    uncertainty_scores,
)


def _probs(per_image_passes: list[list[float]], size: int = 4) -> torch.Tensor:
    """(passes, N, 1, S, S) maps, each pass of each image a constant probability."""
    t = torch.tensor(per_image_passes, dtype=torch.float32).T  # (passes, N)
    return t[:, :, None, None, None].expand(-1, -1, 1, size, size).clone()


def test_bald_ranks_disagreement_above_learned_and_ambiguous_images():
    probs = _probs([
        [0.97, 0.96, 0.98, 0.97],  # learned: passes agree, confident
        [0.05, 0.95, 0.1, 0.9],  # unsure: passes disagree
        [0.5, 0.5, 0.5, 0.5],  # ambiguous in itself: every pass says 0.5
    ])
    s = uncertainty_scores(probs)
    assert s["bald"][1] > s["bald"][0] and s["bald"][1] > s["bald"][2]
    assert s["bald"][2] == pytest.approx(0.0, abs=1e-5)  # no disagreement, nothing a label resolves
    assert s["entropy"][2] == pytest.approx(1.0, abs=1e-4)  # the total entropy ranks the ambiguous one first
    assert s["entropy"][0] < s["entropy"][1]
    assert s["lesion_fraction"].tolist() == [1.0, 0.0, 0.0]


def test_diversity_never_picks_two_copies_of_one_image():
    # Rows 0 and 1 are the same image and the two most uncertain; 2 and 3 are distinct.
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, -0.7]]), dim=1)
    scores = torch.tensor([0.9, 0.9, 0.5, 0.4])
    picks = diverse_top_k(scores, features, k=2)
    assert len(picks) == 2 and not {0, 1} <= set(picks)
    # A near-copy of something already labelled is passed over as well.
    picks = k_center_greedy(features, 2, centres=features[2:3])
    assert 2 not in picks and len(set(picks) & {0, 1}) == 1


def _untrained_predictor(size: int = 32):
    """A fast-preset Predictor with seeded random weights."""
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import make_checkpoint
    from busi_monai.model.networks import build_network
    from busi_monai.training.recipes import get_recipe

    torch.manual_seed(0)
    recipe = get_recipe("fast").with_overrides(image_size=size)
    return Predictor(make_checkpoint(build_network("fast"), recipe, "fast"), device="cpu", tta=False)


def test_select_with_a_network_on_duplicated_images():
    predictor = _untrained_predictor()
    distinct = torch.rand(4, 1, 32, 32)
    pool = torch.cat([distinct[:1], distinct[:1], distinct[1:]])  # rows 0 and 1 identical
    for strategy in STRATEGIES:
        sel = select(strategy, predictor, pool, 2, random.Random(0), labelled_images=distinct[3:], mc_passes=3)
        assert len(set(sel.indices)) == 2 and all(0 <= i < len(pool) for i in sel.indices)
        if strategy in ("bald_diverse", "typiclust"):
            assert not {0, 1} <= set(sel.indices)
    assert SIMULATION_DEFAULT_STRATEGY in STRATEGIES


def test_oracle_asks_for_what_the_model_gets_wrong_by_the_true_masks():
    predictor = _untrained_predictor()
    pool = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        pred = (predictor.forward_probability(pool) > predictor.threshold).float()
    truth = pred.clone()  # rows 0, 1, 4: exactly what the model draws
    truth[2] = 1 - pred[2]  # the model misses the lesion entirely: Dice 0
    quarter = torch.zeros_like(pred[3])
    quarter[..., :16, :16] = 1
    truth[3] = (pred[3] + quarter) % 2  # the model's outline, a quarter of the image flipped: 0 <= Dice < 1
    scores = true_scores(predictor, pool, truth)
    assert scores[[0, 1, 4]].tolist() == [1.0, 1.0, 1.0] and scores[2] == 0 and scores[3] < 1
    sel = select(ORACLE, predictor, pool, 2, random.Random(0), pool_labels=truth)
    assert sorted(sel.indices) == [2, 3]
    lesion_only = select(ORACLE_LESIONS, predictor, pool, 2, random.Random(0), pool_labels=truth).indices
    assert 3 in lesion_only and all(truth[i].sum() > 0 for i in lesion_only)
    with pytest.raises(ValueError, match="pool_labels"):
        select(ORACLE, predictor, pool, 2, random.Random(0))
    assert ORACLE not in STRATEGIES and ORACLE_LESIONS not in STRATEGIES  # the app never offers them


def test_typiclust_covers_unlabelled_kinds_with_their_most_typical_image():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    big, medium, small = (c + 0.3 * torch.randn(n, 2) for c, n in zip(centres, (60, 30, 8)))
    pool = torch.cat([big, medium, small])
    assert torch.bincount(kmeans(pool, 3)).sort().values.tolist() == [8, 30, 60]
    blob = lambda row: 0 if row < 60 else 1 if row < 90 else 2  # noqa: E731
    # Nothing labelled: one pick per blob, a typical one.
    picks = typical_clusters(pool, None, 3)
    assert sorted(map(blob, picks)) == [0, 1, 2]
    for p in picks:  # nearer its blob's middle than most of the blob
        members = pool[[i for i in range(len(pool)) if blob(i) == blob(p)]]
        to_middle = (members - members.mean(0)).norm(dim=1)
        assert float((pool[p] - members.mean(0)).norm()) <= float(to_middle.median())
    # Three equal blobs, the first labelled twice already: whichever blob k-means splits into
    # the fourth cluster, the two picks go to the blobs nobody has labelled.
    pool = torch.cat([c + 0.3 * torch.randn(30, 2) for c in centres])
    labelled = centres[0] + 0.1 * torch.randn(2, 2)
    assert sorted(p // 30 for p in typical_clusters(pool, labelled, 2)) == [1, 2]


def test_labels_to_reach_interpolates_between_rounds():
    assert labels_to_reach([40, 80, 120], [0.4, 0.5, 0.7], 0.6) == pytest.approx(100.0)
    assert labels_to_reach([40, 80], [0.7, 0.8], 0.6) == 40.0
    assert labels_to_reach([40, 80], [0.4, 0.5], 0.6) is None


def test_al_simulate_writes_curves_json_and_plot(prepared_sample, tmp_path):
    from busi_monai.cli import main

    out = tmp_path / "al"
    rc = main([
        "al-simulate", "--data", str(prepared_sample), "--out", str(out), "--strategy", "random,bald_diverse",
        "--initial", "6", "--step", "4", "--rounds", "2", "--seeds", "0,1", "--image-size", "32",
        "--epochs-initial", "2", "--epochs-per-round", "1", "--epochs-full", "1", "--mc-passes", "3", "--device", "cpu",
        "--round-learning-rate", "5e-4",
    ])
    assert rc == 0
    res = json.loads((out / "curves.json").read_text())
    # The retrainings, and only they, ran at the round rate.
    def rate(run: str) -> float:
        return json.loads((out / "seed0" / run / "summary.json").read_text())["recipe"]["learning_rate"]

    assert res["config"]["round_learning_rate"] == rate("random/round1") == 5e-4
    assert rate("round0") == rate("full") == res["config"]["recipe"]["learning_rate"] != 5e-4
    assert len(res["full"]) == 2 and len(res["runs"]) == 4
    score = _checkpoint_scores(prepared_sample, 32)
    for f in res["full"]:
        assert (f["dice"], f["normal_fp"]) == pytest.approx(score(out / f"seed{f['seed']}" / "full"), abs=1e-6)
    for run in res["runs"]:
        assert [p["labels"] for p in run["curve"]] == [6, 10, 14]
        # Each point is the test score of the model its round left (round 0: the shared start).
        seed_dir = out / f"seed{run['seed']}"
        dirs = [seed_dir / "round0", seed_dir / run["strategy"] / "round1", seed_dir / run["strategy"] / "round2"]
        for p, d in zip(run["curve"], dirs):
            assert (p["dice"], p["normal_fp"]) == pytest.approx(score(d), abs=1e-6), d
        picked = [i for p in run["curve"][1:] for i in p["picked_ids"]]
        assert len(picked) == len(set(picked)) == 8  # never asks for an image twice
    # Both strategies start from the same initial model of a seed (paired curves).
    by_seed = {}
    for run in res["runs"]:
        by_seed.setdefault(run["seed"], set()).add(run["curve"][0]["dice"])
    assert all(len(v) == 1 for v in by_seed.values())
    summary = res["summary"]
    assert set(summary["strategies"]) == {"random", "bald_diverse"}
    assert summary["strategies"]["random"]["labels"] == [6, 10, 14]
    assert summary["target_dice"] == pytest.approx(0.95 * summary["full_dice"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _checkpoint_scores(prepared: Path, size: int):
    """``score(run_dir)`` -> (mean lesion Dice, share of normal images outlined) of the run's
    last.pt on the test split at ``size`` px, counted here by hand.

    The few epochs al-simulate gets here leave a model that outlines the whole image
    (probability 0.55-0.6 everywhere, bf16 or fp32), so the Dice is the lesions' share of the
    image, > 0, and an all-zero curve does not match."""
    from busi_monai.data.datasets import load_datalist
    from busi_monai.data.packs import cache_items
    from busi_monai.inference.predictor import Predictor

    test = cache_items(load_datalist(prepared)["test"], size, progress=False)
    truth = test.labels.numpy()[:, 0] > 0.5
    lesion = truth.any((1, 2))
    assert lesion.any() and not lesion.all()

    def score(run_dir: Path) -> tuple[float, float]:
        p = Predictor(run_dir / "last.pt", device="cpu", tta=False, amp=False)
        with torch.no_grad():
            pred = p.forward_probability(test.images).numpy()[:, 0] > p.threshold
        both, sizes = (pred & truth).sum((1, 2)), pred.sum((1, 2)) + truth.sum((1, 2))
        dice = float(np.mean(2 * both[lesion] / sizes[lesion]))
        assert dice > 0, f"{run_dir}: the model outlines none of the lesions; this check needs one that does"
        return dice, float(pred[~lesion].any((1, 2)).mean())

    return score


class _FakeDatastore:
    """The few datastore calls the app's strategies make, over a dict of image infos."""

    def __init__(self, infos: dict[str, dict], labelled: set[str]):
        self.infos, self.labelled = infos, labelled

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return [k for k in self.infos if k not in self.labelled]

    def list_images(self):
        return list(self.infos)

    def get_image_info(self, image_id):
        return self.infos[image_id]


class _FileDatastore(_FakeDatastore):
    """The fake datastore over image files, with the calls the scoring task makes."""

    def __init__(self, paths: dict, labelled: set[str]):
        super().__init__({k: {} for k in paths}, labelled)
        self.paths = paths

    def get_labeled_images(self, label_tag=None, labels=None):
        return sorted(self.labelled)

    def get_image_uri(self, image_id):
        return str(self.paths[image_id])

    def update_image_info(self, image_id, info):
        self.infos[image_id].update(info)


def _served(predictor, version: str):
    """What the scoring task asks of the app's served model: ``get()`` -> (predictor, version)."""
    return types.SimpleNamespace(get=lambda: (predictor, types.SimpleNamespace(version=version)))


def _import_app_lib(monkeypatch):
    from app_server import import_app_lib

    import_app_lib(monkeypatch)
    pytest.importorskip("monailabel")


def test_app_diverse_strategy_skips_a_near_duplicate_of_a_fresh_label(monkeypatch):
    from busi_monai.active.strategies import DIVERSITY_POOL

    _import_app_lib(monkeypatch)
    from lib.activelearning.mc_dropout import (
        MCDropoutDiverseStrategy,
        MCDropoutStrategy,
    )

    assert DIVERSITY_POOL >= 2
    v = "v1"
    infos = {
        # "a" was labelled since the current weights; "a_dup" is the same lesion and the most uncertain.
        "a": {"mc_dropout_score": 0.5, "mc_dropout_version": v, "mc_dropout_embedding": [1.0, 0.0]},
        "a_dup": {"mc_dropout_score": 0.9, "mc_dropout_version": v, "mc_dropout_embedding": [1.0, 0.0]},
        "b": {"mc_dropout_score": 0.8, "mc_dropout_version": v, "mc_dropout_embedding": [0.0, 1.0]},
        "c": {"mc_dropout_score": 0.1, "mc_dropout_version": v, "mc_dropout_embedding": [0.0, -1.0]},
    }
    ds = _FakeDatastore(infos, labelled={"a"})
    assert MCDropoutStrategy()({}, ds)["id"] == "a_dup"  # plain BALD: the top score
    assert MCDropoutDiverseStrategy()({"strategy": "mc_dropout_diverse"}, ds)["id"] == "b"
    # Nothing picked since the weights changed: the diverse strategy is plain BALD.
    ds.labelled = set()
    infos["a"]["mc_dropout_version"] = "v0"
    assert MCDropoutDiverseStrategy()({"strategy": "mc_dropout_diverse"}, ds)["id"] == "a_dup"


def test_app_typiclust_asks_for_the_typical_image_of_a_kind_nobody_labelled(monkeypatch):
    _import_app_lib(monkeypatch)
    from lib.activelearning.mc_dropout import TypiClustStrategy

    v = "v1"

    def info(score, emb, version=v):
        return {"mc_dropout_score": score, "mc_dropout_version": version, "mc_dropout_embedding": emb, "mc_dropout_embedding_version": version}

    infos = {
        # Kind A: labelled already (embedded under the current weights, as scoring does), plus a
        # very uncertain copy. Kind B: nobody labelled it; b_mid sits in its middle.
        "a": info(0.1, [1.0, 0.0]),
        "a_dup": info(0.9, [0.99, 0.01]),
        "b_left": info(0.2, [0.0, 1.0]),
        "b_mid": info(0.1, [0.05, 1.0]),
        "b_right": info(0.2, [0.1, 1.0]),
    }
    ds = _FakeDatastore(infos, labelled={"a"})
    assert TypiClustStrategy()({"strategy": "typiclust"}, ds)["id"] == "b_mid"
    # Without the labelled image's features (another model's), kind A is the bigger uncovered one.
    infos["a"]["mc_dropout_embedding_version"] = "v0"
    infos["a_dup"]["mc_dropout_embedding"] = [1.0, 0.0]
    infos["a_dup2"] = info(0.3, [1.0, 0.01])
    infos["a_dup3"] = info(0.3, [1.0, -0.01])
    infos["a_dup4"] = info(0.3, [0.99, 0.0])
    assert TypiClustStrategy()({"strategy": "typiclust"}, ds)["id"].startswith("a_dup")


def test_app_scoring_embeds_labelled_images_for_typiclust(monkeypatch, tmp_path):
    """Without score_labeled, labelled images get features (no score) under the current weights."""
    _import_app_lib(monkeypatch)
    from lib.scoring.mc_dropout import EMBEDDING_DIM, MCDropoutScoring

    from busi_monai.data.io import Image2D, write_array
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import make_checkpoint
    from busi_monai.model.networks import build_network
    from busi_monai.training.recipes import get_recipe

    torch.manual_seed(0)
    predictor = Predictor(make_checkpoint(build_network("fast"), get_recipe("fast").with_overrides(image_size=32), "fast"), device="cpu", tta=False)
    paths = {}
    for name in ("lab", "unl1", "unl2"):
        paths[name] = write_array(np.random.default_rng(len(name)).random((40, 48)).astype(np.float32), tmp_path / f"{name}.nii.gz", like=Image2D(np.zeros((40, 48), np.float32)))

    ds = _FileDatastore(paths, labelled={"lab"})
    scoring = MCDropoutScoring(_served(predictor, "w1"), types.SimpleNamespace(mc_passes=3, score_labeled=False))
    assert scoring.work_left(ds, "w1", 3)
    result = scoring({}, ds)
    assert set(result) == {"unl1", "unl2"}  # MC-dropout scores for the unlabelled only
    assert "mc_dropout_score" not in ds.infos["lab"]
    for k in paths:
        assert ds.infos[k]["mc_dropout_embedding_version"] == "w1" and len(ds.infos[k]["mc_dropout_embedding"]) == EMBEDDING_DIM
    assert not scoring.work_left(ds, "w1", 3) and scoring({}, ds) == {}  # nothing left under the same weights
    # Only a labelled image's embedding outdated (a datastore from before embeddings): a run is due.
    ds.infos["lab"]["mc_dropout_embedding_version"] = "w0"
    assert scoring.work_left(ds, "w1", 3)


def test_al_merge_combines_parts_run_in_separate_processes(tmp_path):
    from busi_monai.active.simulation import merge_results

    def part(seed, strategies, with_full):
        runs = [
            {"seed": seed, "strategy": s, "curve": [{"labels": 10, "dice": 0.3, "normal_fp": 0.5}, {"labels": 20, "dice": 0.6 + 0.1 * (s != "random"), "normal_fp": 0.2}]}
            for s in strategies
        ]
        full = [{"seed": seed, "labels": 50, "dice": 0.7, "normal_fp": 0.1}] if with_full else []
        config = {"data": "d", "strategies": strategies, "seeds": [seed], "epochs_full": 5 if with_full else None, "image_size": 32,
                  "preset": "fast", "step": 10, "epochs_initial": 2, "epochs_per_round": 1, "pool_size": 50}
        path = tmp_path / f"part{seed}.json"
        path.write_text(json.dumps({"config": config, "full": full, "runs": runs}))
        return path

    res = merge_results([part(0, ["random", "bald_diverse"], True), part(1, ["random", "bald_diverse", "bald"], False)], tmp_path / "merged")
    s = res["summary"]
    assert res["config"]["seeds"] == [0, 1] and res["config"]["strategies"] == ["random", "bald_diverse", "bald"]
    assert s["strategies"]["random"]["seeds"] == 2 and s["strategies"]["bald"]["seeds"] == 1
    # 95% of 0.7 = 0.665: random (0.3 -> 0.6) never reaches it; the others (0.3 -> 0.7) by interpolation.
    assert s["strategies"]["random"]["labels_to_target"] is None
    assert s["strategies"]["bald_diverse"]["labels_to_target"] == pytest.approx(10 + (0.665 - 0.3) / 0.4 * 10)
    # Paired with random seed by seed: +0.1 after the shared start on both seeds, one seed for bald.
    paired = s["strategies"]["bald_diverse"]["paired_vs_random"]
    assert paired["seeds"] == 2 and paired["wins"] == 2 and paired["mean_dice_difference"] == pytest.approx(0.1)
    assert paired["standard_error"] == pytest.approx(0.0)
    assert s["strategies"]["bald"]["paired_vs_random"]["seeds"] == 1 and s["strategies"]["bald"]["paired_vs_random"]["standard_error"] is None
    assert "paired_vs_random" not in s["strategies"]["random"]
    assert (tmp_path / "merged" / "curves.png").is_file()
    assert res["merged_from"] == [str(tmp_path / "part0.json"), str(tmp_path / "part1.json")]
    # Merging a merge with a new part keeps the list of original parts flat.
    again = merge_results([tmp_path / "merged" / "curves.json", part(3, ["random"], False)], tmp_path / "merged2")
    assert again["merged_from"] == res["merged_from"] + [str(tmp_path / "part3.json")]
    assert again["config"]["seeds"] == [0, 1, 3]
    with pytest.raises(ValueError, match="other settings"):
        other = part(2, ["random"], False)
        data = json.loads(other.read_text())
        data["config"]["image_size"] = 64
        other.write_text(json.dumps(data))
        merge_results([tmp_path / "part0.json", other], tmp_path / "bad")
    with pytest.raises(ValueError, match="other settings"):
        data["config"].update(image_size=32, round_learning_rate=1e-4)  # part0 retrained at its recipe's rate
        other.write_text(json.dumps(data))
        merge_results([tmp_path / "part0.json", other], tmp_path / "bad")


def test_app_scoring_of_a_diverged_model_stores_no_nan_and_next_sample_still_answers(monkeypatch, tmp_path):
    """Weights that diverged to NaN give NaN uncertainties: they are stored as null (the
    datastore index is served as JSON), and every strategy falls back to a random pick."""
    _import_app_lib(monkeypatch)
    from lib.activelearning.mc_dropout import (
        MCDropoutDiverseStrategy,
        MCDropoutStrategy,
        TypiClustStrategy,
    )
    from lib.scoring.mc_dropout import MCDropoutScoring

    from busi_monai.data.io import Image2D, write_array
    from busi_monai.inference.predictor import Predictor
    from busi_monai.jsonio import dumps, loads_strict
    from busi_monai.model.checkpoint import make_checkpoint
    from busi_monai.model.networks import build_network
    from busi_monai.training.recipes import get_recipe

    net = build_network("fast")
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    predictor = Predictor(make_checkpoint(net, get_recipe("fast").with_overrides(image_size=32), "fast"), device="cpu", tta=False)
    paths = {n: write_array(np.full((40, 48), i, np.float32), tmp_path / f"{n}.nii.gz", like=Image2D(np.zeros((40, 48), np.float32))) for i, n in enumerate(("u1", "u2"))}

    ds = _FileDatastore(paths, labelled=set())
    MCDropoutScoring(_served(predictor, "nan"), types.SimpleNamespace(mc_passes=2, score_labeled=False))({}, ds)
    assert all(ds.infos[k]["mc_dropout_score"] is None for k in paths)
    loads_strict(dumps(ds.infos))
    for strategy in (MCDropoutStrategy(), MCDropoutDiverseStrategy(), TypiClustStrategy()):
        pick = strategy({"strategy": strategy.name}, ds)
        assert pick["id"] in paths and pick["mc_dropout_score"] is None, strategy.name


def test_every_strategy_is_one_registry_entry():
    from busi_monai.active.strategies import (
        SELECTORS,
        SIMULATION_STRATEGIES,
        STRATEGIES,
        select,
    )

    assert list(SELECTORS) == list(SIMULATION_STRATEGIES) and set(STRATEGIES) < set(SELECTORS)
    with pytest.raises(ValueError, match="choose one of random, entropy"):
        select("coreset", None, torch.zeros(3, 1, 8, 8), 1, random.Random(0))


def test_compact_embeddings_are_unit_length_and_the_same_in_every_process():
    """What the app stores per image for its diversity strategies: a fixed projection of the
    bottleneck features, so that scores written by different processes compare."""
    import json
    import subprocess
    import sys

    import torch

    from busi_monai.active.strategies import compact_embedding

    feats = torch.arange(2 * 128, dtype=torch.float32).reshape(2, 128) / 100
    emb = compact_embedding(feats, 32)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    code = "import torch, json; from busi_monai.active.strategies import compact_embedding as c; print(json.dumps(c(torch.arange(256, dtype=torch.float32).reshape(2, 128) / 100, 32).tolist()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert torch.allclose(torch.tensor(json.loads(other)), emb)
