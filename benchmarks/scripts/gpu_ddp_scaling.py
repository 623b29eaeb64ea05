"""Data-parallel scaling: the paper recipe on one GPU against every GPU of the machine.

Each configuration is one ``busi-monai train --nproc-per-node N`` (torchrun's launcher,
DistributedDataParallel over N GPUs) on the pack's training images, timed, and its model
scored on the pack's test split at network size:

- ``images_per_s``: training images per second of the training loop (rank 0's ``train_time_s``,
  validation and checkpoints included, process start and data loading not);
- ``time_to_50_epochs_s``: that loop time scaled to 50 epochs (the paper's schedule);
- ``test_dice``: held-out lesion Dice, to show the larger global batch learns as well.

The scaling rule measured: each GPU keeps the recipe's batch (``--per-gpu-batch``, default 4),
so the global batch is N times it, and the learning rate grows with it (linear rule, Goyal et
al. 2017; docs/multi-gpu.md). A machine with one GPU measures only the first configuration.
The command for the GPU machine (the ``run`` tool; carry ``.gpu/busi256.npz`` and ``.whl``;
not timed on a GPU yet: 10 epochs are a fifth of the paper's schedule, which took 61-97 s on
an H200 compiled, so leave room for eager start-up per configuration):

    python3 -c "import monai" 2>/dev/null || python3 -m pip install -q --no-deps .whl/monai-*.whl; python3 benchmarks/scripts/gpu_ddp_scaling.py --pack .gpu/busi256.npz --out "$OUT/ddp_scaling" --epochs 10

Writes --out/result.json (environment, per configuration: workers, global batch, learning rate,
loop time, images/s, time to 50 epochs, test Dice, per-epoch losses; and the speed-up).
``--tiny`` runs the same on the CPU in seconds: 1 against 2 gloo workers, the fast network at
the pack's own size, 2 epochs (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The sibling script's input checks and environment record.
from gpu_full_cv import InputError, check_pack, environment, gpu_device, require_monai

TIMEOUT_S = 420  # per configuration


def held_out_dice(run: Path, pack: str, device: str) -> dict:
    import torch

    from busi_monai.data.packs import load_pack
    from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint
    from busi_monai.training.validation import predict_cached, quick_scores

    data = load_pack(pack)
    test = data.subset([i for i, it in enumerate(data.items) if it.get("split") == "test"])
    dev = torch.device(device)
    model = model_from_checkpoint(load_checkpoint(run / "model.pt"), dev)
    test = test.to(dev)
    return quick_scores(predict_cached(model, test.images, amp=dev.type == "cuda"), test.labels, 0.5)


def one_config(workers: int, a, work: Path, device: str, size: int) -> dict:
    """``busi-monai train`` over ``workers`` processes; its timings and held-out scores."""
    from busi_monai.training.recipes import get_recipe

    preset = "fast" if a.tiny else a.preset
    recipe = get_recipe(preset)
    batch = a.per_gpu_batch * workers
    lr = recipe.learning_rate * batch / recipe.batch_size  # the linear rule
    run = work / f"workers{workers}"
    cmd = [
        sys.executable, "-m", "busi_monai.cli", "train", "--data", a.pack, "--out", str(run), "--preset", preset, "--image-size", str(size),
        "--epochs", str(a.epochs), "--batch-size", str(batch), "--learning-rate", str(lr), "--device", device,
        "--seed", str(a.seed), "--nproc-per-node", str(workers),
    ]  # fmt: skip
    if a.tiny:
        cmd += ["--precision", "fp32"]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"workers": workers, "error": f"not done within {TIMEOUT_S} s"}
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"workers": workers, "error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "history.json").read_text())
    loop_s = float(summary["train_time_s"])
    scores = held_out_dice(run, a.pack, "cpu" if device == "cpu" else "cuda")
    return {
        "workers": workers, "world_size": summary["world_size"], "global_batch": batch, "learning_rate": lr,
        "epochs": a.epochs, "n_train": summary["n_train"], "process_wall_s": wall, "train_loop_s": loop_s,
        "images_per_s": summary["n_train"] * a.epochs / loop_s, "time_to_50_epochs_s": loop_s * 50 / a.epochs,
        "loss_per_epoch": [h["loss"] for h in history], "best_val_score": summary["best_val_score"],
        "test_dice": scores["val_dice"], "test_normal_fp": scores["val_normal_fp"],
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", required=True, help="busi-monai pack .npz (256 px; with a test split)")
    ap.add_argument("--out", required=True, help="folder for result.json")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per configuration (time to 50 is scaled from them)")
    ap.add_argument("--per-gpu-batch", type=int, default=4, help="each worker's share of the global batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU check: 1 against 2 gloo workers, the fast network, 2 epochs")
    a = ap.parse_args(argv)

    require_monai()
    import torch

    from busi_monai.jsonio import write_json

    if a.tiny:
        a.epochs = 2
    info = check_pack(Path(a.pack), None if a.tiny else 256, False, 1, need_test=False)
    if not info["n_test"]:
        raise InputError(f"{a.pack}: no test split to score on")
    dev = gpu_device(a.device, a.tiny)
    device = "cpu" if dev.type == "cpu" else "cuda"
    most = 2 if dev.type == "cpu" else torch.cuda.device_count()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"script": "benchmarks/scripts/gpu_ddp_scaling.py", "argv": sys.argv[1:] if argv is None else list(argv), "tiny": a.tiny}
    result["environment"], result["pack"], result["configs"] = environment(dev), info, []
    result["environment"]["gpus"] = torch.cuda.device_count() if dev.type == "cuda" else 0
    with tempfile.TemporaryDirectory(prefix="busi-ddp-scaling-") as work:
        for workers in sorted({1, most}):
            rec = one_config(workers, a, Path(work), device, info["size"])
            result["configs"].append(rec)
            write_json(result, out / "result.json")  # after each: a timeout later keeps what ran
            print(f"{workers} worker(s): " + (rec["error"] if "error" in rec else f"{rec['images_per_s']:.1f} images/s, test Dice {rec['test_dice']:.3f}"), flush=True)
    ok = [c for c in result["configs"] if "error" not in c]
    if len(ok) == 2:
        result["speedup"] = ok[1]["images_per_s"] / ok[0]["images_per_s"]
        result["test_dice_difference"] = ok[1]["test_dice"] - ok[0]["test_dice"] if None not in (ok[0]["test_dice"], ok[1]["test_dice"]) else None
    write_json(result, out / "result.json")
    return 0 if len(ok) == len(result["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
