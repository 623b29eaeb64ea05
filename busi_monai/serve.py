"""Run the MONAI Label server of the BUSI app (the job behind ``make serve``).

    python -m busi_monai.serve --studies work/studies [--host 127.0.0.1] [--port 8000]
        [--busi-root sample-data] [--preset fast] [--conf key value ...]

1. If the studies folder does not exist, it is built from ``--busi-root`` (default: the
   synthetic ``sample-data/``) with :func:`busi_monai.data.studies.build_studies`, with final labels for
   part of the images (``--label-fraction``, so Train works at once) and the rest unlabelled
   (for Next Sample / active learning).
2. If the app has no trained weights yet, a small model is trained on the labelled images
   (fast preset, small images, progress bar; a few minutes at most on 2 CPU cores) and
   published, so that "Run" in 3D Slicer outlines a lesion straight away.
3. ``monailabel start_server --app apps/busi --studies DIR --host H --port P --conf ...``
   replaces this process. It binds 127.0.0.1 unless told otherwise: see apps/busi/README.md
   before exposing it on a network.

The helpers the app shares (model file name, atomic publishing) live here too, so this module
imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from busi_monai.data.io import atomic_path
from busi_monai.data.studies import build_studies, labelled_items

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "busi"
SAMPLE_DATA = REPO / "sample-data"

MODEL_FILENAME = "attention_unet.pt"
STATS_FILENAME = "train_stats.json"
AUTOMATIC_NAME = "attention_unet"
CLICKS_NAME = "attention_unet_clicks"
CLICKS_HOME = "clicks"  # the click network's folder inside the model folder (weights, runs, statistics)
AUTOMATIC_CHOICES = ("separate", "shared")

WARMUP_MAX_IMAGES = 200


def default_model_dir(app_dir: str | Path = APP_DIR) -> str:
    return os.path.join(str(app_dir), "model")


def app_networks(network: str, clicks: bool = True, automatic: str = "separate") -> dict[str, tuple[str, str]]:
    """The networks the app trains and serves: name -> (network spec, folder inside the model
    folder), the automatic one first.

    With ``clicks`` and ``automatic`` "separate", the automatic network has no click inputs and
    the click network beside it takes the click maps and the previous outline; "shared": one
    click network is both; without ``clicks``, ``network`` alone."""
    from busi_monai.model.networks import with_click_guidance, without_click_guidance

    conf_automatic({"automatic": automatic})
    if not clicks:
        return {AUTOMATIC_NAME: (network, "")}
    if automatic == "shared":
        return {AUTOMATIC_NAME: (with_click_guidance(network), "")}
    return {AUTOMATIC_NAME: (without_click_guidance(network), ""), CLICKS_NAME: (with_click_guidance(network), CLICKS_HOME)}


def publish_model(src: str | Path, model_dir: str | Path) -> str:
    """Copy a trained checkpoint to ``<model_dir>/attention_unet.pt`` atomically.

    The copy goes to a temporary file in the same folder, is flushed, then renamed over the
    served file (``os.replace``): infer reads either the old weights or the new, never half.
    The checkpoint is loaded first, so a broken file is never published.
    """
    from busi_monai.model.checkpoint import load_checkpoint

    load_checkpoint(src)
    os.makedirs(model_dir, exist_ok=True)
    dest = os.path.join(str(model_dir), MODEL_FILENAME)
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest








def warm_up(
    studies: str | Path,
    model_dir: str | Path,
    preset: str = "warmup",
    image_size: int | None = None,
    epochs: int | None = None,
    device: str = "auto",
    max_images: int = WARMUP_MAX_IMAGES,
    clicks: bool = False,
    automatic: str = "separate",
) -> dict:
    """Train first small models (the ``warmup`` recipe) on the studies' labelled images and publish
    them: the app's networks (:func:`app_networks`), so that with ``clicks`` the click tool works at
    once too. Returns the automatic network's training summary (``networks``: each one's)."""
    import random

    from busi_monai.data.packs import cache_items
    from busi_monai.data.splits import split_validation
    from busi_monai.training.loop import TrainingError, fit
    from busi_monai.training.recipes import get_recipe
    from busi_monai.training.runs import usable_items

    # Readable pairs with their class, so the validation slice holds lesion and normal images alike.
    items, _ = usable_items(labelled_items(studies))
    if not items:
        raise TrainingError(f"{studies}: no labelled images (labels/final) to train a first model on")
    if len(items) > max_images:
        items = random.Random(0).sample(items, max_images)
    base = get_recipe(preset).with_overrides(epochs=epochs, image_size=image_size)
    image_size = base.image_size
    train_items, val_items = split_validation(items, base.val_fraction, seed=0)
    t0 = time.time()
    train = cache_items(train_items, image_size, progress=True)
    val = cache_items(val_items, image_size, progress=True)
    summaries = {}
    for name, (network, home) in app_networks(base.network, clicks, automatic).items():
        recipe = base.with_overrides(network=network)
        print(
            f"busi-monai serve: training a first {name} ({preset} preset, network {recipe.network}, {image_size}px, {recipe.epochs} epochs, {recipe.loss}) on "
            f"{len(train_items)} labelled images, validating on {len(val_items)}",
            flush=True,
        )
        run_dir = Path(model_dir) / home / "runs" / "warmup"
        summary = fit(train, val, run_dir, preset=preset, recipe=recipe, device=device, progress=True)
        summary["published"] = publish_model(run_dir / "model.pt", Path(model_dir) / home)
        summaries[name] = summary
    summary = dict(summaries[AUTOMATIC_NAME])
    summary["warmup_time_s"] = round(time.time() - t0, 1)
    summary["networks"] = summaries
    return summary


def conf_flag(conf: dict, key: str, default: bool) -> bool:
    """A true/false app option (``--conf KEY VALUE``), as the app and ``serve`` both read it;
    ValueError naming it for anything else."""
    v = conf.get(key)
    if v in (None, ""):
        return default
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--conf {key} {v!r}: expected true or false")


def conf_automatic(conf: dict) -> str:
    """The ``--conf automatic`` option (default "separate"), as the app and ``serve`` both read
    it; ValueError naming it for anything but one of :data:`AUTOMATIC_CHOICES`."""
    automatic = str(conf.get("automatic") or "separate")
    if automatic not in AUTOMATIC_CHOICES:
        raise ValueError(f"--conf automatic {automatic!r}: choose one of {', '.join(AUTOMATIC_CHOICES)}")
    return automatic


def _parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m busi_monai.serve",
        description="Start the MONAI Label server of the BUSI app (builds studies and a first model if missing).",
    )
    p.add_argument("--studies", required=True, help="MONAI Label studies folder (built from --busi-root if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; see the README before 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--busi-root", default=str(SAMPLE_DATA), help="BUSI-layout folder to build the studies from (default: sample-data/)")
    p.add_argument("--label-fraction", type=float, default=2 / 3, help="share of the images given final labels when building the studies")
    p.add_argument("--preset", default=None, help="model preset the app trains (default: paper with a GPU, fast without)")
    p.add_argument("--app-dir", default=str(APP_DIR), help="the MONAI Label app to serve (default: apps/busi; monailabel writes logs/ and bin/ into it)")
    p.add_argument("--model-dir", default=None, help="where the app keeps its weights (default: APP_DIR/model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (for the warm-up and the app)")
    p.add_argument("--warmup-size", type=int, default=None, help="image size of the first model (default: the warmup preset's)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs of the first model (default: the warmup preset's)")
    p.add_argument("--no-warmup", action="store_true", help="do not train a first model when there are no weights")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app option, as monailabel's --conf")
    p.add_argument("--dry-run", action="store_true", help="prepare, then print the server command instead of running it")
    a, rest = p.parse_known_args(argv)
    a.server_args = rest  # e.g. --ssl_certfile ...: handed to monailabel start_server
    return a


def main(argv=None) -> int:
    a = _parse(argv)
    conf = {k: v for k, v in a.conf}
    if a.preset is None and "preset" not in conf:
        import torch

        a.preset = "paper" if torch.cuda.is_available() else "fast"
    if a.preset:
        conf["preset"] = a.preset
    if a.device != "auto":
        conf.setdefault("device", a.device)
    try:
        # The app serves a click network unless told `--conf clicks false` (then: the preset's),
        # beside an automatic network unless told `--conf automatic shared`.
        clicks = conf_flag(conf, "clicks", True)
        automatic = conf_automatic(conf)
    except ValueError as e:
        print(f"busi-monai serve: {e}", file=sys.stderr)
        return 2
    model_dir = conf.get("model_dir") or a.model_dir or default_model_dir(a.app_dir)
    conf["model_dir"] = os.path.realpath(model_dir)
    studies = Path(a.studies)

    if not studies.exists():
        src = Path(a.busi_root)
        if not src.is_dir():
            print(f"busi-monai serve: {src}: no such folder to build the studies from", file=sys.stderr)
            return 2
        print(f"busi-monai serve: building {studies} from {src} ...", flush=True)
        s = build_studies(src, studies, a.label_fraction)
        print(f"busi-monai serve: {s['studies']}: {s['labelled']} labelled images, {s['unlabelled_by_design']} left for you to label", flush=True)

    weights = Path(conf["model_dir"]) / MODEL_FILENAME
    if not weights.exists() and not conf.get("bundle") and not a.no_warmup:
        from busi_monai.model.networks import takes_clicks
        from busi_monai.training.loop import TrainingError
        from busi_monai.training.recipes import get_recipe

        try:
            if not clicks and takes_clicks(get_recipe(conf.get("preset") or "paper").network):
                clicks, automatic = True, "shared"  # the preset's own network takes clicks
            s = warm_up(
                studies, conf["model_dir"], image_size=a.warmup_size, epochs=a.warmup_epochs, device=a.device,
                clicks=clicks, automatic=automatic,
            )  # fmt: skip
        except TrainingError as e:
            print(f"busi-monai serve: no first model: {e}. Label some images in Slicer and press Train.", flush=True)
        else:
            print(f"busi-monai serve: warm-up training took {s['warmup_time_s']:.1f}s on {s['device']}", flush=True)
            for name, n in s["networks"].items():
                dice = n.get("best_val_dice")  # None: no lesion in the validation slice
                shown = f"validation Dice {dice:.3f} without clicks" if dice is not None else "no lesion to validate on"
                print(f"busi-monai serve: {name}: {shown}; published at {n['published']}", flush=True)

    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(a.app_dir), "--studies", str(studies.resolve()), "--host", a.host, "--port", str(a.port),
    ]  # fmt: skip
    for k, v in conf.items():
        cmd += ["--conf", k, str(v)]
    cmd += a.server_args
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"busi-monai serve: WARNING: binding {a.host} exposes the server to the network; "
            "enable MONAI Label's authentication first (apps/busi/README.md, 'On a network')",
            file=sys.stderr,
            flush=True,
        )
    print(f"busi-monai serve: connect 3D Slicer's MONAI Label module to http://{a.host}:{a.port}", flush=True)
    print("busi-monai serve: " + " ".join(cmd), flush=True)
    if a.dry_run:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
