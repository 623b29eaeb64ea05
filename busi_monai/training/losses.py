"""Losses by name (a recipe's ``loss``), wrapped for deep supervision when the network has it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from busi_monai.registry import lookup
from busi_monai.training.recipes import Recipe

# A recipe's ``loss`` and ``lr_schedule`` name one of these; adding one is one entry here.
LOSSES: dict[str, Callable[[], torch.nn.Module]] = {
    "bce": torch.nn.BCEWithLogitsLoss,  # the paper's
    "dice_bce": lambda: DiceCELoss(sigmoid=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=False),
    # nnU-Net's: Dice over the whole batch (one sum of intersections and of areas), so a normal
    # image's empty mask does not make its own Dice term undefined, plus cross-entropy.
    "dice_ce_batch": lambda: DiceCELoss(sigmoid=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True),
}


def ds_weights(mode: str, levels: int) -> list[float] | None:
    """Deep-supervision weights, full resolution first: ``exp`` None (MONAI's own 1, 1/2, 1/4 ...);
    ``halving`` 1, 1/2, 1/4 ... normalised to sum 1, as nnU-Net does."""
    if mode == "exp":
        return None
    if mode == "halving":
        w = [0.5**i for i in range(levels)]
        return [v / sum(w) for v in w]
    raise ValueError(f"unknown deep-supervision weights {mode!r}; choose one of exp, halving")


def make_loss(recipe: Recipe, deep_supervision: bool, levels: int = 3):
    """The recipe's loss; with deep supervision, over ``levels`` outputs (the network's head and its aux heads)."""
    loss = lookup(LOSSES, recipe.loss, "loss")()
    if not deep_supervision:
        return loss
    return DeepSupervisionLoss(loss, weight_mode="exp", weights=ds_weights(recipe.ds_weights, levels))
