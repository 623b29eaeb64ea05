"""Near-duplicate detection in BUSI: the same scan saved twice, resized, cropped, or filed under two classes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from busi_monai.data.io import (
    Image2D,
    read_image,
)

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

    # At least one template wide: images too small to hold one are only searched in (none here).
    H = next_fast_len(max(tsize, *(c.shape[0] for c in coarse)), real=True)
    W = next_fast_len(max(tsize, *(c.shape[1] for c in coarse)), real=True)
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


def thresholds() -> dict:
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
