"""Configuration of the ``attention_unet`` model of the BUSI app, and the served model.

Everything model-related is read from ``busi_monai`` (network, preprocessing, recipe), so the
CLI, the bundle and this app train and segment identically. This module adds what is
specific to a running MONAI Label server:

* :class:`AppSettings`: the ``--conf`` options (preset, image_size, epochs, device, mc_passes,
  bundle, model_dir, score_labeled, max_image_pixels, clicks, automatic, outline_cache), parsed
  and checked once.
* :class:`AppModel`: each network the app trains and serves (its recipe and files): the
  automatic network (Run, Grad-CAM, scoring) and, beside it, the click network.
* the served models (:class:`busi_monai.inference.served.ServedModel`): the weights infer and
  scoring use, reloaded at the next request when the published file (or the bundle) changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.config import TaskConfig

from busi_monai.data.io import DEFAULT_MAX_PIXELS
from busi_monai.inference.outlines import DEFAULT_CAPACITY, OutlineCache
from busi_monai.inference.served import ClickModels, ServedModel
from busi_monai.serve import (
    AUTOMATIC_NAME,
    CLICKS_NAME,
    MODEL_FILENAME,
    STATS_FILENAME,
    app_networks,
    conf_automatic,
    conf_flag,
    default_model_dir,
)
from busi_monai.training.recipes import PRESETS, get_recipe
from lib.activelearning.mc_dropout import (
    MCDropoutDiverseStrategy,
    MCDropoutStrategy,
    TypiClustStrategy,
)
from lib.infers.attention_unet import AttentionUNetInfer, ClickInfer, GradCamInfer
from lib.scoring.mc_dropout import MCDropoutScoring
from lib.trainers.attention_unet import AttentionUNetTrain

logger = logging.getLogger(__name__)

NAME = AUTOMATIC_NAME
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


@dataclass(frozen=True)
class AppModel:
    """One network the app trains and serves: the trainer's name, its recipe, and the folder of
    its published weights, statistics, runs and training lock."""

    name: str
    recipe: Any  # busi_monai.training.recipes.Recipe
    home: str

    @property
    def model_path(self) -> str:
        return os.path.join(self.home, MODEL_FILENAME)

    @property
    def stats_path(self) -> str:
        return os.path.join(self.home, STATS_FILENAME)


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
    # The one network also takes clicks, the previous outline and a box (whatever the preset), so
    # Slicer gets the click tool and Train trains it for both tools.
    clicks: bool = True
    # Where Run's outline comes from. "separate": a network without click inputs, trained beside
    # the click network, which starts from that outline (its previous-outline channel) and
    # corrects it; measured better before any click and in clicks to 0.90 (docs/interactive.md).
    # "shared": the click network's own click-free outline (one network, one training).
    automatic: str = "separate"
    outline_cache: int = DEFAULT_CAPACITY  # (client, image) outlines remembered for the next click
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
        outline_cache = _conf_int(conf, "outline_cache", DEFAULT_CAPACITY)
        if outline_cache < 0:
            raise ValueError(f"--conf outline_cache {outline_cache}: must be 0 (remember nothing) or more")
        automatic = conf_automatic(conf)
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
            clicks=conf_flag(conf, "clicks", True),
            automatic=automatic,
            outline_cache=outline_cache,
            extra=conf,
        )

    @property
    def models(self) -> dict[str, AppModel]:
        """The networks the app trains and serves, by trainer name; the automatic one first.

        Each trains on the preset's recipe with its own network (:func:`busi_monai.serve.app_networks`):
        the automatic one without click inputs when the click network is separate; the click
        network with the click maps and the previous outline as inputs, its click simulation
        (click-free share, corrective rounds, zoom) beside the preset's own hyperparameters."""
        r = get_recipe(self.preset).with_overrides(epochs=self.epochs, image_size=self.image_size)
        return {
            name: AppModel(name, r.with_overrides(network=network), os.path.join(self.model_dir, home) if home else self.model_dir)
            for name, (network, home) in app_networks(r.network, self.clicks, self.automatic).items()
        }

    @property
    def automatic_model(self) -> AppModel:
        return self.models[NAME]

    @property
    def click_model(self) -> AppModel:
        """The network the click tool serves (the automatic one when it is shared)."""
        return self.models.get(CLICKS_NAME) or self.automatic_model

    @property
    def recipe(self):
        """The automatic network's recipe."""
        return self.automatic_model.recipe

    @property
    def takes_clicks(self) -> bool:
        """The app trains a click-guided network (``+clicks``), so Slicer gets the click tool too."""
        from busi_monai.model.networks import takes_clicks

        return takes_clicks(self.click_model.recipe.network)

    @property
    def model_path(self) -> str:
        """The automatic network's published weights (what Run serves)."""
        return self.automatic_model.model_path

    @property
    def stats_path(self) -> str:
        return self.automatic_model.stats_path

    def resolved_device(self) -> torch.device:
        from busi_monai.device import resolve_device

        return resolve_device(self.device)

    def device_description(self) -> str:
        dev = self.resolved_device()
        if dev.type == "cuda":
            return f"GPU {torch.cuda.get_device_name(dev)}"
        return f"CPU ({torch.get_num_threads()} threads)"


class AttentionUNet(TaskConfig):
    """MONAI Label task config: the automatic outline, the click tool and Grad-CAM; a trainer per
    network; MC-dropout scoring and the strategies (all on the automatic network)."""

    def init(self, name: str, model_dir: str, conf: dict, planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.app_dir = kwargs.get("app_dir") or str(Path(__file__).resolve().parents[2])
        self.settings = AppSettings.from_conf(conf, self.app_dir)
        os.makedirs(self.settings.model_dir, exist_ok=True)
        self.model_dir = self.settings.model_dir
        self.path = self.settings.model_path
        self.labels = dict(LABELS)
        self.served = ServedModel(self.settings.model_path, self.settings.bundle, self.settings.device)
        # The click tool's network; where it has no weights yet (or is shared), the automatic one.
        click = self.settings.click_model
        self.click_served = (
            ClickModels(ServedModel(click.model_path, None, self.settings.device), self.served)
            if click.name != NAME else ClickModels(None, self.served)
        )
        # Each client's last outline per image, for the click model's next correction (memory only).
        self.outlines = OutlineCache(self.settings.outline_cache)
        for m in self.settings.models.values():
            logger.info(
                "%s: preset=%s network=%s image_size=%s epochs=%s device=%s model=%s bundle=%s",
                m.name, self.settings.preset, m.recipe.network, m.recipe.image_size, m.recipe.epochs,
                self.settings.device_description(), m.model_path, self.settings.bundle if m.name == NAME else None,
            )

    def infer(self):
        infers = {
            self.name: AttentionUNetInfer(self.served, self.settings, self.labels, self.outlines, self.click_served),
            f"{self.name}_gradcam": GradCamInfer(self.served, self.settings),
        }
        if self.settings.takes_clicks:
            infers[CLICKS_NAME] = ClickInfer(self.served, self.settings, self.labels, self.outlines, self.click_served)
        return infers

    def trainer(self) -> dict:
        """One trainer per network (Slicer's Train with "ALL" runs each in turn)."""
        served = {NAME: self.served, CLICKS_NAME: self.click_served.own}
        return {name: AttentionUNetTrain(served[name], self.settings, m) for name, m in self.settings.models.items()}

    def strategy(self):
        # After `random`, Slicer's default (main.py): typiclust, then the uncertainty strategies.
        return {"typiclust": TypiClustStrategy(), "mc_dropout_diverse": MCDropoutDiverseStrategy(), "mc_dropout": MCDropoutStrategy()}

    def scoring_method(self):
        return {"mc_dropout": MCDropoutScoring(self.served, self.settings)}
