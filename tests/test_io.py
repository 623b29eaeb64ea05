"""Readers on real BUSI files and on the awkward formats users bring; geometry round trips."""

import itk
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from busi_monai.data.io import (
    BusiInputError,
    itk_backend,
    read_image,
    read_mask,
    write_array,
    write_mask,
)


@pytest.fixture(params=["synthetic", "busi"])
def busi_layout(request, tmp_path):
    """The real copy, or a synthetic folder with the same file quirks (every machine)."""
    if request.param == "busi":
        return request.getfixturevalue("busi_root")
    from busi_monai.data.synth import synthesize

    synthesize(tmp_path, 20, seed=0, size_range=(48, 64))
    return tmp_path


def test_busi_grayscale_rgb_and_mask_modes(busi_layout):
    modes = {}
    for path in sorted(busi_layout.glob("*/*.png")):
        with Image.open(path) as im:
            modes.setdefault(("mask" if "_mask" in path.name else "image", im.mode), path)
    # The README's quirks: L and RGB images; 1-bit, RGB and RGBA masks.
    assert {("image", "L"), ("image", "RGB"), ("mask", "1"), ("mask", "RGB"), ("mask", "RGBA")} <= set(modes)
    for (kind, mode), path in modes.items():
        if kind == "image":
            img = read_image(path)
            assert img.array.ndim == 2 and img.array.dtype == np.float32 and img.array.max() > 0
        else:
            m = read_mask(path)
            assert set(np.unique(m)) <= {0, 1}


def test_png_modes_agree(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    base = read_image(tmp_path / "l.png").array
    assert np.array_equal(read_image(tmp_path / "rgb.png").array, base)
    assert np.array_equal(read_image(tmp_path / "rgba.png").array, base)
    assert np.allclose(read_image(tmp_path / "16bit.png").array / 257, base)


@pytest.fixture(params=["itk", "SimpleITK"])
def io_backend(request, monkeypatch):
    """Volumes read and written through ITK, or through SimpleITK where ITK is not installed
    (a GPU server that cannot carry ITK's wheels): the same files, the same geometry."""
    import busi_monai.data.io as io_module

    if request.param == "SimpleITK":
        pytest.importorskip("SimpleITK")
        monkeypatch.setattr(io_module, "itk_backend", lambda: "SimpleITK")
    return request.param


def test_simpleitk_stands_in_where_itk_is_missing(monkeypatch):
    pytest.importorskip("SimpleITK")
    assert itk_backend() == "itk"
    monkeypatch.setitem(__import__("sys").modules, "itk", None)  # `import itk` now fails
    assert itk_backend() == "SimpleITK"


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_mask_keeps_geometry_of_single_slice_volume(tmp_path, ext, io_backend):
    """Slicer sends 2D images and labels as volumes with one slice; the mask must overlay them."""
    arr = np.arange(30 * 40, dtype=np.float32).reshape(1, 30, 40)
    vol = itk.image_from_array(arr)
    vol.SetSpacing([0.1, 0.2, 3.0])
    vol.SetOrigin([5.0, -7.0, 11.0])
    vol.SetDirection(itk.matrix_from_array(np.diag([-1.0, -1.0, 1.0])))
    itk.imwrite(vol, str(tmp_path / f"img{ext}"))
    img = read_image(tmp_path / f"img{ext}")
    assert img.shape == (30, 40)
    out = write_mask((img.array > 500).astype(np.uint8), tmp_path / "mask.nrrd", like=img)
    back = itk.imread(out)
    assert tuple(back.GetLargestPossibleRegion().GetSize()) == (40, 30, 1)
    assert np.allclose(back.GetSpacing(), vol.GetSpacing())
    assert np.allclose(back.GetOrigin(), vol.GetOrigin())
    assert np.allclose(itk.array_from_matrix(back.GetDirection()), np.diag([-1.0, -1.0, 1.0]))
    assert np.array_equal(itk.array_from_image(back)[0], (arr[0] > 500).astype(np.uint8))


def test_png_to_nifti_round_trip(tmp_path, io_backend):
    gray = np.random.default_rng(1).integers(0, 256, (33, 47), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    write_array(img.array, tmp_path / "a.nii.gz", like=img)
    assert np.array_equal(read_image(tmp_path / "a.nii.gz").array, gray)
    assert nib.load(tmp_path / "a.nii.gz").shape[:2] == (47, 33)  # NIfTI is x-first


def test_bad_inputs_name_the_file_and_problem(tmp_path, io_backend):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    itk.imwrite(itk.image_from_array(np.zeros((3, 20, 20), np.float32)), str(tmp_path / "vol.nii.gz"))
    cases = {
        "empty.png": "empty file",
        "text.png": "not a readable image",
        "truncated.png": "image",
        "vol.nii.gz": "3 slices",
        "missing.png": "no such file",
    }
    for name, words in cases.items():
        with pytest.raises(BusiInputError) as e:
            read_image(tmp_path / name)
        assert name in str(e.value) and words in str(e.value)
    with pytest.raises(BusiInputError, match="does not match"):
        read_mask(good, expected_shape=(10, 10))
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "sevens.png")
    with pytest.raises(BusiInputError, match="values must be 0 and 1"):
        read_mask(tmp_path / "sevens.png", strict_binary=True)
    with pytest.raises(BusiInputError, match="above the limit"):
        read_image(good, max_pixels=100)


def test_a_label_of_several_mask_files_is_their_union(sample_dir):
    """BUSI gives some images several masks (``_mask``, ``_mask_1``): every reader takes their
    union, the benchmark's items included (it once kept the first mask only)."""
    from busi_monai.benchmark import benchmark_items
    from busi_monai.data.preprocessing import LoadBusiImaged

    image = sample_dir / "benign" / "benign (1).png"
    masks = [sample_dir / "benign" / "benign (1)_mask.png", sample_dir / "benign" / "benign (1)_mask_1.png"]
    parts = [read_mask(m) for m in masks]
    assert all(p.any() for p in parts) and not np.array_equal(parts[0], parts[1])
    loaded = LoadBusiImaged()({"image": str(image), "label": [str(m) for m in masks]})["label"][0]
    np.testing.assert_array_equal(loaded, np.maximum(parts[0], parts[1]))
    item = next(it for it in benchmark_items(str(sample_dir), 40) if it["image"] == str(image))
    assert sorted(item["label"]) == sorted(map(str, masks))
