"""The app's Train offers ``multi_gpu`` and ``gpus`` as MONAI Label's own trainers do; where
there are not two GPUs it trains in one process, as before, and says so in its stats (/info)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from busi_monai.data.datasets import load_datalist
from busi_monai.training.launch import choose_gpus

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "busi"


def test_gpu_choice_needs_two_visible_gpus():
    assert choose_gpus("cpu") == ([], "one process on the CPU")
    gpus, line = choose_gpus("cpu", multi_gpu=True, gpus="0,1")
    assert gpus == [] and "multi_gpu asked for, but there is no GPU" in line


def test_multi_gpu_train_on_a_cpu_falls_back_to_one_process_and_says_so(prepared_sample, tmp_path):
    pytest.importorskip("monailabel")
    sys.path.insert(0, str(APP_DIR))
    from lib.configs.attention_unet import AppSettings
    from lib.trainers.attention_unet import AttentionUNetTrain

    from busi_monai.inference.served import ServedModel

    conf = {"preset": "fast", "device": "cpu", "model_dir": str(tmp_path / "model"), "clicks": "false"}
    settings = AppSettings.from_conf(conf, str(APP_DIR))
    task = AttentionUNetTrain(ServedModel(settings.model_path, None, "cpu"), settings)
    assert task.config()["multi_gpu"] is False and task.config()["gpus"] == "all"
    assert "by default one process on the CPU" in task.description

    class Datastore:
        def datalist(self):
            return [{"image": it["image"], "label": it["label"]} for it in load_datalist(prepared_sample)["training"][:8]]

    request = {"multi_gpu": True, "gpus": "all", "max_epochs": 1, "image_size": 32, "train_batch_size": 4, "val_split": 0.25}
    stats = task(request, Datastore())
    assert stats["status"] == "DONE" and stats["world_size"] == 1 and stats["device"] == "cpu"
    assert stats["training_mode"].startswith("one process: multi_gpu asked for, but there is no GPU")
    assert json.loads(Path(settings.stats_path).read_text())["training_mode"] == stats["training_mode"]
    assert Path(settings.model_path).is_file()  # published, as a single-process Train publishes
