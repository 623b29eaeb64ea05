"""The MONAI bundle export: layout, MONAI's own verifiers, self-contained inference equal to
``busi-monai infer``, TorchScript, train/evaluate configs, and reading a bundle back."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from masks import assert_masks_agree, assert_outlines, dice, dice_range  # noqa: E402

# Lesion Dice asked of the session's model (it learns to above 0.4 on unseen images; 0.6-0.9 on
# the images used here where measured): far above an empty, full or untrained model's mask.
MIN_DICE = 0.4
# MONAI's published schema, kept in the repository so that the check runs offline (see its README).
SCHEMA = Path(__file__).resolve().parent / "data" / "monai-bundle" / "meta_schema_20240725.json"

# Run `python -m monai.bundle ...` with busi_monai (and scipy/scikit-image/itk, which the bundle
# must not need) made unimportable, from outside the repository.
_BLOCKED_RUNNER = r"""
import importlib.abc, runpy, sys
BLOCKED = ("busi_monai", "scipy", "skimage", "itk")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the self-containment test)", name=name)
        return None
sys.meta_path.insert(0, _Block())
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def monai_bundle(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUNNER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"monai.bundle {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _images(sample_dir: Path, per_class: int = 3) -> list[Path]:
    out = []
    for cls in ("benign", "malignant", "normal"):
        out += sorted(p for p in (sample_dir / cls).glob("*.png") if "_mask" not in p.name)[:per_class]
    return out


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory) -> Path:
    # Shape of `busi-monai evaluate`'s metrics.json; the numbers are test inputs, not results.
    p = tmp_path_factory.mktemp("metrics") / "metrics.json"
    p.write_text(json.dumps({"n_images": 3, "lesion": {"dice": 0.5, "iou": 0.25}, "pixel_accuracy": 0.75, "split": "test"}))
    return p


@pytest.fixture(scope="module")
def bundle(trained_model, metrics_file, tmp_path_factory) -> Path:
    from busi_monai.cli import main

    out = tmp_path_factory.mktemp("bundles") / "busi_attention_unet"
    assert main(["export-bundle", "--model", str(trained_model), "--out", str(out), "--version", "0.2.0", "--metrics", str(metrics_file)]) == 0
    return out


@pytest.fixture(scope="module")
def image_dir(sample_dir, tmp_path_factory) -> Path:
    """A flat folder of PNGs (BUSI names with spaces and parentheses) plus one 2D NIfTI."""
    from busi_monai.data.io import read_image, write_array

    d = tmp_path_factory.mktemp("images")
    imgs = _images(sample_dir)
    for p in imgs:
        shutil.copy(p, d / p.name)
    im = read_image(imgs[0])
    write_array(im.array, d / "as_nifti.nii.gz", like=im)
    return d


def _truth(sample_dir: Path, image: Path) -> np.ndarray | None:
    """The sample image's lesion mask (all its mask files), by file name; None if not a sample image."""
    from busi_monai.data.io import read_masks_union

    cls = image.name.split(" ")[0]
    masks = sorted((sample_dir / cls).glob(f"{image.stem}_mask*.png")) if (sample_dir / cls).is_dir() else []
    return read_masks_union(masks) if masks else None


def _load_bundle_scripts(bundle: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"_bundle_scripts_{name}", bundle / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layout_metadata_and_docs(bundle, trained_model):
    from busi_monai.model.checkpoint import load_checkpoint

    for rel in (
        "LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
        "models/model.pt", "models/model.ts", "scripts/__init__.py", "scripts/networks.py", "scripts/transforms.py",
        "docs/README.md",
    ):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    ck = load_checkpoint(trained_model)
    size = ck["preprocessing"]["image_size"]
    assert meta["schema"].endswith("/0.8.1/meta_schema_20240725.json") and meta["version"] == "0.2.0"
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [size, size] and image["value_range"] == [0, 1]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1
    assert any("Data in Brief 28 (2020) 104863" in r for r in meta["references"])
    assert meta["eval_metrics"]["lesion_mean_dice"] == 0.5
    readme = (bundle / "docs" / "README.md").read_text()
    assert "| lesion_mean_dice | 0.5000 |" in readme and "{{" not in readme
    assert "Apache" in (bundle / "LICENSE").read_text() and "BUSI" in (bundle / "LICENSE").read_text()
    # One definition of the network: the bundle's copy is busi_monai/model/networks.py verbatim.
    assert (bundle / "scripts" / "networks.py").read_text().endswith((REPO / "busi_monai" / "model" / "networks.py").read_text())
    # model.pt is a plain state_dict.
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(state) == {k for k in ck["state_dict"] if not k.startswith("aux_heads.")}


def test_bundle_says_whether_its_train_config_reproduces_its_weights(bundle, trained_model, tmp_path):
    """train.json is MONAI's SupervisedTrainer with the paper's recipe (it must run without
    busi-monai); weights trained otherwise are not reproduced by it, and the bundle says so."""
    from busi_monai.bundle.export import export_bundle
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.training.recipes import get_recipe

    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["loss"]["_target_"] == "torch.nn.BCEWithLogitsLoss"
    assert train["lr_scheduler"]["_target_"] == "torch.optim.lr_scheduler.ExponentialLR"
    assert not [t for t in json.dumps(train["preprocessing"]).split('"') if t.startswith("Rand")], "no augmentation"
    ck = load_checkpoint(trained_model)
    assert ck["recipe"]["loss"] == "dice_bce"  # the session's model: not the paper's recipe
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())["busi_monai"]["train_json"]
    assert meta["reproduces_these_weights"] is False and f"--preset {ck['preset']}" in meta["these_weights_were_trained_by"]
    readme = (bundle / "docs" / "README.md").read_text()
    assert "does not reproduce these weights" in readme and f"busi-monai train --preset {ck['preset']}" in readme

    paper = {**ck, "preset": "paper", "recipe": get_recipe("paper").with_overrides(image_size=ck["recipe"]["image_size"], epochs=7).to_dict()}
    out = export_bundle(paper, tmp_path / "paper_bundle")
    assert json.loads((out / "configs" / "metadata.json").read_text())["busi_monai"]["train_json"]["reproduces_these_weights"] is True
    assert "does not reproduce" not in (out / "docs" / "README.md").read_text()
    assert json.loads((out / "configs" / "train.json").read_text())["epochs"] == 7


def test_export_without_metrics_says_not_measured(trained_model, tmp_path):
    from busi_monai.bundle.export import export_bundle

    out = export_bundle(trained_model, tmp_path / "b")
    assert "not measured" in (out / "docs" / "README.md").read_text()
    assert json.loads((out / "configs" / "metadata.json").read_text())["eval_metrics"] == {}


def test_monai_verifiers(bundle, tmp_path):
    meta = str(bundle / "configs" / "metadata.json")
    monai_bundle("verify_metadata", "--meta_file", meta, "--filepath", str(SCHEMA), cwd=tmp_path)
    # As in the Model Zoo, from the bundle's root: `scripts` is imported from the working directory.
    monai_bundle(
        "verify_net_in_out", "--net_id", "network_def", "--meta_file", meta,
        "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle), cwd=bundle,
    )


def test_bundle_inference_equals_busi_monai_infer(bundle, trained_model, image_dir, sample_dir, tmp_path):
    from busi_monai.cli import main
    from busi_monai.data.io import read_mask
    from busi_monai.inference.predictor import Predictor

    out = tmp_path / "bundle_out"
    monai_bundle(
        "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
        "--dataset_dir", str(image_dir), "--output_dir", str(out), cwd=tmp_path,
    )
    images = sorted(p for p in image_dir.iterdir() if p.suffix in (".png", ".gz"))
    ref = tmp_path / "infer_out"
    assert main(["infer", "--model", str(trained_model), "--out", str(ref), "--device", "cpu", "--format", ".png", *map(str, images)]) == 0
    local = Predictor(trained_model, device="cpu").predict(images)
    dices = []
    for p, pred in zip(images, local):
        stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
        ours = read_mask(out / f"{stem}_mask.png")
        theirs = read_mask(ref / f"{stem}_mask.png")
        assert ours.shape == theirs.shape, p.name
        # Two processes, two batch sizes: equal up to pixels at the threshold.
        assert_masks_agree(ours, theirs, pred.probability, what=f"{p.name}: bundle and busi-monai infer")
        truth = _truth(sample_dir, p)
        if truth is not None and truth.any():
            dices.append(dice(ours, truth))
    # The masks compared outline the lesions: not an empty or random model's.
    assert len(dices) >= 6 and float(np.mean(dices)) > MIN_DICE, dices


def test_bundle_nifti_output(bundle, trained_model, image_dir, sample_dir, tmp_path):
    from busi_monai.data.io import read_image
    from busi_monai.inference.predictor import Predictor

    out = tmp_path / "nii_out"
    monai_bundle(
        "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
        "--dataset_dir", str(image_dir), "--output_dir", str(out), "--output_ext", ".nii.gz", cwd=tmp_path,
    )
    src = read_image(image_dir / "as_nifti.nii.gz")
    mask = read_image(out / "as_nifti_mask.nii.gz")
    assert mask.shape == src.shape and set(np.unique(mask.array).tolist()) == {0.0, 1.0}
    # The NIfTI is the first PNG's pixels: the model's mask of that image, which outlines its lesion.
    first = _images(sample_dir)[0]
    assert_outlines(mask.array, _truth(sample_dir, first), MIN_DICE, what="as_nifti.nii.gz")
    local = Predictor(trained_model, device="cpu").predict([src])[0]
    assert_masks_agree(mask.array, local.mask, local.probability, what="as_nifti.nii.gz: bundle and Predictor")


def test_bundle_probability_equals_predictor(bundle, trained_model, image_dir):
    """Before any threshold: the bundle's preprocessing, network and inverse resize give
    Predictor's probability map (same orientation, same interpolation) to float precision."""
    from monai.bundle import ConfigParser
    from monai.transforms import Activationsd, Invertd

    from busi_monai.inference.predictor import Predictor

    sys.path.insert(0, str(bundle))
    try:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        parser["device"] = "$torch.device('cpu')"
        pre = parser.get_parsed_content("preprocessing")
        net = parser.get_parsed_content("network").eval()
        net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
        inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
        images = sorted(p for p in image_dir.iterdir() if p.suffix in (".png", ".gz"))
        preds = Predictor(trained_model, device="cpu").predict(images)
        for p, ref in zip(images, preds):
            d = pre({"image": str(p)})
            with torch.no_grad():
                d["pred"] = net(d["image"][None])[0]
            d = inv(Activationsd(keys="pred", sigmoid=True)(d))
            prob = np.asarray(d["pred"][0]).T  # MONAI (x, y) -> busi-monai (row, col)
            assert prob.shape == ref.probability.shape, p.name
            np.testing.assert_allclose(prob, ref.probability, atol=1e-5, err_msg=p.name)
    finally:
        sys.path.remove(str(bundle))
        for m in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[m]


def test_torchscript_equals_state_dict(bundle):
    from busi_monai.bundle.export import checkpoint_from_bundle
    from busi_monai.model.checkpoint import model_from_checkpoint

    net = model_from_checkpoint(checkpoint_from_bundle(bundle))
    ts = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu").eval()
    size = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"]
    torch.manual_seed(0)
    for shape in ((1, 1, *size), (3, 1, 64, 48)):
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(ts(x), net(x), rtol=1e-4, atol=1e-5)


def test_checkpoint_from_bundle_serves_predictor(bundle, trained_model, image_dir):
    from busi_monai.bundle.export import checkpoint_from_bundle
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import load_checkpoint

    ck = checkpoint_from_bundle(bundle)
    orig = load_checkpoint(trained_model)
    from busi_monai.bundle.export import CORE_KEYS

    assert set(CORE_KEYS) <= set(ck) and ck["source"] == str(bundle)
    assert ck["network"] == {**orig["network"], "deep_supervision": False}
    assert ck["preprocessing"] == orig["preprocessing"] and ck["threshold"] == orig["threshold"]
    assert ck["preset"] == orig["preset"] and ck["recipe"] == orig["recipe"]
    images = sorted(image_dir.glob("*.png"))[:3]
    a = Predictor(ck, device="cpu").predict(images)
    b = Predictor(trained_model, device="cpu").predict(images)
    # The same weights through the same code, batch and process: bit for bit.
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.probability, y.probability)
        np.testing.assert_array_equal(x.mask, y.mask)
    assert any(y.mask.any() for y in b), "every mask is empty: the comparison would be vacuous"


def test_processed_mask_transform_matches_busi_monai(bundle):
    from scipy import ndimage

    from busi_monai.inference.postprocessing import processed_mask

    ours = _load_bundle_scripts(bundle, "transforms").processed_mask
    rng = np.random.default_rng(0)
    for i in range(120):
        h, w = rng.integers(16, 80, 2)
        if i % 2:
            m = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(1, 3)) > rng.uniform(0.45, 0.6)
        else:
            m = rng.random((h, w)) < rng.uniform(0.02, 0.6)
        kw = [{}, {"min_area_fraction": 0.0, "keep_fraction": 0.0}, {"fill_holes": False}, {"min_area_fraction": 0.01}, {"largest_only": True}][i % 5]
        np.testing.assert_array_equal(ours(m.astype(np.uint8), **kw).numpy(), processed_mask(m.astype(np.uint8), **kw), err_msg=f"case {i} {kw}")
    assert ours(np.zeros((9, 9), np.uint8)).sum() == 0
    two = np.zeros((20, 20), np.uint8)
    two[2:6, 2:6], two[10:18, 10:18] = 1, 1
    assert ours(two, largest_only=True).sum() == 64 and ours(two).sum() == 80


def test_export_follows_the_recipes_largest_component_and_exports_a_click_model_as_its_automatic_outline(trained_model, tmp_path):
    from busi_monai.bundle.export import export_bundle
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.model.networks import build_network

    ck = load_checkpoint(trained_model)
    ck["recipe"] = {**ck["recipe"], "largest_component": True}
    out = export_bundle(ck, tmp_path / "largest")
    assert json.loads((out / "configs" / "inference.json").read_text())["largest_only"] is True
    plain = export_bundle(load_checkpoint(trained_model), tmp_path / "plain")
    assert json.loads((plain / "configs" / "inference.json").read_text())["largest_only"] is False
    # A click network (image + click maps + previous outline): the bundle runs it on the image
    # alone, its automatic outline, with the guidance channels empty.
    net = build_network({**ck["network"], "in_channels": 4})
    clicks = {**ck, "network": net.config.to_dict(), "state_dict": net.state_dict()}
    bundle = export_bundle(clicks, tmp_path / "clicks")
    ts = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.rand(1, 1, ck["preprocessing"]["image_size"], ck["preprocessing"]["image_size"])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), atol=1e-4, rtol=0)


def _datalist_dir(sample_dir: Path, tmp_path: Path) -> Path:
    """Images, masks and a datalist.json: 4 to train on, 2 held out (a lesion and a normal)."""
    data = tmp_path / "data"
    data.mkdir()
    items = []
    for p in _images(sample_dir, per_class=2):  # benign x2, malignant x2, normal x2
        shutil.copy(p, data / p.name)
        mask = p.with_name(p.stem + "_mask.png")
        shutil.copy(mask, data / mask.name)
        items.append({"image": p.name, "label": mask.name})
    train, held_out = [items[i] for i in (0, 2, 4, 1)], [items[i] for i in (3, 5)]
    (data / "datalist.json").write_text(json.dumps({"training": train, "validation": held_out, "test": held_out}))
    return data


def _raw_dice(csv: Path) -> dict[str, float]:
    """Per-image Dice from MONAI's MetricsSaver ``*_raw.csv`` (``filename,class0,mean`` per row)."""
    rows = [line.replace("\t", ",").rsplit(",", 2) for line in csv.read_text().splitlines() if line.strip()]
    return {Path(r[0]).name: float(r[-1]) for r in rows if r[-1] != "mean"}


def test_train_and_evaluate_configs_run(bundle, trained_model, sample_dir, tmp_path):
    """The bundle's own trainer changes the weights it starts from, and its evaluator computes the
    Dice that busi-monai computes for the shipped model on the same image (self-contained)."""
    from busi_monai.data.io import read_mask
    from busi_monai.evaluation.metrics import image_metrics
    from busi_monai.inference.predictor import Predictor

    data = _datalist_dir(sample_dir, tmp_path)
    ckpt_dir, eval_dir = tmp_path / "ckpt", tmp_path / "eval"
    common = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--ckpt_dir", str(ckpt_dir), "--image_size", "32"]
    monai_bundle("run", "--config_file", str(bundle / "configs" / "train.json"), *common, "--epochs", "2", "--output_dir", str(eval_dir), cwd=tmp_path)
    saved = torch.load(ckpt_dir / "model.pt", weights_only=True)
    shipped = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(saved) >= {k for k in shipped if not k.endswith("num_batches_tracked")}
    changed = [k for k, v in shipped.items() if v.is_floating_point() and not torch.equal(v, saved[k])]
    assert len(changed) > len(shipped) // 2, "training left the weights as they were"
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())

    # The evaluator on the shipped weights, at their own size, against busi-monai's Dice.
    files = f"['{bundle / 'configs' / 'train.json'}','{bundle / 'configs' / 'evaluate.json'}']"
    args = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--ckpt_dir", str(bundle / "models"), "--output_dir", str(eval_dir)]
    monai_bundle("run", "--config_file", files, *args, cwd=tmp_path)
    dice = _raw_dice(eval_dir / "val_mean_dice_raw.csv")
    held_out = json.loads((data / "datalist.json").read_text())["test"]
    lesion = next(it for it in held_out if read_mask(data / it["label"]).any())
    pred = Predictor(trained_model, device="cpu").predict([data / lesion["image"]])[0]
    truth = read_mask(data / lesion["label"])
    ours = image_metrics(pred.mask, truth)["dice"]
    assert_outlines(pred.mask, truth, MIN_DICE, what=lesion["image"])
    # Another process and pipeline: its Dice is ours up to the pixels at the threshold.
    lo, hi = dice_range(pred.mask, truth, pred.probability)
    assert lo - 1e-4 <= dice[lesion["image"]] <= hi + 1e-4, (dice, ours, lo, hi)


def test_app_serves_the_bundle(bundle, trained_model, sample_dir, tmp_path):
    """`--conf bundle DIR`: the MONAI Label app serves an exported bundle without any weights of
    its own, and its masks are the exported model's (MONAI Label's bundle app does the same)."""
    import itk

    from busi_monai.data.io import read_image
    from busi_monai.data.studies import build_studies
    from busi_monai.inference.predictor import Predictor
    from busi_monai.serve import MODEL_FILENAME

    sys.path.insert(0, str(REPO / "tests"))
    from app_server import AppServer

    studies = tmp_path / "studies"
    build_studies(sample_dir, studies, label_fraction=0.0)
    model_dir = tmp_path / "model"  # empty: the bundle is the only source of weights
    with AppServer(studies, model_dir, workdir=tmp_path / "server", conf={"preset": "fast", "device": "cpu", "bundle": str(bundle)},
                   env={"MONAI_LABEL_TASKS_SCORING": "false"}) as srv:  # fmt: skip
        info = srv.get("/info/")
        assert "attention_unet" in info["models"]
        assert info["busi"]["bundle"] == bundle.name and info["busi"]["model_source"] == "bundle"
        assert str(bundle.parent) not in json.dumps(info)
        client = srv.client(tmp_path / "client")
        image_id = sorted(k for k in client.datastore()["objects"] if k.startswith("malignant"))[0]
        result, params = client.infer("attention_unet", image_id, {"result_extension": ".nrrd"})
        assert params["model_source"] == "bundle"
        served = itk.array_from_image(itk.imread(result))
    local = Predictor(trained_model, device="cpu").predict([read_image(studies / f"{image_id}.nii.gz")])[0]
    assert_masks_agree(served, local.mask, local.probability, what=f"{image_id}: served from the bundle and Predictor")
    # Not a trivial all-background mask: it outlines the lesion, so the bundle's weights are used.
    from busi_monai.data.busi import load_case, scan_busi

    case = next(c for c in scan_busi(sample_dir, check_readable=False)[0] if c.id == image_id)
    assert_outlines(served, load_case(case)[1], MIN_DICE, what=image_id)
    assert not (model_dir / MODEL_FILENAME).exists()


def _gate_between(tops: list[float]) -> float:
    """A gate in the widest gap between the middle half of the images' top probabilities:
    some images pass it and some do not, and float noise cannot move one across it."""
    t = sorted(tops)
    lo, hi = max(1, len(t) // 4), min(len(t) - 1, len(t) - len(t) // 4)
    k = max(range(lo, hi + 1), key=lambda i: t[i] - t[i - 1])
    return (t[k - 1] + t[k]) / 2


@pytest.fixture(scope="module")
def cv_dir(trained_model, image_dir, tmp_path_factory) -> tuple[Path, float]:
    """Two "folds" (the trained model and a perturbed copy) whose recipe asks for flip TTA, and
    the confidence gate they carry: derived from the ensemble's own probabilities on the test
    images, so that it empties some of their masks and not others, whatever the model learnt."""
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import atomic_torch_save, load_checkpoint

    d = tmp_path_factory.mktemp("cv")
    base = load_checkpoint(trained_model)
    g = torch.Generator().manual_seed(0)
    folds = []
    for i in range(2):
        state = {k: (v + 0.1 * v.std() * torch.randn(v.shape, generator=g) if i and v.is_floating_point() and v.numel() > 1 else v) for k, v in base["state_dict"].items()}
        folds.append({**base, "state_dict": state, "recipe": {**base["recipe"], "tta": True}})
    from busi_monai.data.io import read_image

    images = [read_image(p) for p in sorted(image_dir.glob("*.png"))]
    tops = Predictor(folds, device="cpu", confidence_gate=0).predict_small(images).flatten(1).amax(1).tolist()
    gate = _gate_between(tops)
    for i, ck in enumerate(folds):
        (d / f"fold{i}").mkdir()
        atomic_torch_save({**ck, "network": {**ck["network"], "confidence_gate": gate}}, d / f"fold{i}" / "model.pt")
    return d, gate


def test_ensemble_bundle_equals_busi_monai_infer(cv_dir, image_dir, sample_dir, tmp_path):
    """A cross-validation dir exports as one averaged network (folds x flips) whose bundle masks,
    TorchScript and read-back Predictor all equal `busi-monai infer --model CV_DIR`."""
    cv_dir, gate = cv_dir
    from busi_monai.bundle.export import checkpoint_from_bundle
    from busi_monai.cli import main
    from busi_monai.data.io import read_image, read_mask
    from busi_monai.inference.predictor import Predictor

    bundle = tmp_path / "busi_ensemble"
    assert main(["export-bundle", "--model", str(cv_dir), "--out", str(bundle)]) == 0
    infer_cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    assert infer_cfg["network_def"] == {"_target_": "scripts.networks.build_averaged", "preset": "@network_config", "members": 2, "flips": True}
    assert infer_cfg["network_config"]["confidence_gate"] == pytest.approx(gate)
    assert "flipped" in (bundle / "docs" / "README.md").read_text()

    out = tmp_path / "bundle_out"
    monai_bundle(
        "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
        "--dataset_dir", str(image_dir), "--output_dir", str(out), cwd=tmp_path,
    )
    images = sorted(image_dir.glob("*.png"))
    ref = tmp_path / "infer_out"
    assert main(["infer", "--model", str(cv_dir), "--out", str(ref), "--device", "cpu", "--format", ".png", *map(str, images)]) == 0
    outlined = 0
    # The ensemble's (gated) probabilities: the masks of both processes agree up to the threshold.
    direct = Predictor(cv_dir, device="cpu")
    probs = [pred.probability for pred in direct.predict(images)]
    for p, prob in zip(images, probs):
        ours, theirs = read_mask(out / f"{p.stem}_mask.png"), read_mask(ref / f"{p.stem}_mask.png")
        assert_masks_agree(ours, theirs, prob, what=f"{p.name}: ensemble bundle and busi-monai infer")
        outlined += int(theirs.any())
    assert outlined > 0, "every mask is empty: the comparison would be vacuous"
    # The averaging is in use: the ensemble's probabilities are not one fold's.
    arrays = [read_image(p) for p in images]
    single = Predictor(cv_dir / "fold0" / "model.pt", device="cpu", tta=False, confidence_gate=0).predict_small(arrays)
    ensemble = Predictor(cv_dir, device="cpu", confidence_gate=0).predict_small(arrays)
    assert (single - ensemble).abs().max() > 1e-3, "the ensemble gave one fold's probabilities"
    # The gate judged the ensemble's mean: the images whose top mean probability is below it, and
    # only those, have no outline.
    tops = ensemble.flatten(1).amax(1)
    emptied = {p.name for p in images if not read_mask(ref / f"{p.stem}_mask.png").any()}
    assert {p.name for p, t in zip(images, tops) if t < gate} <= emptied
    assert 0 < len(emptied) < len(images), emptied

    served = Predictor(checkpoint_from_bundle(bundle), device="cpu")
    assert len(served.models) == 2 and served.tta
    for a, b in zip(served.predict(images[:3]), direct.predict(images[:3])):
        np.testing.assert_array_equal(a.probability, b.probability)

    # The bundle's evaluator scores the shipped ensemble.
    eval_dir = tmp_path / "eval"
    files = f"['{bundle / 'configs' / 'train.json'}','{bundle / 'configs' / 'evaluate.json'}']"
    monai_bundle("run", "--config_file", files, "--bundle_root", str(bundle), "--dataset_dir", str(_datalist_dir(sample_dir, tmp_path)), "--output_dir", str(eval_dir), cwd=tmp_path)
    assert (eval_dir / "val_mean_dice_raw.csv").is_file()

    ts = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), direct.averaged(x).numpy(), atol=1e-5)


def test_train_json_reproduces_only_the_papers_recipe():
    """The bundle says whether its train.json (MONAI's SupervisedTrainer, paper recipe) trains
    what the weights were trained with; any other optimiser, sampler or loss says no."""
    from busi_monai.bundle.export import train_json_reproduces
    from busi_monai.training.recipes import get_recipe

    assert train_json_reproduces(get_recipe("paper").to_dict())
    assert train_json_reproduces(get_recipe("fast").to_dict())  # the same recipe on the small network
    for preset in ("best", "full", "interactive"):
        assert not train_json_reproduces(get_recipe(preset).to_dict()), preset
    for change in ({"sampler": "foreground"}, {"optimizer": "sgd_nesterov"}, {"pad_square": True}):
        assert not train_json_reproduces(get_recipe("paper").with_overrides(**change).to_dict()), change


def test_mask_agreement_allows_differences_only_at_the_threshold():
    """tests/masks.py, which the comparisons above rely on: a pixel at the threshold may land on
    either side; one far from it, many at it, or probabilities apart are real differences."""
    rng = np.random.default_rng(0)
    prob = rng.random((40, 50))
    prob[10, 10], prob[20, 20] = 0.5 + 2e-4, 0.5 - 5e-4
    mask = (prob > 0.5).astype(np.uint8)
    flipped = mask.copy()
    flipped[10, 10], flipped[20, 20] = 0, 1
    assert_masks_agree(mask, flipped, prob, prob_b=prob + 1e-6)
    assert_masks_agree(mask[None] * 255, flipped, prob)  # a single-slice volume, 0/255
    far = mask.copy()
    far[0, 0] = 1 - far[0, 0]
    with pytest.raises(AssertionError, match="differ at 1 pixels whose probability is more than"):
        assert_masks_agree(mask, far, prob)
    with pytest.raises(AssertionError, match="whose probability is more than"):
        assert_masks_agree(mask, np.zeros_like(mask), prob)  # an empty mask
    near = np.full((40, 50), 0.5)
    with pytest.raises(AssertionError, match="more than 0.1%"):
        assert_masks_agree(np.ones((40, 50)), np.zeros((40, 50)), near)
    with pytest.raises(AssertionError, match="probabilities differ"):
        assert_masks_agree(mask, mask, prob, prob_b=prob + 2e-3)
    truth = np.zeros((40, 50), np.uint8)
    truth[5:15, 5:15] = 1
    with pytest.raises(AssertionError, match="empty mask"):
        assert_outlines(np.zeros_like(truth), truth, 0.4)
    lo, hi = dice_range(truth, truth, np.where(truth, 0.9, 0.1))
    assert lo == hi == 1.0
