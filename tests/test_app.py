"""The MONAI Label app (apps/busi) end to end: the real server in a subprocess, driven with
``MONAILabelClient`` (the REST calls 3D Slicer's MONAI Label plugin makes).

One server for the module, on a studies folder built from sample-data (labels for half the
images), serving the session's ``trained_model`` (so nothing waits for a 50-epoch training).
The training test puts the session's model back when it ends, so the tests run alone and in
any order.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import AppServer  # noqa: E402
from masks import assert_masks_agree, assert_outlines  # noqa: E402

itk = pytest.importorskip("itk")
pytest.importorskip("monailabel")

MODEL = "attention_unet"
PNG_ID = "dropped_png"
# Lesion Dice asked of one image the session's model has learned (0.7-0.9 where measured, bf16
# and fp32 training): far above an empty, full or untrained model's mask (under 0.15).
MIN_DICE = 0.4


def _geometry(path):
    img = itk.imread(str(path))
    return {
        "shape": tuple(itk.array_from_image(img).shape),
        "spacing": tuple(float(s) for s in img.GetSpacing()),
        "origin": tuple(float(o) for o in img.GetOrigin()),
        "direction": np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=float),
    }


def _assert_same_geometry(result, image):
    r, i = _geometry(result), _geometry(image)
    assert r["shape"] == i["shape"], (r["shape"], i["shape"])
    np.testing.assert_allclose(r["spacing"], i["spacing"], rtol=1e-6)
    np.testing.assert_allclose(r["origin"], i["origin"], atol=1e-6)
    np.testing.assert_allclose(r["direction"], i["direction"], atol=1e-6)


@pytest.fixture(scope="module")
def app(sample_dir, trained_model, tmp_path_factory):
    """(server, studies, model_dir) with the session's trained model published in the app."""
    from busi_monai.data.studies import build_studies
    from busi_monai.serve import MODEL_FILENAME, publish_model

    root = tmp_path_factory.mktemp("busi-app")
    studies = root / "studies"
    build_studies(sample_dir, studies, label_fraction=0.5)
    # A PNG dropped into the studies folder, as a user would.
    png = sorted((sample_dir / "benign").glob("* (*).png"))[0]
    shutil.copy(png, studies / f"{PNG_ID}.png")
    model_dir = root / "model"
    publish_model(trained_model, model_dir)
    assert (model_dir / MODEL_FILENAME).is_file()
    srv = AppServer(
        studies, model_dir, workdir=root / "server",
        conf={"preset": "fast", "mc_passes": 6, "score_labeled": "true", "device": "cpu"},
    )  # fmt: skip
    srv.start()
    try:
        yield srv, studies, model_dir, png
    finally:
        srv.stop()


def _objects(client) -> dict:
    return client.datastore()["objects"]


def test_info_lists_model_trainer_labels_strategies(client):
    info = client.info()
    assert MODEL in info["models"]
    assert MODEL in info["trainers"]
    assert info["labels"] == {"lesion": 1}
    assert info["models"][MODEL]["labels"] == {"lesion": 1}
    assert info["models"][MODEL]["dimension"] == 2
    # The measured best strategy comes first: Slicer's MONAI Label module selects the first.
    assert list(info["strategies"]) == ["random", "typiclust", "mc_dropout_diverse", "mc_dropout"]  # first: Slicer's default
    assert "mc_dropout" in info["scoring"]
    cfg = info["trainers"][MODEL]["config"]
    assert {"max_epochs", "train_batch_size", "learning_rate", "val_split", "image_size", "device"} <= set(cfg)
    assert cfg["train_batch_size"] == 4 and cfg["learning_rate"] == pytest.approx(1e-3)
    assert "CPU" in info["models"][MODEL]["description"]  # which device, as /info shows it
    assert info["busi"]["device"] == "cpu" and info["busi"]["model_version"]


def test_next_sample_and_infer_nrrd_overlays_the_image(client, trained_model):
    sample = client.next_sample("random", {})
    assert sample["id"] in _objects(client)
    image_path = Path(sample["path"])
    assert image_path.is_file()
    result, params = client.infer(MODEL, sample["id"], {"result_extension": ".nrrd"})
    assert result and result.endswith(".nrrd"), result
    _assert_same_geometry(result, image_path)
    arr = itk.array_from_image(itk.imread(result))
    assert set(np.unique(arr).tolist()) <= {0, 1}  # the label value Slicer maps to "lesion"
    # The model's own mask of the image (a normal image may rightly have none).
    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor

    local = Predictor(trained_model, device="cpu").predict([read_image(image_path)])[0]
    assert_masks_agree(arr, local.mask, local.probability, what=f"{sample['id']}: served and Predictor")
    assert params["model_version"] and params["device"] == "cpu"
    assert params["lesion_area_px"] == int(arr.sum())
    assert params["label_names"] == {"lesion": 1}


def test_gradcam_heatmap_overlays_the_image(app, client, trained_model):
    """The Grad-CAM infer model returns the heatmap on the image's geometry, as Slicer loads it,
    in the bands of the same heatmap `busi-monai explain` computes."""
    _, studies, _, _ = app
    from busi_monai.data.io import read_image
    from busi_monai.explain.gradcam import DEFAULT_LAYER, gradcam
    from busi_monai.inference.predictor import Predictor

    assert f"{MODEL}_gradcam" in client.info()["models"]
    image_id = sorted(k for k in _objects(client) if k.startswith("malignant"))[0]
    image_path = studies / f"{image_id}.nii.gz"
    result, params = client.infer(f"{MODEL}_gradcam", image_id, {"result_extension": ".nrrd"})
    _assert_same_geometry(result, image_path)
    bands = itk.array_from_image(itk.imread(result)).squeeze()
    assert bands.max() == params["levels"] == 10 and len(np.unique(bands)) > 2
    assert params["layer"] == DEFAULT_LAYER
    local = gradcam(Predictor(trained_model, device="cpu"), read_image(image_path), DEFAULT_LAYER)
    expected = np.ceil(np.clip(local, 0, 1) * 10).astype(np.uint8).reshape(bands.shape)
    # Float noise may move a pixel on a band edge by one band, nothing more.
    assert np.abs(bands.astype(int) - expected).max() <= 1 and (bands != expected).mean() < 0.01


def test_infer_png_in_the_datastore(app, client, trained_model):
    _, studies, _, png = app
    from busi_monai.data.io import read_image, read_masks_union
    from busi_monai.inference.predictor import Predictor

    assert PNG_ID in _objects(client)
    image = studies / f"{PNG_ID}.png"
    result, params = client.infer(MODEL, PNG_ID, {"result_extension": ".nrrd"})
    _assert_same_geometry(result, image)
    served = itk.array_from_image(itk.imread(result))
    # The CLI's mask, in the same orientation (MONAI Label's writer would transpose it), and it
    # outlines the lesion.
    local = Predictor(trained_model, device="cpu").predict([read_image(image)])[0]
    assert set(np.unique(served).tolist()) == {0, 1}
    assert_outlines(served, read_masks_union(sorted(png.parent.glob(f"{png.stem}_mask*.png"))), MIN_DICE, what=png.name)
    assert_masks_agree(served, local.mask, local.probability, what=f"{png.name}: served and Predictor")
    assert params["lesion_area_px"] == int(served.sum())
    # The default result format is NIfTI, with the same geometry as well.
    result2, _ = client.infer(MODEL, PNG_ID, {})
    assert result2.endswith(".nii.gz")
    _assert_same_geometry(result2, image)


def _wait_for_scores(client, version: str, timeout: float = 150) -> dict:
    """The images' info once every image is scored for ``version``. A scoring run is asked for
    every few seconds until then: MONAI Label starts one at start-up and after a training, but
    not when a test puts earlier weights back, and it refuses a second while one runs; a run
    skips what is already scored for the current weights."""
    import requests

    deadline, asked = time.time() + timeout, 0.0
    while True:
        objs = _objects(client)
        infos = {k: v["image"]["info"] for k, v in objs.items()}
        if all(i.get("mc_dropout_version") == version for i in infos.values()):
            return {k: i for k, i in infos.items()}
        if time.time() > deadline:
            missing = [k for k, i in infos.items() if i.get("mc_dropout_version") != version]
            raise AssertionError(f"mc_dropout scores missing for {missing[:5]} after {timeout}s")
        if time.time() - asked > 5:
            requests.post(f"{client.get_server_url()}/scoring/mc_dropout", timeout=30)
            asked = time.time()
        time.sleep(1)


def test_mc_dropout_scores_and_next_sample(client):
    version = client.info()["busi"]["model_version"]
    infos = _wait_for_scores(client, version)
    scores = {k: i["mc_dropout_score"] for k, i in infos.items()}
    assert all(np.isfinite(list(scores.values()))) and all(s >= 0 for s in scores.values())
    assert all(i["mc_dropout_passes"] == 6 for i in infos.values())

    # Next Sample with the uncertainty strategy: the unlabelled image with the highest score, of
    # those it has not handed out in the last hour (whatever ran before on this server).
    objs = _objects(client)
    now = time.time()
    handed = {k for k, i in infos.items() if now - i.get("strategy", {}).get("mc_dropout", {}).get("ts", 0) < 3600}
    unlabelled = [k for k, v in objs.items() if not v["labels"].get("final")]
    fresh = [k for k in unlabelled if k not in handed]
    assert len(fresh) >= 2, (len(unlabelled), handed)
    best = max(fresh, key=lambda k: scores[k])
    res = client.next_sample("mc_dropout", {})
    assert res["id"] == best
    assert res["mc_dropout_score"] == pytest.approx(scores[best])
    # Asked again (the first one not labelled yet), it moves on to the next most uncertain.
    res2 = client.next_sample("mc_dropout", {})
    assert res2["id"] == max((k for k in fresh if k != best), key=lambda k: scores[k])
    # TypiClust hands out unlabelled images too, one it has not handed out yet each time.
    first, second = client.next_sample("typiclust", {}), client.next_sample("typiclust", {})
    assert {first["id"], second["id"]} <= set(unlabelled) and first["id"] != second["id"]


def _slicer_label(image_path: Path, out: Path, mask: np.ndarray) -> Path:
    """A label as Slicer submits it: a single-slice 3D volume with the image's geometry."""
    img = itk.imread(str(image_path))
    arr = mask.astype(np.uint8)[None]
    lab = itk.image_from_array(arr)
    if img.GetImageDimension() == 3:
        lab.CopyInformation(img)
    else:
        sp, org = list(img.GetSpacing()), list(img.GetOrigin())
        lab.SetSpacing([sp[0], sp[1], 1.0])
        lab.SetOrigin([org[0], org[1], 0.0])
    itk.imwrite(lab, str(out), compression=True)
    return out


@pytest.fixture
def restores_model(app, trained_model):
    yield
    from busi_monai.serve import publish_model

    publish_model(trained_model, app[2])


def test_save_label_train_and_use_new_weights(app, client, tmp_path, restores_model):
    srv, studies, model_dir, _ = app
    from busi_monai.data.io import read_image

    objs = _objects(client)
    unlabelled = sorted(k for k, v in objs.items() if not v["labels"].get("final") and k != PNG_ID)
    before = client.info()["busi"]["model_version"]
    nii_id, seg_id = unlabelled[0], unlabelled[1]
    for image_id, name in ((nii_id, "label.nii.gz"), (seg_id, "label.seg.nrrd")):
        image_path = studies / objs[image_id]["image"]["info"]["name"]
        img = read_image(image_path)
        mask = np.zeros(img.shape, np.uint8)
        h, w = img.shape
        mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 1
        label = _slicer_label(image_path, tmp_path / name, mask)
        assert itk.array_from_image(itk.imread(str(label))).shape == (1, h, w)
        client.save_label(image_id, str(label), tag="final")
    objs = _objects(client)
    assert objs[nii_id]["labels"]["final"]["ext"] == ".nii.gz"
    assert objs[seg_id]["labels"]["final"]["ext"] == ".seg.nrrd"
    n_labelled = sum(1 for v in objs.values() if v["labels"].get("final"))

    _, p_before = client.infer(MODEL, PNG_ID, {"result_extension": ".nrrd"})
    # Small and quick, but long enough for the model to learn its training images (val_split 0:
    # every labelled image is learned, for the uncertainty check below).
    params = {"max_epochs": 40, "image_size": 32, "train_batch_size": 4, "learning_rate": 0.003, "val_split": 0.0}
    task = client.train_start(MODEL, params)
    assert task["status"] in ("SUBMITTED", "RUNNING")
    deadline = time.time() + 600
    while True:
        st = client.train_status()
        if st["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.time() < deadline, "training did not finish in 600s"
        time.sleep(1)
    assert st["status"] == "DONE", "\n".join(st.get("details", [])) + srv.log_tail(4000)

    info = client.info()
    after = info["busi"]["model_version"]
    assert after != before
    stats = info["train_stats"][MODEL]
    assert stats["epochs"] == 40 and stats["n_train"] + stats["n_val"] == n_labelled
    assert "total_time" in stats and "best_metric" in stats and stats["model_version"] == after
    assert not list(model_dir.glob(".*.tmp")), "no temporary file left beside the published model"
    _, p_after = client.infer(MODEL, PNG_ID, {"result_extension": ".nrrd"})
    assert p_before["model_version"] == before and p_after["model_version"] == after
    assert p_after["image_size"] == 32  # the new weights, trained at 32px, are in use

    # MONAI Label rescored the images with the new weights after the training; the images the
    # model has just learned (sample labels) score lower than the ones it has not seen.
    infos = _wait_for_scores(client, after)
    objs = _objects(client)
    learned = [k for k, v in objs.items() if v["labels"].get("final") and k not in (nii_id, seg_id)]
    unseen = [k for k, v in objs.items() if not v["labels"].get("final")]
    mean_learned = float(np.mean([infos[k]["mc_dropout_score"] for k in learned]))
    mean_unseen = float(np.mean([infos[k]["mc_dropout_score"] for k in unseen]))
    assert mean_unseen > mean_learned, (mean_unseen, mean_learned)
