"""The confidence gate chosen for the model that is served, on images it never trained on.

One rule for both callers: ``busi-monai cv`` applies it to the five folds' held-out images for
the ensemble, and every training run (the CLI's ``train``, the app's Train, each cv fold)
applies it to its own validation slice for its own single model, which is more confident than
an average of five and so needs its own gate.

The rule: for each gate in :data:`GATES`, an image keeps its outline only if its highest lesion
probability reaches the gate; the score is training's selection score (lesion Dice, 0 for a
lesion gated away; 1 for an empty mask on a normal image, 0 for a false outline) averaged over
all images. The highest score wins; scores within :data:`TIE` of it tie, and a tie goes to the
lowest gate, which keeps every outline a higher one keeps (it never misses more lesions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from busi_monai.jsonio import write_json
from busi_monai.model.checkpoint import atomic_torch_save, load_checkpoint
from busi_monai.training.validation import image_scores

log = logging.getLogger(__name__)

# Gates tried: an outlined image's highest probability is above the 0.5 threshold already, so
# the gates that change anything start there; 0 is the gate off.
GATES = (0.0, *(round(0.5 + 0.05 * i, 2) for i in range(10)), 0.975, 0.99)
# Scores closer than this are equal (float sums of the same per-image values in another order).
TIE = 1e-9
# A run chooses its own gate only with at least this many normal and lesion images to judge
# false outlines and missed lesions on; with fewer it keeps its default and says so.
MIN_NORMALS = 5
MIN_LESIONS = 5


def gate_curve(scores: dict, gates=GATES) -> list[dict]:
    """Per gate, on the images of :func:`~busi_monai.training.validation.image_scores`: the
    pooled ``score``, the ``lesion_dice`` (a gated lesion counts 0), the ``normal_fp`` rate, the
    ``lesions_missed`` (no outline, from the segmentation or the gate). A figure over no image
    of its kind is None."""
    top, dice, outlined, les = (np.asarray(torch.as_tensor(scores[k]).cpu()) for k in ("top", "dice", "outlined", "lesion"))
    les, outlined = les.astype(bool), outlined.astype(bool)
    if les.size == 0:
        return []
    curve = []
    for g in gates:
        kept = (top >= g) & outlined
        per_image = np.where(les, dice * kept, 1.0 - kept)
        curve.append({
            "gate": float(g), "score": float(per_image.mean()),
            "lesion_dice": float(per_image[les].mean()) if les.any() else None,
            "normal_fp": float(kept[~les].mean()) if (~les).any() else None,
            "lesions_missed": int((les & ~kept).sum()),
        })  # fmt: skip
    return curve


def pick_gate(curve: list[dict]) -> float:
    """The gate with the highest score; on a tie (within :data:`TIE`) the lowest such gate."""
    if not curve:
        raise ValueError("no gate curve to choose from (no images)")
    best = max(c["score"] for c in curve)
    return min(c["gate"] for c in curve if c["score"] >= best - TIE)


def choose_gate(scores: dict, gates=GATES) -> dict:
    """The rule on per-image scores: ``chosen``, the image counts and the ``curve``."""
    curve = gate_curve(scores, gates)
    les = np.asarray(torch.as_tensor(scores["lesion"]).cpu()).astype(bool)
    return {
        "chosen": pick_gate(curve) if curve else None,
        "n_images": int(les.size), "n_lesion": int(les.sum()), "n_normal": int((~les).sum()),
        "curve": curve,
    }  # fmt: skip


def run_gate(prob: torch.Tensor, labels: torch.Tensor, threshold: float, default: float, min_normals: int = MIN_NORMALS, min_lesions: int = MIN_LESIONS) -> dict:
    """One run's gate from its validation slice's ungated probabilities (N, 1, S, S) and labels.

    A normal image is one whose label is empty at network size. With fewer than
    ``min_normals`` normal (or ``min_lesions`` lesion) images the rule is not trusted:
    ``default`` is kept and ``gate_source`` says why. Returns ``confidence_gate`` (the gate to
    apply), ``gate_source``, ``rule_choice`` (what the rule picked, None without images) and
    :func:`choose_gate`'s counts and curve."""
    if prob.shape != labels.shape:
        raise ValueError(f"probabilities {tuple(prob.shape)} and labels {tuple(labels.shape)} differ in shape")
    result = choose_gate(image_scores(prob.float().cpu(), labels.float().cpu(), threshold))
    n_normal, n_lesion = result["n_normal"], result["n_lesion"]
    if n_normal < min_normals:
        gate, source = default, f"fallback: {n_normal} normal images in the validation slice (< {min_normals})"
    elif n_lesion < min_lesions:
        gate, source = default, f"fallback: {n_lesion} lesion images in the validation slice (< {min_lesions})"
    else:
        gate, source = result["chosen"], "validation"
    return {"confidence_gate": float(gate), "gate_source": source, "rule_choice": result.pop("chosen"), **result}


def set_checkpoint_gate(path: str | Path, gate: float, source: str) -> None:
    """Write ``gate`` into a checkpoint's network config (what inference applies), and where it
    came from, atomically."""
    if not 0.0 <= gate < 1.0:
        raise ValueError(f"confidence gate {gate}: must lie in [0, 1)")
    ck = load_checkpoint(path)
    ck["network"] = {**ck["network"], "confidence_gate": float(gate)}
    ck["gate_source"] = source
    atomic_torch_save(ck, path)


def checkpoint_gate(ck: dict | None) -> float | None:
    """The confidence gate a checkpoint applies (None: no checkpoint)."""
    if ck is None:
        return None
    return float(ck.get("network", {}).get("confidence_gate", 0.0))


def plot_gate_curve(result: dict, path: Path, title: str) -> None:
    """Lesion Dice, normal false-positive rate and score against the gate, the applied gate marked."""
    from busi_monai.figures import pyplot

    plt = pyplot()
    curve = result["curve"]
    g = [c["gate"] for c in curve]
    nan = lambda v: np.nan if v is None else v  # noqa: E731 (a figure over no image: a gap)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(g, [nan(c["lesion_dice"]) for c in curve], "o-", ms=3, color="C2", label="lesion Dice")
    ax.plot(g, [nan(c["normal_fp"]) for c in curve], "s--", ms=3, color="C3", label="normal images with a false lesion")
    ax.plot(g, [c["score"] for c in curve], "-", color="0.3", label="score (selects the gate)")
    marked = result.get("confidence_gate", result.get("chosen"))
    if marked is not None:
        ax.axvline(marked, color="0.6", lw=0.8, ls=":")
        ax.annotate(f"gate {marked:.3g}", (marked, 0.02), fontsize=8, xytext=(4, 0), textcoords="offset points")
    ax.set_xlabel("confidence gate (highest lesion probability an outline needs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}, {result['n_images']} images", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_gate_record(result: dict, out: str | Path, title: str) -> None:
    """``gate.json`` and, when there is a curve, ``gate.png`` in ``out``."""
    out = Path(out)
    write_json(result, out / "gate.json")
    if result["curve"]:
        plot_gate_curve(result, out / "gate.png", title)


def choose_run_gate(out: str | Path, val, recipe, amp: bool = False) -> dict:
    """Choose a finished run's gate with its best weights (``out/model.pt``) on its validation
    slice ``val`` (a CachedData), and record it: ``gate.json``/``gate.png`` in ``out``, the gate
    in ``out/model.pt`` and ``out/last.pt``. A recipe without a gate (``confidence_gate`` 0)
    keeps it off and chooses nothing. Returns ``confidence_gate`` and ``gate_source`` (and the
    counts and curve when the slice was scored)."""
    from busi_monai.model.checkpoint import model_from_checkpoint
    from busi_monai.training.validation import predict_cached

    out = Path(out)
    if recipe.confidence_gate <= 0:
        return {"confidence_gate": 0.0, "gate_source": "off: the recipe has no confidence gate"}
    model = model_from_checkpoint(load_checkpoint(out / "model.pt"), val.images.device)
    prob = predict_cached(model, val.images, amp=amp)
    result = run_gate(prob, val.labels, recipe.threshold, recipe.confidence_gate)
    if result["gate_source"] == "validation":
        log.info("confidence gate %.3g chosen on the validation slice (%d normal, %d lesion images)", result["confidence_gate"], result["n_normal"], result["n_lesion"])
    else:
        log.warning("confidence gate: the recipe's %.3g kept (%s)", result["confidence_gate"], result["gate_source"])
    write_gate_record(result, out, "validation slice")
    for name in ("model.pt", "last.pt"):
        if (out / name).is_file():
            set_checkpoint_gate(out / name, result["confidence_gate"], result["gate_source"])
    return result
