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

from .io import BusiInputError, Image2D, atomic_path, read_image, read_mask, read_masks_union, write_array
from .jsonio import write_json

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


# --------------------------------------------------------------------------------------
# Near-duplicate detection
# --------------------------------------------------------------------------------------

# Thresholds chosen on the real BUSI folder (see the project report / tests): the score
# distributions of true duplicates and of unrelated images are well separated there.
THUMB_SIZE = 32
THUMB_THRESHOLD = 0.95  # NCC of 32x32 thumbnails (whole image, aspect ignored)
RESIZE_CANDIDATE = 0.88  # below THUMB_THRESHOLD: verified by speckle NCC after resampling
THUMB_MAX_ASPECT_CHANGE = 1.15  # resized copies keep their aspect ratio
TEMPLATE_SCALE = 8  # coarse search at 1/8 pixel scale
TEMPLATE_SIZE = 20  # central template of 20x20 coarse pixels (160 source pixels)
TEMPLATE_CANDIDATE = 0.70  # coarse template NCC to be verified
VERIFY_SCALE = 4  # verification at 1/4 pixel scale
VERIFY_THRESHOLD = 0.45  # high-pass (speckle) NCC of the overlap at 1/2 scale
VERIFY_MIN_OVERLAP = 0.25  # overlap / area of the smaller image
VERIFY_PRECHECK = 0.7  # plain NCC of the overlap at 1/4 scale needed before the speckle check
TEMPLATE_TOP_K = 4  # candidates per image (best coarse scores) sent to verification
VERIFY_MAX_SIDE = 128  # verification NCC on at most the central 128x128 of the overlap (1/2 scale)


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

    f = max(1, min(a.shape) // (2 * size))
    if f > 1:
        a = _block_mean(a, f)  # cheap anti-aliasing first: a Gaussian on the full image is slow
    t = resize(a, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float64).ravel()
    t -= t.mean()
    n = np.linalg.norm(t)
    return t / n if n > 0 else t


def _highpass(a: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    a = a.astype(np.float32)
    return a - gaussian_filter(a, sigma)


def _resized_speckle_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """High-pass NCC after resampling both images to half the smaller one's size."""
    from skimage.transform import resize

    shape = (min(a.shape[0], b.shape[0]) // 2, min(a.shape[1], b.shape[1]) // 2)
    ra = _highpass(resize(a, shape, anti_aliasing=True, preserve_range=True))
    rb = _highpass(resize(b, shape, anti_aliasing=True, preserve_range=True))
    return _ncc(ra, rb)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def _overlap_ncc(a: np.ndarray, b: np.ndarray, dy: int, dx: int, max_side: int | None = None) -> tuple[float, float]:
    """NCC of the overlap when a's pixel (y, x) sits on b's pixel (y + dy, x + dx); and the
    overlap's fraction of the smaller image. ``max_side`` keeps only the overlap's centre."""
    y0, x0 = max(0, -dy), max(0, -dx)
    y1, x1 = min(a.shape[0], b.shape[0] - dy), min(a.shape[1], b.shape[1] - dx)
    if y1 - y0 < 4 or x1 - x0 < 4:
        return 0.0, 0.0
    frac = (y1 - y0) * (x1 - x0) / min(a.size, b.size)
    if max_side is not None:
        if y1 - y0 > max_side:
            y0 += (y1 - y0 - max_side) // 2
            y1 = y0 + max_side
        if x1 - x0 > max_side:
            x0 += (x1 - x0 - max_side) // 2
            x1 = x0 + max_side
    pa = a[y0:y1, x0:x1]
    pb = b[y0 + dy : y1 + dy, x0 + dx : x1 + dx]
    return _ncc(pa, pb), frac


def _coarse_template_scores(coarse: list[np.ndarray], tsize: int, progress: bool = False):
    """For every ordered pair (i, j): best NCC of i's central tsize x tsize patch inside j,
    and where (top-left in j). Batched FFT cross-correlation with torch."""
    import torch

    n = len(coarse)
    from scipy.fft import next_fast_len

    H = next_fast_len(max(c.shape[0] for c in coarse), real=True)
    W = next_fast_len(max(c.shape[1] for c in coarse), real=True)
    canvas = torch.zeros((n, H, W), dtype=torch.float32)
    valid = torch.zeros((n, H, W), dtype=torch.bool)
    for j, c in enumerate(coarse):
        canvas[j, : c.shape[0], : c.shape[1]] = torch.from_numpy(c.astype(np.float32) - float(c.mean()))
        if c.shape[0] >= tsize and c.shape[1] >= tsize:
            valid[j, : c.shape[0] - tsize + 1, : c.shape[1] - tsize + 1] = True
    # Window sums via integral images -> std of every tsize x tsize window of every image.
    def box(x):
        s = torch.nn.functional.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))
        out = s[:, tsize:, tsize:] - s[:, :-tsize, tsize:] - s[:, tsize:, :-tsize] + s[:, :-tsize, :-tsize]
        return torch.nn.functional.pad(out, (0, tsize - 1, 0, tsize - 1))

    npx = tsize * tsize
    c64 = canvas.double()
    wsum, wsq = box(c64), box(c64 * c64)
    wstd = (wsq - wsum * wsum / npx).clamp_min(0).sqrt().float()
    valid &= wstd > 2.0 * tsize  # skip flat windows (std < 2 grey levels, e.g. black borders)
    # A crop lies inside its original, and the centre of the smaller of two shifted copies lies
    # in the larger: searching the smaller image's centre in the larger ones is enough.
    # Everything is kept in ascending-area order so that "the larger ones" is a contiguous slice.
    area = np.array([c.size for c in coarse])
    order = np.argsort(area, kind="stable")
    order_t = torch.from_numpy(order.astype(np.int64))
    valid, wstd = valid[order_t].contiguous(), wstd[order_t].contiguous()
    F = torch.fft.rfft2(canvas[order_t])
    del canvas, c64, wsum, wsq
    best = np.full((n, n), -1.0)
    where = np.zeros((n, n, 2), dtype=int)
    sorted_area = area[order]
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="duplicate search", unit="img", leave=False)
    for p in it:
        i = int(order[p])
        c = coarse[i]
        if c.shape[0] < tsize or c.shape[1] < tsize:
            continue
        start = int(np.searchsorted(sorted_area, area[i], side="left"))
        js = order[start:]
        y0, x0 = (c.shape[0] - tsize) // 2, (c.shape[1] - tsize) // 2
        t = c[y0 : y0 + tsize, x0 : x0 + tsize].astype(np.float64)
        t = t - t.mean()
        tn = np.linalg.norm(t)
        if tn < 2.0 * tsize:  # flat template (std < 2 grey levels): nothing to match
            continue
        tp = torch.zeros((H, W), dtype=torch.float32)
        tp[:tsize, :tsize] = torch.from_numpy((t / tn).astype(np.float32))
        corr = torch.fft.irfft2(F[start:] * torch.conj(torch.fft.rfft2(tp))[None], s=(H, W))
        score = torch.where(valid[start:], corr / wstd[start:].clamp_min(1e-9), torch.full_like(corr, -1.0))
        m, idx = score.reshape(len(js), -1).max(dim=1)
        best[i, js] = m.numpy()
        where[i, js, 0] = (idx // W).numpy() - y0  # offset of i inside j: i(y, x) -> j(y + dy, x + dx)
        where[i, js, 1] = (idx % W).numpy() - x0
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
    # 1b) near the threshold: resample both to one size and compare speckle (high-pass NCC)
    rescored = np.zeros((n, n))
    for i, j in zip(*np.nonzero(np.triu((tsim >= RESIZE_CANDIDATE) & (tsim < thumb_threshold), 1) & (ratio <= THUMB_MAX_ASPECT_CHANGE))):
        i, j = int(i), int(j)
        s_ = _resized_speckle_ncc(arrays[i], arrays[j])
        rescored[i, j] = rescored[j, i] = s_
        if s_ >= verify_threshold:
            links.append({"i": i, "j": j, "detector": "resized", "score": round(float(s_), 4), "thumbnail_score": round(float(tsim[i, j]), 4)})
            linked.add((i, j))
            uf.union(i, j)
    # 2) template matching at the same pixel scale: coarse FFT search -> top candidates ->
    #    offset refined at 1/4 scale -> verified by high-pass (speckle) NCC at 1/2 scale.
    coarse = [_block_mean(a, TEMPLATE_SCALE) for a in arrays]
    best, where = _coarse_template_scores(coarse, TEMPLATE_SIZE, progress=progress)
    np.fill_diagonal(best, -1.0)
    sym = np.maximum(best, best.T)
    cand = set()
    k = min(TEMPLATE_TOP_K, n - 1)
    if k > 0:
        top = np.argsort(-sym, axis=1)[:, :k]
        for i in range(n):
            for j in top[i]:
                if sym[i, j] >= candidate_threshold:
                    cand.add((min(i, int(j)), max(i, int(j))))
    quarter: dict[int, np.ndarray] = {}
    half: dict[int, np.ndarray] = {}
    verified = np.zeros((n, n))
    for i, j in sorted(cand):
        if best[i, j] >= best[j, i]:
            dy, dx = where[i, j] * TEMPLATE_SCALE
        else:
            dy, dx = -where[j, i] * TEMPLATE_SCALE
        for m in (i, j):
            if m not in quarter:
                quarter[m] = _block_mean(arrays[m], VERIFY_SCALE)
                half[m] = _highpass(_block_mean(arrays[m], 2))
        # offset at 1/4 scale, +-3 px around the coarse one, by plain NCC of the overlap
        fy, fx = int(round(dy / VERIFY_SCALE)), int(round(dx / VERIFY_SCALE))
        top_s, off = -1.0, None
        for ey in range(-3, 4):
            for ex in range(-3, 4):
                s_, frac = _overlap_ncc(quarter[i], quarter[j], fy + ey, fx + ex, max_side=64)
                if frac >= min_overlap and s_ > top_s:
                    top_s, off = s_, (fy + ey, fx + ex)
        if off is None or top_s < VERIFY_PRECHECK:
            continue  # a copy's overlap correlates almost perfectly at 1/4 scale
        # speckle-level check at 1/2 scale, +-2 px: only a real copy has the same speckle
        hs, hoff = -1.0, None
        for ey in range(-2, 3):
            for ex in range(-2, 3):
                s_, _ = _overlap_ncc(half[i], half[j], 2 * off[0] + ey, 2 * off[1] + ex, max_side=VERIFY_MAX_SIDE)
                if s_ > hs:
                    hs, hoff = s_, (2 * off[0] + ey, 2 * off[1] + ex)
        verified[i, j] = verified[j, i] = hs
        if hs >= verify_threshold and (i, j) not in linked:
            links.append(
                {
                    "i": i,
                    "j": j,
                    "detector": "template",
                    "score": round(float(hs), 4),
                    "coarse_score": round(float(sym[i, j]), 4),
                    "offset": [int(hoff[0] * 2), int(hoff[1] * 2)],
                    "overlap": round(float(_overlap_ncc(quarter[i], quarter[j], *off)[1]), 3),
                }
            )
            uf.union(i, j)
    groups_d: dict[int, list[int]] = {}
    for k in range(n):
        groups_d.setdefault(uf.find(k), []).append(k)
    groups = sorted((sorted(g) for g in groups_d.values()), key=lambda g: g[0])
    links.sort(key=lambda d: (d["i"], d["j"]))
    if return_scores:
        return groups, links, {"thumbnail": tsim, "resized": rescored, "template_coarse": sym, "template_verified": verified}
    return groups, links


# --------------------------------------------------------------------------------------
# Grouped stratified split
# --------------------------------------------------------------------------------------


def group_class(classes: Sequence[str]) -> str:
    """The class a duplicate group is stratified by: ``malignant`` if any member is malignant
    (the rarer, clinically decisive class), else the majority class of the members (ties go
    to ``benign``, i.e. lesion over normal)."""
    classes = list(classes)
    if len(set(classes)) == 1:  # one class (also one the BUSI release does not name, e.g. "lesion")
        return classes[0]
    if "malignant" in classes:
        return "malignant"
    nb, nn = classes.count("benign"), classes.count("normal")
    return "benign" if nb >= nn else "normal"


def grouped_stratified_split(cases: Sequence, groups: Sequence[Sequence[int]], test_fraction: float = 0.2, seed: int = 0):
    """Split case indices into ``(train, test)`` with every group wholly on one side.

    ``cases``: :class:`Case` objects (or class names); ``groups``: index lists covering the
    cases (singletons may be omitted). Each group is stratified by :func:`group_class`; per
    class, groups are shuffled (``seed``) and added to the test side while that brings the
    class's test image count closer to ``round(test_fraction * images of the class)``.
    Returns two sorted index lists.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    cls_of = [c.cls if isinstance(c, Case) else str(c) for c in cases]
    covered = {k for g in groups for k in g}
    all_groups = [list(g) for g in groups] + [[k] for k in range(len(cases)) if k not in covered]
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[list[int]]] = {}
    for g in all_groups:
        by_class.setdefault(group_class([cls_of[k] for k in g]), []).append(g)
    test: list[int] = []
    for cls in sorted(by_class):
        gs = by_class[cls]
        perm = rng.permutation(len(gs))
        target = round(test_fraction * sum(len(g) for g in gs))
        count = 0
        for p in perm:
            g = gs[p]
            if abs(count + len(g) - target) < abs(count - target):
                test.extend(g)
                count += len(g)
    test_set = set(test)
    return sorted(k for k in range(len(cases)) if k not in test_set), sorted(test_set)


# --------------------------------------------------------------------------------------
# Preparing a MONAI dataset
# --------------------------------------------------------------------------------------


def _stored_image(arr: np.ndarray) -> np.ndarray:
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
            write_array(_stored_image(img.array), staging / "images" / f"{case.id}.nii.gz", like=img)
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
        write_json({"groups": dup_groups, "thresholds": _thresholds()}, staging / "duplicates.json")
        write_json(summary, staging / "summary.json")
        _swap_in(staging, out, ["images", "labels", "dataset.json", "duplicates.json", "summary.json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _thresholds() -> dict:
    return {
        "thumbnail_ncc": THUMB_THRESHOLD,
        "resized_candidate_thumbnail_ncc": RESIZE_CANDIDATE,
        "max_aspect_change": THUMB_MAX_ASPECT_CHANGE,
        "template_scale": TEMPLATE_SCALE,
        "template_size": TEMPLATE_SIZE,
        "template_candidate_ncc": TEMPLATE_CANDIDATE,
        "template_top_k": TEMPLATE_TOP_K,
        "verify_precheck_ncc": VERIFY_PRECHECK,
        "speckle_ncc": VERIFY_THRESHOLD,
        "min_overlap": VERIFY_MIN_OVERLAP,
    }


# --------------------------------------------------------------------------------------
# MONAI Label studies folder
# --------------------------------------------------------------------------------------


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
            write_array(_stored_image(img.array), out / f"{case.id}.nii.gz", like=img)
            n_img += 1
            if label is not None:
                write_array(label, out / "labels" / "final" / f"{case.id}.nii.gz", like=img)
                n_lab += 1
    return {"source_kind": kind, "images": n_img, "labels": n_lab, "problems": problems, "out": str(out)}


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
