"""Shared fixtures: the real BUSI copy, the committed synthetic sample set, and one small
model trained on it once per test session (fast preset, small images) for the tests that
need a model (infer, app, bundle, explain)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample-data"
BUSI_ROOT = Path(os.environ.get("BUSI_ROOT", REPO.parent / "shared" / "busi" / "Dataset_BUSI_with_GT"))

# Small enough for a 2-core CPU (~30 s), long enough that the model really learns the synthetic
# lesions. Plain BCE barely learns 30 images in 30 epochs; Dice+BCE at 3e-3 does (test Dice ~0.45).
TEST_IMAGE_SIZE = 96
TEST_EPOCHS = 30
TEST_LEARNING_RATE = 3e-3
TEST_OVERRIDES = {"loss": "dice_bce"}


@pytest.fixture(scope="session")
def busi_root() -> Path:
    if not BUSI_ROOT.is_dir():
        pytest.skip(f"real BUSI copy not found at {BUSI_ROOT} (set BUSI_ROOT)")
    return BUSI_ROOT


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert (SAMPLE_DATA / "benign").is_dir(), "sample-data/ is missing its synthetic images"
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def prepared_sample(sample_dir, tmp_path_factory) -> Path:
    from busi_monai.data import prepare

    out = tmp_path_factory.mktemp("prepared-sample")
    prepare(sample_dir, out, test_fraction=0.25, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(prepared_sample, tmp_path_factory) -> Path:
    """A run directory (model.pt, last.pt, history.json) of the fast preset on sample-data."""
    from busi_monai.training import train_dataset

    out = tmp_path_factory.mktemp("run-fast")
    train_dataset(
        prepared_sample, out, preset="fast", epochs=TEST_EPOCHS, image_size=TEST_IMAGE_SIZE,
        learning_rate=TEST_LEARNING_RATE, overrides=TEST_OVERRIDES, device="cpu", progress=False,
    )
    return out


@pytest.fixture(scope="session")
def trained_model(trained_run) -> Path:
    return trained_run / "model.pt"


@pytest.fixture(scope="module")
def client(app, tmp_path_factory):
    """A monailabel.client for the module's own ``app`` fixture (server, ...)."""
    return app[0].client(tmp_path_factory.mktemp("client"))
