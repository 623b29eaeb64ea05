"""``busi-monai benchmark``: the plain way against the fast path, same inputs, one run.

Plain: fp32, eager, batch 1, every image decoded and preprocessed on the CPU each time, as a
straightforward MONAI script does it. Fast: the preprocessed set cached once on the device,
bf16 autocast and channels-last on a GPU, large inference batches, optional torch.compile.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from busi_monai.data.datasets import split_items
from busi_monai.data.packs import CachedData, cache_items, load_pack
from busi_monai.device import mixed_precision, resolve_device
from busi_monai.jsonio import dumps, write_json
from busi_monai.model.networks import build_network
from busi_monai.training.loop import compile_network
from busi_monai.training.recipes import get_recipe

PAPER_IMAGES = 624
PAPER_EPOCHS = 50


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def benchmark_items(data: str | None, limit: int) -> list[dict]:
    """Image/label pairs from a prepared dataset (both splits), a BUSI-layout folder (a label is
    the union of the image's masks) or sample-data."""
    items = [it for it in split_items(data or Path(__file__).resolve().parents[1] / "sample-data", None) if it["label"]]
    if not items:
        raise FileNotFoundError(f"no images found in {data}")
    reps = (limit + len(items) - 1) // len(items)
    return (items * reps)[:limit]


def _at_size(batch: torch.Tensor, size: int) -> torch.Tensor:
    return batch if batch.shape[-1] == size else torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="area")


def _train_rate(model, images, labels, batch_size, steps, amp, channels_last, dev, warmup: int = 2) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=dev.type == "cuda" and amp)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    n = images.shape[0]

    def step(i):
        idx = torch.randint(0, n, (batch_size,), device=images.device)
        x, y = images[idx], labels[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):  # cudnn autotune, compile, allocator
        step(i)
    _sync(dev)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(dev)
    return steps * batch_size / (time.perf_counter() - t)


@torch.no_grad()
def _infer_rate(model, x, batch_size, reps, amp, channels_last, dev) -> float:
    model.eval()
    xb = x[:batch_size]
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            model(xb)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            torch.sigmoid(model(xb).float())
    _sync(dev)
    return reps * xb.shape[0] / (time.perf_counter() - t)


def _plain_pipeline_rate(model, items, image_size, dev, n) -> tuple[float, float]:
    """Batch-1 fp32 inference with per-image decode + MONAI preprocessing on the CPU.

    Returns (images/s, mean latency in ms).
    """
    from monai.transforms import Compose

    from busi_monai.data.preprocessing import LoadBusiImaged, preprocess_transforms

    tf = Compose([LoadBusiImaged(("image",)), preprocess_transforms(image_size, keys=("image",))])
    model.eval()
    times = []
    with torch.no_grad():
        for it in items[: n + 2]:
            t = time.perf_counter()
            x = tf({"image": it["image"]})["image"][None].to(dev)
            torch.sigmoid(model(x))
            _sync(dev)
            times.append(time.perf_counter() - t)
    times = times[2:]
    return len(times) / sum(times), 1000 * float(np.mean(times))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_round_trip(model_path: str, image_items: list[dict], reps: int = 5, timeout: float = 180) -> dict:
    """Start the MONAI Label app on loopback and time ``/infer`` calls (ms)."""
    try:
        from monailabel.client import MONAILabelClient
    except ImportError:
        return {"skipped": "monailabel is not installed here"}
    import shutil
    import tempfile

    from busi_monai.data.io import read_image, write_array
    from busi_monai.serve import APP_DIR

    work = Path(tempfile.mkdtemp(prefix="busi-bench-"))
    # A copy of the app: monailabel writes model/, logs/ and bin/ into the app it serves.
    app = work / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    studies = work / "studies"
    studies.mkdir()
    img = read_image(image_items[0]["image"])
    write_array(img.array, studies / "bench_0001.nii.gz", like=img)
    model_dir = work / "model"
    model_dir.mkdir()
    shutil.copy(model_path, model_dir / "attention_unet.pt")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port), "--conf", "model_dir", str(model_dir),
    ]
    log = open(work / "server.log", "w")
    # A clinician's "Run" meets an idle server: keep MONAI Label's start-up MC-dropout scoring
    # (a subprocess of the same network) from running beside the timed calls.
    env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    started = False
    try:
        client = MONAILabelClient(f"http://127.0.0.1:{port}")
        t0 = time.time()
        while True:
            try:
                client.info()
                break
            except Exception:
                if proc.poll() is not None or time.time() - t0 > timeout:
                    return {"skipped": f"server did not start (see {work / 'server.log'})"}
                time.sleep(1)
        started = True
        times, server = [], []
        for _ in range(reps + 1):
            t = time.perf_counter()
            _, params = client.infer("attention_unet", "bench_0001", {"result_extension": ".nrrd"})
            times.append(1000 * (time.perf_counter() - t))
            server.append(params.get("latencies", {}))
        parts = {k: 1000 * float(np.mean([s.get(k, np.nan) for s in server[1:]])) for k in ("pre", "infer", "write", "total")}
        return {
            "ms_mean": float(np.mean(times[1:])),
            "ms_min": float(np.min(times[1:])),
            "calls": reps,
            "first_call_ms": times[0],
            "startup_scoring": "off (MONAI_LABEL_AUTO_UPDATE_SCORING=false)",
            # Where the time goes: read+checks, network+pre/post-processing, mask writing, and the
            # rest (HTTP, multipart, MONAI Label's request handling, the client's file write).
            "server_ms_mean": {**parts, "http_and_client": float(np.mean(times[1:])) - parts["total"]},
        }
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if started:  # a failed start keeps its folder: the message points to its log
            shutil.rmtree(work, ignore_errors=True)


def end_to_end_fit(
    preset: str, data: CachedData, size: int, device: str, compile_model: bool = False, cuda_graphs: bool = False,
    out: str | Path | None = None, images: int = PAPER_IMAGES, epochs: int | None = None,
) -> dict:
    """``fit`` as ``busi-monai train`` runs it: the preset's recipe (its epochs unless
    ``epochs``, its batch and schedule) on ``images`` images (``data``'s, repeated), compilation or
    graph capture, checkpoints and all, timed by the wall clock. The run is written to ``out``
    (default: a temporary folder)."""
    import tempfile

    from busi_monai.training.loop import fit

    n = images
    reps = (n + len(data) - 1) // len(data)
    imgs = _at_size(data.images, size).repeat(reps, 1, 1, 1)[:n]
    labs = (_at_size(data.labels, size) > 0.5).float().repeat(reps, 1, 1, 1)[:n]
    train = CachedData(imgs, labs, [{"id": str(i)} for i in range(n)])
    recipe = get_recipe(preset).with_overrides(image_size=size, **({"epochs": epochs} if epochs else {}))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = fit(
            train, CachedData(imgs[:0], labs[:0], []), out or tmp, preset, recipe, device=device, progress=False,
            compile_model=compile_model, cuda_graphs=cuda_graphs,
        )  # fmt: skip
        wall = time.perf_counter() - t
    return {
        "images": n,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "wall_s": wall,
        "train_loop_s": summary["train_time_s"],
        "checkpoint_writes": summary["checkpoint_writes"],
        "compiled": compile_model,
        "cuda_graphs": cuda_graphs,
        "amp_bf16": summary["amp_bf16"],
    }


def run_benchmark(
    data: str | None = None,
    device: str = "auto",
    quick: bool = False,
    presets: tuple[str, ...] = ("paper", "fast"),
    image_size: int | None = None,
    compile_model: bool = False,
    server: bool = True,
    pack: str | None = None,
    end_to_end: bool = False,
    cuda_graphs: bool = False,
) -> dict:
    dev = resolve_device(device)
    torch.backends.cudnn.benchmark = True
    gpu = dev.type == "cuda"
    # What the product does: training autocasts to bf16 wherever the hardware has it (a CPU with
    # AVX-512 BF16 included); Predictor does on CUDA only, so CPU masks stay exactly fp32's.
    amp = gpu and torch.cuda.is_bf16_supported()
    train_amp = mixed_precision(dev)
    train_cl = gpu or train_amp
    n_images = 16 if quick else 128
    if pack:
        full = load_pack(pack)
        cached = CachedData(full.images[:n_images], full.labels[:n_images], full.items[:n_images])
        # The plain per-image pipeline needs image files: --data beside --pack gives them.
        items = benchmark_items(data, n_images) if data else None
    else:
        items = benchmark_items(data, n_images)
        full = cached = cache_items(items, max(get_recipe(p).image_size for p in presets) if image_size is None else image_size, progress=False)
    result: dict = {
        "command": "busi-monai benchmark " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else "run_benchmark()",
        "device": torch.cuda.get_device_name(dev) if gpu else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "quick": quick,
        "image_size": image_size or "each preset's",
        "amp_bf16": {"train": train_amp, "infer": amp},
        "presets": {},
    }
    try:
        import monai

        result["monai"] = monai.__version__
    except ImportError:
        pass
    for preset in tqdm(presets, desc="benchmark", unit="preset"):
        # Each preset at its own training size (paper 256 px, fast 128 px) unless one is forced.
        size = image_size or get_recipe(preset).image_size
        imgs_dev, labs_dev = _at_size(cached.images, size).to(dev), (_at_size(cached.labels, size) > 0.5).float().to(dev)
        r: dict = {"image_size": size}
        torch.manual_seed(0)
        # Plain way: fp32, eager, batch 4 train, batch 1 inference with per-image CPU preprocessing.
        model = build_network(preset).to(dev)
        train_steps = (1 if quick else 20) if not gpu else 60
        warmup = 1 if (quick and not gpu) else 2
        r["plain_train_images_per_s"] = _train_rate(model, imgs_dev, labs_dev, 4, train_steps, False, False, dev, warmup)
        if items is not None:
            rate, lat = _plain_pipeline_rate(model, items, size, dev, 4 if quick else (16 if not gpu else 64))
            r["plain_infer_images_per_s"], r["plain_infer_latency_ms"] = rate, lat
        # Fast path.
        fmodel = build_network(preset).to(dev)
        if train_cl:
            fmodel = fmodel.to(memory_format=torch.channels_last)
        run_model = compile_network(fmodel, dev) if compile_model else fmodel
        if train_amp or train_cl or compile_model:
            r["fast_train_images_per_s"] = _train_rate(run_model, imgs_dev, labs_dev, 4, train_steps, train_amp, train_cl, dev, warmup)
        else:
            # Without bf16, channels-last or compile (a CPU), the fast training step is the plain
            # one: one measurement serves both rather than two noisy ones.
            r["fast_train_images_per_s"] = r["plain_train_images_per_s"]
            r["fast_train_same_code_as_plain"] = True
        big = 64 if gpu else (4 if quick else 8)
        x = imgs_dev.repeat((big + len(imgs_dev) - 1) // len(imgs_dev), 1, 1, 1)
        r["fast_infer_batch1_latency_ms"] = 1000 / _infer_rate(run_model, x, 1, 3 if quick else 30, amp, gpu, dev)
        r["fast_infer_batch"] = big
        r["fast_infer_images_per_s"] = _infer_rate(run_model, x, big, 1 if quick else (10 if gpu else 3), amp, gpu, dev)
        r["projected_paper_50_epochs_624_images_s"] = PAPER_EPOCHS * PAPER_IMAGES / r["fast_train_images_per_s"]
        r["projected_plain_50_epochs_624_images_s"] = PAPER_EPOCHS * PAPER_IMAGES / r["plain_train_images_per_s"]
        if "plain_infer_images_per_s" in r:
            r["infer_speedup_fast_vs_plain"] = r["fast_infer_images_per_s"] / r["plain_infer_images_per_s"]
        r["train_speedup_fast_vs_plain"] = r["fast_train_images_per_s"] / r["plain_train_images_per_s"]
        del model, fmodel, run_model
        if end_to_end:
            r["end_to_end"] = end_to_end_fit(preset, full, size, device, compile_model, cuda_graphs)
        result["presets"][preset] = r
    if server and items is not None:
        import tempfile

        from busi_monai.model.checkpoint import atomic_torch_save, make_checkpoint

        with tempfile.TemporaryDirectory() as d:
            ck = Path(d) / "paper.pt"
            atomic_torch_save(make_checkpoint(build_network("paper"), get_recipe("paper"), "paper"), ck)
            result["server_infer_round_trip_paper"] = _server_round_trip(str(ck), items, reps=3 if quick else 10)
    result["peak_host_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gpu:
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def register_cli(sub) -> None:
    s = sub.add_parser("benchmark", help="plain vs fast training/inference throughput, latency, memory")
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--quick", action="store_true", help="finishes within a minute on a CPU")
    s.add_argument("--data", help="prepared dataset or BUSI-layout folder (default: sample-data)")
    s.add_argument("--pack", help="a .npz from `busi-monai pack` for the cached training/inference data (--data then only feeds the plain per-image pipeline)")
    s.add_argument("--presets", default="paper,fast")
    s.add_argument("--compile", action="store_true")
    s.add_argument("--cuda-graphs", action="store_true", help="--end-to-end: replay the training step as a CUDA graph instead of compiling")
    s.add_argument("--image-size", type=int, help="one training/inference size for every preset (default: each preset's own)")
    s.add_argument("--no-server", action="store_true", help="skip the MONAI Label /infer round trip")
    s.add_argument(
        "--end-to-end", action="store_true",
        help="also time each preset's whole training (its recipe, 624 images, checkpoints and compilation included)",
    )  # fmt: skip

    def run(a):
        t0 = time.time()
        res = run_benchmark(
            a.data, a.device, a.quick, tuple(a.presets.split(",")), image_size=a.image_size,
            compile_model=a.compile, server=not a.no_server, pack=a.pack, end_to_end=a.end_to_end, cuda_graphs=a.cuda_graphs,
        )  # fmt: skip
        res["wall_s"] = round(time.time() - t0, 1)
        write_json(res, a.out)
        print(dumps(res))

    s.set_defaults(func=run)
