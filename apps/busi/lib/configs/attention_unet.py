"""Configuration of the ``attention_unet`` model of the BUSI app, and the served model.

Everything model-related is read from ``busi_monai`` (network, preprocessing, recipe), so the
CLI, the bundle and this app train and segment identically. This module adds what is
specific to a running MONAI Label server:

* :class:`AppSettings`: the ``--conf`` options (preset, image_size, epochs, device, mc_passes,
  bundle, model_dir, score_labeled, max_image_pixels), parsed and checked once.
* :class:`ServedModel`: the weights infer and scoring use, kept loaded, and reloaded at the
  next request when the published file (or the bundle) changes on disk. Training publishes
  with ``os.replace`` so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.config import TaskConfig

from busi_monai.data.io import DEFAULT_MAX_PIXELS
from busi_monai.serve import MODEL_FILENAME, STATS_FILENAME, default_model_dir
from busi_monai.training.recipes import PRESETS, get_recipe
from lib.activelearning.mc_dropout import (
    MCDropoutDiverseStrategy,
    MCDropoutStrategy,
    TypiClustStrategy,
)
from lib.errors import ModelNotAvailable
from lib.infers.attention_unet import AttentionUNetInfer, ClickInfer, GradCamInfer
from lib.scoring.mc_dropout import MCDropoutScoring
from lib.trainers.attention_unet import AttentionUNetTrain

logger = logging.getLogger(__name__)

NAME = "attention_unet"
LABELS = {"lesion": 1}
TRUE = ("1", "true", "yes", "on")


def _conf_int(conf: dict, key: str, default: int | None) -> int | None:
    v = conf.get(key)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} {v!r}: expected an integer") from None


@dataclass
class AppSettings:
    preset: str = "paper"
    image_size: int | None = None  # None: the preset's (256 for the paper)
    epochs: int | None = None  # None: the preset's (50 for the paper)
    device: str = "auto"
    mc_passes: int = 8
    bundle: str | None = None
    model_dir: str = ""
    score_labeled: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # images and labels above it are refused (4xx)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_conf(cls, conf: dict | None, app_dir: str) -> "AppSettings":
        conf = dict(conf or {})
        preset = str(conf.get("preset") or "paper")
        if preset not in PRESETS:
            raise ValueError(f"--conf preset {preset!r}: choose one of {', '.join(PRESETS)}")
        device = str(conf.get("device") or "auto")
        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("--conf device %s asked for, but no CUDA GPU is available: using the CPU", device)
            device = "cpu"
        bundle = conf.get("bundle") or None
        if bundle and not os.path.isdir(bundle):
            raise ValueError(f"--conf bundle {bundle}: not a directory (expected an exported MONAI bundle)")
        mc_passes = _conf_int(conf, "mc_passes", 8)
        if mc_passes < 2:
            raise ValueError("--conf mc_passes: at least 2 Monte Carlo passes are needed to measure disagreement")
        max_pixels = _conf_int(conf, "max_image_pixels", DEFAULT_MAX_PIXELS)
        if max_pixels < 64:
            raise ValueError(f"--conf max_image_pixels {max_pixels}: must be at least 64 (8x8 pixels)")
        return cls(
            preset=preset,
            image_size=_conf_int(conf, "image_size", None),
            epochs=_conf_int(conf, "epochs", None),
            device=device,
            mc_passes=mc_passes,
            bundle=os.path.realpath(bundle) if bundle else None,
            model_dir=os.path.realpath(conf.get("model_dir") or default_model_dir(app_dir)),
            score_labeled=str(conf.get("score_labeled", "false")).lower() in TRUE,
            max_image_pixels=max_pixels,
            extra=conf,
        )

    @property
    def recipe(self):
        return get_recipe(self.preset).with_overrides(epochs=self.epochs, image_size=self.image_size)

    @property
    def takes_clicks(self) -> bool:
        """The preset trains a click-guided network (``+clicks``), so Slicer gets the click tool too."""
        from busi_monai.model.networks import network_config

        return network_config(self.recipe.network).in_channels > 1

    @property
    def model_path(self) -> str:
        return os.path.join(self.model_dir, MODEL_FILENAME)

    @property
    def stats_path(self) -> str:
        return os.path.join(self.model_dir, STATS_FILENAME)

    def resolved_device(self) -> torch.device:
        from busi_monai.device import resolve_device

        return resolve_device(self.device)

    def device_description(self) -> str:
        dev = self.resolved_device()
        if dev.type == "cuda":
            return f"GPU {torch.cuda.get_device_name(dev)}"
        return f"CPU ({torch.get_num_threads()} threads)"


def _bundle_stamp(bundle: str) -> tuple:
    """Newest mtime and total size of a bundle's files: changes when the bundle is re-exported."""
    newest, size, n = 0, 0, 0
    for root, _, files in os.walk(bundle):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            newest, size, n = max(newest, st.st_mtime_ns), size + st.st_size, n + 1
    return (newest, size, n)


def _bundle_loader():
    try:
        from busi_monai.bundle.export import checkpoint_from_bundle as load
    except ImportError as e:
        raise ModelNotAvailable(
            "--conf bundle: serving a bundle needs busi_monai.bundle.checkpoint_from_bundle, "
            f"which this installation of busi_monai does not have ({e})"
        ) from None
    return load


def checkpoint_from_bundle(bundle: str) -> dict:
    return _bundle_loader()(bundle)


@dataclass
class ModelVersion:
    source: str  # "model" (the app's published weights) or "bundle"
    path: str
    version: str  # short content hash
    mtime: float
    stamp: tuple

    def as_params(self) -> dict:
        # The file's name only: responses do not reveal the server's folders.
        return {"model_source": self.source, "model_file": os.path.basename(self.path), "model_version": self.version, "model_mtime": self.mtime}


class ServedModel:
    """The weights to serve: the published model, or the bundle, whichever is newer.

    A bundle given with ``--conf bundle`` is served until a training in this app publishes
    newer weights. Loaded once; reloaded when the file's (mtime, size, inode) changes.
    """

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self._lock = threading.RLock()
        self._predictor = None
        self._version: ModelVersion | None = None
        self._hashes: dict = {}

    # -- which weights ------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, str, tuple, float]]:
        out = []
        p = self.settings.model_path
        try:
            st = os.stat(p)
            out.append(("model", p, (st.st_mtime_ns, st.st_size, st.st_ino), st.st_mtime))
        except OSError:
            pass
        if self.settings.bundle:
            stamp = _bundle_stamp(self.settings.bundle)
            out.append(("bundle", self.settings.bundle, stamp, stamp[0] / 1e9))
        return out

    def exists(self) -> bool:
        return bool(self._candidates())

    def current_source(self) -> tuple[str, str, tuple, float]:
        cands = self._candidates()
        if not cands:
            raise ModelNotAvailable(
                f"no trained weights yet: {self.settings.model_path} does not exist. Train the model first "
                f"(Slicer: Train; or `python -m busi_monai.serve`, which trains a small model on the sample data)"
            )
        return max(cands, key=lambda c: c[3])

    def init_checkpoint(self) -> dict | None:
        """The weights to start a training from (None: there are none)."""
        try:
            ck, _ = self._load(self.current_source())
            return ck
        except ModelNotAvailable:
            return None

    def _load(self, src) -> tuple[dict, ModelVersion]:
        kind, path, stamp, mtime = src
        if kind == "bundle":
            ck = checkpoint_from_bundle(path)
            version = hashlib.sha256(repr(stamp).encode()).hexdigest()[:12]
            return ck, ModelVersion("bundle", path, version, mtime, stamp)
        from busi_monai.model.checkpoint import CheckpointError

        # Read the bytes through one file descriptor: the stamp then matches what was read
        # even if training replaces the file meanwhile.
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable model checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ck, dict) or "state_dict" not in ck or "network" not in ck:
            raise CheckpointError(f"{path}: not a busi-monai checkpoint (no network config or weights)")
        ck["source"] = path
        version = hashlib.sha256(data).hexdigest()[:12]
        return ck, ModelVersion("model", path, version, st.st_mtime, stamp)

    def version(self) -> ModelVersion | None:
        """The version that the next request would use, without loading it (None: no model)."""
        try:
            kind, path, stamp, mtime = self.current_source()
        except ModelNotAvailable:
            return None
        with self._lock:
            if self._version is not None and self._version.stamp == stamp and self._version.path == path:
                return self._version
            cached = self._hashes.get((path, stamp))
        if cached is None:
            if kind == "model":
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                cached = h.hexdigest()[:12]
            else:
                cached = hashlib.sha256(repr(stamp).encode()).hexdigest()[:12]
            with self._lock:
                self._hashes = {(path, stamp): cached}
        return ModelVersion(kind, path, cached, mtime, stamp)

    def get(self):
        """``(Predictor, ModelVersion)``, reloading the weights if they changed on disk."""
        from busi_monai.inference.predictor import Predictor

        with self._lock:
            src = self.current_source()
            if self._predictor is None or self._version is None or self._version.stamp != src[2] or self._version.path != src[1]:
                ck, ver = self._load(src)
                old = self._version.version if self._version else None
                self._predictor = Predictor(ck, device=self.settings.device)
                self._version = ver
                logger.info(
                    "attention_unet: loaded %s %s (version %s%s) on %s",
                    ver.source, ver.path, ver.version, f", was {old}" if old else "", self._predictor.device,
                )
            return self._predictor, self._version


class AttentionUNet(TaskConfig):
    """MONAI Label task config: one infer, one trainer, MC-dropout scoring and strategy."""

    def init(self, name: str, model_dir: str, conf: dict, planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.app_dir = kwargs.get("app_dir") or str(Path(__file__).resolve().parents[2])
        self.settings = AppSettings.from_conf(conf, self.app_dir)
        os.makedirs(self.settings.model_dir, exist_ok=True)
        self.model_dir = self.settings.model_dir
        self.path = self.settings.model_path
        self.labels = dict(LABELS)
        self.served = ServedModel(self.settings)
        if self.settings.bundle:
            _bundle_loader()  # fail at start, with the reason, rather than at the first Run
        logger.info(
            "attention_unet: preset=%s image_size=%s epochs=%s device=%s model=%s bundle=%s",
            self.settings.preset, self.settings.recipe.image_size, self.settings.recipe.epochs,
            self.settings.device_description(), self.settings.model_path, self.settings.bundle,
        )

    def infer(self):
        infers = {
            self.name: AttentionUNetInfer(self.served, self.settings, self.labels),
            f"{self.name}_gradcam": GradCamInfer(self.served, self.settings),
        }
        if self.settings.takes_clicks:
            infers[f"{self.name}_clicks"] = ClickInfer(self.served, self.settings, self.labels)
        return infers

    def trainer(self):
        return AttentionUNetTrain(self.served, self.settings)

    def strategy(self):
        # First is Slicer's default: typiclust measured best, if within noise (README, active learning).
        return {"typiclust": TypiClustStrategy(), "mc_dropout_diverse": MCDropoutDiverseStrategy(), "mc_dropout": MCDropoutStrategy()}

    def scoring_method(self):
        return {"mc_dropout": MCDropoutScoring(self.served, self.settings)}
