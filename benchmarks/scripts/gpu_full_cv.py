"""5-fold cross-validation of the `full` preset at 256 px on one GPU, in one call (#19).

The command for the GPU machine (the `run` tool; repo root of a checkout copy, `.gpu/busi256.npz`
carried; at most 8 minutes):

    python3 -c "import monai" 2>/dev/null || python3 -m pip install -q --no-deps .whl/monai-*.whl; python3 benchmarks/scripts/gpu_full_cv.py --pack .gpu/busi256.npz --out "$OUT/full_cv" --budget-s 450

Ablations of each ingredient on held-out fold 0 (one more call; carry both packs):

    python benchmarks/scripts/gpu_full_cv.py --pack .gpu/busi256.npz --pad-square-pack .gpu/busi256_pad.npz --out "$OUT/full_ablate" --ablations all --budget-s 450

Make the pack here first (never commit it): `busi-monai prepare --busi-root BUSI --out PREP` and
`busi-monai pack --data PREP --out .gpu/busi256.npz --image-size 256 --with-test-originals`
(and, for the pad_square ablation, `busi-monai pack --data PREP --out .gpu/busi256_pad.npz
--image-size 256 --pad-square`).

What it does: checks its inputs (seconds); measures training images/s of the recipe's own step
(bf16, channels-last; eager, plus compiled at the chosen batch) at batches 4, 8, 16 and 32;
chooses the batch (the smallest within 15% of the best rate: more steps for the same time)
and the epochs that fit the budget; trains the folds (`busi-monai cv`'s functions, the gate
chosen on held-out folds); compares the post-processing on held-out folds; scores the folds'
mean on the test split at each image's own size. Everything goes to --out as JSON (no NaN):
result.json (environment, inputs, rates, choice, timings, fold scores, test metrics) and
test_per_image.json. Checkpoints stay in --work (a temporary folder by default), not in --out.
`--tiny` runs the same path on the CPU in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()

from busi_monai.training.recipes import NNUNET_SGD  # plain data: imports no torch or MONAI

# Budget rule. A fold's training gets (budget - elapsed - reserves) / runs; its epochs are that
# time times the measured rate times SAFETY over its training images. The reserves are allowances
# (not measurements): compiling the step in the first run and re-tracing it in each next one, and
# the gate, held-out post-processing and test evaluation after the folds. result.json records
# what each stage really took, to tune them.
SAFETY = 0.8  # per-epoch validation, checkpoints, the last smaller batch
COMPILE_FIRST_S, COMPILE_NEXT_S, AFTER_S = 60.0, 15.0, 45.0
BATCHES = (4, 8, 16, 32)
NEAR_BEST = 0.85  # a batch within this share of the best rate counts as fast enough

# Each ingredient of `full` switched off (to the value the project used before), for --ablations.
# nnU-Net's SGD and poly schedule, its batch Dice (which `full` left out after the CPU-scale
# measurements) and pad_square are switched on instead; pad_square needs --pad-square-pack.
ABLATIONS: dict[str, dict] = {
    "nnunet_sgd": NNUNET_SGD,
    "poly": {"lr_schedule": "poly"},
    "batch_dice": {"loss": "dice_ce_batch"},
    "no_deep_supervision": {"network": "paper"},
    "ds_weights_exp": {"ds_weights": "exp"},
    "shuffle": {"sampler": "shuffle"},
    "ultrasound_aug": {"augment": "ultrasound"},
    "no_aug": {"augment": "none"},
    "pad_square": {"pad_square": True},
}


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class InputError(SystemExit):
    """A missing or wrong input, said before anything slow (gpu_fresh_train.py raises it too)."""

    def __init__(self, msg: str):
        super().__init__(f"input error: {msg}")


def check_pack(path: Path, image_size: int | None, pad_square: bool, folds: int, need_test: bool) -> dict:
    """The pack's header only (no image decoded): fails in seconds on a missing or wrong input."""
    import numpy as np

    if not path.is_file():
        raise InputError(f"{path}: no such pack; make it with `busi-monai pack --with-test-originals` and carry it")
    try:
        z = np.load(path)
        size, meta, n_orig = int(z["size"]), json.loads(str(z["meta"])), int(z["n_originals"])
        packed_pad = bool(z["pad_square"]) if "pad_square" in z else False
    except Exception as e:  # a truncated copy, an older or foreign file
        raise InputError(f"{path}: not a busi-monai pack ({type(e).__name__}: {e})") from None
    splits = [m.get("split", "training") for m in meta]
    n_train, n_test = splits.count("training"), splits.count("test")
    if image_size is not None and size != image_size:
        raise InputError(f"{path}: pack is {size}px, the recipe wants {image_size}px (busi-monai pack --image-size {image_size})")
    if packed_pad != pad_square:
        raise InputError(f"{path}: pack pad_square={packed_pad}, the recipe wants {pad_square}")
    if n_train < 2 * folds:
        raise InputError(f"{path}: {n_train} training images, too few for {folds} folds")
    if need_test and (n_test == 0 or n_orig != n_test):
        raise InputError(f"{path}: {n_test} test images, {n_orig} at full size; pack with --with-test-originals")
    return {"path": str(path), "bytes": path.stat().st_size, "size": size, "pad_square": packed_pad, "n_training": n_train, "n_test": n_test}


def require_monai() -> None:
    """The GPU image has PyTorch but not MONAI: say so in seconds, with the way to carry it."""
    try:
        import monai  # noqa: F401
    except ImportError:
        raise InputError("MONAI is not installed: carry .whl/monai-*.whl and `python3 -m pip install --no-deps .whl/monai-*.whl` first") from None


def gpu_device(device: str, tiny: bool):
    """The device asked for: a CUDA GPU, or the CPU for a --tiny check."""
    from busi_monai.device import resolve_device

    try:
        dev = resolve_device("cpu" if tiny and device == "auto" else device)
    except ValueError as e:
        raise InputError(str(e)) from None
    if dev.type != "cuda" and not tiny:
        raise InputError("no CUDA GPU here; --tiny runs on the CPU")
    return dev


def environment(dev) -> dict:
    import monai
    import torch

    env = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "monai": monai.__version__, "cuda": torch.version.cuda,
        "device": str(dev), "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
    }  # fmt: skip
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False).stdout.strip() or None
    except Exception:  # a copy of the tree without .git
        env["git_commit"] = None
    return env


def train_rate(recipe, images, labels, batch: int, steps: int, dev, compiled: bool, warmup: int = 3) -> float:
    """Training images/s of the recipe's own step (network, loss, optimiser, augmentation) on
    cached images, bf16 and channels-last where the Trainer would use them."""
    import torch

    from busi_monai.device import mixed_precision
    from busi_monai.model.networks import build_network, network_config
    from busi_monai.training.augmentation import augmentation
    from busi_monai.training.loop import compile_network
    from busi_monai.training.losses import make_loss
    from busi_monai.training.optimizers import make_optimizer

    torch.manual_seed(0)
    model = build_network(network_config(recipe.network)).to(dev)
    amp = mixed_precision(dev)
    cl = dev.type == "cuda" or amp
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(recipe, model.parameters(), dev)
    loss_fn = make_loss(recipe, model.config.deep_supervision)
    aug = augmentation(recipe.augment)
    fwd = compile_network(model.forward_parts, dev) if compiled else model.forward_parts
    n = images.shape[0]

    def step():
        idx = torch.randint(0, n, (batch,), device=dev)
        x, y = images[idx], labels[idx]
        if aug is not None:
            x, y = aug(x, y)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            seg, aux = fwd(x)
            loss = loss_fn([p.float() for p in (seg, *aux)], y) if aux else loss_fn(seg.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):  # cudnn autotune, compile and CUDA-graph recording, the allocator
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def choose(rates: dict[int, float], rate_at_choice: float, n_train: int, runs: int, train_s: float, max_epochs: int) -> dict:
    """The batch (the smallest within NEAR_BEST of the best rate) and the epochs that fit ``train_s``
    for ``runs`` trainings of ``n_train`` images at ``rate_at_choice`` images/s."""
    best = max(rates.values())
    batch = min(b for b, r in rates.items() if r >= NEAR_BEST * best)
    per_run = max(0.0, train_s) / max(1, runs)
    epochs = min(max_epochs, max(1, math.floor(SAFETY * per_run * rate_at_choice / max(1, n_train))))
    return {"batch_size": batch, "epochs": epochs, "per_run_s": per_run, "rate_used": rate_at_choice, "iterations_per_run": epochs * math.ceil(n_train / batch)}


def fold_sizes(train_items, folds: int, seed: int, val_fraction: float) -> int:
    """Images a fold trains on (its other folds less their validation slice)."""
    from busi_monai.data.splits import grouped_stratified_folds

    held = max(len(f) for f in grouped_stratified_folds(train_items, folds, seed))
    rest = len(train_items) - held
    return max(1, rest - round(val_fraction * rest))


def heldout_postprocessing(cv_dir: Path, train, folds: int, seed: int, recipe, gate: float, dev) -> dict:
    """Held-out folds at network size: lesion Dice and normal false positives of the raw mask,
    the paper's processed mask and the largest component alone (after the chosen gate)."""
    import numpy as np

    from busi_monai.data.splits import grouped_stratified_folds
    from busi_monai.inference.postprocessing import processed_mask
    from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint
    from busi_monai.training.validation import predict_cached

    variants = {"raw": None, "processed": False, "largest_component": True}
    per = {k: {"dice": [], "normal_fp": []} for k in variants}
    for f, held in enumerate(grouped_stratified_folds(train.items, folds, seed)):
        model = model_from_checkpoint(load_checkpoint(cv_dir / f"fold{f}" / "model.pt"), dev)
        prob = predict_cached(model, train.images[held].to(dev), amp=dev.type == "cuda").float().cpu()
        keep = prob.flatten(1).amax(1) >= gate
        for p, k, truth in zip(prob[:, 0].numpy(), keep.tolist(), train.labels[held][:, 0].numpy() > 0.5):
            raw = (p > recipe.threshold) & k
            for name, largest in variants.items():
                m = raw if largest is None else processed_mask(raw.astype(np.uint8), largest_only=largest) > 0
                if truth.any():
                    per[name]["dice"].append(2 * float((m & truth).sum()) / max(1, int(m.sum() + truth.sum())))
                else:
                    per[name]["normal_fp"].append(float(m.any()))
    def mean(v):
        return float(np.mean(v)) if v else None

    return {name: {"lesion_dice": mean(v["dice"]), "normal_fp": mean(v["normal_fp"])} for name, v in per.items()}


def test_metrics(cv_dir: Path, pack: Path, gate: float, dev, threshold: float) -> tuple[dict, dict]:
    """The folds' mean on the test split at each image's own size, with and without the gate and
    the largest-component post-processing: summaries and per-image records."""
    import numpy as np

    from busi_monai.data.packs import load_pack, load_pack_originals
    from busi_monai.data.preprocessing import restore_size
    from busi_monai.evaluation.metrics import image_metrics, summarize
    from busi_monai.inference.postprocessing import processed_mask
    from busi_monai.inference.predictor import Predictor

    predictor = Predictor(str(cv_dir), device=str(dev), confidence_gate=0.0)
    originals = load_pack_originals(pack)
    meta = [m for m in load_pack(pack).items if m.get("split") == "test"]
    small = predictor.predict_small([img for img, _ in originals])  # (N, 1, S, S) mean probability
    top = small.flatten(1).amax(1)
    summaries, records = {}, {}
    for gname, g in (("no_gate", 0.0), ("gate", gate)):
        for pname, largest in (("processed", False), ("largest_component", True)):
            recs, raw_recs = [], []
            for (img, truth), m, p, t in zip(originals, meta, small, top.tolist()):
                prob = restore_size(p, truth.shape, predictor.pad_square)[0].numpy()
                raw = ((prob > threshold) & (t >= g)).astype(np.uint8)
                extra = {"id": m.get("id"), "class": m.get("class")}
                recs.append({**image_metrics(processed_mask(raw, largest_only=largest), truth), **extra})
                if pname == "processed":
                    raw_recs.append({**image_metrics(raw, truth), **extra})
            key = f"{gname}/{pname}"
            summaries[key] = summarize(recs)
            if raw_recs:
                summaries[f"{gname}/raw"] = summarize(raw_recs)
            records[key] = recs
    return summaries, records


def copy_jsons(src: Path, dst: Path) -> None:
    """The folds' JSON (fold scores, histories, the gate) beside result.json; no weights."""
    for p in src.rglob("*.json"):
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, q)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", required=True, help="busi-monai pack .npz with --with-test-originals")
    ap.add_argument("--out", required=True, help="folder for the JSON results")
    ap.add_argument("--work", help="folder for checkpoints (default: a temporary one, removed at the end)")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall time the whole run should take")
    ap.add_argument("--batch-size", type=int, help="skip the choice: this batch")
    ap.add_argument("--epochs", type=int, help="skip the choice: these epochs")
    ap.add_argument("--no-compile", action="store_true", help="train the folds eagerly")
    ap.add_argument("--measure-compiled", action="store_true", help="measure every batch compiled (slower, more exact)")
    ap.add_argument("--ablations", help="comma-separated names of ABLATIONS, or all: each ingredient off on --ablation-folds")
    ap.add_argument("--ablation-folds", default="0", help="held-out folds the ablations train for")
    ap.add_argument("--pad-square-pack", help="a pack made with --pad-square, for the pad_square ablation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU check: the fast network, 2 epochs, the pack's size")
    a = ap.parse_args(argv)

    # 1. Inputs, before anything slow. The GPU image has PyTorch but not MONAI: carry its wheel.
    require_monai()
    from busi_monai.jsonio import write_json
    from busi_monai.training.recipes import Recipe, get_recipe

    try:
        recipe = get_recipe(a.preset).with_overrides(**dict(Recipe.parse_override(t) for t in a.set))
    except ValueError as e:
        raise InputError(str(e)) from None
    pack = Path(a.pack)
    if a.tiny:
        info = check_pack(pack, None, recipe.pad_square, a.folds, need_test=not a.ablations)
        recipe = recipe.with_overrides(network="fast" + ("+ds" if "+ds" in recipe.network else ""), image_size=info["size"], epochs=2)
    else:
        info = check_pack(pack, recipe.image_size, recipe.pad_square, a.folds, need_test=not a.ablations)
    names = []
    if a.ablations:
        names = list(ABLATIONS) if a.ablations == "all" else a.ablations.split(",")
        unknown = [n for n in names if n not in ABLATIONS]
        if unknown:
            raise InputError(f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}")
        if "pad_square" in names:
            if a.pad_square_pack:
                check_pack(Path(a.pad_square_pack), recipe.image_size, True, a.folds, need_test=False)
            elif a.ablations == "all":
                names.remove("pad_square")  # nothing to train it on: said in result.json
            else:
                raise InputError("the pad_square ablation needs --pad-square-pack")
    dev = gpu_device(a.device, a.tiny)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="busi-full-cv-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"script": "benchmarks/scripts/gpu_full_cv.py", "argv": sys.argv[1:] if argv is None else list(argv), "tiny": a.tiny}
    result["environment"] = environment(dev)
    result["inputs"] = info
    timings: dict[str, float] = {"inputs_s": time.perf_counter() - T0}
    result["timings"] = timings
    write_json(result, out / "result.json")  # something to read even if a later stage fails
    say(f"inputs ok: {info['n_training']} training and {info['n_test']} test images at {info['size']}px on {result['environment']['gpu'] or dev}")

    # 2. Data on the device, and the training rates.
    import torch

    # Each fold (and each measured batch) compiles a new model's forward_parts: past dynamo's
    # default limit of 8 per code object, later folds would silently run eagerly.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    from busi_monai.data.datasets import load_split

    t = time.perf_counter()
    train = load_split(pack, "training", recipe.image_size, progress=False, pad_square=recipe.pad_square)
    timings["load_s"] = time.perf_counter() - t
    compiled = not a.no_compile and not a.tiny
    batches = (2, 4) if a.tiny else BATCHES
    steps = 1 if a.tiny else 10
    t = time.perf_counter()
    images, labels = train.images.to(dev), train.labels.to(dev)
    rates = {b: train_rate(recipe, images, labels, b, steps, dev, compiled=a.measure_compiled, warmup=1 if a.tiny else 3) for b in batches}
    result["rates_images_per_s"] = {"compiled" if a.measure_compiled else "eager": rates}
    say("training images/s " + ("compiled" if a.measure_compiled else "eager") + ": " + ", ".join(f"batch {b} {r:.0f}" for b, r in rates.items()))
    best = max(rates.values())
    batch = a.batch_size or min(b for b, r in rates.items() if r >= NEAR_BEST * best)
    rate = rates.get(batch) or best
    if compiled and not a.measure_compiled and a.epochs is None:
        # The folds train compiled: measure that rate at the chosen batch (its compile warms the cache for fold 0).
        rate = train_rate(recipe, images, labels, batch, steps * 2, dev, compiled=True)
        result["rates_images_per_s"]["compiled_at_choice"] = {batch: rate}
        say(f"compiled at batch {batch}: {rate:.0f} images/s")
    del images, labels
    timings["rates_s"] = time.perf_counter() - t

    # 3. The schedule that fits.
    ab_folds = [int(f) for f in a.ablation_folds.split(",")]
    runs = len(ab_folds) * (1 + len(names)) if names else a.folds
    n_fold = fold_sizes(train.items, a.folds, a.seed, recipe.val_fraction)
    reserve = (COMPILE_FIRST_S + COMPILE_NEXT_S * (runs - 1) if compiled else 0.0) + (0.0 if names else AFTER_S)
    train_s = a.budget_s - (time.perf_counter() - T0) - reserve
    plan = choose({batch: rate}, rate, n_fold, runs, train_s, recipe.epochs)
    plan["batch_size"] = batch
    if a.epochs:
        plan["epochs"] = a.epochs
    plan["iterations_per_run"] = plan["epochs"] * math.ceil(n_fold / batch)
    plan.update({"rule": f"batch: smallest within {NEAR_BEST} of the best rate; epochs: {SAFETY} x per-run seconds x rate / training images, at most the preset's", "runs": runs, "n_train_per_fold": n_fold, "reserve_s": reserve})
    recipe = recipe.with_overrides(batch_size=plan["batch_size"], epochs=plan["epochs"])
    result["plan"] = plan
    result["recipe"] = recipe.to_dict()
    write_json(result, out / "result.json")
    say(f"plan: batch {plan['batch_size']}, {plan['epochs']} epochs ({plan['iterations_per_run']} iterations) per run, {runs} runs, {plan['per_run_s']:.0f} s each")

    from busi_monai.training.crossval import cross_validate

    def finish() -> int:
        timings["total_s"] = time.perf_counter() - T0
        write_json(result, out / "result.json")
        copy_jsons(work, out / "runs")
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        say(f"done in {timings['total_s']:.0f} s: {out / 'result.json'}")
        return 0

    overrides = recipe.to_dict()
    if names:
        # 4a. Ablations: the recipe, then each ingredient off, trained for the same held-out folds.
        table = {}
        for name in ["full", *names]:
            kw = {**overrides, **(ABLATIONS.get(name, {}))}
            data = Path(a.pad_square_pack) if name == "pad_square" else pack
            t = time.perf_counter()
            cv = cross_validate(data, work / name, a.preset, a.folds, device=str(dev), seed=a.seed, progress=False, only_folds=ab_folds, overrides=kw, compile_model=compiled)
            table[name] = {"changes": ABLATIONS.get(name, {}), "folds": cv["folds"], "held_out_dice_mean": cv["held_out_dice_mean"], "held_out_normal_fp_mean": cv["held_out_normal_fp_mean"], "held_out_score_mean": cv["held_out_score_mean"], "time_s": time.perf_counter() - t}
            say(f"ablation {name}: held-out Dice {cv['held_out_dice_mean']}, normal FP {cv['held_out_normal_fp_mean']} ({table[name]['time_s']:.0f} s)")
            result["ablations"] = table
            write_json(result, out / "result.json")
        if a.ablations == "all" and not a.pad_square_pack:
            result["ablations_skipped"] = {"pad_square": "no --pad-square-pack given"}
        return finish()

    # 4b. The folds, one at a time (a line each), then the gate on the held-out folds.
    cv_dir = work / "cv"
    fold_times = []
    for f in range(a.folds):
        t = time.perf_counter()
        cross_validate(pack, cv_dir, a.preset, a.folds, device=str(dev), seed=a.seed, progress=False, only_folds=[f], overrides=overrides, compile_model=compiled)
        fold_times.append(time.perf_counter() - t)
        rec = json.loads((cv_dir / f"fold{f}" / "fold.json").read_text())
        say(f"fold {f}: held-out Dice {rec['held_out_dice']}, normal FP {rec['held_out_normal_fp']} ({fold_times[-1]:.0f} s)")
        result.setdefault("folds_so_far", []).append(rec)  # kept in --out even if a later stage runs out of time
        write_json(result, out / "result.json")
    timings["folds_s"] = fold_times
    t = time.perf_counter()
    cv = cross_validate(pack, cv_dir, a.preset, a.folds, device=str(dev), seed=a.seed, progress=False, overrides=overrides, skip_training=True)
    gate = float(cv.get("gate", {}).get("chosen", 0.0))
    timings["gate_s"] = time.perf_counter() - t
    result["cv"] = cv
    say(f"cv: held-out Dice {cv['held_out_dice_mean']} +- {cv['held_out_dice_std']}, gate {gate}")

    # 5. Post-processing on the held-out folds: the largest component is kept only if it pays there.
    t = time.perf_counter()
    result["heldout_postprocessing"] = heldout_postprocessing(cv_dir, train, a.folds, a.seed, recipe, gate, dev)
    timings["heldout_postprocessing_s"] = time.perf_counter() - t
    hp = result["heldout_postprocessing"]
    say(f"held-out post-processing: processed Dice {hp['processed']['lesion_dice']}, largest component {hp['largest_component']['lesion_dice']}")

    # 6. The folds' mean on the test split, at each image's own size.
    t = time.perf_counter()
    summaries, records = test_metrics(cv_dir, pack, gate, dev, recipe.threshold)
    timings["test_s"] = time.perf_counter() - t
    result["test"] = summaries
    for k, s in summaries.items():
        say(f"test {k}: lesion Dice {s['lesion']['dice']}, normal FP {s['normal_false_positive_rate']}")
    write_json(records, out / "test_per_image.json")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
