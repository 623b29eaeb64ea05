"""Training on the synthetic sample set really learns, resumes, and evaluate reads its output."""

import json

import numpy as np
import pytest
import torch
from conftest import TEST_OVERRIDES, TEST_PRESET
from skimage.filters import threshold_otsu

from busi_monai.data.datasets import load_datalist
from busi_monai.data.io import read_image, read_mask
from busi_monai.evaluation.evaluate import evaluate
from busi_monai.evaluation.metrics import image_metrics, summarize
from busi_monai.model.checkpoint import load_checkpoint
from busi_monai.training.loop import train_dataset


def _baseline_dice(items, predict):
    records = []
    for it in items:
        img = read_image(it["image"])
        truth = read_mask(it["label"], expected_shape=img.shape)
        records.append(image_metrics(predict(img.array), truth))
    return summarize(records)["lesion"]["dice"]


def test_short_training_beats_what_no_learning_reaches(trained_run, prepared_sample, tmp_path):
    """The session's model, scored on sample-data's test split (images it never saw), beats an
    outline of everything, a dark-pixel threshold and an untrained network by a wide margin."""
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history) == TEST_OVERRIDES["epochs"]
    assert min(h["loss"] for h in history[-5:]) < 0.7 * history[0]["loss"]
    ck = load_checkpoint(trained_run / "model.pt")
    assert ck["preset"] == TEST_PRESET and ck["preprocessing"]["image_size"] == TEST_OVERRIDES["image_size"]

    result = evaluate(trained_run / "model.pt", prepared_sample, progress=False, device="cpu")
    learned = result["lesion"]["dice"]
    test_items = [it for it in load_datalist(prepared_sample)["test"]]
    everything = _baseline_dice(test_items, lambda a: np.ones_like(a, np.uint8))
    dark = _baseline_dice(test_items, lambda a: (a < threshold_otsu(a)).astype(np.uint8))

    torch.manual_seed(0)
    size = TEST_OVERRIDES["image_size"]
    train_dataset(prepared_sample, tmp_path / "untrained", preset="fast", epochs=1, image_size=size, learning_rate=1e-9, device="cpu", progress=False)
    untrained = evaluate(tmp_path / "untrained" / "model.pt", prepared_sample, progress=False, device="cpu")["lesion"]["dice"]

    assert learned > 0.4, result["lesion"]
    assert learned > max(everything, dark, untrained) + 0.2, (learned, everything, dark, untrained)


def test_resume_continues_an_interrupted_run(prepared_sample, tmp_path):
    kw = dict(preset="fast", image_size=48, device="cpu", progress=False)
    train_dataset(prepared_sample, tmp_path, epochs=2, **kw)
    first = json.loads((tmp_path / "history.json").read_text())
    train_dataset(prepared_sample, tmp_path, epochs=4, resume=True, **kw)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def test_training_without_labels_says_why(tmp_path):
    from busi_monai.training.loop import TrainingError

    (tmp_path / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(TrainingError, match="no labelled images"):
        train_dataset(tmp_path, tmp_path / "run", preset="fast", epochs=1, device="cpu", progress=False)


def _sample_data(prepared_sample, size=32):
    from busi_monai.data.packs import cache_items
    from busi_monai.data.splits import split_validation

    tr, va = split_validation(load_datalist(prepared_sample)["training"], 0.2, 0)
    return cache_items(tr, size, progress=False), cache_items(va, size, progress=False)


def test_checkpoints_are_paced_and_model_pt_holds_the_best_epoch(prepared_sample, tmp_path):
    from busi_monai.training.loop import fit
    from busi_monai.training.recipes import get_recipe

    train, val = _sample_data(prepared_sample)
    recipe = get_recipe("fast").with_overrides(epochs=4, image_size=32, loss="dice_bce", learning_rate=3e-3)
    every = fit(train, val, tmp_path / "every", "fast", recipe, device="cpu", progress=False, checkpoint_overhead=1.0)
    assert every["checkpoint_writes"] == 4
    # A negligible allowance: only the first and the last epoch are written.
    paced = fit(train, val, tmp_path / "paced", "fast", recipe, device="cpu", progress=False, checkpoint_overhead=1e-9)
    assert paced["checkpoint_writes"] == 2
    for run in ("every", "paced"):
        history = json.loads((tmp_path / run / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3, 4]
        best = max(history, key=lambda h: h["val_score"])
        ck = load_checkpoint(tmp_path / run / "model.pt")
        assert ck["epoch"] + 1 == best["epoch"] and ck["best_val_score"] == best["val_score"]
        assert load_checkpoint(tmp_path / run / "last.pt")["epoch"] == 3
    # The paced run trained the same way: pacing changes what is written, not what is learnt.
    same = json.loads((tmp_path / "every" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in same], rel=1e-4)


def test_recipe_confidence_gate_reaches_the_saved_network(prepared_sample, tmp_path):
    kw = dict(preset="fast", image_size=32, device="cpu", progress=False)
    train_dataset(prepared_sample, tmp_path, epochs=1, overrides={"confidence_gate": 0.8}, **kw)
    assert load_checkpoint(tmp_path / "model.pt")["network"]["confidence_gate"] == 0.8


def test_pack_round_trip_is_lossless(prepared_sample, tmp_path):
    from busi_monai.data.io import read_image, read_mask
    from busi_monai.data.packs import (
        cache_items,
        load_pack,
        load_pack_originals,
        save_pack,
    )

    items = load_datalist(prepared_sample)["test"]
    data = cache_items(items, 64, progress=False)
    originals = [(read_image(it["image"]).array, read_mask(it["label"])) for it in items]
    save_pack(data, tmp_path / "p.npz", originals)
    back = load_pack(tmp_path / "p.npz")
    # 8-bit storage: the images come back to within half a grey level, the masks exactly.
    assert torch.allclose(back.images, data.images, atol=0.5 / 255 + 1e-6)
    assert torch.equal(back.labels, data.labels) and len(back.items) == len(items)
    for (img, mask), (img2, mask2) in zip(originals, load_pack_originals(tmp_path / "p.npz")):
        assert np.array_equal(np.clip(np.round(img), 0, 255), img2) and np.array_equal(mask, mask2)


def test_validation_split_keeps_a_mixed_class_duplicate_group_together():
    """A benign and a malignant copy of one lesion never end up on both sides (the old per-class
    grouping split such a pair in 38 of 200 seeds); at least one image is held out and one kept."""
    from busi_monai.data.splits import split_validation

    items = [{"id": f"s{i}", "class": ("benign", "malignant", "normal")[i % 3]} for i in range(40)]
    items += [{"id": "pair_b", "class": "benign", "group": "g"}, {"id": "pair_m", "class": "malignant", "group": "g"}]
    for seed in range(200):
        train, val = split_validation(items, 0.2, seed)
        assert len(train) + len(val) == len(items) and val and train
        sides = {it["id"]: side for side, its in (("t", train), ("v", val)) for it in its}
        assert sides["pair_b"] == sides["pair_m"], seed
    assert split_validation(items[:2], 0.1, 0)[1], "two images: one is held out even at a small fraction"
    assert split_validation(items, 0.0, 0) == (items, [])
    assert split_validation([dict(it, group="all") for it in items[:5]], 0.2, 0) == ([dict(it, group="all") for it in items[:5]], [])


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_both_numeric_paths_train_on_any_cpu(prepared_sample, tmp_path, amp):
    """fp32 and bf16 autocast both run here, whichever the CPU does natively (bf16 is emulated
    where it is not): a change that breaks one path fails on every machine, not only on the
    machines that take it."""
    from busi_monai.training.loop import fit
    from busi_monai.training.recipes import get_recipe

    train, val = _sample_data(prepared_sample)
    recipe = get_recipe("fast").with_overrides(epochs=4, image_size=32, loss="dice_bce", learning_rate=3e-3)
    summary = fit(train, val, tmp_path, "fast", recipe, device="cpu", progress=False, amp=amp)
    assert summary["amp_bf16"] is amp
    losses = [h["loss"] for h in json.loads((tmp_path / "history.json").read_text())]
    assert all(np.isfinite(losses)) and min(losses[1:]) < losses[0], losses
    ck = load_checkpoint(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in ck["state_dict"].values()), "weights are kept in fp32"


def test_losses_and_schedules_are_chosen_by_name_from_one_registry():
    from busi_monai.training.losses import LOSSES, make_loss
    from busi_monai.training.recipes import get_recipe
    from busi_monai.training.schedules import SCHEDULES, make_scheduler

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for name in LOSSES:
        assert isinstance(make_loss(get_recipe("paper").with_overrides(loss=name), False), torch.nn.Module)
    for name in SCHEDULES:
        assert make_scheduler(get_recipe("paper").with_overrides(lr_schedule=name), opt, 10).optimizer is opt
    with pytest.raises(ValueError, match="choose one of bce, dice_bce"):
        make_loss(get_recipe("paper").with_overrides(loss="focal"), False)
    with pytest.raises(ValueError, match="exponential, cosine"):
        make_scheduler(get_recipe("paper").with_overrides(lr_schedule="step"), opt, 10)
    assert {r.loss for r in map(get_recipe, ("paper", "fast", "best", "warmup"))} <= set(LOSSES)
