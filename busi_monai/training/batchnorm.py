"""Batch-norm statistics recomputed over the training images once training ends ("precise BN").

Batch norm's running statistics are a moving average over the last few batches (momentum 0.1,
so about ten batches of four images). A click network's batches are a mixture that changes
from batch to batch (no clicks, clicks from the truth, corrective rounds, zoomed crops), so
those last batches leave statistics that match no input well, and the automatic outline,
which runs on the running statistics, moved from epoch to epoch far more than the weights did.
Recomputing them as a plain average over the training images, seen as inference sees them
(the image alone, guidance maps empty; dropout off), gives the served network statistics of
the inputs it is served. MONAI and PyTorch have no such step; detectron2's PreciseBN is the
same idea.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, batch_size: int = 16, amp: bool = False) -> int:
    """Reset ``model``'s batch-norm running statistics and recompute them as the average over
    ``images`` (N, C, S, S) on the model's device, in batches of ``batch_size``; returns the
    number of batch-norm layers recomputed. The model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(images):
        model.eval()
        return 0
    momenta = [m.momentum for m in norms]
    model.eval()  # dropout off: the statistics of what inference computes
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
        m.train()
    device = next(model.parameters()).device
    forward = getattr(model, "forward_parts", None)
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                forward(x) if forward is not None else model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return len(norms)
