"""Your own data: the sources besides a BUSI folder, each found as a list of :class:`SourceCase`.

* ``images``: a folder of images and, in ``--labels`` (or beside them), labels named after the
  image's stem, optionally followed by ``_mask``, ``_label`` or ``_seg``, in any supported format;
* ``datalist``: a MONAI Decathlon-style JSON (``training``, optional ``test``), read with MONAI's
  own :func:`monai.data.load_decathlon_datalist`, so paths resolve as MONAI resolves them;
* ``studies``: a MONAI Label studies folder; the labels are those in ``labels/final``.

Images without a label are unlabelled. :data:`SOURCES` is the registry by name; reading pixels
and writing the dataset is :mod:`busi_monai.data.prepare`'s job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from busi_monai.data.dicom import is_dicom
from busi_monai.data.io import SUPPORTED, BusiInputError, suffix_of

LABEL_SUFFIXES = ("_mask", "_label", "_seg")
FINAL = Path("labels") / "final"  # MONAI Label's folder of approved labels


@dataclass
class SourceCase:
    """One image of a source, its label files (union; none: unlabelled) and what is known of it."""

    id: str
    image: Path
    labels: list[Path] = field(default_factory=list)
    cls: str | None = None  # a class the source names (a datalist's ``class``), else None
    source: str = ""  # the image as the user names it: relative to the folder or the datalist
    split: str | None = None  # "test" where the source fixes it (a datalist's ``test`` list)


def stem_of(path: str | Path) -> str:
    """The file name without its extension (``a.nii.gz`` -> ``a``, ``a.seg.nrrd`` -> ``a``)."""
    name = Path(path).name
    ext = suffix_of(name)
    return name[: -len(ext)] if ext and ext in SUPPORTED else name


def is_image_file(path: Path) -> bool:
    """A file busi-monai can read: a supported extension, or a DICOM without one."""
    if not path.is_file() or path.name.startswith("."):
        return False
    ext = suffix_of(path.name)
    return (ext in SUPPORTED and ext != "") or is_dicom(path)


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "image"


def unique_ids(cases: list[SourceCase]) -> list[SourceCase]:
    """Ids that name files safely and once each (``a``, ``a_2``, ... for clashing stems)."""
    seen: set[str] = set()
    for c in cases:
        base = safe_id(c.id)
        cid, k = base, 1
        while cid.lower() in seen:
            k += 1
            cid = f"{base}_{k}"
        seen.add(cid.lower())
        c.id = cid
    return cases


def _label_base(stem: str) -> str | None:
    for s in LABEL_SUFFIXES:
        if stem.endswith(s) and len(stem) > len(s):
            return stem[: -len(s)]
    return None


def scan_images(images: str | Path, labels: str | Path | None = None) -> tuple[list[SourceCase], list[str]]:
    """Images of a folder (sub-folders included, as DICOM exports nest them) paired by stem
    with labels in ``labels`` (default: the same folder, where label files are told apart by
    their ``_mask``/``_label``/``_seg`` suffix). Returns ``(cases, problems)``."""
    images = Path(images)
    if not images.is_dir():
        raise BusiInputError(f"{images}: not a directory")
    labels = Path(labels) if labels is not None else None
    if labels is not None and not labels.is_dir():
        raise BusiInputError(f"{labels}: not a directory")
    same = labels is None or labels.resolve() == images.resolve()
    files = sorted(p for p in images.rglob("*") if is_image_file(p))
    if same:
        stems = {stem_of(p) for p in files}
        label_files = [p for p in files if _label_base(stem_of(p)) in stems]
        image_files = [p for p in files if p not in set(label_files)]
    else:
        image_files = files
        label_files = sorted(p for p in labels.rglob("*") if is_image_file(p))
    by_name: dict[str, list[Path]] = {}
    for p in label_files:
        st = stem_of(p)
        by_name.setdefault(st, []).append(p)
        base = _label_base(st)
        if base is not None:
            by_name.setdefault(base, []).append(p)
    cases, used = [], set()
    for p in image_files:
        st = stem_of(p)
        found = by_name.get(st, [])
        if len(found) > 1:
            names = ", ".join(str(f) for f in found)
            raise BusiInputError(f"{p}: several labels match this image ({names}); keep one")
        used.update(found)
        rel = p.relative_to(images).as_posix()
        cases.append(SourceCase(stem_of(rel).replace("/", "_"), p, list(found), source=rel))
    problems = [f"{p}: label without an image of the same name; ignored" for p in label_files if p not in used]
    if not cases:
        raise BusiInputError(f"{images}: no image files found (expected {', '.join(e for e in SUPPORTED if e)} or DICOM)")
    return unique_ids(cases), problems


def scan_datalist(datalist: str | Path) -> tuple[list[SourceCase], list[str]]:
    """The ``training`` (and ``validation``) items and the ``test`` list of a Decathlon-style
    datalist; a ``test`` item keeps ``split="test"``. An item's optional ``class`` is kept."""
    from monai.data import load_decathlon_datalist

    datalist = Path(datalist)
    if not datalist.is_file():
        raise BusiInputError(f"{datalist}: no such datalist file")
    try:
        keys = [k for k in ("training", "validation", "test") if k in json.loads(datalist.read_text())]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BusiInputError(f"{datalist}: not a JSON datalist ({e})") from None
    if "training" not in keys and "test" not in keys:
        raise BusiInputError(f"{datalist}: no 'training' or 'test' list (a MONAI Decathlon-style datalist)")
    base = datalist.resolve().parent
    cases, problems = [], []
    for key in keys:
        try:
            items = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=key)
        except (ValueError, TypeError, AttributeError) as e:
            raise BusiInputError(f"{datalist}: its '{key}' list cannot be read ({e})") from None
        for k, it in enumerate(items):
            image = it.get("image")
            if not isinstance(image, str):
                raise BusiInputError(f"{datalist}: '{key}' item {k} needs one 'image' path, got {image!r}")
            label = it.get("label")
            labels = [] if label in (None, "") else [label] if isinstance(label, str) else list(label)
            for f in [image, *labels]:
                if not Path(f).is_file():
                    raise BusiInputError(f"{f}: listed in {datalist} ('{key}' item {k}) but no such file")
            src = Path(os.path.relpath(Path(image).resolve(), base)).as_posix()  # as the datalist names it
            cls = it.get("class")
            cases.append(
                SourceCase(
                    stem_of(src).replace("/", "_"), Path(image), [Path(p) for p in labels],
                    cls=None if cls is None else str(cls), source=src, split="test" if key == "test" else None,
                )
            )  # fmt: skip
    if not cases:
        raise BusiInputError(f"{datalist}: the datalist lists no images")
    return unique_ids(cases), problems


def scan_studies(studies: str | Path) -> tuple[list[SourceCase], list[str]]:
    """The images of a MONAI Label studies folder (its top level, as LocalDatastore lists them)
    with their ``labels/final`` label (image id = file name without its extension)."""
    studies = Path(studies)
    if not studies.is_dir():
        raise BusiInputError(f"{studies}: not a directory")
    final = studies / FINAL
    labels = {}
    if final.is_dir():
        for p in sorted(final.iterdir()):
            if is_image_file(p):
                labels.setdefault(stem_of(p), []).append(p)
    cases = []
    for p in sorted(studies.iterdir()):
        if is_image_file(p):
            found = labels.get(stem_of(p), [])
            if len(found) > 1:
                raise BusiInputError(f"{p}: several final labels ({', '.join(map(str, found))}); keep one")
            cases.append(SourceCase(stem_of(p), p, found, source=p.name))
    if not cases:
        raise BusiInputError(f"{studies}: no images in this studies folder")
    known = {stem_of(c.image) for c in cases}
    problems = [f"{f[0]}: final label without an image; ignored" for k, f in labels.items() if k not in known]
    return unique_ids(cases), problems


# The registry of sources by name (prepare's --images, --datalist, --studies).
SOURCES: dict[str, Callable[..., tuple[list[SourceCase], list[str]]]] = {
    "images": scan_images,
    "datalist": scan_datalist,
    "studies": scan_studies,
}


def detect_source(path: str | Path) -> str | None:
    """Which source a path is: a ``.json`` file is a datalist, a folder with ``labels/final``
    a studies folder, any other folder with images an image folder (labels beside them)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return "datalist"
    if path.is_dir():
        if (path / FINAL).is_dir():
            return "studies"
        if next((p for p in path.rglob("*") if is_image_file(p)), None) is not None:
            return "images"
    return None


def scan_source(kind: str, path: str | Path, labels: str | Path | None = None) -> tuple[list[SourceCase], list[str]]:
    """The cases of ``path`` read as the source ``kind`` (:data:`SOURCES`); ``labels`` only for
    ``images``. A folder holding ``images/`` and ``labels/`` is read as that pair."""
    if kind not in SOURCES:
        raise ValueError(f"unknown source {kind!r} (expected one of {', '.join(SOURCES)})")
    if kind != "images":
        return SOURCES[kind](path)
    path = Path(path)
    if labels is None and (path / "images").is_dir() and (path / "labels").is_dir():
        path, labels = path / "images", path / "labels"
    return scan_images(path, labels)
