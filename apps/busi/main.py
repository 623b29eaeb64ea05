"""MONAI Label app for breast-lesion segmentation in 2D ultrasound (BUSI).

The paper's Attention U-Net ("The Segmentation Model for Breast Cancer Ultrasound Image Based
on Attention U-Net", Jun Cheng), with the network, preprocessing and training recipe of
``busi_monai`` (the same code as the ``busi-monai`` CLI).

    monailabel start_server --app apps/busi --studies work/studies --host 127.0.0.1 \\
        [--conf preset fast] [--conf image_size 128] [--conf epochs 20] [--conf device cuda] \\
        [--conf mc_passes 8] [--conf bundle PATH] [--conf model_dir DIR] [--conf score_labeled true]

or ``python -m busi_monai.serve`` (``make serve``), which prepares a studies folder and a first
model before starting this app. See ``apps/busi/README.md``.
"""

from __future__ import annotations

import logging
import os
import threading

import monailabel
from lib.activelearning.mc_dropout import MCDropoutStrategy  # noqa: F401 (imported while the app dir is on sys.path)
from lib.configs.attention_unet import NAME, AttentionUNet
from lib.datastore import BusiDatastore
from lib.infers.attention_unet import AttentionUNetInfer  # noqa: F401
from lib.scoring.mc_dropout import MCDropoutScoring  # noqa: F401
from lib.trainers.attention_unet import AttentionUNetTrain  # noqa: F401
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

from busi_monai.data.studies import DATASTORE_EXTENSIONS
from busi_monai.jsonio import finite

logger = logging.getLogger(__name__)


def _json_safe(obj, what: str):
    """What the app answers, with NaN/infinity as null: FastAPI refuses to serve them (a 500),
    and Slicer calls /info to connect, so one bad number would lock the clinician out."""
    clean, replaced = finite(obj)
    if replaced:
        logger.warning("%s: non-finite number(s) answered as null at %s", what, ", ".join(replaced[:10]))
    return clean


class BusiApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.task = AttentionUNet()
        self.task.init(NAME, os.path.join(app_dir, "model"), conf or {}, None, app_dir=app_dir)
        self.model_dir = self.task.model_dir
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="BUSI lesion segmentation",
            description=(
                "Breast ultrasound lesion segmentation with the paper's Attention U-Net (busi-monai); "
                f"preset {self.task.settings.preset}, device {self.task.settings.device_description()}"
            ),
            version=monailabel.__version__,
            labels={"lesion": 1},
        )

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # MONAI Label's default list has no .jpeg/.seg.nrrd: users drop PNG/JPEG in, Slicer submits .seg.nrrd.
        # BusiDatastore checks uploads (4xx with the reason) and writes them atomically.
        return BusiDatastore(
            self.studies,
            max_image_pixels=self.task.settings.max_image_pixels,
            extensions=DATASTORE_EXTENSIONS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        infers = self.task.infer()
        if not self.task.served.exists():
            logger.warning(
                "attention_unet: no weights at %s yet; the model is listed once a training publishes some",
                self.task.settings.model_path,
            )
        return infers

    def init_trainers(self):
        return self.task.trainer()

    def init_strategies(self):
        # First is Slicer's default: random, as no strategy saved a clinician's clicks against it
        # on BUSI (apps/busi/README.md, "Which strategy").
        return {"random": Random(), **self.task.strategy()}

    def init_scoring_methods(self):
        return self.task.scoring_method()

    def info(self):
        meta = super().info()
        v = self.task.served.version()
        # The served model's confidence gate: images whose highest lesion probability is below
        # it get an empty mask (0: off). None when there is no model or it cannot be loaded
        # (infer then says why): /info must answer whatever the weights are.
        gate = None
        try:
            gate = float(self.task.served.get()[0].network.config.confidence_gate) if v else None
        except Exception as e:
            logger.warning("/info: the served model's gate is unknown: %s", e)
        # Names only: /info is open to every client, and server paths are nobody's business there.
        meta["busi"] = {
            "preset": self.task.settings.preset,
            "device": str(self.task.settings.resolved_device()),
            "device_description": self.task.settings.device_description(),
            "model_source": v.source if v else None,
            "model_file": os.path.basename(v.path) if v else None,
            "model_version": v.version if v else None,
            "model_mtime": v.mtime if v else None,
            "bundle": os.path.basename(self.task.settings.bundle) if self.task.settings.bundle else None,
            "mc_passes": self.task.settings.mc_passes,
            "confidence_gate": gate,
            # The click tool's network: its own weights, or the automatic network's until it has some.
            "click_model_file": None,
            "click_model_version": None,
        }
        if self.task.settings.takes_clicks:
            cv = self.task.click_served.version()
            if cv is not None:
                meta["busi"]["click_model_file"] = os.path.relpath(cv.path, self.task.settings.model_dir) if cv.source == "model" else os.path.basename(cv.path)
                meta["busi"]["click_model_version"] = cv.version
        return _json_safe(meta, "/info")

    def infer(self, request, datastore=None):
        # MONAI Label answers an unknown model with a 500; say which models there are, as a 404.
        model = request.get("model")
        if model not in self._infers:
            from fastapi import HTTPException

            raise HTTPException(status_code=404, detail=f"no model {model!r}; this server has {', '.join(sorted(self._infers)) or 'none yet'}")
        result = super().infer(request, datastore)
        if isinstance(result, dict) and "params" in result:
            result["params"] = _json_safe(result["params"], f"/infer/{model}")
        return result

    def next_sample(self, request):
        return _json_safe(super().next_sample(request), f"/activelearning/{request.get('strategy')}")

    def model_info(self, model):
        return _json_safe(super().model_info(model), f"/model/{model}")

    def on_init_complete(self):
        super().on_init_complete()
        # Server only (not the train/scoring subprocesses): load the model and ITK's writers
        # now, so that the first "Run" in Slicer answers at once.
        threading.Thread(target=self._warm_up, name="busi-warm-up", daemon=True).start()

    def _warm_up(self):
        import tempfile

        import numpy as np

        from busi_monai.data.io import Image2D, write_mask

        try:
            with tempfile.TemporaryDirectory() as d:
                for ext in (".nrrd", ".nii.gz"):
                    write_mask(np.zeros((8, 8), np.uint8), os.path.join(d, f"warm{ext}"), like=Image2D(np.zeros((8, 8), np.float32)))
            if self.task.served.exists():
                predictor, version = self.task.served.get()
                predictor.predict([np.zeros((64, 64), np.float32)])
                logger.info("attention_unet: model %s ready on %s", version.version, predictor.device)
            if self.task.settings.takes_clicks and self.task.click_served.separate():
                predictor, version = self.task.click_served.get()
                predictor.predict_clicks(np.zeros((64, 64), np.float32), [(32, 32)])
                logger.info("attention_unet_clicks: model %s ready on %s", version.version, predictor.device)
        except Exception as e:  # a warm-up failure must not stop the server; infer reports the error
            logger.warning("attention_unet: warm-up failed: %s", e)

    def _scoring_needed(self) -> bool:
        v = self.task.served.version()
        if v is None:
            return False
        scorer = self._scoring_methods.get("mc_dropout")
        return bool(scorer and scorer.work_left(self.datastore(), v.version, self.task.settings.mc_passes))

    def async_scoring(self, method, params=None):
        # MONAI Label rescores at start, after each training and at each Next Sample; each run is a
        # subprocess, so start one only when some image has no score (or, labelled, no embedding)
        # for the current weights.
        if not method and not self._scoring_needed():
            return {}
        return super().async_scoring(method, params)
