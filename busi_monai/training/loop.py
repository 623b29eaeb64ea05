"""Training with the paper's recipe (or another preset) on MONAI datalists.

The preprocessed 256x256 data is cached once in memory (on the GPU when there is one) and
batches are drawn from that tensor, so no PNG is decoded twice. The same :func:`fit` serves the
CLI, the MONAI Label trainer and cross-validation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from busi_monai.data.datasets import load_split
from busi_monai.data.packs import CachedData
from busi_monai.data.splits import split_cached, split_record
from busi_monai.device import mixed_precision, resolve_device
from busi_monai.interactive.simulation import simulate_training_clicks
from busi_monai.jsonio import write_json
from busi_monai.model.checkpoint import (
    atomic_torch_save,
    with_new_inputs,
    load_checkpoint,
    make_checkpoint,
)
from busi_monai.interactive.zoom import training_crops
from busi_monai.model.networks import build_network, network_config, takes_previous
from busi_monai.training import distributed
from busi_monai.training.augmentation import augmentation
from busi_monai.training.gate import choose_run_gate
from busi_monai.training.graphs import GraphedStep
from busi_monai.training.losses import make_loss
from busi_monai.training.optimizers import make_optimizer
from busi_monai.training.recipes import Recipe, get_recipe
from busi_monai.training.sampling import make_sampler
from busi_monai.training.schedules import make_scheduler
from busi_monai.training.validation import predict_cached, quick_scores

log = logging.getLogger(__name__)

# Checkpoints may take at most this share of the training time (see fit).
CHECKPOINT_OVERHEAD = 0.05


class TrainingError(RuntimeError):
    """A training that cannot run (no labels, bad data); the message says why."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class RunSettings:
    """How one training runs, as opposed to what it trains (the :class:`Recipe`).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds the weights, the batch order and the augmentation.
        resume: continue ``out/last.pt`` where it stopped.
        init_checkpoint: start from earlier weights (as MONAI Label retraining does).
        progress: show a progress bar.
        on_epoch: called with each epoch's record (the app's trainer reports through it); rank 0 only.
        on_step: called on every rank with (step, the global batch's loss) after each step; a
            host sync (and, over several workers, an all-reduce) per step, so for tests and benchmarks.
        compile_model: torch.compile the training step.
        cuda_graphs: replay each full batch's whole step (forward, loss, backward, Adam step) as
            one CUDA graph (:class:`~busi_monai.training.graphs.GraphedStep`): no compilation;
            eager where there is no GPU. Not with ``compile_model``.
        checkpoint_overhead: the share of the time checkpoints may take (see :class:`CheckpointPacer`).
        amp: bf16 autocast on or off; None decides by the hardware (:func:`mixed_precision`).
    """

    device: str = "auto"
    seed: int = 0
    resume: bool = False
    init_checkpoint: str | Path | None = None
    progress: bool = True
    on_epoch: Callable[[dict], None] | None = None
    on_step: Callable[[int, float], None] | None = None
    compile_model: bool = False
    cuda_graphs: bool = False
    checkpoint_overhead: float = CHECKPOINT_OVERHEAD
    amp: bool | None = None


def fit(
    train: CachedData,
    val: CachedData,
    out: str | Path,
    preset: str = "paper",
    recipe: Recipe | None = None,
    settings: RunSettings | None = None,
    **setting_overrides,
) -> dict:
    """Train and write ``out/model.pt`` (best validation score), ``out/last.pt``, ``out/history.json``,
    ``out/split.json`` and ``out/summary.json``; return the summary.

    ``settings`` (or its fields as keywords) say how the run goes; ``recipe`` (default: the
    preset's) what it trains.
    """
    settings = replace(settings or RunSettings(), **setting_overrides)
    return Trainer(train, val, out, preset, recipe or get_recipe(preset), settings).run()


class Trainer:
    """One training run, in steps: build the model and its optimiser, restore earlier weights,
    then per epoch train, validate, keep the best weights and write checkpoints at a pace
    (:class:`CheckpointPacer`: after the first epoch, whenever writing costs at most
    ``checkpoint_overhead`` of the time since the last write, and at the end)."""

    def __init__(self, train: CachedData, val: CachedData, out: str | Path, preset: str, recipe: Recipe, settings: RunSettings):
        if len(train) == 0:
            raise TrainingError("no labelled images to train on")
        self.preset, self.recipe, self.settings = preset, recipe, settings
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dev = dev = resolve_device(settings.device)
        _seed_everything(settings.seed)
        self.model = build_network(replace(network_config(recipe.network), confidence_gate=recipe.confidence_gate)).to(dev)
        # Several workers: equal weights (seeded alike above), the global batch's batch-norm
        # statistics, and each rank's own dropout and augmentation draws from here on.
        self.ranks, self.ddp = distributed.current(), None
        if self.ranks.active:
            distributed.synced_batch_norm(self.model)
            torch.manual_seed(self.ranks.seed(settings.seed))
            if settings.cuda_graphs:
                raise TrainingError("cuda_graphs records one process's step; train several workers without it")
            if recipe.batch_size < self.ranks.world_size:
                raise TrainingError(f"batch size {recipe.batch_size} is the global batch: it needs an image for each of the {self.ranks.world_size} workers")
        self.amp = mixed_precision(dev) if settings.amp is None else settings.amp
        self.channels_last = dev.type == "cuda" or self.amp
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if settings.compile_model and settings.cuda_graphs:
            raise TrainingError("compile_model and cuda_graphs exclude each other: torch.compile records its own CUDA graphs")
        try:
            self.optimizer = make_optimizer(recipe, self.model.parameters(), dev, graph_safe=settings.cuda_graphs)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.sampler = make_sampler(recipe, train.labels)
        self.has_lesion = train.labels.flatten(1).amax(1).cpu() > 0  # spread evenly over the ranks' shares
        self.scheduler = make_scheduler(recipe, self.optimizer, recipe.epochs)
        self.loss_fn = make_loss(recipe, self.model.config.deep_supervision)
        self.augment = augmentation(recipe.augment)
        self.train_items, self.val_items = train.items, val.items
        self.train_d, self.val_d = train.to(dev), val.to(dev)
        # Zoom-in training: crops around the lesions, resampled from a cache at twice the size.
        self.zoom_source = None
        if self.model.config.in_channels > 1 and recipe.zoom_fraction > 0:
            self.zoom_source = zoom_source(train, 2 * recipe.image_size, settings.progress).to(dev)
        self.zoom_generator = torch.Generator().manual_seed(self.ranks.seed(settings.seed) + 104729)
        self.history: list[dict] = []
        self.start_epoch, self.best, self.best_dice = 0, -math.inf, None
        self.best_state = None  # the best weights since the last write, kept in memory until the next one
        self.last_path, self.best_path = self.out / "last.pt", self.out / "model.pt"
        self.pacer = CheckpointPacer(settings.checkpoint_overhead)
        # Clicks are drawn on the CPU, so a seed gives the same clicks on any device.
        self.click_generator = torch.Generator().manual_seed(self.ranks.seed(settings.seed) + 7919)

    def restore(self) -> None:
        """``resume``: the optimiser, schedule and history of ``last.pt``; else ``init_checkpoint``'s weights."""
        s = self.settings
        # Rank 0 reads last.pt and hands it to every rank, so the others need no shared disk.
        last = self.ranks.from_main(lambda: load_checkpoint(self.last_path) if s.resume and self.last_path.is_file() else None)
        if last is not None:
            ck = last
            self.model.load_state_dict(ck["state_dict"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.start_epoch, self.history = ck["epoch"] + 1, ck.get("history", [])
            self.best, self.best_dice = ck.get("best_val_score", -math.inf), ck.get("best_val_dice")
            log.info("resuming %s at epoch %d", self.last_path, self.start_epoch + 1)
        elif s.init_checkpoint and Path(s.init_checkpoint).is_file():
            ck = load_checkpoint(s.init_checkpoint)
            try:
                self.model.load_state_dict(with_new_inputs(ck["state_dict"], self.model.state_dict()))
                log.info("starting from the weights of %s", s.init_checkpoint)
            except RuntimeError:
                log.warning("%s has another architecture; training from scratch", s.init_checkpoint)

    def train_epoch(self, epoch: int, generator: torch.Generator, step) -> float:
        """One pass over the training images in random order; returns the mean loss."""
        model, r, data = self.model, self.recipe, self.train_d
        model.train()
        n = len(data)
        perm = torch.randperm(n, generator=generator)
        total = torch.zeros((), device=self.dev)  # summed on the device: no host sync per step
        for s in range(math.ceil(n / r.batch_size)):
            batch = self.sampler.batch(perm, s, r.batch_size)
            idx, count = self.ranks.share(batch, self.has_lesion)  # the whole batch in one process
            idx = idx.to(self.dev)
            x, y = data.images[idx], data.labels[idx]
            if self.zoom_source is not None:
                x, y = self.zoomed(idx, x, y)
            if self.augment is not None:
                x, y = self.augment(x, y)
            if self.model.config.in_channels > x.shape[1]:
                x = self.with_clicks(x, y)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.ddp is not None:  # weighted so that DDP's mean gradient is the global batch's
                loss = step(x, y, scale=count * self.ranks.world_size / len(batch))
            else:
                loss = (step if x.shape[0] == r.batch_size else self.eager_step)(x, y)
            total += loss.detach() * count
            if self.settings.on_step:
                self.settings.on_step(epoch * math.ceil(n / r.batch_size) + s, float(self.ranks.sum(loss.detach() * count)) / len(batch))
        self.scheduler.step()
        return float(self.ranks.sum(total)) / n

    def learn(self, x: torch.Tensor, y: torch.Tensor, forward=None, autocast_cache: bool = True, scale: float = 1.0) -> torch.Tensor:
        """Forward (``forward``, default the model's), loss, backward (of the loss times
        ``scale``) and optimiser step on one batch whose gradients are already zero or None;
        returns the loss."""
        with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=autocast_cache):
            seg, aux = (forward or self.model.forward_parts)(x)
            loss = self.loss_fn([p.float() for p in (seg, *aux)], y) if aux else self.loss_fn(seg.float(), y)
        (loss * scale if scale != 1.0 else loss).backward()
        self.optimizer.step()
        return loss

    def eager_step(self, x: torch.Tensor, y: torch.Tensor, forward=None, scale: float = 1.0) -> torch.Tensor:
        # Beside a CUDA graph the gradients are zeroed in place: the graph holds their memory.
        self.optimizer.zero_grad(set_to_none=not self.settings.cuda_graphs)
        return self.learn(x, y, forward, scale=scale)

    @torch.no_grad()
    def zoomed(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with a share (``zoom_fraction``) of its lesion images replaced by crops
        around the lesion (:func:`~busi_monai.interactive.zoom.training_crops`), so that one
        network segments both the whole view and the zoomed one."""
        r = self.recipe
        pick = (torch.rand(len(idx), generator=self.zoom_generator) < r.zoom_fraction).to(x.device)
        pick &= y.flatten(1).amax(1) > 0.5
        if not bool(pick.any()):
            return x, y
        rows = idx[pick]
        zx, zy = training_crops(
            self.zoom_source.images[rows], self.zoom_source.labels[rows], r.image_size, self.zoom_generator,
            margin=r.zoom_margin, jitter=r.zoom_jitter, min_side=r.zoom_min_side,
        )  # fmt: skip
        x, y = x.clone(), y.clone()
        x[pick], y[pick] = zx.to(x.dtype), zy.to(y.dtype)
        return x, y

    @torch.no_grad()
    def with_clicks(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch with simulated click maps appended (:func:`simulate_training_clicks`): none
        for a share of it, else a click from the truth and corrective clicks from the model's own
        errors, predicted in eval mode so that the clicks do not disturb batch-norm statistics."""
        r, model = self.recipe, self.model

        def predict(inp: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
                return torch.sigmoid(model.forward_parts(inp)[0].float())

        model.eval()
        try:
            clicks = simulate_training_clicks(
                predict, x, y, generator=self.click_generator, p_no_clicks=r.click_free_fraction, max_rounds=r.click_rounds,
                sigma=r.click_sigma, previous=takes_previous(model.config), p_from_outline=r.outline_first_fraction,
            )  # fmt: skip
        finally:
            model.train()
        return torch.cat((x, clicks.maps.to(x.dtype)), dim=1)

    def validate(self) -> dict:
        """The validation slice's scores (none without one)."""
        if not len(self.val_d) or not self.ranks.is_main:  # rank 0 alone validates
            return {}
        return quick_scores(predict_cached(self.model, self.val_d.images, amp=self.amp), self.val_d.labels, self.recipe.threshold)

    def keep_if_best(self, epoch: int, rec: dict) -> None:
        score = rec.get("val_score")
        if score is None or not math.isfinite(score):  # no validation images, or a diverged loss
            score = -rec["loss"] if math.isfinite(rec["loss"]) else -math.inf
        if score > self.best:
            self.best, self.best_dice = score, rec.get("val_dice")
            self.best_state = {"epoch": epoch, "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def save(self, epoch: int) -> None:
        """``model.pt`` (the best weights, if they changed) and ``last.pt`` (everything to resume), atomically."""
        meta = {"epoch": epoch, "history": self.history, "n_train": len(self.train_d), "n_val": len(self.val_d), "device": str(self.dev)}
        kept = {"best_val_score": self.best, "best_val_dice": self.best_dice}
        with self.pacer.timed():
            if self.best_state is not None:
                weights = {k: v.cpu() for k, v in self.best_state["state"].items()}
                ck = make_checkpoint(self.model, self.recipe, self.preset, state_dict=weights, **kept, **{**meta, "epoch": self.best_state["epoch"]})
                atomic_torch_save(ck, self.best_path)
                self.best_state = None
            ck = make_checkpoint(
                self.model, self.recipe, self.preset, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), **kept, **meta
            )
            atomic_torch_save(ck, self.last_path)
        write_json(self.history, self.out / "history.json")

    def run(self) -> dict:
        r, s = self.recipe, self.settings
        self.restore()
        if self.ranks.is_main:  # rank 0 alone writes
            write_json(split_record(self.train_items, self.val_items), self.out / "split.json")
        # Full batches through the compiled or graphed step (CUDA graphs need fixed shapes); the
        # last, smaller one eagerly rather than recording a second graph for it.
        if self.ranks.active:  # DistributedDataParallel, after restore(): every rank starts from the same weights
            self.ddp = distributed.data_parallel(self.model, self.dev)
            step = partial(self.eager_step, forward=compile_network(self.ddp, self.dev) if s.compile_model else self.ddp)
        elif s.compile_model:
            step = partial(self.eager_step, forward=compile_network(self.model.forward_parts, self.dev))
        elif s.cuda_graphs:
            step = GraphedStep(partial(self.learn, autocast_cache=False), self.optimizer)
        else:
            step = self.eager_step
        writer = _tensorboard(self.out / "tensorboard") if self.ranks.is_main else None
        g = torch.Generator().manual_seed(s.seed + self.start_epoch)
        bar = tqdm(range(self.start_epoch, r.epochs), desc="train", unit="epoch", disable=not (s.progress and self.ranks.is_main), initial=self.start_epoch, total=r.epochs)
        t0 = time.time()
        for epoch in bar:
            loss = self.train_epoch(epoch, g, step)
            rec = {"epoch": epoch + 1, "loss": loss, "lr": float(self.optimizer.param_groups[0]["lr"]), "time_s": time.time() - t0}
            rec.update(self.validate())
            self.history.append(rec)
            for k, v in rec.items():
                if k != "epoch" and isinstance(v, float) and math.isfinite(v) and writer:
                    writer.add_scalar(k, v, epoch + 1)
            self.keep_if_best(epoch, rec)
            if self.ranks.is_main and self.pacer.due(epoch + 1 == r.epochs):
                self.save(epoch)
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k in ("loss", "val_dice") and v is not None})
            if s.on_epoch and self.ranks.is_main:
                s.on_epoch(rec)
        if writer:
            writer.close()
        if not self.ranks.is_main:
            return {"rank": self.ranks.rank, "world_size": self.ranks.world_size}
        # The served model's own gate, chosen on this run's validation slice (never the test split).
        gate = choose_run_gate(self.out, self.val_d, r, self.amp) if self.best_path.is_file() else {}
        validated = len(self.val_d) > 0
        summary = {
            "preset": self.preset,
            "recipe": r.to_dict(),
            "device": str(self.dev),
            "amp_bf16": self.amp,
            "world_size": self.ranks.world_size,
            "epochs": r.epochs,
            "n_train": len(self.train_d),
            "n_val": len(self.val_d),
            "best_val_score": self.best if validated else None,
            "best_val_dice": self.best_dice if validated else None,
            "train_time_s": time.time() - t0,
            "checkpoint_writes": self.pacer.writes,
            "model": str(self.best_path),
            "confidence_gate": gate.get("confidence_gate", r.confidence_gate),
            "gate_source": gate.get("gate_source", "recipe: no model written"),
        }
        write_json(summary, self.out / "summary.json")
        return summary


class CheckpointPacer:
    """Decides when a checkpoint is worth its cost: after the first epoch, at the end, and
    whenever the time since the last write is at least its cost divided by ``overhead``."""

    def __init__(self, overhead: float):
        self.overhead, self.cost, self.last, self.writes = overhead, 0.0, None, 0

    def due(self, final: bool) -> bool:
        if final or self.last is None or self.overhead >= 1:
            return True
        return time.perf_counter() - self.last >= self.cost / max(self.overhead, 1e-9)

    @contextlib.contextmanager
    def timed(self):
        t = time.perf_counter()
        yield
        self.last = time.perf_counter()
        self.cost, self.writes = self.last - t, self.writes + 1


def zoom_source(data: CachedData, size: int, progress: bool = False) -> CachedData:
    """``data``'s images at ``size``: decoded again from their files where every item has them,
    else (a pack holds no files) upsampled from the cache, which zooms without the detail."""
    from busi_monai.data.packs import cache_items

    if data.items and all(isinstance(it.get("image"), str) and it.get("label") and Path(it["image"]).is_file() for it in data.items):
        return cache_items(data.items, size, progress, pad_square=data.pad_square)
    log.warning("zoom-in training: the images have no files to read at %d px; upsampling the cached ones", size)
    up = torch.nn.functional.interpolate
    return CachedData(up(data.images, size=(size, size), mode="bilinear", align_corners=False),
                      (up(data.labels, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float(), data.items, data.pad_square)  # fmt: skip


def compile_network(model, dev):
    """torch.compile; CUDA graphs on a GPU (small batches are launch-bound). Eager if it fails."""
    try:
        return torch.compile(model, mode="max-autotune-no-cudagraphs" if dev.type != "cuda" else "reduce-overhead")
    except Exception as e:  # an old GPU or a missing compiler: the eager model gives the same result
        log.warning("torch.compile unavailable (%s); running eagerly", e)
        return model


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(path))


def train_dataset(
    data: str | Path,
    out: str | Path,
    preset: str = "paper",
    epochs: int | None = None,
    batch_size: int | None = None,
    image_size: int | None = None,
    learning_rate: float | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    seed: int = 0,
    compile_model: bool = False,
    overrides: dict | None = None,
    amp: bool | None = None,
    cuda_graphs: bool = False,
) -> dict:
    """Train on a prepared dataset (directory with dataset.json) or a pack (.npz).

    ``overrides`` sets any other recipe field (e.g. ``{"augment": "none"}`` for an ablation).
    """
    named = {"epochs": epochs, "batch_size": batch_size, "image_size": image_size, "learning_rate": learning_rate}
    recipe = get_recipe(preset).with_overrides(**{**(overrides or {}), **{k: v for k, v in named.items() if v is not None}})
    train, val = split_cached(load_split(data, "training", recipe.image_size, progress, recipe.pad_square), recipe.val_fraction, seed)
    settings = RunSettings(device=device, seed=seed, resume=resume, progress=progress, compile_model=compile_model, amp=amp, cuda_graphs=cuda_graphs)
    return fit(train, val, out, preset, recipe, settings)
