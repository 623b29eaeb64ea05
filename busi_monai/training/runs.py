"""Training runs in a served model's folder, as a labelling server does them: which labelled
images can be used, the run's fingerprint (settings and label files), finding an interrupted run
with the same fingerprint to resume, and keeping only the last few runs."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from busi_monai.data.io import BusiInputError, read_image, read_mask
from busi_monai.jsonio import write_json
from busi_monai.training.recipes import Recipe

RUNS_DIRNAME = "runs"
FINGERPRINT_FILENAME = "request.json"
FINISHED_FILENAME = "train_stats.json"  # what a finished run writes last
KEEP_RUNS = 3


def usable_items(pairs: list[dict]) -> tuple[list[dict], list[str]]:
    """The (image, label) pairs that can be read and whose label matches its image, as training
    items with an ``id`` and a ``class`` (``lesion`` or ``normal``, so that the validation slice
    holds both); and a message for each pair that cannot be used."""
    items, problems = [], []
    for it in pairs:
        try:
            shape = read_image(it["image"]).shape
            mask = read_mask(it["label"], expected_shape=shape)
        except BusiInputError as e:
            problems.append(str(e))
            continue
        cls = "lesion" if mask.any() else "normal"
        items.append({"image": it["image"], "label": it["label"], "id": os.path.basename(it["image"]).split(".")[0], "class": cls})
    return items, problems


def _stamp(path: str) -> list:
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def fingerprint(preset: str, recipe: Recipe, seed: int, device: str, pretrained: bool, items: list[dict]) -> dict:
    """What makes two training requests the same run: the settings and the label files (name,
    size, modification time), so that an interrupted run is resumed only for unchanged labels."""
    return json.loads(json.dumps({
        "preset": preset, "recipe": recipe.to_dict(), "seed": seed, "device": device,
        "pretrained": str(pretrained).lower(),
        "labels": sorted([it["id"], *_stamp(it["label"])] for it in items),
    }, default=str))  # fmt: skip


def resumable_run(model_dir: str | Path, wanted: dict) -> Path | None:
    """The newest unfinished run with this fingerprint that saved an epoch (None: none)."""
    root = Path(model_dir) / RUNS_DIRNAME
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir(), reverse=True):
        if (d / FINISHED_FILENAME).is_file() or not (d / "last.pt").is_file():
            continue
        try:
            if json.loads((d / FINGERPRINT_FILENAME).read_text()) == wanted:
                return d
        except (OSError, ValueError):
            continue
    return None


def new_run(model_dir: str | Path, fingerprint_: dict) -> Path:
    """A new run folder, named by its start time, with its fingerprint written."""
    d = Path(model_dir) / RUNS_DIRNAME / datetime.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    d.mkdir(parents=True, exist_ok=True)
    write_json(fingerprint_, d / FINGERPRINT_FILENAME)
    return d


def prune_runs(model_dir: str | Path, keep: int = KEEP_RUNS) -> None:
    """Delete all but the newest ``keep`` run folders."""
    root = Path(model_dir) / RUNS_DIRNAME
    runs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    for d in runs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
