"""The busi-monai command line as a user runs it: real files in, masks with their geometry out."""

import json
import subprocess
import sys
from pathlib import Path

import itk
import numpy as np

from busi_monai.data.io import read_image, read_masks_union

sys.path.insert(0, str(Path(__file__).resolve().parent))

from masks import assert_masks_agree, assert_outlines  # noqa: E402

# Lesion Dice asked of one image the session's model has learned (0.7-0.9 where measured, bf16
# and fp32 training): far above an empty, full or untrained model's mask (under 0.15).
MIN_DICE = 0.4


def run_cli(*args, check=True):
    exe = Path(sys.executable).with_name("busi-monai")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "busi_monai.cli"]
    p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_infer_png_nifti_nrrd_keep_size_and_geometry(trained_model, sample_dir, tmp_path):
    png = sorted((sample_dir / "benign").glob("* (*).png"))[0]
    img = read_image(png)
    vol = itk.image_from_array(img.array[None].astype(np.float32))
    vol.SetSpacing([0.08, 0.08, 1.0])
    vol.SetOrigin([10.0, 20.0, 0.0])
    itk.imwrite(vol, str(tmp_path / "scan.nii.gz"))
    itk.imwrite(vol, str(tmp_path / "scan2.nrrd"))
    out = tmp_path / "out"
    run_cli("infer", "--model", trained_model, "--out", out, "--device", "cpu", png, tmp_path / "scan.nii.gz", tmp_path / "scan2.nrrd")
    mask_png = read_image(out / f"{png.stem}_mask.png")
    assert mask_png.shape == img.shape
    # It outlines the lesion, as the model does in this process.
    from busi_monai.inference.predictor import Predictor

    truth = read_masks_union(sorted(png.parent.glob(f"{png.stem}_mask*.png")))
    assert_outlines(mask_png.array, truth, MIN_DICE, what=png.name)
    local = Predictor(trained_model, device="cpu").predict([img])[0]
    assert_masks_agree(mask_png.array, local.mask, local.probability, what=f"{png.name}: CLI and Predictor")
    # The same image gives the same mask whatever its container.
    for name in ("scan_mask.nii.gz", "scan2_mask.nrrd"):
        m = itk.imread(str(out / name))
        assert np.allclose(m.GetSpacing(), vol.GetSpacing()) and np.allclose(m.GetOrigin(), vol.GetOrigin())
        arr = itk.array_from_image(m)
        assert arr.shape == (1, *img.shape) and set(np.unique(arr).tolist()) == {0, 1}, name
        assert_masks_agree(arr, mask_png.array, local.probability, what=f"{name} and the PNG's mask")


def test_errors_are_messages_not_tracebacks(trained_model, tmp_path, capsys):
    """One real process (what a user sees: exit code 2, no traceback), the rest in-process
    through the same entry point (each interpreter start costs seconds)."""
    from busi_monai.cli import main

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    p = run_cli("infer", "--model", trained_model, "--out", tmp_path, tmp_path / "broken.png", check=False)
    assert p.returncode == 2 and "broken.png" in p.stderr and "Traceback" not in p.stderr
    for args, words in (
        (["infer", "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path), str(tmp_path / "broken.png")], "nope.pt"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")], "dataset.json"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_train_precision_is_chosen_on_the_command_line(prepared_sample, tmp_path, capsys):
    """bf16 or fp32 is a run setting (recorded in the summary), whatever the CPU does natively."""
    from busi_monai.cli import main

    for precision, bf16 in (("fp32", False), ("bf16", True)):
        out = tmp_path / precision
        args = ["train", "--data", str(prepared_sample), "--out", str(out), "--preset", "fast", "--epochs", "1", "--image-size", "32", "--device", "cpu"]
        assert main([*args, "--precision", precision]) == 0
        capsys.readouterr()
        assert json.loads((out / "summary.json").read_text())["amp_bf16"] is bf16
