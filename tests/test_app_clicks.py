"""The app's click tool as Slicer drives it: the default server (no preset) lists an
``attention_unet_clicks`` model of DeepGrow type, takes ``foreground``/``background`` points as
the image's IJK indices ([i, j, k]: column, row, slice) and Slicer's ROI box (``roi``: [i0, i1,
j0, j1, k0, k1]), corrects the outline it last answered to the same client for the same image,
and answers with the same mask ``Predictor.predict_clicks`` draws for those clicks in (row, col)."""

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
# The hand-made stand-ins below pass values through batch norm set to the identity (eval mode,
# unit statistics); instance norm would normalise them away. Any click network suits the app.
STAND_IN = "fast+clicks+prev"
IMAGE_ID = "wide_scan"
OTHER_ID = "other_scan"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, image path, checkpoint, root, server) of the default server (no preset: the
    paper's recipe with click guidance), serving an untrained click network: its output follows
    the click maps and the previous outline, which is all these tests need."""
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
    Image.fromarray((np.random.default_rng(1).random((90, 160)) * 255).astype(np.uint8)).save(studies / f"{OTHER_ID}.png")
    torch.manual_seed(0)
    recipe = get_recipe("interactive").with_overrides(image_size=64, network=STAND_IN)
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
    # Scoring off: no Monte Carlo subprocess after each Train; these tests are about clicks.
    srv = AppServer(studies, root / "model", workdir=root / "server", conf={"device": "cpu"}, env={"MONAI_LABEL_TASKS_SCORING": "false"})
    srv.start()
    try:
        yield srv.client(), image, ckpt, root, srv
    finally:
        srv.stop()


def _mask(path) -> np.ndarray:
    return itk.array_from_image(itk.imread(str(path))).squeeze()


def _client(served, client_id: str):
    """A client that says who it is, as Slicer does (its default id is "user-xyz")."""
    from monailabel.client import MONAILabelClient

    srv = served[4]
    return MONAILabelClient(srv.url, tmpdir=str(srv.workdir / "client"), client_id=client_id)


def test_the_default_server_lists_the_click_model_as_deepgrow(served):
    client, *_ = served
    info = client.info()
    models = info["models"]
    assert info["busi"]["preset"] == "paper", "started without a preset"
    assert CLICKS in models and "attention_unet" in models
    assert models[CLICKS]["type"] == "deepgrow" and models[CLICKS]["dimension"] == 2
    assert models[CLICKS]["labels"] == {"lesion": 1}
    assert "click" in models[CLICKS]["description"] and "ROI box" in models[CLICKS]["description"]


def test_clicks_as_slicer_sends_them_give_the_predictors_mask(served):
    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor

    _, image, ckpt, *_ = served
    client = _client(served, "slicer-order")
    fg, bg = [[120, 30, 0]], [[20, 70, 0]]  # [i, j, k]: column, row, slice
    result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": fg, "background": bg, "result_extension": ".nrrd"})
    served_mask = _mask(result)
    assert served_mask.shape == (90, 160)
    local = Predictor(ckpt, device="cpu")
    img = read_image(image)
    # A first request corrects the automatic outline, what Run shows.
    auto = local.predict([img])[0].mask
    expected = local.predict_clicks(img, foreground=[(30, 120)], background=[(70, 20)], previous=auto).mask
    elsewhere = local.predict_clicks(img, foreground=[(70, 30)], background=[(20, 140)], previous=auto).mask
    assert expected.any() and not expected.all(), "a mask that is all or nothing would make the comparison vacuous"
    np.testing.assert_array_equal(served_mask, expected)
    assert not np.array_equal(expected, elsewhere), "where the clicks are changes the mask"
    assert params["lesion_area_px"] == int(expected.sum()) and params["previous"] == "automatic"
    # DeepEdit-style requests name the foreground by its label (the same clicks: no correction).
    result2, params2 = client.infer(CLICKS, IMAGE_ID, {"lesion": fg, "background": bg, "result_extension": ".nrrd"})
    np.testing.assert_array_equal(_mask(result2), expected)
    assert params2["previous"] == "automatic"


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
    """Run, correct with a click, Submit Label, Train (Slicer's "ALL"): both networks train, the
    automatic one serves Run and the click tool starts from its outline with the new click network."""
    import shutil
    import time

    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.serve import MODEL_FILENAME, publish_model

    client, image, _, root, _ = served
    before = client.info()["busi"]
    # Until the click network has its own weights, the click tool serves the automatic network's.
    assert before["click_model_version"] == before["model_version"] and before["click_model_file"] == MODEL_FILENAME
    auto, _ = client.infer("attention_unet", IMAGE_ID, {"result_extension": ".nrrd"})
    assert _mask(auto).shape == (90, 160)
    clicked, _ = client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "background": [], "label": "lesion", "result_extension": ".nrrd", "result_dtype": "uint8"})
    client.save_label(IMAGE_ID, clicked, tag="final")
    try:
        task = client.train_start("", {"max_epochs": 2, "image_size": 32, "val_split": 0.0})
        assert set(task) == {"attention_unet", CLICKS}, task
        deadline = time.time() + 300
        while (st := client.train_status())["status"] in ("SUBMITTED", "RUNNING"):
            assert time.time() < deadline, "training did not finish in 300 s"
            time.sleep(1)
        assert st["status"] == "DONE", st
        info = client.info()
        after = info["busi"]
        assert after["model_version"] != before["model_version"] and after["click_model_version"] not in (before["click_model_version"], after["model_version"])
        assert after["click_model_file"] == f"clicks/{MODEL_FILENAME}"
        assert {n: info["train_stats"][n]["status"] for n in ("attention_unet", CLICKS)} == {"attention_unet": "DONE", CLICKS: "DONE"}
        assert info["train_stats"][CLICKS]["model"] == f"clicks/{MODEL_FILENAME}"
        result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "result_extension": ".nrrd"})
        assert params["model_version"] == after["click_model_version"] and params["automatic_model_version"] == after["model_version"]
        assert params["image_size"] == 32 and params["previous"] == "automatic"
        assert _mask(result).shape == (90, 160)
        # The automatic network is the paper's; the click network adds the click maps, the previous
        # outline and instance norm.
        automatic = load_checkpoint(root / "model" / MODEL_FILENAME)
        assert automatic["recipe"]["network"] == "paper" and automatic["network"]["in_channels"] == 1
        trained = load_checkpoint(root / "model" / "clicks" / MODEL_FILENAME)
        assert trained["recipe"]["network"] == "paper+clicks+prev+instancenorm" and trained["network"]["in_channels"] == 4
        assert trained["network"]["norm"] == "instance" and automatic["network"]["norm"] == "batch"
    finally:  # the other tests compare against the crafted weights, served for both tools
        publish_model(root / "crafted.pt", root / "model")
        shutil.rmtree(root / "model" / "clicks", ignore_errors=True)


def _click_follower(recipe, channels=(1,), bias: float = -10.0):
    """A click network by hand: zero weights but one path from the foreground-click map to the
    output (the first encoder, the finest skip, the last decoder, the head), so its mask is a
    small disc around each foreground click and nothing else. ``channels``: the inputs the path
    adds up (0 the image, 1 the foreground clicks, 3 the previous outline)."""
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
        for c in channels:
            net.encoders[0].conv[0].conv.weight[0, c, k, k] = 1.0  # input channel 1: foreground clicks
        net.encoders[0].conv[1].conv.weight[0, 0, k, k] = 1.0
        net.decoders[-1].conv[0].conv.weight[0, 0, k, k] = 1.0  # the gated skip comes first in the concat
        net.decoders[-1].conv[1].conv.weight[0, 0, k, k] = 1.0
        net.head.conv.weight[0, 0, 0, 0] = 40.0
        net.head.conv.bias.fill_(bias)
    return net


def test_the_clicked_pixel_is_inside_the_returned_mask(served):
    """Axis order end to end: an off-centre click on a non-square image, as Slicer sends it
    ([i, j, k] = column, row, slice), comes back as an outline around that very pixel."""
    from busi_monai.model.checkpoint import atomic_torch_save, make_checkpoint
    from busi_monai.serve import publish_model
    from busi_monai.training.recipes import get_recipe

    client, _, _, root, _ = served
    recipe = get_recipe("interactive").with_overrides(image_size=64, network=STAND_IN)
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


def test_the_click_network_corrects_the_automatic_networks_outline(served):
    """Two networks, as the app trains them: Run answers the automatic network's outline, and the
    click network's first click starts from that outline (its previous-outline input), not from
    its own click-free answer. Stand-ins: an automatic network that outlines the image's bright
    pixels, and a click network that answers its previous outline plus a disc around each
    foreground click."""
    import shutil

    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
    from busi_monai.serve import MODEL_FILENAME, publish_model
    from busi_monai.training.recipes import get_recipe

    _, image, _, root, _ = served
    client = _client(served, "two-networks")
    auto_recipe = get_recipe("fast").with_overrides(image_size=64)
    click_recipe = get_recipe("interactive").with_overrides(image_size=64, network=STAND_IN)
    _publish(root, _click_follower(auto_recipe, channels=(0,), bias=-40 * 0.3), auto_recipe, "bright")
    atomic_torch_save(make_checkpoint(_click_follower(click_recipe, channels=(1, 3)), click_recipe, "interactive"), root / "corrector.pt")
    publish_model(root / "corrector.pt", root / "model" / "clicks")
    try:
        img = read_image(image)
        automatic = Predictor(load_checkpoint(root / "bright.pt"), device="cpu").predict([img])[0].mask
        corrector = Predictor(load_checkpoint(root / "corrector.pt"), device="cpu")
        assert 0.05 < automatic.mean() < 0.6, "the stand-in automatic outline must be neither empty nor everything"
        info = client.info()["busi"]
        assert info["click_model_file"] == f"clicks/{MODEL_FILENAME}" and info["click_model_version"] != info["model_version"]

        run, params = client.infer("attention_unet", IMAGE_ID, {"result_extension": ".nrrd"})
        np.testing.assert_array_equal(_mask(run), automatic)
        # A click far from the bright pixels' outline, from another client (nothing remembered).
        fresh = _client(served, "two-networks-2")
        result, params = fresh.infer(CLICKS, IMAGE_ID, {"foreground": [[20, 80, 0]], "background": [], "roi": [], "result_extension": ".nrrd"})
        assert params["previous"] == "automatic" and params["model_file"] == MODEL_FILENAME
        expected = corrector.predict_clicks(img, [(80, 20)], previous=automatic).mask
        own = corrector.predict_clicks(img, [(80, 20)], previous=corrector.predict([img])[0].mask).mask
        assert not np.array_equal(expected, own), "the two starting outlines must differ for this check to mean anything"
        np.testing.assert_array_equal(_mask(result), expected)
        assert _mask(result)[80, 20] == 1
        # Run's answer is remembered for the click network too: the next click corrects it.
        result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": [[20, 80, 0]], "background": [], "roi": [], "result_extension": ".nrrd"})
        assert params["previous"] == "reused"
        np.testing.assert_array_equal(_mask(result), expected)
        # No click and no box: the automatic network's outline, exactly what Run shows.
        result, params = fresh.infer(CLICKS, IMAGE_ID, {"foreground": [], "background": [], "result_extension": ".nrrd"})
        np.testing.assert_array_equal(_mask(result), automatic)
    finally:
        publish_model(root / "crafted.pt", root / "model")
        shutil.rmtree(root / "model" / "clicks", ignore_errors=True)


def _publish(root, net, recipe, name: str) -> None:
    from busi_monai.model.checkpoint import atomic_torch_save, make_checkpoint
    from busi_monai.serve import publish_model

    atomic_torch_save(make_checkpoint(net, recipe, recipe.network), root / f"{name}.pt")
    publish_model(root / f"{name}.pt", root / "model")


def _all_lesion(recipe):
    """A stand-in network that calls every pixel lesion, whatever it is given: what it answers
    inside a box is the box itself."""
    import torch

    from busi_monai.model.networks import build_network

    net = build_network(recipe.network).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.conv.bias.fill_(10.0)
    return net


def test_slicers_roi_box_gives_an_outline_inside_it(served):
    """An off-centre box on a non-square image, in Slicer's order ([i0, i1, j0, j1, k0, k1]:
    column range, row range, slice range): the outline is that box's rows and columns, whichever
    way the pairs come; a box with clicks follows both."""
    from busi_monai.interactive.zoom import box_mask
    from busi_monai.serve import publish_model
    from busi_monai.training.recipes import get_recipe

    _, _, _, root, _ = served
    client = _client(served, "roi")
    recipe = get_recipe("interactive").with_overrides(image_size=64, network=STAND_IN)
    _publish(root, _all_lesion(recipe), recipe, "all_lesion")
    try:
        inside = box_mask((10, 100, 40, 150), (90, 160))  # rows 10..40, columns 100..150
        for roi in ([100, 150, 10, 40, 0, 0], [150, 100, 40, 10, 0, 0], [100, 150, 10, 40]):
            result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": [], "background": [], "roi": roi, "result_extension": ".nrrd"})
            mask = _mask(result)
            assert mask.any(), f"roi {roi}: an empty outline"
            np.testing.assert_array_equal(mask.astype(bool), inside, err_msg=f"roi {roi}: not the box's rows and columns")
            assert params["box"] == [10, 100, 40, 150]
        # Box and clicks: a background click inside the box cuts the outline there.
        result, params = client.infer(
            CLICKS, IMAGE_ID, {"foreground": [[110, 20, 0]], "background": [[140, 35, 0]], "roi": [100, 150, 10, 40, 0, 0], "result_extension": ".nrrd"}
        )
        mask = _mask(result)
        assert mask[20, 110] == 1 and mask[35, 140] == 0
        assert not (mask.astype(bool) & ~inside).any() and mask.sum() > 0.8 * inside.sum()
        # No box: the whole image (this stand-in calls everything lesion).
        result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": [[110, 20, 0]], "background": [], "roi": [], "result_extension": ".nrrd"})
        assert _mask(result).all() and params["box"] is None
    finally:
        publish_model(root / "crafted.pt", root / "model")


@pytest.mark.parametrize(
    ("roi", "why"),
    [
        ([170, 200, 10, 40, 0, 0], "outside the 160x90 image"),
        ([10, 40, 100, 150, 0, 0], "outside the 160x90 image"),  # rows and columns swapped
        ([30, 30, 10, 40, 0, 0], "too small"),
        ([float("nan"), 60, 10, 40, 0, 0], "not finite"),
        ([10, 60, 10], "expected [i0, i1, j0, j1, k0, k1]"),
        ([10, "a", 10, 40, 0, 0], "not numeric"),
    ],
)
def test_a_bad_roi_gets_a_422_naming_the_problem_and_the_server_keeps_serving(served, roi, why):
    from monailabel.client.client import MONAILabelClientException

    client, *_ = served
    with pytest.raises(MONAILabelClientException) as e:
        client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "roi": roi, "result_extension": ".nrrd"})
    assert "422" in str(e.value) and why in str(e.value)
    result, _ = client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "roi": [100, 150, 10, 40, 0, 0], "result_extension": ".nrrd"})
    assert _mask(result).shape == (90, 160)


def test_the_next_click_corrects_the_last_outline_of_the_same_client_and_image(served):
    """Slicer sends the clicks so far: when they extend the last request's, the network gets the
    outline it answered then (params ``previous``: "reused"); another client, another image or a
    sequence that does not extend starts from the automatic outline."""
    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor

    _, image, ckpt, *_ = served
    me, other = _client(served, "me"), _client(served, "someone-else")
    a, b, c = [120, 30, 0], [100, 40, 0], [60, 20, 0]

    def ask(client, image_id, fg):
        result, params = client.infer(CLICKS, image_id, {"foreground": fg, "background": [], "roi": [], "result_extension": ".nrrd"})
        return _mask(result), params["previous"]

    first, how = ask(me, IMAGE_ID, [a])
    assert how == "automatic"
    second, how = ask(me, IMAGE_ID, [a, b])
    assert how == "reused"
    # What the network was given is the first answer, not the automatic outline.
    local = Predictor(ckpt, device="cpu")
    img = read_image(image)
    from_first = local.predict_clicks(img, [(30, 120), (40, 100)], previous=first).mask
    from_auto = local.predict_clicks(img, [(30, 120), (40, 100)], previous=local.predict([img])[0].mask).mask
    assert not np.array_equal(from_first, from_auto), "the previous outline must change the answer for this check to mean anything"
    np.testing.assert_array_equal(second, from_first)
    # Nothing shared across clients or images.
    assert ask(other, IMAGE_ID, [a, b, c])[1] == "automatic"
    assert ask(me, OTHER_ID, [a, b, c])[1] == "automatic"
    # ... and neither replaced this client's outline of this image.
    assert ask(me, IMAGE_ID, [a, b, c])[1] == "reused"
    # A click deleted or moved: afresh; the same clicks again: afresh.
    assert ask(me, IMAGE_ID, [a, c])[1] == "automatic"
    assert ask(me, IMAGE_ID, [a, c])[1] == "automatic"
    # Run's answer is remembered too: the first click after it corrects it without redoing it.
    runner = _client(served, "runner")
    runner.infer("attention_unet", IMAGE_ID, {"result_extension": ".nrrd"})
    assert ask(runner, IMAGE_ID, [a])[1] == "reused"


def test_a_model_that_takes_no_clicks_answers_409_from_the_click_model(served):
    """An older checkpoint (no click channels) served by the app: the click model says why, the
    automatic model still answers."""
    from monailabel.client.client import MONAILabelClientException

    from busi_monai.model.networks import build_network
    from busi_monai.serve import publish_model
    from busi_monai.training.recipes import get_recipe

    client, _, _, root, _ = served
    recipe = get_recipe("fast").with_overrides(image_size=64)
    _publish(root, build_network(recipe.network).eval(), recipe, "no_clicks")
    try:
        with pytest.raises(MONAILabelClientException) as e:
            client.infer(CLICKS, IMAGE_ID, {"foreground": [[120, 30, 0]], "result_extension": ".nrrd"})
        assert "409" in str(e.value) and "takes no clicks" in str(e.value)
        result, _ = client.infer("attention_unet", IMAGE_ID, {"result_extension": ".nrrd"})
        assert _mask(result).shape == (90, 160)
    finally:
        publish_model(root / "crafted.pt", root / "model")


def test_a_click_model_without_the_previous_outline_is_served_as_before(served):
    """An older click checkpoint (``+clicks``, no previous-outline channel): its answer is the
    clicks' alone, and no outline is carried over."""
    import torch

    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.model.networks import build_network
    from busi_monai.serve import publish_model
    from busi_monai.training.recipes import get_recipe

    _, image, _, root, _ = served
    client = _client(served, "older")
    recipe = get_recipe("interactive").with_overrides(image_size=64, network="fast+clicks")
    torch.manual_seed(1)
    _publish(root, build_network(recipe.network).eval(), recipe, "clicks_only")
    try:
        local = Predictor(load_checkpoint(root / "clicks_only.pt"), device="cpu")
        assert local.takes_clicks and not local.takes_previous
        img = read_image(image)
        for fg in ([[120, 30, 0]], [[120, 30, 0], [100, 40, 0]]):
            result, params = client.infer(CLICKS, IMAGE_ID, {"foreground": fg, "result_extension": ".nrrd"})
            assert params["previous"] == "none"
            np.testing.assert_array_equal(_mask(result), local.predict_clicks(img, [(p[1], p[0]) for p in fg]).mask)
    finally:
        publish_model(root / "crafted.pt", root / "model")
