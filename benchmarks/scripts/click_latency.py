"""Round trip of one click through the real MONAI Label server, as Slicer makes it (#18).

    python benchmarks/scripts/click_latency.py --model RUN/model.pt --images DIR --out click_latency.json

Starts the app (preset ``interactive``) on a studies folder holding the images of DIR, then
times ``/infer/attention_unet_clicks`` with ``monailabel.client``: a warm-up, then ``--reps``
requests, each with one more click than the last (up to 5), on image after image.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from busi_monai.data.io import read_image  # noqa: E402
from busi_monai.jsonio import write_json  # noqa: E402
from busi_monai.serve import publish_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a click-guided checkpoint (busi-monai train --preset interactive)")
    p.add_argument("--images", required=True, help="folder of PNG images (e.g. BUSI's benign/)")
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--n-images", type=int, default=5)
    a = p.parse_args(argv)
    images = sorted(f for f in Path(a.images).glob("*.png") if "_mask" not in f.name)[: a.n_images]
    if not Path(a.model).is_file() or not images:
        print(f"click_latency: need --model (a file) and PNG images in --images; got {a.model}, {len(images)} images", file=sys.stderr)
        return 2
    from monailabel.client import MONAILabelClient

    work = Path(tempfile.mkdtemp(prefix="click-latency-"))
    studies, model_dir = work / "studies", work / "model"
    studies.mkdir()
    ids = []
    for i, f in enumerate(images):
        shutil.copy(f, studies / f"img{i}.png")
        ids.append((f"img{i}", read_image(f).shape))
    publish_model(a.model, model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "server.log", "w")
    cmd = [sys.executable, "-m", "busi_monai.serve", "--studies", str(studies), "--port", str(port), "--preset", "interactive",
           "--no-warmup", "--model-dir", str(model_dir), "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if requests.get(f"{url}/info/", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        client = MONAILabelClient(url, tmpdir=str(work))
        rng = np.random.default_rng(0)
        times = []
        for r in range(a.reps + 1):
            image_id, (h, w) = ids[r % len(ids)]
            fg = [[int(rng.integers(w)), int(rng.integers(h)), 0] for _ in range(1 + r % 5)]
            t = time.perf_counter()
            client.infer("attention_unet_clicks", image_id, {"foreground": fg, "background": [], "result_extension": ".nrrd"})
            if r:  # the first is the warm-up
                times.append(1000 * (time.perf_counter() - t))
        res = {
            "what": "one /infer/attention_unet_clicks round trip through monailabel.client (1-5 foreground clicks), after one warm-up",
            "model": os.path.basename(a.model), "image_shapes": [list(s) for _, s in ids],
            "reps": a.reps, "mean_ms": statistics.mean(times), "median_ms": statistics.median(times), "max_ms": max(times),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        }
        write_json(res, a.out)
        print(res)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
