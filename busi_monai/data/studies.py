"""MONAI Label studies folders: images (and, optionally, final labels) laid out for the app's datastore."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from busi_monai.data.busi import load_case, scan_busi
from busi_monai.data.io import (
    BusiInputError,
    atomic_path,
    read_image,
    write_array,
)
from busi_monai.data.prepare import stored_image

# MONAI Label's default list lacks .jpeg, .seg.nrrd and .dcm. Order matters: LocalDatastore takes the
# last pattern a file name ends with as its extension, so ".seg.nrrd" must follow ".nrrd".
DATASTORE_EXTENSIONS = [
    "*.nii.gz", "*.nii", "*.nrrd", "*.seg.nrrd",
    "*.png", "*.PNG", "*.jpg", "*.JPG", "*.jpeg", "*.JPEG", "*.bmp", "*.tif", "*.tiff",
    "*.dcm",  # ultrasound DICOM dropped in from the scanner (read with its scan region)
]  # fmt: skip

def make_studies(src: str | Path, out: str | Path, with_labels: bool = False) -> dict:
    """Lay out a BUSI-layout folder or a prepared dataset folder (has ``dataset.json``) as a
    MONAI Label studies folder: ``out/<id>.nii.gz`` and, with ``with_labels``,
    ``out/labels/final/<id>.nii.gz`` (LocalDatastore's convention, same geometry as the image).
    Returns ``{"source_kind", "images", "labels", "problems", "out"}``."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    n_img = n_lab = 0
    if (src / "dataset.json").is_file():
        kind = "prepared"
        with open(src / "dataset.json") as f:
            dl = json.load(f)
        for e in list(dl.get("training", [])) + list(dl.get("test", [])):
            img_p = src / e["image"]
            cid = Path(e["image"]).name[: -len(".nii.gz")] if e["image"].endswith(".nii.gz") else Path(e["image"]).stem
            if not img_p.is_file():
                problems.append(f"{img_p}: listed in dataset.json but missing; skipped")
                continue
            _copy_atomic(img_p, out / f"{cid}.nii.gz")
            n_img += 1
            if with_labels and e.get("label"):
                lab_p = src / e["label"]
                if lab_p.is_file():
                    _copy_atomic(lab_p, out / "labels" / "final" / f"{cid}.nii.gz")
                    n_lab += 1
                else:
                    problems.append(f"{lab_p}: listed in dataset.json but missing; image kept without label")
    else:
        kind = "busi"
        cases, problems = scan_busi(src, check_readable=False)
        for case in cases:
            try:
                img, label = load_case(case) if with_labels else (read_image(case.image), None)
            except BusiInputError as e:
                problems.append(f"{e}; case {case.image.name} skipped")
                continue
            write_array(stored_image(img.array), out / f"{case.id}.nii.gz", like=img)
            n_img += 1
            if label is not None:
                write_array(label, out / "labels" / "final" / f"{case.id}.nii.gz", like=img)
                n_lab += 1
    return {"source_kind": kind, "images": n_img, "labels": n_lab, "problems": problems, "out": str(out)}


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _keep(i: int, fraction: float) -> bool:
    """Spread ``fraction`` of the indices evenly (i sorted by class, then number)."""
    return int((i + 1) * fraction) > int(i * fraction)


def build_studies(src: str | Path, studies: str | Path, label_fraction: float = 2 / 3) -> dict:
    """A MONAI Label studies folder from a BUSI-layout folder, labels for ``label_fraction`` of it."""
    from busi_monai.data.studies import make_studies

    studies = Path(studies)
    tmp = studies.parent / f".{studies.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    studies.parent.mkdir(parents=True, exist_ok=True)
    summary = make_studies(src, tmp, with_labels=label_fraction > 0)
    final = tmp / "labels" / "final"
    labelled, unlabelled = [], []
    if final.is_dir():
        for i, p in enumerate(sorted(q for q in final.iterdir() if q.is_file() and not q.name.startswith("."))):
            if _keep(i, label_fraction):
                labelled.append(p.name)
            else:
                p.unlink()
                unlabelled.append(p.name)
    os.replace(tmp, studies)
    return {"studies": str(studies), "source": str(src), "labelled": len(labelled), "unlabelled_by_design": len(unlabelled), "make_studies": summary}


def labelled_items(studies: str | Path) -> list[dict]:
    """(image, final label) pairs of a studies folder, as MONAI Label's datastore lists them."""
    from monailabel.datastore.local import LocalDatastore

    ds = LocalDatastore(str(studies), extensions=DATASTORE_EXTENSIONS, auto_reload=False)
    return [dict(it, id=Path(it["image"]).name.split(".")[0]) for it in ds.datalist()]
