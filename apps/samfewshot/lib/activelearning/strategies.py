"""Active-learning strategies: which unlabelled volume an annotator should label next.

Every strategy draws from the volumes without a final label that were not handed out within the last
``handout_timeout`` seconds, under one lock shared by all strategies: two annotators asking at the same time never
get the same volume, and a volume someone is working on is not offered again until the timeout. Scores come from
the datastore image info written by ``lib.scoring`` (model named by the request's ``model``, else the first).
"""

from __future__ import annotations

import logging
import random
import threading
import time

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


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
        return random.Random(request.get("seed")).choice(candidates)

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
        return random.Random(request.get("seed")).choice(candidates)


class Uncertainty(ExclusiveStrategy):
    """The most uncertain volume (highest foreground predictive entropy); random among unscored ones."""

    def __init__(self, handouts: Handouts, **kwargs):
        super().__init__("Most uncertain volume (predictive entropy under TTA and MC dropout)", handouts, **kwargs)

    def select(self, candidates, covered, request, datastore):
        scores = self.scores(candidates, datastore, "uncertainty", "score", request)
        if not scores:
            return self.fallback(candidates, request, "uncertainty")
        return max(scores, key=lambda i: (scores[i], i))


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
    """Diverse among the most uncertain: k-center greedy over the top ``top_fraction`` by uncertainty."""

    def __init__(self, handouts: Handouts, top_fraction: float = 0.5, min_top: int = 2, **kwargs):
        super().__init__("Most different volume among the most uncertain ones", handouts, **kwargs)
        self.top_fraction = top_fraction
        self.min_top = min_top

    def select(self, candidates, covered, request, datastore):
        scores = self.scores(candidates, datastore, "uncertainty", "score", request)
        embeddings = self.scores(candidates + covered, datastore, "embedding", "vector", request)
        ranked = sorted((i for i in candidates if i in scores and i in embeddings), key=lambda i: (-scores[i], i))
        if not ranked:
            return self.fallback(candidates, request, "uncertainty and embedding")
        top = ranked[: max(self.min_top, int(np.ceil(self.top_fraction * len(ranked))))]
        return k_center_greedy({i: embeddings[i] for i in top}, [embeddings[i] for i in covered if i in embeddings])
