"""The `full` preset's ingredients (#19), each registry entry on its own, and the GPU script's --tiny run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from busi_monai.training.recipes import NNUNET_SGD, PRESETS, Recipe, get_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_paper_preset_is_unchanged_field_by_field():
    paper = get_recipe("paper")
    expected = {
        "network": "paper", "image_size": 256, "epochs": 50, "batch_size": 4, "learning_rate": 1e-3,
        "lr_schedule": "exponential", "lr_decay": 0.95, "weight_decay": 0.0, "loss": "bce", "augment": "none",
        "val_fraction": 0.1, "threshold": 0.5, "tta": False, "confidence_gate": 0.0,
        "optimizer": "adam", "momentum": 0.99, "poly_exponent": 0.9, "ds_weights": "exp", "sampler": "shuffle",
        "foreground_fraction": 0.33, "pad_square": False, "largest_component": False,
        # used by "+clicks" networks only
        "click_free_fraction": 0.3, "click_rounds": 3, "click_sigma": 3.0, "outline_first_fraction": 0.75,
        "zoom_fraction": 0.5, "zoom_margin": 0.4, "zoom_jitter": 0.15, "zoom_min_side": 0.25,
    }  # fmt: skip
    assert paper.to_dict() == expected
    # The new fields' defaults are the earlier behaviour in every earlier preset.
    for name in ("paper", "fast", "best", "warmup"):
        r = PRESETS[name]
        assert (r.optimizer, r.ds_weights, r.pad_square, r.largest_component) == ("adam", "exp", False, False)
        # `best` took the foreground sampler on cross-validation (README, Results); the rest shuffle.
        assert r.sampler == ("foreground" if name == "best" else "shuffle")


def test_full_preset_holds_the_nnunet_ingredients_that_held_up():
    r = get_recipe("full")
    assert (r.network, r.image_size, r.optimizer, r.learning_rate, r.lr_schedule) == ("paper+ds", 256, "adam", 1e-3, "cosine")
    assert (r.loss, r.ds_weights, r.sampler, r.augment) == ("dice_bce", "halving", "foreground", "nnunet")
    sgd = r.with_overrides(**NNUNET_SGD)  # nnU-Net's optimiser, the GPU script's ablation
    assert (sgd.optimizer, sgd.momentum, sgd.learning_rate, sgd.lr_schedule, sgd.poly_exponent) == ("sgd_nesterov", 0.99, 1e-2, "poly", 0.9)
    assert Recipe.parse_override("pad_square=true") == ("pad_square", True)
    assert Recipe.parse_override("optimizer=adam") == ("optimizer", "adam")


def test_optimizers():
    from busi_monai.training.optimizers import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(get_recipe("full").with_overrides(**NNUNET_SGD), params, torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    assert isinstance(make_optimizer(get_recipe("paper"), params, "cpu"), torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(get_recipe("paper").with_overrides(optimizer="lion"), params, "cpu")


def test_poly_schedule_values():
    from busi_monai.training.schedules import make_scheduler

    r = get_recipe("full").with_overrides(**NNUNET_SGD)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=r.learning_rate)
    sched = make_scheduler(r, opt, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[5] == pytest.approx(1e-2 * 0.5**0.9)
    assert lrs[9] == pytest.approx(1e-2 * 0.1**0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_batch_dice_ce_loss_on_a_known_batch():
    from monai.losses import DiceCELoss

    from busi_monai.training.losses import ds_weights, make_loss

    r = get_recipe("full").with_overrides(loss="dice_ce_batch")  # nnU-Net's loss, an ablation of `full`
    y = torch.zeros(2, 1, 4, 4)
    y[0, :, :2] = 1  # a lesion image and a normal one
    logits = torch.where(y > 0, 20.0, -20.0)
    loss = make_loss(r, deep_supervision=False)
    assert float(loss(logits, y)) == pytest.approx(0.0, abs=1e-6)  # batch Dice: the empty image does not count alone
    x = torch.zeros(2, 1, 4, 4)
    p = 0.5
    inter, area = p * 8, p * 32 + 8
    expected = (1 - (2 * inter + 1e-5) / (area + 1e-5)) + math.log(2)
    assert float(loss(x, y)) == pytest.approx(expected, rel=1e-5)
    assert float(DiceCELoss(sigmoid=True, batch=False, smooth_nr=1e-5, smooth_dr=1e-5)(x, y)) != pytest.approx(expected, rel=1e-3)
    assert ds_weights("halving", 3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert ds_weights("exp", 3) is None
    ds = make_loss(r, deep_supervision=True)
    parts = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 1, 1)]
    total = float(ds(parts, y))
    by_hand = sum(w * float(loss(p, torch.nn.functional.interpolate(y, size=p.shape[-2:], mode="nearest-exact"))) for w, p in zip([4 / 7, 2 / 7, 1 / 7], parts))
    assert total == pytest.approx(by_hand, rel=1e-5)


def test_foreground_sampler_guarantees_its_share():
    from busi_monai.training.sampling import (
        ForegroundSampler,
        ShuffleSampler,
        forced,
        make_sampler,
    )

    assert [forced(b, 0.33) for b in (1, 2, 4, 8, 16, 32)] == [0, 1, 1, 3, 5, 11]
    g = torch.Generator().manual_seed(0)
    # Enough lesion images: each batch holds its share and each image appears once.
    has = torch.tensor([i % 2 == 0 for i in range(40)])  # 20 lesion images for 5 x 3 forced slots
    s = ForegroundSampler(has, 0.33)
    for _ in range(5):
        perm = torch.randperm(40, generator=g)
        order = torch.cat([s.batch(perm, k, 8) for k in range(5)])
        assert sorted(order.tolist()) == list(range(40))
        assert all(int(has[order[k * 8 : (k + 1) * 8]].sum()) >= forced(8, 0.33) for k in range(5))
    # Too few: lesion images repeat in place of background ones; every batch still holds its share.
    has = torch.zeros(20, dtype=torch.bool)
    has[3] = True
    perm = torch.randperm(20, generator=g)
    order = ForegroundSampler(has, 0.5).order(perm, 4)
    assert len(order) == 20 and all(int(has[order[k : k + 4]].sum()) >= 2 for k in range(0, 20, 4))
    # None: the plain shuffle, as is the paper's sampler.
    perm = torch.randperm(20, generator=g)
    assert torch.equal(ForegroundSampler(torch.zeros(20, dtype=torch.bool), 0.33).order(perm, 4), perm)
    assert torch.equal(ShuffleSampler().batch(perm, 1, 4), perm[4:8])
    labels = torch.zeros(6, 1, 4, 4)
    labels[2, 0, 1, 1] = 1
    fg = make_sampler(get_recipe("full"), labels)
    assert fg.has_lesion.tolist() == [False, False, True, False, False, False]
    assert isinstance(make_sampler(get_recipe("paper"), labels), ShuffleSampler)


def test_nnunet_augmentation_keeps_image_and_mask_aligned():
    from busi_monai.training.augmentation import augmentation

    torch.manual_seed(0)
    aug = augmentation("nnunet")
    n, s = 16, 48
    y = torch.zeros(n, 1, s, s)
    y[:, :, 10:30, 14:34] = 1
    x = 0.2 + 0.6 * y  # the lesion is the bright square: image and mask must move together
    xa, ya = aug(x.clone(), y.clone())
    assert xa.shape == x.shape and ya.shape == y.shape and xa.dtype == x.dtype and ya.dtype == y.dtype
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert set(ya.unique().tolist()) <= {0.0, 1.0}
    inside = (xa * ya).sum((1, 2, 3)) / ya.sum((1, 2, 3)).clamp(min=1)
    outside = (xa * (1 - ya)).sum((1, 2, 3)) / (1 - ya).sum((1, 2, 3)).clamp(min=1)
    kept = ya.sum((1, 2, 3)) > 20
    assert bool(kept.all())
    assert bool((inside[kept] > outside[kept] + 0.2).all())


def test_pad_square_round_trip_puts_the_mask_back():
    from busi_monai.data.preprocessing import (
        preprocess_array,
        preprocess_list,
        restore_size,
        square_box,
    )

    h, w, size = 60, 150, 64
    img = np.zeros((h, w), np.float32)
    img[20:40, 90:130] = 200
    img[0, 0] = 10  # a non-constant background
    x = preprocess_array(img, size, pad_square=True)
    assert x.shape == (1, size, size)
    top, left, bh, bw = square_box((h, w), size)
    assert (bh, bw) == (26, 64) and (top, left) == (19, 0)
    assert float(x[0, :top].abs().max()) == 0 and float(x[0, top + bh :].abs().max()) == 0  # padding stays 0
    back = restore_size((x > 0.5).float(), (h, w), pad_square=True)[0].numpy() > 0.5
    truth = img > 100
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert back.shape == (h, w) and dice > 0.9
    # Stretching (the default) is what it was.
    assert preprocess_array(img, size).shape == (1, size, size)
    assert len(preprocess_list(size)) == 3


def test_largest_component_post_processing():
    from busi_monai.inference.postprocessing import processed_mask

    m = np.zeros((40, 40), np.uint8)
    m[2:12, 2:12] = 1  # 100 px
    m[20:36, 20:36] = 1  # 256 px
    assert processed_mask(m).sum() == 356  # the paper's keeps both (the smaller is > 10% of the larger)
    assert processed_mask(m, largest_only=True).sum() == 256


def _script():
    spec = importlib.util.spec_from_file_location("gpu_full_cv", ROOT / "benchmarks" / "scripts" / "gpu_full_cv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_script_schedule_rule():
    mod = _script()
    rates = {4: 500.0, 8: 900.0, 16: 1000.0, 32: 1050.0}
    plan = mod.choose(rates, 1000.0, n_train=400, runs=5, train_s=300.0, max_epochs=300)
    assert plan["batch_size"] == 8  # the smallest within 85% of the best rate
    assert plan["epochs"] == math.floor(mod.SAFETY * 60.0 * 1000.0 / 400)
    assert mod.choose(rates, 1000.0, 400, 5, 1e6, 300)["epochs"] == 300  # never past the preset's
    assert mod.choose(rates, 1000.0, 400, 5, -5.0, 300)["epochs"] == 1


def test_gpu_script_fails_fast_on_missing_inputs(tmp_path):
    mod = _script()
    with pytest.raises(SystemExit, match="no such pack"):
        mod.main(["--pack", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o"), "--tiny"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a pack")
    with pytest.raises(SystemExit, match="not a busi-monai pack"):
        mod.main(["--pack", str(bad), "--out", str(tmp_path / "o"), "--tiny"])


def test_gpu_script_tiny_end_to_end(tmp_path):
    from busi_monai.cli import main as cli

    assert cli(["synth", "--out", str(tmp_path / "busi"), "--count", "36", "--seed", "3"]) == 0
    assert cli(["prepare", "--busi-root", str(tmp_path / "busi"), "--out", str(tmp_path / "prep"), "--test-fraction", "0.25"]) == 0
    pack = tmp_path / "p.npz"
    assert cli(["pack", "--data", str(tmp_path / "prep"), "--out", str(pack), "--image-size", "48", "--with-test-originals"]) == 0
    mod = _script()
    # The 256 px recipe refuses a 48 px pack before anything slow (no GPU needed to say so).
    with pytest.raises(SystemExit, match="48px"):
        mod.main(["--pack", str(pack), "--out", str(tmp_path / "o0")])
    out = tmp_path / "out"
    assert mod.main(["--pack", str(pack), "--out", str(out), "--tiny", "--folds", "2", "--work", str(tmp_path / "work")]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["plan"]["epochs"] == 2 and res["recipe"]["network"] == "fast+ds"
    folds = res["cv"]["folds"]
    assert len(folds) == 2 and all(math.isfinite(f["held_out_dice"]) for f in folds)
    for key in ("no_gate/processed", "gate/processed", "gate/largest_component", "no_gate/raw"):
        assert math.isfinite(res["test"][key]["lesion"]["dice"])
        assert 0 <= res["test"][key]["normal_false_positive_rate"] <= 1
    assert res["environment"]["torch"] == torch.__version__ and res["timings"]["total_s"] > 0
    per_image = json.loads((out / "test_per_image.json").read_text())
    assert len(per_image["gate/processed"]) == res["inputs"]["n_test"]
    assert not list(out.rglob("*.pt"))  # weights stay in --work
