"""Active learning replayed on labelled data: rounds of select, label, retrain, score (``busi-monai al-simulate``)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from busi_monai.active.strategies import (
    DEFAULT_STRATEGY,
    DIVERSITY_POOL,
    ORACLE,
    ORACLE_LESIONS,
    SIMULATION_STRATEGIES,
    probabilities,
    select,
)
from busi_monai.jsonio import dumps, write_json

TARGET_FRACTION = 0.95


# ---------------------------------------------------------------------------------------------
# Simulation


def labels_to_reach(labels: list[float], dice: list[float], target: float) -> float | None:
    """Labels at which a learning curve first reaches ``target``, linearly interpolated between
    rounds (None when it never does; the first point when it starts above)."""
    for i, (n, d) in enumerate(zip(labels, dice)):
        if d >= target:
            if i == 0:
                return float(n)
            n0, d0 = labels[i - 1], dice[i - 1]
            return float(n0 + (target - d0) / (d - d0) * (n - n0))
    return None


def _test_scores(checkpoint_path: Path, test, device: str) -> dict:
    """Mean lesion Dice and normal false-positive rate on the cached test split (network size)."""
    from busi_monai.inference.predictor import Predictor
    from busi_monai.training.validation import quick_scores

    predictor = Predictor(checkpoint_path, device=device, tta=False, amp=False)
    s = quick_scores(probabilities(predictor, test.images), test.labels, predictor.threshold)
    return {"dice": s["val_dice"], "normal_fp": s["val_normal_fp"]}


def _near_duplicates(picked: list[dict], labelled_before: list[dict]) -> int:
    """Picks that share a duplicate group with an earlier label or another pick of the batch."""
    seen = {it.get("group") for it in labelled_before if it.get("group")}
    count = 0
    for it in picked:
        g = it.get("group")
        if g and g in seen:
            count += 1
        seen.add(g)
    return count


def simulate(
    data: str | Path,
    out: str | Path,
    strategies: list[str],
    initial: int = 40,
    step: int = 40,
    rounds: int = 5,
    preset: str = "fast",
    seeds: list[int] = (0,),
    image_size: int | None = None,
    epochs_initial: int = 30,
    epochs_per_round: int = 15,
    epochs_full: int | None = None,
    mc_passes: int = 8,
    overrides: dict | None = None,
    device: str = "auto",
    progress: bool = True,
    with_full: bool = True,
    round_learning_rate: float | None = None,
) -> dict:
    """Replay labelling sessions and write ``out/curves.json`` and ``out/curves.png``.

    Per seed: one random initial set and its model (shared by every strategy, so the curves
    are paired), then ``rounds`` rounds of pick ``step`` / label / retrain from the previous
    weights for ``epochs_per_round`` epochs, scored on the test split after each. With
    ``with_full``, a model trained from scratch on the whole pool for ``epochs_full`` epochs
    (default: as many as the last round's model has had, ``epochs_initial + rounds *
    epochs_per_round``) is the reference whose Dice the curves are measured against.
    ``round_learning_rate`` is the peak rate of each retraining (default: the recipe's, as for
    the initial and the all-labels models).
    """
    from busi_monai.data.datasets import load_datalist
    from busi_monai.data.packs import cache_items
    from busi_monai.inference.predictor import Predictor
    from busi_monai.training.loop import fit
    from busi_monai.training.recipes import get_recipe

    for s in strategies:
        if s not in SIMULATION_STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; choose one of {', '.join(SIMULATION_STRATEGIES)}")
    base = get_recipe(preset).with_overrides(image_size=image_size, **(overrides or {}))
    # Each round trains on every label so far; model selection would need labels held back,
    # so the last epoch's weights are used throughout (no validation split).
    base = base.with_overrides(val_fraction=0.0)
    epochs_full = epochs_full or epochs_initial + rounds * epochs_per_round
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lists = load_datalist(data)
    if len(lists["training"]) < initial + step:
        raise ValueError(f"{data}: {len(lists['training'])} training images; need at least initial + step = {initial + step}")
    if not lists["test"]:
        raise ValueError(f"{data}: no test split to score the rounds on")
    pool = cache_items(lists["training"], base.image_size, progress)
    test = cache_items(lists["test"], base.image_size, progress)
    n_rounds = min(rounds, (len(pool) - initial) // step)

    config = {
        "data": str(data), "strategies": list(strategies), "initial": initial, "step": step, "rounds": n_rounds,
        "preset": preset, "seeds": list(seeds), "image_size": base.image_size, "epochs_initial": epochs_initial,
        "epochs_per_round": epochs_per_round, "round_learning_rate": round_learning_rate or base.learning_rate, "epochs_full": epochs_full if with_full else None, "mc_passes": mc_passes,
        "overrides": dict(overrides or {}), "recipe": base.to_dict(), "pool_size": len(pool), "test_size": len(test),
        "n_test_lesion": int((test.labels.flatten(1).sum(1) > 0).sum()), "diversity_pool": DIVERSITY_POOL,
        "metrics": "test split at network resolution: mean Dice over lesion images, share of normal images with any predicted lesion pixel (raw mask)",
    }
    runs: list[dict] = []
    full: list[dict] = []
    result = {"config": config, "full": full, "runs": runs}
    total = len(seeds) * (1 + len(strategies) * n_rounds + int(with_full))
    bar = tqdm(total=total, desc="al-simulate", unit="train", disable=not progress)
    t_start = time.time()

    def train(labelled_idx: list[int], epochs: int, run_dir: Path, init: Path | None, seed: int, lr: float | None = None) -> tuple[Path, dict, float]:
        recipe = base.with_overrides(epochs=epochs, learning_rate=lr)
        t = time.time()
        fit(pool.subset(labelled_idx), pool.subset([]), run_dir, preset, recipe, device=device, init_checkpoint=init, progress=False, seed=seed)
        ckpt = run_dir / "last.pt"
        return ckpt, _test_scores(ckpt, test, device), time.time() - t

    def save():
        result["summary"] = summarize(result)
        result["wall_time_s"] = round(time.time() - t_start, 1)
        write_json(result, out / "curves.json")

    for seed in seeds:
        rng = random.Random(seed)
        seed_dir = out / f"seed{seed}"
        if with_full:
            bar.set_postfix_str(f"seed {seed}: full ({len(pool)} labels)")
            _, scores, secs = train(list(range(len(pool))), epochs_full, seed_dir / "full", None, seed)
            full.append({"seed": seed, "labels": len(pool), **scores, "train_s": round(secs, 1)})
            bar.update()
            save()
        initial_idx = sorted(rng.sample(range(len(pool)), initial))
        bar.set_postfix_str(f"seed {seed}: initial ({initial} labels)")
        init_ckpt, init_scores, init_secs = train(initial_idx, epochs_initial, seed_dir / "round0", None, seed)
        bar.update()
        for strategy in strategies:
            pick_rng = random.Random(f"{seed}-{strategy}")
            labelled = list(initial_idx)
            ckpt = init_ckpt
            curve = [{"round": 0, "labels": len(labelled), **init_scores, "train_s": round(init_secs, 1)}]
            run = {"seed": seed, "strategy": strategy, "curve": curve}
            runs.append(run)
            for r in range(1, n_rounds + 1):
                bar.set_postfix_str(f"seed {seed}: {strategy} round {r}")
                taken = set(labelled)
                unlabelled = [i for i in range(len(pool)) if i not in taken]
                predictor = Predictor(ckpt, device=device, tta=False, amp=False)
                t = time.time()
                sel = select(
                    strategy, predictor, pool.images[unlabelled], step, pick_rng, pool.images[labelled], mc_passes, pool.labels[unlabelled]
                )
                select_s = time.time() - t
                picked = [unlabelled[i] for i in sel.indices]
                picked_items = [pool.items[i] for i in picked]
                dups = _near_duplicates(picked_items, [pool.items[i] for i in labelled])
                labelled += picked
                ckpt, scores, secs = train(labelled, epochs_per_round, seed_dir / strategy / f"round{r}", ckpt, seed * 1000 + r, round_learning_rate)
                curve.append({
                    "round": r, "labels": len(labelled), **scores, "train_s": round(secs, 1), "select_s": round(select_s, 1),
                    "picked_normal": sum(it.get("class") == "normal" for it in picked_items),
                    "picked_near_duplicates": dups,
                    "picked_ids": [it.get("id") for it in picked_items],
                })
                bar.update()
                save()
    bar.close()
    save()
    plot_curves(result, out / "curves.png")
    return result


def paired_difference(runs: list[dict], strategy: str, baseline: str = "random") -> dict | None:
    """Seed by seed, ``strategy``'s mean test Dice over the rounds after the first minus
    ``baseline``'s from the same initial model: mean, standard error and wins (None without
    a shared seed). Pairing removes the initial set's luck, which dominates the seeds' spread."""
    base = {r["seed"]: r["curve"] for r in runs if r["strategy"] == baseline}
    pairs = [(r["curve"], base[r["seed"]]) for r in runs if r["strategy"] == strategy and r["seed"] in base]
    rounds = min((min(len(a), len(b)) for a, b in pairs), default=0)  # points every pair has
    if rounds < 2:
        return None
    diff = np.array([np.mean([p["dice"] - q["dice"] for p, q in zip(a[1:rounds], b[1:rounds])]) for a, b in pairs])
    return {
        "seeds": len(diff),
        "mean_dice_difference": float(diff.mean()),
        "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None,
        "wins": int((diff > 0).sum()),
    }


def summarize(result: dict) -> dict:
    """Mean and spread over seeds per strategy and label count; labels to 95% of full Dice.

    ``labels_to_target`` interpolates linearly on the seed-averaged curve between rounds;
    ``labels_to_target_per_seed`` does the same on each seed's curve against its own full model.
    """
    runs, full = result["runs"], result["full"]
    full_dice = float(np.mean([f["dice"] for f in full])) if full else None
    target = TARGET_FRACTION * full_dice if full_dice is not None else None
    out: dict = {"full_dice": full_dice, "full_normal_fp": float(np.nanmean([f["normal_fp"] for f in full])) if full else None,
                 "target_fraction": TARGET_FRACTION, "target_dice": target, "strategies": {}}
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        curves = [r["curve"] for r in runs if r["strategy"] == strategy]
        n_points = min(len(c) for c in curves)
        labels = [curves[0][i]["labels"] for i in range(n_points)]
        dice = np.array([[c[i]["dice"] for i in range(n_points)] for c in curves])
        fp = np.array([[c[i]["normal_fp"] for i in range(n_points)] for c in curves])
        s = {
            "seeds": len(curves),
            "labels": labels,
            "dice_mean": dice.mean(0).tolist(),
            "dice_std": dice.std(0).tolist(),
            "normal_fp_mean": np.nanmean(fp, 0).tolist(),
            "normal_fp_std": np.nanstd(fp, 0).tolist(),
            "picked_near_duplicates": int(sum(p.get("picked_near_duplicates", 0) for c in curves for p in c)),
            "picked_normal": int(sum(p.get("picked_normal", 0) for c in curves for p in c)),
        }
        if target is not None:
            s["labels_to_target"] = labels_to_reach(labels, s["dice_mean"], target)
            per_seed = []
            for r in runs:
                if r["strategy"] != strategy:
                    continue
                own = [f["dice"] for f in full if f["seed"] == r["seed"]]
                t = TARGET_FRACTION * own[0] if own else target
                per_seed.append(labels_to_reach([p["labels"] for p in r["curve"]], [p["dice"] for p in r["curve"]], t))
            s["labels_to_target_per_seed"] = per_seed
        out["strategies"][strategy] = s
    for strategy, s in out["strategies"].items():
        if strategy != "random":
            s["paired_vs_random"] = paired_difference(runs, strategy)
    rand = out["strategies"].get("random", {}).get("labels_to_target")
    if rand:
        for s in out["strategies"].values():
            n = s.get("labels_to_target")
            s["label_ratio_vs_random"] = n / rand if n is not None else None
    return out


def plot_curves(result: dict, path: str | Path) -> None:
    """Dice and normal false-positive rate against labels: mean line, min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    summary = result.get("summary") or summarize(result)
    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy, s in summary["strategies"].items():
        curves = [r["curve"] for r in result["runs"] if r["strategy"] == strategy]
        n = len(s["labels"])
        for ax, key, mean_key in ((axes[0], "dice", "dice_mean"), (axes[1], "normal_fp", "normal_fp_mean")):
            vals = np.array([[c[i][key] for i in range(n)] for c in curves], dtype=float)
            (line,) = ax.plot(s["labels"], s[mean_key], marker="o", label=f"{strategy} ({s['seeds']} seed{'s' if s['seeds'] != 1 else ''})")
            if len(curves) > 1:
                ax.fill_between(s["labels"], np.nanmin(vals, 0), np.nanmax(vals, 0), color=line.get_color(), alpha=0.15)
    if summary.get("full_dice") is not None:
        pool = cfg["pool_size"]
        axes[0].axhline(summary["full_dice"], color="k", lw=1, ls="--", label=f"all {pool} labels")
        axes[0].axhline(summary["target_dice"], color="k", lw=1, ls=":", label=f"{int(TARGET_FRACTION * 100)}% of all-labels Dice")
        if summary.get("full_normal_fp") is not None and math.isfinite(summary["full_normal_fp"]):
            axes[1].axhline(summary["full_normal_fp"], color="k", lw=1, ls="--", label=f"all {pool} labels")
    axes[0].set_ylabel("test Dice (lesion images)")
    axes[1].set_ylabel("normal images with a false lesion")
    for ax in axes:
        ax.set_xlabel("labelled images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Active learning on {Path(cfg['data']).name}: preset {cfg['preset']}, {cfg['image_size']}px, "
        f"+{cfg['step']}/round, {cfg['epochs_initial']}+{cfg['epochs_per_round']}/round epochs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_results(paths: list[str | Path], out: str | Path) -> dict:
    """One result of several ``curves.json`` with the same settings (e.g. one seed per process)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if not parts:
        raise ValueError("no curves.json to merge")
    # Seeds, strategies and whether a part trained the all-labels reference may differ per part.
    ignore = {"seeds", "strategies", "epochs_full"}
    for part in parts:  # results from before --round-learning-rate retrained at the recipe's rate
        cfg = part["config"]
        cfg.setdefault("round_learning_rate", cfg.get("recipe", {}).get("learning_rate"))
    first = {k: v for k, v in parts[0]["config"].items() if k not in ignore}
    for p, part in zip(paths, parts):
        if {k: v for k, v in part["config"].items() if k not in ignore} != first:
            raise ValueError(f"{p}: other settings than {paths[0]}; only runs of one configuration can be merged")
    config = dict(
        parts[0]["config"],
        seeds=sorted({s for part in parts for s in part["config"]["seeds"]}),
        strategies=list(dict.fromkeys(s for part in parts for s in part["config"]["strategies"])),
        epochs_full=next((part["config"]["epochs_full"] for part in parts if part["full"]), None),
    )
    result = {
        "config": config,
        "full": [f for part in parts for f in part["full"]],
        "runs": [r for part in parts for r in part["runs"]],
        # A part that is itself a merge contributes its own parts, so provenance stays flat.
        "wall_time_s": [t for part in parts for t in (part["wall_time_s"] if "merged_from" in part else [part.get("wall_time_s")])],
        "merged_from": [m for p, part in zip(paths, parts) for m in part.get("merged_from", [str(p)])],
    }
    result["summary"] = summarize(result)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "curves.json")
    plot_curves(result, out / "curves.png")
    return result


def register_cli(sub) -> None:
    from busi_monai.training.recipes import PRESETS, Recipe

    s = sub.add_parser("al-simulate", help="simulate active-learning labelling sessions; learning curves per strategy")
    s.add_argument("--data", required=True, help="prepared dataset dir (dataset.json with a test split)")
    s.add_argument("--out", required=True)
    s.add_argument("--strategy", default=f"random,{DEFAULT_STRATEGY}", help=f"comma-separated, of: {', '.join(SIMULATION_STRATEGIES)} ({ORACLE}, {ORACLE_LESIONS}: read the true masks, references)")
    s.add_argument("--initial", type=int, default=40, help="labelled images to start from (random)")
    s.add_argument("--step", type=int, default=40, help="images the strategy picks per round")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--preset", choices=list(PRESETS), default="fast")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (initial set, picks, training)")
    s.add_argument("--image-size", type=int)
    s.add_argument("--epochs-initial", type=int, default=30)
    s.add_argument("--epochs-per-round", type=int, default=15, help="epochs of each retraining from the previous weights")
    s.add_argument("--round-learning-rate", type=float, help="peak learning rate of each retraining (default: the recipe's)")
    s.add_argument("--epochs-full", type=int, help="epochs of the all-labels reference (default: initial + rounds x per-round)")
    s.add_argument("--no-full", action="store_true", help="skip the all-labels reference")
    s.add_argument("--mc-passes", type=int, default=8)
    s.add_argument("--device", default="auto")
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field, e.g. --set loss=dice_bce")

    def run(a):
        res = simulate(
            a.data, a.out, [x.strip() for x in a.strategy.split(",") if x.strip()], a.initial, a.step, a.rounds, a.preset,
            [int(x) for x in a.seeds.split(",")], a.image_size, a.epochs_initial, a.epochs_per_round, a.epochs_full,
            a.mc_passes, dict(Recipe.parse_override(t) for t in a.set), a.device, with_full=not a.no_full,
            round_learning_rate=a.round_learning_rate,
        )
        print(dumps(res["summary"]))
        print(f"wrote {Path(a.out) / 'curves.json'} and {Path(a.out) / 'curves.png'}")

    s.set_defaults(func=run)

    m = sub.add_parser("al-merge", help="merge al-simulate results of one configuration (e.g. one seed per process)")
    m.add_argument("--out", required=True)
    m.add_argument("curves", nargs="+", help="curves.json files")

    def run_merge(a):
        res = merge_results(a.curves, a.out)
        print(dumps(res["summary"]))

    m.set_defaults(func=run_merge)
