"""The paper recipe on a new machine (#20): 50 epochs over 624 images at 256 px, nothing cached.

Three ways, each in a new Python process with empty inductor and Triton caches, timed from the
process start (imports included) to the model written:

- ``eager``: bf16 autocast, channels-last, no compilation;
- ``compile``: ``busi-monai train --compile`` (torch.compile, CUDA graphs through inductor);
- ``cuda_graphs``: ``busi-monai train --cuda-graphs`` (the eager step replayed as one CUDA
  graph, no compilation: busi_monai/training/graphs.py).

Each trains the pack's training images (repeated to 624 a epoch, as ``busi-monai benchmark
--end-to-end`` does) and is scored on the pack's test split at network size, so a faster way that
learns worse shows. The command for the GPU machine (the `run` tool; repo root of a checkout
copy, `.gpu/busi256.npz` carried; about 5 minutes):

    python3 -c "import monai" 2>/dev/null || python3 -m pip install -q --no-deps .whl/monai-*.whl; python3 benchmarks/scripts/gpu_fresh_train.py --pack .gpu/busi256.npz --out "$OUT/fresh_train"

Writes --out/result.json (environment, per way: wall time, training-loop time, per-epoch losses,
test Dice). ``--tiny`` runs the same on the CPU in seconds (the fast network at the pack's own
size, 2 epochs, 64 images a epoch; the test suite does).
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

WAYS = {"eager": {}, "compile": {"compile_model": True}, "cuda_graphs": {"cuda_graphs": True}}
TIMEOUT_S = 240  # per way; the paper recipe took 61-97 s on an H200 with torch.compile


def one_way(way: str, pack: str, out: Path, tiny: bool, device: str) -> dict:
    """In the child process: train one way and score it on the test split."""
    t_start = time.perf_counter()
    import torch

    from busi_monai.benchmark import PAPER_IMAGES, end_to_end_fit
    from busi_monai.data.packs import load_pack
    from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint
    from busi_monai.training.validation import predict_cached, quick_scores

    data = load_pack(pack)
    train = data.subset([i for i, it in enumerate(data.items) if it.get("split", "training") == "training"])
    test = data.subset([i for i, it in enumerate(data.items) if it.get("split") == "test"])
    size = int(train.images.shape[-1])
    preset, kw = ("fast", {"epochs": 2, "images": 64}) if tiny else ("paper", {"images": PAPER_IMAGES})
    t_fit = time.perf_counter()
    rec = end_to_end_fit(preset, train, size, device, out=out, **kw, **WAYS[way])
    dev = torch.device(device)
    model = model_from_checkpoint(load_checkpoint(out / "model.pt"), dev)
    test = test.to(dev)
    scores = quick_scores(predict_cached(model, test.images, amp=dev.type == "cuda"), test.labels, 0.5)
    history = json.loads((out / "history.json").read_text())
    return {
        **rec, "way": way, "preset": preset, "image_size": size, "imports_and_load_s": t_fit - t_start,
        "loss_per_epoch": [h["loss"] for h in history], "test_images": len(test),
        "test_dice": scores["val_dice"], "test_normal_fp": scores["val_normal_fp"],
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", required=True, help="busi-monai pack .npz (256 px; with a test split)")
    ap.add_argument("--out", required=True, help="folder for result.json")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU check: the fast network, 2 epochs, 64 images")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: train this way only
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.one:
        from busi_monai.jsonio import write_json

        write_json(one_way(a.one, a.pack, Path(a.run_dir), a.tiny, a.device), Path(a.run_dir) / "way.json")
        return 0

    # Inputs first, in seconds.
    require_monai()
    from busi_monai.jsonio import write_json

    ways = [w for w in a.ways.split(",") if w]
    unknown = [w for w in ways if w not in WAYS]
    if unknown or not ways:
        raise InputError(f"unknown way(s) {unknown}; choose from {', '.join(WAYS)}")
    info = check_pack(Path(a.pack), None if a.tiny else 256, False, 1, need_test=False)
    if not info["n_test"]:
        raise InputError(f"{a.pack}: no test split to score the ways on")
    dev = gpu_device(a.device, a.tiny)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"script": "benchmarks/scripts/gpu_fresh_train.py", "argv": sys.argv[1:] if argv is None else list(argv), "tiny": a.tiny}
    result["environment"], result["pack"], result["ways"] = environment(dev), info, {}

    for way in ways:
        with tempfile.TemporaryDirectory(prefix=f"busi-fresh-{way}-") as work:
            work = Path(work)
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "TRITON_CACHE_DIR": str(work / "triton")}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", way, "--pack", str(a.pack), "--run-dir", str(work / "run"), "--device", str(dev)]
            cmd += ["--out", str(out)] + (["--tiny"] if a.tiny else [])
            (work / "run").mkdir()
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                result["ways"][way] = {"error": f"not done within {TIMEOUT_S} s"}
                continue
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                result["ways"][way] = {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
                continue
            rec = json.loads((work / "run" / "way.json").read_text())
            result["ways"][way] = {"process_wall_s": wall, **rec}
        write_json(result, out / "result.json")  # after each way: a timeout later keeps what ran
        r = result["ways"][way]
        print(f"{way}: " + (r["error"] if "error" in r else f"{r['process_wall_s']:.1f} s from process start, test Dice {r['test_dice']:.3f}"), flush=True)
    write_json(result, out / "result.json")
    return 0 if all("error" not in r for r in result["ways"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
