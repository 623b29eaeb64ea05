"""Batch samplers by name (a recipe's ``sampler``): which training images each batch holds.

A sampler turns an epoch's random permutation (drawn by the loop) into the epoch's order; the
loop slices batches from it. ``shuffle`` keeps the permutation, so the paper's batches and
random stream are unchanged. ``foreground`` reorders it so that each batch holds at least its
share of images with lesion pixels (nnU-Net forces a third of each batch to contain foreground).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from busi_monai.registry import lookup
from busi_monai.training.recipes import Recipe


class ShuffleSampler:
    """The permutation's consecutive slices: every image once per epoch, in random order."""

    def order(self, perm: torch.Tensor, batch_size: int) -> torch.Tensor:
        return perm

    def batch(self, perm: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
        """The indices of batch ``step`` of the epoch whose permutation is ``perm``."""
        return self.order(perm, batch_size)[step * batch_size : (step + 1) * batch_size]


def forced(batch_size: int, fraction: float) -> int:
    """How many images of a batch must hold lesion pixels: nnU-Net's count, the batch less
    ``round(batch_size * (1 - fraction))`` (1 of 4, 5 of 16 at a third)."""
    return batch_size - round(batch_size * (1 - fraction))


class ForegroundSampler(ShuffleSampler):
    """At least :func:`forced` lesion images in each batch (a last, smaller batch by its own size).

    Lesion images are moved forward from later in the permutation, so that with enough of them
    every image is still seen once per epoch. With too few, lesion images repeat (in the
    permutation's order) in place of background ones; with none, it is the plain shuffle.

    Args:
        has_lesion: (N,) bool, whether each training image has lesion pixels.
        fraction: the share of each batch that must hold lesion pixels.
    """

    def __init__(self, has_lesion: torch.Tensor, fraction: float):
        self.has_lesion = torch.as_tensor(has_lesion, dtype=torch.bool).cpu()
        self.fraction = float(fraction)
        self._perm: torch.Tensor | None = None
        self._order: torch.Tensor | None = None

    def order(self, perm: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self._perm is perm and self._order is not None:  # once per epoch, not once per batch
            return self._order
        self._perm, self._order = perm, self.arrange(perm, batch_size)
        return self._order

    def arrange(self, perm: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The epoch's order: ``perm`` with lesion images moved (or repeated) into each batch."""
        perm = perm.cpu()
        lesion = self.has_lesion[perm]
        if self.fraction <= 0 or not bool(lesion.any()):
            return perm
        order = perm.tolist()
        is_les = lesion.tolist()
        les_cycle = [i for i, les in zip(order, is_les) if les]  # repeats come in this order
        reps = 0
        for start in range(0, len(order), batch_size):
            end = min(start + batch_size, len(order))
            want = forced(end - start, self.fraction)
            have = sum(is_les[start:end])
            slot = start
            while have < want:
                while is_les[slot]:  # a background slot of this batch
                    slot += 1
                later = next((j for j in range(end, len(order)) if is_les[j]), None)
                if later is not None:  # swap a later lesion image in: each image still once
                    order[slot], order[later] = order[later], order[slot]
                    is_les[slot], is_les[later] = True, False
                else:  # none left: repeat one in place of the background image
                    order[slot], is_les[slot] = les_cycle[reps % len(les_cycle)], True
                    reps += 1
                have += 1
        return torch.tensor(order, dtype=perm.dtype)


SAMPLERS: dict[str, Callable[[Recipe, torch.Tensor], ShuffleSampler]] = {
    "shuffle": lambda recipe, labels: ShuffleSampler(),  # the paper's
    "foreground": lambda recipe, labels: ForegroundSampler(labels.flatten(1).amax(1) > 0, recipe.foreground_fraction),
}


def make_sampler(recipe: Recipe, labels: torch.Tensor) -> ShuffleSampler:
    """The sampler a recipe's ``sampler`` names, for training images with these (N, 1, S, S) ``labels``."""
    return lookup(SAMPLERS, recipe.sampler, "batch sampler")(recipe, labels)
