"""Active-learning strategies: which unlabelled images to ask a clinician for next (the app's Next Sample, and ``al-simulate``).

Scores (one implementation, shared by ``busi-monai al-simulate`` and the MONAI Label app's
``mc_dropout`` scoring) come from stochastic probability maps ``(passes, N, 1, S, S)``:

* ``entropy``: predictive entropy (bits) of the averaged probability, mean over pixels;
  total uncertainty, including the ambiguity every lesion border has;
* ``bald``: mutual information between prediction and dropout weights (BALD), mean over
  pixels: the part of the uncertainty that more labels can remove;
* ``tta``: the same mutual information across test-time views (flip, gain changes) instead
  of dropout masks: disagreement under augmentation.

Strategies: ``random``, ``entropy``, ``bald``, ``tta`` (the top-K of a score), and
``bald_diverse``: the top ``diversity_pool x K`` candidates by BALD, of which K are chosen by
k-center greedy on the network's bottleneck features, counting the labelled images as
centres already, so one batch is not five near-duplicates of one lesion (BUSI has many) nor
copies of what is labelled.

``typiclust`` (Hacohen et al., ICML 2022, for small label budgets): k-means of all pool images'
bottleneck features into ``labelled + K`` clusters; each pick is the most typical image (densest
neighbourhood) of the largest cluster with the fewest labels, so the batch covers the common
kinds of image before the odd ones, with no uncertainty at all.

``in_order`` is no strategy at all: the next images in the pool's stored order, the baseline
of a clinician labelling the whole list.

``oracle`` and ``oracle_lesions`` exist only in the simulator, as references: they ask for the
images the current model gets most wrong *by their true masks* (lowest Dice; for ``oracle`` a
normal image with a false outline scores 0, ``oracle_lesions`` asks for lesion images only),
which no real strategy can know. Uncertainty strategies estimate that error; if asking for it
outright does not save labels over ``random``, a better estimate will not either.

``al-simulate`` replays a labelling session on a prepared dataset: the known masks of the
training split play the annotator, each round retrains from the previous round's weights
(as the app does) and is scored on the fixed test split.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Read the unlabelled images' masks: yardsticks in al-simulate, never a choice in the app.
# ``oracle``: the worst images by the selection score; ``oracle_lesions``: the worst lesion
# images by Dice, normal images never asked for.
ORACLE = "oracle"
ORACLE_LESIONS = "oracle_lesions"
# What `al-simulate` compares with random unless told: the best of the label-count study (README,
# active learning). The app's default is random since the clicks study (apps/busi/README.md).
SIMULATION_DEFAULT_STRATEGY = "typiclust"
# The baseline without active learning: the unlabelled images in the pool's stored order.
IN_ORDER = "in_order"
DIVERSITY_POOL = 3  # bald_diverse draws its K picks from the 3K most uncertain images


# ---------------------------------------------------------------------------------------------
# Scores


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy (bits) of each probability."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def uncertainty_scores(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image scores, each ``(N,)``, of stochastic probability maps ``(passes, N, 1, S, S)``.

    ``bald``: mutual information (epistemic); ``entropy``: predictive entropy (total);
    ``std``: mean per-pixel standard deviation of the passes; ``lesion_fraction``: the share
    of pixels the mean prediction calls lesion.
    """
    if probs.ndim != 5 or probs.shape[0] < 2:
        raise ValueError(f"need (passes >= 2, N, 1, S, S) probabilities, got {tuple(probs.shape)}")
    mean = probs.mean(0)
    total = entropy_bits(mean)
    expected = entropy_bits(probs).mean(0)
    mutual_information = (total - expected).clamp(min=0)
    return {
        "bald": mutual_information.flatten(1).mean(1),
        "entropy": total.flatten(1).mean(1),
        "std": probs.std(0).flatten(1).mean(1),
        "lesion_fraction": (mean > 0.5).float().flatten(1).mean(1),
    }


# ---------------------------------------------------------------------------------------------
# Model views: Monte Carlo dropout, test-time augmentation, bottleneck features


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]


@torch.no_grad()
def mc_dropout_probabilities(predictor, images: torch.Tensor, passes: int) -> torch.Tensor:
    """``(passes, N, 1, S, S)`` probabilities of preprocessed ``(N, 1, S, S)`` images, dropout on.

    Same forward as :meth:`Predictor.mc_dropout`, on tensors already at network size (the
    simulator's cache) rather than images to preprocess.
    """
    dev = predictor.device
    return torch.stack(
        [torch.cat([predictor.forward_probability(b.to(dev), mc_dropout=True).cpu() for b in _batches(images, predictor.batch_size)]) for _ in range(passes)]
    )


def _gain(x: torch.Tensor, gamma: float) -> torch.Tensor:
    return x.clamp(0, 1) ** gamma


# Views that keep the anatomy (the probe is at the top: no vertical flip) but change what an
# operator changes: side and gain. (forward, inverse) on (B, 1, S, S).
TTA_VIEWS = (
    (lambda x: x, lambda y: y),
    (lambda x: torch.flip(x, dims=(-1,)), lambda y: torch.flip(y, dims=(-1,))),
    (lambda x: _gain(x, 0.7), lambda y: y),
    (lambda x: _gain(torch.flip(x, dims=(-1,)), 1.4), lambda y: torch.flip(y, dims=(-1,))),
)


@torch.no_grad()
def tta_probabilities(predictor, images: torch.Tensor) -> torch.Tensor:
    """``(views, N, 1, S, S)`` deterministic probabilities under :data:`TTA_VIEWS`."""
    dev = predictor.device
    out = []
    for forward, inverse in TTA_VIEWS:
        out.append(torch.cat([inverse(predictor.forward_probability(forward(b.to(dev)))).cpu() for b in _batches(images, predictor.batch_size)]))
    return torch.stack(out)


@torch.no_grad()
def bottleneck_features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised, globally average-pooled bridge activations ``(N, C)``: what the network sees.

    Near-duplicate images (same lesion, another frame or crop) land next to each other here.
    """
    captured: list[torch.Tensor] = []
    hook = net.bridge.register_forward_hook(lambda _m, _i, out: captured.append(out.float().mean((-2, -1)).cpu()))
    was_training = net.training
    net.eval()
    dev = next(net.parameters()).device
    try:
        for b in _batches(images, batch_size):
            net(b.to(dev))
    finally:
        hook.remove()
        net.train(was_training)
    feats = torch.cat(captured) if captured else torch.zeros(0, 1)
    return torch.nn.functional.normalize(feats, dim=1)


# ---------------------------------------------------------------------------------------------
# Selection


def compact_embedding(features: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Bottleneck features ``(N, C)`` projected to ``dim`` unit-length numbers per image.

    A fixed random projection (seeded by ``C``, so the same network gives the same projection
    in every process) keeps distances roughly (Johnson-Lindenstrauss) while what a datastore
    stores per image stays small.
    """
    g = torch.Generator().manual_seed(features.shape[1])
    proj = torch.randn(features.shape[1], dim, generator=g) / dim**0.5
    return torch.nn.functional.normalize(features.float() @ proj, dim=1)


def k_center_greedy(features: torch.Tensor, k: int, centres: torch.Tensor | None = None) -> list[int]:
    """``k`` rows of ``features`` chosen one by one as the farthest from all centres so far.

    ``centres`` (e.g. the labelled images' features) count as chosen already. Without any, the
    first pick is the row farthest from the mean. Two identical rows are never both chosen
    while a distinct one is left.
    """
    n = features.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    if centres is not None and centres.shape[0]:
        dist = torch.cdist(features, centres).min(1).values
    else:
        dist = torch.cdist(features, features.mean(0, keepdim=True))[:, 0]
    chosen: list[int] = []
    for _ in range(k):
        i = int(torch.argmax(dist))
        chosen.append(i)
        dist = torch.minimum(dist, torch.cdist(features, features[i : i + 1])[:, 0])
        dist[chosen] = -1.0
    return chosen


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    return torch.argsort(scores, descending=True)[:k].tolist()


def diverse_top_k(
    scores: torch.Tensor, features: torch.Tensor, k: int, labelled_features: torch.Tensor | None = None, pool_factor: int = DIVERSITY_POOL
) -> list[int]:
    """K of the ``pool_factor * K`` highest scores, spread by :func:`k_center_greedy`."""
    candidates = top_k(scores, max(k, pool_factor * k))
    picked = k_center_greedy(features[candidates], k, labelled_features)
    return [candidates[i] for i in picked]


def kmeans(features: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """Cluster index ``(N,)`` of each row: Lloyd's k-means from a k-means++ start."""
    n = features.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    centres = features[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(features, centres).min(1).values.pow(2)
        if float(d2.sum()) <= 0:  # fewer distinct rows than clusters
            break
        centres = torch.cat([centres, features[torch.multinomial(d2, 1, generator=g)]])
    assign = torch.cdist(features, centres).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, assign, features)
        counts = torch.bincount(assign, minlength=centres.shape[0]).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an emptied cluster keeps its centre
        new = torch.cdist(features, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def typicality(features: torch.Tensor, neighbours: int = 20) -> torch.Tensor:
    """Inverse mean distance of each row to its nearest ``neighbours`` others: high in dense regions."""
    n = features.shape[0]
    if n < 2:
        return torch.ones(n)
    d = torch.cdist(features, features)
    d.fill_diagonal_(float("inf"))
    k = min(neighbours, n - 1)
    return 1.0 / (d.topk(k, dim=1, largest=False).values.mean(1) + 1e-8)


def typical_clusters(pool_features: torch.Tensor, labelled_features: torch.Tensor | None, k: int, seed: int = 0) -> list[int]:
    """TypiClust: ``k`` rows of ``pool_features``, one per cluster, the most typical of the
    largest clusters that hold the fewest labelled images."""
    n_pool = pool_features.shape[0]
    k = min(k, n_pool)
    labelled = labelled_features if labelled_features is not None else pool_features[:0]
    every = torch.cat([pool_features, labelled])
    assign = kmeans(every, labelled.shape[0] + k, seed=seed)
    n_clusters = int(assign.max()) + 1
    size = torch.bincount(assign, minlength=n_clusters)
    covered = torch.bincount(assign[n_pool:], minlength=n_clusters)
    taken = torch.zeros(n_pool, dtype=torch.bool)
    chosen: list[int] = []
    while len(chosen) < k:
        open_rows = ~taken
        if not open_rows.any():
            break
        # Fewest labels first, then the largest cluster.
        rank = covered.double() * (every.shape[0] + 1) - size.double()
        rank[torch.bincount(assign[:n_pool][open_rows], minlength=n_clusters) == 0] = float("inf")
        c = int(rank.argmin())
        members = (assign == c).nonzero()[:, 0]
        typ = typicality(every[members])
        candidates = [(float(t), int(i)) for t, i in zip(typ, members) if i < n_pool and not taken[i]]
        i = max(candidates)[1]
        chosen.append(i)
        taken[i] = True
        covered[c] += 1
    return chosen


@torch.no_grad()
def probabilities(predictor, images: torch.Tensor) -> torch.Tensor:
    """Deterministic ``(N, 1, S, S)`` lesion probabilities of preprocessed images, in batches."""
    return torch.cat([predictor.forward_probability(b.to(predictor.device)).cpu() for b in _batches(images, predictor.batch_size)])


def true_scores(predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image ``(N,)``: the model selection score against the true masks (Dice on lesion
    images; on normal images 1 for an empty mask, 0 for a false outline)."""
    from busi_monai.training.validation import image_scores, selection_scores

    return selection_scores(image_scores(probabilities(predictor, images), labels, predictor.threshold))


@dataclass
class Selection:
    indices: list[int]  # into the unlabelled pool
    scores: list[float] | None  # the picked images' scores (None for random)


@dataclass
class Pool:
    """What a strategy chooses from: the unlabelled images (rows of ``images``), the labelled
    ones, and the model. ``labels`` (the pool's true masks) only the oracles read."""

    predictor: object
    images: torch.Tensor
    k: int
    rng: random.Random
    labelled_images: torch.Tensor | None = None
    mc_passes: int = 8
    labels: torch.Tensor | None = None

    def features(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bottleneck features of the pool and of the labelled images (None without any)."""
        net = self.predictor.network
        labelled = self.labelled_images
        return bottleneck_features(net, self.images), bottleneck_features(net, labelled) if labelled is not None and len(labelled) else None

    def mc_dropout_scores(self) -> dict[str, torch.Tensor]:
        return uncertainty_scores(mc_dropout_probabilities(self.predictor, self.images, self.mc_passes))


def _scored(idx: list[int], scores: torch.Tensor) -> Selection:
    return Selection(idx, [float(scores[i]) for i in idx])


def _ranked(pool: Pool, scores: torch.Tensor) -> Selection:
    return _scored(top_k(scores, pool.k), scores)


def _oracle(lesions_only: bool):
    def choose(pool: Pool) -> Selection:
        n = pool.images.shape[0]
        if pool.labels is None or len(pool.labels) != n:
            name = ORACLE_LESIONS if lesions_only else ORACLE
            raise ValueError(f"{name} reads the pool's true masks: pass pool_labels, one per pool image")
        scores = -true_scores(pool.predictor, pool.images, pool.labels)
        if lesions_only:
            scores[pool.labels.flatten(1).sum(1) == 0] = -float("inf")
        return _ranked(pool, scores)

    return choose


def _diverse(pool: Pool) -> Selection:
    scores = pool.mc_dropout_scores()["bald"]
    pool_features, labelled_features = pool.features()
    return _scored(diverse_top_k(scores, pool_features, pool.k, labelled_features), scores)


def _typical(pool: Pool) -> Selection:
    pool_features, labelled_features = pool.features()
    return Selection(typical_clusters(pool_features, labelled_features, pool.k, seed=pool.rng.randrange(2**31)), None)


# Each strategy by name: adding one is one entry here (the oracles read the true masks, so they
# are yardsticks of al-simulate, never offered by the app).
SELECTORS: dict[str, Callable[[Pool], Selection]] = {
    "random": lambda pool: Selection(sorted(pool.rng.sample(range(pool.images.shape[0]), pool.k)), None),
    "entropy": lambda pool: _ranked(pool, pool.mc_dropout_scores()["entropy"]),
    "bald": lambda pool: _ranked(pool, pool.mc_dropout_scores()["bald"]),
    "tta": lambda pool: _ranked(pool, uncertainty_scores(tta_probabilities(pool.predictor, pool.images))["bald"]),
    "bald_diverse": _diverse,
    "typiclust": _typical,
    # No active learning: the pool in its stored order (a clinician working down the list).
    IN_ORDER: lambda pool: Selection(list(range(pool.k)), None),
    ORACLE: _oracle(lesions_only=False),
    ORACLE_LESIONS: _oracle(lesions_only=True),
}
SIMULATION_STRATEGIES = tuple(SELECTORS)
STRATEGIES = tuple(k for k in SELECTORS if k not in (ORACLE, ORACLE_LESIONS))  # what an app may offer


def select(
    strategy: str,
    predictor,
    pool_images: torch.Tensor,
    k: int,
    rng: random.Random,
    labelled_images: torch.Tensor | None = None,
    mc_passes: int = 8,
    pool_labels: torch.Tensor | None = None,
) -> Selection:
    """The ``k`` unlabelled images (rows of ``pool_images``) that ``strategy`` asks to label next.

    ``pool_labels`` (the pool's true masks): only the oracles, :data:`ORACLE` and :data:`ORACLE_LESIONS`, read them.
    """
    if strategy not in SELECTORS:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(SIMULATION_STRATEGIES)}")
    pool = Pool(predictor, pool_images, min(k, pool_images.shape[0]), rng, labelled_images, mc_passes, pool_labels)
    return SELECTORS[strategy](pool)
