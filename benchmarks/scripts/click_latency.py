"""Round trip of a click through the real MONAI Label server, as Slicer makes it.

    python benchmarks/scripts/click_latency.py --model RUN/model.pt [--automatic-model BEST.pt] --images DIR --out click_latency.json

Starts the app (preset ``interactive``) on a studies folder holding the images of DIR, then
times, with ``monailabel.client``, what a clinician sends for each image: Run, five clicks
that extend each other (the server corrects its last outline, zooming in), a box alone, a box
with a click, and another client's first click (no outline remembered: it computes the
automatic one first). With ``--automatic-model`` the app serves two networks, as it does by
default: that one for Run, the click network beside it.
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
from busi_monai.serve import CLICKS_HOME, publish_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a click-guided checkpoint (busi-monai train --preset interactive)")
    p.add_argument("--images", required=True, help="folder of PNG images (e.g. BUSI's benign/)")
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=10, help="images worked (each: Run, 5 clicks, a box, a box and a click)")
    p.add_argument("--n-images", type=int, default=5)
    p.add_argument("--automatic-model", default=None, help="the automatic network Run serves (default: the click model's own outline)")
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
    if a.automatic_model:
        publish_model(a.automatic_model, model_dir)
        publish_model(a.model, model_dir / CLICKS_HOME)
    else:
        publish_model(a.model, model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "server.log", "w")
    cmd = [sys.executable, "-m", "busi_monai.serve", "--studies", str(studies), "--port", str(port), "--preset", "interactive",
           "--no-warmup", "--model-dir", str(model_dir), "--device", "cpu",
           "--conf", "automatic", "separate" if a.automatic_model else "shared"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if requests.get(f"{url}/info/", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        client = MONAILabelClient(url, tmpdir=str(work), client_id="latency")
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {"run": [], "first_click": [], "next_click": [], "box": [], "box_and_click": [], "first_click_without_run": []}

        # Each request, with the server's own split of its time (the app's "latencies": reading
        # and checking, the networks, writing the result): where a slow round trip went.
        requests_made: list[dict] = []

        def timed(kind, model, image_id, params, by=client):
            t = time.perf_counter()
            _, out = by.infer(model, image_id, {**params, "result_extension": ".nrrd"})
            if kind:
                ms = 1000 * (time.perf_counter() - t)
                times[kind].append(ms)
                server = out.get("latencies") if isinstance(out, dict) else None
                requests_made.append({"kind": kind, "rep": rep, "image": image_id, "ms": round(ms, 1),
                                      "server_ms": {k: round(1000 * v, 1) for k, v in (server or {}).items() if isinstance(v, (int, float))}})  # fmt: skip
            return out

        rep = -1
        timed(None, "attention_unet_clicks", ids[0][0], {"foreground": [[1, 1, 0]]})  # warm-up
        for r in range(a.reps):
            rep = r
            image_id, (h, w) = ids[r % len(ids)]
            # As a clinician works an image: Run, then clicks that extend each other (the server
            # corrects its last outline), then a box with a click.
            timed("run", "attention_unet", image_id, {})
            fg = []
            for k in range(5):
                fg.append([int(rng.integers(w)), int(rng.integers(h)), 0])
                out = timed("first_click" if k == 0 else "next_click", "attention_unet_clicks", image_id, {"foreground": fg, "background": []})
            x0, y0 = int(rng.integers(w // 2)), int(rng.integers(h // 2))
            roi = [x0, x0 + w // 3, y0, y0 + h // 3, 0, 0]
            timed("box", "attention_unet_clicks", image_id, {"foreground": [], "background": [], "roi": roi})
            timed("box_and_click", "attention_unet_clicks", image_id, {"foreground": [[x0 + w // 6, y0 + h // 6, 0]], "background": [], "roi": roi})
            fresh = MONAILabelClient(url, tmpdir=str(work), client_id=f"latency-{r}")
            timed("first_click_without_run", "attention_unet_clicks", image_id, {"foreground": fg[:1], "background": []}, by=fresh)
        summary = {k: {"n": len(v), "mean_ms": statistics.mean(v), "median_ms": statistics.median(v), "max_ms": max(v)} for k, v in times.items() if v}
        clicks = times["first_click"] + times["next_click"] + times["first_click_without_run"]
        res = {
            "what": "round trips through monailabel.client as Slicer makes them: Run, five extending clicks, a box, a box and a click, and another client's first click, per image, after one warm-up",
            "networks": "two: the automatic one for Run, the click network beside it" if a.automatic_model else "one for both tools",
            "model": os.path.basename(a.model), "automatic_model": os.path.basename(a.automatic_model) if a.automatic_model else None,
            "image_shapes": [list(s) for _, s in ids], "reps": a.reps,
            "click_mean_ms": statistics.mean(clicks), "click_median_ms": statistics.median(clicks), "click_max_ms": max(clicks),
            "last_previous": out.get("previous") if isinstance(out, dict) else None,
            "by_request": summary,
            "slowest": sorted(requests_made, key=lambda q: -q["ms"])[:5],
            "requests": requests_made,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        }  # fmt: skip
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
