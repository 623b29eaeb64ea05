"""The confidence gate chosen for the model that is served: the rule on fixed predictions (a
hand-computed answer, ties included), the fallback when the validation slice has too few
normal images, and every training run choosing its own model's gate on its validation slice."""

from __future__ import annotations

import json

import pytest
import torch

from busi_monai.data.packs import CachedData
from busi_monai.model.checkpoint import load_checkpoint
from busi_monai.training.gate import GATES, MIN_NORMALS, gate_curve, pick_gate, run_gate
from busi_monai.training.validation import image_scores

# Ten 4x4 validation images: (highest probability, lesion?, lesion Dice when outlined).
# The tops avoid the gates' values, whose float32 rounding would decide a comparison.
CASES = [
    (0.98, True, 1.0),  # L1
    (0.93, True, 1.0),  # L2
    (0.87, True, 1.0),  # L3
    (0.62, True, 2 / 3),  # L4: one of its two lesion pixels outlined
    (0.30, True, 0.0),  # L5: no outline at all
    (0.96, False, None),  # N1: a confident false outline
    (0.72, False, None),  # N2
    (0.57, False, None),  # N3
    (0.20, False, None),  # N4: empty
    (0.10, False, None),  # N5: empty
]
# Worked by hand: score = (sum of the kept lesions' Dice + the normals left empty) / 10.
#   gates 0, 0.5, 0.55: lesions 1+1+1+2/3+0, normals N4 N5 -> 5.667/10
#   0.6: N3 gated -> 6.667/10;  0.65, 0.7: L4 gated -> 6/10
#   0.75, 0.8, 0.85: N2 gated -> 7/10 (the best, three gates tie)
#   0.9: L3 gated -> 6/10;  0.95: L2 gated -> 5/10;  0.975: N1 gated -> 6/10;  0.99: L1 gated -> 5/10
EXPECTED_SCORES = {
    0.0: 17 / 30, 0.5: 17 / 30, 0.55: 17 / 30, 0.6: 20 / 30, 0.65: 0.6, 0.7: 0.6,
    0.75: 0.7, 0.8: 0.7, 0.85: 0.7, 0.9: 0.6, 0.95: 0.5, 0.975: 0.6, 0.99: 0.5,
}  # fmt: skip


def _predictions(cases=CASES):
    prob = torch.zeros(len(cases), 1, 4, 4)
    labels = torch.zeros(len(cases), 1, 4, 4)
    for i, (top, lesion, dice) in enumerate(cases):
        prob[i, 0, 0, 0] = top
        if lesion:
            labels[i, 0, 0, 0] = 1
            if dice == 2 / 3:  # a two-pixel lesion, one pixel outlined
                labels[i, 0, 0, 1] = 1
            elif dice == 0.0:  # the lesion is elsewhere than the (sub-threshold) peak
                labels[i, 0, 0, 0], labels[i, 0, 3, 3] = 0, 1
    return prob, labels


def test_the_rule_on_fixed_predictions_gives_the_hand_computed_answer():
    prob, labels = _predictions()
    curve = gate_curve(image_scores(prob, labels, 0.5))
    assert [c["gate"] for c in curve] == list(GATES)
    assert {c["gate"]: c["score"] for c in curve} == pytest.approx(EXPECTED_SCORES)
    at = {c["gate"]: c for c in curve}
    assert at[0.75]["lesion_dice"] == pytest.approx(3 / 5) and at[0.75]["normal_fp"] == pytest.approx(1 / 5)
    assert at[0.75]["lesions_missed"] == 2 and at[0.0]["lesions_missed"] == 1
    # 0.75, 0.8 and 0.85 tie at 0.7: the lowest wins.
    result = run_gate(prob, labels, 0.5, default=0.8)
    assert result["confidence_gate"] == 0.75 and result["rule_choice"] == 0.75
    assert result["gate_source"] == "validation"
    assert (result["n_normal"], result["n_lesion"], result["n_images"]) == (5, 5, 10)


def test_a_tie_goes_to_the_lowest_gate_whatever_the_order():
    curve = [
        {"gate": 0.9, "score": 0.7},
        {"gate": 0.6, "score": 0.7 - 1e-12},  # float noise: equal
        {"gate": 0.8, "score": 0.7},
        {"gate": 0.5, "score": 0.7 - 1e-6},  # really lower
    ]
    assert pick_gate(curve) == 0.6
    assert pick_gate(curve[::-1]) == 0.6
    with pytest.raises(ValueError, match="no gate curve"):
        pick_gate([])


def test_too_few_normals_keep_the_default_and_say_so():
    prob, labels = _predictions([c for c in CASES if c[1]] + [c for c in CASES if not c[1]][: MIN_NORMALS - 1])
    result = run_gate(prob, labels, 0.5, default=0.8)
    assert result["confidence_gate"] == 0.8
    assert result["gate_source"] == f"fallback: {MIN_NORMALS - 1} normal images in the validation slice (< {MIN_NORMALS})"
    # The curve is still recorded; the rule alone would have taken another gate.
    assert result["curve"] and result["rule_choice"] != 0.8
    # Too few lesion images: the same, for the other reason.
    prob, labels = _predictions([c for c in CASES if not c[1]] + [CASES[0]])
    assert run_gate(prob, labels, 0.5, default=0.8)["gate_source"].startswith("fallback: 1 lesion images")
    # No validation image at all.
    empty = run_gate(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), 0.5, default=0.7)
    assert empty["confidence_gate"] == 0.7 and empty["curve"] == [] and empty["rule_choice"] is None
    with pytest.raises(ValueError, match="differ in shape"):
        run_gate(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4), 0.5, default=0.8)


def _blobs(n_lesion: int, n_normal: int, size: int = 32, seed: int = 0) -> CachedData:
    """Noise images; the lesion ones with a dark disc, labelled."""
    g = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.1 * torch.randn(n_lesion + n_normal, 1, size, size, generator=g)
    labels = torch.zeros_like(images)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n_lesion):
        cy, cx = (int(v) for v in torch.randint(8, size - 8, (2,), generator=g))
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= 25
        images[i, 0][disc] -= 0.35
        labels[i, 0][disc] = 1
    items = [{"id": f"{'lesion' if i < n_lesion else 'normal'}{i}", "class": "benign" if i < n_lesion else "normal"} for i in range(len(images))]
    return CachedData(images.clamp(0, 1), labels, items)


def _fit(out, val, gate: float):
    from busi_monai.training.loop import fit
    from busi_monai.training.recipes import get_recipe

    recipe = get_recipe("fast").with_overrides(epochs=6, image_size=32, loss="dice_bce", learning_rate=3e-3, confidence_gate=gate)
    return fit(_blobs(24, 8, seed=1), val, out, "fast", recipe, device="cpu", progress=False, amp=False)


def test_train_chooses_its_own_gate_on_its_validation_slice(tmp_path):
    from busi_monai.model.checkpoint import model_from_checkpoint
    from busi_monai.training.validation import predict_cached

    val = _blobs(6, 6, seed=2)
    summary = _fit(tmp_path, val, gate=0.8)
    assert summary["gate_source"] == "validation"
    record = json.loads((tmp_path / "gate.json").read_text())
    assert (tmp_path / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The rule, recomputed here from the saved best weights on the same slice, gave that gate.
    best = load_checkpoint(tmp_path / "model.pt")
    prob = predict_cached(model_from_checkpoint(best, "cpu", confidence_gate=0), val.images)
    expected = run_gate(prob, val.labels, 0.5, default=0.8)
    assert summary["confidence_gate"] == record["confidence_gate"] == expected["confidence_gate"]
    assert [c["score"] for c in record["curve"]] == pytest.approx([c["score"] for c in expected["curve"]])
    # The served checkpoint applies it, last.pt agrees, and summary.json says where it came from.
    assert best["network"]["confidence_gate"] == summary["confidence_gate"] and best["gate_source"] == "validation"
    assert load_checkpoint(tmp_path / "last.pt")["network"]["confidence_gate"] == summary["confidence_gate"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert (on_disk["confidence_gate"], on_disk["gate_source"]) == (summary["confidence_gate"], "validation")


def test_train_with_too_few_normals_keeps_the_recipe_gate(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="busi_monai.training.gate"):
        summary = _fit(tmp_path, _blobs(6, 3, seed=2), gate=0.8)
    reason = f"fallback: 3 normal images in the validation slice (< {MIN_NORMALS})"
    assert (summary["confidence_gate"], summary["gate_source"]) == (0.8, reason)
    assert reason in caplog.text
    assert load_checkpoint(tmp_path / "model.pt")["network"]["confidence_gate"] == 0.8
    assert json.loads((tmp_path / "gate.json").read_text())["gate_source"] == reason


def test_a_recipe_without_a_gate_keeps_it_off(tmp_path):
    summary = _fit(tmp_path, _blobs(6, 6, seed=2), gate=0.0)
    assert summary["confidence_gate"] == 0.0 and summary["gate_source"].startswith("off")
    assert load_checkpoint(tmp_path / "model.pt")["network"]["confidence_gate"] == 0.0
    assert not (tmp_path / "gate.json").exists()
