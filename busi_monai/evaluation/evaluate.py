"""Evaluate a model on a prepared dataset's test split or on every image of a raw BUSI folder.

Metrics are computed at each image's own resolution against its own mask, on the processed
mask (the default output); the raw mask's numbers are reported beside them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from busi_monai.data.datasets import source_kind, split_items
from busi_monai.data.io import read_image, read_masks_union
from busi_monai.evaluation.metrics import image_metrics, summarize
from busi_monai.inference.predictor import Predictor
from busi_monai.interactive.protocol import evaluate_clicks, plot_dice_vs_clicks
from busi_monai.interactive.protocol import summarize as summarize_clicks
from busi_monai.jsonio import write_json


def truth_mask(item: dict, shape) -> "object":
    """The lesion mask of an evaluation item: the union of its mask files."""
    return read_masks_union(item["label"], shape)


def evaluate(
    model,
    data: str | Path,
    out: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    progress: bool = True,
    predictor: Predictor | None = None,
    clicks: int = 0,
) -> dict:
    """Metrics of ``model`` on ``data``'s ``split`` (every image of a BUSI folder), written to ``out``.

    Args:
        model: checkpoint(s) or a cross-validation dir (ignored when ``predictor`` is given).
        data: a prepared dataset, a pack with test originals, or a BUSI-layout folder.
        out: the metrics JSON to write (with ``per_image`` records), or None.
        split: the prepared dataset's split.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show progress bars.
        predictor: an already loaded :class:`Predictor`.
        clicks: with a click-guided model, also run the click protocol (:func:`evaluate_clicks`)
            with up to this many clicks on each lesion image: the ``clicks`` key, and a plot of
            Dice against clicks beside ``out``.
    """
    predictor = predictor or Predictor(model, device=device)
    if clicks and not predictor.takes_clicks:
        raise ValueError(f"--clicks needs a click-guided model; {predictor.paths[0]} takes no clicks (train --preset interactive)")
    if source_kind(data) == "pack":
        # A pack carries the test split at full size (see `busi-monai pack --with-test-originals`).
        from busi_monai.data.packs import load_pack, load_pack_originals

        originals = load_pack_originals(data)
        items = [dict(m, image=m.get("id"), _orig=o) for m, o in zip((m for m in load_pack(data).items if m.get("split") == "test"), originals)]
        load = lambda it: it["_orig"][0]  # noqa: E731
        truth_of = lambda it, shape: it["_orig"][1]  # noqa: E731
    else:
        items = split_items(data, split)
        load = lambda it: read_image(it["image"])  # noqa: E731
        truth_of = truth_mask
    records, raw_records, lesions = [], [], []
    bs = predictor.batch_size
    bar = tqdm(total=len(items), desc="evaluate", unit="img", disable=not progress)
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        images = [load(it) for it in chunk]
        preds = predictor.predict(images)
        for it, im, pr in zip(chunk, images, preds):
            truth = truth_of(it, pr.mask.shape)
            extra = {"id": it.get("id"), "class": it.get("class"), "image": it["image"]}
            records.append({**image_metrics(pr.mask, truth), **extra})
            raw_records.append({**image_metrics(pr.raw_mask, truth), **extra})
            if clicks and truth.any():
                lesions.append((it.get("id"), im, truth))
        bar.update(len(chunk))
    bar.close()
    result = summarize(records)
    raw = summarize(raw_records)
    result["raw_mask"] = {"lesion": raw["lesion"], "normal_false_positive_rate": raw["normal_false_positive_rate"], "pixel_accuracy": raw["pixel_accuracy"]}
    result["model"] = [os.path.basename(p) for p in predictor.paths]
    result["data"] = str(data)
    result["split"] = split if (Path(data) / "dataset.json").is_file() or str(data).endswith(".npz") else "all"
    if clicks:
        result["clicks"] = click_results(predictor, lesions, clicks, progress)
    result["per_image"] = records
    if out:
        write_json(result, out)
        if clicks and lesions:
            plot_dice_vs_clicks(result["clicks"], Path(out).with_suffix(".clicks.png"), title="Lesion Dice against clicks")
    return result


def click_results(predictor: Predictor, lesions: list[tuple], max_clicks: int, progress: bool = True) -> dict:
    """The click protocol on (id, image, truth) lesion images: its summary and each image's Dice
    after 0..N clicks. Clicks land on the raw (thresholded) mask, as the user sees it in Slicer."""
    if not lesions:
        return {"images": 0, "max_clicks": max_clicks, "dice_after": [], "noc_85": None, "noc_90": None, "failed_90": 0, "per_image": []}
    bar = tqdm(total=len(lesions), desc="clicks", unit="img", disable=not progress)

    def predict(image, fg, bg):
        return predictor.predict_clicks(image, fg, bg).probability

    ids, images, truths = zip(*lesions)
    per_image = []
    scores = []
    for i in range(len(lesions)):  # one image at a time, for the progress bar
        res = evaluate_clicks(predict, [images[i]], [truths[i]], max_clicks, threshold=predictor.threshold)
        scores.append(res.dice[0])
        per_image.append({"id": ids[i], "dice_after": [round(float(v), 4) for v in res.dice[0]], "clicks": [[c.row, c.col, int(c.positive)] for c in res.clicks[0]]})
        bar.update(1)
    bar.close()
    return {**summarize_clicks(np.stack(scores)), "per_image": per_image}
