"""Active learning replayed on labelled data: rounds of select, label, retrain, score (``busi-monai al-simulate``)."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from busi_monai.active.effort import (
    ERASE_BY_HAND,
    MAX_CLICKS,
    OUTLINE_TOLERANCE,
    TARGET_DICE,
    image_cost,
    polygon_clicks,
)
from busi_monai.active.strategies import (
    DIVERSITY_POOL,
    ORACLE,
    ORACLE_LESIONS,
    SIMULATION_DEFAULT_STRATEGY,
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


ORACLE_ANNOTATOR = "oracle"  # the true masks appear at no cost: learning curves against labels
CLICKS_ANNOTATOR = "clicks"  # a simulated clinician clicks on the model's outline (active/effort.py)
ANNOTATORS = (ORACLE_ANNOTATOR, CLICKS_ANNOTATOR)
CLICK_TEST_DICE_AFTER = (1, 3)  # the click model's test Dice is reported after these many clicks


@dataclass(frozen=True)
class SimulationSettings:
    """How ``al-simulate`` replays its sessions (its flags, as one object).

    Per seed: one random initial set of ``initial`` labels and its model (shared by every
    strategy, so the curves are paired), then ``rounds`` rounds of pick ``step`` / label /
    retrain from the previous weights for ``epochs_per_round`` epochs, scored on the test split
    after each. With ``with_full``, a model trained from scratch on the whole pool for
    ``epochs_full`` epochs (default: as many as the last round's model has had) is the
    reference whose Dice the curves are measured against. ``round_learning_rate`` is the peak
    rate of each retraining (default: the recipe's).

    ``annotator`` ``clicks`` also costs each round's labels in clinician clicks
    (:mod:`busi_monai.active.effort`, with ``max_clicks`` and ``click_target``) with the model
    of before the retraining, scores the click model after 1 and 3 clicks on the first
    ``click_test_images`` test lesion images, and adds a last, smaller round when ``step``
    does not divide the pool, so the whole pool can be labelled. It needs a click network
    (default preset ``interactive``).
    """

    strategies: tuple[str, ...] = ("random", SIMULATION_DEFAULT_STRATEGY)
    initial: int = 40
    step: int = 40
    rounds: int = 5
    preset: str | None = None  # None: fast, or interactive for the clicks annotator
    seeds: tuple[int, ...] = (0,)
    image_size: int | None = None
    epochs_initial: int = 30
    epochs_per_round: int = 15
    epochs_full: int | None = None
    mc_passes: int = 8
    overrides: dict = field(default_factory=dict)
    device: str = "auto"
    with_full: bool = True
    round_learning_rate: float | None = None
    annotator: str = ORACLE_ANNOTATOR
    max_clicks: int = MAX_CLICKS
    click_target: float = TARGET_DICE
    click_test_images: int = 16

    @property
    def clicks(self) -> bool:
        return self.annotator == CLICKS_ANNOTATOR

    @property
    def preset_name(self) -> str:
        return self.preset or ("interactive" if self.clicks else "fast")

    @property
    def total_epochs_full(self) -> int:
        return self.epochs_full or self.epochs_initial + self.rounds * self.epochs_per_round

    def recipe(self):
        """The recipe every model of the replay trains with; checks the settings on the way."""
        from busi_monai.training.recipes import get_recipe

        for s in self.strategies:
            if s not in SIMULATION_STRATEGIES:
                raise ValueError(f"unknown strategy {s!r}; choose one of {', '.join(SIMULATION_STRATEGIES)}")
        if self.annotator not in ANNOTATORS:
            raise ValueError(f"unknown annotator {self.annotator!r}; choose one of {', '.join(ANNOTATORS)}")
        base = get_recipe(self.preset_name).with_overrides(image_size=self.image_size, **self.overrides)
        if self.clicks and "+clicks" not in base.network:
            raise ValueError(
                f"--annotator clicks needs a click network; preset {self.preset_name!r} trains {base.network!r} "
                "(use --preset interactive, or --set network=<net>+clicks)"
            )
        # Each round trains on every label so far; model selection would need labels held back,
        # so the last epoch's weights are used throughout (no validation split).
        return base.with_overrides(val_fraction=0.0)

    def n_rounds(self, pool_size: int) -> int:
        left = pool_size - self.initial
        # The clicks annotator's question is the cost of the whole pool: a last partial round.
        return min(self.rounds, -(-left // self.step) if self.clicks else left // self.step)


def simulate(data: str | Path, out: str | Path, settings: SimulationSettings | None = None, progress: bool = True) -> dict:
    """Replay labelling sessions (see :class:`SimulationSettings`) and write ``out/curves.json``
    and ``out/curves.png`` (with the clicks annotator also ``out/effort.png``)."""
    return Replay(data, out, settings or SimulationSettings(), progress).run()


class Replay:
    """One ``al-simulate`` run in parts: the data cached once; per seed the all-labels
    reference, the initial model, then each strategy's rounds (pick, label, retrain, score)."""

    def __init__(self, data: str | Path, out: str | Path, settings: SimulationSettings, progress: bool = True):
        from busi_monai.data.datasets import load_datalist
        from busi_monai.data.packs import cache_items

        self.settings, self.progress = settings, progress
        self.base = settings.recipe()
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        lists = load_datalist(data)
        if len(lists["training"]) < settings.initial + settings.step:
            raise ValueError(f"{data}: {len(lists['training'])} training images; need at least initial + step = {settings.initial + settings.step}")
        if not lists["test"]:
            raise ValueError(f"{data}: no test split to score the rounds on")
        self.pool = cache_items(lists["training"], self.base.image_size, progress)
        self.test = cache_items(lists["test"], self.base.image_size, progress)
        self.n_rounds = settings.n_rounds(len(self.pool))
        # What outlining each pool image by hand costs (normal images: 0, nothing to draw).
        self.outline = [polygon_clicks(truth) for _, truth in map(self._original, range(len(self.pool)))] if settings.clicks else None
        self.result = {"config": self._config(data), "full": [], "runs": []}
        total = len(settings.seeds) * (1 + len(settings.strategies) * self.n_rounds + int(settings.with_full))
        self.bar = tqdm(total=total, desc="al-simulate", unit="train", disable=not progress)
        self.t_start = time.time()

    def _config(self, data) -> dict:
        st, base, test = self.settings, self.base, self.test
        config = {
            "data": str(data), "strategies": list(st.strategies), "initial": st.initial, "step": st.step, "rounds": self.n_rounds,
            "preset": st.preset_name, "seeds": list(st.seeds), "image_size": base.image_size, "epochs_initial": st.epochs_initial,
            "epochs_per_round": st.epochs_per_round, "round_learning_rate": st.round_learning_rate or base.learning_rate,
            "epochs_full": st.total_epochs_full if st.with_full else None, "mc_passes": st.mc_passes,
            "overrides": dict(st.overrides), "recipe": base.to_dict(), "pool_size": len(self.pool), "test_size": len(test),
            "n_test_lesion": int((test.labels.flatten(1).sum(1) > 0).sum()), "diversity_pool": DIVERSITY_POOL,
            "metrics": "test split at network resolution: mean Dice over lesion images, share of normal images with any predicted lesion pixel (raw mask)",
        }
        if st.clicks:  # only then, so that oracle results keep merging with earlier ones
            config.update({
                "annotator": st.annotator, "max_clicks": st.max_clicks, "click_target": st.click_target,
                "click_test_images": min(st.click_test_images, config["n_test_lesion"]),
                "hand_outline_clicks": int(sum(self.outline)), "outline_tolerance": OUTLINE_TOLERANCE,
                "cost_model": "busi_monai/active/effort.py: lesion: protocol clicks on the model's outline at the image's own size "
                f"until Dice >= {st.click_target} or {st.max_clicks} clicks, else those clicks plus a hand polygon; normal: 0 if "
                f"left empty, else negative clicks until empty, else those plus {ERASE_BY_HAND}; initial set: hand polygons",
            })
        return config

    def run(self) -> dict:
        for seed in self.settings.seeds:
            self._seed(seed)
        self.bar.close()
        return self.finish()

    def finish(self) -> dict:
        """Write the result (``curves.json``) and its pictures."""
        self._save()
        plot_curves(self.result, self.out / "curves.png")
        if self.settings.clicks:
            plot_effort(self.result, self.out / "effort.png")
        return self.result

    def _seed(self, seed: int) -> None:
        st, n = self.settings, len(self.pool)
        rng = random.Random(seed)
        seed_dir = self.out / f"seed{seed}"
        if st.with_full:
            self.bar.set_postfix_str(f"seed {seed}: full ({n} labels)")
            _, scores, secs = self._train(list(range(n)), st.total_epochs_full, seed_dir / "full", None, seed)
            self.result["full"].append({"seed": seed, "labels": n, **scores, "train_s": round(secs, 1)})
            self.bar.update()
            self._save()
        initial_idx = sorted(rng.sample(range(n), st.initial))
        self.bar.set_postfix_str(f"seed {seed}: initial ({st.initial} labels)")
        init_ckpt, init_scores, init_secs = self._train(initial_idx, st.epochs_initial, seed_dir / "round0", None, seed)
        self.bar.update()
        start = {"round": 0, "labels": len(initial_idx), **init_scores, "train_s": round(init_secs, 1)}
        if st.clicks:  # no model yet: the initial set is outlined by hand
            hand = sum(self.outline[i] for i in initial_idx)
            lesions = sum(self.outline[i] > 0 for i in initial_idx)
            start.update({"clicks": hand, "cumulative_clicks": hand, "redrawn": lesions})
        for strategy in st.strategies:
            self._strategy(seed, strategy, initial_idx, init_ckpt, start, seed_dir)

    def _strategy(self, seed: int, strategy: str, initial_idx: list[int], init_ckpt: Path, start: dict, seed_dir: Path) -> None:
        pick_rng = random.Random(f"{seed}-{strategy}")
        labelled, ckpt = list(initial_idx), init_ckpt
        curve = [dict(start)]
        self.result["runs"].append({"seed": seed, "strategy": strategy, "curve": curve})
        for r in range(1, self.n_rounds + 1):
            self.bar.set_postfix_str(f"seed {seed}: {strategy} round {r}")
            point, ckpt = self._round(r, seed, strategy, labelled, ckpt, pick_rng, seed_dir, curve[-1])
            curve.append(point)
            self.bar.update()
            self._save()

    def _round(self, r: int, seed: int, strategy: str, labelled: list[int], ckpt: Path, pick_rng, seed_dir: Path, last: dict) -> tuple[dict, Path]:
        """Pick, label (cost the labels with the current model), retrain, score; ``labelled`` grows."""
        from busi_monai.inference.predictor import Predictor

        st, pool = self.settings, self.pool
        taken = set(labelled)
        unlabelled = [i for i in range(len(pool)) if i not in taken]
        predictor = Predictor(ckpt, device=st.device, tta=False, amp=False)
        t = time.time()
        sel = select(strategy, predictor, pool.images[unlabelled], st.step, pick_rng, pool.images[labelled], st.mc_passes, pool.labels[unlabelled])
        select_s = time.time() - t
        picked = [unlabelled[i] for i in sel.indices]
        picked_items = [pool.items[i] for i in picked]
        dups = _near_duplicates(picked_items, [pool.items[i] for i in labelled])
        cost = self.label_costs(predictor, picked, last) if st.clicks else {}
        labelled += picked
        ckpt, scores, secs = self._train(labelled, st.epochs_per_round, seed_dir / strategy / f"round{r}", ckpt, seed * 1000 + r, st.round_learning_rate)
        point = {
            "round": r, "labels": len(labelled), **scores, "train_s": round(secs, 1), "select_s": round(select_s, 1),
            "picked_normal": sum(it.get("class") == "normal" for it in picked_items),
            "picked_near_duplicates": dups,
            "picked_ids": [it.get("id") for it in picked_items],
            **cost,
        }
        return point, ckpt

    def label_costs(self, predictor, picked: list[int], last: dict) -> dict:
        """What the clinician spends labelling ``picked`` with the model they are shown."""
        t = time.time()
        predict = predictor.as_click_model()
        st = self.settings
        costs = [image_cost(predict, *self._original(i), st.max_clicks, st.click_target, 0.5, with_previous=predictor.takes_previous) for i in picked]
        clicks = int(sum(c["cost"] for c in costs))
        return {
            "clicks": clicks,
            "cumulative_clicks": last["cumulative_clicks"] + clicks,
            "redrawn": int(sum(c["redrawn"] for c in costs)),
            "normal_clicks": int(sum(c["cost"] for c in costs if not c["lesion"])),
            "picked_costs": [c["cost"] for c in costs],
            "picked_lesion": [c["lesion"] for c in costs],
            "picked_redrawn": [c["redrawn"] for c in costs],
            "cost_s": round(time.time() - t, 1),
        }

    def _original(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pool image ``i`` and its mask at their own size, as the clinician sees them."""
        from busi_monai.data.preprocessing import LoadBusiImaged

        d = LoadBusiImaged(("image", "label"))(self.pool.items[i])
        return np.asarray(d["image"][0], np.float32), np.asarray(d["label"][0]) > 0.5

    def _train(self, labelled_idx: list[int], epochs: int, run_dir: Path, init: Path | None, seed: int, lr: float | None = None) -> tuple[Path, dict, float]:
        from busi_monai.training.loop import fit

        recipe = self.base.with_overrides(epochs=epochs, learning_rate=lr)
        t = time.time()
        fit(self.pool.subset(labelled_idx), self.pool.subset([]), run_dir, self.settings.preset_name, recipe,
            device=self.settings.device, init_checkpoint=init, progress=False, seed=seed)  # fmt: skip
        ckpt = run_dir / "last.pt"
        scores = _test_scores(ckpt, self.test, self.settings.device)
        if self.settings.clicks:
            scores.update(_click_test_scores(ckpt, self.test, self.settings.device, self.settings.click_test_images))
        return ckpt, scores, time.time() - t

    def _save(self) -> None:
        self.result["summary"] = summarize(self.result)
        self.result["wall_time_s"] = round(time.time() - self.t_start, 1)
        write_json(self.result, self.out / "curves.json")


def recost(run: str | Path, out: str | Path, data: str | Path | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """The labels of an ``al-simulate --annotator clicks`` run costed again with the current
    click model code (e.g. new rules for honouring clicks), from the models the run saved:
    round r's picks with round r - 1's model, as the run costed them. Picks and training never
    depend on the costs, so the curves are the run's and only the clicks change; the rounds'
    test scores (``click_dice_*`` included) stay the run's. Writes ``out/curves.json`` (with
    ``recosted_from``), ``curves.png`` and ``effort.png``.

    Args:
        run: the run's folder (its ``curves.json`` and ``seed*/`` models; not a merge).
        out: where to write.
        data: the prepared dataset (default: the one the run names).
        device: where the click model runs.
    """
    from busi_monai.inference.predictor import Predictor

    run = Path(run)
    res = json.loads((run / "curves.json").read_text())
    cfg = res["config"]
    if cfg.get("annotator") != CLICKS_ANNOTATOR:
        raise ValueError(f"{run}: not a clicks-annotator run; nothing to re-cost")
    if "merged_from" in res:
        raise ValueError(f"{run}: a merge; re-cost each run's own folder, then merge")
    settings = SimulationSettings(
        strategies=tuple(cfg["strategies"]), initial=cfg["initial"], step=cfg["step"], rounds=cfg["rounds"], preset=cfg["preset"],
        seeds=tuple(cfg["seeds"]), image_size=cfg["image_size"], overrides=dict(cfg.get("overrides") or {}), device=device,
        with_full=False, annotator=CLICKS_ANNOTATOR, max_clicks=cfg["max_clicks"], click_target=cfg["click_target"],
    )  # fmt: skip
    replay = Replay(data or cfg["data"], out, settings, progress=False)
    index = {it.get("id"): i for i, it in enumerate(replay.pool.items)}
    rounds = sum(len(r["curve"]) - 1 for r in res["runs"])
    with tqdm(total=rounds, desc="al-recost", unit="round", disable=not progress) as bar:
        for r in res["runs"]:
            seed_dir = run / f"seed{r['seed']}"
            ckpt = seed_dir / "round0" / "last.pt"
            for k in range(1, len(r["curve"])):
                point = r["curve"][k]
                missing = [i for i in point["picked_ids"] if i not in index]
                if missing or not ckpt.is_file():
                    raise ValueError(f"{run}: cannot re-cost seed {r['seed']} {r['strategy']} round {k}: " + (f"images {missing[:3]} not in the pool" if missing else f"no model {ckpt}"))
                predictor = Predictor(ckpt, device=device, tta=False, amp=False)
                point.update(replay.label_costs(predictor, [index[i] for i in point["picked_ids"]], r["curve"][k - 1]))
                ckpt = seed_dir / r["strategy"] / f"round{k}" / "last.pt"
                bar.update()
    res["recosted_from"] = str(run)
    res["config"]["data"] = str(data or cfg["data"])
    replay.result = res
    replay.finish()
    return res


def _click_test_scores(checkpoint_path: Path, test, device: str, n_images: int) -> dict:
    """The click model's mean Dice after 1 and 3 protocol clicks on the first ``n_images``
    lesion images of the test split (network size; a subset, as the protocol costs a forward
    pass per click)."""
    from busi_monai.evaluation.evaluate import click_results
    from busi_monai.inference.predictor import Predictor

    predictor = Predictor(checkpoint_path, device=device, tta=False, amp=False)
    rows = [i for i in range(len(test.items)) if test.labels[i].sum() > 0][:n_images]
    lesions = [(test.items[i].get("id"), test.images[i, 0].numpy(), test.labels[i, 0].numpy()) for i in rows]
    res = click_results(predictor, lesions, max(CLICK_TEST_DICE_AFTER), progress=False)
    return {f"click_dice_{k}": res["dice_after"][k] if res["dice_after"] else None for k in CLICK_TEST_DICE_AFTER}


def paired_difference(runs: list[dict], strategy: str, baseline: str = "random", measure: Callable[[dict], float | None] | None = None) -> dict | None:
    """Seed by seed, ``strategy``'s figure minus ``baseline``'s from the same initial model:
    mean, standard error and the seeds on which ``strategy`` did better (None without a shared
    seed). Pairing removes the initial set's luck, which dominates the seeds' spread.

    Args:
        runs: the result's runs.
        strategy: the strategy compared.
        baseline: the strategy compared against.
        measure: a run's figure, lower being better (e.g. clicks to label the pool; a seed
            where either run has None is left out and counted as ``unpaired``). None: the mean
            test Dice over the rounds after the first, higher being better (``wins``).
    """
    base = {r["seed"]: r for r in runs if r["strategy"] == baseline}
    pairs = [(r, base[r["seed"]]) for r in runs if r["strategy"] == strategy and r["seed"] in base]
    if measure is not None:
        values = [(measure(a), measure(b)) for a, b in pairs]
        diff = np.array([x - y for x, y in values if x is not None and y is not None], dtype=float)
        if not len(diff):
            return None
        return {"seeds": len(diff), "mean_difference": float(diff.mean()), "standard_error": _standard_error(diff),
                "fewer": int((diff < 0).sum()), "unpaired": len(values) - len(diff)}
    pairs = [(a["curve"], b["curve"]) for a, b in pairs]
    rounds = min((min(len(a), len(b)) for a, b in pairs), default=0)  # points every pair has
    if rounds < 2:
        return None
    diff = np.array([np.mean([p["dice"] - q["dice"] for p, q in zip(a[1:rounds], b[1:rounds])]) for a, b in pairs])
    return {
        "seeds": len(diff),
        "mean_dice_difference": float(diff.mean()),
        "standard_error": _standard_error(diff),
        "wins": int((diff > 0).sum()),
    }


def _standard_error(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def _pool_clicks(pool_size: int) -> Callable[[dict], float | None]:
    """A run's cumulative clicks once every pool image is labelled (None if it never was)."""
    return lambda run: float(run["curve"][-1]["cumulative_clicks"]) if run["curve"][-1]["labels"] >= pool_size else None


def _clicks_to_target(full: list[dict], target: float | None) -> Callable[[dict], float | None]:
    """A run's cumulative clicks at 95% of its seed's all-labels Dice (interpolated; None if never)."""

    def measure(run: dict) -> float | None:
        own = [f["dice"] for f in full if f["seed"] == run["seed"]]
        t = TARGET_FRACTION * own[0] if own else target
        if t is None:
            return None
        return labels_to_reach([p["cumulative_clicks"] for p in run["curve"]], [p["dice"] for p in run["curve"]], t)

    return measure


def clicks_breakdown(run: dict) -> dict | None:
    """Where one clicks-annotator run's clicks went: the initial set outlined by hand; lesion
    images accepted after clicks (how many, how many with none, their clicks); lesion images
    redrawn by hand (how many, their clicks and outlines); normal images (how many, how many
    needed erasing, their clicks). None for runs written without per-image flags."""
    rounds = run["curve"][1:]
    if any("picked_lesion" not in p or "picked_redrawn" not in p for p in rounds):
        return None
    picked = [(c, bool(les), bool(red)) for p in rounds for c, les, red in zip(p["picked_costs"], p["picked_lesion"], p["picked_redrawn"])]
    accepted = [c for c, les, red in picked if les and not red]
    redrawn = [c for c, les, red in picked if les and red]
    normal = [c for c, les, _ in picked if not les]
    return {
        "initial_by_hand": float(run["curve"][0]["cumulative_clicks"]),
        "accepted_images": len(accepted), "accepted_without_clicks": sum(c == 0 for c in accepted), "accepted_clicks": float(sum(accepted)),
        "redrawn_images": len(redrawn), "redrawn_clicks": float(sum(redrawn)),
        "normal_images": len(normal), "normal_erased": sum(c > 0 for c in normal), "normal_clicks": float(sum(normal)),
        "total": float(run["curve"][0]["cumulative_clicks"] + sum(c for c, _, _ in picked)),
    }  # fmt: skip


def summarize_effort(result: dict, summary: dict) -> None:
    """Add the clicks annotator's figures to ``summary`` (from :func:`summarize`), per strategy:
    clicks to label the pool and to reach 95% of the all-labels Dice (mean over seeds, each
    seed against its own all-labels model; and on the mean curve), their paired differences
    from random, images redrawn by hand, the click model's test Dice, and (runs with per-image
    flags) where the clicks went, as a mean per seed (:func:`clicks_breakdown`)."""
    cfg, runs, full = result["config"], result["runs"], result["full"]
    summary["hand_outline_clicks"] = cfg.get("hand_outline_clicks")
    to_pool, to_target = _pool_clicks(cfg["pool_size"]), _clicks_to_target(full, summary.get("target_dice"))
    for strategy, s in summary["strategies"].items():
        mine = [r for r in runs if r["strategy"] == strategy]
        n = len(s["labels"])
        cum = np.array([[r["curve"][i]["cumulative_clicks"] for i in range(n)] for r in mine], dtype=float)
        s["cumulative_clicks_mean"] = cum.mean(0).tolist()
        s["redrawn"] = int(sum(p.get("redrawn", 0) for r in mine for p in r["curve"][1:]))
        for k in CLICK_TEST_DICE_AFTER:
            vals = np.array([[r["curve"][i].get(f"click_dice_{k}") for i in range(n)] for r in mine], dtype=float)
            s[f"click_dice_{k}_mean"] = np.nanmean(vals, 0).tolist() if np.isfinite(vals).any() else None
        for key, measure in (("clicks_to_label_pool", to_pool), ("clicks_to_target", to_target)):
            per_seed = [measure(r) for r in mine]
            s[f"{key}_per_seed"] = per_seed
            s[key] = float(np.mean(per_seed)) if per_seed and None not in per_seed else None
            if strategy != "random":
                s[f"paired_{key}_vs_random"] = paired_difference(runs, strategy, measure=measure)
        where = [clicks_breakdown(r) for r in mine]
        if where and None not in where:
            s["where_clicks_go"] = {k: float(np.mean([w[k] for w in where])) for k in where[0]}
        if summary.get("target_dice") is not None:
            s["clicks_to_target_mean_curve"] = labels_to_reach(s["cumulative_clicks_mean"], s["dice_mean"], summary["target_dice"])


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
    if result["config"].get("annotator") == CLICKS_ANNOTATOR:
        summarize_effort(result, out)
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
    title = (
        f"Active learning on {Path(cfg['data']).name}: preset {cfg['preset']}, {cfg['image_size']}px, "
        f"+{cfg['step']}/round, {cfg['epochs_initial']}+{cfg['epochs_per_round']}/round epochs"
    )
    _save_figure(fig, axes, title, path)


def _save_figure(fig, axes, title: str, path: str | Path) -> None:
    """Legends, the title, and the PNG written; the figure closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_effort(result: dict, path: str | Path) -> None:
    """Test Dice of the automatic model (left) and of the click model after 3 clicks (right)
    against the clinician's cumulative clicks, mean over seeds per strategy; the vertical line
    is what outlining the whole pool by hand costs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    summary = result.get("summary") or summarize(result)
    cfg = result["config"]
    k = max(CLICK_TEST_DICE_AFTER)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for strategy, s in summary["strategies"].items():
        label = f"{strategy} ({s['seeds']} seed{'s' if s['seeds'] != 1 else ''})"
        axes[0].plot(s["cumulative_clicks_mean"], s["dice_mean"], marker="o", label=label)
        if s.get(f"click_dice_{k}_mean") is not None:
            axes[1].plot(s["cumulative_clicks_mean"], s[f"click_dice_{k}_mean"], marker="o", label=label)
    hand = summary.get("hand_outline_clicks")
    for ax in axes:
        if hand:
            ax.axvline(hand, color="k", lw=1, ls="--", label=f"outline all {cfg['pool_size']} by hand ({hand} clicks)")
        ax.set_xlabel("clinician clicks, cumulative")
        ax.grid(alpha=0.3)
    if summary.get("target_dice") is not None:
        axes[0].axhline(summary["target_dice"], color="k", lw=1, ls=":", label=f"{int(TARGET_FRACTION * 100)}% of all-labels Dice")
    axes[0].set_ylabel("test Dice, automatic model (lesion images)")
    axes[1].set_ylabel(f"test Dice after {k} clicks ({cfg.get('click_test_images')} lesion images)")
    title = (
        f"Clicks to label {Path(cfg['data']).name}: preset {cfg['preset']}, {cfg['image_size']}px, +{cfg['step']}/round, "
        f"Dice >= {cfg.get('click_target')} or {cfg.get('max_clicks')} clicks, else by hand"
    )
    _save_figure(fig, axes, title, path)


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
    if config.get("annotator") == CLICKS_ANNOTATOR:
        plot_effort(result, out / "effort.png")
    return result


def register_cli(sub) -> None:
    from busi_monai.training.recipes import PRESETS, Recipe

    s = sub.add_parser("al-simulate", help="simulate active-learning labelling sessions; learning curves per strategy")
    s.add_argument("--data", required=True, help="prepared dataset dir (dataset.json with a test split)")
    s.add_argument("--out", required=True)
    s.add_argument("--strategy", default=f"random,{SIMULATION_DEFAULT_STRATEGY}", help=f"comma-separated, of: {', '.join(SIMULATION_STRATEGIES)} ({ORACLE}, {ORACLE_LESIONS}: read the true masks, references)")
    s.add_argument("--initial", type=int, default=40, help="labelled images to start from (random)")
    s.add_argument("--step", type=int, default=40, help="images the strategy picks per round")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--preset", choices=list(PRESETS), help="default: fast; interactive with --annotator clicks")
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
    s.add_argument("--annotator", choices=ANNOTATORS, default=ORACLE_ANNOTATOR,
                   help="oracle: the true masks at no cost; clicks: a simulated clinician clicks on the model's outline, "
                        "costed in clicks (busi_monai/active/effort.py; needs a click network)")  # fmt: skip
    s.add_argument("--max-clicks", type=int, default=MAX_CLICKS, help="clicks annotator: clicks before an image is drawn by hand")
    s.add_argument("--click-target", type=float, default=TARGET_DICE, help="clicks annotator: the Dice at which an outline is accepted")
    s.add_argument("--click-test-images", type=int, default=16, help="clicks annotator: test lesion images the click model is scored on")

    def run(a):
        settings = SimulationSettings(
            strategies=tuple(x.strip() for x in a.strategy.split(",") if x.strip()), initial=a.initial, step=a.step,
            rounds=a.rounds, preset=a.preset, seeds=tuple(int(x) for x in a.seeds.split(",")), image_size=a.image_size,
            epochs_initial=a.epochs_initial, epochs_per_round=a.epochs_per_round, epochs_full=a.epochs_full,
            mc_passes=a.mc_passes, overrides=dict(Recipe.parse_override(t) for t in a.set), device=a.device,
            with_full=not a.no_full, round_learning_rate=a.round_learning_rate, annotator=a.annotator,
            max_clicks=a.max_clicks, click_target=a.click_target, click_test_images=a.click_test_images,
        )
        res = simulate(a.data, a.out, settings)
        print(dumps(res["summary"]))
        extra = f" and {Path(a.out) / 'effort.png'}" if settings.clicks else ""
        print(f"wrote {Path(a.out) / 'curves.json'}, {Path(a.out) / 'curves.png'}{extra}")

    s.set_defaults(func=run)

    rc = sub.add_parser("al-recost", help="cost an al-simulate --annotator clicks run's labels again with the current click model code")
    rc.add_argument("run", help="the run's folder (curves.json and the seed*/ models it saved)")
    rc.add_argument("--out", required=True)
    rc.add_argument("--data", help="the prepared dataset (default: the one the run names)")
    rc.add_argument("--device", default="cpu")

    def run_recost(a):
        res = recost(a.run, a.out, a.data, a.device)
        print(dumps(res["summary"]))

    rc.set_defaults(func=run_recost)

    m = sub.add_parser("al-merge", help="merge al-simulate results of one configuration (e.g. one seed per process)")
    m.add_argument("--out", required=True)
    m.add_argument("curves", nargs="+", help="curves.json files")

    def run_merge(a):
        res = merge_results(a.curves, a.out)
        print(dumps(res["summary"]))

    m.set_defaults(func=run_merge)
