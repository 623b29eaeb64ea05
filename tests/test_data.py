"""Tests of busi_monai.data on the real BUSI copy (beside the repository, in ../shared/busi)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUSI_ROOT as BUSI  # noqa: E402  (BUSI_ROOT, or ../shared/busi beside the repository)
from PIL import Image

from busi_monai.data.busi import scan_busi
from busi_monai.data.duplicates import find_duplicate_groups
from busi_monai.data.io import read_image, read_mask
from busi_monai.data.prepare import prepare
from busi_monai.data.splits import group_class, grouped_stratified_split
from busi_monai.data.studies import make_studies

needs_busi = pytest.mark.skipif(not (BUSI / "benign").is_dir(), reason=f"real BUSI copy not found at {BUSI} (set BUSI_ROOT)")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    if not (BUSI / "benign").is_dir():
        pytest.skip(f"real BUSI copy not found at {BUSI}")
    out = tmp_path_factory.mktemp("busi-prepared")
    summary = prepare(BUSI, out, test_fraction=0.2, seed=0, progress=False)
    return out, summary


@needs_busi
def test_scan_real_busi():
    cases, problems = scan_busi(BUSI, check_readable=False)
    assert problems == []
    counts = Counter(c.cls for c in cases)
    assert counts == {"benign": 350, "malignant": 167, "normal": 107}
    c195 = next(c for c in cases if c.id == "benign_0195")
    assert [p.name for p in c195.masks] == ["benign (195)_mask.png", "benign (195)_mask_1.png", "benign (195)_mask_2.png"]
    assert c195.source == "benign/benign (195).png"


@needs_busi
@pytest.mark.slow  # prepares all 624 images (duplicate search included)
def test_prepare_dataset_json_schema(prepared):
    out, summary = prepared
    dl = json.loads((out / "dataset.json").read_text())
    assert set(dl) >= {"name", "description", "labels", "training", "test"}
    assert dl["labels"] == {"background": 0, "lesion": 1}
    entries = dl["training"] + dl["test"]
    assert len(entries) == 624 == summary["images"]
    for e in entries:
        assert set(e) >= {"image", "label", "class", "group", "source", "n_masks"}
        assert e["image"].startswith("images/") and e["image"].endswith(".nii.gz")
        assert e["label"].startswith("labels/") and e["label"].endswith(".nii.gz")
        assert (out / e["image"]).is_file() and (out / e["label"]).is_file()
        assert (BUSI / e["source"]).is_file()
        assert e["class"] in ("benign", "malignant", "normal")
    assert len({e["image"] for e in entries}) == 624
    assert summary["images_per_class"] == {"benign": 350, "malignant": 167, "normal": 107}
    assert summary["images_with_merged_masks"] == 16
    assert summary["problems"] == []
    dups = json.loads((out / "duplicates.json").read_text())
    assert len(dups["groups"]) == summary["duplicate_groups"] > 50
    for g in dups["groups"]:
        assert len(g["ids"]) >= 2 and len(g["links"]) >= len(g["ids"]) - 1
        assert all(l["detector"] in ("thumbnail", "resized", "template") for l in g["links"])


@needs_busi
@pytest.mark.slow  # prepares all 624 images (duplicate search included)
def test_split_keeps_groups_together_and_is_stratified(prepared):
    out, summary = prepared
    dl = json.loads((out / "dataset.json").read_text())
    train_groups = {e["group"] for e in dl["training"]}
    test_groups = {e["group"] for e in dl["test"]}
    assert not train_groups & test_groups
    for cls, n in summary["images_per_class"].items():
        n_test = sum(1 for e in dl["test"] if e["class"] == cls)
        assert abs(n_test / n - 0.2) < 0.03, (cls, n_test, n)
    # the ids of every duplicate group are on one side
    side = {Path(e["image"]).name: s for s in ("training", "test") for e in dl[s]}
    for g in json.loads((out / "duplicates.json").read_text())["groups"]:
        assert len({side[f"{i}.nii.gz"] for i in g["ids"]}) == 1


@needs_busi
@pytest.mark.slow  # prepares all 624 images (duplicate search included)
def test_multi_mask_is_union_and_geometry_matches(prepared):
    out, _ = prepared
    label = nib.load(out / "labels" / "benign_0195.nii.gz")
    image = nib.load(out / "images" / "benign_0195.nii.gz")
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine)
    lab = np.asarray(label.dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    # nibabel gives (x, y) = (W, H); compare with the PNG masks in (H, W)
    lab_hw = lab.T if lab.ndim == 2 else lab[..., 0].T
    masks = [read_mask(BUSI / "benign" / f"benign (195){s}.png") for s in ("_mask", "_mask_1", "_mask_2")]
    union = np.maximum.reduce(masks)
    np.testing.assert_array_equal(lab_hw, union)
    assert all(union.sum() > m.sum() for m in masks)
    img_hw = np.asarray(image.dataobj).T
    np.testing.assert_array_equal(img_hw.astype(np.float32), read_image(BUSI / "benign" / "benign (195).png").array)


@needs_busi
@pytest.mark.slow  # prepares all 624 images (duplicate search included)
def test_make_studies_from_prepared(prepared, tmp_path):
    out, _ = prepared
    small = tmp_path / "small"
    (small / "images").mkdir(parents=True)
    (small / "labels").mkdir()
    dl = json.loads((out / "dataset.json").read_text())
    keep = dl["training"][:3]
    for e in keep:
        shutil.copy(out / e["image"], small / e["image"])
        shutil.copy(out / e["label"], small / e["label"])
    (small / "dataset.json").write_text(json.dumps({**dl, "training": keep, "test": []}))
    s = make_studies(small, tmp_path / "studies", with_labels=True)
    assert s["source_kind"] == "prepared" and s["images"] == 3 and s["labels"] == 3
    for e in keep:
        name = Path(e["image"]).name
        img = nib.load(tmp_path / "studies" / name)
        lab = nib.load(tmp_path / "studies" / "labels" / "final" / name)
        assert img.shape == lab.shape
        np.testing.assert_allclose(img.affine, lab.affine)


def _numbers(cls: str, k: int) -> list[int]:
    """The first ``k`` case numbers of ``cls`` present in the copy (some are held out)."""
    nums = sorted(int(p.name.split("(")[1].split(")")[0]) for p in (BUSI / cls).glob(f"{cls} (*).png") if "_mask" not in p.name)
    return nums[:k]


def _copy_case(dst_root: Path, cls: str, num: int):
    for p in (BUSI / cls).glob(f"{cls} ({num})*.png"):
        (dst_root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst_root / cls / p.name)


@needs_busi
def test_bad_inputs_are_reported_and_rest_prepared(tmp_path):
    root = tmp_path / "busi"
    m1, m2 = _numbers("malignant", 2)
    (n1,) = _numbers("normal", 1)
    for cls, num in [("benign", 1), ("benign", 2), ("benign", 3), ("malignant", m1), ("malignant", m2), ("normal", n1)]:
        _copy_case(root, cls, num)
    # mask without image
    shutil.copy(BUSI / "benign" / "benign (4)_mask.png", root / "benign" / "benign (999)_mask.png")
    # corrupt PNG
    (root / "benign" / "benign (2).png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    # mask of another size
    bad_mask = root / "malignant" / f"malignant ({m1})_mask.png"
    m = Image.open(bad_mask)
    m.resize((m.width // 2, m.height // 2)).save(bad_mask)
    # image without mask (another real normal image, copied without its mask)
    extra = BUSI / "normal" / f"normal ({_numbers('normal', 2)[1]}).png"
    shutil.copy(extra, root / "normal" / extra.name)

    cases, problems = scan_busi(root)
    text = "\n".join(problems)
    assert "benign (999)_mask.png" in text and "without image" in text
    assert "benign (2).png" in text
    assert bad_mask.name in text and "does not match" in text
    assert extra.name in text and "without mask" in text
    kept = sorted(["benign_0001", "benign_0003", f"malignant_{m2:04d}", f"normal_{n1:04d}"])
    assert sorted(c.id for c in cases) == kept

    out = tmp_path / "out"
    summary = prepare(root, out, progress=False)
    assert summary["images"] == 4
    ptext = "\n".join(summary["problems"])
    for name in ("benign (999)_mask.png", "benign (2).png", bad_mask.name, extra.name):
        assert name in ptext
    dl = json.loads((out / "dataset.json").read_text())
    assert sorted(Path(e["image"]).name for e in dl["training"] + dl["test"]) == [f"{k}.nii.gz" for k in kept]
    # re-runnable: a second run replaces the first cleanly
    summary2 = prepare(root, out, progress=False)
    assert summary2["images"] == 4
    assert len(list((out / "images").iterdir())) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # studies from the BUSI layout
    s = make_studies(root, tmp_path / "studies", with_labels=True)
    assert s["source_kind"] == "busi" and s["images"] == 4 and s["labels"] == 4
    assert (tmp_path / "studies" / "labels" / "final" / "benign_0001.nii.gz").is_file()


@needs_busi
def test_duplicate_detection_crop_shift_resize():
    from skimage.transform import resize

    a = read_image(BUSI / "benign" / "benign (1).png").array
    h, w = a.shape
    crop = a[int(0.1 * h) : int(0.1 * h) + int(0.85 * h), int(0.05 * w) : int(0.05 * w) + int(0.85 * w)]
    shifted = np.zeros_like(a)
    shifted[23:, 37:] = a[:-23, :-37]
    resized = resize(a, (int(h * 0.8), int(w * 0.8)), anti_aliasing=True, preserve_range=True).astype(np.float32)
    other1 = read_image(BUSI / "malignant" / f"malignant ({_numbers('malignant', 1)[0]}).png").array
    other2 = read_image(BUSI / "normal" / f"normal ({_numbers('normal', 3)[2]}).png").array
    groups, links = find_duplicate_groups([a, crop, shifted, resized, other1, other2])
    assert [0, 1, 2, 3] in groups, (groups, links)
    assert [4] in groups and [5] in groups


def test_group_class_and_split_rules():
    assert group_class(["benign", "malignant", "benign"]) == "malignant"
    assert group_class(["benign", "normal", "normal"]) == "normal"
    assert group_class(["benign", "normal"]) == "benign"
    classes = ["benign"] * 50 + ["malignant"] * 25 + ["normal"] * 25
    groups = [[0, 1, 2], [50, 51], [3, 75]] + [[k] for k in range(100) if k not in (0, 1, 2, 50, 51, 3, 75)]
    train, test = grouped_stratified_split(classes, groups, 0.2, seed=1)
    assert sorted(train + test) == list(range(100))
    for g in groups:
        assert len({k in test for k in g}) == 1
    assert grouped_stratified_split(classes, groups, 0.2, seed=1) == (train, test)
    for cls, n in (("benign", 50), ("malignant", 25), ("normal", 25)):
        assert abs(sum(classes[k] == cls for k in test) - 0.2 * n) <= 2
