"""Grad-CAM, attention maps, the processed mask's components, and the explain/report CLIs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from busi_monai.cli import main
from busi_monai.data.datasets import load_datalist
from busi_monai.data.io import read_image, read_mask
from busi_monai.inference.postprocessing import processed_mask

EIGHT = np.ones((3, 3))


def n_components(mask: np.ndarray, structure=EIGHT) -> int:
    return int(ndimage.label(np.asarray(mask) > 0, structure=structure)[1])


@pytest.fixture(scope="module")
def predictor(trained_model):
    from busi_monai.inference.predictor import Predictor

    return Predictor(trained_model, device="cpu")


@pytest.fixture(scope="module")
def test_items(prepared_sample):
    items = load_datalist(prepared_sample)["test"]
    assert items, "the prepared sample has no test images"
    return items


@pytest.fixture(scope="module")
def lesion_items(test_items):
    out = [it for it in test_items if read_mask(it["label"]).any()]
    assert out, "the prepared sample has no lesion image in its test split"
    return out


def test_gradcam_size_range_and_localisation(predictor, lesion_items):
    from busi_monai.explain.gradcam import gradcam

    inside, outside = [], []
    for it in lesion_items:
        im = read_image(it["image"])
        heat = gradcam(predictor, im)
        assert heat.shape == im.shape
        assert heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0
        assert heat.max() > heat.min(), f"{it['image']}: constant heatmap"
        truth = read_mask(it["label"], expected_shape=im.shape) > 0
        inside.append(float(heat[truth].mean()))
        outside.append(float(heat[~truth].mean()))
    # On average over the test lesion images the evidence sits on the lesion.
    assert np.mean(inside) > np.mean(outside), (inside, outside)


def test_gradcam_layers_and_no_leftover_hooks(predictor, lesion_items):
    from busi_monai.explain.gradcam import gradcam, layer_names

    net = predictor.network
    names = layer_names(net)
    assert {"bridge", "decoders.3", "encoders.0", "gates.3"} <= set(names)
    im = read_image(lesion_items[0]["image"])
    for layer in ("decoders.3", "last_decoder", "encoders.3"):
        h = gradcam(predictor, im, layer=layer)
        assert h.shape == im.shape and np.isfinite(h).all()
    with pytest.raises(ValueError, match="unknown layer"):
        gradcam(predictor, im, layer="nope")
    # MONAI's hooks are removed again and the network is left in eval mode.
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    assert not net.training
    assert all(p.grad is None for p in net.parameters())


def test_attention_maps(predictor, lesion_items):
    from busi_monai.explain.gradcam import attention_maps

    im = read_image(lesion_items[0]["image"])
    maps = attention_maps(predictor, im)
    assert len(maps) == len(predictor.network.gates)
    for m in maps:
        assert m.shape == im.shape
        assert 0.0 <= m.min() and m.max() <= 1.0


def test_heatmap_for_file_keeps_geometry(predictor, lesion_items, tmp_path):
    import itk

    from busi_monai.explain.gradcam import heatmap_for_file

    src = lesion_items[0]["image"]
    out = heatmap_for_file(predictor, src, tmp_path / "heat.nii.gz")
    a, b = itk.imread(str(src)), itk.imread(out)
    assert itk.array_from_image(b).dtype == np.float32
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert itk.array_from_image(a).shape == itk.array_from_image(b).shape
    arr = itk.array_from_image(b)
    assert arr.min() >= 0 and arr.max() <= 1
    out8 = heatmap_for_file(predictor, src, tmp_path / "heat8.nii.gz", dtype="uint8")
    assert itk.array_from_image(itk.imread(out8)).dtype == np.uint8


def test_processed_mask_never_adds_components_on_predictions(predictor, test_items):
    images = [read_image(it["image"]) for it in test_items]
    for p in predictor.predict(images):
        assert n_components(p.mask) <= n_components(p.raw_mask)


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(8, 40), st.integers(8, 40)), elements=st.integers(0, 1)),
    min_area=st.sampled_from([0.0, 0.001, 0.01, 0.05]),
    keep=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    fill=st.booleans(),
)
def test_processed_mask_property(mask, min_area, keep, fill):
    out = processed_mask(mask, min_area_fraction=min_area, keep_fraction=keep, fill_holes=fill)
    assert out.shape == mask.shape and set(np.unique(out)) <= {0, 1}
    assert n_components(out) <= n_components(mask)
    assert n_components(out, None) <= n_components(mask, None)  # 4-connectivity too


def test_explain_cli(trained_model, lesion_items, test_items, tmp_path, capsys):
    normal = [it for it in test_items if it not in lesion_items][:1]
    chosen = lesion_items[:2] + normal
    out = tmp_path / "explain"
    args = ["explain", "--model", str(trained_model), "--out", str(out), *[it["image"] for it in chosen]]
    assert main(args + ["--labels", *[it["label"] for it in chosen]]) == 0
    figs = sorted(out.glob("*_explain.png"))
    assert len(figs) == len(chosen)
    assert len(list(out.glob("*_gradcam.nii.gz"))) == len(chosen)
    assert all(f.stat().st_size > 10_000 for f in figs)

    capsys.readouterr()
    missing = str(tmp_path / "no-such-image.png")
    rc = main(["explain", "--model", str(trained_model), "--out", str(tmp_path / "x"), chosen[0]["image"], missing])
    assert rc != 0
    err = capsys.readouterr().err
    assert "no-such-image.png" in err and "no such file" in err
    assert not list((tmp_path / "x").glob("*.png")) if (tmp_path / "x").exists() else True

    rc = main(["explain", "--model", str(trained_model), "--out", str(tmp_path / "y"), chosen[0]["image"], "--labels", chosen[0]["label"], chosen[1]["label"]])
    assert rc != 0 and "one per image" in capsys.readouterr().err


def test_report_cli(trained_model, prepared_sample, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--model", str(trained_model), "--data", str(prepared_sample), "--out", str(out), "--cases", "2"]) == 0
    md = (out / "report.md").read_text()
    assert "| class |" in md and "Dice" in md and "HD95" in md and "normal FP rate" in md and "pixel accuracy" in md
    for cls in ("benign", "malignant", "normal", "**all**"):
        assert f"| {cls} |" in md
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"training_curves.png", "cases_best.png", "cases_worst.png", "dice_vs_size.png"} <= set(refs)
    for r in refs:
        assert (out / r).is_file(), r
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()
