"""What a server refuses or chooses before it starts: the app's ``--conf`` options
(``AppSettings.from_conf``) and ``python -m busi_monai.serve``'s own flags, in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from busi_monai.serve import APP_DIR, main

pytest.importorskip("monailabel")


@pytest.fixture(scope="module")
def settings_cls():
    """The app's AppSettings, imported once (the app's ``lib`` package, as the server imports it)."""
    saved = {m: sys.modules.pop(m) for m in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]}
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.configs.attention_unet import AppSettings

        yield AppSettings
    finally:
        sys.path.remove(str(APP_DIR))
        for m in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[m]
        sys.modules.update(saved)


@pytest.mark.parametrize(
    ("conf", "why"),
    [
        ({"preset": "nope"}, "--conf preset 'nope': choose one of"),
        ({"mc_passes": "1"}, "at least 2 Monte Carlo passes"),
        ({"epochs": "ten"}, "--conf epochs 'ten': expected an integer"),
        ({"max_image_pixels": "10"}, "must be at least 64"),
        ({"clicks": "maybe"}, "clicks"),
    ],
)
def test_bad_app_options_are_refused_with_the_option_named(settings_cls, tmp_path, conf, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace("'", "'")):
        settings_cls.from_conf({"model_dir": str(tmp_path), **conf}, str(APP_DIR))


def test_a_bundle_that_is_not_a_directory_is_refused(settings_cls, tmp_path):
    (tmp_path / "bundle.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="not a directory"):
        settings_cls.from_conf({"bundle": str(tmp_path / "bundle.zip")}, str(APP_DIR))


def test_cuda_asked_for_without_a_gpu_falls_back_to_the_cpu(settings_cls, tmp_path, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = settings_cls.from_conf({"device": "cuda", "model_dir": str(tmp_path)}, str(APP_DIR))
    assert s.device == "cpu" and "no CUDA GPU is available" in caplog.text
    good = settings_cls.from_conf({"preset": "fast", "epochs": "3", "image_size": "64", "model_dir": str(tmp_path)}, str(APP_DIR))
    assert (good.recipe.epochs, good.recipe.image_size, good.mc_passes) == (3, 64, 8)


def _dry_run(capsys, *args) -> tuple[int, str, str]:
    rc = main([*args, "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_serve_dry_run_prints_the_server_command_and_chooses_the_preset_by_the_hardware(tmp_path, capsys, monkeypatch):
    import torch

    (tmp_path / "studies").mkdir()
    base = ["--studies", str(tmp_path / "studies"), "--no-warmup", "--model-dir", str(tmp_path / "model")]
    for gpu, preset in ((False, "fast"), (True, "paper")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        rc, out, _ = _dry_run(capsys, *base)
        line = next(ln for ln in out.splitlines() if "start_server" in ln)
        assert rc == 0 and f"--conf preset {preset}" in line and "--host 127.0.0.1" in line
    assert not (tmp_path / "model" / "attention_unet.pt").exists(), "--no-warmup trains nothing"


def test_serve_refuses_a_missing_source_and_warns_before_binding_a_network_address(tmp_path, capsys):
    rc, _, err = _dry_run(capsys, "--studies", str(tmp_path / "new"), "--busi-root", str(tmp_path / "nowhere"))
    assert rc == 2 and "no such folder to build the studies from" in err and not (tmp_path / "new").exists()
    (tmp_path / "studies").mkdir()
    rc, _, err = _dry_run(capsys, "--studies", str(tmp_path / "studies"), "--no-warmup", "--host", "0.0.0.0", "--model-dir", str(tmp_path / "m"))
    assert rc == 0 and "WARNING: binding 0.0.0.0 exposes the server" in err
    rc, _, err = _dry_run(capsys, "--studies", str(tmp_path / "studies"), "--no-warmup", "--model-dir", str(tmp_path / "m"))
    assert rc == 0 and "WARNING" not in err
    assert Path(tmp_path / "studies").is_dir()
