"""Shared fixtures: the real BUSI copy, the committed synthetic sample set, and one small
model trained on it once per test session (fast preset, small images) for the tests that
need a model (infer, app, bundle, explain)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Property tests draw the same examples on every run and every machine (a verdict must not
# depend on a random draw), and keep no example database, nor any other file, in the repository.
settings.register_profile("busi", derandomize=True, database=None, print_blob=True)
settings.load_profile("busi")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="busi-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the machine's cores: each (and the servers and CLIs it starts) gets its share.
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample-data"
BUSI_ROOT = Path(os.environ.get("BUSI_ROOT", REPO.parent / "shared" / "busi" / "Dataset_BUSI_with_GT"))

# The session's model (for the tests that need one that has learned: infer, app, bundle,
# explain): the warm-up recipe (Dice+BCE, 3e-3, cosine) at 64 px and batch 4, on 90 synthetic
# images made for the session with seed 1, so that sample-data/ (seed 0) stays unseen.
TEST_PRESET = "warmup"
TEST_OVERRIDES = {"image_size": 64, "batch_size": 4, "epochs": 40}
TEST_SYNTH = {"count": 120, "seed": 1}

@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_pytest_tmp(tmp_path_factory):
    """Temporary files of the tests and of the servers and CLIs they start (infer results,
    benchmark folders) go under pytest's own temporary folder, which pytest cleans up."""
    import tempfile

    tmp = tmp_path_factory.mktemp("tmp")
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(tmp), str(tmp)
    yield tmp
    tempfile.tempdir = old_tempdir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


@pytest.fixture(scope="session")
def busi_root() -> Path:
    if not BUSI_ROOT.is_dir():
        pytest.skip(f"real BUSI copy not found at {BUSI_ROOT} (set BUSI_ROOT)")
    return BUSI_ROOT


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert (SAMPLE_DATA / "benign").is_dir(), "sample-data/ is missing its synthetic images"
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def prepared_sample(sample_dir, tmp_path_factory) -> Path:
    from busi_monai.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared-sample")
    prepare(sample_dir, out, test_fraction=0.25, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def training_set(tmp_path_factory) -> Path:
    """A prepared dataset of synthetic images made for the session (90 training, 30 test)."""
    from busi_monai.data.prepare import prepare
    from busi_monai.data.synth import synthesize

    root, lock = _once_per_run(tmp_path_factory, "training-set")
    with lock:
        if not root.with_suffix(".done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            synthesize(root / "busi", TEST_SYNTH["count"], seed=TEST_SYNTH["seed"])
            prepare(root / "busi", root / "prepared", test_fraction=0.25, seed=0, progress=False)
            root.with_suffix(".done").touch()
    return root / "prepared"


def _once_per_run(tmp_path_factory, name: str) -> tuple[Path, object]:
    """A folder shared by every worker of this pytest run (pytest-xdist), and a lock to build it
    once: the first worker that needs it builds it, the others wait for it and reuse it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return shared / f"shared-{name}", FileLock(str(shared / f"shared-{name}.lock"))


@pytest.fixture(scope="session")
def trained_run(training_set, tmp_path_factory) -> Path:
    """A run directory (model.pt, last.pt, history.json) of :data:`TEST_PRESET` on the training set.

    It learns with margin on both numeric paths. Lesion Dice on sample-data's test split (10
    images it never saw), seeds 0-4, one thread, measured on an AVX-512 BF16 CPU:
    bf16 0.571-0.683 (mean 0.636), fp32 (``BUSI_MONAI_AMP=0``) 0.599-0.720 (mean 0.672); on
    its own 30 test images 0.657-0.778 and 0.634-0.779. The tests that need a model that has
    learned ask for lesion Dice > 0.4 and for some outline on a few lesion images. (Before,
    the fast preset at 96 px on sample-data's 30 images scored 0.26-0.36 in one thread.)
    """
    from busi_monai.training.loop import train_dataset

    out, lock = _once_per_run(tmp_path_factory, "run")
    with lock:
        if not out.with_suffix(".done").is_file():
            shutil.rmtree(out, ignore_errors=True)
            train_dataset(training_set, out, preset=TEST_PRESET, device="cpu", progress=False, overrides=TEST_OVERRIDES)
            out.with_suffix(".done").touch()
    return out


@pytest.fixture(scope="session")
def trained_model(trained_run) -> Path:
    return trained_run / "model.pt"


@pytest.fixture(scope="module")
def client(app, tmp_path_factory):
    """A monailabel.client for the module's own ``app`` fixture (server, ...)."""
    return app[0].client(tmp_path_factory.mktemp("client"))


MODEL_FIXTURES = {"trained_model", "trained_run"}
FIRST_MODEL_FILE = "test_app.py"  # the longest file that needs the model: its worker trains it first


def pytest_collection_modifyitems(session, config, items):
    """With several workers (``-n``, a file to a worker), keep them busy while the session's model
    trains: one file that needs it goes first (its worker trains the model), then every file that
    does not, then the other files that need it, by when the model is there to reuse."""
    files = [item.nodeid.split("::")[0] for item in items]
    with_model = [f for item, f in zip(items, files) if MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))]
    first = next((f for f in with_model if f.endswith(FIRST_MODEL_FILE)), with_model[0] if with_model else None)
    rank = {f: 0 if f == first else (2 if f in with_model else 1) for f in files}
    order = {id(item): (rank[f], i) for i, (item, f) in enumerate(zip(items, files))}
    items.sort(key=lambda item: order[id(item)])


# The suite writes nothing into the repository: each session compares the untracked files
# (ignored ones too, e.g. apps/busi/model/) and the content of the tracked files that differ
# from HEAD before and after. Python's own __pycache__ aside.
def _untracked() -> set[str] | None:
    import hashlib

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".", ":!.venv", ":!*.egg-info"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    state = {p for p in paths if "__pycache__/" not in p and not p.endswith(".pyc")}
    for line in out.splitlines():
        if line[:2] not in ("??", "!!"):  # a tracked file changed: its content now
            f = REPO / line[3:].split(" -> ")[-1]
            digest = hashlib.sha256(f.read_bytes()).hexdigest()[:12] if f.is_file() else "deleted"
            state.add(f"{line[3:]} (tracked, changed: {digest})")
    return state


def pytest_sessionstart(session):
    session.config._busi_untracked = _untracked()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
    before = getattr(session.config, "_busi_untracked", None)
    after = _untracked() if before is not None else None
    if before is None or after is None or hasattr(session.config, "workerinput"):
        return
    new = sorted(after - before)
    if new:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = f"the test session wrote into the repository: {', '.join(new[:10])}"
        if tr:
            tr.write_line(f"ERROR: {msg}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
