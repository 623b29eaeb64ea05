"""benchmarks/scripts/gpu_app_check.py: its input checks, and its --tiny mode end to end on the
CPU (a pack of a few synthetic images, 2 epochs, 2 infers, each strategy once)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from busi_monai.jsonio import loads_strict

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scripts" / "gpu_app_check.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _run(*args, timeout=30):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.parametrize("missing", ["wheelhouse", "pack", "port"])
def test_inputs_are_checked_first_with_one_line(tmp_path, missing):
    wheelhouse, pack = tmp_path / "wheelhouse", tmp_path / "p.npz"
    if missing != "wheelhouse":
        wheelhouse.mkdir()
        (wheelhouse / "monailabel-0.8.5-py3-none-any.whl").write_bytes(b"")
    if missing != "pack":
        import numpy as np

        np.savez(pack, size=1)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1] if missing == "port" else 0
        # _run's timeout bounds it: the inputs are checked before anything slow starts.
        r = _run("--wheelhouse", wheelhouse, "--pack", pack, "--out", tmp_path / "o.json", "--port", port)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], r.stderr
    assert not (tmp_path / "o.json").exists()


def _cli(*args):
    subprocess.run([sys.executable, "-m", "busi_monai.cli", *map(str, args)], check=True, env=ENV, capture_output=True, timeout=120)


# About 75 s on the 2-core machine (three CLI runs to make the pack, a server, a training):
# above the suite's per-test budget, so slow.
@pytest.mark.slow
def test_tiny_mode_end_to_end(tmp_path):
    pytest.importorskip("monailabel")
    _cli("synth", "--out", tmp_path / "synth", "--count", 6, "--seed", 3)
    _cli("prepare", "--busi-root", tmp_path / "synth", "--out", tmp_path / "prepared")
    _cli("pack", "--data", tmp_path / "prepared", "--out", tmp_path / "tiny.npz", "--image-size", 64)
    out = tmp_path / "check.json"
    r = _run("--tiny", "--python", sys.executable, "--pack", tmp_path / "tiny.npz", "--out", out, "--port", 0,
             "--work", tmp_path / "work", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = loads_strict(out.read_text())
    assert res["mode"] == "tiny" and res["device"] == "cpu"
    inf = res["infer"]
    assert inf["n"] == 2 and all(math.isfinite(inf[k]) and inf[k] > 0 for k in ("mean_ms", "min_ms", "max_ms"))
    tr = res["train"]
    assert tr["model_version"] and tr["epochs"] == 2 and 0 < tr["request_to_served_s"] < 300
    assert inf["model_version"] == tr["model_version"]  # /infer used the model Train published
    ns = res["next_sample"]
    assert set(ns) == {"typiclust", "mc_dropout_diverse", "mc_dropout", "random"}
    pool = {f"pool_{j:04d}" for j in range(res["studies"]["unlabelled"])}
    assert all(v["id"] in pool and math.isfinite(v["ms"]) and v["ms"] > 0 for v in ns.values()), ns
    assert "[" in r.stdout and "Train" in r.stdout  # progress lines
