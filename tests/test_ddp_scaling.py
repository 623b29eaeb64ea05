"""benchmarks/scripts/gpu_ddp_scaling.py in its --tiny CPU mode: 1 against 2 gloo workers through
`busi-monai train --nproc-per-node`, each run's model scored on the pack's test split."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_ddp_scaling", ROOT / "benchmarks" / "scripts" / "gpu_ddp_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # three launches of torch and MONAI (the launcher's two workers among them): about 55 s on 2 cores
def test_scaling_script_tiny_end_to_end(tmp_path):
    from busi_monai.cli import main as cli

    mod = _script()
    with pytest.raises(SystemExit, match="no such pack"):
        mod.main(["--pack", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o"), "--tiny"])
    assert cli(["synth", "--out", str(tmp_path / "busi"), "--count", "24", "--seed", "5"]) == 0
    assert cli(["prepare", "--busi-root", str(tmp_path / "busi"), "--out", str(tmp_path / "prep"), "--test-fraction", "0.25"]) == 0
    pack = tmp_path / "p.npz"
    assert cli(["pack", "--data", str(tmp_path / "prep"), "--out", str(pack), "--image-size", "32"]) == 0
    with pytest.raises(SystemExit, match="32px"):  # the paper's 256 px, refused before anything slow
        mod.main(["--pack", str(pack), "--out", str(tmp_path / "o")])

    out = tmp_path / "out"
    assert mod.main(["--pack", str(pack), "--out", str(out), "--tiny"]) == 0
    res = json.loads((out / "result.json").read_text())
    one, two = res["configs"]
    assert (one["workers"], one["world_size"], two["workers"], two["world_size"]) == (1, 1, 2, 2)
    assert (one["global_batch"], two["global_batch"]) == (4, 8) and two["learning_rate"] == pytest.approx(2 * one["learning_rate"])
    for c in (one, two):
        assert c["epochs"] == 2 and len(c["loss_per_epoch"]) == 2 and c["process_wall_s"] > c["train_loop_s"] > 0
        assert c["time_to_50_epochs_s"] == pytest.approx(25 * c["train_loop_s"]) and c["images_per_s"] > 0
        assert math.isfinite(c["test_dice"])  # both runs wrote a model that loads and infers
    assert res["speedup"] > 0 and math.isfinite(res["test_dice_difference"])
