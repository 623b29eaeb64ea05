"""The training step replayed as a CUDA graph (#20, `--cuda-graphs`): on a CPU the same step
runs eagerly on static buffers and must learn exactly as the plain loop does; the capture itself
is checked where a GPU is present; and the fresh-machine GPU script runs end to end in --tiny mode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from busi_monai.data.datasets import load_datalist
from busi_monai.data.packs import cache_items
from busi_monai.data.splits import split_validation
from busi_monai.training.graphs import GraphedStep
from busi_monai.training.loop import RunSettings, Trainer, TrainingError
from busi_monai.training.optimizers import make_optimizer
from busi_monai.training.recipes import get_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_scripts import checked_tiny_pack, load_script  # noqa: E402


def _data(prepared_sample, size=32):
    tr, va = split_validation(load_datalist(prepared_sample)["training"], 0.2, 0)
    return cache_items(tr, size, progress=False), cache_items(va, size, progress=False)


def test_graphed_training_learns_as_the_plain_loop_does(prepared_sample, tmp_path):
    train, val = _data(prepared_sample)
    recipe = get_recipe("fast").with_overrides(epochs=3, image_size=32, loss="dice_bce", learning_rate=3e-3, lr_schedule="cosine", batch_size=5)
    assert len(train) % recipe.batch_size, "the last, smaller batch must take the eager path beside the graphed one"
    histories = {}
    for graphs in (False, True):
        settings = RunSettings(device="cpu", progress=False, amp=False, cuda_graphs=graphs)
        trainer = Trainer(train, val, tmp_path / str(graphs), "fast", recipe, settings)
        trainer.run()
        histories[graphs] = json.loads((tmp_path / str(graphs) / "history.json").read_text())
    plain, graphed = histories[False], histories[True]
    # The same steps; the tensor learning rate takes another float path, whose rounding depends
    # on the thread count (1.4e-4 apart after three epochs in one thread): 1e-3, not exactness.
    assert [h["loss"] for h in graphed] == pytest.approx([h["loss"] for h in plain], rel=1e-3)
    assert [h["lr"] for h in graphed] == pytest.approx([h["lr"] for h in plain], rel=1e-6)
    assert graphed[-1]["lr"] < graphed[0]["lr"]
    # The schedule filled the graph's learning-rate tensor in place: a graph reads that tensor.
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(trainer.scheduler.get_last_lr()[0])


def test_graphed_step_refuses_what_a_graph_cannot_replay():
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    loss_fn = torch.nn.MSELoss()

    def step(x, y):
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="tensor learning rate"):
        GraphedStep(step, opt)
    opt = make_optimizer(get_recipe("paper"), net.parameters(), torch.device("cpu"), graph_safe=True)
    g = GraphedStep(step, opt)
    x = torch.rand(4, 1, 8, 8)
    before = net.weight.detach().clone()
    assert torch.isfinite(g(x, x)) and not torch.equal(net.weight, before)
    with pytest.raises(ValueError, match=r"batches of \(4, 1, 8, 8\)"):
        g(x[:2], x[:2])
    assert not g.captured  # no GPU: eager


def test_cuda_graphs_says_which_settings_it_cannot_take(prepared_sample, tmp_path):
    train, val = _data(prepared_sample)
    sgd = get_recipe("fast").with_overrides(epochs=1, image_size=32, optimizer="sgd_nesterov")
    with pytest.raises(TrainingError, match="sgd_nesterov cannot be captured"):
        Trainer(train, val, tmp_path / "a", "fast", sgd, RunSettings(device="cpu", cuda_graphs=True))
    with pytest.raises(TrainingError, match="exclude each other"):
        Trainer(train, val, tmp_path / "b", "fast", get_recipe("fast"), RunSettings(device="cpu", cuda_graphs=True, compile_model=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_the_captured_step_matches_the_eager_one():
    from busi_monai.model.networks import build_network

    recipe = get_recipe("paper").with_overrides(network="fast")
    torch.manual_seed(0)
    x, y = torch.rand(12, 4, 1, 64, 64, device="cuda"), (torch.rand(12, 4, 1, 64, 64, device="cuda") > 0.7).float()
    losses = {}
    for capture in (False, True):
        torch.manual_seed(1)
        net = build_network("fast").cuda().eval()  # eval: no dropout, so both ways see the same network
        opt = make_optimizer(recipe, net.parameters(), torch.device("cuda"), graph_safe=True)

        def step(a, b, net=net, opt=opt):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(a), b)
            loss.backward()
            opt.step()
            return loss

        g = GraphedStep(step, opt, warmup=2, capture=capture)
        losses[capture] = [float(g(x[i], y[i])) for i in range(len(x))]
        assert g.captured is capture
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def _script():
    return load_script("gpu_fresh_train")


def test_fresh_machine_script_tiny_end_to_end(tmp_path):
    mod = _script()
    pack = checked_tiny_pack(mod, tmp_path)
    with pytest.raises(SystemExit, match="unknown way"):
        mod.main(["--pack", str(pack), "--out", str(tmp_path / "o"), "--tiny", "--ways", "eager,jit"])
    out = tmp_path / "out"
    assert mod.main(["--pack", str(pack), "--out", str(out), "--tiny", "--ways", "eager,cuda_graphs"]) == 0
    res = json.loads((out / "result.json").read_text())
    assert list(res["ways"]) == ["eager", "cuda_graphs"]
    for way, r in res["ways"].items():
        assert r["cuda_graphs"] is (way == "cuda_graphs") and r["epochs"] == 2 and r["images"] == 64
        assert r["process_wall_s"] > r["train_loop_s"] > 0 and len(r["loss_per_epoch"]) == 2
        assert math.isfinite(r["test_dice"]) and r["test_images"] == res["pack"]["n_test"]
    # On a CPU both ways run the same eager step: the same training, up to the rounding of bf16
    # where the CPU trains in it (a float32 learning-rate tensor against a Python float).
    assert res["ways"]["cuda_graphs"]["loss_per_epoch"] == pytest.approx(res["ways"]["eager"]["loss_per_epoch"], rel=1e-2)
