"""Active-learning strategies on the Monte Carlo dropout scores that :mod:`lib.scoring.mc_dropout`
keeps in the datastore.

* ``mc_dropout``: the unlabelled image the model is least sure of (highest BALD score).
* ``mc_dropout_diverse``: of the few most uncertain unlabelled images, the one least like the
  images picked since the model last changed (labelled, or handed out and not labelled yet),
  by the network's bottleneck features: ``bald_diverse`` of ``busi-monai al-simulate``, one
  image at a time. Several clinicians asking in a row, or one labelling a batch before the
  next training, are not handed five frames of the same lesion (BUSI has many). Images
  labelled before the current weights need no such guard: the model has learned them, so
  their near-duplicates score low already.
* ``typiclust``: ``typiclust`` of ``busi-monai al-simulate``, one image at a time: k-means of
  every image's bottleneck features (labelled ones included, scored for their features
  only) into ``labelled + 1`` clusters; the most typical unlabelled image of the largest
  cluster with the fewest labels. No uncertainty: it covers the common kinds of image first.

An image handed out in the last hour (to anyone, by the same strategy) is passed over so that
"Next Sample" again moves on; when every image was handed out recently, the one handed out
longest ago comes back. Without any score yet (no model, or scoring still running), both fall
back to a random unlabelled image.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from busi_monai.active.strategies import (
    DIVERSITY_POOL,
    k_center_greedy,
    typical_clusters,
)
from lib.scoring.mc_dropout import EMBEDDING_KEY, EMBEDDING_VERSION_KEY, KEY

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    image_id: str
    score: float
    served_ts: int
    version: str | None
    embedding: list[float] | None


class MCDropoutStrategy(Strategy):
    name = "mc_dropout"

    def __init__(self, reset_s: int = 3600, description: str = "Least certain unlabelled image by Monte Carlo dropout (the paper's dropout at inference)"):
        self.reset_s = reset_s
        super().__init__(description)

    def _served_ts(self, info: dict, strategy: str) -> int:
        return int(info.get("strategy", {}).get(strategy, {}).get("ts", 0))

    def choose(self, fresh: list[Candidate], datastore: Datastore, strategy: str, now: int) -> Candidate:
        return max(fresh, key=lambda c: c.score)

    @staticmethod
    def _embedded_like_top_score(fresh: list[Candidate]) -> tuple[str | None, list[Candidate]]:
        """The weights that gave the highest score, and the candidates with an embedding from those weights."""
        version = max(fresh, key=lambda c: c.score).version
        return version, [c for c in fresh if c.version == version and c.embedding]

    def _covered(self, datastore: Datastore, strategy: str, version: str | None, now: int, version_key: str) -> list[list[float]]:
        """Embeddings under ``version`` (as ``version_key`` of the image info says) of the labelled
        images and of those handed out recently."""
        unlabelled = set(datastore.get_unlabeled_images())
        out = []
        for image_id in datastore.list_images():
            info = datastore.get_image_info(image_id)
            emb = info.get(EMBEDDING_KEY)
            if not emb or info.get(version_key, info.get("mc_dropout_version")) != version:
                continue
            if image_id not in unlabelled or now - self._served_ts(info, strategy) < self.reset_s:
                out.append(emb)
        return out

    def __call__(self, request, datastore: Datastore):
        reload = getattr(datastore, "_init_from_datastore_file", None)
        if reload:
            reload()  # scores are written by the scoring subprocess
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", self.name)
        now = int(time.time())
        scored = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            score = info.get(KEY)
            if score is None:
                continue
            scored.append(Candidate(image_id, float(score), self._served_ts(info, strategy), info.get("mc_dropout_version"), info.get(EMBEDDING_KEY)))
        if not scored:
            image_id = random.choice(images)
            logger.info("%s: no uncertainty scores yet; random pick %s", self.name, image_id)
            return {"id": image_id, KEY: None}
        fresh = [c for c in scored if now - c.served_ts >= self.reset_s]
        pick = self.choose(fresh, datastore, strategy, now) if fresh else min(scored, key=lambda c: c.served_ts)
        logger.info("%s: next sample %s (score %.5f, model %s; %d scored unlabelled)", self.name, pick.image_id, pick.score, pick.version, len(scored))
        return {"id": pick.image_id, KEY: pick.score, "mc_dropout_version": pick.version}


class MCDropoutDiverseStrategy(MCDropoutStrategy):
    name = "mc_dropout_diverse"

    def __init__(self, reset_s: int = 3600):
        super().__init__(
            reset_s,
            "Uncertain (Monte Carlo dropout) and unlike the images picked since the last training: "
            "no near-duplicates in one labelling session",
        )

    def choose(self, fresh: list[Candidate], datastore: Datastore, strategy: str, now: int) -> Candidate:
        version, embedded = self._embedded_like_top_score(fresh)
        candidates = sorted(embedded, key=lambda c: -c.score)[:DIVERSITY_POOL]
        if not candidates:
            return max(fresh, key=lambda c: c.score)
        # Images labelled before these weights are not counted: the model has learned them.
        centres = self._covered(datastore, strategy, version, now, version_key="mc_dropout_version")
        if not centres:
            return candidates[0]
        feats = torch.tensor([c.embedding for c in candidates], dtype=torch.float32)
        return candidates[k_center_greedy(feats, 1, torch.tensor(centres, dtype=torch.float32))[0]]


class TypiClustStrategy(MCDropoutStrategy):
    name = "typiclust"

    def __init__(self, reset_s: int = 3600):
        super().__init__(
            reset_s,
            "Most typical image of the kind of image least covered by labels (TypiClust on the network's features)",
        )

    def choose(self, fresh: list[Candidate], datastore: Datastore, strategy: str, now: int) -> Candidate:
        version, pool = self._embedded_like_top_score(fresh)
        if not pool:
            return max(fresh, key=lambda c: c.score)
        covered = self._covered(datastore, strategy, version, now, version_key=EMBEDDING_VERSION_KEY)
        feats = torch.tensor([c.embedding for c in pool], dtype=torch.float32)
        centres = torch.tensor(covered, dtype=torch.float32) if covered else None
        return pool[typical_clusters(feats, centres, 1)[0]]
