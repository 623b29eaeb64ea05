"""The served model (what the app's infer, Grad-CAM, clicks and scoring use): the newest published
weights, versioned by content, reloaded when the file is replaced, and a clear error before any."""

from __future__ import annotations

import os

import pytest
import torch

from busi_monai.inference.served import ModelNotAvailable, ServedModel
from busi_monai.model.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    make_checkpoint,
)
from busi_monai.model.networks import build_network
from busi_monai.training.recipes import get_recipe


def _checkpoint(seed: int) -> dict:
    torch.manual_seed(seed)
    recipe = get_recipe("fast").with_overrides(image_size=32)
    return make_checkpoint(build_network(recipe.network), recipe, "fast")


def test_no_weights_yet_is_a_clear_error(tmp_path):
    served = ServedModel(str(tmp_path / "model.pt"), device="cpu")
    assert not served.exists() and served.version() is None and served.init_checkpoint() is None
    with pytest.raises(ModelNotAvailable, match="no trained weights yet"):
        served.get()


def test_published_weights_are_served_and_replaced_ones_reloaded(tmp_path):
    path = tmp_path / "model.pt"
    atomic_torch_save(_checkpoint(0), path)
    served = ServedModel(str(path), device="cpu")
    predictor, v1 = served.get()
    assert served.get()[0] is predictor, "unchanged weights are not reloaded"
    assert served.version() == v1 and v1.source == "model" and len(v1.version) == 12
    assert v1.as_params()["model_file"] == "model.pt"  # a name, not the server's folders
    atomic_torch_save(_checkpoint(1), path)
    os.utime(path, ns=(v1.stamp[0] + 10**9, v1.stamp[0] + 10**9))
    predictor2, v2 = served.get()
    assert v2.version != v1.version and predictor2 is not predictor
    w1 = next(iter(predictor.network.state_dict().values()))
    w2 = next(iter(predictor2.network.state_dict().values()))
    assert not torch.equal(w1, w2)


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable model checkpoint"):
        ServedModel(str(path), device="cpu").get()
