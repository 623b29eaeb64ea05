"""Train tasks ``attention_unet`` and ``attention_unet_clicks``: busi_monai's ``fit`` (the paper's
recipe; for the click network, with click simulation) on the datastore's final labels.

MONAI Label runs this in a subprocess (``monailabel.interfaces.utils.app -m train``), so a
crash never takes the server down. Each run writes into ``<home>/runs/<run_id>/`` (``home``: the
model folder, or its ``clicks/`` folder for the click network) and, only once it has finished,
publishes its best weights with ``os.replace`` onto ``<home>/attention_unet.pt``; infer picks
them up at its next request. A run that fails (no labels, unreadable files) raises with the
reason and leaves the served model alone.

A run that was killed (server stopped, out of memory) is resumed from its ``last.pt`` by the
next request with the same settings and labels (``resume: false`` starts afresh). One training
at a time per model folder: a lock file refuses a second one, whichever way it was started.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import time

from filelock import FileLock, Timeout
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from busi_monai.jsonio import read_json, write_json
from busi_monai.serve import STATS_FILENAME

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".train.lock"
MAX_EPOCHS = 10000  # a Train option above it is refused: a typo, not a training anyone waits for


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) and v else v


def _yes(v) -> bool:
    return str(_first(v)).lower() not in ("false", "0", "no", "none", "off")


def _num(req: dict, key: str, cast, default, minimum=None, maximum=None):
    """Option ``key`` of a Train request as a finite ``cast`` (int or float) within the bounds,
    or ValueError naming it. A fraction for an integer option is refused, not cut off
    (``int(2.5)`` would train 2 epochs), and so are true/false, NaN and infinity."""
    raw = _first(req.get(key))
    if raw in (None, ""):
        return default
    shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."  # a 5000-digit number is not echoed whole
    try:
        if isinstance(raw, bool):
            raise ValueError
        if cast is float or isinstance(raw, float):
            f = float(raw)
            if not math.isfinite(f) or (cast is int and not f.is_integer()):
                raise ValueError
            v = cast(f)
        else:
            v = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"training option {key}={shown}: expected {'an integer' if cast is int else 'a finite number'}") from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"training option {key}={shown}: must be {bounds}")
    return v


class AttentionUNetTrain(TrainTask):
    """Trains one of the app's networks (``model``, an ``AppModel``; default the automatic one)
    from the served weights ``served``."""

    def __init__(self, served, settings, model=None):
        from busi_monai.training.launch import choose_gpus

        self.served = served
        self.settings = settings
        self.model = model or settings.automatic_model
        from busi_monai.model.networks import takes_clicks

        what = "the click network (clicks simulated from the labels)" if takes_clicks(self.model.recipe.network) else "the automatic network"
        super().__init__(
            f"Train the paper's Attention U-Net (preset {settings.preset}: BCE, Adam with decay), {what}, on the "
            f"labelled images; on {settings.device_description()}; by default {choose_gpus(settings.device)[1]}"
        )

    def config(self):
        r = self.model.recipe
        import torch

        devices = ["auto", "cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        if self.settings.device not in devices:
            devices.insert(0, self.settings.device)
        elif self.settings.device != devices[0]:
            devices.remove(self.settings.device)
            devices.insert(0, self.settings.device)
        return {
            "max_epochs": r.epochs,
            "train_batch_size": r.batch_size,
            "learning_rate": r.learning_rate,
            "val_split": r.val_fraction,
            "image_size": r.image_size,
            "device": devices,
            # As MONAI Label's own trainers: DistributedDataParallel over the server's GPUs.
            "multi_gpu": self.settings.device != "cpu" and torch.cuda.device_count() > 1,
            "gpus": "all",
            "pretrained": True,
            "resume": True,
            "seed": 0,
        }

    def stats(self):
        """The last training's statistics, for /info (Slicer shows them, and calls /info to
        connect). A missing file is no training yet; an unreadable one (truncated, corrupt, NaN
        from an older version, not an object) is reported in the log and in what is returned,
        never as an error: the next training replaces it."""
        path = self.model.stats_path
        if not os.path.exists(path):
            return {}
        try:
            stats, replaced = read_json(path)
        except (OSError, ValueError) as e:
            logger.warning("%s: %s is unreadable (%s); the next training replaces it", self.model.name, path, e)
            return {"name": self.model.name, "status": "UNREADABLE", "error": f"{STATS_FILENAME} is unreadable: {type(e).__name__}"}
        if not isinstance(stats, dict):
            logger.warning("%s: %s holds a %s, not statistics; the next training replaces it", self.model.name, path, type(stats).__name__)
            return {"name": self.model.name, "status": "UNREADABLE", "error": f"{STATS_FILENAME} holds no statistics"}
        if replaced:
            logger.warning("%s: %s has non-finite number(s) at %s, shown as null", self.model.name, path, ", ".join(replaced[:10]))
            stats["warnings"] = [f"non-finite value shown as null: {k}" for k in replaced[:10]]
        return stats

    def __call__(self, request, datastore: Datastore):
        from busi_monai.training.loop import TrainingError

        os.makedirs(self.model.home, exist_ok=True)
        lock = FileLock(os.path.join(self.model.home, LOCK_FILENAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise TrainingError(
                f"another training of {self.model.name} is running on this model folder; wait for it to finish or stop it"
            ) from None
        try:  # the OS drops the lock with the process, so a killed run never blocks the next
            return self._train(request, datastore)
        finally:
            lock.release()

    def _recipe(self, req: dict):
        """The recipe a Train request asks for: the app's preset with Slicer's options applied."""
        from busi_monai.training.loop import TrainingError

        base = self.model.recipe
        size = _num(req, "image_size", int, base.image_size, 32, 2048)
        if size % 16:
            raise TrainingError(f"image_size {size}: must be a multiple of 16 (the network pools four times)")
        return base.with_overrides(
            epochs=_num(req, "max_epochs", int, base.epochs, 1, MAX_EPOCHS),
            batch_size=_num(req, "train_batch_size", int, base.batch_size, 1),
            learning_rate=_num(req, "learning_rate", float, base.learning_rate, 0.0),
            val_fraction=_num(req, "val_split", float, base.val_fraction, 0.0, 0.9),
            image_size=size,
        )

    def _items(self, datastore: Datastore) -> tuple[list[dict], list[str]]:
        from busi_monai.training.loop import TrainingError
        from busi_monai.training.runs import usable_items

        items, problems = usable_items(datastore.datalist())
        for p in problems:
            logger.warning("skipping a labelled image: %s", p)
        if not items:
            why = f" ({len(problems)} labelled image(s) could not be used: {problems[0]})" if problems else ""
            raise TrainingError("no labelled images to train on: save at least one final label (Slicer: Submit Label) first" + why)
        return items, problems

    def _run_dir(self, fp: dict, resume: bool) -> tuple[str, int]:
        """A killed run with the same settings and labels goes on (its epoch returned); else a new run."""
        from busi_monai.model.checkpoint import load_checkpoint
        from busi_monai.training.runs import new_run, resumable_run

        found = resumable_run(self.model.home, fp) if resume else None
        if found is None:
            return str(new_run(self.model.home, fp)), 0
        resumed_from = int(load_checkpoint(found / "last.pt")["epoch"]) + 1
        logger.info(f"{self.model.name}: resuming the interrupted run %s after epoch %d", found.name, resumed_from)
        (found / "init.pt").unlink(missing_ok=True)  # the killed run's starting weights, not needed now
        return str(found), resumed_from

    def _init_weights(self, run_dir: str, ck: dict | None) -> str | None:
        """The served weights ``ck`` as the starting point (MONAI Label's "pretrained"), saved in the run."""
        import torch

        if ck is None:
            return None
        init = os.path.join(run_dir, "init.pt")
        torch.save(ck, init)
        logger.info(f"{self.model.name}: starting from the current weights (%s)", ck.get("source", "bundle"))
        return init

    @staticmethod
    def _keep_served_gate(run_dir: str, summary: dict, served: dict | None) -> None:
        """Too few normal (or lesion) labels to choose a gate on: keep the served model's gate
        rather than the recipe's default, which was chosen for another model. ``summary`` is
        updated (and rewritten) to say so."""
        from busi_monai.training.gate import checkpoint_gate, set_checkpoint_gate

        previous = checkpoint_gate(served)
        if previous is None or not str(summary.get("gate_source", "")).startswith("fallback"):
            return
        source = f"{summary['gate_source']}; kept the served model's gate"
        for name in ("model.pt", "last.pt"):
            path = os.path.join(run_dir, name)
            if os.path.isfile(path):
                set_checkpoint_gate(path, previous, source)
        summary.update(confidence_gate=previous, gate_source=source)
        write_json(summary, os.path.join(run_dir, "summary.json"))
        gate_json = os.path.join(run_dir, "gate.json")
        if os.path.isfile(gate_json):
            record, _ = read_json(gate_json)
            write_json({**record, "confidence_gate": previous, "gate_source": source}, gate_json)
        logger.info("confidence gate %.3g kept from the served model (%s)", previous, summary["gate_source"])

    def _train(self, request, datastore: Datastore):
        from busi_monai.data.packs import cache_items
        from busi_monai.data.splits import split_validation
        from busi_monai.serve import publish_model
        from busi_monai.training.launch import choose_gpus, fit_on_workers
        from busi_monai.training.loop import fit
        from busi_monai.training.runs import fingerprint, prune_runs

        req = {**self.config(), **(request or {})}
        logger.info("%s train request: %s", self.model.name, {k: v for k, v in req.items() if k != "local_rank"})
        recipe = self._recipe(req)
        seed = _num(req, "seed", int, 0)
        device = str(_first(req.get("device")) or self.settings.device)
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            device = "auto"  # e.g. a GPU's name, as MONAI Label's own trainers list them
        pretrained = _yes(req.get("pretrained", True))
        gpus, mode = choose_gpus(device, _yes(req.get("multi_gpu")), req.get("gpus") or "all")
        logger.info("%s: %s", self.model.name, mode)
        items, problems = self._items(datastore)
        fp = fingerprint(self.settings.preset, recipe, seed, device, pretrained, items)
        run_dir, resumed_from = self._run_dir(fp, _yes(req.get("resume", True)))
        run_id = os.path.basename(run_dir)
        epochs = recipe.epochs
        train_items, val_items = split_validation(items, recipe.val_fraction, seed)
        logger.info(
            f"{self.model.name}: training on %d labelled images (%d train, %d validation), %d epochs, batch %d, lr %g, %dpx, device %s -> runs/%s",
            len(items), len(train_items), len(val_items), epochs, recipe.batch_size, recipe.learning_rate, recipe.image_size, device, run_id,
        )
        served = self.served.init_checkpoint()
        init = self._init_weights(run_dir, served) if not resumed_from and pretrained else None

        start_ts = time.time()
        stats = {
            "name": self.model.name, "run_id": run_id, "start_ts": int(start_ts), "total_epochs": epochs,
            "status": "RUNNING", "resumed_from_epoch": resumed_from,
        }  # fmt: skip

        def on_epoch(rec: dict):
            stats.update(
                epoch=rec["epoch"],
                loss=rec.get("loss"),
                val_dice=rec.get("val_dice"),
                current_time=str(datetime.timedelta(seconds=int(time.time() - start_ts))),
            )
            logger.info(f"{self.model.name} epoch %d/%d: %s", rec["epoch"], epochs, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items() if k != "epoch"})
            write_json(stats, os.path.join(run_dir, "progress.json"))

        train = cache_items(train_items, recipe.image_size, progress=False, pad_square=recipe.pad_square)
        val = cache_items(val_items, recipe.image_size, progress=False, pad_square=recipe.pad_square)
        summary = (functools.partial(fit_on_workers, gpus=gpus) if gpus else fit)(
            train, val, run_dir, preset=self.settings.preset, recipe=recipe, device=device,
            init_checkpoint=init, progress=False, seed=seed, on_epoch=on_epoch, resume=bool(resumed_from),
        )
        if init and os.path.exists(init):
            os.unlink(init)
        self._keep_served_gate(run_dir, summary, served)

        published = publish_model(os.path.join(run_dir, "model.pt"), self.model.home)
        version = self.served.version()
        total = time.time() - start_ts
        best = summary.get("best_val_dice")  # None when no validation image had a lesion
        stats.update(
            status="DONE",
            total_time=str(datetime.timedelta(seconds=int(total))),
            total_time_s=round(total, 2),
            train_time_s=round(float(summary.get("train_time_s", total)), 2),
            epoch=epochs,
            epochs=epochs,
            # What chose the weights: lesion Dice, with an empty mask on a normal image counting 1.
            best_metric=summary.get("best_val_score"),
            best_val_dice=best,
            n_train=summary.get("n_train"),
            n_val=summary.get("n_val"),
            skipped=problems,
            device=summary.get("device"),
            training_mode=mode,
            world_size=summary.get("world_size", 1),
            preset=self.settings.preset,
            recipe=summary.get("recipe"),
            confidence_gate=summary.get("confidence_gate"),
            gate_source=summary.get("gate_source"),
            # Relative to model_dir: /info shows these, and the server's folders are not the client's business.
            run_dir=os.path.relpath(run_dir, self.settings.model_dir),
            model=os.path.relpath(self.model.model_path, self.settings.model_dir),
            model_version=version.version if version else None,
            published_ts=int(time.time()),
        )
        stats.pop("current_time", None)
        write_json(stats, os.path.join(run_dir, "train_stats.json"))
        write_json(stats, self.model.stats_path)
        prune_runs(self.model.home)
        logger.info(f"{self.model.name}: published %s (version %s, best val Dice %s) in %s", published, stats["model_version"], best, stats["total_time"])
        return stats
