"""`make wheelhouse` + `make install WHEELHOUSE=DIR`: the app installs with no network into a
fresh venv made from a stand-in for the GPU machine's Python (tests/gpu_base.py: torch, numpy,
scipy... linked from this interpreter, no MONAI, ITK or monailabel), then its real server
answers /info and runs Train, /infer and Next Sample (gpu_app_check.py --tiny).

Needs the registry to build the wheelhouse (about 200 MB), hence slow; set BUSI_WHEELHOUSE to a
built one to reuse it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from busi_monai.jsonio import loads_strict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_base import make_gpu_like_python  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.slow
def test_offline_install_from_the_wheelhouse_serves_the_app(tmp_path):
    wheelhouse = Path(os.environ.get("BUSI_WHEELHOUSE") or tmp_path / "wheelhouse")
    if not list(wheelhouse.glob("monailabel-*.whl")):
        subprocess.run(["make", "-C", str(REPO), "wheelhouse", f"WHEELHOUSE_OUT={wheelhouse}", f"PYVER={PYVER}",
                        f"PYTHON={sys.executable}"], check=True, capture_output=True, timeout=900)  # fmt: skip
    base = make_gpu_like_python(tmp_path / "gpu")
    r = subprocess.run([str(base), "-c", "import monailabel"], capture_output=True)
    assert r.returncode != 0, "the stand-in must not see monailabel"
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-index is in the Makefile's recipe; a dead proxy makes any attempt to reach an index fail too.
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull)
    r = subprocess.run(["make", "-C", str(REPO), "install", f"WHEELHOUSE={wheelhouse}", f"VENV={venv}", f"PYTHON={base}"],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    py = venv / "bin" / "python"
    code = "import monailabel, torch, sys; sys.path.insert(0, sys.argv[1]); from busi_monai.data.io import itk_backend; print(monailabel.__file__, torch.__file__, itk_backend())"
    where = subprocess.run([str(py), "-c", code, str(REPO)], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert str(venv) in where[0] and str(tmp_path / "gpu") in where[1]  # app from the wheelhouse, torch the machine's
    # NIfTI/NRRD through ITK, or through SimpleITK where the wheelhouse was made with ITK=0.
    assert where[2] == ("itk" if list(wheelhouse.glob("itk_core-*.whl")) else "SimpleITK")

    pack = tmp_path / "tiny.npz"
    cli_env = {**env, "PYTHONPATH": str(REPO)}
    for args in (["synth", "--out", tmp_path / "synth", "--count", 6, "--seed", 3],
                 ["prepare", "--busi-root", tmp_path / "synth", "--out", tmp_path / "prepared"],
                 ["pack", "--data", tmp_path / "prepared", "--out", pack, "--image-size", 64]):  # fmt: skip
        subprocess.run([str(py), "-m", "busi_monai.cli", *map(str, args)], check=True, capture_output=True, env=cli_env, timeout=120)
    out = tmp_path / "check.json"
    r = subprocess.run([str(py), str(REPO / "benchmarks/scripts/gpu_app_check.py"), "--tiny", "--python", str(py), "--pack", str(pack),
                        "--out", str(out), "--port", "0", "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, env=cli_env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = loads_strict(out.read_text())
    assert res["server_start_s"] > 0 and res["device"] == "cpu" and res["train"]["model_version"]
    assert set(res["next_sample"]) == {"typiclust", "mc_dropout_diverse", "mc_dropout", "random"}
