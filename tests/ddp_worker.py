"""One worker of the data-parallel tests (tests/test_distributed.py), run under torchrun's
launcher: ``fit`` on a small in-memory set (:func:`data`), rank 0 writing each step's loss of
the global batch to ``OUT/steps.json`` and how far the ranks' weights are apart at the end to
``OUT/ranks.json``. ``--fail-rank R`` makes rank R raise after its
second step, as a worker that runs out of memory would."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from busi_monai.data.packs import CachedData
from busi_monai.training import distributed
from busi_monai.training.loop import RunSettings, Trainer
from busi_monai.training.recipes import get_recipe

# Deterministic (no dropout, no augmentation), so one process and two take the same steps;
# batch 5 over 2 workers gives shares of 3 and 2, and the foreground sampler has work to do.
# SGD, not Adam: Adam's first steps move each weight by the learning rate times the sign of
# its gradient, so rounding in a near-zero gradient alone moves a weight by up to twice that,
# and the runs would part for a reason that is not the one tested.
RECIPE = get_recipe("fast").with_overrides(
    network="fast-dropout", image_size=32, batch_size=5, epochs=1, optimizer="sgd_nesterov", momentum=0.9,
    learning_rate=0.01, augment="none", sampler="foreground",
)


def data(n: int, seed: int) -> CachedData:
    """``n`` 32-px images: speckle, and on two of three a bright disc that is the lesion."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images, labels = [], []
    for i in range(n):
        c = 8 + 16 * torch.rand(2, generator=g)
        r = 3 + 5 * float(torch.rand(1, generator=g))
        disc = (((yy - c[0]) ** 2 + (xx - c[1]) ** 2) < r * r).float() * (i % 3 != 2)
        images.append((0.3 * torch.rand(32, 32, generator=g) + 0.5 * disc).clamp(0, 1))
        labels.append(disc)
    items = [{"id": f"img{i}", "class": "benign" if i % 3 != 2 else "normal"} for i in range(n)]
    return CachedData(torch.stack(images)[:, None], torch.stack(labels)[:, None], items)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--epochs", type=int, default=RECIPE.epochs)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    steps = []

    def on_step(step: int, loss: float) -> None:
        if distributed.current().rank == a.fail_rank and step == 1:
            raise RuntimeError("out of memory (simulated) on this worker")
        steps.append(loss)
        if distributed.current().is_main:  # each step, so a stopped run shows how far it got
            Path(a.out, "steps.json").write_text(json.dumps(steps))

    with distributed.process_group("cpu", timeout_s=60) as device:
        settings = RunSettings(device=device, progress=False, amp=False, on_step=on_step, seed=0, resume=a.resume)
        trainer = Trainer(data(14, 0), data(4, 1), a.out, "fast", RECIPE.with_overrides(epochs=a.epochs), settings)
        trainer.run()
        # Every rank's weights, gathered: DDP keeps them equal only if every rank started alike.
        flat = torch.cat([t.detach().flatten().float() for t in trainer.model.state_dict().values()])
        ranks = distributed.current()
        gathered = [torch.zeros_like(flat) for _ in range(ranks.world_size)]
        torch.distributed.all_gather(gathered, flat)
        if ranks.is_main:
            Path(a.out, "ranks.json").write_text(json.dumps({"max_difference": max(float((g - flat).abs().max()) for g in gathered)}))


if __name__ == "__main__":
    sys.exit(main())
