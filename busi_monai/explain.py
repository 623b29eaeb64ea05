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

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.visualize import GradCAM

from .figures import PRED_COLOUR, TRUTH_COLOUR, display_image, heat_overlay, mask_overlay, pyplot
from .io import BusiInputError, Image2D, read_image, read_mask, suffix_of, write_array
from .jsonio import dumps
from .networks import attention_gate_modules
from .transforms import restore_size

DEFAULT_LAYER = "decoders.0"
# Friendly names; any dotted module name of the network is accepted as well.
LAYER_ALIASES = {
    "bottleneck": "bridge",
    "last_decoder": "decoders.-1",
    "last-decoder": "decoders.-1",
    "first_decoder": "decoders.0",
    "last_encoder": "encoders.-1",
}


def layer_names(net: nn.Module) -> list[str]:
    """The blocks Grad-CAM is usefully computed at: encoders, bridge, gates, decoders."""
    out = []
    for name, _ in net.named_modules():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in ("encoders", "decoders", "gates") or name == "bridge":
            out.append(name)
    return out


def resolve_layer(net: nn.Module, layer: str | None) -> str:
    """A module name of ``net`` for ``layer`` (None = the default), negative indices allowed."""
    name = LAYER_ALIASES.get(layer or DEFAULT_LAYER, layer or DEFAULT_LAYER)
    parts = name.split(".")
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        seq = getattr(net, parts[0], None)
        if isinstance(seq, nn.ModuleList):
            idx = int(parts[1])
            if -len(seq) <= idx < len(seq):
                name = f"{parts[0]}.{idx % len(seq)}"
    names = dict(net.named_modules())
    if name not in names or name == "":
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(layer_names(net))} (or any module name)")
    return name


class LesionScore(nn.Module):
    """The network with a (B, 1) output: the lesion logits summed inside the predicted mask.

    With nothing predicted the whole logit map is summed instead.
    """

    def __init__(self, net: nn.Module, threshold: float = 0.5):
        super().__init__()
        self.net = net
        t = min(max(float(threshold), 1e-6), 1 - 1e-6)
        self.logit_threshold = math.log(t / (1 - t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if isinstance(logits, (list, tuple)):  # deep supervision in training mode
            logits = logits[0]
        logits = logits[:, :1].float()
        mask = (logits > self.logit_threshold).detach()
        empty = ~mask.flatten(1).any(1)
        mask = mask | empty.view(-1, 1, 1, 1)
        return (logits * mask).flatten(1).sum(1, keepdim=True)


def _identity(x):
    return x


@contextlib.contextmanager
def _hooks_removed_after(net: nn.Module):
    """Remove the hooks MONAI's ModelWithHooks registers (it keeps no handles) once done, so the
    shared network is left as it was (no stray activations kept, no backward hooks in training)."""
    before = {id(m): (set(m._forward_hooks), set(m._backward_hooks)) for m in net.modules()}
    try:
        yield
    finally:
        for m in net.modules():
            fwd, bwd = before.get(id(m), (set(), set()))
            for k in set(m._forward_hooks) - fwd:
                del m._forward_hooks[k]
            for k in set(m._backward_hooks) - bwd:
                del m._backward_hooks[k]


def _as_image(image) -> Image2D:
    if isinstance(image, Image2D):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    return Image2D(np.asarray(image, dtype=np.float32))


def _normalise(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(a, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def gradcam(predictor, image, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of the lesion score at ``layer``, (H, W) float32 in [0, 1] at the image's size.

    ``image``: an :class:`Image2D`, an (H, W) array or a path. All zeros when the score has no
    positive evidence at that layer (Grad-CAM's ReLU leaves nothing).
    """
    im = _as_image(image)
    net = predictor.network
    name = resolve_layer(net, layer)
    x = predictor.preprocess(im)[None].to(predictor.device)
    was_training = net.training
    with _hooks_removed_after(net), warnings.catch_warnings(), torch.enable_grad():
        # "Full backward hook is firing ... no inputs require gradients": expected, the input is an image.
        warnings.filterwarnings("ignore", message="Full backward hook")
        try:
            cam = GradCAM(LesionScore(net, predictor.threshold), target_layers=f"net.{name}", postprocessing=_identity)
            small = cam(x, class_idx=0)  # (1, 1, S, S), upsampled to the network input by MONAI
        finally:
            net.zero_grad(set_to_none=True)
            net.train(was_training)
    heat = restore_size(small[0].detach().float().cpu(), im.shape)[0].numpy()
    return _normalise(np.clip(heat, 0, None))


@torch.no_grad()
def attention_maps(predictor, image) -> list[np.ndarray]:
    """The attention coefficients of each gate, coarse to fine, each (H, W) in [0, 1]."""
    im = _as_image(image)
    net = predictor.network
    maps: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: maps.append(out.detach())) for m in attention_gate_modules(net)]
    was_training = net.training
    try:
        net.eval()
        net(predictor.preprocess(im)[None].to(predictor.device))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return [np.clip(restore_size(m[0].float().cpu(), im.shape)[0].numpy(), 0, 1).astype(np.float32) for m in maps]


def heatmap_for_file(
    predictor, image_path: str | Path, out_path: str | Path, layer: str | None = None, dtype: str = "float32"
) -> str:
    """Write the Grad-CAM heatmap of ``image_path`` to ``out_path`` with the image's geometry.

    float32 in [0, 1] by default (Slicer shows it as a scalar volume: pick a colour map such
    as "Inferno" / "ColdToHotRainbow" and use it as the foreground layer at ~50% opacity).
    ``dtype="uint8"`` writes 0-255 instead, for viewers that want 8 bits.
    """
    im = read_image(image_path)
    heat = gradcam(predictor, im, layer)
    if dtype == "uint8":
        arr = np.round(heat * 255).astype(np.uint8)
    elif dtype == "float32":
        arr = heat.astype(np.float32)
    else:
        raise ValueError(f"dtype must be 'float32' or 'uint8', not {dtype!r}")
    return write_array(arr, out_path, like=im)


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
    im = _as_image(image)
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
    from .inference import Predictor

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

