"""Inference: images in, lesion probability, raw mask and processed mask out, at each image's size.

:class:`Predictor` keeps the model(s) loaded, batches images, can average an ensemble of
checkpoints (cross-validation folds) and test-time flips, and runs Monte Carlo dropout for
active learning. The CLI, the MONAI Label app and evaluation all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from busi_monai.data.io import Image2D, read_image
from busi_monai.data.preprocessing import preprocess_array, preprocess_mask, restore_size, square_box
from busi_monai.data.region import crop_to_scan, scan_view, to_full_frame
from busi_monai.device import resolve_device
from busi_monai.inference.postprocessing import processed_mask
from busi_monai.interactive.guidance import DEFAULT_SIGMA, click_maps, scale_clicks
from busi_monai.interactive.honour import honour_clicks
from busi_monai.interactive.zoom import box_mask, zoom_box
from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint
from busi_monai.model.networks import AveragedNetwork


@dataclass
class Prediction:
    probability: np.ndarray  # (H, W) float32 in [0, 1]
    raw_mask: np.ndarray  # (H, W) uint8, probability > threshold
    mask: np.ndarray  # (H, W) uint8, the processed mask (default output)


class Predictor:
    def __init__(
        self,
        model: str | Path | dict | list,
        device: str = "auto",
        tta: bool | None = None,
        amp: bool | None = None,
        batch_size: int = 16,
        postprocess: dict | None = None,
        confidence_gate: float | None = None,
    ):
        """``confidence_gate`` replaces the checkpoints' confidence gate (0 turns it off)."""
        members = [model] if isinstance(model, (str, Path, dict)) else list(model)
        paths = expand_ensemble(members)
        self.device = resolve_device(device)
        # A member is a checkpoint path, a run/cross-validation dir, or a checkpoint dict already loaded.
        self.checkpoints = [p if isinstance(p, dict) else load_checkpoint(p) for p in paths]
        first = self.checkpoints[0]
        self.paths = [p.get("source", "<in memory>") if isinstance(p, dict) else str(p) for p in paths]
        self.image_size = int(first["preprocessing"]["image_size"])
        for p, ck in zip(paths, self.checkpoints):
            if int(ck["preprocessing"]["image_size"]) != self.image_size:
                raise ValueError(f"{p}: ensemble members need the same image size")
        self.threshold = float(first.get("threshold", 0.5))
        self.preset = first.get("preset")
        recipe = first.get("recipe", {})
        # The geometry the network was trained in (older checkpoints: stretched to square).
        self.pad_square = bool(recipe.get("pad_square", False))
        for p, ck in zip(paths, self.checkpoints):
            if bool(ck.get("recipe", {}).get("pad_square", False)) != self.pad_square:
                raise ValueError(f"{p}: ensemble members need the same geometry (pad_square)")
        self.tta = bool(recipe.get("tta", False)) if tta is None else tta
        self.amp = (self.device.type == "cuda" and torch.cuda.is_bf16_supported()) if amp is None else amp
        self.batch_size = batch_size
        self.click_sigma = float(first.get("recipe", {}).get("click_sigma", DEFAULT_SIGMA))
        # Zoom-in where the model was trained for it (older checkpoints: the whole view only).
        self.zoom = None
        if float(recipe.get("zoom_fraction", 0.0)) > 0:
            self.zoom = {"margin": float(recipe.get("zoom_margin", 0.4)), "min_side": float(recipe.get("zoom_min_side", 0.25))}
        # The recipe's post-processing unless the caller says otherwise.
        self.postprocess = {"largest_only": bool(recipe.get("largest_component", False)), **(postprocess or {})}
        self.models = [model_from_checkpoint(ck, self.device, confidence_gate=confidence_gate) for ck in self.checkpoints]
        # One network, or the members' (and flips') mean: the same module the bundle exports.
        single = len(self.models) == 1 and not self.tta
        self.averaged = self.models[0] if single else AveragedNetwork(self.models, flips=self.tta).eval()

    @property
    def network(self):
        return self.models[0]

    def preprocess(self, image: Image2D | np.ndarray) -> torch.Tensor:
        # An ultrasound DICOM's network input is its scan region only (as in training).
        arr = scan_view(image).array if isinstance(image, Image2D) else np.asarray(image, np.float32)
        return preprocess_array(arr, self.image_size, self.pad_square)

    @property
    def takes_clicks(self) -> bool:
        """A click-guided network (``+clicks``): it also reads foreground/background click maps."""
        return self.network.config.in_channels > 1

    def forward_probability(self, x: torch.Tensor, mc_dropout: bool = False, gated: bool = True) -> torch.Tensor:
        """Mean probability over ensemble members (and flips with TTA) of a (B, 1, S, S) batch
        (or (B, 3, S, S) with click maps). ``gated`` False skips the confidence gate."""
        _set_dropout(self.averaged, mc_dropout)
        net = self.averaged
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                if gated:
                    return torch.sigmoid(net(x).float())
                logit = net.forward_ungated(x) if isinstance(net, AveragedNetwork) else net.forward_parts(x)[0]
                return torch.sigmoid(logit.float())
        finally:
            _set_dropout(self.averaged, False)

    @torch.no_grad()
    def predict_small(self, images: list[Image2D | np.ndarray], mc_dropout: bool = False) -> torch.Tensor:
        """Probabilities at network resolution, (N, 1, S, S), on the CPU."""
        batch = torch.stack([self.preprocess(im) for im in images])
        outs = []
        for i in range(0, len(batch), self.batch_size):
            outs.append(self.forward_probability(batch[i : i + self.batch_size].to(self.device), mc_dropout).cpu())
        return torch.cat(outs)

    def predict(self, images: list[Image2D | np.ndarray | str | Path]) -> list[Prediction]:
        loaded = [read_image(im) if isinstance(im, (str, Path)) else im for im in images]
        small = self.predict_small(loaded)
        out = []
        for im, p in zip(loaded, small):
            shape = scan_view(im).shape if isinstance(im, Image2D) else np.asarray(im).shape
            prob = restore_size(p, shape, self.pad_square)[0].numpy().astype(np.float32)
            if isinstance(im, Image2D):  # back into the full frame, nothing outside the scan
                prob = to_full_frame(prob, im)
            raw = (prob > self.threshold).astype(np.uint8)
            out.append(Prediction(prob, raw, processed_mask(raw, **self.postprocess)))
        return out

    def network_clicks(self, clicks, shape: tuple[int, int]) -> list[tuple[float, float]]:
        """(row, col) clicks on an image of ``shape`` moved to the network's input, through the
        same geometry as the image (stretched to the square, or resized and padded)."""
        if not self.pad_square:
            return scale_clicks(list(clicks), shape, (self.image_size, self.image_size))
        top, left, h, w = square_box(tuple(shape), self.image_size)
        return [(r + top, c + left) for r, c in scale_clicks(list(clicks), shape, (h, w))]

    @property
    def takes_previous(self) -> bool:
        """The network also reads the previous outline (``+prev``)."""
        return self.network.config.in_channels > 3

    @torch.no_grad()
    def predict_clicks(
        self,
        image: Image2D | np.ndarray,
        foreground: Sequence = (),
        background: Sequence = (),
        box: tuple[int, int, int, int] | None = None,
        previous: np.ndarray | None = None,
    ) -> Prediction:
        """One image segmented around clicks, a box, or both, given in the image's own pixels.

        Clicks are (row, col); ``box`` is (row0, col0, row1, col1), inclusive, on the image
        (:func:`~busi_monai.interactive.zoom.box_from_xyxy` makes one); ``previous`` is the
        outline the clicks correct (H, W), read by a network with the previous-outline channel.

        A model trained with zoom-in (``zoom_fraction`` > 0) re-segments a square crop around
        the clicks, the box and the previous outline (:func:`~busi_monai.interactive.zoom.zoom_box`)
        at its input size and pastes the result back; without any of them it is the automatic
        model. Nothing is outlined outside a box. A foreground click or a box is the user saying
        "there is a lesion here", so the confidence gate, which may leave an unsure image empty,
        is skipped then. Every click is honoured (:func:`~busi_monai.interactive.honour.honour_clicks`).
        """
        if not self.takes_clicks:
            raise ValueError(f"{self.paths[0]}: this model does not take clicks (train a '+clicks' network, e.g. --preset interactive)")
        if isinstance(image, Image2D) and image.region is not None:
            return self._predict_clicks_in_scan(image, foreground, background, box, previous)
        arr = image.array if isinstance(image, Image2D) else np.asarray(image, np.float32)
        shape = arr.shape
        fg = [tuple(map(float, p[:2])) for p in foreground]
        bg = [tuple(map(float, p[:2])) for p in background]
        prev = None if previous is None else np.asarray(previous) > 0.5
        if prev is not None and prev.shape != shape:
            raise ValueError(f"previous outline {prev.shape} and image {shape} differ in shape")
        zoom = None
        if self.zoom is not None and (fg or bg or box is not None or (prev is not None and prev.any())):
            zoom = zoom_box(shape, fg + bg, prev, box, margin=self.zoom["margin"], min_side=self.zoom["min_side"])
        region = zoom.crop(arr) if zoom else arr
        rfg, rbg = (zoom.to_crop(p) if zoom else p for p in (fg, bg))
        size = (self.image_size, self.image_size)
        maps = torch.from_numpy(click_maps(size, self.network_clicks(rfg, region.shape), self.network_clicks(rbg, region.shape), sigma=self.click_sigma)).float()
        parts = [self.preprocess(region), maps]
        if self.takes_previous:
            rprev = np.zeros(region.shape, bool) if prev is None else (zoom.crop(prev) if zoom else prev)
            parts.append(preprocess_mask(rprev, self.image_size, self.pad_square))
        x = torch.cat(parts)[None].to(self.device)
        gated = not fg and box is None
        prob = restore_size(self.forward_probability(x, gated=gated).cpu()[0], region.shape, self.pad_square)[0].numpy().astype(np.float32)
        if zoom:
            prob = zoom.paste(prob, shape)
        inside = box_mask(box, shape) if box is not None else None
        if inside is not None:
            prob = np.where(inside, prob, 0.0).astype(np.float32)
        raw = (prob > self.threshold).astype(np.uint8)
        mask = processed_mask(raw, **self.postprocess)  # fills holes only: nothing outside the box
        # An ignored click gets a disc of about the click map's width, in the image's pixels.
        radius = max(2.0, self.click_sigma * max(region.shape) / self.image_size)
        mask = honour_clicks(mask, fg, bg, radius=radius, previous=prev, boxed=box is not None)
        return Prediction(prob, raw, mask)

    def _predict_clicks_in_scan(self, image: Image2D, foreground, background, box, previous) -> Prediction:
        """:meth:`predict_clicks` on an ultrasound frame with a scan region: the network sees the
        region only (as in training), clicks and the box are moved into it, and the outline comes
        back in the full frame. A click or a box outside the scan is refused."""
        top, left, h, w = image.region

        def moved(points, what):
            out = []
            for r, c in points:
                if not (top <= r < top + h and left <= c < left + w):
                    raise ValueError(f"{what} click at row {r:g}, column {c:g} lies outside the scan region (rows {top}-{top + h - 1}, columns {left}-{left + w - 1})")
                out.append((r - top, c - left))
            return out

        fg, bg = moved(foreground, "a foreground"), moved(background, "a background")
        if box is not None:
            r0, c0, r1, c1 = max(box[0] - top, 0), max(box[1] - left, 0), min(box[2] - top, h - 1), min(box[3] - left, w - 1)
            if r1 - r0 < 1 or c1 - c0 < 1:
                raise ValueError(f"the box {list(box)} does not cover the scan region (rows {top}-{top + h - 1}, columns {left}-{left + w - 1})")
            box = (r0, c0, r1, c1)
        prev = None if previous is None else crop_to_scan(np.asarray(previous), image)
        p = self.predict_clicks(scan_view(image), fg, bg, box=box, previous=prev)
        return Prediction(*(to_full_frame(a, image) for a in (p.probability, p.raw_mask, p.mask)))

    def as_click_model(self):
        """This predictor as the click protocol's ``predict(image, fg, bg, box=, previous=)``
        (:func:`~busi_monai.interactive.protocol.evaluate_clicks`): the mask it returns
        (processed, clicks honoured) as 0/1, so that the protocol scores what the user sees."""

        def predict(image, fg, bg, box=None, previous=None):
            return self.predict_clicks(image, fg, bg, box=box, previous=previous).mask.astype(np.float32)

        return predict

    @torch.no_grad()
    def mc_dropout(self, images: list[Image2D | np.ndarray], passes: int = 8) -> torch.Tensor:
        """``passes`` stochastic probability maps per image, (passes, N, 1, S, S)."""
        return torch.stack([self.predict_small(images, mc_dropout=True) for _ in range(passes)])


def _set_dropout(net: torch.nn.Module, active: bool) -> None:
    """Dropout on (Monte Carlo) with batch norm left in eval mode."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train(active)


def expand_ensemble(members: list) -> list:
    """A directory of cross-validation folds (``fold*/model.pt``) stands for its members."""
    out: list = []
    for p in members:
        if isinstance(p, dict):
            out.extend(p.get("members") or [p])  # an averaged bundle read back (bundle.checkpoint_from_bundle)
            continue
        p = Path(p)
        if p.is_dir():
            members = sorted(p.glob("fold*/model.pt")) or ([p / "model.pt"] if (p / "model.pt").is_file() else [])
            if not members:
                raise FileNotFoundError(f"{p}: no model.pt and no fold*/model.pt inside")
            out.extend(members)
        else:
            out.append(p)
    return out
