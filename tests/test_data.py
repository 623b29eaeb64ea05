"""Tests of busi_monai.data: near-duplicates and the leak-free split on a synthetic BUSI-layout
folder with planted copies (every machine), and on the real BUSI copy where it is present
(../shared/busi beside the repository, or BUSI_ROOT)."""

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
from busi_monai.data.splits import group_class, grouped_stratified_folds, grouped_stratified_split, validation_rows
from busi_monai.data.studies import make_studies
from busi_monai.data.synth import synthesize, synthesize_with_duplicates

needs_busi = pytest.mark.skipif(not (BUSI / "benign").is_dir(), reason=f"real BUSI copy not found at {BUSI} (set BUSI_ROOT)")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    if not (BUSI / "benign").is_dir():
        pytest.skip(f"real BUSI copy not found at {BUSI}")
    out = tmp_path_factory.mktemp("busi-prepared")
    summary = prepare(BUSI, out, test_fraction=0.2, seed=0, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """18 distinct synthetic scans and 8 planted near-duplicates of 8 of them (cropped, shifted,
    resized, JPEG, other PNG mode, brightness), lesion copies filed under the other class."""
    root = tmp_path_factory.mktemp("planted") / "busi"
    info = synthesize_with_duplicates(root, 18, seed=0)
    return root, info


@pytest.fixture(scope="module")
def planted_prepared(planted, tmp_path_factory):
    root, _ = planted
    out = tmp_path_factory.mktemp("planted-prepared")
    summary = prepare(root, out, test_fraction=0.2, seed=0, progress=False)
    return out, summary


def _pairs(info) -> list[tuple[str, str]]:
    return [(d["original"], d["copy"]) for d in info["duplicates"]]


def _straddling(pairs, side_of) -> list[tuple[str, str]]:
    """The planted pairs whose two images are on different sides: each one a leak."""
    return [(a, b) for a, b in pairs if side_of[a] != side_of[b]]


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
    assert summary["duplicate_groups"] > 50  # without groups, the checks below pass vacuously
    assert not train_groups & test_groups
    for cls, n in summary["images_per_class"].items():
        n_test = sum(1 for e in dl["test"] if e["class"] == cls)
        assert abs(n_test / n - 0.2) < 0.03, (cls, n_test, n)
    # the ids of every duplicate group are on one side
    side = {Path(e["image"]).name: s for s in ("training", "test") for e in dl[s]}
    for g in json.loads((out / "duplicates.json").read_text())["groups"]:
        assert len({side[f"{i}.nii.gz"] for i in g["ids"]}) == 1


def test_finder_groups_each_planted_copy_and_no_distinct_scans(planted, tmp_path):
    root, info = planted
    paths = sorted(p for p in root.rglob("*.png") if "_mask" not in p.name)
    rel = [p.relative_to(root).as_posix() for p in paths]
    pairs = _pairs(info)
    # One more copy as a real JPEG file, of a scan no planted pair uses: the JPEG reader's path.
    used = {x for pair in pairs for x in pair}
    lone = next(r for r in rel if r not in used)
    with Image.open(root / lone) as im:
        im.convert("L").save(tmp_path / "copy.jpg", quality=75)
    paths.append(tmp_path / "copy.jpg")
    rel.append("copy.jpg")
    pairs.append((lone, "copy.jpg"))
    groups, links = find_duplicate_groups(paths)
    found = {frozenset(rel[k] for k in g) for g in groups if len(g) > 1}
    change = {frozenset(p): d["change"] for p, d in zip(pairs, info["duplicates"])}
    missed = [change.get(frozenset(p), "jpeg file") for p in pairs if not any(set(p) <= g for g in found)]
    assert not missed, (missed, links)
    # The 18 originals come from 18 seeds: a group beyond the planted pairs joins distinct scans.
    assert found == {frozenset(p) for p in pairs}, sorted(map(sorted, found - {frozenset(p) for p in pairs}))


def test_prepare_keeps_each_planted_pair_on_one_side(planted, planted_prepared):
    (root, info), (out, summary) = planted, planted_prepared
    dl = json.loads((out / "dataset.json").read_text())
    side_of = {e["source"]: s for s in ("training", "test") for e in dl[s]}
    group_of = {e["source"]: e["group"] for s in ("training", "test") for e in dl[s]}
    pairs = _pairs(info)
    assert len(side_of) == summary["images"] == info["count"] == 26
    assert [p for p in pairs if group_of[p[0]] != group_of[p[1]]] == []
    assert _straddling(pairs, side_of) == []
    # Both sides are used, so "on one side" is not met by putting everything in training.
    assert {side_of[p[0]] for p in pairs} == {"training", "test"}
    assert not {e["group"] for e in dl["training"]} & {e["group"] for e in dl["test"]}
    dups = json.loads((out / "duplicates.json").read_text())
    assert sorted(sorted(g["sources"]) for g in dups["groups"]) == sorted(sorted(p) for p in pairs)
    for g in dups["groups"]:
        assert g["side"] == side_of[g["sources"][0]]
        assert len(g["links"]) >= 1 and all(l["detector"] in ("thumbnail", "resized", "template") for l in g["links"])
    cross = sum(1 for a, b in pairs if a.split("/")[0] != b.split("/")[0])
    assert summary["cross_class_duplicate_groups"] == cross >= 5
    assert summary["duplicate_groups"] == 8 and summary["images_in_duplicate_groups"] == 16
    for cls, n in summary["images_per_class"].items():
        assert abs(summary["test_per_class"][cls] - 0.2 * n) <= 2, (cls, summary["test_per_class"])


def test_every_split_of_the_prepared_items_keeps_planted_pairs_together(planted, planted_prepared):
    """The test split for other seeds and fractions, the validation slice and the folds, all
    from the groups prepare wrote: no planted pair is ever cut."""
    (_, info), (out, _) = planted, planted_prepared
    dl = json.loads((out / "dataset.json").read_text())
    items = dl["training"] + dl["test"]
    index = {e["source"]: k for k, e in enumerate(items)}
    pairs = [(index[a], index[b]) for a, b in _pairs(info)]
    groups = [[k for k, e in enumerate(items) if e["group"] == g] for g in sorted({e["group"] for e in items})]
    classes = [e["class"] for e in items]
    cut = []
    for seed in range(10):
        for fraction in (0.2, 0.5):
            train, test = grouped_stratified_split(classes, groups, fraction, seed)
            assert sorted(train + test) == list(range(len(items)))
            cut += [("test", fraction, seed, p) for p in _straddling(pairs, {k: k in test for k in range(len(items))})]
        _, val = validation_rows(items, 0.3, seed)
        cut += [("validation", seed, p) for p in _straddling(pairs, {k: k in val for k in range(len(items))})]
        fold_of = {k: f for f, ks in enumerate(grouped_stratified_folds(items, 3, seed)) for k in ks}
        cut += [("folds", seed, p) for p in _straddling(pairs, fold_of)]
    assert cut == []


def _assert_label_is_union_of_masks(out: Path, root: Path, entry: dict) -> None:
    label = nib.load(out / entry["label"])
    image = nib.load(out / entry["image"])
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine)
    lab = np.asarray(label.dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    # nibabel gives (x, y) = (W, H); compare with the PNG masks in (H, W)
    lab_hw = lab.T if lab.ndim == 2 else lab[..., 0].T
    src = root / entry["source"]
    masks = [read_mask(p) for p in sorted(src.parent.glob(f"{src.stem}_mask*.png"))]
    assert len(masks) == entry["n_masks"] >= 2
    union = np.maximum.reduce(masks)
    np.testing.assert_array_equal(lab_hw, union)
    assert all(union.sum() > m.sum() for m in masks)
    img_hw = np.asarray(image.dataobj).T
    np.testing.assert_array_equal(img_hw.astype(np.float32), read_image(src).array)


@needs_busi
@pytest.mark.slow  # prepares all 624 images (duplicate search included)
def test_multi_mask_is_union_and_geometry_matches(prepared):
    out, _ = prepared
    dl = json.loads((out / "dataset.json").read_text())
    entry = next(e for e in dl["training"] + dl["test"] if e["image"] == "images/benign_0195.nii.gz")
    assert entry["n_masks"] == 3
    _assert_label_is_union_of_masks(out, BUSI, entry)


def test_multi_mask_is_union_and_geometry_matches_synthetic(planted, planted_prepared):
    (root, _), (out, _) = planted, planted_prepared
    dl = json.loads((out / "dataset.json").read_text())
    several = [e for e in dl["training"] + dl["test"] if e["n_masks"] > 1]
    assert several
    for entry in several:
        _assert_label_is_union_of_masks(out, root, entry)


def _check_make_studies(out: Path, tmp_path: Path) -> None:
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


@needs_busi
@pytest.mark.slow  # prepares all 624 images (duplicate search included)
def test_make_studies_from_prepared(prepared, tmp_path):
    _check_make_studies(prepared[0], tmp_path)


def test_make_studies_from_prepared_synthetic(planted_prepared, tmp_path):
    _check_make_studies(planted_prepared[0], tmp_path)


def _numbers(root: Path, cls: str, k: int) -> list[int]:
    """The first ``k`` case numbers of ``cls`` present in ``root`` (the BUSI copy lacks some)."""
    nums = sorted(int(p.name.split("(")[1].split(")")[0]) for p in (root / cls).glob(f"{cls} (*).png") if "_mask" not in p.name)
    return nums[:k]


def _copy_case(src_root: Path, dst_root: Path, cls: str, num: int):
    for p in (src_root / cls).glob(f"{cls} ({num})*.png"):
        (dst_root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst_root / cls / p.name)


@pytest.fixture(params=["synthetic", "busi"])
def source_root(request, tmp_path) -> Path:
    """A BUSI-layout folder to take real files from: synthetic (every machine) or the real copy."""
    if request.param == "busi":
        if not (BUSI / "benign").is_dir():
            pytest.skip(f"real BUSI copy not found at {BUSI} (set BUSI_ROOT)")
        return BUSI
    synthesize(tmp_path / "synthetic", 12, seed=0, size_range=(64, 96))
    return tmp_path / "synthetic"


def test_bad_inputs_are_reported_and_rest_prepared(source_root, tmp_path):
    src = source_root
    root = tmp_path / "busi"
    m1, m2 = _numbers(src, "malignant", 2)
    (n1,) = _numbers(src, "normal", 1)
    for cls, num in [("benign", 1), ("benign", 2), ("benign", 3), ("malignant", m1), ("malignant", m2), ("normal", n1)]:
        _copy_case(src, root, cls, num)
    # mask without image
    shutil.copy(src / "benign" / "benign (4)_mask.png", root / "benign" / "benign (999)_mask.png")
    # corrupt PNG
    (root / "benign" / "benign (2).png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    # mask of another size
    bad_mask = root / "malignant" / f"malignant ({m1})_mask.png"
    m = Image.open(bad_mask)
    m.resize((m.width // 2, m.height // 2)).save(bad_mask)
    # image without mask (another normal image, copied without its mask)
    extra = src / "normal" / f"normal ({_numbers(src, 'normal', 2)[1]}).png"
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


@pytest.fixture(params=["synthetic", "busi"])
def three_scans(request, planted):
    """A scan and two unrelated ones: synthetic (every machine) or from the real copy."""
    if request.param == "busi":
        if not (BUSI / "benign").is_dir():
            pytest.skip(f"real BUSI copy not found at {BUSI} (set BUSI_ROOT)")
        names = ["benign/benign (1).png", f"malignant/malignant ({_numbers(BUSI, 'malignant', 1)[0]}).png"]
        names.append(f"normal/normal ({_numbers(BUSI, 'normal', 3)[2]}).png")
        return [read_image(BUSI / n).array for n in names]
    root, info = planted
    used = {x for d in info["duplicates"] for x in (d["original"], d["copy"])}
    free = [p for p in sorted(root.rglob("*).png")) if p.relative_to(root).as_posix() not in used]
    return [read_image(next(p for p in free if p.parent.name == cls)).array for cls in ("benign", "malignant", "normal")]


def test_duplicate_detection_crop_shift_resize(three_scans):
    from skimage.transform import resize

    a, other1, other2 = three_scans
    h, w = a.shape
    crop = a[int(0.1 * h) : int(0.1 * h) + int(0.85 * h), int(0.05 * w) : int(0.05 * w) + int(0.85 * w)]
    shifted = np.zeros_like(a)
    shifted[23:, 37:] = a[:-23, :-37]
    resized = resize(a, (int(h * 0.8), int(w * 0.8)), anti_aliasing=True, preserve_range=True).astype(np.float32)
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
