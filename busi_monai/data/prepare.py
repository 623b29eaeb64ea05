"""``busi-monai prepare``: a BUSI folder to a NIfTI dataset with duplicate groups and a leak-free test split."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from busi_monai.data.busi import CLASSES, Case, load_case, scan_busi
from busi_monai.data.duplicates import find_duplicate_groups, thresholds
from busi_monai.data.io import (
    BusiInputError,
    write_array,
)
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
    busi_root, out = Path(busi_root), Path(out)
    t0 = time.time()
    cases, problems = scan_busi(busi_root, check_readable=False)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        good: list[Case] = []
        arrays: list[np.ndarray] = []
        n_masks: dict[str, int] = {}
        it = cases
        if progress:
            from tqdm import tqdm

            it = tqdm(cases, desc="prepare BUSI", unit="img")
        for case in it:
            try:
                img, label = load_case(case)
            except BusiInputError as e:
                problems.append(f"{e}; case {case.image.name} skipped")
                continue
            case.shape = img.shape
            write_array(stored_image(img.array), staging / "images" / f"{case.id}.nii.gz", like=img)
            write_array(label, staging / "labels" / f"{case.id}.nii.gz", like=img)
            n_masks[case.id] = len(case.masks)
            good.append(case)
            arrays.append(img.array)
        groups, links = find_duplicate_groups(arrays, progress=progress)
        train, test = grouped_stratified_split(good, groups, test_fraction=test_fraction, seed=seed)
        group_of = {}
        for g in groups:
            gname = good[g[0]].id if len(g) == 1 else f"dup_{good[g[0]].id}"
            for k in g:
                group_of[k] = gname

        def entry(k: int) -> dict:
            c = good[k]
            return {
                "image": f"images/{c.id}.nii.gz",
                "label": f"labels/{c.id}.nii.gz",
                "class": c.cls,
                "group": group_of[k],
                "source": str(c.image.relative_to(busi_root).as_posix()),
                "n_masks": n_masks[c.id],
            }

        datalist = {
            "name": "BUSI",
            "description": (
                "Breast ultrasound lesion segmentation (BUSI, Al-Dhabyani et al. 2020), converted by busi_monai.data.prepare; "
                f"grouped stratified split (near-duplicate groups kept on one side, test_fraction={test_fraction}, seed={seed})."
            ),
            "labels": {"background": 0, "lesion": 1},
            "training": [entry(k) for k in train],
            "test": [entry(k) for k in test],
        }
        dup_groups = []
        for g in groups:
            if len(g) < 2:
                continue
            gs = set(g)
            dup_groups.append(
                {
                    "group": group_of[g[0]],
                    "ids": [good[k].id for k in g],
                    "sources": [entry(k)["source"] for k in g],
                    "classes": sorted({good[k].cls for k in g}),
                    "side": "test" if g[0] in set(test) else "training",
                    "links": [
                        {**{kk: v for kk, v in l.items() if kk not in ("i", "j")}, "a": good[l["i"]].id, "b": good[l["j"]].id}
                        for l in links
                        if l["i"] in gs
                    ],
                }
            )
        in_test = set(test)
        per_class = {c: sum(1 for x in good if x.cls == c) for c in CLASSES}
        summary = {
            "busi_root": str(busi_root),
            "images": len(good),
            "images_per_class": per_class,
            "images_with_merged_masks": sum(1 for v in n_masks.values() if v > 1),
            "duplicate_groups": len(dup_groups),
            "images_in_duplicate_groups": sum(len(g["ids"]) for g in dup_groups),
            "cross_class_duplicate_groups": sum(1 for g in dup_groups if len(g["classes"]) > 1),
            "links_by_detector": {d: sum(1 for l in links if l["detector"] == d) for d in ("thumbnail", "resized", "template")},
            "train_per_class": {c: sum(1 for k in train if good[k].cls == c) for c in CLASSES},
            "test_per_class": {c: sum(1 for k in in_test if good[k].cls == c) for c in CLASSES},
            "train": len(train),
            "test": len(test),
            "test_fraction": test_fraction,
            "seed": seed,
            "problems": problems,
            "seconds": round(time.time() - t0, 1),
        }
        write_json(datalist, staging / "dataset.json")
        write_json({"groups": dup_groups, "thresholds": thresholds()}, staging / "duplicates.json")
        write_json(summary, staging / "summary.json")
        _swap_in(staging, out, ["images", "labels", "dataset.json", "duplicates.json", "summary.json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
