"""A fresh app with no weights yet, through the real MONAI Label server as Slicer drives it:
/info answers with the trainer and no model yet, Run and the click tool say 503 with the reason, a Train
with a bad option fails with the option named while the server keeps serving, the first Train
publishes weights, and Run then outlines at the image's own size. Bad request options (result
type, Grad-CAM layer) get a 4xx naming them."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import AppServer  # noqa: E402

pytest.importorskip("monailabel")
pytest.importorskip("itk")

MODEL, CLICKS = "attention_unet", "attention_unet_clicks"
TRAIN = {"max_epochs": 2, "image_size": 32, "train_batch_size": 4, "val_split": 0.2}


@pytest.fixture(scope="module")
def cold(sample_dir, tmp_path_factory):
    from busi_monai.data.studies import build_studies

    root = tmp_path_factory.mktemp("cold")
    busi = root / "busi"
    for cls, n in (("benign", 4), ("malignant", 3), ("normal", 3)):
        (busi / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).glob("*.png"))[: 2 * n]:
            shutil.copy(f, busi / cls / f.name)
    studies = root / "studies"
    build_studies(busi, studies, label_fraction=1.0)
    srv = AppServer(studies, root / "model", workdir=root / "server", conf={"preset": "fast", "device": "cpu"},
                    env={"MONAI_LABEL_TASKS_SCORING": "false"})  # fmt: skip
    srv.start()
    try:
        yield srv, studies, root / "model"
    finally:
        srv.stop()


def _infer(srv, model: str, image: str, params: dict | None = None) -> requests.Response:
    return requests.post(f"{srv.url}/infer/{model}", params={"image": image}, data={"params": __import__("json").dumps(params or {})}, timeout=120)


def _train(srv, params: dict, timeout: float = 300) -> dict:
    r = requests.post(f"{srv.url}/train/{MODEL}", json=params, timeout=60)
    assert r.status_code == 200, r.text[:300]
    deadline = time.time() + timeout
    while True:
        st = requests.get(f"{srv.url}/train/", timeout=30).json()
        if st.get("status") not in ("SUBMITTED", "RUNNING"):
            return st
        assert time.time() < deadline, f"training did not end in {timeout}s\n{srv.log_tail(3000)}"
        time.sleep(0.5)


def test_a_fresh_app_answers_trains_and_then_outlines(cold):
    srv, studies, model_dir = cold
    info = srv.get("/info/")
    # No weights: Slicer sees the trainer but no model to Run yet (MONAI Label lists valid ones).
    assert MODEL in info["trainers"] and not {MODEL, CLICKS} & set(info["models"]) and info["busi"]["model_version"] is None
    image = sorted(p.name.split(".")[0] for p in studies.glob("*.nii.gz"))[0]
    for model in (MODEL, CLICKS):
        r = _infer(srv, model, image, {"foreground": [[5, 5, 0]]} if model == CLICKS else {})
        assert r.status_code == 503 and "no trained weights yet" in r.text, (model, r.status_code, r.text[:300])
        assert "model_dir" in r.text and str(model_dir) not in r.text, "the server's folders stay private"

    bad = _train(srv, {**TRAIN, "max_epochs": 0})
    assert bad["status"] != "DONE" and "max_epochs" in "\n".join(bad.get("details", [])), bad
    assert not (model_dir / "attention_unet.pt").exists(), "a failed Train publishes nothing"
    assert srv.get("/info/")["busi"]["model_version"] is None

    done = _train(srv, TRAIN)
    assert done["status"] == "DONE", "\n".join(done.get("details", [])[-20:])
    info = srv.get("/info/")
    assert info["busi"]["model_version"] is not None and {MODEL, CLICKS} <= set(info["models"])
    r = _infer(srv, MODEL, image, {"result_extension": ".nrrd"})
    assert r.status_code == 200, r.text[:300]


def test_bad_request_options_get_a_4xx_naming_them(cold):
    srv, studies, model_dir = cold
    if not (model_dir / "attention_unet.pt").exists():
        pytest.skip("needs the first Train of the test above")
    image = sorted(p.name.split(".")[0] for p in studies.glob("*.nii.gz"))[0]
    r = _infer(srv, MODEL, image, {"result_extension": ".exe"})
    assert r.status_code == 422 and "result_extension" in r.text
    r = _infer(srv, f"{MODEL}_gradcam", image, {"layer": "no.such.layer"})
    assert r.status_code == 422 and "no.such.layer" in r.text
    assert _infer(srv, MODEL, image).status_code == 200, "and the server keeps serving"
    assert np.isfinite(srv.get("/info/")["busi"]["mc_passes"])
