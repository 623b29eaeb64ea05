"""Nothing busi-monai writes or answers as JSON holds NaN or infinity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from busi_monai.jsonio import dumps, finite, loads_strict, read_json, write_json


def test_non_finite_numbers_become_null_and_are_named():
    obj = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": np.float32("nan"), "e": np.array([0.5, np.nan]),
           "f": torch.tensor(float("inf")), "ok": 0.25, "n": 3, "s": "NaN", "t": (1, 2), "none": None, "yes": True}  # fmt: skip
    clean, replaced = finite(obj)
    assert clean == {"a": None, "b": [1.0, None, {"c": None}], "d": None, "e": [0.5, None], "f": None, "ok": 0.25,
                     "n": 3, "s": "NaN", "t": [1, 2], "none": None, "yes": True}  # fmt: skip
    assert sorted(replaced) == ["a", "b[1]", "b[2].c", "d", "e[1]", "f"]
    assert loads_strict(dumps(obj)) == clean


def test_write_json_is_strict_and_read_json_repairs_old_files(tmp_path):
    write_json({"loss": math.nan, "history": [{"val_dice": math.inf}]}, tmp_path / "x.json")
    text = (tmp_path / "x.json").read_text()
    assert loads_strict(text) == {"loss": None, "history": [{"val_dice": None}]}
    (tmp_path / "old.json").write_text('{"best": NaN, "loss": -Infinity, "n": 2}')
    with pytest.raises(ValueError, match="not JSON"):
        loads_strict((tmp_path / "old.json").read_text())
    assert read_json(tmp_path / "old.json") == ({"best": None, "loss": None, "n": 2}, ["best", "loss"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_validation_figures_over_an_empty_set_are_null_not_nan():
    from busi_monai.training.validation import quick_scores

    labels = torch.zeros(3, 1, 8, 8)  # normal images only
    prob = torch.zeros(3, 1, 8, 8)
    prob[0, 0, 2:4, 2:4] = 0.9  # one false outline
    s = quick_scores(prob, labels)
    assert s["val_dice"] is None and s["val_normal_fp"] == pytest.approx(1 / 3) and s["val_score"] == pytest.approx(2 / 3)
    lesion = torch.zeros(1, 1, 8, 8)
    lesion[0, 0, 2:4, 2:4] = 1
    s = quick_scores(lesion.clone(), lesion)
    assert s["val_dice"] == 1.0 and s["val_normal_fp"] is None and s["val_score"] == 1.0
    assert quick_scores(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8)) == {"val_dice": None, "val_normal_fp": None, "val_score": None}
    json.dumps(s, allow_nan=False)


def test_training_with_a_normal_only_validation_slice_writes_finite_json(tmp_path):
    """A fit whose validation images have no lesion (as with few labels in the app) selects by
    the selection score, and its history, summary and checkpoint metadata hold no NaN."""
    from busi_monai.data.packs import CachedData
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.training.loop import fit
    from busi_monai.training.recipes import get_recipe

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=g)
    labels = torch.zeros(6, 1, 32, 32)
    labels[:3, :, 8:20, 10:22] = 1
    items = [{"id": f"i{i}", "class": "benign" if i < 3 else "normal"} for i in range(6)]
    train = CachedData(images[:4], labels[:4], items[:4])
    val = CachedData(images[4:], labels[4:], items[4:])
    recipe = get_recipe("fast").with_overrides(epochs=2, image_size=32, loss="dice_bce")
    summary = fit(train, val, tmp_path, "fast", recipe, device="cpu", progress=False)
    for name in ("history.json", "summary.json", "split.json"):
        loads_strict((tmp_path / name).read_text())
    assert summary["best_val_dice"] is None and 0 <= summary["best_val_score"] <= 1
    ck = load_checkpoint(tmp_path / "model.pt")
    assert ck["best_val_dice"] is None and all(h["val_dice"] is None for h in ck["history"])
    split = loads_strict((tmp_path / "split.json").read_text())
    assert [it["id"] for it in split["validation"]] == ["i4", "i5"]
