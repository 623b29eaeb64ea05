"""The app's click tool as Slicer drives it: with a click-guided preset the server lists an
``attention_unet_clicks`` model of DeepGrow type, takes ``foreground``/``background`` points as
the image's IJK indices ([i, j, k]: column, row, slice) and answers with the same mask
``Predictor.predict_clicks`` draws for those clicks in (row, col)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import AppServer  # noqa: E402

itk = pytest.importorskip("itk")
pytest.importorskip("monailabel")

CLICKS = "attention_unet_clicks"
IMAGE_ID = "wide_scan"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, image path, checkpoint) of a server whose preset is ``interactive``, serving an
    untrained click network: its output follows the click maps, which is all these tests need."""
    import torch
    from PIL import Image

    from busi_monai.model.checkpoint import atomic_torch_save, make_checkpoint
    from busi_monai.model.networks import build_network
    from busi_monai.serve import MODEL_FILENAME
    from busi_monai.training.recipes import get_recipe

    root = tmp_path_factory.mktemp("busi-app-clicks")
    studies = root / "studies"
    studies.mkdir()
    image = studies / f"{IMAGE_ID}.png"
    # Not square, so that a swapped row and column would land elsewhere (or outside).
    Image.fromarray((np.random.default_rng(0).random((90, 160)) * 255).astype(np.uint8)).save(image)
    torch.manual_seed(0)
    recipe = get_recipe("interactive").with_overrides(image_size=64)
    net = build_network(recipe.network).eval()
    # Centre the untrained logits on 0 for this image and these clicks, so that about half the
    # pixels are lesion: a mask that is neither empty nor full, and that moves with the clicks.
    from busi_monai.data.preprocessing import preprocess_array
    from busi_monai.interactive.guidance import click_maps, scale_clicks

    x = preprocess_array(np.asarray(Image.open(image), np.float32), 64)
    maps = click_maps((64, 64), scale_clicks([(30, 120)], (90, 160), (64, 64)), scale_clicks([(70, 20)], (90, 160), (64, 64)), recipe.click_sigma)
    with torch.no_grad():
        logit = net(torch.cat((x, torch.from_numpy(maps).float()))[None])
        net.head.conv.bias -= logit.median()
    ckpt = make_checkpoint(net, recipe, "interactive")
    (root / "model").mkdir()
    atomic_torch_save(ckpt, root / "crafted.pt")
    atomic_torch_save(ckpt, root / "model" / MODEL_FILENAME)
    srv = AppServer(studies, root / "model", workdir=root / "server", conf={"preset": "interactive", "device": "cpu"})
    srv.start()
    try:
        yield srv.client(), image, ckpt, root
    finally:
        srv.stop()


def _mask(path) -> np.ndarray:
    return itk.array_from_image(itk.imread(str(path))).squeeze()


def test_info_lists_the_click_model_as_deepgrow(served):
    client, *_ = served
    models = client.info()["models"]
    assert CLICKS in models and "attention_unet" in models
    assert models[CLICKS]["type"] == "deepgrow" and models[CLICKS]["dimension"] == 2
    assert models[CLICKS]["labels"] == {"lesion": 1}


def test_clicks_as_slicer_sends_them_give_the_predictors_mask(served):
    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor

    client, image, ckpt, _ = served
    fg, bg = [[120, 30, 0]], [[20, 70, 0]]  # [i, j, k]: column, row, slice
    result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": fg, "background": bg, "result_extension": ".nrrd"})
    served_mask = _mask(result)
    assert served_mask.shape == (90, 160)
    local = Predictor(ckpt, device="cpu")
    img = read_image(image)
    expected = local.predict_clicks(img, foreground=[(30, 120)], background=[(70, 20)]).mask
    elsewhere = local.predict_clicks(img, foreground=[(70, 30)], background=[(20, 140)]).mask
    assert expected.any() and not expected.all(), "a mask that is all or nothing would make the comparison vacuous"
    np.testing.assert_array_equal(served_mask, expected)
    assert not np.array_equal(expected, elsewhere), "where the clicks are changes the mask"
    assert params["lesion_area_px"] == int(expected.sum())
    # DeepEdit-style requests name the foreground by its label.
    result2, _ = client.infer(CLICKS, IMAGE_ID, {"lesion": fg, "background": bg, "result_extension": ".nrrd"})
    np.testing.assert_array_equal(_mask(result2), expected)


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"foreground": [[160, 10, 0]]}, "outside the 160x90 image"),
        ({"foreground": [[5, 95, 0]]}, "outside the 160x90 image"),
        ({"foreground": "120,30"}, "expected a list"),
        ({"background": [["a", "b"]]}, "not numeric"),
    ],
)
def test_bad_clicks_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(served, params, why):
    from monailabel.client.client import MONAILabelClientException

    client, *_ = served
    with pytest.raises(MONAILabelClientException) as e:
        client.infer(CLICKS, IMAGE_ID, {**params, "result_extension": ".nrrd"})
    assert "422" in str(e.value) and why in str(e.value)
    result, _ = client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "result_extension": ".nrrd"})
    assert _mask(result).shape == (90, 160)


def test_a_clinicians_loop_outline_clicks_submit_train(served):
    """Run, correct with a click, Submit Label, Train: the new weights serve the click tool."""
    import time

    from busi_monai.serve import publish_model

    client, image, _, root = served
    before = client.info()["busi"]["model_version"]
    auto, _ = client.infer("attention_unet", IMAGE_ID, {"result_extension": ".nrrd"})
    assert _mask(auto).shape == (90, 160)
    clicked, _ = client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "background": [], "label": "lesion", "result_extension": ".nrrd", "result_dtype": "uint8"})
    client.save_label(IMAGE_ID, clicked, tag="final")
    try:
        task = client.train_start("attention_unet", {"max_epochs": 2, "image_size": 32, "val_split": 0.0})
        assert task["status"] in ("SUBMITTED", "RUNNING")
        deadline = time.time() + 300
        while (st := client.train_status())["status"] in ("SUBMITTED", "RUNNING"):
            assert time.time() < deadline, "training did not finish in 300 s"
            time.sleep(1)
        assert st["status"] == "DONE", st
        after = client.info()["busi"]["model_version"]
        assert after != before
        result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "result_extension": ".nrrd"})
        assert params["model_version"] == after and params["image_size"] == 32
        assert _mask(result).shape == (90, 160)
    finally:  # the other tests compare against the crafted weights
        publish_model(root / "crafted.pt", root / "model")


def _click_follower(recipe):
    """A click network by hand: zero weights but one path from the foreground-click map to the
    output (the first encoder, the finest skip, the last decoder, the head), so its mask is a
    small disc around each foreground click and nothing else."""
    import torch

    from busi_monai.model.networks import build_network

    net = build_network(recipe.network).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.running_var.fill_(1.0)
                m.running_mean.zero_()
        k = net.encoders[0].conv[0].conv.weight.shape[-1] // 2
        net.encoders[0].conv[0].conv.weight[0, 1, k, k] = 1.0  # input channel 1: foreground clicks
        net.encoders[0].conv[1].conv.weight[0, 0, k, k] = 1.0
        net.decoders[-1].conv[0].conv.weight[0, 0, k, k] = 1.0  # the gated skip comes first in the concat
        net.decoders[-1].conv[1].conv.weight[0, 0, k, k] = 1.0
        net.head.conv.weight[0, 0, 0, 0] = 40.0
        net.head.conv.bias.fill_(-10.0)
    return net


def test_the_clicked_pixel_is_inside_the_returned_mask(served):
    """Axis order end to end: an off-centre click on a non-square image, as Slicer sends it
    ([i, j, k] = column, row, slice), comes back as an outline around that very pixel."""
    from busi_monai.model.checkpoint import atomic_torch_save, make_checkpoint
    from busi_monai.serve import publish_model
    from busi_monai.training.recipes import get_recipe

    client, _, _, root = served
    recipe = get_recipe("interactive").with_overrides(image_size=64)
    atomic_torch_save(make_checkpoint(_click_follower(recipe), recipe, "interactive"), root / "follower.pt")
    publish_model(root / "follower.pt", root / "model")
    try:
        for col, row in ((120, 30), (25, 70)):
            result, _ = client.infer(CLICKS, IMAGE_ID, {"foreground": [[col, row, 0]], "background": [], "result_extension": ".nrrd"})
            mask = _mask(result)
            rows, cols = np.nonzero(mask)
            assert mask[row, col] == 1, f"click at column {col}, row {row} not inside its outline"
            assert abs(rows.mean() - row) <= 3 and abs(cols.mean() - col) <= 3
            assert mask.sum() < 0.05 * mask.size, "an outline around the click, not the whole image"
        empty, _ = client.infer(CLICKS, IMAGE_ID, {"foreground": [], "background": [], "result_extension": ".nrrd"})
        assert not _mask(empty).any(), "no click, no outline"
    finally:
        publish_model(root / "crafted.pt", root / "model")
