"""Click simulators: the evaluation protocol's deterministic click (numpy, one image) and the
randomised, batched clicks that train the click-guided network (torch, on any device).

Coordinates are (row, col); batched clicks are ``coords`` (B, K, 2) and ``labels`` (B, K) as in
:mod:`.guidance`. Masks are foreground where the value is > 0.5 (probabilities are accepted).
Error regions are 8-connected, and the image's edge counts as a region's border, so a click
never sits on the edge of a region that the frame cuts off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.apps.deepgrow.transforms import FindDiscrepancyRegionsd
from scipy import ndimage

from .guidance import DEFAULT_SIGMA, NEGATIVE, NO_CLICK, POSITIVE, click_maps_batch

# Depths (pixels from a region's border) above this weigh the same when sampling a training
# click: deep enough to be "inside", and it bounds the erosion loop.
DEFAULT_MAX_DEPTH = 16
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ProtocolClick:
    row: int
    col: int
    positive: bool  # True: on a missed region (foreground click); False: on a false region


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``mask``; ties go to the first in raster order."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def protocol_click(pred: np.ndarray, truth: np.ndarray) -> ProtocolClick | None:
    """The standard protocol's next click, or None when the prediction is already the truth.

    The largest error region (8-connected components of the missed and of the false pixels,
    separately; the larger wins, a missed one on a tie) gets the click, at its point farthest
    from its border (Euclidean distance, the image's edge counting as border; the first such
    pixel in raster order on a tie). Positive on a missed region, negative on a false one.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    missed, false = (d > 0 for d in FindDiscrepancyRegionsd.disparity(np.asarray(truth), np.asarray(pred)))
    missed, false = _largest_region(missed), _largest_region(false)
    n_missed, n_false = int(missed.sum()), int(false.sum())
    if n_missed == 0 and n_false == 0:
        return None
    positive = n_missed >= n_false
    region = missed if positive else false
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return ProtocolClick(int(r), int(c), bool(positive))


# --- batched, randomised clicks for training -------------------------------------------------
# MONAI's AddInitialSeedPointd / AddRandomGuidanced draw the same kind of click (inside a region,
# weighted by its chessboard distance transform), but one image at a time in numpy with scipy's
# distance_transform_cdt, which would send every batch to the CPU and back between no-gradient
# rounds; AddRandomGuidanced also samples over all error pixels, not the largest region. Here the
# distance transform is an erosion loop and the regions a label propagation, on any device.


def _as_masks(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) probabilities or masks as a (B, H, W) bool mask."""
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    return x > 0.5


def _neighbourhood(x: torch.Tensor, fill: int | bool, op: Callable) -> torch.Tensor:
    """``op`` folded over each pixel's 3x3 neighbourhood in (N, H, W), the outside being
    ``fill``: separable shifted views, faster than max_pool2d on the CPU."""
    p = torch.full((x.shape[0], x.shape[1] + 2, x.shape[2] + 2), fill, dtype=x.dtype, device=x.device)
    p[:, 1:-1, 1:-1] = x
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return op(op(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def chessboard_depth(mask: torch.Tensor, max_depth: int = DEFAULT_MAX_DEPTH) -> torch.Tensor:
    """Chessboard distance of each pixel of ``mask`` (N, H, W) to the nearest pixel outside it
    (the image's edge counting as outside), capped at ``max_depth``; 0 outside the mask."""
    cur = mask.bool()
    depth = torch.zeros(mask.shape, device=mask.device)
    for _ in range(max_depth):
        depth += cur
        if not bool(cur.any()):
            break
        cur = _neighbourhood(cur, False, torch.logical_and)  # an erosion
    return depth


def label_regions(mask: torch.Tensor) -> torch.Tensor:
    """8-connected regions of ``mask`` (N, H, W): each pixel gets its region's id (the largest
    1-based raster index in the region, unique within its image), 0 outside the mask."""
    n, h, w = mask.shape
    keep = mask.bool()
    # int32 halves the memory traffic of int64; gather still wants int64 indices.
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.int32).view(1, h, w)
    lab = torch.where(keep, ids, 0)
    while True:
        before = lab
        # Propagate the largest id to neighbours, then jump: a pixel takes the label of the
        # pixel its label names (same region, label at least as large), which shortens the
        # number of rounds well below the region's length.
        lab = torch.where(keep, _neighbourhood(lab, 0, torch.maximum), 0)
        flat = lab.view(n, h * w)
        lab = torch.where(keep, flat.gather(1, (flat.long() - 1).clamp_min(0)).view(n, h, w), 0)
        if torch.equal(lab, before):
            return lab.long()


def _largest_regions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest region of each image of ``mask`` (N, H, W) as a mask, and its size (N,)."""
    n, h, w = mask.shape
    if mask.device.type == "cpu":
        return _largest_regions_scipy(mask)
    lab = label_regions(mask).flatten(1)
    gid = torch.where(lab > 0, lab + torch.arange(n, device=mask.device).view(n, 1) * (h * w), 0)
    sizes = torch.bincount(gid.flatten(), minlength=n * h * w + 1)[gid] * (lab > 0)
    best = sizes.argmax(dim=1, keepdim=True)  # ties: the first in raster order
    region = (lab == lab.gather(1, best)) & (lab > 0)
    return region.view(n, h, w), sizes.gather(1, best)[:, 0]


def _largest_regions_scipy(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_largest_regions` on the CPU with scipy's labelling, many times faster there than
    the propagation rounds; the same regions (ties: the region reached first in raster order)."""
    masks = mask.bool().numpy()
    regions = np.zeros_like(masks)
    sizes = np.zeros(len(masks), dtype=np.int64)
    for i, m in enumerate(masks):
        lab, count = ndimage.label(m, structure=_EIGHT)
        if count:
            counts = np.bincount(lab.ravel())[1:]
            best = int(np.argmax(counts))  # labels follow raster order: the first largest
            regions[i], sizes[i] = lab == best + 1, counts[best]
    return torch.from_numpy(regions), torch.from_numpy(sizes)


def _sample_pixels(weights: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel per row of ``weights`` (N, H, W), with probability proportional to its weight.

    Returns (N, 2) (row, col) and (N,) whether the row had any weight. The uniforms come from
    ``generator`` on its own device (CPU by default), so a seed draws the same clicks on any device.
    """
    n, h, w = weights.shape
    cdf = weights.flatten(1).double().cumsum(dim=1)
    total = cdf[:, -1]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(weights.device)
    idx = torch.searchsorted(cdf, (u * total).unsqueeze(1), right=True)[:, 0].clamp(max=h * w - 1)
    ok = total > 0
    return torch.stack([idx // w, idx % w], dim=1) * ok.view(n, 1), ok


def sample_initial_clicks(
    truth: torch.Tensor,
    num_positive: int = 1,
    num_negative: int = 0,
    generator: torch.Generator | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks drawn from the truth: ``num_positive`` inside the lesion, then ``num_negative``
    outside it, each with probability proportional to its depth in the region (capped at
    ``max_depth``), so interior pixels are favoured. A click with nowhere to go (a positive on
    a normal image) is a NO_CLICK slot.

    Args:
        truth: (B, H, W) or (B, 1, H, W) truth masks.
        num_positive: foreground clicks per image.
        num_negative: background clicks per image.
        generator: source of randomness (its seed makes the clicks reproducible).
        max_depth: depth (pixels) beyond which pixels weigh the same.

    Returns:
        ``coords`` (B, num_positive + num_negative, 2) float (row, col) and ``labels`` (B, K) long.
    """
    fg = _as_masks(truth)
    coords, labels = [], []
    for count, region, label in ((num_positive, fg, POSITIVE), (num_negative, ~fg, NEGATIVE)):
        if count == 0:
            continue
        weights = chessboard_depth(region, max_depth)
        for _ in range(count):
            rc, ok = _sample_pixels(weights, generator)
            coords.append(rc.float())
            labels.append(torch.where(ok, label, NO_CLICK))
    if not coords:
        return torch.zeros(fg.shape[0], 0, 2, device=fg.device), torch.zeros(fg.shape[0], 0, dtype=torch.long, device=fg.device)
    return torch.stack(coords, dim=1), torch.stack(labels, dim=1).long()


def sample_corrective_clicks(
    pred: torch.Tensor, truth: torch.Tensor, generator: torch.Generator | None = None, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per image on the prediction's largest error region, as :func:`protocol_click`
    chooses it (missed vs false, 8-connected, the larger; missed on a tie), but drawn at random
    with probability proportional to depth (capped at ``max_depth``) instead of at the deepest
    point. NO_CLICK where the prediction is the truth.

    Returns ``coords`` (B, 1, 2) float (row, col) and ``labels`` (B, 1) long.
    """
    p, t = _as_masks(pred), _as_masks(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    b = t.shape[0]
    errors = torch.cat([t & ~p, p & ~t])  # (2B, H, W): missed then false
    regions, sizes = _largest_regions(errors)
    positive = sizes[:b] >= sizes[b:]
    region = torch.where(positive.view(b, 1, 1), regions[:b], regions[b:])
    rc, ok = _sample_pixels(chessboard_depth(region, max_depth), generator)
    labels = torch.where(ok, torch.where(positive, POSITIVE, NEGATIVE), NO_CLICK)
    return rc.float().unsqueeze(1), labels.long().unsqueeze(1)


@dataclass
class SimulatedClicks:
    maps: torch.Tensor  # (B, 2, H, W) click maps (B, 3, H, W with the previous outline) for the image channels
    coords: torch.Tensor  # (B, K, 2) (row, col)
    labels: torch.Tensor  # (B, K) POSITIVE, NEGATIVE or NO_CLICK
    rounds: int  # corrective rounds run on this batch


def simulate_training_clicks(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    truths: torch.Tensor,
    generator: torch.Generator | None = None,
    p_no_clicks: float = 0.3,
    max_rounds: int = 3,
    num_positive: int = 1,
    num_negative: int = 0,
    sigma: float = DEFAULT_SIGMA,
    max_depth: int = DEFAULT_MAX_DEPTH,
    previous: bool = False,
    p_from_outline: float = 0.75,
) -> SimulatedClicks:
    """Clicks for one training batch, DeepGrow-style: each image, with probability
    ``p_no_clicks``, has none (all-zero maps: the automatic model); the others get clicks from
    the truth, then, for a random 0..``max_rounds`` rounds (one draw per batch), one corrective
    click each from ``predict``'s errors given the clicks so far. ``predict`` runs without
    gradient; put the network in eval mode around this call if its batch statistics matter.

    With ``previous`` (RITM's iterative training), a third map holds the previous outline (the
    model's own prediction, binarised, before the last click), and a share ``p_from_outline``
    of the clicked images starts from the model's automatic outline: their first click
    corrects it, as a clinician's first click corrects the automatic outline in the app.

    Args:
        predict: maps the network input (B, C + 2, H, W) (image channels, then the click maps;
            C + 3 with ``previous``) to the foreground probability (B, 1, H, W) or (B, H, W).
        images: (B, C, H, W) image batch at the network's input size.
        truths: (B, H, W) or (B, 1, H, W) truth masks.
        generator: source of randomness (its seed makes the clicks reproducible).
        p_no_clicks: probability that an image has no clicks.
        max_rounds: most corrective rounds.
        num_positive: initial foreground clicks per clicked image (from the truth).
        num_negative: initial background clicks per clicked image (from the truth).
        sigma: Gaussian sigma of the click maps, in pixels.
        max_depth: depth (pixels) beyond which pixels weigh the same when drawing a click.
        previous: add the previous-outline map.
        p_from_outline: with ``previous``, the share of clicked images starting from their
            automatic outline.
    """
    b, shape = images.shape[0], images.shape[-2:]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    clicked = (torch.rand(b, generator=generator, device=gen_device) >= p_no_clicks).to(images.device)
    rounds = int(torch.randint(0, max_rounds + 1, (1,), generator=generator, device=gen_device))
    coords, labels = sample_initial_clicks(truths, num_positive, num_negative, generator, max_depth)
    prev = images.new_zeros((b, 1, *shape))

    def guidance(c: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        maps = click_maps_batch(c, lab, shape, sigma)
        return torch.cat([maps, prev.to(maps.dtype)], dim=1) if previous else maps

    def outline(inp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p = predict(inp).detach()
        return (p.view(b, 1, *shape) > 0.5).to(images.dtype)

    if previous:
        from_outline = clicked & (torch.rand(b, generator=generator, device=gen_device) < p_from_outline).to(images.device)
        if bool(from_outline.any()):
            none = torch.full_like(labels, NO_CLICK)
            auto = outline(torch.cat([images, guidance(coords, none)], dim=1))
            prev = torch.where(from_outline.view(b, 1, 1, 1), auto, prev)
            c_corr, l_corr = sample_corrective_clicks(prev, truths, generator, max_depth)
            first = from_outline.view(b, 1)
            if coords.shape[1] == 0:
                coords, labels = c_corr, torch.where(first, l_corr, NO_CLICK)
            else:  # the corrective click replaces the first truth click; the other initial clicks stay
                coords = torch.cat([torch.where(first.unsqueeze(-1), c_corr, coords[:, :1]), coords[:, 1:]], dim=1)
                labels = torch.cat([torch.where(first, l_corr, labels[:, :1]), labels[:, 1:]], dim=1)
    labels = torch.where(clicked.view(b, 1), labels, NO_CLICK)
    ran = 0
    if bool(clicked.any()):
        for ran in range(1, rounds + 1):
            with torch.no_grad():
                prob = predict(torch.cat([images, guidance(coords, labels)], dim=1))
            if previous:
                prev = torch.where(clicked.view(b, 1, 1, 1), (prob.detach().view(b, 1, *shape) > 0.5).to(images.dtype), prev)
            new_coords, new_labels = sample_corrective_clicks(prob.detach(), truths, generator, max_depth)
            coords = torch.cat([coords, new_coords], dim=1)
            labels = torch.cat([labels, torch.where(clicked.view(b, 1), new_labels, NO_CLICK)], dim=1)
    return SimulatedClicks(guidance(coords, labels), coords, labels, ran)
