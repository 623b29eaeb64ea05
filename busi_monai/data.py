"""BUSI dataset handling: scanning the public layout, near-duplicate grouping, a leak-free
grouped stratified split, conversion to a MONAI datalist, and MONAI Label studies folders.

Layout (the public release): ``<root>/<class>/<class> (N).png`` with ``<class> (N)_mask.png``
and, for extra lesions, ``<class> (N)_mask_1.png``, ``_mask_2.png``... The lesion mask of an
image is the union of its mask files.

Near-duplicates (about 19% of BUSI) are found by two detectors (see
:func:`find_duplicate_groups`): a global descriptor (NCC of 32x32 thumbnails) for identical and
resized copies, and same-pixel-scale template matching for cropped/shifted copies, verified
by the NCC of the whole overlap. Linked images are merged into groups by union-find, and
:func:`grouped_stratified_split` keeps every group on one side of the split.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .io import BusiInputError, Image2D, read_image, read_mask, write_array

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
    label = np.zeros(img.shape, dtype=np.uint8)
    for mp in case.masks:
        label |= read_mask(mp, expected_shape=img.shape)
    return img, label


# --------------------------------------------------------------------------------------
# Near-duplicate detection
# --------------------------------------------------------------------------------------

# Thresholds chosen on the real BUSI folder (see the project report / tests): the score
# distributions of true duplicates and of unrelated images are well separated there.
THUMB_SIZE = 32
THUMB_THRESHOLD = 0.95  # NCC of 32x32 thumbnails (whole image, aspect ignored)
THUMB_MAX_ASPECT_CHANGE = 1.15  # resized copies keep their aspect ratio
TEMPLATE_SCALE = 8  # coarse search at 1/8 pixel scale
TEMPLATE_SIZE = 20  # central template of 20x20 coarse pixels (160 source pixels)
TEMPLATE_CANDIDATE = 0.80  # coarse template NCC to be verified
VERIFY_SCALE = 4  # verification at 1/4 pixel scale
VERIFY_THRESHOLD = 0.90  # NCC over the whole overlap of the two images
VERIFY_MIN_OVERLAP = 0.25  # overlap / area of the smaller image


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def _as_array(x) -> np.ndarray:
    if isinstance(x, Image2D):
        return x.array
    if isinstance(x, (str, Path)):
        return read_image(x).array
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {a.shape}")
    return a


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _thumbnail(a: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    from skimage.transform import resize

    t = resize(a, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float64).ravel()
    t -= t.mean()
    n = np.linalg.norm(t)
    return t / n if n > 0 else t


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def _overlap_ncc(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> tuple[float, float]:
    """NCC of the overlap when a's pixel (y, x) sits on b's pixel (y + dy, x + dx); and the
    overlap's fraction of the smaller image."""
    y0, x0 = max(0, -dy), max(0, -dx)
    y1, x1 = min(a.shape[0], b.shape[0] - dy), min(a.shape[1], b.shape[1] - dx)
    if y1 - y0 < 4 or x1 - x0 < 4:
        return 0.0, 0.0
    pa = a[y0:y1, x0:x1]
    pb = b[y0 + dy : y1 + dy, x0 + dx : x1 + dx]
    frac = pa.size / min(a.size, b.size)
    return _ncc(pa, pb), frac


def _coarse_template_scores(coarse: list[np.ndarray], tsize: int, progress: bool = False):
    """For every ordered pair (i, j): best NCC of i's central tsize x tsize patch inside j,
    and where (top-left in j). Batched FFT cross-correlation with torch."""
    import torch

    n = len(coarse)
    H = max(c.shape[0] for c in coarse)
    W = max(c.shape[1] for c in coarse)
    canvas = torch.zeros((n, H, W), dtype=torch.float64)
    valid = torch.zeros((n, H, W), dtype=torch.bool)
    for j, c in enumerate(coarse):
        canvas[j, : c.shape[0], : c.shape[1]] = torch.from_numpy(c.astype(np.float64))
        if c.shape[0] >= tsize and c.shape[1] >= tsize:
            valid[j, : c.shape[0] - tsize + 1, : c.shape[1] - tsize + 1] = True
    # Window sums via integral images -> std of every tsize x tsize window of every image.
    def box(x):
        s = torch.nn.functional.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))
        out = s[:, tsize:, tsize:] - s[:, :-tsize, tsize:] - s[:, tsize:, :-tsize] + s[:, :-tsize, :-tsize]
        return torch.nn.functional.pad(out, (0, tsize - 1, 0, tsize - 1))

    npx = tsize * tsize
    wsum, wsq = box(canvas), box(canvas * canvas)
    wvar = (wsq - wsum * wsum / npx).clamp_min(0)
    wstd = wvar.sqrt()
    valid &= wstd > 2.0 * tsize  # skip flat windows (std < 2 grey levels, e.g. black borders)
    F = torch.fft.rfft2(canvas)
    best = np.full((n, n), -1.0)
    where = np.zeros((n, n, 2), dtype=int)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="template search", unit="img")
    for i in it:
        c = coarse[i]
        if c.shape[0] < tsize or c.shape[1] < tsize:
            continue
        y0, x0 = (c.shape[0] - tsize) // 2, (c.shape[1] - tsize) // 2
        t = c[y0 : y0 + tsize, x0 : x0 + tsize].astype(np.float64)
        t = t - t.mean()
        tn = np.linalg.norm(t)
        if tn < 2.0 * tsize:  # flat template (std < 2 grey levels): nothing to match
            continue
        tp = torch.zeros((H, W), dtype=torch.float64)
        tp[:tsize, :tsize] = torch.from_numpy(t / tn)
        corr = torch.fft.irfft2(F * torch.conj(torch.fft.rfft2(tp))[None], s=(H, W))
        score = torch.where(valid, corr / wstd.clamp_min(1e-9), torch.full_like(corr, -1.0))
        flat = score.reshape(n, -1)
        m, idx = flat.max(dim=1)
        best[i] = m.numpy()
        where[i, :, 0] = (idx // W).numpy() - y0  # offset of i inside j: i(y, x) -> j(y + dy, x + dx)
        where[i, :, 1] = (idx % W).numpy() - x0
    return best, where


def find_duplicate_groups(
    images: Sequence,
    thumb_threshold: float = THUMB_THRESHOLD,
    candidate_threshold: float = TEMPLATE_CANDIDATE,
    verify_threshold: float = VERIFY_THRESHOLD,
    min_overlap: float = VERIFY_MIN_OVERLAP,
    progress: bool = False,
    return_scores: bool = False,
):
    """Group exact, resized, and cropped/shifted copies among ``images``.

    ``images``: 2D arrays, :class:`Image2D` objects or paths (any mix).

    Two detectors link a pair (i, j):

    * ``thumbnail``: NCC of 32x32 anti-aliased thumbnails of the whole images >=
      ``thumb_threshold`` and aspect ratios within 15% -- identical and resized copies.
    * ``template``: at 1/8 pixel scale, the central 20x20 patch of one image is searched in
      the other (batched FFT NCC, both directions); a peak >= ``candidate_threshold`` gives an
      offset, which is refined at 1/4 scale (+-3 px) and accepted when the NCC over the whole
      overlap of the two images is >= ``verify_threshold`` and the overlap covers at least
      ``min_overlap`` of the smaller image -- cropped and shifted copies at the same pixel scale.

    Returns ``(groups, links)``: ``groups`` is a list of sorted index lists covering every
    image (singletons included), sorted by first index; ``links`` is a list of dicts
    ``{"i", "j", "detector", "score"}`` (``offset`` = (dy, dx) source pixels for template
    links). With ``return_scores`` a third item, the dict of score matrices, is returned.
    """
    arrays = [_as_array(x) for x in images]
    n = len(arrays)
    links: list[dict] = []
    uf = _UnionFind(n)
    if n == 0:
        return ([], [], {}) if return_scores else ([], [])
    # 1) thumbnails
    thumbs = np.stack([_thumbnail(a) for a in arrays])
    tsim = thumbs @ thumbs.T
    aspect = np.array([a.shape[1] / a.shape[0] for a in arrays])
    ratio = np.maximum(aspect[:, None] / aspect[None, :], aspect[None, :] / aspect[:, None])
    linked = set()
    for i, j in zip(*np.nonzero(np.triu(tsim >= thumb_threshold, 1) & (ratio <= THUMB_MAX_ASPECT_CHANGE))):
        i, j = int(i), int(j)
        links.append({"i": i, "j": j, "detector": "thumbnail", "score": round(float(tsim[i, j]), 4)})
        linked.add((i, j))
        uf.union(i, j)
    # 2) template matching at the same pixel scale
    coarse = [_block_mean(a, TEMPLATE_SCALE) for a in arrays]
    best, where = _coarse_template_scores(coarse, TEMPLATE_SIZE, progress=progress)
    np.fill_diagonal(best, -1.0)
    sym = np.maximum(best, best.T)
    fine = {}
    verified = np.zeros((n, n))
    for i, j in zip(*np.nonzero(np.triu(sym >= candidate_threshold, 1))):
        i, j = int(i), int(j)
        # use the stronger direction's offset, expressed as i -> j
        if best[i, j] >= best[j, i]:
            dy, dx = where[i, j] * TEMPLATE_SCALE
        else:
            dy, dx = -where[j, i] * TEMPLATE_SCALE
        for k in (i, j):
            if k not in fine:
                fine[k] = _block_mean(arrays[k], VERIFY_SCALE)
        fy, fx = int(round(dy / VERIFY_SCALE)), int(round(dx / VERIFY_SCALE))
        top, top_off, top_frac = -1.0, (fy, fx), 0.0
        for ey in range(-3, 4):
            for ex in range(-3, 4):
                s, frac = _overlap_ncc(fine[i], fine[j], fy + ey, fx + ex)
                if frac >= min_overlap and s > top:
                    top, top_off, top_frac = s, (fy + ey, fx + ex), frac
        verified[i, j] = verified[j, i] = top
        if top >= verify_threshold and (i, j) not in linked:
            links.append(
                {
                    "i": i,
                    "j": j,
                    "detector": "template",
                    "score": round(float(top), 4),
                    "coarse_score": round(float(sym[i, j]), 4),
                    "offset": [int(top_off[0] * VERIFY_SCALE), int(top_off[1] * VERIFY_SCALE)],
                    "overlap": round(float(top_frac), 3),
                }
            )
            uf.union(i, j)
    groups_d: dict[int, list[int]] = {}
    for k in range(n):
        groups_d.setdefault(uf.find(k), []).append(k)
    groups = sorted((sorted(g) for g in groups_d.values()), key=lambda g: g[0])
    links.sort(key=lambda d: (d["i"], d["j"]))
    if return_scores:
        return groups, links, {"thumbnail": tsim, "template_coarse": sym, "template_verified": verified}
    return groups, links
