"""``busi-monai cv``: grouped, class-stratified k-fold cross-validation on the training split.

Each fold trains on the other folds (its model selection uses a group-wise validation slice
of those), and is scored on its own held-out fold; near-duplicate groups never straddle
folds. The fold models together form the ensemble that ``infer``, the app and the bundle can
use (pass the cv directory as the model); it is scored on the untouched test split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from .presets import get_recipe
from .io import write_json
from .training import CachedData, cache_items, fit, load_datalist, load_pack, predict_cached, quick_scores, resolve_device, split_validation


def grouped_stratified_folds(items: list[dict], k: int, seed: int = 0) -> list[list[int]]:
    """Fold index lists; whole groups per fold, each class spread evenly (greedy, largest groups first)."""
    rng = random.Random(seed)
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(it.get("group", f"i{i}"), []).append(i)
    keys = list(groups)
    rng.shuffle(keys)
    keys.sort(key=lambda g: -len(groups[g]))
    folds: list[list[int]] = [[] for _ in range(k)]
    per_class = [dict() for _ in range(k)]
    for g in keys:
        members = groups[g]
        cls = max({items[i].get("class", "?") for i in members}, key=lambda c: sum(items[i].get("class") == c for i in members))
        f = min(range(k), key=lambda j: (per_class[j].get(cls, 0), len(folds[j])))
        folds[f].extend(members)
        per_class[f][cls] = per_class[f].get(cls, 0) + len(members)
    return [sorted(f) for f in folds]


def _subset(data: CachedData, idx: list[int]) -> CachedData:
    return CachedData(data.images[idx], data.labels[idx], [data.items[i] for i in idx])


def cross_validate(
    data: str | Path,
    out: str | Path,
    preset: str = "paper",
    folds: int = 5,
    epochs: int | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    only_folds: list[int] | None = None,
) -> dict:
    recipe = get_recipe(preset).with_overrides(epochs=epochs, image_size=image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data)
    if data.suffix == ".npz":
        pack = load_pack(data)
        rows = [i for i, m in enumerate(pack.items) if m.get("split", "training") == "training"]
        cached = CachedData(pack.images[rows], pack.labels[rows], [pack.items[i] for i in rows])
    else:
        cached = cache_items(load_datalist(data)["training"], recipe.image_size, progress)
    fold_idx = grouped_stratified_folds(cached.items, folds, seed)
    dev = resolve_device(device)
    results = []
    for f, held in enumerate(fold_idx):
        if only_folds is not None and f not in only_folds:
            continue
        held_set = set(held)
        rest = [i for i in range(len(cached)) if i not in held_set]
        tr, va = split_validation([dict(cached.items[i], _row=i) for i in rest], recipe.val_fraction, seed + f)
        train = _subset(cached, [it["_row"] for it in tr])
        val = _subset(cached, [it["_row"] for it in va])
        summary = fit(train, val, out / f"fold{f}", preset, recipe, device, progress=progress, seed=seed + f)
        # Score the fold's best model on its held-out fold at network resolution.
        from .checkpoint import load_checkpoint, model_from_checkpoint

        model = model_from_checkpoint(load_checkpoint(out / f"fold{f}" / "model.pt"), dev)
        held_data = _subset(cached, held).to(dev)
        amp = dev.type == "cuda"
        scores = quick_scores(predict_cached(model, held_data.images, amp=amp), held_data.labels, recipe.threshold)
        rec = {"fold": f, "n_train": len(train), "n_val": len(val), "n_held_out": len(held), "held_out_dice": scores["val_dice"], "held_out_normal_fp": scores["val_normal_fp"], "train_time_s": summary["train_time_s"]}
        results.append(rec)
        write_json({"preset": preset, "recipe": recipe.to_dict(), "folds": results}, out / "cv.json")
    dice = [r["held_out_dice"] for r in results]
    fp = [r["held_out_normal_fp"] for r in results if np.isfinite(r["held_out_normal_fp"])]
    summary = {
        "preset": preset,
        "recipe": recipe.to_dict(),
        "folds": results,
        "held_out_dice_mean": float(np.mean(dice)) if dice else None,
        "held_out_dice_std": float(np.std(dice)) if dice else None,
        "held_out_normal_fp_mean": float(np.mean(fp)) if fp else None,
        "note": "held-out fold metrics at network resolution (256x256); test-split metrics at full size via `busi-monai evaluate --model CVDIR`",
    }
    write_json(summary, out / "cv.json")
    return summary


def register_cli(sub) -> None:
    from .presets import PRESETS

    s = sub.add_parser("cv", help="grouped, class-stratified k-fold cross-validation; the folds form an ensemble")
    s.add_argument("--data", required=True, help="prepared dataset dir or a pack .npz")
    s.add_argument("--preset", choices=list(PRESETS), default="paper")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--only-folds", help="comma-separated fold numbers (to split work across machines)")

    def run(a):
        only = [int(x) for x in a.only_folds.split(",")] if a.only_folds else None
        res = cross_validate(a.data, a.out, a.preset, a.folds, a.epochs, a.image_size, a.device, a.seed, only_folds=only)
        print(json.dumps(res, indent=2))

    s.set_defaults(func=run)
