"""Property tests of the image and label readers: whatever bytes or arrays a user brings, the
readers return one valid 2D image or raise ``BusiInputError`` naming the file, never anything
else (a crash in the server's request thread is a 500 without a reason).

Examples stay small (tens of pixels) so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

itk = pytest.importorskip("itk")
nib = pytest.importorskip("nibabel")
from PIL import Image

from busi_monai.data.io import BusiInputError, read_image, read_mask

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXTENSIONS = [".png", ".jpg", ".bmp", ".tif", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm", ""]
MAX_PIXELS = 64 * 64


def _check_image(path: str, max_pixels: int = MAX_PIXELS):
    """read_image: a valid image, or None after a BusiInputError that names the file."""
    try:
        img = read_image(path, max_pixels=max_pixels)
    except BusiInputError as e:
        assert os.path.basename(path) in str(e), str(e)
        return None
    assert img.array.ndim == 2 and img.array.dtype == np.float32
    assert min(img.array.shape) >= 8 and img.array.size <= max_pixels
    assert np.all(np.isfinite(img.array))
    return img


def _check_mask(path: str):
    try:
        m = read_mask(path, strict_binary=True, max_pixels=MAX_PIXELS)
    except BusiInputError as e:
        assert os.path.basename(path) in str(e), str(e)
        return None
    assert m.ndim == 2 and m.dtype == np.uint8 and set(np.unique(m).tolist()) <= {0, 1}
    return m


def _valid_bytes(ext: str, arr: np.ndarray) -> bytes:
    """A well-formed file of ``arr`` (uint8, 2D) in the format of ``ext``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"x{ext or '.nrrd'}")
        if ext in (".png", ".jpg", ".bmp", ".tif"):
            Image.fromarray(arr).save(path)
        elif ext == ".dcm":
            itk.imwrite(itk.image_from_array(arr.astype(np.int16)), path)
        else:
            itk.imwrite(itk.image_from_array(arr), path, compression=ext == ".nii.gz")
        with open(path, "rb") as f:
            return f.read()


def _write(d: str, name: str, data: bytes) -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


small_u8 = hnp.arrays(np.uint8, st.tuples(st.integers(8, 40), st.integers(8, 40)))


@FUZZ
@given(ext=st.sampled_from(EXTENSIONS), data=st.binary(max_size=2048))
def test_random_bytes(ext, data):
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, f"random{ext}", data)
        _check_image(path)
        _check_mask(path)


@FUZZ
@given(
    ext=st.sampled_from(EXTENSIONS),
    arr=small_u8,
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
)
def test_damaged_valid_files(ext, arr, cut, flips):
    """Real headers, then truncated and with bytes overwritten: the decoders' error paths."""
    data = bytearray(_valid_bytes(ext, arr))
    for pos, value in flips:
        data[int(pos * (len(data) - 1))] = value
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 1 else bytes(data)
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, f"damaged{ext}", data)
        _check_image(path)
        _check_mask(path)


@FUZZ
@given(
    dims=st.lists(st.integers(0, 30000), min_size=2, max_size=4),
    datatype=st.sampled_from([2, 4, 8, 16, 64, 128, 256, 512, 768, 2304]),
    payload=st.binary(max_size=512),
)
def test_nifti_headers_declaring_any_size(dims, datatype, payload):
    """A valid NIfTI header can declare a huge volume over a few bytes of data: refused from the
    header, without allocating it (an unbounded read would take gigabytes here)."""
    hdr = nib.Nifti1Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hdr.set_data_dtype(datatype)
        except Exception:  # nibabel does not know every code; write the raw field instead
            hdr["datatype"] = datatype
        hdr["dim"][0] = len(dims)
        hdr["dim"][1 : 1 + len(dims)] = dims
    buf = io.BytesIO()
    buf.write(hdr.binaryblock)
    buf.write(b"\0" * 4)  # extension flag
    buf.write(payload)
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, "header.nii", buf.getvalue())
        img = _check_image(path)
        if img is not None:
            assert img.array.size <= MAX_PIXELS


int_or_float = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_])


@settings(FUZZ, max_examples=50)  # each example writes and reads a volume through ITK
@given(
    arr=hnp.arrays(int_or_float, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=40)),
    ext=st.sampled_from([".nii.gz", ".nrrd", ".mha"]),
)
def test_any_array_as_volume(arr, ext):
    """Any shape and dtype through ITK: 2D (or single-slice) images of 8x8 or more come back
    exactly, as float32; everything else is refused with the reason."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"array{ext}")
        itk_arr = arr.astype(np.uint8) if arr.dtype == np.bool_ else arr
        try:
            itk.imwrite(itk.image_from_array(np.ascontiguousarray(itk_arr)), path)
        except Exception:  # ITK cannot write 1D or 4D arrays of some types: nothing to read
            assume(False)
        img = _check_image(path)
        plane = itk_arr.reshape(itk_arr.shape[-2:]) if itk_arr.ndim == 3 and itk_arr.shape[0] == 1 else itk_arr
        shape_ok = plane.ndim == 2 and min(plane.shape) >= 8 and plane.size <= MAX_PIXELS
        with np.errstate(over="ignore"):  # float64 beyond float32's range is infinite once read
            finite = np.isfinite(plane.astype(np.float32))
        if shape_ok and finite.all():
            assert img is not None, f"{arr.shape} {arr.dtype} should be readable"
            np.testing.assert_array_equal(img.array, plane.astype(np.float32))
        elif shape_ok:
            # NaN/inf: refused, or (ITK's NIfTI reader turns them into 0) the finite pixels intact.
            if img is not None:
                np.testing.assert_array_equal(img.array[finite], plane[finite].astype(np.float32))
        elif plane.ndim == 2:
            assert img is None, f"{arr.shape} should be refused"


@FUZZ
@given(
    arr=hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 4))),
    sixteen_bit=st.booleans(),
)
def test_png_modes_and_sizes(arr, sixteen_bit):
    """Grey, grey+alpha, RGB, RGBA and 16-bit PNGs: converted to one grey plane of the same size."""
    channels, plane = arr.shape[-1], arr[..., 0]
    if sixteen_bit:
        pil = Image.fromarray(plane.astype(np.uint16) * 257)
    else:
        pil = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode={1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mode.png")
        pil.save(path)
        img = _check_image(path)
        if min(plane.shape) < 8:
            assert img is None
            return
        assert img is not None and img.shape == plane.shape
        if sixteen_bit:
            np.testing.assert_array_equal(img.array, plane.astype(np.float32) * 257)
        elif channels <= 2 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])):
            # Alpha is transparency, not intensity; grey stored as RGB stays the same grey.
            np.testing.assert_array_equal(img.array, plane.astype(np.float32))


@FUZZ
@given(
    mask=hnp.arrays(np.uint8, st.tuples(st.integers(8, 32), st.integers(8, 32)), elements=st.sampled_from([0, 1, 2, 7, 255])),
    ext=st.sampled_from([".png", ".nii.gz", ".nrrd"]),
)
def test_label_values(mask, ext):
    """Labels: 0/1 and 0/255 are binary masks; any other value set is refused, naming the values."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"label{ext}")
        if ext == ".png":
            Image.fromarray(mask).save(path)
        else:
            itk.imwrite(itk.image_from_array(mask), path)
        values = set(np.unique(mask).tolist())
        if values <= {0, 1} or values <= {0, 255}:
            m = read_mask(path, strict_binary=True)
            np.testing.assert_array_equal(m, (mask > 0).astype(np.uint8))
        else:
            with pytest.raises(BusiInputError, match="label values must be 0 and 1"):
                read_mask(path, strict_binary=True)
        # A label of another size than its image is refused, whatever its values.
        with pytest.raises(BusiInputError, match="does not match its image"):
            read_mask(path, expected_shape=(mask.shape[0] + 1, mask.shape[1]))


def test_declared_huge_volume_is_refused_from_the_header(tmp_path):
    """348 bytes that declare 30000x30000 pixels: refused at once (reading it first took ~25 s
    and ~6 GB here before the header was checked)."""
    import tracemalloc

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr["dim"][:3] = [2, 30000, 30000]
    path = tmp_path / "bomb.nii"
    path.write_bytes(hdr.binaryblock + b"\0" * 14)
    read_image(_write(str(tmp_path), "warm.nrrd", _valid_bytes(".nrrd", np.zeros((8, 8), np.uint8))))  # load ITK's readers
    # Refused from the header, before any pixel is allocated (3.6 GB here): measured as memory,
    # not as time, so that the verdict does not depend on the machine's speed.
    tracemalloc.start()
    try:
        with pytest.raises(BusiInputError, match="30000x30000 pixels is above the limit"):
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"
