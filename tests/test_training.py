"""Training on the synthetic sample set really learns, resumes, and evaluate reads its output."""

import json

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from busi_monai.checkpoint import load_checkpoint
from busi_monai.evaluation import evaluate
from busi_monai.io import read_image, read_mask
from busi_monai.metrics import image_metrics, summarize
from busi_monai.training import load_datalist, train_dataset

from conftest import TEST_EPOCHS, TEST_IMAGE_SIZE


def _baseline_dice(items, predict):
    records = []
    for it in items:
        img = read_image(it["image"])
        truth = read_mask(it["label"], expected_shape=img.shape)
        records.append(image_metrics(predict(img.array), truth))
    return summarize(records)["lesion"]["dice"]


def test_short_training_beats_what_no_learning_reaches(trained_run, prepared_sample):
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history) == TEST_EPOCHS
    assert min(h["loss"] for h in history[-5:]) < 0.7 * history[0]["loss"]
    ck = load_checkpoint(trained_run / "model.pt")
    assert ck["preset"] == "fast" and ck["preprocessing"]["image_size"] == TEST_IMAGE_SIZE

    result = evaluate(trained_run / "model.pt", prepared_sample, progress=False, device="cpu")
    learned = result["lesion"]["dice"]
    test_items = [it for it in load_datalist(prepared_sample)["test"]]
    everything = _baseline_dice(test_items, lambda a: np.ones_like(a, np.uint8))
    dark = _baseline_dice(test_items, lambda a: (a < threshold_otsu(a)).astype(np.uint8))

    torch.manual_seed(0)
    untrained_dir = trained_run.parent / "untrained"
    train_dataset(prepared_sample, untrained_dir, preset="fast", epochs=1, image_size=TEST_IMAGE_SIZE, learning_rate=1e-9, device="cpu", progress=False)
    untrained = evaluate(untrained_dir / "model.pt", prepared_sample, progress=False, device="cpu")["lesion"]["dice"]

    assert learned > 0.4, result["lesion"]
    assert learned > max(everything, dark, untrained) + 0.2, (learned, everything, dark, untrained)


def test_resume_continues_an_interrupted_run(prepared_sample, tmp_path):
    kw = dict(preset="fast", image_size=48, device="cpu", progress=False)
    train_dataset(prepared_sample, tmp_path, epochs=2, **kw)
    first = json.loads((tmp_path / "history.json").read_text())
    train_dataset(prepared_sample, tmp_path, epochs=4, resume=True, **kw)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def test_training_without_labels_says_why(tmp_path):
    from busi_monai.training import TrainingError

    (tmp_path / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(TrainingError, match="no labelled images"):
        train_dataset(tmp_path, tmp_path / "run", preset="fast", epochs=1, device="cpu", progress=False)
