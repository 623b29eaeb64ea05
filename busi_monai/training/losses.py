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
}


def make_loss(recipe: Recipe, deep_supervision: bool):
    loss = lookup(LOSSES, recipe.loss, "loss")()
    return DeepSupervisionLoss(loss, weight_mode="exp") if deep_supervision else loss
