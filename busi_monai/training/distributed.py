"""Data-parallel training over several processes: torch.distributed under torchrun's launcher.

Each worker (started by ``busi-monai train --nproc-per-node N``, or by an outer ``torchrun``)
finds its place in the standard environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), joins the process group (gloo on a CPU, nccl on GPUs) with
a collective timeout, and trains its share of every global batch through
DistributedDataParallel. The shares of one batch together are the batch one process would
train on, and batch-norm statistics are the global batch's (:class:`SyncedBatchNorm`), so
N workers take the same steps as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)

# How long a collective waits for a rank that has stopped answering before the run fails.
# Rank 0 validates and writes checkpoints while the others wait at the next step, so it must
# exceed one validation; a rank that dies is noticed by the launcher at once, not after this.
DEFAULT_TIMEOUT_S = 900.0


def launched() -> bool:
    """Whether this process is one worker of several (torchrun set ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the workers; one process is ``Ranks()``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def seed(self, seed: int) -> int:
        """A seed for this rank's own random draws (dropout, augmentation, clicks, zoom); rank 0
        keeps ``seed``, so one process draws what it always drew."""
        return seed + 1_000_003 * self.rank

    def share(self, batch: torch.Tensor, has_lesion: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """This rank's images of one global ``batch`` (indices), and how many count.

        The batch is dealt round-robin, lesion images first, so each rank holds its share of the
        lesion images the sampler put there. A rank left without an image (a last batch smaller
        than the world) gets the batch's first one with count 0: it must still take the step."""
        if not self.active:
            return batch, len(batch)
        if has_lesion is not None:
            les = has_lesion[batch.cpu()]
            batch = torch.cat((batch[les.to(batch.device)], batch[~les.to(batch.device)]))
        mine = batch[self.rank :: self.world_size]
        return (mine, len(mine)) if len(mine) else (batch[:1], 0)

    def from_main(self, make):
        """``make()`` as rank 0 computes it, on every rank (``make`` runs on rank 0 only)."""
        if not self.active:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (``t`` itself for one process)."""
        if self.active:
            t = t.clone()
            dist.all_reduce(t)
        return t


def current() -> Ranks:
    """The ranks of the joined process group, or ``Ranks()`` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def backend_for(device: str) -> tuple[str, str]:
    """The backend and this worker's device: nccl and ``cuda:LOCAL_RANK`` where there is a GPU
    and the run may use it, else gloo and the CPU."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device != "cpu" and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"worker {local} on this machine has no GPU of its own ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local)
        return "nccl", f"cuda:{local}"
    return "gloo", "cpu"


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the workers' process group for the block and yield this worker's device; without
    a launcher, yield ``device`` as it is. A worker's error is recorded for the launcher (its
    one line is what the launcher reports) and the group is left on the way out."""
    if not launched():
        yield device
        return
    backend, dev = backend_for(device)
    # torchrun stops the others with SIGTERM: unwind, so no temporary file is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield dev
    except BaseException as e:
        record_error(e)
        raise
    finally:
        # gloo's threads release their last collective's tensors, which takes the GIL; torch
        # joins those threads holding it when the group is freed, so let them finish first.
        time.sleep(0.2)
        dist.destroy_process_group()


def record_error(e: BaseException) -> None:
    """Write ``e`` where torchrun reads a failed worker's error (``TORCHELASTIC_ERROR_FILE``)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and not isinstance(e, SystemExit):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


class SyncedBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are the global batch's, over every rank, on any
    backend (torch's SyncBatchNorm takes GPU tensors only, and gloo trains on the CPU). Two
    differentiable all-reduces (the mean, then the variance about it); in eval mode, or in one
    process, it is plain :class:`~torch.nn.BatchNorm2d`, with the same parameters and buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf, dims = x.float(), (0, 2, 3)
        count = xf.new_full((1,), xf.numel() / xf.shape[1])
        sums = all_reduce(torch.cat((xf.sum(dims), count)))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def synced_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d made a :class:`SyncedBatchNorm`, in place: the same
    parameter and buffer tensors, so optimisers and checkpoints see no difference."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = SyncedBatchNorm
        else:
            synced_batch_norm(child)
    return model


class TrainingForward(nn.Module):
    """The network's training forward (``forward_parts``) as a module's ``forward``, so that
    DistributedDataParallel, which hooks ``forward``, sees it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        return self.net.forward_parts(x)


def data_parallel(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model``'s training forward under DistributedDataParallel (gradients averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(TrainingForward(model), device_ids=ids)
