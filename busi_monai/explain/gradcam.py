"""Grad-CAM and attention maps of the Attention U-Net: what the network looked at for its lesion score."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.visualize import GradCAM

from busi_monai.data.io import (
    Image2D,
    read_image,
    write_array,
)
from busi_monai.data.preprocessing import restore_size
from busi_monai.model.networks import attention_gate_modules

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


def as_image(image) -> Image2D:
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
    im = as_image(image)
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
    heat = restore_size(small[0].detach().float().cpu(), im.shape, getattr(predictor, "pad_square", False))[0].numpy()
    return _normalise(np.clip(heat, 0, None))


@torch.no_grad()
def attention_maps(predictor, image) -> list[np.ndarray]:
    """The attention coefficients of each gate, coarse to fine, each (H, W) in [0, 1]."""
    im = as_image(image)
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
    pad = getattr(predictor, "pad_square", False)
    return [np.clip(restore_size(m[0].float().cpu(), im.shape, pad)[0].numpy(), 0, 1).astype(np.float32) for m in maps]


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
