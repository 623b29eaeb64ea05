"""The app's Train through the real MONAI Label server, as 3D Slicer drives it (monailabel.client):

* an option out of its range (``max_epochs``, ``train_batch_size``, ``learning_rate``,
  ``val_split``, ``image_size``) fails the Train with the option named in its error, publishes
  nothing, and the server keeps serving; the trainer's own check of each option is then run
  in-process on many more values, where a refusal costs no training subprocess;
* ``pretrained`` (default true) starts from the served weights, ``pretrained=false`` from scratch:
  at learning rate 0 the parameters stay where they started, so the published ones are the
  served ones exactly, or, from scratch, differ from them in every kernel;
* ``resume`` (default true) continues an interrupted run with the same settings and labels;
  ``resume=false`` starts a new run and leaves the interrupted one alone;
* a served model of another network (another preset's width) is not a starting point: the
  Train starts from scratch, says so in its log, and publishes a model of the app's network.

Each test plants the served model it starts from. The server is small: five synthetic images,
32 px, the fast preset, 1-2 epochs, scoring off.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import APP_DIR, AppServer, import_app_lib  # noqa: E402

pytest.importorskip("monailabel")
pytest.importorskip("itk")

MODEL = "attention_unet"
NETWORK = "fast"  # what the app trains for Run with --conf preset fast (the click network beside it shares the code)
OTHER = "half"  # another preset's width: its weights cannot start NETWORK
# lr 0: the parameters stay at their starting point (batch-norm statistics still move).
TRAIN = {"max_epochs": 1, "image_size": 32, "train_batch_size": 4, "learning_rate": 0.0, "val_split": 0.25, "seed": 0}
ERROR_LINE = re.compile(r"^\S*(Error|Exception): (.*)$")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from busi_monai.data.studies import build_studies
    from busi_monai.data.synth import synthesize

    root = tmp_path_factory.mktemp("train-app")
    synthesize(root / "busi", 5, seed=11, size_range=(64, 96))
    studies = root / "studies"
    build_studies(root / "busi", studies, label_fraction=1.0)
    srv = AppServer(studies, root / "model", workdir=root / "server", conf={"preset": "fast", "device": "cpu"},
                    env={"MONAI_LABEL_TASKS_SCORING": "false"})  # fmt: skip
    image = sorted(p.name.split(".")[0] for p in studies.glob("*.nii.gz"))[0]
    srv.start()
    try:
        yield srv, root / "model", image
    finally:
        srv.stop()


def _plant(model_dir: Path, network: str, seed: int) -> dict:
    """A served model of ``network`` with weights drawn from ``seed`` (not the Train's seed 0)."""
    from busi_monai.model.checkpoint import atomic_torch_save, make_checkpoint
    from busi_monai.model.networks import build_network, network_config
    from busi_monai.serve import MODEL_FILENAME
    from busi_monai.training.recipes import get_recipe

    torch.manual_seed(seed)
    net = build_network(network_config(network))
    ck = make_checkpoint(net, get_recipe("fast").with_overrides(network=network, image_size=32), "fast")
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ck, model_dir / MODEL_FILENAME)
    return ck


def _params(ck: dict) -> dict[str, torch.Tensor]:
    """The learnable parameters of a checkpoint (not the batch-norm statistics, which lr 0 leaves moving)."""
    from busi_monai.model.checkpoint import model_from_checkpoint

    return {k: v.detach() for k, v in model_from_checkpoint(ck).named_parameters()}


def _published(model_dir: Path) -> dict:
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.serve import MODEL_FILENAME

    return load_checkpoint(model_dir / MODEL_FILENAME)


def _train(srv: AppServer, client, params: dict, stop_if_started: bool = False) -> dict:
    """Start a Train and wait for its end; the task's final status with its details (log lines).
    ``stop_if_started``: a Train that should have been refused but began training is stopped at
    once (it could run for 10**6 epochs) and returned as it stood."""
    task = client.train_start(MODEL, params)
    deadline, stopped = time.time() + 300, False
    while True:
        st = client.train_status()
        if st.get("id") == task.get("id") and st["status"] not in ("SUBMITTED", "RUNNING"):
            return {**st, "status": "STARTED (stopped by the test)"} if stopped else st
        if stop_if_started and not stopped and any("training on" in line for line in st.get("details", [])):
            client.train_stop()  # then wait for its end, so that the next Train is not refused as a second one
            stopped = True
        assert time.time() < deadline, f"training did not end in 300s\n{srv.log_tail(3000)}"
        time.sleep(0.3)


def _errors(st: dict) -> list[str]:
    """The exception messages in a task's details (the request line names every option, so a bare
    search for the option's name would match any failure)."""
    return [m.group(2) for line in st.get("details", []) if (m := ERROR_LINE.match(line.strip()))]


def _done(st: dict) -> dict:
    assert st["status"] == "DONE", "\n".join(st.get("details", [])[-30:])
    return st


# --------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,value",
    # "nan" as text, as typed in an option field: a bare NaN is not JSON, and FastAPI cannot answer it.
    # Two through the server (a Train that is refused costs a subprocess); every value in-process below.
    [("max_epochs", 10**6), ("learning_rate", "nan")],
    ids=["huge-epochs", "lr-nan"],
)
def test_out_of_range_option_fails_the_train_names_it_and_publishes_nothing(app, client, option, value):
    from busi_monai.serve import MODEL_FILENAME

    srv, model_dir, image = app
    _plant(model_dir, NETWORK, seed=3)
    before, version = (model_dir / MODEL_FILENAME).read_bytes(), client.info()["busi"]["model_version"]
    stats_before = client.info()["train_stats"].get(MODEL)

    st = _train(srv, client, {**TRAIN, option: value}, stop_if_started=True)
    assert st["status"] in ("FAILED", "ERROR"), f"{option}={value!r} was not refused: {st['status']}"
    assert any(option in e for e in _errors(st)), (option, _errors(st), st.get("details", [])[-10:])

    assert (model_dir / MODEL_FILENAME).read_bytes() == before, "a refused Train publishes nothing"
    info = client.info()
    assert info["busi"]["model_version"] == version and info["train_stats"].get(MODEL) == stats_before
    result, params = client.infer(MODEL, image, {"result_extension": ".nrrd"})
    assert Path(result).is_file() and params["model_version"] == version, "and the server keeps serving"


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    """The app's trainer in this process (as MONAI Label's train subprocess builds it), on an
    empty model folder."""
    import_app_lib(monkeypatch)
    from lib.configs.attention_unet import AppSettings
    from lib.trainers.attention_unet import AttentionUNetTrain

    settings = AppSettings.from_conf({"preset": "fast", "device": "cpu", "model_dir": str(tmp_path / "model")}, str(APP_DIR))
    return AttentionUNetTrain(None, settings), tmp_path / "model"


class _Unreached:
    """The datastore of a request the trainer should refuse before it reads any label."""

    def datalist(self):
        raise AssertionError("not refused: the trainer went on to read the labels")


REFUSED = {
    # max_epochs=0 is the cold-start test's.
    "max_epochs": [-3, 2.5, "2.5", True, "two", float("inf"), 10_001, 10**400],
    "train_batch_size": [0, -1, 1.5, "four"],
    "learning_rate": [-1e-3, float("inf"), "-inf", "fast"],
    "val_split": [1.0, -0.1, 0.95, float("nan")],
    "image_size": [16, 4096, 64.5, 56, 40],  # 56, 40: in range, not multiples of 16
}


@pytest.mark.parametrize("option,value", [(k, v) for k, vs in REFUSED.items() for v in vs], ids=lambda v: repr(v)[:12])
def test_trainer_refuses_each_out_of_range_value_naming_the_option(trainer, option, value):
    from busi_monai.serve import MODEL_FILENAME
    from busi_monai.training.loop import TrainingError

    train, model_dir = trainer
    with pytest.raises((ValueError, TrainingError), match=rf"^(training option )?{option}\b") as e:
        train({**TRAIN, option: value}, _Unreached())
    assert len(str(e.value)) < 200, "the value is not echoed whole"
    assert not (model_dir / MODEL_FILENAME).exists() and not (model_dir / "runs").exists()


def test_trainer_takes_the_values_at_its_bounds(trainer):
    train, _ = trainer
    r = train._recipe({**TRAIN, "max_epochs": "10000", "train_batch_size": 2.0, "learning_rate": 0, "val_split": 0.9, "image_size": 2048})
    assert (r.epochs, r.batch_size, r.learning_rate, r.val_fraction, r.image_size) == (10000, 2, 0.0, 0.9, 2048)
    r = train._recipe({**TRAIN, "max_epochs": [1], "val_split": "0", "image_size": "32"})  # Slicer's list and text forms
    assert (r.epochs, r.val_fraction, r.image_size) == (1, 0.0, 32)


# --------------------------------------------------------------------------------------
# pretrained and resume
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained_run(app, tmp_path_factory):
    """A 2-epoch Train from a planted served model at lr 0 (pretrained, the default): what it
    started from, what it published, and a copy of its finished run folder."""
    srv, model_dir, _ = app
    client = srv.client(tmp_path_factory.mktemp("client"))
    served = _plant(model_dir, NETWORK, seed=1234)
    params = {**TRAIN, "max_epochs": 2}
    st = _done(_train(srv, client, params))
    stats = client.info()["train_stats"][MODEL]
    copy = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(model_dir / stats["run_dir"], copy)
    return {"served": served, "published": _published(model_dir), "params": params, "stats": stats, "run": copy, "details": st["details"]}


def test_pretrained_starts_from_the_served_weights_and_false_from_scratch(app, client, pretrained_run):
    srv, model_dir, _ = app
    served = _params(pretrained_run["served"])
    # Default (pretrained): after two epochs at lr 0 the published parameters are the served ones, bit for bit.
    published = _params(pretrained_run["published"])
    assert published.keys() == served.keys()
    assert [k for k in served if not torch.equal(published[k], served[k])] == []

    _plant(model_dir, NETWORK, seed=1234)
    _done(_train(srv, client, {**TRAIN, "pretrained": False}))
    scratch = _params(_published(model_dir))
    # From scratch: the seed-0 initialisation, unlike the seed-1234 served weights in every kernel.
    kernels = [k for k, v in served.items() if v.dim() >= 2]
    assert len(kernels) > 10 and [k for k in kernels if torch.equal(scratch[k], served[k])] == []


def _interrupt(model_dir: Path, finished: Path, marker: float) -> Path:
    """A copy of a finished 2-epoch run as a kill after its first epoch leaves it: no
    train_stats.json, last.pt at epoch 1 of 2 (its parameters shifted by ``marker``, to tell
    them from any other starting point), no best score yet."""
    from busi_monai.model.checkpoint import atomic_torch_save, load_checkpoint
    from busi_monai.training.runs import RUNS_DIRNAME

    run = model_dir / RUNS_DIRNAME / time.strftime("%Y%m%d_%H%M%S_999999")  # the newest run's name
    shutil.copytree(finished, run)
    (run / "train_stats.json").unlink()
    (run / "model.pt").unlink()
    last = load_checkpoint(run / "last.pt")
    params = set(_params(last))
    last["state_dict"] = {k: v + marker if k in params else v for k, v in last["state_dict"].items()}
    last.update(epoch=0, history=last["history"][:1], best_val_score=-math.inf, best_val_dice=None)
    atomic_torch_save(last, run / "last.pt")
    return run


def test_resume_continues_an_interrupted_run_and_false_starts_afresh(app, client, pretrained_run):
    from busi_monai.training.runs import FINISHED_FILENAME

    srv, model_dir, _ = app
    served = _params(_plant(model_dir, NETWORK, seed=1234))
    interrupted = _interrupt(model_dir, pretrained_run["run"], marker=0.5)
    marked = _params(torch.load(interrupted / "last.pt", weights_only=False))

    # resume=false: a new run from the served weights; the interrupted one is left as it was.
    _done(_train(srv, client, {**pretrained_run["params"], "resume": False}))
    stats = client.info()["train_stats"][MODEL]
    assert stats["run_id"] != interrupted.name and stats["resumed_from_epoch"] == 0
    assert not (interrupted / FINISHED_FILENAME).exists() and (interrupted / "last.pt").is_file()
    fresh = _params(_published(model_dir))
    assert all(torch.equal(fresh[k], served[k]) for k in served)

    # resume (the default): the same settings and labels continue the interrupted run at epoch 2,
    # from its last.pt's parameters, not from the served ones.
    _done(_train(srv, client, pretrained_run["params"]))
    stats = client.info()["train_stats"][MODEL]
    assert stats["run_id"] == interrupted.name and stats["resumed_from_epoch"] == 1
    assert (interrupted / FINISHED_FILENAME).is_file()
    history = json.loads((interrupted / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    resumed = _params(_published(model_dir))
    assert all(torch.equal(resumed[k], marked[k]) for k in marked)
    assert not any(torch.equal(resumed[k], served[k]) for k in served if served[k].dim() >= 2)


# --------------------------------------------------------------------------------------
# Another architecture
# --------------------------------------------------------------------------------------
def test_served_model_of_another_network_trains_from_scratch_and_says_so(app, client):
    from busi_monai.model.networks import NetworkConfig, network_config

    srv, model_dir, image = app
    other = _plant(model_dir, OTHER, seed=5)
    assert tuple(other["network"]["encoder_channels"]) != network_config(NETWORK).encoder_channels
    before = client.info()["busi"]["model_version"]

    st = _done(_train(srv, client, TRAIN))  # pretrained by default: the served model is asked for
    assert any("another architecture; training from scratch" in line for line in st["details"]), st["details"][-20:]

    ck = _published(model_dir)
    assert replace(NetworkConfig.from_dict(ck["network"]), confidence_gate=0.0) == network_config(NETWORK), "the app's network, not the served one's"
    info = client.info()
    assert info["busi"]["model_version"] not in (None, before) and info["train_stats"][MODEL]["status"] == "DONE"
    result, params = client.infer(MODEL, image, {"result_extension": ".nrrd"})
    assert Path(result).is_file() and params["model_version"] == info["busi"]["model_version"]
