"""What the tests of the prepared GPU scripts (benchmarks/scripts/gpu_*.py) share: loading a
script as a module, and a tiny synthetic pack after checking that the script refuses a missing
pack and the wrong size before anything slow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``benchmarks/scripts/NAME.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def checked_tiny_pack(mod, tmp_path: Path) -> Path:
    """A 32 px pack of 24 synthetic images (a quarter for the test split), once ``mod.main``
    has refused a missing pack and, without --tiny, a pack below the paper's 256 px."""
    from busi_monai.cli import main as cli

    with pytest.raises(SystemExit, match="no such pack"):
        mod.main(["--pack", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o"), "--tiny"])
    assert cli(["synth", "--out", str(tmp_path / "busi"), "--count", "24", "--seed", "5"]) == 0
    assert cli(["prepare", "--busi-root", str(tmp_path / "busi"), "--out", str(tmp_path / "prep"), "--test-fraction", "0.25"]) == 0
    pack = tmp_path / "p.npz"
    assert cli(["pack", "--data", str(tmp_path / "prep"), "--out", str(pack), "--image-size", "32"]) == 0
    with pytest.raises(SystemExit, match="32px"):  # the paper's 256 px, refused before anything slow
        mod.main(["--pack", str(pack), "--out", str(tmp_path / "o")])
    return pack
