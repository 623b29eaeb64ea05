"""``busi-monai cv``: grouped, class-stratified k-fold cross-validation on the training split.

Each fold trains on the other folds (its model selection uses a group-wise validation slice
of those), and is scored on its own held-out fold; near-duplicate groups never straddle
folds. The fold models together form the ensemble that ``infer``, the app and the bundle can
use (pass the cv directory as the model); it is scored on the untouched test split.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from busi_monai.data.datasets import load_split
from busi_monai.data.splits import grouped_stratified_folds, split_cached
from busi_monai.device import PRECISION_HELP, PRECISIONS, resolve_device, visible_gpus
from busi_monai.jsonio import dumps, write_json
from busi_monai.training.gate import GATES  # noqa: F401 (callers read the gates here)
from busi_monai.training.gate import choose_gate as choose_ensemble_gate
from busi_monai.training.gate import gate_curve, set_checkpoint_gate, write_gate_record
from busi_monai.training.loop import TrainingError, fit
from busi_monai.training.recipes import get_recipe
from busi_monai.training.validation import image_scores, predict_cached, quick_scores


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
    overrides: dict | None = None,
    compile_model: bool = False,
    jobs: int = 1,
    skip_training: bool = False,
    amp: bool | None = None,
) -> dict:
    """Train and score each fold, then summarise every ``fold*/fold.json`` found in ``out``.

    ``jobs`` folds at once per GPU (on the CPU: in all), each in its own process with its share
    of the cores (on a 2-core CPU two one-thread processes beat one two-thread process); with
    several GPUs visible (``device`` auto or cuda) the folds are spread over them, so 5 folds
    on 5 GPUs train side by side even at ``jobs`` 1. ``amp`` as for
    :func:`~busi_monai.training.loop.fit` (None: bf16 where the hardware does it natively).
    """
    explicit = {k: v for k, v in (("epochs", epochs), ("image_size", image_size)) if v is not None}
    recipe = get_recipe(preset).with_overrides(**{**(overrides or {}), **explicit})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [f for f in range(folds) if only_folds is None or f in only_folds]
    if skip_training:
        wanted = []
    elif len(slots := fold_slots(visible_gpus(device), jobs)) > 1 and len(wanted) > 1:
        _run_fold_processes(data, out, preset, folds, recipe, device, seed, wanted, compile_model, slots, progress, amp)
    else:
        _train_folds(data, out, preset, folds, recipe, device, seed, wanted, compile_model, progress, amp)
    if only_folds is None and all((out / f"fold{f}" / "model.pt").is_file() for f in range(folds)):
        choose_gate(data, out, folds, seed, recipe, device, progress)
    return summarize_folds(out, preset, recipe)


def _train_folds(data, out: Path, preset, folds, recipe, device, seed, wanted, compile_model, progress, amp=None) -> None:
    from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint

    cached = load_split(data, "training", recipe.image_size, progress, recipe.pad_square)
    fold_idx = grouped_stratified_folds(cached.items, folds, seed)
    dev = resolve_device(device)
    for f in wanted:
        held = fold_idx[f]
        held_set = set(held)
        rest = [i for i in range(len(cached)) if i not in held_set]
        train, val = split_cached(cached.subset(rest), recipe.val_fraction, seed + f)
        summary = fit(train, val, out / f"fold{f}", preset, recipe, device=device, progress=progress, seed=seed + f, compile_model=compile_model, amp=amp)
        # Score the fold's best model on its held-out fold at network resolution.
        model = model_from_checkpoint(load_checkpoint(out / f"fold{f}" / "model.pt"), dev)
        held_data = cached.subset(held).to(dev)
        prob = predict_cached(model, held_data.images, amp=dev.type == "cuda")
        scores = quick_scores(prob, held_data.labels, recipe.threshold)
        rec = {
            "fold": f, "n_train": len(train), "n_val": len(val), "n_held_out": len(held),
            "held_out_dice": scores["val_dice"], "held_out_normal_fp": scores["val_normal_fp"], "held_out_score": scores["val_score"],
            "train_time_s": summary["train_time_s"],
            "run_gate": summary["confidence_gate"], "run_gate_source": summary["gate_source"], "recipe_gate": recipe.confidence_gate,
        }  # fmt: skip
        # The single model served as `train` serves it (its own gate), and with the recipe's fixed gate.
        per_image = image_scores(prob.cpu(), held_data.labels.cpu(), recipe.threshold)
        rec.update(n_held_out_lesion=int(per_image["lesion"].sum()), n_held_out_normal=int((~per_image["lesion"]).sum()))
        at = gate_curve(per_image, (summary["confidence_gate"], recipe.confidence_gate))
        for name, c in zip(("run_gate", "recipe_gate"), at):
            rec.update({f"held_out_{name}_dice": c["lesion_dice"], f"held_out_{name}_normal_fp": c["normal_fp"], f"held_out_{name}_score": c["score"]})
        write_json(rec, out / f"fold{f}" / "fold.json")


def fold_slots(gpus: list[str], jobs: int) -> list[str | None]:
    """Where the folds trained at once run: ``jobs`` on each GPU of ``gpus`` (round the GPUs
    first), or ``jobs`` on the CPU (None)."""
    return [g for _ in range(max(1, jobs)) for g in gpus] if gpus else [None] * max(1, jobs)


def _run_fold_processes(data, out: Path, preset, folds, recipe, device, seed, wanted, compile_model, slots, progress, amp=None) -> None:
    """Each fold in its own ``busi-monai cv --only-folds F`` process, one per slot of
    :func:`fold_slots` at a time (a GPU slot's process sees that GPU alone)."""
    import subprocess
    import sys

    from tqdm.auto import tqdm

    overrides = [a for k, v in recipe.to_dict().items() for a in ("--set", f"{k}={v}")]
    precision = next(name for name, value in PRECISIONS.items() if value is amp)
    pending, running, failed = list(wanted), {}, []
    bar = tqdm(total=len(wanted), desc="cv folds", unit="fold", disable=not progress)
    while pending or running:
        while pending and len(running) < len(slots):
            f = pending.pop(0)
            slot = min(set(range(len(slots))) - {r[2] for r in running.values()})
            (out / f"fold{f}").mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable, "-m", "busi_monai.cli", "cv", "--data", str(data), "--out", str(out), "--preset", preset,
                "--folds", str(folds), "--device", device, "--seed", str(seed), "--only-folds", str(f), "--precision", precision, *overrides,
                *(["--compile"] if compile_model else []),
            ]  # fmt: skip
            log = open(out / f"fold{f}" / "train.log", "w")
            # Share the cores instead of each process starting a thread per core.
            env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(slots))), **os.environ}
            if slots[slot] is not None:
                env["CUDA_VISIBLE_DEVICES"] = slots[slot]
            running[f] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, slot)
        time.sleep(0.5)
        for f, (proc, log, _) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[f]
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(f)
    bar.close()
    if failed:
        raise TrainingError(f"cv folds {failed} failed; see {out}/fold*/train.log")


def choose_gate(data, out: Path, folds: int, seed: int, recipe, device: str = "auto", progress: bool = True) -> dict:
    """Set the folds' confidence gate to the one that scores best on the held-out folds.

    Each fold's model sees its own held-out images (never trained on, never used to select its
    epoch); the rule (:mod:`busi_monai.training.gate`) pools every training image once, at
    network resolution. Writes ``gate.json`` and ``gate.png`` (the curve) and the chosen gate
    into each ``fold*/model.pt``.
    """
    import torch

    from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint

    paths = [Path(out) / f"fold{f}" / "model.pt" for f in range(folds)]
    checkpoints = [load_checkpoint(p) for p in paths]
    cached = load_split(data, "training", recipe.image_size, progress, recipe.pad_square)
    dev = resolve_device(device)
    scores = []
    for ck, held in zip(checkpoints, grouped_stratified_folds(cached.items, folds, seed)):
        prob = predict_cached(model_from_checkpoint(ck, dev), cached.images[held].to(dev)).cpu()
        scores.append(image_scores(prob, cached.labels[held], recipe.threshold))
    result = choose_ensemble_gate({k: torch.cat([s[k] for s in scores]) for k in scores[0]})
    write_gate_record(result, out, "held-out folds")
    # The ensemble's gate replaces each fold's own (chosen on its validation slice).
    for path in paths:
        set_checkpoint_gate(path, result["chosen"], "held-out folds")
    return result


def summarize_folds(out: Path, preset: str, recipe) -> dict:
    results = []
    for path in sorted(Path(out).glob("fold*/fold.json")):
        results.append(json.loads(path.read_text()))
    results.sort(key=lambda r: r["fold"])

    def stats(key):
        vals = [r[key] for r in results if r.get(key) is not None and np.isfinite(r[key])]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)

    summary = {"preset": preset, "recipe": recipe.to_dict(), "folds": results}
    keys = [f"held_out{g}_{m}" for g in ("", "_run_gate", "_recipe_gate") for m in ("dice", "normal_fp", "score")]
    for key in keys:
        summary[f"{key}_mean"], summary[f"{key}_std"] = stats(key)
    gate = Path(out) / "gate.json"
    if gate.is_file():
        summary["gate"] = json.loads(gate.read_text())
    summary["note"] = (
        f"held-out fold metrics at network resolution ({recipe.image_size}x{recipe.image_size}); test-split metrics "
        "at full size via `busi-monai evaluate --model CVDIR`"
    )
    write_json(summary, Path(out) / "cv.json")
    return summary


def register_cli(sub) -> None:
    from busi_monai.training.recipes import PRESETS, Recipe

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
    s.add_argument("--jobs", type=int, default=1, help="folds trained at once per GPU (on a CPU: in all), each in its own process; folds are spread over every visible GPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA graphs on a GPU)")
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field, as for train")
    s.add_argument("--skip-training", action="store_true", help="only summarise the folds already in --out (held-out scores, the gate)")
    s.add_argument("--precision", choices=list(PRECISIONS), default="auto", help=PRECISION_HELP)

    def run(a):
        only = [int(x) for x in a.only_folds.split(",")] if a.only_folds else None
        res = cross_validate(
            a.data, a.out, a.preset, a.folds, a.epochs, a.image_size, a.device, a.seed, only_folds=only,
            overrides=dict(Recipe.parse_override(t) for t in a.set), compile_model=a.compile, jobs=a.jobs,
            skip_training=a.skip_training, amp=PRECISIONS[a.precision],
        )  # fmt: skip
        print(dumps(res))

    s.set_defaults(func=run)
