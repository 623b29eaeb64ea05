from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from busi_monai.data.busi import load_case, scan_busi
from busi_monai.data.synth import synthesize


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_deterministic_by_seed(tmp_path):
    synthesize(tmp_path / "a", 8, seed=3, size_range=(64, 96))
    synthesize(tmp_path / "b", 8, seed=3, size_range=(64, 96))
    synthesize(tmp_path / "c", 8, seed=4, size_range=(64, 96))
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert fa.keys() != fc.keys() or any(fa[k] != fc[k] for k in fa)


def test_layout_readable_and_masks(tmp_path):
    s = synthesize(tmp_path, 20, seed=0, size_range=(64, 128))
    cases, problems = scan_busi(tmp_path)
    assert problems == []
    assert len(cases) == 20
    assert Counter(c.cls for c in cases) == s["per_class"] == {"benign": 8, "malignant": 6, "normal": 6}
    from scipy import ndimage as ndi

    shapes = set()
    darker = []
    for c in cases:
        img, lab = load_case(c)
        shapes.add(img.shape)
        assert 64 <= img.shape[0] <= 128
        if c.cls == "normal":
            assert lab.sum() == 0
        else:
            assert 30 <= lab.sum() < 0.5 * lab.size
            # hypoechoic: the lesion is darker than the tissue just around it
            ring = ndi.binary_dilation(lab > 0, iterations=6) & (lab == 0)
            darker.append(img.array[lab > 0].mean() < img.array[ring].mean())
    assert len(shapes) > 5
    assert sum(darker) >= 0.8 * len(darker), darker


def test_second_lesion_and_quirks(tmp_path):
    s = synthesize(tmp_path, 40, seed=0, size_range=(48, 64))
    assert s["second_lesions"] >= 1
    from PIL import Image

    modes = Counter(Image.open(p).mode for p in tmp_path.rglob("*_mask*.png"))
    assert modes["1"] > 0 and modes["RGB"] == 12  # normal masks are all-zero RGB
    assert list(tmp_path.rglob("*_mask_1.png"))


def test_planted_duplicates_layout(tmp_path):
    """The copies are a clean BUSI layout: new case numbers, masks changed with their image,
    lesion copies under the other lesion class, the other PNG mode for ``mode``."""
    from PIL import Image

    from busi_monai.data.io import read_image
    from busi_monai.data.synth import DUPLICATE_CHANGES, synthesize_with_duplicates

    s = synthesize_with_duplicates(tmp_path, 10, seed=0, size_range=(64, 80))
    cases, problems = scan_busi(tmp_path)
    assert problems == []
    assert len(cases) == s["count"] == 10 + len(DUPLICATE_CHANGES)
    assert Counter(c.cls for c in cases) == s["per_class"]
    assert [d["change"] for d in s["duplicates"]] == list(DUPLICATE_CHANGES)
    originals = [d["original"] for d in s["duplicates"]]
    assert len(set(originals)) == len(originals)
    by_source = {c.source: c for c in cases}
    copies = {d["copy"] for d in s["duplicates"]}
    distinct = Counter(c.cls for c in cases if c.source not in copies)
    for d in s["duplicates"]:
        a, b = by_source[d["original"]], by_source[d["copy"]]
        assert b.number > distinct[b.cls] and b.cls == {"benign": "malignant", "malignant": "benign"}.get(a.cls, a.cls)
        img_a, lab_a = load_case(a)
        img_b, lab_b = load_case(b)  # reads every mask at the image's size
        assert len(b.masks) == len(a.masks) and lab_b.any() == lab_a.any()
        with Image.open(a.image) as ia, Image.open(b.image) as ib:
            assert (ia.mode != ib.mode) == (d["change"] == "mode"), d
        if d["change"] == "mode":
            assert np.array_equal(read_image(a.image).array, read_image(b.image).array)
        elif d["change"] in ("shrink", "enlarge"):
            f = 0.8 if d["change"] == "shrink" else 1.2
            assert abs(img_b.shape[0] - f * img_a.shape[0]) <= 1 and abs(img_b.shape[1] - f * img_a.shape[1]) <= 1
        elif d["change"].startswith("crop"):
            assert all(6 <= sa - sb <= 24 for sa, sb in zip(img_a.shape, img_b.shape)), (img_a.shape, img_b.shape)
        else:
            assert img_b.shape == img_a.shape and not np.array_equal(img_b.array, img_a.array), d


def test_planted_duplicates_deterministic_and_checked(tmp_path):
    from busi_monai.data.synth import synthesize_with_duplicates

    a = synthesize_with_duplicates(tmp_path / "a", 8, seed=5, changes=("jpeg", "shift"), size_range=(48, 56))
    b = synthesize_with_duplicates(tmp_path / "b", 8, seed=5, changes=("jpeg", "shift"), size_range=(48, 56))
    assert a["duplicates"] == b["duplicates"] and _files(tmp_path / "a") == _files(tmp_path / "b")
    with pytest.raises(ValueError, match="unknown change"):
        synthesize_with_duplicates(tmp_path / "c", 8, changes=("rotate",), size_range=(48, 56))
    with pytest.raises(ValueError, match="one original per change"):
        synthesize_with_duplicates(tmp_path / "d", 1, changes=("jpeg", "shift"), size_range=(48, 56))
