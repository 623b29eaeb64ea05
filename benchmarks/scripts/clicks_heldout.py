"""Score click models on cross-validation's held-out folds, where the click recipe is chosen.

    python benchmarks/scripts/clicks_heldout.py --data data/busi --cv runs/cv-interactive \\
        --fold 0 --out benchmarks/clicks/heldout-fold0.json [--clicks 20] [--box-jitter 10] [--tta on]

For the fold's model (``CV/fold{F}/model.pt``, trained by ``busi-monai cv --only-folds F``) on
its held-out images (the same grouped, stratified folds as ``cv``), at each image's own size:
the automatic outline (lesion Dice, normal false positives), the click protocol with up to
``--clicks`` clicks (Dice after 0..N, NoC@85/90, failed@90), the box alone (the truth's
bounding box, each side moved by up to ``--box-jitter`` pixels) and the box followed by two
clicks; without ``--automatic``, also the background clicks that empty the click model's own
outline on each normal image (``normals``). Writes one JSON and the Dice-against-clicks picture beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from busi_monai.data.datasets import split_items
from busi_monai.data.splits import grouped_stratified_folds
from busi_monai.evaluation.evaluate import evaluate
from busi_monai.inference.predictor import Predictor
from busi_monai.interactive.protocol import plot_dice_vs_clicks
from busi_monai.jsonio import write_json


def heldout_dataset(data: str, folds: int, fold: int, seed: int, where: Path) -> Path:
    """A prepared dataset whose test split is fold ``fold`` of ``data``'s training split."""
    items = split_items(data, "training")
    held = grouped_stratified_folds(items, folds, seed)[fold]
    (where / "dataset.json").write_text(json.dumps({"training": [], "test": [items[i] for i in held]}))
    return where


def refined_automatic(predictor: Predictor, data: Path) -> dict:
    """The automatic outline refined by one zoomed pass around itself (no clicks, the outline
    as the previous one), scored as ``evaluate`` scores the automatic outline."""
    from busi_monai.data.io import read_image
    from busi_monai.evaluation.evaluate import truth_mask
    from busi_monai.evaluation.metrics import image_metrics, summarize

    records = []
    for it in split_items(data, "test"):
        img = read_image(it["image"])
        first = predictor.predict([img])[0].mask
        mask = predictor.predict_clicks(img, previous=first).mask if first.any() else first
        records.append(image_metrics(mask, truth_mask(it, mask.shape)))
    s = summarize(records)
    return {"lesion_dice": s["lesion"]["dice"], "lesion_missed": s["lesion_missed"], "normal_false_positive_rate": s["normal_false_positive_rate"]}


def clicks_to_empty(predictor: Predictor, data: Path, max_clicks: int) -> dict:
    """On the held-out normal images: background clicks on the click model's own outline until
    it is empty (at most ``max_clicks``), as ``al-simulate --annotator clicks`` costs them."""
    import numpy as np

    from busi_monai.active.effort import image_cost
    from busi_monai.data.io import read_image
    from busi_monai.evaluation.evaluate import truth_mask

    predict, clicks, never = predictor.as_click_model(), [], 0
    for it in split_items(data, "test"):
        img = read_image(it["image"])
        truth = truth_mask(it, img.shape) > 0
        if truth.any():
            continue
        c = image_cost(predict, img, np.zeros(img.shape, bool), max_clicks, with_previous=predictor.takes_previous)
        clicks.append(c["clicks"])
        never += int(c["redrawn"])
    return {"images": len(clicks), "clicks": int(sum(clicks)), "per_image": clicks, "never_emptied": never}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset (busi-monai prepare)")
    p.add_argument("--cv", required=True, help="the cv folder with fold*/model.pt")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the cv's seed (the folds) and the boxes' jitter")
    p.add_argument("--clicks", type=int, default=20)
    p.add_argument("--box-jitter", type=float, default=10.0)
    p.add_argument("--automatic", metavar="PT", help="another model (e.g. best's fold model) whose outline is the automatic one; the clicks correct it")
    p.add_argument("--no-box", action="store_true", help="skip the box runs (they do not depend on --automatic)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", choices=("auto", "on", "off"), default="auto", help="the click model's test-time flips (auto: as its recipe says)")
    a = p.parse_args(argv)
    model = Path(a.cv) / f"fold{a.fold}" / "model.pt"
    predictor = Predictor(model, device=a.device, tta=None if a.tta == "auto" else a.tta == "on")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        data = heldout_dataset(a.data, a.folds, a.fold, a.seed, Path(d))
        automatic = Predictor(a.automatic, device=a.device) if a.automatic else None
        clicks = evaluate(model, data, None, predictor=predictor, clicks=a.clicks, automatic=automatic)
        boxed = None if a.no_box else evaluate(model, data, None, predictor=predictor, clicks=2, box=True, box_jitter=a.box_jitter, seed=a.seed, progress=False)
        refined = refined_automatic(predictor, data) if predictor.zoom is not None and automatic is None else None
        normals = None if automatic is not None else clicks_to_empty(predictor, data, a.clicks)
    c = {k: v for k, v in clicks["clicks"].items() if k != "per_image"}
    result = {
        "model": str(model),
        "automatic_model": a.automatic,
        "fold": a.fold,
        "recipe": predictor.checkpoints[0].get("recipe"),
        "tta": predictor.tta,
        "images": clicks["n_images"],
        "automatic": {
            "lesion_dice": clicks["lesion"]["dice"], "lesion_missed": clicks["lesion_missed"],
            "normal_false_positive_rate": clicks["normal_false_positive_rate"], "n_normal_images": clicks["n_normal_images"],
        },
        "automatic_zoomed_second_pass": refined,
        "normals": normals,
        "clicks": c,
        "box": boxed["box"] if boxed else None,
        "box_then_clicks": boxed["clicks"]["dice_after"] if boxed else None,
        "per_image_dice_after": {r["id"]: r["dice_after"] for r in clicks["clicks"]["per_image"]},
        "seconds": round(time.time() - t0, 1),
    }
    write_json(result, out)
    plot_dice_vs_clicks({f"fold {a.fold}": c}, out.with_suffix(".png"), title="Lesion Dice against clicks, held-out fold")
    print(json.dumps({k: v for k, v in result.items() if k != "per_image_dice_after"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
