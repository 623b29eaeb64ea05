"""Reading 2D ultrasound images and writing masks with the image's own geometry.

Arrays are row-major ``(rows, cols)`` = ``(H, W)``, as ITK's array view and PIL give them,
so a PNG and the NIfTI written from it load identically. Geometry (spacing, origin,
direction) follows ITK (LPS), which is what 3D Slicer reads, so a mask written with
:func:`write_mask` overlays its image exactly in Slicer.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from busi_monai.data.dicom import DicomError, is_dicom, read_ultrasound

PNG_LIKE = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ITK_LIKE = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".nhdr", ".mha", ".mhd", "")
DICOM_LIKE = (".dcm", ".dicom")
SUPPORTED = PNG_LIKE + DICOM_LIKE + ITK_LIKE

# Large enough for any ultrasound frame, small enough to stop a decompression bomb.
DEFAULT_MAX_PIXELS = 4096 * 4096  # the app sets its own with --conf max_image_pixels


class BusiInputError(ValueError):
    """Bad input: the message names the file and the problem."""


@dataclass
class Image2D:
    array: np.ndarray  # (H, W) float32
    spacing: tuple[float, float] = (1.0, 1.0)  # (x, y) as ITK
    origin: tuple[float, float] = (0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(2))
    path: str = ""
    # Extra leading geometry of a single-slice 3D volume (Slicer writes labels that way).
    volume3d: dict | None = None
    # The scan's (top, left, height, width) in the frame (an ultrasound DICOM's region): the
    # network sees only this part; busi_monai.data.region crops to it and pastes back.
    region: tuple[int, int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def suffix_of(path: str | Path) -> str:
    name = str(path).lower()
    for ext in (".seg.nrrd", ".nii.gz"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def _pil_to_gray(img, path) -> np.ndarray:
    """Any PIL mode to a float32 (H, W) array on the file's own intensity scale."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
    elif mode == "1":
        arr = np.asarray(img, dtype=np.float32) * 255.0
    elif mode in ("L", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "PA"):
        if mode in ("P", "PA"):
            img = img.convert("RGBA")
            mode = "RGBA"
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 3:
            # Alpha is transparency, not intensity; RGB overlays (Doppler, calipers) become luminance.
            colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
            if colour.shape[-1] == 3 and not (
                np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 1], colour[..., 2])
            ):
                arr = colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            else:
                arr = colour[..., 0]
    else:
        raise BusiInputError(f"{path}: unsupported PNG/JPEG mode {mode!r}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_pil(path: str, max_pixels: int) -> Image2D:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise BusiInputError(f"{path}: image of {w}x{h} pixels is above the limit of {max_pixels} pixels")
            img.load()
            arr = _pil_to_gray(img, path)
    except BusiInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BusiInputError(f"{path}: image is above the limit of {max_pixels} pixels ({e})") from None
    except UnidentifiedImageError as e:
        raise BusiInputError(f"{path}: not a readable image ({e})") from None
    except Exception as e:  # PIL's decoders raise OSError, but also struct.error, EOFError, IndexError... on damaged files
        raise BusiInputError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    return Image2D(arr, path=str(path))


def _first_line(e: Exception) -> str:
    """The telling part of an ITK exception: its last line, without the C++ source location."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not re.fullmatch(r"\S+\.(cxx|hxx|h):\d+:?", ln.strip())]
    if not lines:
        return type(e).__name__
    main = next((ln for ln in lines if ln.startswith("ITK ERROR:")), lines[0])
    text = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", main)
    last = lines[-1]
    if last != main and not last.startswith("Reason:"):  # C errno text, often unrelated
        text = f"{text} {last}"
    return text[:200]


def _check_nifti_complete(path: str) -> None:
    """ITK's NIfTI reader fills the missing pixels of a truncated file with zeros, silently:
    compare the pixel bytes the header declares with those the file holds."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            for end in "<>":
                size = struct.unpack(end + "i", head[:4])[0]
                if size in (348, 540):
                    break
            else:
                return  # not a NIfTI-1/2 header that ITK read; nothing to compare
            if size == 348:
                dims = struct.unpack(end + "8h", head[40:56])
                bitpix = struct.unpack(end + "h", head[72:74])[0]
                offset = int(struct.unpack(end + "f", head[108:112])[0])
            else:
                dims = struct.unpack(end + "8q", head[16:80])
                bitpix = struct.unpack(end + "h", head[14:16])[0]
                offset = struct.unpack(end + "q", head[168:176])[0]
            ndim = min(max(int(dims[0]), 1), 7)
            need = offset + int(np.prod([max(int(d), 1) for d in dims[1 : 1 + ndim]])) * max(int(bitpix), 8) // 8 - len(head)
            got = 0
            while got < need:  # bounded by the header's size, which was checked against the limit
                chunk = f.read(min(1 << 20, need - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise BusiInputError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    if got < need:
        raise BusiInputError(f"{path}: truncated image: {need - got} bytes of pixel data are missing")


def itk_backend() -> str:
    """Which ITK reads and writes NIfTI/NRRD: ``itk`` where installed, else ``SimpleITK`` (the
    same ITK IO, and a monailabel dependency anyway), so a machine that cannot carry ITK's
    wheels still reads and writes volumes the same way."""
    try:
        import itk  # noqa: F401

        return "itk"
    except ImportError:
        try:
            import SimpleITK  # noqa: F401

            return "SimpleITK"
        except ImportError:
            raise BusiInputError("reading or writing NIfTI/NRRD needs itk or SimpleITK; neither is installed") from None


def _header(path: str) -> tuple[list[int], int]:
    """(size per axis, values per pixel) from the header, or BusiInputError."""
    if itk_backend() == "SimpleITK":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise BusiInputError(f"{path}: not a readable image ({_first_line(e)})") from None
        return [int(d) for d in reader.GetSize()], int(reader.GetNumberOfComponents())
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise BusiInputError(f"{path}: not a readable image (no reader recognises this file)")
    try:
        io.SetFileName(path)
        io.ReadImageInformation()
    except Exception as e:  # ITK raises RuntimeError with a long C++ trace
        raise BusiInputError(f"{path}: not a readable image ({_first_line(e)})") from None
    return [int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions())], int(io.GetNumberOfComponents())


def _check_itk_header(path: str, max_pixels: int) -> None:
    """Size and slice count from the header alone: a tiny file can declare a huge volume, and
    ITK would allocate all of it before the checks on the array could run."""
    dims, components = _header(path)
    if len(dims) < 2 or min(dims) < 1:
        raise BusiInputError(f"{path}: expected a 2D image, the header declares a size of {dims}")
    extra = dims[2:]
    if extra and int(np.prod(extra)) > 1:
        raise BusiInputError(
            f"{path}: a volume with {int(np.prod(extra))} slices; busi-monai segments single 2D ultrasound images"
        )
    if dims[0] * dims[1] > max_pixels:
        raise BusiInputError(f"{path}: image of {dims[0]}x{dims[1]} pixels is above the limit of {max_pixels} pixels")
    if components > 4:
        raise BusiInputError(f"{path}: {components} values per pixel; expected a grey or colour image")


def _itk_read(path: str):
    """(array, values per pixel, spacing, origin, direction matrix) through the installed ITK."""
    if itk_backend() == "SimpleITK":
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        with np.errstate(over="ignore"):
            arr = sitk.GetArrayFromImage(img).astype(np.float32)
        d = img.GetDimension()
        direction = np.asarray(img.GetDirection(), dtype=float).reshape(d, d)
        return arr, img.GetNumberOfComponentsPerPixel(), img.GetSpacing(), img.GetOrigin(), direction
    import itk

    img = itk.imread(str(path))
    with np.errstate(over="ignore"):  # float64 beyond float32's range: infinite, refused below
        arr = itk.array_from_image(img).astype(np.float32)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=float)
    return arr, img.GetNumberOfComponentsPerPixel(), img.GetSpacing(), img.GetOrigin(), direction


def _read_itk(path: str, max_pixels: int) -> Image2D:
    _check_itk_header(path, max_pixels)
    if suffix_of(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        arr, components, spacing, origin, direction = _itk_read(path)
    except Exception as e:  # unsupported pixel types, truncated data
        raise BusiInputError(f"{path}: not a readable image ({_first_line(e)})") from None
    if components > 1:
        arr = arr[..., :3].mean(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    spacing = np.asarray(spacing, dtype=float)
    origin = np.asarray(origin, dtype=float)
    direction = np.asarray(direction, dtype=float)
    volume3d = None
    if arr.ndim == 3:
        # ITK array order is (z, y, x): a 2D image saved as a volume has one slice somewhere.
        if arr.shape[0] == 1:
            volume3d = {"spacing": spacing.tolist(), "origin": origin.tolist(), "direction": direction.tolist()}
            arr = arr[0]
            spacing, origin, direction = spacing[:2], origin[:2], direction[:2, :2]
        else:
            raise BusiInputError(
                f"{path}: a volume with {arr.shape[0]} slices; busi-monai segments single 2D ultrasound images"
            )
    elif arr.ndim != 2:
        raise BusiInputError(f"{path}: expected a 2D image, got an array of shape {arr.shape}")
    if arr.size > max_pixels:
        raise BusiInputError(f"{path}: image of {arr.shape[1]}x{arr.shape[0]} pixels is above the limit")
    if not np.all(np.isfinite(arr)):
        raise BusiInputError(f"{path}: image contains NaN or infinite values")
    return Image2D(
        np.ascontiguousarray(arr, dtype=np.float32),
        spacing=tuple(spacing.tolist()),
        origin=tuple(origin.tolist()),
        direction=direction,
        path=str(path),
        volume3d=volume3d,
    )


def _read_dicom(path: str, max_pixels: int, frame: int | None) -> Image2D:
    try:
        us = read_ultrasound(path, frame=frame, max_pixels=max_pixels)
    except DicomError as e:
        raise BusiInputError(str(e)) from None
    region = us.region if us.region is not None and us.region[2:] != us.array.shape else None
    if us.array.size > max_pixels:
        raise BusiInputError(f"{path}: image of {us.array.shape[1]}x{us.array.shape[0]} pixels is above the limit")
    return Image2D(us.array, spacing=us.spacing or (1.0, 1.0), path=str(path), region=region)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, frame: int | None = None) -> Image2D:
    """Read a 2D image (PNG, JPEG, BMP, TIFF, NIfTI, NRRD, MHA, DICOM) as float32 (H, W).

    A DICOM is read with pydicom (:mod:`busi_monai.data.dicom`): its scan region and pixel
    spacing come with it; ``frame`` picks one frame of a multi-frame file.
    Raises :class:`BusiInputError` naming the file for anything that is not one 2D image.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise BusiInputError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise BusiInputError(f"{path}: empty file")
    ext = suffix_of(path)
    if ext in PNG_LIKE:
        img = _read_pil(path, max_pixels)
    elif ext in DICOM_LIKE or (ext == "" or ext not in SUPPORTED) and is_dicom(path):
        img = _read_dicom(path, max_pixels, frame)
    elif ext in ITK_LIKE:
        img = _read_itk(path, max_pixels)
    else:
        raise BusiInputError(f"{path}: unsupported file type {ext!r} (expected one of {', '.join(SUPPORTED[:-1])})")
    if min(img.array.shape) < 8:
        raise BusiInputError(f"{path}: image of shape {img.array.shape} is too small to segment")
    return img


def read_mask(
    path: str | Path,
    expected_shape: tuple[int, int] | None = None,
    strict_binary: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    value: float | None = None,
) -> np.ndarray:
    """Read a label as a {0, 1} uint8 (H, W) array; any non-zero value is lesion unless ``strict_binary``
    or ``value`` (a multi-label mask's lesion label: only pixels of that value are lesion).

    ``strict_binary`` (labels submitted to the app) accepts 0/1, and 0/255 as binary PNG masks
    are usually saved; anything else (several segments, soft or colour masks) is refused with
    the values found, rather than guessed at.
    """
    img = read_image(path, max_pixels=max_pixels)
    arr = img.array
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise BusiInputError(f"{path}: mask of shape {arr.shape} does not match its image of shape {tuple(expected_shape)}")
    if strict_binary:
        values = np.unique(arr)
        found = set(values.tolist())
        if not (found <= {0.0, 1.0} or found <= {0.0, 255.0}):
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
            raise BusiInputError(f"{path}: label values must be 0 and 1 (or 0 and 255), found {shown}")
    if value is not None:
        return (arr == value).astype(np.uint8)
    return (arr > 0).astype(np.uint8)


def read_masks_union(
    paths, expected_shape: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, value: float | None = None
) -> np.ndarray:
    """The lesion mask of an image with one or several mask files (BUSI's ``_mask``,
    ``_mask_1``, ...): their union, uint8 {0, 1}, each checked against ``expected_shape`` (or the
    first file's). No file at all is an empty (normal) mask of ``expected_shape``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out = None if expected_shape is None else np.zeros(expected_shape, dtype=np.uint8)
    for p in paths:
        m = read_mask(p, expected_shape=None if out is None else out.shape, max_pixels=max_pixels, value=value)
        out = m if out is None else out | m
    if out is None:
        raise BusiInputError("no mask file, and no image shape to make an empty mask of")
    return out


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary name beside ``path`` (same extension, same file system); when the
    block succeeds it is flushed to disk and renamed over ``path``, else removed. Readers see
    the old file or the new one, never half of one. Every file busi-monai writes goes this way.
    """
    path = str(path)
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix_of(path), dir=d)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_array(array: np.ndarray, path: str | Path, like: Image2D | None = None) -> str:
    """Write a 2D array atomically with ``like``'s geometry; the extension picks the format.

    PNG/JPEG get the array as is (uint8 masks are scaled to 0/255 for PNG viewers unless float).
    Single-slice volumes keep their 3D geometry so Slicer overlays the result on the source.
    """
    path = str(path)
    with atomic_path(path) as tmp:
        ext = suffix_of(path)
        if ext in PNG_LIKE:
            from PIL import Image

            arr = np.asarray(array)
            if arr.dtype == np.uint8 and arr.max(initial=0) <= 1:
                arr = arr * 255
            elif arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp, format="PNG" if ext == ".png" else None)
        else:
            arr = np.ascontiguousarray(array)
            geometry = None
            if like is not None and like.volume3d is not None:
                arr = arr[None]
                geometry = (like.volume3d["spacing"], like.volume3d["origin"], like.volume3d["direction"])
            elif like is not None:
                geometry = (like.spacing, like.origin, like.direction)
            _itk_write(arr, geometry, tmp)
    return path


def _itk_write(arr: np.ndarray, geometry: tuple | None, path: str) -> None:
    """Write through the installed ITK with (spacing, origin, direction) when given, compressed."""
    if geometry is not None:
        spacing, origin, direction = ([float(v) for v in np.ravel(g)] for g in geometry)
    if itk_backend() == "SimpleITK":
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(arr)
        if geometry is not None:
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            img.SetDirection(direction)
        sitk.WriteImage(img, path, useCompression=True)
        return
    import itk

    img = itk.image_from_array(arr)
    if geometry is not None:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        d = len(spacing)
        img.SetDirection(itk.matrix_from_array(np.asarray(direction, dtype=float).reshape(d, d)))
    itk.imwrite(img, path, compression=True)


def write_mask(mask: np.ndarray, path: str | Path, like: Image2D | None = None) -> str:
    """Write a {0, 1} mask (uint8) with the geometry of the image it came from."""
    if like is not None and tuple(mask.shape) != like.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {like.shape}")
    return write_array(np.asarray(mask, dtype=np.uint8), path, like)
