from __future__ import annotations

from collections import Counter

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
