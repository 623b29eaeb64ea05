"""Training runs in a served model's folder (what the app's Train does between requests): usable
labels with their class, the fingerprint that decides whether an interrupted run may go on, and
keeping only the newest runs."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from busi_monai.training.recipes import get_recipe
from busi_monai.training.runs import (
    FINGERPRINT_FILENAME,
    fingerprint,
    new_run,
    prune_runs,
    resumable_run,
    usable_items,
)


def _pair(root, name, shape=(40, 50), label_shape=None, lesion=True):
    img = root / f"{name}.png"
    lab = root / f"{name}_label.png"
    Image.fromarray(np.full(shape, 90, np.uint8)).save(img)
    mask = np.zeros(label_shape or shape, np.uint8)
    if lesion:
        mask[5:15, 5:15] = 1
    Image.fromarray(mask).save(lab)
    return {"image": str(img), "label": str(lab)}


def test_usable_items_have_a_class_and_the_others_a_reason(tmp_path):
    pairs = [_pair(tmp_path, "a"), _pair(tmp_path, "b", lesion=False), _pair(tmp_path, "c", label_shape=(20, 20))]
    items, problems = usable_items(pairs)
    assert [(it["id"], it["class"]) for it in items] == [("a", "lesion"), ("b", "normal")]
    assert len(problems) == 1 and "c_label.png" in problems[0]


def test_an_interrupted_run_is_found_only_for_the_same_settings_and_labels(tmp_path):
    items, _ = usable_items([_pair(tmp_path, "a"), _pair(tmp_path, "b")])
    recipe = get_recipe("fast")
    fp = fingerprint("fast", recipe, 0, "cpu", True, items)
    model_dir = tmp_path / "model"
    run = new_run(model_dir, fp)
    assert (run / FINGERPRINT_FILENAME).is_file()
    assert resumable_run(model_dir, fp) is None, "a run that saved no epoch has nothing to resume"
    (run / "last.pt").write_bytes(b"x")
    assert resumable_run(model_dir, fp) == run
    assert resumable_run(model_dir, fingerprint("fast", recipe.with_overrides(epochs=3), 0, "cpu", True, items)) is None
    label = items[0]["label"]
    os.utime(label, ns=(1, 1))  # a label saved again
    assert resumable_run(model_dir, fingerprint("fast", recipe, 0, "cpu", True, items)) is None
    (run / "train_stats.json").write_text("{}")  # finished runs are not resumed
    assert resumable_run(model_dir, fp) is None


def test_only_the_newest_runs_are_kept(tmp_path):
    runs = tmp_path / "runs"
    for name in ("20260101_000000_000001", "20260102_000000_000001", "20260103_000000_000001", "20260104_000000_000001"):
        (runs / name).mkdir(parents=True)
    prune_runs(tmp_path, keep=2)
    assert sorted(p.name for p in runs.iterdir()) == ["20260103_000000_000001", "20260104_000000_000001"]
