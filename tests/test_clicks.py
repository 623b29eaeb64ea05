"""Click-guided segmentation wired through the package: the ``+clicks`` network, the trainer's
simulated clicks, ``Predictor.predict_clicks`` (clicks in the image's own pixels), ``evaluate
--clicks`` and ``infer --foreground``. The network is replaced by one that draws a disc around
each foreground click where a test checks the plumbing (coordinates, scaling, the protocol), so
the verdict does not depend on how well a small model learned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from busi_monai.inference.predictor import Predictor
from busi_monai.interactive.protocol import dice
from busi_monai.model.checkpoint import make_checkpoint
from busi_monai.model.networks import build_network, network_config
from busi_monai.training.recipes import get_recipe

SIZE = 32


class DiscAroundClicks(torch.nn.Module):
    """Stands in for a click-guided network: lesion where the foreground-click map is high and the
    background-click map is not, nothing without clicks."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward_parts(self, x):
        if x.shape[1] == 1:  # no click maps given: empty ones, as the real network does
            x = torch.cat((x, torch.zeros_like(x), torch.zeros_like(x)), 1)
        fg, bg = x[:, 1:2], x[:, 2:3]
        return 40.0 * (fg - bg - 0.3), []

    def forward(self, x):
        return self.forward_parts(x)[0]


def _click_checkpoint(image_size: int = SIZE, preset: str = "interactive", **overrides) -> dict:
    recipe = get_recipe(preset).with_overrides(image_size=image_size, click_sigma=2.0, **overrides)
    net = build_network(network_config(recipe.network))
    return make_checkpoint(net, recipe, preset)


def _stub_predictor(**overrides) -> Predictor:
    # The whole view unless a test zooms: the stub's disc has a fixed size at the network's scale.
    overrides.setdefault("zoom_fraction", 0.0)
    p = Predictor(_click_checkpoint(**overrides), device="cpu", amp=False)
    p.models = [DiscAroundClicks(p.network.config)]
    p.averaged = p.models[0]
    return p


def test_click_network_without_clicks_is_the_automatic_model():
    torch.manual_seed(0)
    net = build_network("fast+clicks").eval()
    assert net.config.in_channels == 3 and network_config("fast+clicks-clicks").in_channels == 1
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        alone = net(x)
        with_empty_maps = net(torch.cat((x, torch.zeros(2, 2, SIZE, SIZE)), 1))
        with_a_click = net(torch.cat((x, torch.ones(2, 1, SIZE, SIZE), torch.zeros(2, 1, SIZE, SIZE)), 1))
    torch.testing.assert_close(alone, with_empty_maps)
    assert not torch.allclose(alone, with_a_click)


def test_training_batches_get_click_maps_inside_the_lesion_reproducibly(tmp_path):
    from busi_monai.data.packs import CachedData
    from busi_monai.training.loop import RunSettings, Trainer

    images = torch.rand(8, 1, SIZE, SIZE)
    labels = torch.zeros(8, 1, SIZE, SIZE)
    labels[:, :, 8:20, 10:24] = 1
    data = CachedData(images, labels, [{"id": str(i), "class": "benign"} for i in range(8)])
    recipe = get_recipe("interactive").with_overrides(image_size=SIZE, click_free_fraction=0.0, click_rounds=0, outline_first_fraction=0.0)

    def batch(seed, r=recipe):
        t = Trainer(data, data.subset([]), tmp_path / str(seed), "interactive", r, RunSettings(device="cpu", seed=seed, progress=False, amp=False))
        return t.with_clicks(images, labels)

    x = batch(0)
    assert x.shape == (8, 4, SIZE, SIZE)
    torch.testing.assert_close(x[:, :1], images)
    assert not x[:, 3].any(), "a first click from the truth comes with no previous outline"
    fg, bg = x[:, 1], x[:, 2]
    peaks = fg.flatten(1).argmax(1)
    rows, cols = peaks // SIZE, peaks % SIZE
    assert bool(((rows >= 8) & (rows < 20) & (cols >= 10) & (cols < 24)).all()), "a first click lands inside the lesion"
    assert float(fg.amax()) == pytest.approx(1.0) and float(bg.amax()) == 0.0
    torch.testing.assert_close(batch(0), x)
    assert not torch.equal(batch(1), x)
    # Starting from the automatic outline: the fourth channel is the model's own binary outline.
    y = batch(0, recipe.with_overrides(outline_first_fraction=1.0))
    assert set(torch.unique(y[:, 3]).tolist()) <= {0.0, 1.0} and y[:, 3].any(), "an untrained model outlines something"


def test_interactive_preset_trains_and_its_checkpoint_takes_clicks(sample_dir, tmp_path):
    from busi_monai.data.datasets import split_items
    from busi_monai.data.packs import cache_items
    from busi_monai.training.loop import fit

    data = cache_items(split_items(sample_dir, None)[:12], SIZE, progress=False)
    recipe = get_recipe("interactive").with_overrides(image_size=SIZE, epochs=1, batch_size=4)
    fit(data.subset(range(10)), data.subset([10, 11]), tmp_path, "interactive", recipe, device="cpu", progress=False, amp=False)
    p = Predictor(tmp_path / "model.pt", device="cpu")
    assert p.takes_clicks
    image = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    out = p.predict_clicks(image, foreground=[(20, 30)])
    assert out.probability.shape == (50, 70) and np.isfinite(out.probability).all()


@pytest.mark.parametrize("pad_square", [False, True])
def test_clicks_land_where_they_were_given_in_the_images_own_pixels(pad_square):
    p = _stub_predictor(pad_square=pad_square)
    image = np.zeros((120, 300), np.float32)  # not square: each axis has its own scale
    out = p.predict_clicks(image, foreground=[(90, 250)])  # (row, col)
    rows, cols = np.nonzero(out.raw_mask)
    assert rows.size, "a foreground click gives an outline"
    assert abs(rows.mean() - 90) < 6 and abs(cols.mean() - 250) < 12
    both = p.predict_clicks(image, foreground=[(90, 250)], background=[(90, 250)])
    assert not both.raw_mask.any(), "a background click on the same spot removes it"
    assert not p.predict_clicks(image).raw_mask.any()


@pytest.mark.parametrize("pad_square", [False, True])
def test_zoomed_clicks_land_where_they_were_given_and_a_box_bounds_the_outline(pad_square):
    p = _stub_predictor(pad_square=pad_square, zoom_fraction=0.5)
    assert p.zoom is not None
    image = np.zeros((120, 300), np.float32)
    out = p.predict_clicks(image, foreground=[(90, 250)])
    rows, cols = np.nonzero(out.raw_mask)
    assert rows.size and abs(rows.mean() - 90) < 3 and abs(cols.mean() - 250) < 6
    whole = _stub_predictor(pad_square=pad_square).predict_clicks(image, foreground=[(90, 250)])
    assert out.raw_mask.sum() < whole.raw_mask.sum() / 4, "zoomed in, the click's disc covers fewer of the image's pixels"
    box = (20, 40, 70, 160)  # rows 20-70, cols 40-160; the click lies outside it
    boxed = p.predict_clicks(image, foreground=[(45, 100)], box=box)
    inside = np.zeros_like(image, bool)
    inside[20:71, 40:161] = True
    assert boxed.mask[45, 100] == 1 and not boxed.mask[~inside].any()


class EchoPrevious(torch.nn.Module):
    """Stands in for a network with the previous-outline channel: it answers that channel."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward_parts(self, x):
        return 40.0 * (x[:, 3:4] - 0.5), []

    def forward(self, x):
        return self.forward_parts(x)[0]


@pytest.mark.parametrize("pad_square", [False, True])
def test_the_previous_outline_reaches_the_network_in_the_images_geometry(pad_square):
    p = Predictor(_click_checkpoint(pad_square=pad_square, zoom_fraction=0.0), device="cpu", amp=False)
    assert p.takes_previous
    p.models = [EchoPrevious(p.network.config)]
    p.averaged = p.models[0]
    previous = np.zeros((120, 300), np.uint8)
    previous[30:90, 200:280] = 1
    out = p.predict_clicks(np.zeros((120, 300), np.float32), foreground=[(60, 240)], previous=previous)
    assert dice(out.mask, previous) > 0.9  # 32 px of a 300 px wide image: a few pixels of rounding
    assert not p.predict_clicks(np.zeros((120, 300), np.float32), foreground=[(60, 240)]).raw_mask.any()


def test_a_model_without_click_channels_refuses_clicks():
    p = Predictor(_click_checkpoint(preset="fast"), device="cpu")
    assert not p.takes_clicks
    with pytest.raises(ValueError, match="does not take clicks"):
        p.predict_clicks(np.zeros((40, 40), np.float32), foreground=[(5, 5)])


def _disc_dataset(root: Path) -> Path:
    """A BUSI-layout folder of two lesion images (a disc each) and a normal one."""
    from PIL import Image

    yy, xx = np.mgrid[:96, :128]
    for cls, n, centre in (("benign", 1, (40, 50)), ("malignant", 1, (60, 90)), ("normal", 1, None)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = (np.random.default_rng(n).random((96, 128)) * 80).astype(np.uint8)
        mask = np.zeros((96, 128), np.uint8)
        if centre:
            mask[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 14**2] = 255
        Image.fromarray(img).save(root / cls / f"{cls} ({n}).png")
        Image.fromarray(mask).save(root / cls / f"{cls} ({n})_mask.png")
    return root


def test_evaluate_by_clicks_reports_dice_after_each_click_and_a_plot(tmp_path):
    from busi_monai.evaluation.evaluate import evaluate

    data = _disc_dataset(tmp_path / "busi")
    out = tmp_path / "metrics.json"
    res = evaluate(None, data, out, predictor=_stub_predictor(), clicks=3, progress=False)
    c = res["clicks"]
    assert c["images"] == 2 and c["max_clicks"] == 3 and len(c["dice_after"]) == 4
    assert c["dice_after"][0] == 0.0, "no clicks, no outline"
    assert c["dice_after"][1] > 0.5, "one click at the centre of the missed lesion outlines most of it"
    assert c["dice_after"][3] >= c["dice_after"][1]
    assert 1 <= c["noc_85"] <= 3 and [r["clicks"][0][:2] for r in c["per_image"]] in ([[40, 50], [60, 90]], [[60, 90], [40, 50]])
    written = json.loads(out.read_text())
    assert written["clicks"]["dice_after"] == c["dice_after"]
    png = out.with_suffix(".clicks.png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_by_clicks_can_start_from_another_models_automatic_outline(tmp_path):
    from busi_monai.evaluation.evaluate import evaluate
    from busi_monai.inference.predictor import Prediction

    class SmallDiscs:  # an automatic model that outlines the inner part of each lesion
        paths = ["small_discs.pt"]

        def predict(self, images):
            out = []
            for im in images:
                yy, xx = np.mgrid[: im.shape[0], : im.shape[1]]
                centre = (40, 50) if "benign" in str(im.path) else (60, 90)
                m = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 10**2).astype(np.uint8)
                m = m * ("normal" not in str(im.path))
                out.append(Prediction(m.astype(np.float32), m, m))
            return out

    data = _disc_dataset(tmp_path / "busi")
    res = evaluate(None, data, None, predictor=_stub_predictor(), clicks=2, progress=False, automatic=SmallDiscs())
    inner = np.mean([r["dice"] for r in res["per_image"] if r["class"] != "normal"])
    assert 0.55 < inner < 0.8 and res["lesion"]["dice"] == pytest.approx(inner), "the automatic metrics are the other model's"
    assert res["clicks"]["dice_after"][0] == pytest.approx(inner, abs=1e-4), "the clicks start from its outline, not from the click model's empty one"
    assert res["automatic_model"] == ["small_discs.pt"]
    with pytest.raises(ValueError, match="automatic model"):
        evaluate(None, data, None, predictor=_stub_predictor(), clicks=2, box=True, progress=False, automatic=SmallDiscs())


def test_evaluate_by_clicks_needs_a_click_model(tmp_path):
    from busi_monai.evaluation.evaluate import evaluate

    with pytest.raises(ValueError, match="click-guided"):
        evaluate(_click_checkpoint(preset="fast"), _disc_dataset(tmp_path / "busi"), clicks=2, progress=False, device="cpu")


def test_infer_clicks_on_the_command_line(tmp_path, capsys):
    from PIL import Image

    from busi_monai.cli import main
    from busi_monai.model.checkpoint import atomic_torch_save

    model = tmp_path / "clicks.pt"
    atomic_torch_save(_click_checkpoint(), model)
    image = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8)).save(image)
    rc = main(["infer", "--model", str(model), "--out", str(tmp_path / "out"), "--device", "cpu", "--foreground", "40,20", "--background", "5,5", str(image)])
    assert rc == 0 and (tmp_path / "out" / "scan_mask.png").is_file()
    mask = np.asarray(Image.open(tmp_path / "out" / "scan_mask.png"))
    assert mask.shape == (60, 80)
    assert mask[20, 40] > 0 and mask[5, 5] == 0, "X is the column, Y the row: the clicked pixel is inside, the background click outside"
    rc = main(["infer", "--model", str(model), "--out", str(tmp_path / "boxed"), "--device", "cpu", "--box", "70,50,30,10", str(image)])
    boxed = np.asarray(Image.open(tmp_path / "boxed" / "scan_mask.png")) > 0
    assert rc == 0 and not boxed[:10].any() and not boxed[51:].any() and not boxed[:, :30].any() and not boxed[:, 71:].any()
    for bad, why in ((["--box", "90,10,120,40"], "outside the 80x60 image"), (["--box", "1,2,3"], "expected X0,Y0,X1,Y1")):
        rc = main(["infer", "--model", str(model), "--out", str(tmp_path / "bad"), "--device", "cpu", *bad, str(image)])
        assert rc == 2 and why in capsys.readouterr().err
    for bad, why in ((["--foreground", "80,20"], "outside the 80x60 image"), (["--foreground", "4;5"], "expected X,Y")):
        rc = main(["infer", "--model", str(model), "--out", str(tmp_path / "bad"), "--device", "cpu", *bad, str(image)])
        assert rc == 2 and why in capsys.readouterr().err


def test_a_model_from_before_the_click_channels_starts_a_click_network_that_answers_as_it_did(tmp_path):
    from busi_monai.data.packs import CachedData
    from busi_monai.model.checkpoint import atomic_torch_save, model_from_checkpoint
    from busi_monai.training.loop import RunSettings, Trainer

    torch.manual_seed(0)
    old = _click_checkpoint(preset="fast")  # one input channel
    atomic_torch_save(old, tmp_path / "old.pt")
    data = CachedData(torch.rand(4, 1, SIZE, SIZE), torch.zeros(4, 1, SIZE, SIZE), [{"id": str(i)} for i in range(4)])
    # Batch norm both sides (the interactive preset's instance norm has no running statistics to carry over).
    recipe = get_recipe("interactive").with_overrides(image_size=SIZE, network="fast+clicks+prev")
    t = Trainer(data, data.subset([]), tmp_path / "run", "interactive", recipe, RunSettings(device="cpu", progress=False, amp=False, init_checkpoint=tmp_path / "old.pt"))
    t.restore()
    x = torch.rand(2, 1, SIZE, SIZE)
    before = model_from_checkpoint(old).eval()
    with torch.no_grad():
        torch.testing.assert_close(t.model.eval().forward_parts(x)[0], before.forward_parts(x)[0])
        clicked = t.model.forward_parts(torch.cat([x, torch.ones(2, 3, SIZE, SIZE)], 1))[0]
    assert t.model.config.in_channels == 4
    torch.testing.assert_close(clicked, before.forward_parts(x)[0])  # the new channels start at zero weight


def test_clicks_on_an_ultrasound_frame_work_in_its_scan_region_and_come_back_in_the_full_frame(tmp_path):
    from test_own_data import LEFT, TOP, us_dicom

    from busi_monai.data.io import read_image

    gray = np.random.default_rng(0).integers(0, 120, (40, 56)).astype(np.uint8)
    img = read_image(us_dicom(tmp_path / "scan.dcm", gray))
    assert img.region is not None and img.region[:2] == (TOP, LEFT)
    p = _stub_predictor()
    click = (TOP + 20, LEFT + 30)
    out = p.predict_clicks(img, foreground=[click])
    assert out.mask.shape == img.shape and out.mask[click] == 1
    top, left, h, w = img.region
    inside = np.zeros(img.shape, bool)
    inside[top : top + h, left : left + w] = True
    assert out.mask[inside].sum() > 1 and not out.mask[~inside].any(), "nothing outside the scan"
    rows, cols = np.nonzero(out.raw_mask)
    assert abs(rows.mean() - click[0]) < 3 and abs(cols.mean() - click[1]) < 3
    with pytest.raises(ValueError, match="outside the scan region"):
        p.predict_clicks(img, foreground=[(2, 2)])
