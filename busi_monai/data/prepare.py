"""``busi-monai prepare``: a BUSI folder, or your own data (:mod:`busi_monai.data.sources`), to a
NIfTI dataset with duplicate groups and a leak-free test split."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from busi_monai.data.busi import CLASSES, load_case, scan_busi
from busi_monai.data.duplicates import find_duplicate_groups, thresholds
from busi_monai.data.io import (
    BusiInputError,
    Image2D,
    read_image,
    read_masks_union,
    write_array,
)
from busi_monai.data.region import crop_to_scan, outside_scan, scan_view
from busi_monai.data.sources import SourceCase, scan_source
from busi_monai.data.splits import grouped_stratified_split
from busi_monai.jsonio import write_json


def stored_image(arr: np.ndarray) -> np.ndarray:
    """uint8 when the values read are 8-bit integers (most PNGs), else float32 as read."""
    if arr.size and arr.min() >= 0 and arr.max() <= 255 and np.array_equal(arr, np.round(arr)):
        return arr.astype(np.uint8)
    return arr.astype(np.float32)


def _swap_in(staging: Path, out: Path, names: Sequence[str]) -> None:
    """Move ``names`` from ``staging`` into ``out``, replacing old ones (old dirs removed after)."""
    trash = []
    for name in names:
        src, dst = staging / name, out / name
        if dst.is_dir() and not dst.is_symlink():
            old = out / f".old-{name}-{os.getpid()}-{time.time_ns()}"
            os.replace(dst, old)
            trash.append(old)
        os.replace(src, dst)
    for t in trash:
        shutil.rmtree(t, ignore_errors=True)


@dataclass
class Record:
    """One image on its way into the dataset, whatever its source."""

    id: str
    cls: str | None  # the class the source names; None: stratified by lesion / no lesion
    source: str
    n_masks: int
    load: Callable[[], tuple[Image2D, np.ndarray | None]]  # (image, label or None: unlabelled)
    split: str | None = None  # "test" when the source fixes it


def prepare(busi_root: str | Path, out: str | Path, test_fraction: float = 0.2, seed: int = 0, progress: bool = True) -> dict:
    """Convert a BUSI-layout folder into a MONAI dataset folder.

    Writes ``out/images/<id>.nii.gz`` (uint8 when the source values are 8-bit, else float32),
    ``out/labels/<id>.nii.gz`` (uint8 {0,1}, the union of the mask files, same geometry),
    ``out/dataset.json`` (MONAI datalist with ``training`` and ``test``; entries carry
    ``class``, ``group``, ``source`` and ``n_masks``), ``out/duplicates.json`` (groups of
    near-duplicates with the links that joined them) and ``out/summary.json``. Everything is
    built in a staging folder inside ``out`` and swapped in at the end, so a rerun replaces a
    previous result cleanly and an interrupted run leaves the old one intact.
    Returns the summary dict.
    """
    busi_root = Path(busi_root)
    cases, problems = scan_busi(busi_root, check_readable=False)
    records = [
        Record(c.id, c.cls, str(c.image.relative_to(busi_root).as_posix()), len(c.masks), (lambda c=c: load_case(c)))
        for c in cases
    ]
    description = (
        "Breast ultrasound lesion segmentation (BUSI, Al-Dhabyani et al. 2020), converted by busi_monai.data.prepare; "
        f"grouped stratified split (near-duplicate groups kept on one side, test_fraction={test_fraction}, seed={seed})."
    )
    return build_dataset(
        records, out, "BUSI", description, {"busi_root": str(busi_root)}, problems,
        test_fraction=test_fraction, seed=seed, progress=progress, strict=False, classes=CLASSES,
    )  # fmt: skip


def prepare_source(
    kind: str,
    path: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    frame: int | None = None,
    label_value: float | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Your own data (``kind``: ``images``, ``datalist`` or ``studies``, see
    :mod:`busi_monai.data.sources`) into the same dataset folder as :func:`prepare` writes.

    Unlike a BUSI folder, where a bad case is skipped with a warning, any unreadable file or
    mask of another size than its image stops the run with an error naming the file, and
    nothing is written. ``frame``: the frame of multi-frame DICOMs; ``label_value``: the
    lesion's value in multi-label masks (default: any non-zero value). An ultrasound DICOM with
    a scan region is stored as that region (placed where it lies in the frame, with the
    region's pixel spacing in mm); the entry's ``region`` says where it lay in the frame.
    """
    cases, problems = scan_source(kind, path, labels)

    def loader(c: SourceCase):
        def load():
            img = read_image(c.image, frame=frame)
            label = read_masks_union(c.labels, img.shape, value=label_value) if c.labels else None
            return img, label

        return load

    records = [Record(c.id, c.cls, c.source, len(c.labels), loader(c), c.split) for c in cases]
    fixed = any(c.split == "test" for c in cases)
    description = (
        f"Lesion segmentation in breast ultrasound, converted by busi_monai.data.prepare from the {kind} source {path}; "
        + ("the source's own test list, with near-duplicates of its images moved to it." if fixed else
           f"grouped stratified split (near-duplicate groups kept on one side, test_fraction={test_fraction}, seed={seed}).")
    )  # fmt: skip
    origin = {"kind": kind, "path": str(path), **({"labels": str(labels)} if labels is not None else {})}
    return build_dataset(
        records, out, safe_name(Path(path).stem), description, {"source": origin}, problems,
        test_fraction=test_fraction, seed=seed, progress=progress, strict=True,
    )  # fmt: skip


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text) or "dataset"


def build_dataset(
    records: list[Record],
    out: str | Path,
    name: str,
    description: str,
    header: dict,
    problems: list[str],
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    strict: bool = False,
    classes: Sequence[str] = (),
) -> dict:
    """Read each record, write its image and label, group near-duplicates, split, and swap the
    result into ``out``. ``strict``: the first unreadable record stops everything (nothing is
    written, and an ``out`` this call made is removed); else it is skipped with a problem."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    out = Path(out)
    t0 = time.time()
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    ok = False
    try:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        good: list[Record] = []
        arrays: list[np.ndarray] = []
        labelled: dict[str, bool] = {}
        regions: dict[str, list[int]] = {}
        spacing: dict[str, list[float]] = {}
        it = records
        if progress:
            from tqdm import tqdm

            it = tqdm(records, desc=f"prepare {name}", unit="img")
        for rec in it:
            try:
                img, label = rec.load()
            except BusiInputError as e:
                if strict:
                    raise
                problems.append(f"{e}; case {Path(rec.source).name} skipped")
                continue
            # The network's view: an ultrasound DICOM's scan region, where it lies in the frame.
            view = scan_view(img)
            if img.region is not None:
                regions[rec.id] = list(img.region)
                spacing[rec.id] = [round(float(v), 6) for v in img.spacing]
            write_array(stored_image(view.array), staging / "images" / f"{rec.id}.nii.gz", like=view)
            if label is not None:
                lost = outside_scan(label, img)
                if lost:
                    problems.append(f"{rec.source}: {lost} lesion pixels of its label lie outside the scan region; left out")
                write_array(crop_to_scan(label, img), staging / "labels" / f"{rec.id}.nii.gz", like=view)
                if rec.cls is None:  # stratified by lesion / no lesion
                    rec.cls = "lesion" if label.any() else "normal"
            labelled[rec.id] = label is not None
            good.append(rec)
            arrays.append(view.array)
        groups, links = find_duplicate_groups(arrays, progress=progress)
        group_of = {}
        for g in groups:
            gname = good[g[0]].id if len(g) == 1 else f"dup_{good[g[0]].id}"
            for k in g:
                group_of[k] = gname
        with_label = [k for k in range(len(good)) if labelled[good[k].id]]
        fixed = {k for k in with_label if good[k].split == "test"}
        for k in range(len(good)):
            if good[k].split == "test" and not labelled[good[k].id]:
                problems.append(f"{good[k].source}: a test image without a label; listed as unlabelled (nothing to score it against)")
        if fixed:
            # The source's own test list, and every near-duplicate of it: no leak into training.
            test_groups = {group_of[k] for k in fixed}
            test = sorted(k for k in with_label if group_of[k] in test_groups)
            moved = len(test) - len(fixed)
            if moved:
                problems.append(f"{moved} training image(s) are near-duplicates of test images; moved to the test split")
        else:
            local = {k: i for i, k in enumerate(with_label)}
            sub_groups = [[local[k] for k in g if k in local] for g in groups]
            _, test_local = grouped_stratified_split([good[k].cls for k in with_label], [g for g in sub_groups if g], test_fraction, seed)
            test = sorted(with_label[i] for i in test_local)
        in_test = set(test)
        train = [k for k in with_label if k not in in_test]

        def entry(k: int) -> dict:
            r = good[k]
            e = {"image": f"images/{r.id}.nii.gz"}
            if labelled[r.id]:
                e["label"] = f"labels/{r.id}.nii.gz"
            e.update({"class": r.cls, "group": group_of[k], "source": r.source, "n_masks": r.n_masks})
            if r.id in regions:
                e["region"] = regions[r.id]  # (top, left, height, width) in the source frame
                e["spacing_mm"] = spacing[r.id]
            return e

        datalist = {
            "name": name,
            "description": description,
            "labels": {"background": 0, "lesion": 1},
            "training": [entry(k) for k in train],
            "test": [entry(k) for k in test],
        }
        unlabelled = [entry(k) for k in range(len(good)) if not labelled[good[k].id]]
        if unlabelled:
            datalist["unlabelled"] = unlabelled
        dup_groups = []
        for g in groups:
            if len(g) < 2:
                continue
            gs = set(g)
            dup_groups.append(
                {
                    "group": group_of[g[0]],
                    "ids": [good[k].id for k in g],
                    "sources": [good[k].source for k in g],
                    "classes": sorted({good[k].cls for k in g if good[k].cls is not None}),
                    "side": "test" if g[0] in in_test else "training" if labelled[good[g[0]].id] else "unlabelled",
                    "links": [
                        {**{kk: v for kk, v in l.items() if kk not in ("i", "j")}, "a": good[l["i"]].id, "b": good[l["j"]].id}
                        for l in links
                        if l["i"] in gs
                    ],
                }
            )
        classes = list(classes) or sorted({good[k].cls for k in with_label})
        summary = {
            **header,
            "images": len(good),
            "images_per_class": {c: sum(1 for k in with_label if good[k].cls == c) for c in classes},
            "images_with_merged_masks": sum(1 for r in good if r.n_masks > 1),
            "duplicate_groups": len(dup_groups),
            "images_in_duplicate_groups": sum(len(g["ids"]) for g in dup_groups),
            "cross_class_duplicate_groups": sum(1 for g in dup_groups if len(g["classes"]) > 1),
            "links_by_detector": {d: sum(1 for l in links if l["detector"] == d) for d in ("thumbnail", "resized", "template")},
            "train_per_class": {c: sum(1 for k in train if good[k].cls == c) for c in classes},
            "test_per_class": {c: sum(1 for k in in_test if good[k].cls == c) for c in classes},
            "train": len(train),
            "test": len(test),
            "test_fraction": test_fraction,
            "seed": seed,
            "problems": problems,
            "seconds": round(time.time() - t0, 1),
        }
        if "source" in header:  # your own data: what a BUSI folder never has
            summary["unlabelled"] = len(unlabelled)
            summary["cropped_to_scan_region"] = len(regions)
            summary["split_from"] = "source test list" if fixed else "grouped stratified split"
        write_json(datalist, staging / "dataset.json")
        write_json({"groups": dup_groups, "thresholds": thresholds()}, staging / "duplicates.json")
        write_json(summary, staging / "summary.json")
        _swap_in(staging, out, ["images", "labels", "dataset.json", "duplicates.json", "summary.json"])
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok and made_out:
            shutil.rmtree(out, ignore_errors=True)
    return summary
