"""Active-learning strategy ``mc_dropout``: the unlabelled image the model is least sure of.

Reads the Monte Carlo dropout scores that :mod:`lib.scoring.mc_dropout` keeps in the
datastore. An image handed out in the last hour (to anyone, by this strategy) is passed
over so that "Next Sample" again moves on; when every image was handed out recently, the
one handed out longest ago comes back. Without any score yet (no model, or scoring still
running), it falls back to a random unlabelled image.
"""

from __future__ import annotations

import logging
import random
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.mc_dropout import KEY

logger = logging.getLogger(__name__)


class MCDropoutStrategy(Strategy):
    def __init__(self, reset_s: int = 3600):
        self.reset_s = reset_s
        super().__init__("Least certain unlabelled image by Monte Carlo dropout (the paper's dropout at inference)")

    def __call__(self, request, datastore: Datastore):
        reload = getattr(datastore, "_init_from_datastore_file", None)
        if reload:
            reload()  # scores are written by the scoring subprocess
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "mc_dropout")
        now = int(time.time())
        scored = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            score = info.get(KEY)
            if score is None:
                continue
            served_ts = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            scored.append((image_id, float(score), served_ts, info.get("mc_dropout_version")))
        if not scored:
            image_id = random.choice(images)
            logger.info("mc_dropout: no uncertainty scores yet; random pick %s", image_id)
            return {"id": image_id, KEY: None}
        fresh = [s for s in scored if now - s[2] >= self.reset_s]
        if fresh:
            image_id, score, _, version = max(fresh, key=lambda s: s[1])
        else:
            image_id, score, _, version = min(scored, key=lambda s: s[2])
        logger.info("mc_dropout: next sample %s (score %.5f, model %s; %d scored unlabelled)", image_id, score, version, len(scored))
        return {"id": image_id, KEY: score, "mc_dropout_version": version}
