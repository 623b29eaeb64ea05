"""Evaluate a model on a prepared dataset's test split or on every image of a raw BUSI folder.

Metrics are computed at each image's own resolution against its own mask, on the processed
mask (the default output); the raw mask's numbers are reported beside them.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from busi_monai.data.datasets import source_kind, split_items
from busi_monai.data.io import read_image, read_masks_union
from busi_monai.evaluation.metrics import image_metrics, summarize
from busi_monai.inference.predictor import Predictor
from busi_monai.jsonio import write_json


def truth_mask(item: dict, shape) -> "object":
    """The lesion mask of an evaluation item: the union of its mask files."""
    return read_masks_union(item["label"], shape)


def evaluate(model, data: str | Path, out: str | Path | None = None, split: str = "test", device: str = "auto", progress: bool = True, predictor: Predictor | None = None) -> dict:
    predictor = predictor or Predictor(model, device=device)
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
    records, raw_records = [], []
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
        bar.update(len(chunk))
    bar.close()
    result = summarize(records)
    raw = summarize(raw_records)
    result["raw_mask"] = {"lesion": raw["lesion"], "normal_false_positive_rate": raw["normal_false_positive_rate"], "pixel_accuracy": raw["pixel_accuracy"]}
    result["model"] = [os.path.basename(p) for p in predictor.paths]
    result["data"] = str(data)
    result["split"] = split if (Path(data) / "dataset.json").is_file() or str(data).endswith(".npz") else "all"
    result["per_image"] = records
    if out:
        write_json(result, out)
    return result
