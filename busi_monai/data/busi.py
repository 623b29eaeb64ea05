"""The BUSI layout as users' copies have it: ``<root>/<class>/<class> (N).png`` with
``<class> (N)_mask.png`` and, for extra lesions, ``_mask_1.png``, ``_mask_2.png``... The lesion
mask of an image is the union of its mask files. Near-duplicates: :mod:`busi_monai.data.duplicates`;
the split that keeps them apart: :mod:`busi_monai.data.splits`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from busi_monai.data.io import (
    BusiInputError,
    Image2D,
    read_image,
    read_mask,
    read_masks_union,
)

CLASSES = ("benign", "malignant", "normal")
_NAME_RE = re.compile(r"^(?P<cls>[A-Za-z]+) \((?P<num>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?\.png$", re.IGNORECASE)


@dataclass
class Case:
    """One image of the BUSI layout and its mask files (union = lesion mask)."""

    id: str  # e.g. "benign_0001"
    cls: str  # "benign" | "malignant" | "normal"
    number: int
    image: Path
    masks: list[Path] = field(default_factory=list)
    shape: tuple[int, int] | None = None  # (H, W) of the image

    @property
    def source(self) -> str:
        """Path relative to the BUSI root, e.g. ``benign/benign (1).png``."""
        return f"{self.image.parent.name}/{self.image.name}"


def case_id(cls: str, number: int) -> str:
    return f"{cls}_{number:04d}"


# --------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------


def scan_busi(root: str | Path, check_readable: bool = True) -> tuple[list[Case], list[str]]:
    """Find the cases of a BUSI-layout folder.

    Returns ``(cases, problems)``: cases sorted by (class, number); problems are messages that
    name the file (mask without image, image without mask, unreadable image or mask, mask of
    another size than its image, unrecognised file name). A case with a problem is skipped;
    everything else is kept. With ``check_readable`` every image and mask is decoded (a few
    seconds for all of BUSI), so that a case returned here is known to be good.
    """
    root = Path(root)
    if not root.is_dir():
        raise BusiInputError(f"{root}: not a directory")
    problems: list[str] = []
    images: dict[tuple[str, int], Path] = {}
    masks: dict[tuple[str, int], list[tuple[int, Path]]] = {}
    class_dirs = [root / c for c in CLASSES if (root / c).is_dir()]
    if not class_dirs:
        raise BusiInputError(f"{root}: no class folder ({', '.join(CLASSES)}) found; is this a BUSI-layout folder?")
    for d in class_dirs:
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or p.is_dir():
                continue
            m = _NAME_RE.match(p.name)
            if not m or m.group("cls").lower() != d.name:
                problems.append(f"{p}: unrecognised file name (expected '{d.name} (N).png' or '{d.name} (N)_mask.png'); ignored")
                continue
            key = (d.name, int(m.group("num")))
            if m.group("mask"):
                k = int(m.group("k")) if m.group("k") is not None else 0
                masks.setdefault(key, []).append((k, p))
            else:
                images[key] = p
    for key in sorted(set(masks) - set(images)):
        for _, p in sorted(masks[key]):
            problems.append(f"{p}: mask without image (no '{key[0]} ({key[1]}).png' beside it); skipped")
    cases: list[Case] = []
    for key in sorted(images):
        cls, num = key
        img_path = images[key]
        mlist = [p for _, p in sorted(masks.get(key, []))]
        if not mlist:
            problems.append(f"{img_path}: image without mask (expected '{cls} ({num})_mask.png'); skipped")
            continue
        case = Case(case_id(cls, num), cls, num, img_path, mlist)
        if check_readable:
            try:
                case.shape = read_image(img_path).shape
            except BusiInputError as e:
                problems.append(f"{e}; skipped")
                continue
            bad = False
            for mp in mlist:
                try:
                    read_mask(mp, expected_shape=case.shape)
                except BusiInputError as e:
                    problems.append(f"{e}; case {img_path.name} skipped")
                    bad = True
            if bad:
                continue
        cases.append(case)
    return cases, problems


def load_case(case: Case) -> tuple[Image2D, np.ndarray]:
    """The image and the union of its masks as uint8 {0, 1}."""
    img = read_image(case.image)
    return img, read_masks_union(case.masks, img.shape)
