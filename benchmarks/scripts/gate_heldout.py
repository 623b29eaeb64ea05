"""Held-out-fold figures of docs/gate.md: single `best` models with the recipe's fixed gate
against each model's own gate (chosen on its run's validation slice), pooled over images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scripts/gate_heldout.py --data work/busi-prepared \\
        --cv work/gate-cv/s0 0 --cv work/gate-cv/s1 1 --cv work/gate-cv/s2 2 --out work/gate-heldout.json --figure docs/gate-heldout.png

Each ``--cv`` folder is a ``busi-monai cv`` output (any subset of folds trained), with the seed
it ran with. Every fold model is run again on its own held-out fold (never trained on,
never used to choose its gate or epoch), ungated, at network size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from busi_monai.data.datasets import load_split
from busi_monai.data.splits import grouped_stratified_folds
from busi_monai.jsonio import write_json
from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint
from busi_monai.training.gate import GATES, gate_curve
from busi_monai.training.validation import image_scores, predict_cached


def fold_scores(data: str, cv: Path, seed: int, folds: int = 5) -> list[dict]:
    """Per trained fold: its held-out per-image scores, its own gate and the recipe's."""
    out, cached = [], {}
    for fold_json in sorted(cv.glob("fold*/fold.json")):
        rec = json.loads(fold_json.read_text())
        ck = load_checkpoint(fold_json.parent / "model.pt")
        key = (int(ck["preprocessing"]["image_size"]), bool(ck["recipe"].get("pad_square", False)))
        if key not in cached:
            cached[key] = load_split(data, "training", key[0], False, key[1])
        held = grouped_stratified_folds(cached[key].items, folds, seed)[rec["fold"]]
        prob = predict_cached(model_from_checkpoint(ck, "cpu"), cached[key].images[held])
        s = image_scores(prob, cached[key].labels[held], float(ck.get("threshold", 0.5)))
        out.append({"fold": rec["fold"], "seed": seed, "run_gate": rec["run_gate"], "recipe_gate": rec["recipe_gate"], "scores": s})
    return out


def pooled(scores: list[dict], gate_of) -> dict:
    """Lesion Dice and normal false-positive rate over all held-out images, each fold's model at ``gate_of(fold)``."""
    per = [gate_curve(f["scores"], (gate_of(f),))[0] | {"n_lesion": int(f["scores"]["lesion"].sum()), "n_normal": int((~f["scores"]["lesion"]).sum())} for f in scores]
    n_les, n_nor = sum(p["n_lesion"] for p in per), sum(p["n_normal"] for p in per)
    return {
        "lesion_dice": sum(p["lesion_dice"] * p["n_lesion"] for p in per) / n_les,
        "normal_fp": sum(p["normal_fp"] * p["n_normal"] for p in per) / n_nor,
        "normals_outlined": int(round(sum(p["normal_fp"] * p["n_normal"] for p in per))),
        "lesions_missed": sum(p["lesions_missed"] for p in per),
        "n_lesion": n_les, "n_normal": n_nor,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--cv", nargs=2, action="append", required=True, metavar=("DIR", "SEED"), help="a cv folder and the --seed it ran with (it decides the folds)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--figure")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    scores = []
    for cv, seed in a.cv:
        scores += fold_scores(a.data, Path(cv), int(seed))
    folds = [
        {"seed": f["seed"], "fold": f["fold"], "run_gate": f["run_gate"],
         "own_gate": pooled([f], lambda g: g["run_gate"]), "fixed_gate": pooled([f], lambda g: g["recipe_gate"])}
        for f in scores
    ]  # fmt: skip
    result = {
        "folds": folds,
        "fixed_gate": pooled(scores, lambda f: f["recipe_gate"]),
        "own_gate": pooled(scores, lambda f: f["run_gate"]),
        "no_gate": pooled(scores, lambda f: 0.0),
        "common_gate_curve": [{"gate": g, **pooled(scores, lambda f, g=g: g)} for g in GATES],
    }
    write_json(result, a.out)
    print(json.dumps({k: v for k, v in result.items() if k != "common_gate_curve"}, indent=1))
    if a.figure:
        from busi_monai.figures import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        c = result["common_gate_curve"]
        ax.plot([p["normal_fp"] for p in c], [p["lesion_dice"] for p in c], "o-", ms=3, color="0.5", label="one gate for every model")
        for p in c:
            if p["gate"] in (0.0, 0.6, 0.7, 0.8, 0.9, 0.95):
                ax.annotate(f"{p['gate']:g}", (p["normal_fp"], p["lesion_dice"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for key, mark, colour, label in (("fixed_gate", "s", "C3", "recipe's fixed gate 0.8"), ("own_gate", "*", "C2", "each model's own gate")):
            ax.plot(result[key]["normal_fp"], result[key]["lesion_dice"], mark, ms=10, color=colour, label=label)
        ax.set_xlabel("normal images with a false outline (held-out folds)")
        ax.set_ylabel("lesion Dice (missed lesions count 0)")
        n = result["own_gate"]
        ax.set_title(f"single `best` models, {len(folds)} folds: {n['n_lesion']} lesion, {n['n_normal']} normal images", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(a.figure, dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
