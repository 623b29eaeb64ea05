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
    box: bool = False,
    box_jitter: float = 0.0,
    seed: int = 0,
    automatic: Predictor | None = None,
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
        box: with a click-guided model, first a box around each lesion (its true bounding box,
            each side moved by up to ``box_jitter`` pixels): ``box`` holds the Dice from the box
            alone, and the click protocol continues from it (``clicks.dice_after[0]`` is then
            the box's Dice).
        box_jitter: pixels each side of the box may move (uniform, deterministic by ``seed``).
        seed: seeds the boxes' jitter.
        automatic: another model whose outline is the automatic one (what the user sees before
            clicking): the automatic metrics are its, and the click protocol starts from its
            outline instead of the click model's own.
    """
    predictor = predictor or Predictor(model, device=device)
    if (clicks or box) and not predictor.takes_clicks:
        raise ValueError(f"--clicks/--box need a click-guided model; {predictor.paths[0]} takes no clicks (train --preset interactive)")
    if box_jitter < 0:
        raise ValueError(f"--box-jitter {box_jitter}: must be >= 0 pixels")
    if automatic is not None and (box or not clicks):
        raise ValueError("an automatic model starts the click protocol: it needs --clicks and no --box")
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
    records, raw_records, lesions, starts = [], [], [], []
    bs = predictor.batch_size
    bar = tqdm(total=len(items), desc="evaluate", unit="img", disable=not progress)
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        images = [load(it) for it in chunk]
        preds = (automatic or predictor).predict(images)
        for it, im, pr in zip(chunk, images, preds):
            truth = truth_of(it, pr.mask.shape)
            extra = {"id": it.get("id"), "class": it.get("class"), "image": it["image"]}
            records.append({**image_metrics(pr.mask, truth), **extra})
            raw_records.append({**image_metrics(pr.raw_mask, truth), **extra})
            if (clicks or box) and truth.any():
                lesions.append((it.get("id"), im, truth))
                starts.append(pr.mask)
        bar.update(len(chunk))
    bar.close()
    result = summarize(records)
    raw = summarize(raw_records)
    result["raw_mask"] = {"lesion": raw["lesion"], "normal_false_positive_rate": raw["normal_false_positive_rate"], "pixel_accuracy": raw["pixel_accuracy"]}
    result["model"] = [os.path.basename(p) for p in predictor.paths]
    if automatic is not None:
        result["automatic_model"] = [os.path.basename(p) for p in automatic.paths]
    result["data"] = str(data)
    result["split"] = split if (Path(data) / "dataset.json").is_file() or str(data).endswith(".npz") else "all"
    if clicks or box:
        boxes = [jittered_box(truth, box_jitter, seed + i) for i, (_, _, truth) in enumerate(lesions)] if box else None
        res = click_results(predictor, lesions, clicks, progress, boxes, starts if automatic is not None else None)
        if box:
            result["box"] = {"dice": res["dice_after"][0] if res["dice_after"] else None, "jitter_px": box_jitter, "seed": seed}
        if clicks:
            result["clicks"] = res
    result["per_image"] = records
    if out:
        write_json(result, out)
        if clicks and lesions:
            plot_dice_vs_clicks(result["clicks"], Path(out).with_suffix(".clicks.png"), title="Lesion Dice against clicks")
    return result


def jittered_box(truth: np.ndarray, jitter: float, seed: int) -> tuple[int, int, int, int]:
    """The bounding box (row0, col0, row1, col1, inclusive) of ``truth``'s lesion pixels with
    each side moved by a uniform draw in [-jitter, jitter] pixels (seeded), kept on the image
    and at least 2x2: a user's box drawn roughly around the lesion."""
    rows, cols = np.nonzero(np.asarray(truth) > 0.5)
    if rows.size == 0:
        raise ValueError("no lesion to draw a box around")
    h, w = truth.shape
    d = np.random.default_rng(seed).uniform(-jitter, jitter, 4) if jitter > 0 else np.zeros(4)
    r0, c0 = int(round(rows.min() + d[0])), int(round(cols.min() + d[1]))
    r1, c1 = int(round(rows.max() + d[2])), int(round(cols.max() + d[3]))
    r0, c0 = min(max(r0, 0), h - 2), min(max(c0, 0), w - 2)
    r1, c1 = min(max(r1, r0 + 1), h - 1), min(max(c1, c0 + 1), w - 1)
    return r0, c0, r1, c1


def click_results(
    predictor: Predictor, lesions: list[tuple], max_clicks: int, progress: bool = True, boxes: list | None = None, starts: list | None = None
) -> dict:
    """The click protocol on (id, image, truth) lesion images: its summary and each image's Dice
    after 0..N clicks. Clicks land on the returned mask, as the user sees it in Slicer; the
    previous mask goes back to a model that reads it, as the app keeps it. With ``boxes`` (one
    per image), the first prediction is the box's alone and the clicks continue from it; with
    ``starts`` (one outline per image), the clicks correct that outline."""
    if not lesions:
        return {"images": 0, "max_clicks": max_clicks, "dice_after": [], "noc_85": None, "noc_90": None, "failed_90": 0, "per_image": []}
    bar = tqdm(total=len(lesions), desc="clicks", unit="img", disable=not progress)
    ids, images, truths = zip(*lesions)
    predict = predictor.as_click_model()
    per_image = []
    scores = []
    for i in range(len(lesions)):  # one image at a time, for the progress bar
        res = evaluate_clicks(
            predict,
            [images[i]],
            [truths[i]],
            max_clicks,
            threshold=0.5,
            boxes=[boxes[i]] if boxes else None,
            with_previous=predictor.takes_previous,
            starts=[starts[i]] if starts else None,
        )
        scores.append(res.dice[0])
        rec = {"id": ids[i], "dice_after": [round(float(v), 4) for v in res.dice[0]], "clicks": [[c.row, c.col, int(c.positive)] for c in res.clicks[0]]}
        if boxes:
            rec["box"] = list(boxes[i])
        per_image.append(rec)
        bar.update(1)
    bar.close()
    return {**summarize_clicks(np.stack(scores)), "per_image": per_image}
