"""`busi-monai cv`: grouped folds, folds trained side by side, the confidence gate chosen on
held-out folds and the folds served as one ensemble."""

import json
import os
from collections import Counter

import pytest

from busi_monai.data.datasets import load_datalist
from busi_monai.data.splits import grouped_stratified_folds
from busi_monai.model.checkpoint import load_checkpoint
from busi_monai.training.crossval import GATES


def test_folds_keep_groups_whole_and_spread_classes(prepared_sample):
    items, seen = [], Counter()
    for it in load_datalist(prepared_sample)["training"]:  # pairs of "near-duplicates" within a class
        items.append(dict(it, group=f"{it['class']}{seen[it['class']] // 2}"))
        seen[it["class"]] += 1
    folds = grouped_stratified_folds(items, 3, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(items)))
    fold_of = {i: k for k, f in enumerate(folds) for i in f}
    for group in {it["group"] for it in items}:
        assert len({fold_of[i] for i, it in enumerate(items) if it["group"] == group}) == 1, f"{group} straddles folds"
    for cls in {it["class"] for it in items}:
        counts = [sum(items[i]["class"] == cls for i in f) for f in folds]
        assert max(counts) - min(counts) <= 2, (cls, counts)


@pytest.mark.slow  # four interpreters that each import torch and MONAI
def test_folds_are_the_same_in_every_process(prepared_sample):
    """Fold processes and a later --skip-training recompute the folds: they must agree, whatever
    Python's string hashing (a set's order once decided the class of a mixed-class group)."""
    import subprocess
    import sys

    code = (
        "import json, sys; from busi_monai.data.splits import grouped_stratified_folds as f; "
        "from busi_monai.data.datasets import load_datalist as l; "
        "items = [dict(it, group='g%d' % (i // 2)) for i, it in enumerate(l(sys.argv[1])['training'])]; "
        "print(json.dumps(f(items, 3, 0)))"
    )
    runs = set()
    for hash_seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        runs.add(subprocess.run([sys.executable, "-c", code, str(prepared_sample)], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(runs) == 1, "the folds depend on the process"


def test_cv_side_by_side_chooses_a_gate_and_serves_the_ensemble(prepared_sample, tmp_path):
    from busi_monai.cli import main

    out = tmp_path / "cv"
    args = ["cv", "--data", str(prepared_sample), "--preset", "fast", "--folds", "2", "--epochs", "2", "--image-size", "32"]
    args += ["--device", "cpu", "--jobs", "2", "--out", str(out), "--set", "loss=dice_bce", "--precision", "fp32"]
    assert main(args) == 0
    cv = json.loads((out / "cv.json").read_text())
    assert [f["fold"] for f in cv["folds"]] == [0, 1]
    n_train = len(load_datalist(prepared_sample)["training"])
    assert sum(f["n_held_out"] for f in cv["folds"]) == n_train
    # Each fold ran in its own process and logged there.
    assert all((out / f"fold{f}" / "train.log").is_file() for f in (0, 1))
    # --precision reaches each fold's process (fp32 even where the CPU has bf16).
    assert [json.loads((out / f"fold{f}" / "summary.json").read_text())["amp_bf16"] for f in (0, 1)] == [False, False]

    gate = json.loads((out / "gate.json").read_text())
    assert (out / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = gate["curve"]
    assert gate["n_images"] == n_train and [c["gate"] for c in curve] == list(GATES)
    # Gate 0 keeps every outline: only the lesions the segmentation itself missed are missed.
    assert curve[0]["lesions_missed"] == min(c["lesions_missed"] for c in curve)
    assert all(a["lesions_missed"] <= b["lesions_missed"] and a["normal_fp"] >= b["normal_fp"] for a, b in zip(curve, curve[1:]))
    assert next(c for c in curve if c["gate"] == gate["chosen"])["score"] == max(c["score"] for c in curve)
    for f in (0, 1):
        assert load_checkpoint(out / f"fold{f}" / "model.pt")["network"]["confidence_gate"] == gate["chosen"]
    assert cv["gate"]["chosen"] == gate["chosen"]

    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(out), "--data", str(prepared_sample), "--out", str(metrics), "--device", "cpu"]) == 0
    assert json.loads(metrics.read_text())["model"] == ["model.pt", "model.pt"]

    # --skip-training summarises what is there again, without training.
    mtime = (out / "fold0" / "history.json").stat().st_mtime
    assert main([*args, "--skip-training"]) == 0
    assert (out / "fold0" / "history.json").stat().st_mtime == mtime


def test_cv_spreads_its_folds_over_the_visible_gpus(monkeypatch, tmp_path):
    """With two GPUs visible, --jobs 1 trains two folds at once, one on each GPU (each fold's
    process sees its GPU alone); --jobs 2 puts two on each; the CPU and a named GPU get none."""
    import subprocess

    import torch

    from busi_monai.device import visible_gpus
    from busi_monai.training import crossval

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus("auto") == visible_gpus("cuda") == ["3", "5"]
    assert visible_gpus("cpu") == visible_gpus("cuda:1") == []
    assert crossval.fold_slots(["3", "5"], 2) == ["3", "5", "3", "5"] and crossval.fold_slots([], 2) == [None, None]

    started = []

    class Fold:  # a fold process that has finished by the time it is polled
        def __init__(self, cmd, env, **kw):
            started.append((cmd[cmd.index("--only-folds") + 1], env.get("CUDA_VISIBLE_DEVICES")))
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Fold)
    crossval.cross_validate("unused", tmp_path, "fast", folds=2, device="auto", jobs=1, progress=False)
    assert started == [("0", "3"), ("1", "5")]
