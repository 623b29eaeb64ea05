"""The click evaluation protocol and its plot.

On each lesion image the model first predicts without clicks; then, up to ``max_clicks``
times, a simulated user clicks the centre of the largest error region
(:func:`.simulation.protocol_click`: positive on a missed region, negative on a false one)
and the model predicts again with all clicks so far. Reported: mean lesion Dice after 0..N
clicks, and NoC@85 / NoC@90 (mean clicks to reach that Dice, N when never reached; 0 when the
automatic prediction already does). Run it on lesion images only: on a normal image Dice is 1
or 0 and the number of clicks says nothing about outlining a lesion. Deterministic for a
deterministic ``predict``. Clicks are (row, col) on the truth's pixel grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .simulation import ProtocolClick, protocol_click

# predict(image, fg_clicks, bg_clicks) -> foreground probability map, the truth's shape.
Predictor = Callable[[Any, list[tuple[int, int]], list[tuple[int, int]]], np.ndarray]
THRESHOLDS = (0.85, 0.90)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; 1 when both are empty (nothing to find, nothing found)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def clicks_to_reach(dice_after: np.ndarray, threshold: float) -> np.ndarray:
    """Per image (rows of ``dice_after``, Dice after 0..N clicks): the fewest clicks whose Dice
    reaches ``threshold``, or N when none does."""
    reached = dice_after >= threshold
    n = dice_after.shape[1] - 1
    return np.where(reached.any(axis=1), reached.argmax(axis=1), n)


@dataclass
class ClickEvaluation:
    dice: np.ndarray  # (images, max_clicks + 1): Dice after 0..N clicks
    clicks: list[list[ProtocolClick]]  # per image, the clicks made, in order
    summary: dict[str, Any]  # see summarize()


def summarize(dice_after: np.ndarray) -> dict[str, Any]:
    """The protocol's figures from per-image Dice after 0..N clicks (images, N + 1):
    ``dice_after`` (mean per click count), ``noc_85``, ``noc_90``, ``failed_90`` (images never
    reaching 0.90), ``images`` and ``max_clicks``; plain JSON-ready numbers."""
    dice_after = np.asarray(dice_after, dtype=float)
    if dice_after.ndim != 2 or dice_after.shape[0] == 0:
        raise ValueError("need Dice after 0..N clicks for at least one image")
    n = dice_after.shape[1] - 1
    out: dict[str, Any] = {"dice_after": [float(v) for v in dice_after.mean(axis=0)]}
    for t in THRESHOLDS:
        out[f"noc_{round(t * 100)}"] = float(clicks_to_reach(dice_after, t).mean())
    out["failed_90"] = int((~(dice_after >= 0.90).any(axis=1)).sum())
    out["images"] = int(dice_after.shape[0])
    out["max_clicks"] = int(n)
    return out


def evaluate_clicks(
    predict: Predictor,
    images: Sequence[Any],
    truths: Sequence[np.ndarray],
    max_clicks: int = 20,
    threshold: float = 0.5,
    stop_at: float | None = None,
    allow_empty: bool = False,
    boxes: Sequence[Any] | None = None,
    with_previous: bool = False,
    starts: Sequence[np.ndarray] | None = None,
) -> ClickEvaluation:
    """Run the click protocol on lesion images.

    Once a prediction equals the truth (or its Dice reaches ``stop_at``) no more clicks are
    made and its Dice stands for the remaining click counts (``predict`` is not called again).

    Args:
        predict: ``predict(image, fg_clicks, bg_clicks)`` -> foreground probability map of the
            truth's shape; clicks are lists of (row, col) on the truth's grid.
        images: whatever ``predict`` takes as an image, one per truth.
        truths: lesion masks (H, W), each with some foreground.
        max_clicks: N, the most clicks per image.
        threshold: a pixel is foreground where the probability is > threshold.
        stop_at: stop clicking an image once its Dice reaches this (a user who is satisfied
            stops; None: click until perfect or ``max_clicks``).
        allow_empty: accept empty truths (normal images): every click is then a negative one
            on a false outline, and Dice is 1 once the prediction is empty, 0 before. For
            costing a label (:mod:`busi_monai.active.effort`), not for the protocol's NoC figures.
        boxes: a box per image that the user drew first (passed on as ``box=``): Dice after 0
            clicks is then the box's alone, and the clicks continue from it.
        with_previous: also pass ``previous=`` the last prediction's mask (None before the
            first), as the app keeps the last outline for the next click.
        starts: the outline shown before any click, one per image (e.g. another model's
            automatic outline): Dice after 0 clicks is its Dice, and the clicks correct it.
    """
    if len(images) != len(truths):
        raise ValueError(f"{len(images)} images but {len(truths)} truths")
    if boxes is not None and len(boxes) != len(truths):
        raise ValueError(f"{len(boxes)} boxes but {len(truths)} truths")
    if starts is not None and (boxes is not None or len(starts) != len(truths)):
        raise ValueError("starts: one outline per truth, and not with boxes (a box is itself the start)")
    if max_clicks < 0:
        raise ValueError("max_clicks must be >= 0")
    scores = np.zeros((len(truths), max_clicks + 1))
    all_clicks: list[list[ProtocolClick]] = []
    for i, (image, truth) in enumerate(zip(images, truths)):
        truth = np.asarray(truth) > 0.5
        if not truth.any() and not allow_empty:
            raise ValueError(f"truth {i} is empty: the click protocol runs on lesion images only")
        fg: list[tuple[int, int]] = []
        bg: list[tuple[int, int]] = []
        made: list[ProtocolClick] = []
        pred = np.zeros_like(truth)  # replaced by the first prediction, before any click
        for k in range(max_clicks + 1):
            if k > 0:
                click = protocol_click(pred, truth)
                if click is None:  # perfect: nothing left to correct
                    scores[i, k:] = scores[i, k - 1]
                    break
                made.append(click)
                (fg if click.positive else bg).append((click.row, click.col))
            if k == 0 and starts is not None:
                prob = np.asarray(starts[i], dtype=np.float32)
            elif boxes is None and not with_previous:
                prob = np.asarray(predict(image, list(fg), list(bg)))
            else:
                context: dict[str, Any] = {}
                if boxes is not None:
                    context["box"] = boxes[i]
                if with_previous:
                    context["previous"] = pred if k > 0 else None
                prob = np.asarray(predict(image, list(fg), list(bg), **context))
            if prob.shape != truth.shape:
                raise ValueError(f"predict returned shape {prob.shape} for a truth of shape {truth.shape}")
            pred = prob > threshold
            scores[i, k] = dice(pred, truth)
            if stop_at is not None and scores[i, k] >= stop_at:
                scores[i, k:] = scores[i, k]
                break
        all_clicks.append(made)
    return ClickEvaluation(scores, all_clicks, summarize(scores))


def plot_dice_vs_clicks(
    summaries: Mapping[str, Any] | Sequence[Mapping[str, Any]], path: str | Path, title: str = "Dice against clicks"
) -> Path:
    """A PNG of mean lesion Dice against the number of clicks, one curve per summary.

    Args:
        summaries: one :func:`summarize` dict, a list of them, or ``{name: summary}`` (e.g.
            per model); the legend gives each curve's NoC@90.
        path: where to write the PNG.
        title: the plot's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if isinstance(summaries, Mapping) and "dice_after" in summaries:
        named = [("", summaries)]
    elif isinstance(summaries, Mapping):
        named = list(summaries.items())
    else:
        named = [(f"run {i + 1}", s) for i, s in enumerate(summaries)]
    if not named:
        raise ValueError("nothing to plot")

    # A Figure of its own (not pyplot): no global state, no backend switch for the caller.
    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, s in named:
        y = s["dice_after"]
        label = f"NoC@90 {s['noc_90']:.2f}, {s['images']} images"
        ax.plot(range(len(y)), y, marker="o", markersize=3, label=f"{name}: {label}" if name else label)
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"{t:.2f}", (1.0, t), xycoords=("axes fraction", "data"), xytext=(2, -3), textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean lesion Dice")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
