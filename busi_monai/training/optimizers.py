"""Optimisers by name (a recipe's ``optimizer``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from busi_monai.registry import lookup
from busi_monai.training.recipes import Recipe


def _adam(recipe: Recipe, params, device: torch.device, graph_safe: bool = False) -> torch.optim.Optimizer:
    if graph_safe:  # the schedule fills the tensor learning rate in place, where the graph reads it
        lr = torch.tensor(recipe.learning_rate, dtype=torch.float32, device=device)
        on_gpu = device.type == "cuda"  # PyTorch captures optimisers on GPUs only
        return torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay, capturable=on_gpu, foreach=on_gpu)
    # fused Adam: one kernel per step instead of several per parameter tensor (CUDA only).
    return torch.optim.Adam(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay, fused=device.type == "cuda")


def _sgd_nesterov(recipe: Recipe, params, device: torch.device, graph_safe: bool = False) -> torch.optim.Optimizer:
    if graph_safe:
        raise ValueError("optimizer sgd_nesterov cannot be captured in a CUDA graph (PyTorch's SGD is not capturable); use adam")
    # nnU-Net v2's: SGD with Nesterov momentum (0.99 there), weight decay 3e-5.
    return torch.optim.SGD(
        params, lr=recipe.learning_rate, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay,
        fused=device.type == "cuda",
    )  # fmt: skip


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": _adam,  # the paper's
    "sgd_nesterov": _sgd_nesterov,
}


def make_optimizer(recipe: Recipe, params, device: torch.device, graph_safe: bool = False) -> torch.optim.Optimizer:
    """The optimiser a recipe's ``optimizer`` names, over ``params``.

    Args:
        recipe: its ``optimizer``, ``learning_rate``, ``weight_decay`` and ``momentum``.
        params: the parameters to optimise.
        device: fused kernels where it is a GPU.
        graph_safe: ``capturable`` with a tensor learning rate, for
            :class:`~busi_monai.training.graphs.GraphedStep`; ValueError where the optimiser has
            no such form.
    """
    return lookup(OPTIMIZERS, recipe.optimizer, "optimizer")(recipe, params, torch.device(device), graph_safe)
