"""Data-parallel training on the CPU: real gloo workers on this machine, started by torchrun's
launcher, take the steps one process takes with the same global batch, and a worker that
fails ends the whole run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ddp_worker import RECIPE, data

from busi_monai.model.checkpoint import load_checkpoint, model_from_checkpoint
from busi_monai.training.distributed import Ranks
from busi_monai.training.launch import WorkersFailed, run_command
from busi_monai.training.loop import fit

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
# fp32, one thread: the two runs sum the same images in another order (per-rank shares, then
# an all-reduce), so they agree to rounding: measured within 4e-6 over the epoch. Each rank
# normalising by its own share's statistics instead of the global batch's is off by 7e-3 at
# the first step. (Later steps amplify rounding: at 32 px the bridge's batch norm sees 2x2
# pixels per image, and after a few more steps the runs drift apart by 1e-4 to 1e-3.)
RTOL = 1e-5


def test_two_gloo_workers_take_the_steps_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    steps: list[float] = []
    fit(data(14, 0), data(4, 1), one, "fast", RECIPE, device="cpu", progress=False, amp=False, seed=0, on_step=lambda s, loss: steps.append(loss))
    run_command([WORKER, "--out", str(two)], nproc=2)

    two_steps = json.loads((two / "steps.json").read_text())
    assert len(steps) == len(two_steps) == 3  # 14 images in global batches of 5
    assert two_steps == pytest.approx(steps, rel=RTOL)
    assert abs(steps[-1] - steps[0]) > 100 * RTOL * steps[0], "the steps must change the loss for the match to mean anything"
    assert json.loads((two / "ranks.json").read_text())["max_difference"] == 0.0  # the ranks hold one model
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s2["best_val_score"] == pytest.approx(s1["best_val_score"], rel=RTOL, abs=1e-6)
    # One checkpoint, written by rank 0, that loads and infers as the one process's does.
    assert sorted(p.name for p in two.iterdir() if p.suffix == ".pt") == ["last.pt", "model.pt"]
    val = data(4, 1).images
    with torch.no_grad():
        p1, p2 = (torch.sigmoid(model_from_checkpoint(load_checkpoint(d / "model.pt"), torch.device("cpu"))(val)) for d in (one, two))
    assert torch.allclose(p1, p2, atol=1e-3), float((p1 - p2).abs().max())


@pytest.mark.timeout(180)
def test_a_failing_worker_ends_the_run_with_its_error(tmp_path):
    """Rank 1 raises after its second step while rank 0 trains on: the launcher stops rank 0 and
    reports rank 1's one-line error; no summary and no half-written file is left."""
    with pytest.raises(WorkersFailed, match=r"worker rank 1 failed: RuntimeError: out of memory \(simulated\)"):
        run_command([WORKER, "--out", str(tmp_path), "--fail-rank", "1"], nproc=2)
    assert len(json.loads((tmp_path / "steps.json").read_text())) < 3
    assert not (tmp_path / "summary.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_each_rank_gets_its_share_of_a_global_batch_and_of_its_lesions():
    batch = torch.tensor([7, 3, 9, 1, 4, 8, 2])
    has_lesion = torch.zeros(10, dtype=torch.bool)
    has_lesion[[9, 1, 8]] = True
    shares = [Ranks(r, 3).share(batch, has_lesion) for r in range(3)]
    assert sorted(i for idx, _ in shares for i in idx.tolist()) == sorted(batch.tolist())
    assert [n for _, n in shares] == [3, 2, 2]
    assert [int(has_lesion[idx].sum()) for idx, _ in shares] == [1, 1, 1]  # the sampler's lesions, one each
    # A rank left without an image still takes the step, with nothing to count.
    idx, n = Ranks(2, 3).share(torch.tensor([5, 6]))
    assert n == 0 and len(idx) == 1
    assert Ranks().share(batch) == (batch, 7)


@pytest.mark.slow  # two more interpreters that import torch and MONAI (about 25 s on 2 cores)
def test_in_memory_training_on_two_workers_reports_each_epoch_here(tmp_path):
    """The app's multi-GPU path (``fit_on_workers``), on two gloo workers: rank 0's summary and
    its epoch records come back to the calling process."""
    from busi_monai.training.launch import fit_on_workers

    records: list[dict] = []
    summary = fit_on_workers(data(14, 0), data(4, 1), tmp_path, "fast", RECIPE.with_overrides(epochs=2), nproc=2, device="cpu", progress=False, amp=False, on_epoch=records.append)
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert [r["epoch"] for r in records] == [1, 2] and all("val_score" in r for r in records)
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2]


def test_workers_are_given_the_command_less_the_launch_option():
    from busi_monai.training.launch import without_option

    argv = ["-v", "train", "--data", "d", "--nproc-per-node", "4", "--out", "o", "--nproc-per-node=2", "--seed", "1"]
    assert without_option(argv, "--nproc-per-node") == ["-v", "train", "--data", "d", "--out", "o", "--seed", "1"]


@pytest.mark.slow  # one more launch of two workers (about 20 s on 2 cores)
def test_resume_restores_every_rank(tmp_path):
    """One process trains an epoch; two workers resume it for a second. Rank 0 alone reads
    last.pt: if another rank kept its fresh momentum instead, its weights would part from rank
    0's at the first step, and the gathered weights would differ."""
    fit(data(14, 0), data(4, 1), tmp_path, "fast", RECIPE, device="cpu", progress=False, amp=False, seed=0)
    first = json.loads((tmp_path / "history.json").read_text())
    run_command([WORKER, "--out", str(tmp_path), "--resume", "--epochs", "2"], nproc=2)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[:1] == first
    assert len(json.loads((tmp_path / "steps.json").read_text())) == 3  # the second epoch's steps only
    assert json.loads((tmp_path / "ranks.json").read_text())["max_difference"] == 0.0
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
