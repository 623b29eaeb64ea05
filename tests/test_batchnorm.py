"""Precise batch norm: the running statistics recomputed as the plain average over the
training images, with dropout off, and the momentum given back."""

from __future__ import annotations

import torch
from torch import nn

from busi_monai.training.batchnorm import recalibrate_batch_norm


def test_running_statistics_become_the_average_over_the_images_seen_without_dropout():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.Dropout(0.9), nn.BatchNorm2d(3))
    net[2].running_mean.fill_(7.0)  # stale statistics from "the last batches"
    images = torch.rand(8, 1, 6, 6)
    assert recalibrate_batch_norm(net, images, batch_size=4) == 1
    with torch.no_grad():
        feats = conv(images)  # dropout off: what inference feeds the norm
    # Two equal batches: the cumulative average of the batch means is the mean over all images.
    torch.testing.assert_close(net[2].running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    assert net[2].momentum == 0.1 and not net.training and not net[2].training


def test_a_click_network_is_served_with_precise_statistics(tmp_path):
    from busi_monai.data.packs import CachedData
    from busi_monai.model.checkpoint import load_checkpoint
    from busi_monai.training.loop import fit
    from busi_monai.training.recipes import get_recipe

    images, labels = torch.rand(8, 1, 32, 32), torch.zeros(8, 1, 32, 32)
    labels[:, :, 8:20, 8:20] = 1
    data = CachedData(images, labels, [{"id": str(i), "class": "benign"} for i in range(8)])
    recipe = get_recipe("interactive").with_overrides(image_size=32, epochs=1, zoom_fraction=0.0)
    fit(data, data.subset([]), tmp_path, "interactive", recipe, device="cpu", progress=False, amp=False)
    assert load_checkpoint(tmp_path / "model.pt")["precise_batch_norm"] == 8
