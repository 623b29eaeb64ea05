"""`python -m busi_monai.serve` (what `make serve` runs), and Train on a few labels: the stats it
leaves must never stop /info from answering, since 3D Slicer calls /info to connect.

The server is started as `make serve` starts it (studies built from a BUSI-layout folder, a
warm-up model trained and published, then MONAI Label), on 2 lesion and 8 normal synthetic
images: with so few lesions, a validation slice of normal images only is likely, which is how
every labelling session starts.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import AppServer, import_app_lib  # noqa: E402

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from busi_monai.jsonio import loads_strict
from busi_monai.model.checkpoint import load_checkpoint
from busi_monai.serve import MODEL_FILENAME, STATS_FILENAME

MODEL = "attention_unet"
CLICKS = "attention_unet_clicks"
WARMUP = ["--warmup-epochs", "3", "--warmup-size", "32"]
# What the Train button sends, kept small: the point is the statistics, not the model.
TRAIN = {"max_epochs": 1, "image_size": 32, "device": "cpu"}
# A stats file as an older version wrote it after a validation slice without lesions.
OLD_NAN_STATS = (
    '{"name": "attention_unet", "status": "DONE", "epoch": 1, "val_dice": NaN, "best_metric": NaN,'
    ' "best_val_dice": NaN, "loss": Infinity, "n_train": 8, "n_val": 2}'
)


def mini_busi(sample_dir: Path, out: Path, counts: dict[str, int]) -> Path:
    """A BUSI-layout folder with the first ``counts[cls]`` synthetic images of each class."""
    for cls, n in counts.items():
        (out / cls).mkdir(parents=True)
        images = sorted((sample_dir / cls).glob(f"{cls} (*).png"), key=lambda p: int(p.stem.split("(")[1].split(")")[0]))
        for img in [p for p in images if "_mask" not in p.name][:n]:
            for f in (sample_dir / cls).glob(f"{img.stem}*.png"):
                shutil.copy(f, out / cls / f.name)
    return out


def info(srv) -> dict:
    """GET /info/, which must answer 200 with strict JSON (no NaN, no infinity)."""
    r = requests.get(f"{srv.url}/info/", timeout=30)
    assert r.status_code == 200, (r.status_code, r.text[:300], srv.log_tail(3000))
    return loads_strict(r.text)


def train(srv, params: dict, timeout: float = 300) -> tuple[dict, int]:
    """Press Train and poll /info (as Slicer's progress display does) until the task ends;
    returns the task and how many /info calls answered after /train/ said it was running."""
    r = requests.post(f"{srv.url}/train/{MODEL}", json=params, timeout=60)
    assert r.status_code == 200, r.text[:300]
    polls, deadline = 0, time.time() + timeout
    while True:
        st = requests.get(f"{srv.url}/train/", timeout=30).json()
        if st.get("status") not in ("SUBMITTED", "RUNNING"):
            info(srv)
            return st, polls
        info(srv)
        polls += 1
        assert time.time() < deadline, f"training did not end in {timeout}s\n{srv.log_tail(3000)}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def served(sample_dir, tmp_path_factory):
    """(server, studies, model_dir) started by `python -m busi_monai.serve` on 2 benign + 8 normal images."""
    root = tmp_path_factory.mktemp("serve")
    busi = mini_busi(sample_dir, root / "busi", {"benign": 2, "normal": 8})
    studies, model_dir = root / "studies", root / "model"
    srv = AppServer(
        studies, model_dir, conf={"preset": "fast"}, workdir=root / "server", env={"MONAI_LABEL_TASKS_SCORING": "false"},
        serve_args=["--busi-root", str(busi), "--label-fraction", "1", "--device", "cpu", *WARMUP], startup_timeout=300,
    )  # fmt: skip
    srv.start()
    try:
        yield srv, studies, model_dir
    finally:
        srv.stop()


def test_serve_builds_studies_trains_a_warmup_model_and_serves_it(served):
    srv, studies, model_dir = served
    images = sorted(p.name for p in studies.glob("*.nii.gz"))
    labels = sorted(p.name for p in (studies / "labels" / "final").iterdir())
    assert len(images) == 10 and labels == images
    warm = load_checkpoint(model_dir / "runs" / "warmup" / "model.pt")
    assert warm["preset"] == "warmup" and warm["preprocessing"]["image_size"] == 32
    assert warm["recipe"]["loss"] == "dice_bce" and warm["recipe"]["epochs"] == 3
    split = json.loads((model_dir / "runs" / "warmup" / "split.json").read_text())
    held = {it["id"] for it in split["validation"]}
    assert held and not held & {it["id"] for it in split["training"]}
    assert len(held) + len(split["training"]) == 10
    got = info(srv)
    assert MODEL in got["models"] and got["busi"]["model_version"] and (model_dir / MODEL_FILENAME).is_file()
    assert "warm-up training took" in srv.log_tail(100000)
    # The click tool beside the automatic one, whatever the preset (here `fast`), on a warm-up
    # click network that takes clicks, the previous outline and boxes; the automatic network
    # takes the image alone.
    clicks = got["models"][CLICKS]
    assert clicks["type"] == "deepgrow" and clicks["dimension"] == 2
    assert warm["recipe"]["network"] == "fast" and warm["network"]["in_channels"] == 1
    warm_clicks = load_checkpoint(model_dir / "clicks" / "runs" / "warmup" / "model.pt")
    assert warm_clicks["recipe"]["network"] == "fast+clicks+prev+instancenorm" and warm_clicks["network"]["in_channels"] == 4
    assert got["busi"]["click_model_file"] == f"clicks/{MODEL_FILENAME}" and got["busi"]["click_model_version"] != got["busi"]["model_version"]


@pytest.mark.parametrize("val_split", [None, 0.2], ids=["default-val-split", "val-split-0.2"])
def test_train_on_few_labels_leaves_info_answering_with_finite_figures(served, val_split):
    """The issue's reproduction: 2 lesion and 8 normal labels, so the validation slice holds
    normal images only; /info answers during and after the training, with null where a
    figure is not defined (the lesion Dice of no lesion) and never NaN."""
    srv, _, model_dir = served
    params = TRAIN if val_split is None else {**TRAIN, "val_split": val_split}
    version, weights = info(srv)["busi"]["model_version"], (model_dir / MODEL_FILENAME).read_bytes()
    task, polls = train(srv, params)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-20:])
    # /info answered while the task ran (the process starts in seconds: it was seen running),
    # and the training did train: new weights published, every epoch in its history.
    assert polls >= 1, "the training was never seen running"
    stats = info(srv)["train_stats"][MODEL]
    assert stats["model_version"] != version and (model_dir / MODEL_FILENAME).read_bytes() != weights
    assert stats["status"] == "DONE" and stats["n_train"] + stats["n_val"] == 10 and stats["n_val"] >= 1
    # Stratified by lesion/normal: 2 lesion images are too few to hold one out at these fractions.
    assert stats["best_val_dice"] is None
    assert isinstance(stats["best_metric"], float) and 0 <= stats["best_metric"] <= 1
    on_disk = loads_strict((model_dir / STATS_FILENAME).read_text())
    assert on_disk["model_version"] == stats["model_version"]
    run = model_dir / stats["run_dir"]
    history = loads_strict((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, params["max_epochs"] + 1))
    assert all(h["val_dice"] is None and 0 <= h["val_score"] <= 1 for h in history)
    loads_strict((run / "summary.json").read_text())
    assert requests.get(f"{srv.url}/model/{MODEL}", timeout=30).status_code == 200
    assert requests.post(f"{srv.url}/activelearning/random", json={}, timeout=30).status_code == 200
    if val_split is not None:  # the exact request: and after a restart, as make serve restarts
        srv.stop()
        srv.start()
        assert info(srv)["train_stats"][MODEL] == stats


def test_info_answers_whatever_the_stats_file_holds(sample_dir, trained_model, tmp_path):
    """At start-up the stats file may be from an older version (NaN), truncated, or not an
    object: /info still answers 200 and says what is wrong; the next Train replaces the file."""
    from busi_monai.data.studies import build_studies
    from busi_monai.serve import publish_model

    studies, model_dir = tmp_path / "studies", tmp_path / "model"
    build_studies(mini_busi(sample_dir, tmp_path / "busi", {"benign": 2, "malignant": 2, "normal": 2}), studies, label_fraction=1.0)
    publish_model(trained_model, model_dir)
    stats_path = model_dir / STATS_FILENAME
    stats_path.write_text(OLD_NAN_STATS)
    srv = AppServer(studies, model_dir, conf={"preset": "fast", "device": "cpu"}, workdir=tmp_path / "server",
                    env={"MONAI_LABEL_TASKS_SCORING": "false"})  # fmt: skip
    with srv:
        stats = info(srv)["train_stats"][MODEL]
        assert stats["best_metric"] is None and stats["val_dice"] is None and stats["loss"] is None
        assert stats["n_val"] == 2 and any("best_metric" in w for w in stats["warnings"])
        assert requests.post(f"{srv.url}/activelearning/random", json={}, timeout=30).status_code == 200
        assert requests.get(f"{srv.url}/model/{MODEL}", timeout=30).status_code == 200
        # Changed while the server runs: every kind of damage is reported, never a 500.
        for damaged in (OLD_NAN_STATS[: len(OLD_NAN_STATS) // 2], "", "[1, 2, 3]", "\x00\xff garbage"):
            stats_path.write_text(damaged)
            stats = info(srv)["train_stats"][MODEL]
            assert stats["status"] == "UNREADABLE" and STATS_FILENAME in stats["error"], (damaged, stats)
        version = info(srv)["busi"]["model_version"]
        task, _ = train(srv, TRAIN)
        assert task["status"] == "DONE", "\n".join(task.get("details", [])[-20:])
        assert loads_strict(stats_path.read_text())["status"] == "DONE"
        after = info(srv)
        assert after["train_stats"][MODEL]["status"] == "DONE" and after["busi"]["model_version"] != version
    # And a truncated file at start-up.
    stats_path.write_text('{"name": "attention_unet", "status": "DO')
    with srv:
        assert info(srv)["train_stats"][MODEL]["status"] == "UNREADABLE"


def test_the_warm_up_model_takes_clicks_boxes_and_the_previous_outline(sample_dir, tmp_path):
    """The first models `serve` publishes: an automatic network, and beside it one the click tool
    can use at once: clicks, the previous outline and a box."""
    import numpy as np

    from busi_monai.data.studies import build_studies
    from busi_monai.inference.predictor import Predictor
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.serve import MODEL_FILENAME, warm_up

    build_studies(sample_dir, tmp_path / "studies", label_fraction=0.5)
    warm_up(tmp_path / "studies", tmp_path / "model", image_size=32, epochs=1, device="cpu", clicks=True)
    automatic = load_checkpoint(tmp_path / "model" / MODEL_FILENAME)
    assert automatic["network"]["in_channels"] == 1 and automatic["recipe"]["network"] == "fast"
    ck = load_checkpoint(tmp_path / "model" / "clicks" / MODEL_FILENAME)
    assert ck["network"]["in_channels"] == 4 and ck["recipe"]["network"] == "fast+clicks+prev+instancenorm"
    p = Predictor(ck, device="cpu")
    assert p.takes_clicks and p.takes_previous
    img = np.random.default_rng(0).random((40, 60)).astype(np.float32)
    m = p.predict_clicks(img, foreground=[(20, 45)], box=(10, 35, 30, 55), previous=np.zeros((40, 60), np.uint8)).mask
    assert m[20, 45] == 1 and m[:, :35].sum() == 0 and m[:9].sum() == 0


def _dry_run_conf(capsys, argv) -> tuple[int, dict]:
    """`python -m busi_monai.serve ... --dry-run`: its exit code and the app options it would start with."""
    from busi_monai.serve import main

    rc = main(argv)
    out = capsys.readouterr()
    line = [ln for ln in out.out.splitlines() if "start_server" in ln]
    args = line[-1].split() if line else []
    return rc, {args[i + 1]: args[i + 2] for i, a in enumerate(args) if a == "--conf"}


def test_the_default_server_offers_the_click_model_beside_the_automatic_one(tmp_path, capsys, monkeypatch):
    """`make serve` without a preset: the app it starts lists `attention_unet_clicks` (DeepGrow,
    2D), and Train trains the preset's recipe on the click network; `--conf clicks false`
    leaves the preset's network alone."""
    from busi_monai.model.networks import with_click_guidance
    from busi_monai.serve import APP_DIR
    from busi_monai.training.recipes import get_recipe

    (tmp_path / "studies").mkdir()  # an existing (empty) studies folder is not rebuilt
    base = ["--studies", str(tmp_path / "studies"), "--no-warmup", "--dry-run", "--model-dir", str(tmp_path / "model")]
    rc, conf = _dry_run_conf(capsys, base)
    assert rc == 0 and conf["preset"] in ("paper", "fast") and "clicks" not in conf

    import_app_lib(monkeypatch)
    from lib.configs.attention_unet import AttentionUNet
    from monailabel.interfaces.tasks.infer_v2 import InferType

    task = AttentionUNet()
    task.init(MODEL, conf["model_dir"], conf, None, app_dir=str(APP_DIR))
    infers = task.infer()
    assert set(infers) >= {MODEL, CLICKS}
    assert infers[CLICKS].type == InferType.DEEPGROW and infers[CLICKS].dimension == 2
    assert infers[MODEL].type == InferType.SEGMENTATION
    preset = get_recipe(conf["preset"])
    # Two networks, a trainer each (Slicer's Train "ALL" runs both): the automatic one on the
    # preset's network, the click one with the click maps and the previous outline as inputs,
    # in its own folder.
    trainers = task.trainer()
    assert list(trainers) == [MODEL, CLICKS]
    automatic, click = (trainers[n].model for n in (MODEL, CLICKS))
    assert automatic.recipe.network == preset.network and automatic.model_path == str(Path(conf["model_dir"]) / MODEL_FILENAME)
    assert click.recipe.network == with_click_guidance(preset.network) == f"{preset.network}+clicks+prev+instancenorm"
    assert click.model_path == str(Path(conf["model_dir"]) / "clicks" / MODEL_FILENAME)
    # The preset's hyperparameters stay; click simulation sits beside them.
    for trains in (automatic.recipe, click.recipe):
        assert (trains.loss, trains.learning_rate, trains.batch_size, trains.epochs, trains.image_size) == (
            preset.loss, preset.learning_rate, preset.batch_size, preset.epochs, preset.image_size,
        )  # fmt: skip
    assert trainers[CLICKS].config()["image_size"] == preset.image_size

    # One network for both tools, as before the networks were separate.
    shared = AttentionUNet()
    shared.init(MODEL, conf["model_dir"], {**conf, "automatic": "shared"}, None, app_dir=str(APP_DIR))
    assert list(shared.trainer()) == [MODEL] and CLICKS in shared.infer()
    assert shared.settings.recipe.network == f"{preset.network}+clicks+prev+instancenorm"
    with pytest.raises(ValueError, match="--conf automatic 'both'"):
        AttentionUNet().init(MODEL, conf["model_dir"], {**conf, "automatic": "both"}, None, app_dir=str(APP_DIR))
    rc, _ = _dry_run_conf(capsys, [*base, "--conf", "automatic", "both"])
    assert rc == 2

    off = AttentionUNet()
    off.init(MODEL, conf["model_dir"], {**conf, "preset": "fast", "clicks": "false"}, None, app_dir=str(APP_DIR))
    assert CLICKS not in off.infer() and off.settings.recipe.network == "fast" and list(off.trainer()) == [MODEL]
    with pytest.raises(ValueError, match="--conf clicks 'maybe'"):
        AttentionUNet().init(MODEL, conf["model_dir"], {**conf, "clicks": "maybe"}, None, app_dir=str(APP_DIR))
    rc, _ = _dry_run_conf(capsys, [*base, "--conf", "clicks", "maybe"])
    assert rc == 2
