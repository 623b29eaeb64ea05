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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from busi_monai.data.datasets import load_split
from busi_monai.data.packs import CachedData
from busi_monai.data.splits import split_cached, split_record
from busi_monai.device import mixed_precision, resolve_device
from busi_monai.jsonio import write_json
from busi_monai.model.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    make_checkpoint,
)
from busi_monai.model.networks import build_network, network_config
from busi_monai.training.augmentation import augmentation
from busi_monai.training.losses import make_loss
from busi_monai.training.recipes import Recipe, get_recipe
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


def fit(
    train: CachedData,
    val: CachedData,
    out: str | Path,
    preset: str = "paper",
    recipe: Recipe | None = None,
    device: str = "auto",
    resume: bool = False,
    init_checkpoint: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    compile_model: bool = False,
    checkpoint_overhead: float = CHECKPOINT_OVERHEAD,
    amp: bool | None = None,
) -> dict:
    """Train and write ``out/model.pt`` (best validation score), ``out/last.pt``, ``out/history.json``.

    ``init_checkpoint`` starts from earlier weights (as MONAI Label retraining does);
    ``resume`` continues ``out/last.pt`` where it stopped. Checkpoints are written after the
    first epoch, then whenever writing them costs at most ``checkpoint_overhead`` of the time
    since the last write (each of the CPU's 15-s epochs; every few of a GPU's ~1-s ones, where
    writing ~230 MB each epoch would double the run), and always at the end. ``amp``: bf16
    autocast on or off; None decides by the hardware (:func:`mixed_precision`). Returns the summary.
    """
    recipe = recipe or get_recipe(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(train) == 0:
        raise TrainingError("no labelled images to train on")
    dev = resolve_device(device)
    _seed_everything(seed)
    model = build_network(replace(network_config(recipe.network), confidence_gate=recipe.confidence_gate)).to(dev)
    amp = mixed_precision(dev) if amp is None else amp
    channels_last = dev.type == "cuda" or amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # fused Adam: one kernel per step instead of several per parameter tensor (CUDA only).
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, fused=dev.type == "cuda")
    scheduler = make_scheduler(recipe, optimizer, recipe.epochs)
    loss_fn = make_loss(recipe, model.config.deep_supervision)
    aug = augmentation(recipe.augment)

    history: list[dict] = []
    start_epoch, best, best_dice = 0, -math.inf, None
    last_path, best_path = out / "last.pt", out / "model.pt"
    if resume and last_path.is_file():
        ck = load_checkpoint(last_path)
        model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, history = ck["epoch"] + 1, ck.get("history", [])
        best, best_dice = ck.get("best_val_score", -math.inf), ck.get("best_val_dice")
        log.info("resuming %s at epoch %d", last_path, start_epoch + 1)
    elif init_checkpoint and Path(init_checkpoint).is_file():
        ck = load_checkpoint(init_checkpoint)
        try:
            model.load_state_dict(ck["state_dict"])
            log.info("starting from the weights of %s", init_checkpoint)
        except RuntimeError:
            log.warning("%s has another architecture; training from scratch", init_checkpoint)

    write_json(split_record(train.items, val.items), out / "split.json")
    train_d, val_d = train.to(dev), val.to(dev)
    # Full batches through the compiled step (CUDA graphs need fixed shapes); the last, smaller
    # one eagerly rather than recording a second graph for it.
    full_step = compile_network(model.forward_parts, dev) if compile_model else model.forward_parts
    writer = _tensorboard(out / "tensorboard")
    n = len(train_d)
    steps = math.ceil(n / recipe.batch_size)
    g = torch.Generator().manual_seed(seed + start_epoch)
    bar = tqdm(range(start_epoch, recipe.epochs), desc="train", unit="epoch", disable=not progress, initial=start_epoch, total=recipe.epochs)
    t0 = time.time()
    saver = _CheckpointPacer(checkpoint_overhead)
    best_state = None  # the best weights since the last write, kept in memory until the next one
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=g)
        total = torch.zeros((), device=dev)  # summed on the device: no host sync per step
        for s in range(steps):
            idx = perm[s * recipe.batch_size : (s + 1) * recipe.batch_size].to(dev)
            x, y = train_d.images[idx], train_d.labels[idx]
            if aug is not None:
                x, y = aug(x, y)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                seg, aux = (full_step if x.shape[0] == recipe.batch_size else model.forward_parts)(x)
                loss = loss_fn([p.float() for p in (seg, *aux)], y) if aux else loss_fn(seg.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * x.shape[0]
        scheduler.step()
        rec = {"epoch": epoch + 1, "loss": float(total) / n, "lr": optimizer.param_groups[0]["lr"], "time_s": time.time() - t0}
        if len(val_d):
            rec.update(quick_scores(predict_cached(model, val_d.images, amp=amp), val_d.labels, recipe.threshold))
        history.append(rec)
        for k, v in rec.items():
            if k != "epoch" and isinstance(v, float) and math.isfinite(v) and writer:
                writer.add_scalar(k, v, epoch + 1)
        score = rec.get("val_score")
        if score is None or not math.isfinite(score):  # no validation images, or a diverged loss
            score = -rec["loss"] if math.isfinite(rec["loss"]) else -math.inf
        meta = {"epoch": epoch, "history": history, "n_train": n, "n_val": len(val_d), "device": str(dev)}
        if score > best:
            best, best_dice = score, rec.get("val_dice")
            best_state = {"epoch": epoch, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        final = epoch + 1 == recipe.epochs
        if saver.due(final):
            with saver.timed():
                kept = {"best_val_score": best, "best_val_dice": best_dice}
                if best_state is not None:
                    weights = {k: v.cpu() for k, v in best_state["state"].items()}
                    atomic_torch_save(
                        make_checkpoint(model, recipe, preset, state_dict=weights, **kept, **{**meta, "epoch": best_state["epoch"]}),
                        best_path,
                    )
                    best_state = None
                atomic_torch_save(
                    make_checkpoint(model, recipe, preset, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), **kept, **meta),
                    last_path,
                )
            write_json(history, out / "history.json")
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k in ("loss", "val_dice") and v is not None})
        if on_epoch:
            on_epoch(rec)
    if writer:
        writer.close()
    summary = {
        "preset": preset,
        "recipe": recipe.to_dict(),
        "device": str(dev),
        "amp_bf16": amp,
        "epochs": recipe.epochs,
        "n_train": n,
        "n_val": len(val_d),
        "best_val_score": best if len(val_d) else None,
        "best_val_dice": best_dice if len(val_d) else None,
        "train_time_s": time.time() - t0,
        "checkpoint_writes": saver.writes,
        "model": str(best_path),
    }
    write_json(summary, out / "summary.json")
    return summary


class _CheckpointPacer:
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
) -> dict:
    """Train on a prepared dataset (directory with dataset.json) or a pack (.npz).

    ``overrides`` sets any other recipe field (e.g. ``{"augment": "none"}`` for an ablation).
    """
    named = {"epochs": epochs, "batch_size": batch_size, "image_size": image_size, "learning_rate": learning_rate}
    recipe = get_recipe(preset).with_overrides(**{**(overrides or {}), **{k: v for k, v in named.items() if v is not None}})
    train, val = split_cached(load_split(data, "training", recipe.image_size, progress), recipe.val_fraction, seed)
    return fit(train, val, out, preset, recipe, device, resume, progress=progress, seed=seed, compile_model=compile_model)
