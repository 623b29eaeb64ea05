"""Starting the workers of a data-parallel run through torch's elastic launcher (torchrun's).

``busi-monai train --nproc-per-node N`` hands its own command line to torchrun's ``run`` (as
``torchrun --standalone --nproc-per-node N -m busi_monai.cli train ...`` would); the app's
Train hands its in-memory data to ``elastic_launch``. Either way a worker that fails stops
the others at once (no restarts), and the failure comes back as one :class:`WorkersFailed`
line naming the rank and its error.
"""

from __future__ import annotations

import logging
import threading
import uuid

from busi_monai.training.distributed import DEFAULT_TIMEOUT_S, process_group
from busi_monai.training.loop import RunSettings, TrainingError, fit

log = logging.getLogger(__name__)


class WorkersFailed(TrainingError):
    """A worker of a data-parallel run failed; the others were stopped."""


def failure_line(e) -> str:
    """The first failed worker's rank and one-line error, from torchrun's ChildFailedError."""
    rank, failure = e.get_first_failure()
    message = failure.message if isinstance(failure.message, str) else (failure.message or {}).get("message", "")
    if not message or message.startswith("To enable traceback"):
        message = f"exit code {failure.exitcode} (its own output above says why)"
    return f"worker rank {rank} failed: {(message.strip().splitlines() or [''])[0]}"


def run_command(program: list[str], nproc: int, monitor_interval: float = 0.1) -> None:
    """Run ``python PROGRAM`` (a script and its arguments, or ``-m module ...``) in ``nproc``
    workers on this machine, through torchrun's own entry (standalone rendezvous, no
    restarts); raise :class:`WorkersFailed` when one fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", f"--monitor-interval={monitor_interval}", *program]
    )
    try:
        run(args)
    except ChildFailedError as e:
        raise WorkersFailed(failure_line(e)) from None


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option VALUE`` and ``option=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def fit_on_workers(
    train, val, out, preset: str = "paper", recipe=None, settings: RunSettings | None = None, gpus: list[int] | None = None,
    nproc: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **setting_overrides,
) -> dict:
    """:func:`~busi_monai.training.loop.fit` in local workers through ``elastic_launch``: one
    per GPU of ``gpus``, or ``nproc`` gloo processes on the CPU. Rank 0's summary is returned
    and its ``on_epoch`` records reach ``settings.on_epoch`` here, in this process. Arguments
    as :func:`~busi_monai.training.loop.fit` takes them."""
    import multiprocessing
    import os
    from dataclasses import replace

    from busi_monai.training.recipes import get_recipe

    settings = replace(settings or RunSettings(), **setting_overrides)
    recipe = recipe or get_recipe(preset)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus:
        ids = visible.split(",") if visible else [str(g) for g in range(max(gpus) + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] for g in gpus)  # the workers inherit it
        nproc = len(gpus)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )  # fmt: skip
    manager = multiprocessing.get_context("spawn").Manager()
    records = manager.Queue()
    relay = threading.Thread(target=_relay, args=(records, settings.on_epoch), daemon=True)
    relay.start()
    worker_settings = replace(settings, on_epoch=None, on_step=None)
    try:
        results = elastic_launch(config, _fit_worker)(train, val, str(out), preset, recipe, worker_settings, timeout_s, records)
    except ChildFailedError as e:
        raise WorkersFailed(failure_line(e)) from None
    finally:
        records.put(None)
        relay.join(timeout=10)
        manager.shutdown()
        if gpus:
            if visible is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return results[0]


def _relay(records, on_epoch) -> None:
    while (rec := records.get()) is not None:
        if on_epoch:
            on_epoch(rec)


def _fit_worker(train, val, out, preset, recipe, settings, timeout_s, records):
    from dataclasses import replace

    with process_group(settings.device, timeout_s) as device:
        return fit(train, val, out, preset, recipe, replace(settings, device=device, on_epoch=records.put))


def choose_gpus(device: str, multi_gpu: bool | None = None, gpus="all") -> tuple[list[int], str]:
    """The GPUs a training runs DistributedDataParallel over ([]: one process, as before) and
    a line saying which. ``multi_gpu`` None: on when more than one GPU is visible; ``gpus``
    ``all``, a comma list or a list of indices."""
    import torch

    n = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if multi_gpu is None:
        multi_gpu = n > 1
    if not multi_gpu:
        return [], f"one process on {'a GPU' if n else 'the CPU'}"
    if isinstance(gpus, str):
        gpus = list(range(n)) if gpus.strip().lower() in ("", "all") else [int(g) for g in gpus.split(",") if g.strip()]
    chosen = sorted({int(g) for g in gpus if 0 <= int(g) < n})
    if len(chosen) < 2:
        why = "there is no GPU" if n == 0 else f"{len(chosen)} of GPUs {list(gpus)} is visible"
        return [], f"one process: multi_gpu asked for, but {why}, so it trains as a single-device run"
    return chosen, f"DistributedDataParallel over GPUs {chosen} ({len(chosen)} workers)"
