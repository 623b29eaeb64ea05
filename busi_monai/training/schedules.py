"""Learning-rate schedules by name (a recipe's ``lr_schedule``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from busi_monai.registry import lookup
from busi_monai.training.recipes import Recipe

SCHEDULES: dict[str, Callable[[Recipe, torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]] = {
    "exponential": lambda r, opt, epochs: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=r.lr_decay),
    "cosine": lambda r, opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=r.learning_rate * 0.01),
    # nnU-Net v2's polynomial decay, stepped per epoch as nnU-Net steps it (and as the loop steps
    # every schedule): lr * (1 - epoch / epochs) ** poly_exponent.
    "poly": lambda r, opt, epochs: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(0.0, 1 - e / max(1, epochs)) ** r.poly_exponent),
}


def make_scheduler(recipe: Recipe, optimizer, epochs: int):
    return lookup(SCHEDULES, recipe.lr_schedule, "lr schedule")(recipe, optimizer, epochs)
