"""Active-learning strategies: which unlabelled volume an annotator should label next.

Every strategy draws from the volumes without a final label that were not handed out within the last
``handout_timeout`` seconds, under one lock shared by all strategies: two annotators asking at the same time never
get the same volume, and a volume someone is working on is not offered again until the timeout. The strategies that
read embeddings also keep a second annotator off a near-duplicate of a volume being labelled (a handed-out volume
counts as covered). Scores come from the datastore image info written by ``lib.scoring`` (model named by the
request's ``model``, else the first).

Typicality (TypiClust, arXiv 2202.02794) and ClaSP PE (arXiv 2601.13677) follow their papers' descriptions at the
volume level; docs/architecture.md says how.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


SEED_WHAT = "a non-negative integer or a string of at most 128 characters"


def parse_seed(value: object) -> int | None:
    """A request's ``seed`` as every generator here takes it: a non-negative integer, a string by its CRC-32, or None
    (unseeded); ``ValueError`` for anything else (the route refuses it with ``SEED_WHAT``)."""
    if value is None:
        return None
    if isinstance(value, str) and 0 < len(value) <= 128:
        return zlib.crc32(value.encode())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise ValueError(SEED_WHAT)


def request_seed(request: dict) -> int | None:
    return parse_seed(request.get("seed"))


class Handouts:
    """Volumes handed out recently, shared by the strategies of one server."""

    def __init__(self, timeout_s: float = 900.0):
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self._given: dict[str, float] = {}

    def available(self, images: list[str]) -> list[str]:
        now = time.time()
        return [i for i in images if now - self._given.get(i, -np.inf) >= self.timeout_s]

    def held(self, images: list[str]) -> list[str]:
        """Those of ``images`` handed out within the timeout (someone is labelling them)."""
        return sorted(set(images) - set(self.available(images)))

    def give(self, image_id: str) -> None:
        self._given[image_id] = time.time()


class ExclusiveStrategy(Strategy):
    """A strategy whose ``select(candidates, covered, request, datastore)`` picks among the available volumes;
    ``covered`` = volumes labelled or being labelled (handed out within the timeout)."""

    def __init__(self, description: str, handouts: Handouts, default_model: str | None = None):
        super().__init__(description)
        self.handouts = handouts
        self.default_model = default_model

    def select(self, candidates: list[str], covered: list[str], request: dict, datastore: Datastore) -> str:
        raise NotImplementedError

    def __call__(self, request, datastore: Datastore):
        with self.handouts.lock:
            unlabelled = sorted(datastore.get_unlabeled_images())
            candidates = self.handouts.available(unlabelled)
            if not candidates:
                return None
            covered = sorted(datastore.get_labeled_images()) + self.handouts.held(unlabelled)
            image_id = self.select(candidates, covered, request, datastore)
            self.handouts.give(image_id)
        logger.info(f"{self.__class__.__name__}: next volume {image_id} (of {len(candidates)} available)")
        return {"id": image_id}

    def fallback(self, candidates: list[str], request: dict, missing: str) -> str:
        """Random pick (seeded by the request's ``seed``) while the scores a strategy needs are missing."""
        logger.warning(f"{self.__class__.__name__}: no {missing} scores yet (run /scoring/{missing}); random pick")
        return random.Random(request_seed(request)).choice(candidates)

    def model_name(self, request: dict) -> str | None:
        return request.get("model") or self.default_model

    def scores(self, images: list[str], datastore: Datastore, key: str, value_key: str, request: dict) -> dict:
        """{image: value} for the images that carry a ``key`` score of the request's model."""
        model = self.model_name(request)
        out = {}
        for image_id in images:
            entry = datastore.get_image_info(image_id).get(key, {}).get(model)
            if entry and value_key in entry:
                out[image_id] = entry[value_key]
        return out


class First(ExclusiveStrategy):
    def __init__(self, handouts: Handouts, **kwargs):
        super().__init__("First unlabelled volume (by id)", handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        return candidates[0]


class RandomChoice(ExclusiveStrategy):
    def __init__(self, handouts: Handouts, **kwargs):
        super().__init__("Random unlabelled volume", handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        return random.Random(request_seed(request)).choice(candidates)


class Uncertainty(ExclusiveStrategy):
    """The most uncertain volume (highest foreground predictive entropy); random among unscored ones."""

    def __init__(self, handouts: Handouts, **kwargs):
        super().__init__("Most uncertain volume (predictive entropy under TTA and MC dropout)", handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        scores = self.scores(candidates, datastore, "uncertainty", "score", request)
        if not scores:
            return self.fallback(candidates, request, "uncertainty")
        return max(scores, key=lambda i: (scores[i], i))


class Typicality(ExclusiveStrategy):
    """Cold start without a trained model (TypiClust): k-means (k = covered volumes + 1) on the embeddings, then the
    most typical volume (densest: smallest mean distance to its nearest neighbours) of the largest cluster that holds
    no covered volume."""

    def __init__(self, handouts: Handouts, neighbours: int = 20, **kwargs):
        super().__init__("Most typical volume of the largest cluster not yet covered (cold start)", handouts, **kwargs)
        self.neighbours = neighbours

    def select(self, candidates, covered, request, datastore):
        embeddings = self.scores(candidates + covered, datastore, "embedding", "vector", request)
        pool = [i for i in candidates if i in embeddings]
        if not pool:
            return self.fallback(candidates, request, "embedding")
        known = [i for i in covered if i in embeddings]
        return typical_uncovered(pool, known, embeddings, self.neighbours)


def typical_uncovered(pool: list[str], covered: list[str], embeddings: dict[str, list[float]], neighbours: int = 20) -> str:
    """TypiClust's pick among ``pool`` given the ``covered`` volumes (see ``Typicality``)."""
    from sklearn.cluster import KMeans

    ids = pool + covered
    x = np.asarray([embeddings[i] for i in ids], dtype=np.float64)
    k = min(len(covered) + 1, len(np.unique(x, axis=0)))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(x) if k > 1 else np.zeros(len(ids), int)
    taken = {clusters[ids.index(i)] for i in covered}
    sizes = {c: int((clusters == c).sum()) for c in set(clusters[: len(pool)])}
    free = [c for c in sizes if c not in taken] or list(sizes)
    chosen = max(free, key=lambda c: (sizes[c], -c))
    members = np.flatnonzero(clusters == chosen)
    if len(members) == 1:
        return ids[members[0]]
    distance = np.linalg.norm(x[members, None] - x[None, members], axis=-1)
    nearest = np.sort(distance, axis=1)[:, 1 : min(neighbours, len(members) - 1) + 1]
    typicality = 1.0 / (nearest.mean(1) + 1e-12)
    in_pool = [j for j, m in enumerate(members) if m < len(pool)]
    return ids[members[max(in_pool, key=lambda j: (typicality[j], -members[j]))]]


class ClaspPE(ExclusiveStrategy):
    """Class-stratified scheduled power predictive entropy (ClaSP PE): each pick targets one foreground class in
    turn (by the number of covered volumes) and ranks volumes by that class's entropy; the ranking is noised as power
    sampling (argmax of log score + Gumbel / beta), with beta = 1 + labelled volumes, so early picks spread and later
    ones exploit. Candidates near a handed-out volume (embedding distance under half the pool's median
    nearest-neighbour distance) are passed over while others remain."""

    def __init__(self, handouts: Handouts, **kwargs):
        super().__init__("Class-stratified predictive entropy with decaying power noise (ClaSP PE)", handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        per_class = self.scores(candidates, datastore, "uncertainty", "per_class", request)
        if not per_class:
            return self.fallback(candidates, request, "uncertainty")
        pool = self.distinct_from_held(sorted(per_class), covered, request, datastore)
        classes = sorted({c for scores in per_class.values() for c in scores})
        target = classes[len(covered) % len(classes)]
        labelled = len(datastore.get_labeled_images())
        rng = np.random.default_rng(request_seed(request))
        score = np.asarray([per_class[i].get(target) or 0.0 for i in pool])
        keys = np.log(np.maximum(score, 1e-12)) + rng.gumbel(size=len(pool)) / (1.0 + labelled)
        logger.info(f"ClaSP PE: target class '{target}', noise scale 1/{1 + labelled}")
        return pool[int(keys.argmax())]

    def distinct_from_held(self, pool: list[str], covered: list[str], request: dict, datastore: Datastore) -> list[str]:
        labelled = set(datastore.get_labeled_images())
        held = [i for i in self.handouts.held(covered) if i not in labelled]
        embeddings = self.scores(pool + held, datastore, "embedding", "vector", request)
        held = [i for i in held if i in embeddings]
        if not held or len([i for i in pool if i in embeddings]) < 2:
            return pool
        x = {i: np.asarray(embeddings[i]) for i in pool if i in embeddings}
        vectors = np.stack(list(x.values()))
        nn = np.sort(np.linalg.norm(vectors[:, None] - vectors[None], axis=-1), axis=1)[:, 1]
        threshold = 0.5 * float(np.median(nn))
        kept = [i for i in pool if i not in x or min(np.linalg.norm(x[i] - np.asarray(embeddings[h])) for h in held) >= threshold]
        return kept or pool


def k_center_greedy(candidates: dict[str, list[float]], centres: list[list[float]]) -> str:
    """The candidate farthest (Euclidean) from its nearest centre; with no centre, the one farthest from the mean."""
    ids = sorted(candidates)
    x = np.asarray([candidates[i] for i in ids])
    c = np.asarray(centres) if len(centres) else x.mean(0, keepdims=True)
    distance = np.linalg.norm(x[:, None, :] - c[None, :, :], axis=-1).min(1)
    return ids[int(distance.argmax())]


class Diversity(ExclusiveStrategy):
    """k-center greedy on the volume embeddings: the volume least like anything labelled or handed out."""

    def __init__(self, handouts: Handouts, **kwargs):
        super().__init__("Most different volume from the labelled set (k-center greedy on SAM embeddings)", handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        embeddings = self.scores(candidates + covered, datastore, "embedding", "vector", request)
        pool = {i: embeddings[i] for i in candidates if i in embeddings}
        if not pool:
            return self.fallback(candidates, request, "embedding")
        return k_center_greedy(pool, [embeddings[i] for i in covered if i in embeddings])


class Hybrid(ExclusiveStrategy):
    """Typicality while fewer than ``cold_start`` volumes are labelled (the model's uncertainty means little yet),
    ClaSP PE after."""

    def __init__(self, handouts: Handouts, cold_start: int = 3, **kwargs):
        super().__init__(f"Typical volumes for the first {cold_start} labels, then ClaSP PE", handouts, **kwargs)
        self.cold_start = cold_start
        self.typicality = Typicality(handouts, **kwargs)
        self.clasp = ClaspPE(handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        early = len(datastore.get_labeled_images()) < self.cold_start
        return (self.typicality if early else self.clasp).select(candidates, covered, request, datastore)
