"""Reuse of SAM image embeddings across requests.

The image encoder is ~95 % of a slice's FLOPs and depends only on the slice and the encoder weights, not on
prompts. An annotator who re-infers a volume (new points, an uncertainty map, the volume opened again) with an
unchanged adapter gets the encoder's outputs back from memory; only the prompt encoder and decoder run.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable

import torch
from cachetools import LRUCache
from torch import nn

from lib.networks.sam_segmenter import Prompts, SamSegmenter

Encoding = tuple[torch.Tensor, list[torch.Tensor]]


def slice_digest(image: torch.Tensor) -> bytes:
    """Content hash of one model-input slice (3, S, S)."""
    return hashlib.blake2b(image.detach().float().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


def _nbytes(encoding: Encoding) -> int:
    embedding, taps = encoding
    return embedding.nbytes + sum(t.nbytes for t in taps)


class EmbeddingCache:
    """Per-slice ``SamSegmenter.encode`` outputs, least recently used dropped first beyond ``max_bytes``.

    Entries belong to a scope (device, adapter version, precision): a new scope empties the cache, so an
    embedding of an older adapter is never served. Entries stay on the device that computed them.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: LRUCache = LRUCache(maxsize=max(max_bytes, 1), getsizeof=_nbytes)
        self._scope: Hashable = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return int(self._entries.currsize)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def lookup(self, scope: Hashable, keys: list[bytes]) -> list[Encoding | None]:
        with self._lock:
            if scope != self._scope:
                self._entries.clear()
                self._scope = scope
            found = [self._entries.get(k) for k in keys]
            hit = sum(f is not None for f in found)
            self.hits += hit
            self.misses += len(keys) - hit
            return found

    def store(self, scope: Hashable, key: bytes, encoding: Encoding) -> None:
        with self._lock:
            if scope == self._scope and _nbytes(encoding) <= self.max_bytes:
                self._entries[key] = encoding


class CachedEncoding(nn.Module):
    """``network`` whose image encoder is looked up in ``cache`` slice by slice, slices not found there encoded by
    ``encoder`` (the network's own, or an engine's compiled copy); forward as ``SamSegmenter``."""

    def __init__(
        self, network: SamSegmenter, cache: EmbeddingCache, scope: Hashable, encoder: Callable[[torch.Tensor], Encoding] | None = None
    ):
        super().__init__()
        self.network = network
        self.cache = cache
        self.scope = scope
        self.encoder = encoder or network.encode

    def forward(self, image: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        return self.network(image, prompts, encode=self.encode)

    def encode(self, image: torch.Tensor) -> Encoding:
        """(B, 3, S, S) -> the network's encoding, computing only the slices not seen before."""
        keys = [slice_digest(s) for s in image]
        found = self.cache.lookup(self.scope, keys)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            embedding, taps = self.encoder(image[missing])
            for j, i in enumerate(missing):
                # Copies, so an evicted slice does not keep its whole batch's tensors alive.
                found[i] = (embedding[j].clone(), [t[j].clone() for t in taps])
                self.cache.store(self.scope, keys[i], found[i])
        return torch.stack([f[0] for f in found]), [torch.stack(t) for t in zip(*(f[1] for f in found))]
