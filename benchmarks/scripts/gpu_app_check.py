#!/usr/bin/env python3
"""The MONAI Label app on a GPU machine without a registry, driven as 3D Slicer drives it.

Installs the app from a carried wheelhouse (`make install WHEELHOUSE=...`), builds a studies
folder from a carried pack (`busi-monai pack`), starts `monailabel start_server --app apps/busi`,
checks that /info reports the GPU, then times with monailabel.client: Train with the paper
recipe (request -> new model served), /infer round trips (mean of N after a warm-up), and one
Next Sample per strategy. Writes the figures as JSON (busi_monai.jsonio: no NaN/inf).

    python3 benchmarks/scripts/gpu_app_check.py --wheelhouse .wheelhouse --pack .gpu/busi256.npz --out OUT.json
    python3 benchmarks/scripts/gpu_app_check.py --tiny --python PY --pack small.npz --out OUT.json   # CPU test

With the device `run` tool (repo root there; carry [".wheelhouse", ".gpu"], the wheelhouse made
with `make wheelhouse PYVER=3.12 WHEELHOUSE_OUT=.wheelhouse`; the tool carries 64 MiB, which the
wheelhouse does not fit yet: BENCHMARKS.md says why):

    set -o pipefail; PYTHONUNBUFFERED=1 timeout 330 python3 benchmarks/scripts/gpu_app_check.py --wheelhouse .wheelhouse --pack .gpu/busi256.npz --out $OUT/gpu_app_check.json 2>&1 | tee $OUT/gpu_app_check.log
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "apps" / "busi"
MODEL = "attention_unet"
T0 = time.time()


class CheckError(Exception):
    pass


def say(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheelhouse", type=Path, help="install the app from this folder, offline, into --venv")
    src.add_argument("--python", type=Path, help="an interpreter that already has the app (no install)")
    p.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "busi-app-venv")
    p.add_argument("--pack", type=Path, required=True, help="a pack made by `busi-monai pack` (.npz)")
    p.add_argument("--out", type=Path, required=True, help="JSON file of the figures")
    p.add_argument("--work", type=Path, help="studies, app copy, logs (default: a temporary folder)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--tiny", action="store_true", help="CPU test mode: fast net, 32 px, 2 epochs, 2 infers")
    p.add_argument("--infers", type=int, help="timed /infer round trips (default 20; --tiny 2)")
    p.add_argument("--pool", type=int, help="unlabelled images for Next Sample (default 64; --tiny 3)")
    p.add_argument("--epochs", type=int, help="Train's max_epochs (default: the paper recipe's)")
    p.add_argument("--train-timeout", type=float, default=600)
    p.add_argument("--_drive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_install-s", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.infers = a.infers or (2 if a.tiny else 20)
    a.pool = a.pool or (3 if a.tiny else 64)
    return a


def check_inputs(a) -> None:
    """Everything that can be missing, before anything slow: one line naming it."""
    if not (APP / "main.py").is_file():
        raise CheckError(f"no MONAI Label app at {APP} (apps/busi/main.py)")
    if a.wheelhouse is not None:
        if not a.wheelhouse.is_dir():
            raise CheckError(f"wheelhouse folder {a.wheelhouse} does not exist (make wheelhouse WHEELHOUSE_OUT=...)")
        if not list(a.wheelhouse.glob("monailabel-*.whl")):
            raise CheckError(f"wheelhouse {a.wheelhouse} has no monailabel wheel")
        if shutil.which("make") is None:
            raise CheckError("`make` not found: the install runs `make install WHEELHOUSE=...`")
    if a.python is not None and not os.access(a.python, os.X_OK):
        raise CheckError(f"interpreter {a.python} not found")
    if not a.pack.is_file():
        raise CheckError(f"pack {a.pack} does not exist (busi-monai pack --data PREPARED --out FILE.npz)")
    if not zipfile.is_zipfile(a.pack):
        raise CheckError(f"pack {a.pack} is not an .npz made by busi-monai pack")
    if a.port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", a.port))
            except OSError:
                raise CheckError(f"port {a.port} on 127.0.0.1 is taken (--port 0 picks a free one)") from None
    if not a.out.parent.is_dir():
        raise CheckError(f"output folder {a.out.parent} does not exist")


def install(a) -> tuple[Path, float]:
    say(f"installing the app from {a.wheelhouse} into {a.venv} (offline)")
    t = time.time()
    cmd = ["make", "-C", str(REPO), "install", f"WHEELHOUSE={a.wheelhouse.resolve()}", f"VENV={a.venv}", f"PYTHON={sys.executable}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and "is ignored" not in ln][-5:]
        raise CheckError("offline install failed: " + " | ".join(tail))
    return a.venv / "bin" / "python", time.time() - t


# --- the driver: runs under the app's interpreter -------------------------------------------


def studies_from_pack(a, python: str, work: Path) -> dict:
    """The pack's images laid out as BUSI (PNG + mask), turned into a studies folder with final
    labels by `busi-monai studies`, plus an unlabelled pool for Next Sample (mirrored copies)."""
    import numpy as np
    from PIL import Image

    z = np.load(a.pack)
    size, meta = int(z["size"]), json.loads(str(z["meta"]))
    blob, ends = z["images_png"], z["images_png_ends"]
    masks = np.unpackbits(z["labels"], axis=-1)[..., :size]
    layout, studies = work / "busi", work / "studies"
    starts = np.concatenate([[0], ends[:-1]])
    for i, (item, s, e) in enumerate(zip(meta, starts, ends)):
        img = np.asarray(Image.open(io.BytesIO(blob[s:e].tobytes())))
        stem = Path(item["source"]).with_suffix("")
        (layout / stem.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(layout / f"{stem}.png")
        Image.fromarray((masks[i, 0] > 0).astype(np.uint8) * 255).save(layout / f"{stem}_mask.png")
    subprocess.run([python, "-m", "busi_monai.cli", "studies", "--busi-root", str(layout), "--out", str(studies), "--with-labels"],
                   check=True, stdout=subprocess.DEVNULL, env=_env())  # fmt: skip
    for j, (s, e) in enumerate(list(zip(starts, ends))[-a.pool:]):
        img = np.asarray(Image.open(io.BytesIO(blob[s:e].tobytes())))[:, ::-1]
        Image.fromarray(np.ascontiguousarray(img)).save(studies / f"pool_{j:04d}.png")
    return {"labelled": len(meta), "unlabelled": min(a.pool, len(meta)), "image_size": size}


def _env() -> dict:
    pp = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + pp if pp else ""), "PYTHONUNBUFFERED": "1",
            "MONAI_LABEL_TRACKING_ENABLED": "false"}  # fmt: skip


def start_server(a, work: Path, studies: Path) -> tuple[subprocess.Popen, str, Path]:
    app = work / "app"  # a copy: start_server writes model/, logs/, bin/ into the app folder
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__", "*.pyc"))
    port = a.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    conf = {"preset": "fast", "device": "cpu", "mc_passes": 2} if a.tiny else {"preset": "paper"}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "model_dir", str(work / "model")]  # fmt: skip
    for k, v in conf.items():
        cmd += ["--conf", k, str(v)]
    log = work / "server.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env(), cwd=str(work), start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def wait_info(url: str, proc, log: Path, timeout: float = 180) -> dict:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise CheckError(f"server exited with {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.5)
    raise CheckError(f"server did not answer /info/ in {timeout:.0f} s: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "(no log)"


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # the server and the train/scoring processes it started
        try:
            proc.wait(8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def train(a, client, log: Path) -> dict:
    before = client.info()["busi"]["model_version"]
    params = {"max_epochs": 2, "image_size": 32, "train_batch_size": 4} if a.tiny else {}
    if a.epochs:
        params["max_epochs"] = a.epochs
    say(f"Train {MODEL} {params or '(the paper recipe)'}")
    t = time.time()
    client.train_start(MODEL, params)
    done_s, shown, status = None, 0.0, {}
    while True:
        info = client.info()
        v = info["busi"]["model_version"]
        if done_s is None:
            status = client.train_status()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                done_s = time.time() - t
                if status.get("status") != "DONE":
                    raise CheckError(f"training ended {status.get('status')}: {' | '.join(status.get('details', [])[-3:])} {_tail(log)}")
        if v and v != before and MODEL in info.get("models", {}):
            served_s = time.time() - t
            break
        if time.time() - t > a.train_timeout:
            raise CheckError(f"no new model served {a.train_timeout:.0f} s after Train: {_tail(log)}")
        if time.time() - shown > 10:
            last = (status.get("details") or [""])[-1][-100:]
            say(f"  training {time.time() - t:5.0f} s: {status.get('status')} {last}")
            shown = time.time()
        time.sleep(0.2)
    stats = info.get("train_stats", {}).get(MODEL, {})
    say(f"new model {v} served {served_s:.1f} s after the request")
    return {"request_to_served_s": served_s, "request_to_done_s": done_s, "params": params, "model_version": v,
            "epochs": stats.get("epochs"), "n_train": stats.get("n_train"), "n_val": stats.get("n_val"),
            "train_loop_s": stats.get("total_time"), "best_metric": stats.get("best_metric")}  # fmt: skip


def infer(a, client, image_id: str) -> dict:
    say(f"/infer {MODEL} on {image_id}: 1 warm-up, {a.infers} timed")
    params = {"result_extension": ".nrrd"}  # what Slicer asks for
    client.infer(MODEL, image_id, params)
    times = []
    for _ in range(a.infers):
        t = time.time()
        result, out = client.infer(MODEL, image_id, params)
        times.append((time.time() - t) * 1000)
        if not result or not os.path.isfile(result):
            raise CheckError(f"/infer returned no mask file for {image_id}")
    say(f"/infer mean {statistics.mean(times):.1f} ms")
    return {"image": image_id, "n": len(times), "mean_ms": statistics.mean(times), "median_ms": statistics.median(times),
            "min_ms": min(times), "max_ms": max(times), "device": out.get("device"), "model_version": out.get("model_version")}  # fmt: skip


def wait_scores(client, version: str, timeout: float) -> float | None:
    """Seconds until every unlabelled image has its MC-dropout score for ``version`` (as Slicer
    would see after a training), or None at the timeout; mc_dropout* pick at random until then."""
    t = time.time()
    while time.time() - t < timeout:
        objs = client.datastore()["objects"]
        pool = [v["image"]["info"] for v in objs.values() if not v["labels"].get("final")]
        if pool and all(i.get("mc_dropout_version") == version for i in pool):
            return time.time() - t
        time.sleep(0.5)
    return None


def next_samples(client, strategies) -> dict:
    out = {}
    for s in strategies:
        t = time.time()
        r = client.next_sample(s, {})
        ms = (time.time() - t) * 1000
        out[s] = {"ms": ms, "id": r.get("id"), "score": r.get("mc_dropout_score")}
        say(f"Next Sample {s}: {r.get('id')} in {ms:.0f} ms")
    return out


def drive(a) -> dict:
    from monailabel.client import MONAILabelClient

    from busi_monai.jsonio import write_json

    work = a.work or Path(tempfile.mkdtemp(prefix="busi-gpu-app-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"mode": "tiny" if a.tiny else "full", "pack": a.pack.name, "python": sys.version.split()[0], "install_s": a._install_s}
    say(f"studies from {a.pack}")
    t = time.time()
    res["studies"] = studies_from_pack(a, sys.executable, work)
    res["studies"]["build_s"] = time.time() - t
    say(f"studies: {res['studies']['labelled']} labelled, {res['studies']['unlabelled']} unlabelled")
    t = time.time()
    proc, url, log = start_server(a, work, work / "studies")
    try:
        info = wait_info(url, proc, log)
        res["server_start_s"] = time.time() - t
        busi = info.get("busi", {})
        res["device"], res["device_description"] = busi.get("device"), busi.get("device_description")
        say(f"server up in {res['server_start_s']:.1f} s; /info device {res['device']} ({res['device_description']})")
        if not a.tiny and not str(res["device"]).startswith("cuda"):
            raise CheckError(f"/info reports device {res['device']!r}, not a GPU")
        client = MONAILabelClient(url, tmpdir=str(work / "client"))
        res["train"] = train(a, client, log)
        objs = client.datastore()["objects"]
        labelled = sorted(k for k, v in objs.items() if v["labels"].get("final"))
        res["infer"] = infer(a, client, labelled[0])
        say("waiting for the MC-dropout scores of the new model")
        res["scoring_s"] = wait_scores(client, res["train"]["model_version"], 60 if a.tiny else 120)
        res["next_sample"] = next_samples(client, list(client.info()["strategies"]))
    finally:
        stop_server(proc)
    res["wall_s"] = time.time() - T0
    res["goals"] = {"infer_mean_ms<=50": res["infer"]["mean_ms"] <= 50, "train_request_to_served_s<=120": res["train"]["request_to_served_s"] <= 120}
    write_json(res, a.out)
    say(f"wrote {a.out}")
    return res


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    try:
        if a._drive:
            drive(a)
            return 0
        check_inputs(a)
        install_s = None
        python = a.python
        if a.wheelhouse is not None:
            python, install_s = install(a)
            say(f"installed in {install_s:.1f} s")
            argv = [x for i, x in enumerate(argv) if not x.startswith("--wheelhouse") and (i == 0 or argv[i - 1] != "--wheelhouse")]
            argv += ["--python", str(python), "--_install-s", f"{install_s:.3f}"]
        r = subprocess.run([str(python), __file__, *argv, "--_drive"], env=_env())
        return r.returncode
    except CheckError as e:
        print(f"gpu_app_check: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
