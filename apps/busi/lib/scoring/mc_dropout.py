"""Scoring method ``mc_dropout``: Monte Carlo dropout uncertainty of each image, kept in the datastore.

The paper's network has dropout in every block (0.25-0.3). Left on at inference, each pass
is a different sub-network; where the passes disagree the model has not learned the image.
For each image we run ``mc_passes`` passes (``Predictor.mc_dropout``) and store in its image
info (as MONAI Label's epistemic scoring does):

* ``mc_dropout_score``: the mean, over the pixels, of the mutual information (bits) between
  the prediction and the dropout weights (BALD): the epistemic part of the uncertainty, high
  where the passes disagree; the active-learning key. It separates the images a model has
  learned from those it has not better than the total entropy does, which also counts the
  ambiguity every image has (aleatoric);
* ``mc_dropout_entropy``: the predictive entropy (bits) of the averaged probability (total);
* ``mc_dropout_std``: mean per-pixel standard deviation of the passes;
* ``mc_dropout_embedding``: 32 numbers of what the network sees of the image (its bottleneck
  features, randomly projected), so ``typiclust`` can tell the kinds of image apart and
  ``mc_dropout_diverse`` the near-duplicates;
* ``mc_dropout_version`` / ``mc_dropout_passes`` / ``mc_dropout_ts``: the weights and passes
  the score belongs to; ``mc_dropout_embedding_version``: the weights the embedding belongs
  to. Labelled images get the embedding alone (one plain pass), because ``typiclust`` needs
  to know which kinds of image the labels cover. Images already scored for the current weights are skipped, so the
  rescoring MONAI Label triggers after each training, at start and at each Next Sample only
  computes what changed.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from busi_monai.active.strategies import (
    bottleneck_features,
    compact_embedding,
    uncertainty_scores,
)
from busi_monai.jsonio import finite, write_json
from lib.errors import ModelNotAvailable

logger = logging.getLogger(__name__)

KEY = "mc_dropout_score"
EMBEDDING_DIM = 32  # numbers stored per image in the datastore
EMBEDDING_KEY = "mc_dropout_embedding"
EMBEDDING_VERSION_KEY = "mc_dropout_embedding_version"
CHUNK = 16


def uncertainty(probs: torch.Tensor) -> list[dict]:
    """Scores of each image from MC probabilities ``(passes, N, 1, S, S)``, as stored in its info.

    The math is :func:`busi_monai.active.uncertainty_scores`, the one ``busi-monai al-simulate``
    measured, so the app ranks images exactly as the simulation did.
    """
    s = uncertainty_scores(probs)
    return [
        {
            KEY: float(s["bald"][i]),
            "mc_dropout_entropy": float(s["entropy"][i]),
            "mc_dropout_std": float(s["std"][i]),
            "mc_dropout_lesion_fraction": float(s["lesion_fraction"][i]),
        }
        for i in range(probs.shape[1])
    ]


def store_image_infos(datastore: Datastore, updates: dict[str, dict]) -> None:
    """Merge ``updates`` into the images' info.

    For the local datastore, read-modify-write ``datastore_v2.json`` under its lock, so a
    label the server saved meanwhile is not overwritten by this process's older copy; the
    server reloads the file when it changes.
    """
    if not updates:
        return
    path = getattr(datastore, "_datastore_config_path", None)
    lock = getattr(datastore, "_lock_file", None)
    if path and lock and os.path.exists(path):
        from filelock import FileLock

        with FileLock(lock):
            with open(path) as f:
                data = json.load(f)
            objects = data.get("objects", {})
            for image_id, info in updates.items():
                if image_id in objects:
                    objects[image_id].setdefault("image", {}).setdefault("info", {}).update(info)
            write_json(data, path)  # atomic: the server reloads the index as this process leaves it
        return
    for image_id, info in updates.items():
        datastore.update_image_info(image_id, finite(info)[0])


def _in_task_subprocess() -> bool:
    """True in the subprocess MONAI Label starts for a background task (not in the server)."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec and spec.name == "monailabel.interfaces.utils.app")


class MCDropoutScoring(ScoringMethod):
    def __init__(self, served, settings):
        self.served = served
        self.settings = settings
        super().__init__(
            f"Monte Carlo dropout uncertainty ({settings.mc_passes} passes with the paper's dropout on) "
            "of the unlabelled images, for active learning"
        )

    def images_to_score(self, datastore: Datastore) -> list[str]:
        ids = list(datastore.get_unlabeled_images())
        if self.settings.score_labeled:
            ids += [i for i in datastore.get_labeled_images() if i not in ids]
        return ids

    def outdated(self, datastore: Datastore, version: str, passes: int, image_ids: list[str]) -> list[str]:
        """Of ``image_ids``, those without a score for these weights and passes."""
        out = []
        for image_id in image_ids:
            info = datastore.get_image_info(image_id)
            if info.get("mc_dropout_version") != version or info.get("mc_dropout_passes") != passes:
                out.append(image_id)
        return out

    def unembedded(self, datastore: Datastore, version: str, scored: set[str]) -> list[str]:
        """Images outside ``scored`` without an embedding from these weights (typiclust needs every image's)."""
        return [i for i in datastore.list_images() if i not in scored and datastore.get_image_info(i).get(EMBEDDING_VERSION_KEY) != version]

    def work_left(self, datastore: Datastore, version: str, passes: int) -> bool:
        """Whether a run would score or embed anything."""
        to_score = self.images_to_score(datastore)
        return bool(self.outdated(datastore, version, passes, to_score) or self.unembedded(datastore, version, set(to_score)))

    def __call__(self, request, datastore: Datastore):

        passes = int(request.get("mc_passes", self.settings.mc_passes))
        try:
            predictor, version = self.served.get()
        except ModelNotAvailable as e:
            logger.warning("mc_dropout scoring skipped: %s", e)
            return {}
        if predictor.device.type == "cpu" and _in_task_subprocess():
            # A background task: leave half the cores to the server's interactive infer.
            torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        to_score = self.images_to_score(datastore)
        todo = self.outdated(datastore, version.version, passes, to_score)
        embed_only = self.unembedded(datastore, version.version, set(to_score))
        logger.info(
            "mc_dropout: %d image(s) to score and %d labelled to embed with model %s, %d passes on %s",
            len(todo), len(embed_only), version.version, passes, predictor.device,
        )  # fmt: skip
        # Resolve every path before the first write: our own write of datastore_v2.json makes the
        # datastore reload it, and while it reloads its base path is briefly empty.
        uris = {image_id: datastore.get_image_uri(image_id) for image_id in todo + embed_only}
        result, t0 = {}, time.time()
        torch.manual_seed(0)
        for ids, images in self._chunks(todo, uris):
            probs = predictor.mc_dropout(images, passes)
            ts = int(time.time())
            updates = {}
            for image_id, s, emb in zip(ids, uncertainty(probs), self._embeddings(predictor, images)):
                s = {k: round(v, 8) for k, v in s.items()}
                s.update(mc_dropout_version=version.version, mc_dropout_passes=passes, mc_dropout_ts=ts)
                s.update({EMBEDDING_KEY: emb, EMBEDDING_VERSION_KEY: version.version})
                updates[image_id] = s
            store_image_infos(datastore, updates)
            result.update(updates)
        for ids, images in self._chunks(embed_only, uris):
            updates = {i: {EMBEDDING_KEY: emb, EMBEDDING_VERSION_KEY: version.version} for i, emb in zip(ids, self._embeddings(predictor, images))}
            store_image_infos(datastore, updates)
        logger.info("mc_dropout: scored %d image(s) and embedded %d in %.1fs", len(result), len(embed_only), time.time() - t0)
        return result

    @staticmethod
    def _chunks(image_ids: list[str], uris: dict[str, str]):
        """(ids, images) of up to :data:`CHUNK` readable images at a time."""
        from busi_monai.data.io import BusiInputError, read_image

        for start in range(0, len(image_ids), CHUNK):
            ids, images = [], []
            for image_id in image_ids[start : start + CHUNK]:
                try:
                    images.append(read_image(uris[image_id]))
                    ids.append(image_id)
                except BusiInputError as e:
                    logger.warning("mc_dropout: cannot score %s: %s", image_id, e)
            if images:
                yield ids, images

    @staticmethod
    def _embeddings(predictor, images) -> list[list[float]]:
        """What the network sees of each image, for the diversity and coverage of the strategies' picks."""
        batch = torch.stack([predictor.preprocess(im) for im in images]).to(predictor.device)
        return [[round(v, 4) for v in emb] for emb in compact_embedding(bottleneck_features(predictor.network, batch), EMBEDDING_DIM).tolist()]
