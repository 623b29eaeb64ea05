"""Checkpoints that carry their preset and preprocessing, written atomically."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from busi_monai import __version__
from busi_monai.data.io import atomic_path
from busi_monai.model.networks import NetworkConfig, PaperAttentionUNet, build_network
from busi_monai.training.recipes import Recipe


def atomic_torch_save(obj, path: str | Path) -> None:
    """Write then rename, so a reader never sees a half-written file (same directory, same fs)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def make_checkpoint(model: PaperAttentionUNet, recipe: Recipe, preset: str, state_dict: dict | None = None, **extra) -> dict:
    """``state_dict`` (on the CPU) stands in for the model's current weights, e.g. earlier best ones."""
    state = state_dict if state_dict is not None else {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    return {
        "format": "busi-monai/1",
        "busi_monai_version": __version__,
        "preset": preset,
        "network": _unwrap(model).config.to_dict(),
        "recipe": recipe.to_dict(),
        "preprocessing": {"image_size": recipe.image_size, "intensity": "minmax_0_1", "resize_mode": "bilinear"},
        "threshold": recipe.threshold,
        "state_dict": state,
        **extra,
    }


def _unwrap(model):
    return getattr(model, "_orig_mod", model)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such model file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable model checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "network" not in ckpt:
        raise CheckpointError(f"{path}: not a busi-monai checkpoint (no network config or weights)")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu", **network_overrides) -> PaperAttentionUNet:
    """The checkpoint's network in eval mode; ``network_overrides`` replace fields of its
    config that do not change the weights (e.g. ``confidence_gate=0`` turns the gate off)."""
    config = replace(NetworkConfig.from_dict(ckpt["network"]), **{k: v for k, v in network_overrides.items() if v is not None})
    net = build_network(config)
    net.load_state_dict(ckpt["state_dict"])
    return net.to(device).eval()


def with_new_inputs(old: dict, new: dict) -> dict:
    """``old`` weights for a network that reads more input channels (``new``'s shapes): where a
    tensor differs only in having fewer input channels (dim 1), the added channels get zero
    weights. A model trained before the click channels existed then starts a click network
    that, without clicks, answers exactly as it did. Anything else is left as it is (loading
    then fails as for another architecture)."""
    out = dict(old)
    for k, v in old.items():
        t = new.get(k)
        if t is not None and v.dim() == t.dim() >= 2 and v.shape[1] < t.shape[1] and v.shape[:1] + v.shape[2:] == t.shape[:1] + t.shape[2:]:
            pad = v.new_zeros((v.shape[0], t.shape[1] - v.shape[1], *v.shape[2:]))
            out[k] = torch.cat([v, pad], dim=1)
    return out
