"""`busi-monai benchmark` runs end to end on the CPU and reports what BENCHMARKS.md quotes."""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(600)
def test_quick_benchmark_reports_rates_projection_and_round_trip(tmp_path):
    from busi_monai.cli import main

    out = tmp_path / "bench.json"
    assert main(["benchmark", "--quick", "--device", "cpu", "--presets", "fast", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    fast = res["presets"]["fast"]
    assert fast["image_size"] == 128  # the fast preset trains at its own size
    for key in ("plain_train_images_per_s", "fast_train_images_per_s", "plain_infer_images_per_s", "fast_infer_images_per_s"):
        assert fast[key] > 0, key
    assert fast["projected_paper_50_epochs_624_images_s"] == pytest.approx(50 * 624 / fast["fast_train_images_per_s"])
    rt = res["server_infer_round_trip_paper"]
    assert "skipped" not in rt, rt
    # The server's own account of a call is part of the client's round trip.
    assert 0 < rt["server_ms_mean"]["total"] < rt["ms_mean"]
    assert res["peak_host_memory_mb"] > 0 and res["wall_s"] > 0 and res["device"].startswith("cpu")
