"""Synthetic B-mode-like breast ultrasound images in the BUSI layout (for tests and demos).

Not BUSI and not clinically realistic: smoothed tissue layers (skin, subcutaneous fat with
hypoechoic fat lobules, fibroglandular tissue, Cooper's ligaments), depth attenuation,
multiplicative Rayleigh speckle and log compression; hypoechoic lesions (benign: smooth
wider-than-tall ovals, often with posterior enhancement; malignant: irregular/spiculated,
taller-than-wide, often with posterior acoustic shadowing). Fat lobules are about as dark
as the lesions, so a global intensity threshold does clearly worse than a learned model.

The file quirks of the real release are mimicked: some images are RGB with identical
channels, lesion masks are mostly 1-bit with a few RGBA, normal masks are all-zero RGB, and
some benign images have a second lesion in ``_mask_1.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

CLASS_FRACTIONS = {"normal": 0.3, "benign": 0.4, "malignant": 0.3}


def _class_counts(count: int) -> dict[str, int]:
    n_normal = round(count * CLASS_FRACTIONS["normal"])
    n_mal = round(count * CLASS_FRACTIONS["malignant"])
    return {"benign": count - n_normal - n_mal, "malignant": n_mal, "normal": n_normal}


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return (f - f.mean()) / (f.std() + 1e-9)


def _tissue(rng, h: int, w: int) -> np.ndarray:
    """Echogenicity map (before speckle), roughly in [0.1, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    depth = yy / h
    # wavy layer boundaries
    wave = lambda amp, per, ph: amp * np.sin(2 * np.pi * xx / per + ph)
    skin = 0.04 + wave(0.01, w * rng.uniform(0.8, 2), rng.uniform(0, 6))
    fat = rng.uniform(0.18, 0.35) + wave(0.04, w * rng.uniform(0.5, 1.5), rng.uniform(0, 6))
    gland = rng.uniform(0.65, 0.85) + wave(0.05, w * rng.uniform(0.5, 1.5), rng.uniform(0, 6))
    e = np.full((h, w), 0.55)
    e[depth < skin] = 0.95
    sub = (depth >= skin) & (depth < fat)
    e[sub] = 0.45
    e[(depth >= fat) & (depth < gland)] = 0.75  # fibroglandular
    e[depth >= gland] = 0.35  # chest wall / muscle, darker
    e = ndi.gaussian_filter(e, 2.0)
    # fat lobules: dark rounded blobs, as dark as lesions (the threshold trap)
    lob = _smooth_noise(rng, (h, w), sigma=(h * 0.035, w * 0.06))
    lobules = lob > rng.uniform(0.6, 1.0)
    e = np.where(lobules & (depth > skin), e * rng.uniform(0.35, 0.5), e)
    # Cooper's ligaments / bright streaks
    streak = _smooth_noise(rng, (h, w), sigma=(1.5, w * 0.08))
    e = e + 0.25 * np.clip(streak - 1.2, 0, None)
    # low-frequency texture
    e = e * (1 + 0.18 * _smooth_noise(rng, (h, w), sigma=(h * 0.05, w * 0.08)))
    return ndi.gaussian_filter(np.clip(e, 0.05, 1.2), 1.0)


def _lesion_mask(rng, h: int, w: int, malignant: bool, avoid: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
    """An irregular star-shaped region; returns (mask bool, (cy, cx, ry, rx))."""
    for _ in range(20):
        base = rng.uniform(0.08, 0.16) * min(h, w)
        if malignant:
            ry, rx = base * rng.uniform(1.0, 1.4), base * rng.uniform(0.7, 1.0)  # taller than wide
        else:
            ry, rx = base * rng.uniform(0.55, 0.8), base * rng.uniform(1.0, 1.4)  # wider than tall
        cy = rng.uniform(0.3, 0.65) * h
        cx = rng.uniform(0.25, 0.75) * w
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        dy, dx = (yy - cy) / ry, (xx - cx) / rx
        r = np.hypot(dy, dx)
        th = np.arctan2(dy, dx)
        rad = np.ones_like(th)
        nharm = 6 if malignant else 3
        for k in range(2, 2 + nharm):
            amp = (rng.uniform(0.04, 0.12) if malignant else rng.uniform(0.0, 0.04)) / (1 + 0.3 * (k - 2))
            rad += amp * np.cos(k * th + rng.uniform(0, 2 * np.pi))
        if malignant:  # spicules
            for _s in range(int(rng.integers(5, 12))):
                a0 = rng.uniform(-np.pi, np.pi)
                d = np.angle(np.exp(1j * (th - a0)))
                rad += rng.uniform(0.15, 0.45) * np.exp(-(d / rng.uniform(0.05, 0.12)) ** 2)
        m = r <= rad
        if avoid is None or not (ndi.binary_dilation(m, iterations=5) & avoid).any():
            if m.sum() >= 30:
                return m, (cy, cx, ry, rx)
    return np.zeros((h, w), bool), (0, 0, 0, 0)


def _make_case(rng, cls: str, size_range: tuple[int, int], second_lesion_p: float = 0.25):
    h = int(rng.integers(size_range[0], size_range[1] + 1))
    w = int(np.clip(round(h * rng.uniform(0.9, 1.6)), 32, 2 * size_range[1]))
    e = _tissue(rng, h, w)
    masks: list[np.ndarray] = []
    n_lesions = 0 if cls == "normal" else (2 if cls == "benign" and rng.random() < second_lesion_p else 1)
    union = np.zeros((h, w), bool)
    for _ in range(n_lesions):
        m, (cy, cx, ry, rx) = _lesion_mask(rng, h, w, cls == "malignant", avoid=union if union.any() else None)
        if not m.any():
            continue
        masks.append(m)
        union |= m
        soft = ndi.gaussian_filter(m.astype(float), 1.5 if cls == "benign" else 0.8)
        level = rng.uniform(0.2, 0.4) if cls == "malignant" else rng.uniform(0.15, 0.45)
        inner = level * (1 + 0.25 * _smooth_noise(rng, (h, w), sigma=3))
        e = e * (1 - soft) + np.clip(inner, 0.03, 1) * soft
        # posterior features below the lesion
        cols = ndi.gaussian_filter1d(m.any(axis=0).astype(float), 2)
        below = (np.arange(h)[:, None] > cy + 0.7 * ry).astype(float)
        fade = np.exp(-np.clip(np.arange(h)[:, None] - (cy + ry), 0, None) / (h * 0.4))
        effect = rng.uniform(0.4, 0.7) if (cls == "malignant" and rng.random() < 0.7) else (
            rng.uniform(1.2, 1.5) if rng.random() < 0.6 else 1.0
        )
        e = e * (1 + (effect - 1) * below * cols[None, :] * fade * (1 - soft))
    # depth attenuation (partly compensated, like TGC)
    yy = np.arange(h)[:, None] / h
    e = e * np.exp(-rng.uniform(0.6, 1.4) * yy)
    # multiplicative Rayleigh speckle, slightly correlated (grain of 1-2 px), then log compression
    sp = rng.rayleigh(1.0, (h, w))
    sp = ndi.gaussian_filter(sp, (0.8, 1.2))
    sp /= sp.mean()
    env = e * sp
    img = np.log1p(12 * env) / np.log1p(12 * 1.3)
    img = np.clip(img * rng.uniform(0.85, 1.05) * 255, 0, 255).astype(np.uint8)
    # black band at the top like a probe's near field, and a tiny burnt-in marker
    img[: max(1, h // 60), :] = 0
    if rng.random() < 0.5:
        y0, x0 = int(rng.integers(2, 10)), int(rng.integers(2, max(3, w // 8)))
        img[y0 : y0 + 3, x0 : x0 + 8] = 255
    return img, masks


def synthesize(out: str | Path, count: int, seed: int = 0, size_range: tuple[int, int] = (160, 320)) -> dict:
    """Write ``count`` synthetic cases in the BUSI layout under ``out`` (deterministic by seed).

    Class split: 30% normal, 30% malignant, the rest benign. Returns
    ``{"out", "count", "per_class", "second_lesions"}``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    lo, hi = int(size_range[0]), int(size_range[1])
    if lo < 32 or hi < lo:
        raise ValueError(f"size_range must be (min, max) with 32 <= min <= max, got {size_range}")
    out = Path(out)
    counts = _class_counts(count)
    second = 0
    k = 0
    for cls in ("benign", "malignant", "normal"):
        d = out / cls
        d.mkdir(parents=True, exist_ok=True)
        for num in range(1, counts[cls] + 1):
            rng = np.random.default_rng([seed, k])
            k += 1
            img, masks = _make_case(rng, cls, (lo, hi))
            name = f"{cls} ({num})"
            if rng.random() < 0.15:
                Image.fromarray(np.stack([img] * 3, axis=-1), "RGB").save(d / f"{name}.png")
            else:
                Image.fromarray(img, "L").save(d / f"{name}.png")
            if cls == "normal" or not masks:
                Image.fromarray(np.zeros(img.shape + (3,), np.uint8), "RGB").save(d / f"{name}_mask.png")
            for j, m in enumerate(masks):
                fn = d / (f"{name}_mask.png" if j == 0 else f"{name}_mask_{j}.png")
                if rng.random() < 0.15:
                    rgba = np.zeros(m.shape + (4,), np.uint8)
                    rgba[..., :3] = m[..., None] * 255
                    rgba[..., 3] = 255
                    Image.fromarray(rgba, "RGBA").save(fn)
                else:
                    Image.fromarray(m).convert("1").save(fn)
            second += max(0, len(masks) - 1)
    return {"out": str(out), "count": count, "per_class": counts, "second_lesions": second}


# The copies :func:`synthesize_with_duplicates` plants, one original each: the ways BUSI's own
# near-duplicates differ (Pawlowska et al. 2023), alone and combined.
DUPLICATE_CHANGES = (
    "crop",  # a few pixels off every side
    "shift",  # content moved, the uncovered strip black
    "shrink",  # resized to 80%
    "enlarge",  # resized to 120%
    "jpeg",  # through a JPEG save (quality 70), stored as PNG again
    "mode",  # the same pixels, the other PNG mode (L <-> RGB)
    "brightness",  # gain and offset nudged
    "crop+jpeg+brightness",
)


def _apply_change(change: str, img: np.ndarray, masks: list[np.ndarray], rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """``img`` (uint8 H x W) and its masks (bool) after ``change`` (parts joined by ``+``)."""
    import io

    for part in change.split("+"):
        h, w = img.shape
        if part == "crop":
            t, b, l, r = (int(v) for v in rng.integers(3, 13, size=4))
            img, masks = img[t : h - b, l : w - r], [m[t : h - b, l : w - r] for m in masks]
        elif part == "shift":
            dy, dx = int(rng.integers(8, 24)), int(rng.integers(8, 24)) * int(rng.choice([-1, 1]))

            def move(a):
                out = np.zeros_like(a)
                src = a[: h - dy, max(0, -dx) : w - max(0, dx)]
                out[dy:, max(0, dx) : w - max(0, -dx)] = src
                return out

            img, masks = move(img), [move(m) for m in masks]
        elif part in ("shrink", "enlarge"):
            f = 0.8 if part == "shrink" else 1.2
            size = (round(w * f), round(h * f))
            img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
            masks = [np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)) for m in masks]
        elif part == "jpeg":
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=70)
            img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
        elif part == "brightness":
            gain, offset = rng.uniform(0.85, 0.95), rng.uniform(10, 20)
            img = np.clip(img.astype(np.float64) * gain + offset, 0, 255).astype(np.uint8)
        elif part != "mode":  # mode: the pixels stay; the writer switches L <-> RGB
            raise ValueError(f"unknown change {part!r}; known: {DUPLICATE_CHANGES}")
    return img, masks


def synthesize_with_duplicates(
    out: str | Path,
    count: int,
    seed: int = 0,
    changes: tuple[str, ...] = DUPLICATE_CHANGES,
    size_range: tuple[int, int] = (300, 340),
) -> dict:
    """:func:`synthesize` ``count`` distinct cases, then plant one near-duplicate copy of a
    different original per entry of ``changes`` (see :data:`DUPLICATE_CHANGES`), as BUSI's
    copies are: a lesion image's copy goes to the other lesion class (benign <-> malignant),
    a normal image's stays normal; each copy is a new case number with its masks changed the
    same way, and the PNG mode of the other file of the pair (L <-> RGB) for ``mode``.

    ``size_range`` is BUSI-like (its images are at least 310 pixels high): the duplicate
    finder verifies a match on the central 256 pixels of the overlap, and in smaller images
    the black near-field band every synthetic scan has at its top can link unrelated ones.

    Returns :func:`synthesize`'s dict with ``count`` (all images, copies included),
    ``per_class`` updated, and ``duplicates``: a list of ``{"original", "copy", "change"}``
    with the images' paths relative to ``out`` (e.g. ``benign/benign (3).png``).
    """
    if count < len(changes):
        raise ValueError(f"count must be >= {len(changes)} (one original per change), got {count}")
    out = Path(out)
    info = synthesize(out, count, seed=seed, size_range=size_range)
    per_class = dict(info["per_class"])
    rng = np.random.default_rng([seed, 1_000_003])  # apart from the cases' own streams [seed, k]
    originals = [(cls, num) for cls in ("benign", "malignant", "normal") for num in range(1, per_class[cls] + 1)]
    picked = rng.choice(len(originals), size=len(changes), replace=False)
    duplicates = []
    for change, p in zip(changes, picked):
        cls, num = originals[int(p)]
        src = out / cls / f"{cls} ({num})"
        with Image.open(f"{src}.png") as im:
            mode = im.mode
            img = np.asarray(im.convert("L"))
        masks = []
        for f in sorted(out.glob(f"{cls}/{cls} ({num})_mask*.png")):
            with Image.open(f) as m:
                masks.append(np.asarray(m.convert("L")) > 0)
        img, masks = _apply_change(change, img, masks, rng)
        to = {"benign": "malignant", "malignant": "benign"}.get(cls, cls)
        per_class[to] += 1
        dst = out / to / f"{to} ({per_class[to]})"
        if ("mode" in change.split("+")) == (mode == "L"):
            Image.fromarray(np.stack([img] * 3, axis=-1), "RGB").save(f"{dst}.png")
        else:
            Image.fromarray(img, "L").save(f"{dst}.png")
        if not any(m.any() for m in masks):
            Image.fromarray(np.zeros(img.shape + (3,), np.uint8), "RGB").save(f"{dst}_mask.png")
        else:
            for j, m in enumerate(masks):
                Image.fromarray(m).convert("1").save(f"{dst}_mask.png" if j == 0 else f"{dst}_mask_{j}.png")
        duplicates.append({"original": f"{cls}/{src.name}.png", "copy": f"{to}/{dst.name}.png", "change": change})
    return {**info, "count": count + len(changes), "per_class": per_class, "duplicates": duplicates}
