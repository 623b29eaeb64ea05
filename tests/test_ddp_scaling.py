"""benchmarks/scripts/gpu_ddp_scaling.py in its --tiny CPU mode: 1 against 2 gloo workers through
`busi-monai train --nproc-per-node`, each run's model scored on the pack's test split."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_scripts import checked_tiny_pack, load_script  # noqa: E402


def _script():
    return load_script("gpu_ddp_scaling")


@pytest.mark.slow  # three launches of torch and MONAI (the launcher's two workers among them): about 55 s on 2 cores
def test_scaling_script_tiny_end_to_end(tmp_path):
    mod = _script()
    pack = checked_tiny_pack(mod, tmp_path)

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
