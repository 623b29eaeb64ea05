"""Training with the paper's recipe (or another preset) on MONAI datalists.

The preprocessed 256x256 data is cached once in memory (on the GPU when there is one) and
batches are drawn from that tensor, so no PNG is decoded twice. The same :func:`fit` serves the
CLI, the MONAI Label trainer and cross-validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.transforms import Compose
from tqdm.auto import tqdm

from .jsonio import write_json
from .checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
from .networks import build_network, network_config
from .presets import Recipe, get_recipe
from .transforms import LoadBusiImaged, augmentation, preprocess_list

log = logging.getLogger(__name__)

# Checkpoints may take at most this share of the training time (see fit).
CHECKPOINT_OVERHEAD = 0.05


class TrainingError(RuntimeError):
    """A training that cannot run (no labels, bad data); the message says why."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def load_datalist(data_dir: str | Path) -> dict[str, list[dict]]:
    """``dataset.json`` of a prepared dataset, with absolute paths."""
    data_dir = Path(data_dir)
    path = data_dir / "dataset.json"
    if not path.is_file():
        raise TrainingError(f"{data_dir}: not a prepared dataset (no dataset.json); run `busi-monai prepare` first")
    spec = json.loads(path.read_text())
    out = {}
    for split in ("training", "test"):
        items = []
        for it in spec.get(split, []):
            it = dict(it)
            for k in ("image", "label"):
                if k in it and not os.path.isabs(it[k]):
                    it[k] = str(data_dir / it[k])
            it.setdefault("id", Path(it["image"]).name.split(".")[0])
            items.append(it)
        out[split] = items
    return out


def split_validation(items: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out ``fraction`` of the items for model selection, by
    :func:`busi_monai.data.grouped_stratified_split` (the splitter of the test split): whole
    near-duplicate groups (``group``) on one side, stratified by ``class`` with a mixed
    group's class decided by :func:`busi_monai.data.group_class`. At least one item is held
    out, and at least one is kept for training."""
    from .data import grouped_stratified_split

    if fraction <= 0 or len(items) < 2:
        return list(items), []
    by_group: dict = {}
    for i, it in enumerate(items):
        by_group.setdefault(it.get("group", f"i{i}"), []).append(i)
    groups = list(by_group.values())
    train_idx, val_idx = grouped_stratified_split([it.get("class", "?") for it in items], groups, min(fraction, 0.9), seed)
    if not val_idx:  # too few items for the fraction: hold out the smallest group
        val_idx = min(groups, key=len)
    if len(val_idx) == len(items):  # one group holds everything: no validation is possible
        return list(items), []
    held = set(val_idx)
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def split_record(train: list[dict], val: list[dict]) -> dict:
    """What ``RUN/split.json`` holds: the ids and duplicate groups on each side of the split."""
    side = lambda its: [{"id": it.get("id"), "group": it.get("group"), "class": it.get("class")} for it in its]  # noqa: E731
    return {"training": side(train), "validation": side(val)}


@dataclass
class CachedData:
    images: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]
    labels: torch.Tensor  # (N, 1, S, S) float32 {0, 1}
    items: list[dict]

    def __len__(self) -> int:
        return len(self.items)

    def to(self, device) -> "CachedData":
        return CachedData(self.images.to(device), self.labels.to(device), self.items)


def cache_items(items: list[dict], image_size: int, progress: bool = True, num_workers: int = 0) -> CachedData:
    """Decode and preprocess each item once with MONAI's CacheDataset."""
    if not items:
        return CachedData(torch.zeros(0, 1, image_size, image_size), torch.zeros(0, 1, image_size, image_size), [])
    tf = Compose([LoadBusiImaged(("image", "label")), *preprocess_list(image_size)])
    ds = CacheDataset(items, transform=tf, cache_rate=1.0, num_workers=num_workers or None, progress=progress)
    images = torch.stack([torch.as_tensor(ds[i]["image"]) for i in range(len(ds))]).float()
    labels = torch.stack([torch.as_tensor(ds[i]["label"]) for i in range(len(ds))]).float()
    return CachedData(images, labels, list(items))


def save_pack(data: CachedData, path: str | Path, originals: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """A compact 8-bit copy (e.g. to carry the preprocessed set to a GPU machine).

    Images are stored as PNG (its row prediction packs ultrasound speckle ~30% tighter than
    the npz's plain deflate), masks as bits. ``originals``: (image, mask) at full size, for
    evaluation where the files are not at hand.
    """
    meta = [{k: v for k, v in it.items() if k not in ("image", "label")} for it in data.items]
    images = np.round(data.images.numpy()[:, 0] * 255).astype(np.uint8)
    orig_images = [np.clip(np.round(img), 0, 255).astype(np.uint8) for img, _ in originals or []]
    extra = {}
    for i, (_, mask) in enumerate(originals or []):
        extra[f"orig_mask_{i}"] = np.packbits(mask.astype(bool), axis=-1)
        extra[f"orig_shape_{i}"] = np.asarray(mask.shape)
    np.savez_compressed(
        path,
        **_png_blobs("images", images),
        labels=np.packbits(data.labels.numpy().astype(bool), axis=-1),
        size=data.images.shape[-1],
        meta=json.dumps(meta),
        n_originals=len(originals or []),
        **_png_blobs("orig_images", orig_images),
        **extra,
    )


def _png_blobs(name: str, arrays) -> dict:
    """Grayscale uint8 arrays as one byte string of PNGs and their end offsets."""
    import io

    from PIL import Image

    chunks = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", optimize=True)
        chunks.append(np.frombuffer(buf.getvalue(), np.uint8))
    ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)
    return {f"{name}_png": np.concatenate(chunks) if chunks else np.zeros(0, np.uint8), f"{name}_png_ends": ends}


def _from_png_blobs(z, name: str) -> list[np.ndarray]:
    import io

    from PIL import Image

    blob, ends = z[f"{name}_png"], z[f"{name}_png_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    return [np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes()))) for a, b in zip(starts, ends)]


def load_pack(path: str | Path) -> CachedData:
    z = np.load(path)
    size = int(z["size"])
    raw = np.stack(_from_png_blobs(z, "images"))[:, None] if "images_png" in z else z["images"]  # older packs: raw bytes
    images = torch.from_numpy(raw.astype(np.float32) / 255.0)
    labels = torch.from_numpy(np.unpackbits(z["labels"], axis=-1)[..., :size].astype(np.float32))
    return CachedData(images, labels, json.loads(str(z["meta"])))


def load_pack_originals(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The full-size (image, mask) pairs stored by :func:`save_pack`, in order."""
    z = np.load(path)
    n = int(z["n_originals"])
    images = _from_png_blobs(z, "orig_images") if "orig_images_png" in z else [z[f"orig_image_{i}"] for i in range(n)]
    out = []
    for i in range(n):
        h, w = z[f"orig_shape_{i}"].tolist()
        mask = np.unpackbits(z[f"orig_mask_{i}"], axis=-1)[:, :w]
        out.append((images[i].astype(np.float32), mask.astype(np.uint8)))
    return out


def make_loss(recipe: Recipe, deep_supervision: bool):
    if recipe.loss == "bce":
        loss = torch.nn.BCEWithLogitsLoss()
    elif recipe.loss == "dice_bce":
        loss = DiceCELoss(sigmoid=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=False)
    else:
        raise ValueError(f"unknown loss {recipe.loss!r}")
    return DeepSupervisionLoss(loss, weight_mode="exp") if deep_supervision else loss


def make_scheduler(recipe: Recipe, optimizer, epochs: int):
    if recipe.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=recipe.lr_decay)
    if recipe.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=recipe.learning_rate * 0.01)
    raise ValueError(f"unknown lr schedule {recipe.lr_schedule!r}")


@torch.no_grad()
def predict_cached(model, images: torch.Tensor, batch_size: int = 16, amp: bool = False) -> torch.Tensor:
    """Sigmoid probabilities of cached (N, 1, S, S) images, before any gate: validation judges
    the segmentation, and the gates are chosen afterwards on held-out images (crossval)."""
    model.eval()
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            y = model.forward_parts(x)[0]
        outs.append(torch.sigmoid(y.float()))
    return torch.cat(outs) if outs else images.new_zeros(images.shape)


def image_scores(prob: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Per image of (N, 1, S, S) probabilities: ``lesion`` (the truth has one), ``outlined``
    (the mask has one), ``dice`` against the truth, and ``top``, the highest probability."""
    pred = (prob > threshold).float().flatten(1)
    truth = labels.flatten(1)
    return {
        "lesion": truth.sum(1) > 0,
        "outlined": pred.sum(1) > 0,
        "dice": 2 * (pred * truth).sum(1) / (pred.sum(1) + truth.sum(1)).clamp(min=1),
        "top": prob.flatten(1).amax(1),
    }


def selection_scores(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per image of :func:`image_scores`: what model selection maximises, Dice on a lesion image
    and, on a normal image, 1 for an empty mask and 0 for a false outline."""
    return torch.where(s["lesion"], s["dice"], (~s["outlined"]).float())


def quick_scores(prob: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """Validation numbers at training resolution: mean lesion Dice, normal false positives and
    the selection score over all images. A figure over an empty set (no lesion image, no
    normal image, no image) is ``None``, never NaN: it is not defined, and JSON has no NaN."""
    s = image_scores(prob, labels, threshold)
    has = s["lesion"]
    per_image = selection_scores(s)
    dice = per_image[has]
    normal_fp = s["outlined"][~has].float()
    mean = lambda t: float(t.mean()) if t.numel() else None  # noqa: E731
    return {"val_dice": mean(dice), "val_normal_fp": mean(normal_fp), "val_score": mean(per_image)}


def mixed_precision(dev: torch.device) -> bool:
    """Train in bf16 autocast where the hardware does bf16 natively: CUDA GPUs that support it,
    and CPUs with AVX-512 BF16 or AMX (oneDNN), where bf16 with channels-last trained the fast
    preset ~1.4x faster per core than fp32 (BENCHMARKS.md). ``BUSI_MONAI_AMP=0`` turns it off."""
    if os.environ.get("BUSI_MONAI_AMP", "").lower() in ("0", "false", "off", "no"):
        return False
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        try:  # private helpers, present since torch 2.3; without them, stay in fp32
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        except AttributeError:
            return False
        return native and torch.backends.mkldnn.is_available()
    return False


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
    data = Path(data)
    if data.suffix == ".npz":
        pack = load_pack(data)
        if pack.images.shape[-1] != recipe.image_size:
            raise TrainingError(f"{data}: pack is {pack.images.shape[-1]}px, recipe wants {recipe.image_size}px")
        idx = [i for i, m in enumerate(pack.items) if m.get("split", "training") == "training"]
        items = [dict(pack.items[i], _row=i) for i in idx]
        tr_items, va_items = split_validation(items, recipe.val_fraction, seed)
        sel = lambda its: CachedData(pack.images[[it["_row"] for it in its]], pack.labels[[it["_row"] for it in its]], its)  # noqa: E731
        train, val = sel(tr_items), sel(va_items)
    else:
        lists = load_datalist(data)
        tr_items, va_items = split_validation(lists["training"], recipe.val_fraction, seed)
        train = cache_items(tr_items, recipe.image_size, progress)
        val = cache_items(va_items, recipe.image_size, progress)
    return fit(train, val, out, preset, recipe, device, resume, progress=progress, seed=seed, compile_model=compile_model)
