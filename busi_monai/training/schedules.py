"""Learning-rate schedules by name (a recipe's ``lr_schedule``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from busi_monai.registry import lookup
from busi_monai.training.recipes import Recipe

SCHEDULES: dict[str, Callable[[Recipe, torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]] = {
    "exponential": lambda r, opt, epochs: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=r.lr_decay),
    "cosine": lambda r, opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=r.learning_rate * 0.01),
}


def make_scheduler(recipe: Recipe, optimizer, epochs: int):
    return lookup(SCHEDULES, recipe.lr_schedule, "lr schedule")(recipe, optimizer, epochs)
