"""Explainability: Grad-CAM and attention-gate maps for the lesion segmentation.

The paper (Jun Cheng, Figures 5 and 6) shows, per image, the predicted mask, the processed
mask and a Grad-CAM heatmap. Here:

* :func:`gradcam` -- Grad-CAM of the lesion output with :class:`monai.visualize.GradCAM`.
  A segmentation network has no class score, so the network is wrapped in a module whose
  output is one (B, 1) score: the sum of the lesion logits inside the network's own
  predicted mask (probability > the checkpoint's threshold), or of the whole logit map when
  nothing is predicted (so the map then shows what pushes the image *towards* a lesion).
  MONAI's ``class_idx`` machinery then back-propagates that score to a chosen layer.
* :func:`attention_maps` -- the attention coefficients of the four gates (forward hooks
  on the gates' sigmoids), coarse to fine.
* :func:`heatmap_for_file` -- the Grad-CAM heatmap written as a volume with the image's
  geometry (float32 in [0, 1]), for the MONAI Label app and 3D Slicer.
* ``busi-monai explain`` -- one PNG figure per image (image, truth, raw mask, processed mask,
  Grad-CAM overlay, finest attention map, Dice in the title) plus the heatmap as NIfTI.

Default layer: ``decoders.0``, the first decoder stage (1/8 resolution, 32x32 at 256 px), where
the bridge's context meets the deepest attention-gated skip; why this layer (a comparison of
layers on real BUSI and synthetic images): README, Grad-CAM.

Any module name of the network works (``decoders.3``, ``encoders.2``,
``gates.3`` ...); :func:`layer_names` lists the useful ones. Grad-CAM uses the first
ensemble member and no test-time flips (one network has one set of activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busi_monai.data.io import (
    BusiInputError,
    read_image,
    read_mask,
    suffix_of,
    write_array,
)
from busi_monai.explain.gradcam import (
    DEFAULT_LAYER,
    as_image,
    attention_maps,
    gradcam,
    resolve_layer,
)
from busi_monai.figures import (
    PRED_COLOUR,
    TRUTH_COLOUR,
    display_image,
    heat_overlay,
    mask_overlay,
    pyplot,
)
from busi_monai.jsonio import dumps

# ----------------------------------------------------------------------------- figures


@dataclass
class Explanation:
    image: np.ndarray  # (H, W) float32, intensities as read
    probability: np.ndarray
    raw_mask: np.ndarray
    mask: np.ndarray  # processed
    heat: np.ndarray  # Grad-CAM in [0, 1]
    attention: list  # gate coefficients, coarse to fine
    layer: str
    truth: np.ndarray | None = None
    dice: float | None = None
    raw_dice: float | None = None
    name: str = ""
    label: str = ""  # class, when known


def _dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    t = truth > 0
    if not t.any():
        return None
    p = pred > 0
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def explain_image(predictor, image, truth: np.ndarray | None = None, layer: str | None = None, name: str = "", label: str = "") -> Explanation:
    """Prediction, Grad-CAM and attention maps of one image (and its Dice when ``truth`` is given)."""
    im = as_image(image)
    pred = predictor.predict([im])[0]
    heat = gradcam(predictor, im, layer)
    att = attention_maps(predictor, im)
    truth = None if truth is None else (np.asarray(truth) > 0).astype(np.uint8)
    e = Explanation(
        image=im.array, probability=pred.probability, raw_mask=pred.raw_mask, mask=pred.mask, heat=heat,
        attention=att, layer=resolve_layer(predictor.network, layer), truth=truth, name=name or _stem(im.path), label=label,
    )
    if truth is not None:
        e.dice, e.raw_dice = _dice(pred.mask, truth), _dice(pred.raw_mask, truth)
    return e


def _stem(path: str | Path) -> str:
    name = Path(str(path)).name
    ext = suffix_of(name)
    return name[: -len(ext)] if ext and name.lower().endswith(ext) else name


def _n_components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3)))[1])


def explanation_figure(e: Explanation, path: str | Path | None = None, dpi: int = 110):
    """The per-image figure: image, truth, raw mask, processed mask, Grad-CAM, attention."""
    plt = pyplot()
    img = display_image(e.image)
    panels = ["image"] + (["truth"] if e.truth is not None else []) + ["raw", "processed", "gradcam", "attention"]
    ncol = 3
    nrow = math.ceil(len(panels) / ncol)
    h, w = img.shape
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 3.6, nrow * 3.6 * h / w + 0.9), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    truth = e.truth
    for ax, p in zip(axes.flat, panels):
        if p == "image":
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title("image")
        elif p == "truth":
            mask_overlay(ax, img, truth, TRUTH_COLOUR)
            ax.set_title("ground truth")
        elif p == "raw":
            mask_overlay(ax, img, e.raw_mask, PRED_COLOUR, truth)
            t = f"predicted (raw) mask, {_n_components(e.raw_mask)} comp."
            ax.set_title(t + (f"\nDice {e.raw_dice:.3f}" if e.raw_dice is not None else ""), fontsize=9)
        elif p == "processed":
            mask_overlay(ax, img, e.mask, PRED_COLOUR, truth)
            t = f"processed mask, {_n_components(e.mask)} comp."
            ax.set_title(t + (f"\nDice {e.dice:.3f}" if e.dice is not None else ""), fontsize=9)
        elif p == "gradcam":
            hm = heat_overlay(ax, img, e.heat, e.mask)
            ax.set_title(f"Grad-CAM ({e.layer})\nwhite: processed mask", fontsize=9)
            fig.colorbar(hm, ax=ax, fraction=0.046, pad=0.03)
        elif p == "attention":
            a = e.attention[-1] if e.attention else np.zeros_like(img)
            am = ax.imshow(a, cmap="viridis", vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title("attention coefficients\n(finest gate)", fontsize=9)
            fig.colorbar(am, ax=ax, fraction=0.046, pad=0.03)
    title = e.name + (f"  [{e.label}]" if e.label else "")
    if e.truth is not None:
        if e.dice is not None:
            title += f"  -  Dice {e.dice:.3f}"
        else:
            title += "  -  no lesion in truth: " + ("false positive" if e.mask.any() else "correctly empty")
    if truth is not None:
        fig.text(0.5, 0.005, "red: prediction, green dashed: ground truth", ha="center", fontsize=8, color="0.3")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- CLI


def explain_files(model, images: list, out: str | Path, labels: list | None = None, layer: str | None = None, device: str = "auto", predictor=None) -> list[dict]:
    """Figures and heatmaps for image files; returns one record per image."""
    from busi_monai.inference.predictor import Predictor

    images = [str(p) for p in images]
    labels = [str(p) for p in labels] if labels else None
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"--labels gives {len(labels)} masks for {len(images)} images; give one per image, in order")
    for p in images + (labels or []):
        if not Path(p).is_file():
            raise BusiInputError(f"{p}: no such file")
    predictor = predictor or Predictor(model, device=device)
    resolve_layer(predictor.network, layer)  # fail early on a bad name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for i, path in enumerate(images):
        im = read_image(path)
        truth = read_mask(labels[i], expected_shape=im.shape) if labels else None
        stem = _stem(path)
        base, k = stem, 1
        while stem in used:  # same file name in two folders
            k += 1
            stem = f"{base}_{k}"
        used.add(stem)
        e = explain_image(predictor, im, truth, layer, name=Path(path).name)
        fig_path = out / f"{stem}_explain.png"
        explanation_figure(e, fig_path)
        heat_path = write_array(e.heat.astype(np.float32), out / f"{stem}_gradcam.nii.gz", like=im)
        rec = {"image": path, "figure": str(fig_path), "heatmap": heat_path, "layer": e.layer}
        if truth is not None:
            rec["dice"] = e.dice
        records.append(rec)
    return records


def cmd_explain(a):

    recs = explain_files(a.model, a.images, a.out, a.labels, a.layer, a.device)
    for r in recs:
        print(dumps(r, indent=None))


def register_cli(sub) -> None:
    s = sub.add_parser(
        "explain",
        help="per-image figure: image, truth, raw and processed masks, Grad-CAM, attention map",
        description="Writes OUT/<name>_explain.png and the Grad-CAM heatmap OUT/<name>_gradcam.nii.gz "
        "(float32 in [0, 1], the image's geometry) for each image.",
    )
    s.add_argument("--model", required=True, nargs="+", help="checkpoint(s) or run dir (Grad-CAM uses the first)")
    s.add_argument("--out", required=True)
    s.add_argument("--labels", nargs="+", help="ground-truth masks, one per image in the same order")
    s.add_argument("--layer", default=None, help=f"Grad-CAM layer (default {DEFAULT_LAYER}; e.g. decoders.3, last_decoder, encoders.3)")
    s.add_argument("--device", default="auto")
    s.add_argument("images", nargs="+")
    s.set_defaults(func=cmd_explain)
