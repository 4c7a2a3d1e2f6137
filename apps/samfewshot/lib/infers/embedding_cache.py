"""Reuse of SAM image embeddings, and of the decoder's answers for single slices, across requests.

The image encoder is ~95 % of a slice's FLOPs and depends only on the slice and the encoder weights, not on
prompts. An annotator who re-infers a volume (new points, an uncertainty map, the volume opened again) with an
unchanged adapter gets the encoder's outputs back from memory; only the prompt encoder and decoder run.

The decoder then dominates an interactive request that covers a whole structure (about 0.15 s per slice for
LiteMedSAM on a CPU core, a hundred slices under a box): ``DecodedSlices`` keeps its per-slice answers under what
determines them, so the next click on that structure decodes only the slices whose inputs changed. They are kept
in a cache of their own: in the embeddings' they evicted embeddings of the very volume being annotated.
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
    """Content hash of a tensor: one model-input slice (3, S, S), a slice's logits."""
    return hashlib.blake2b(image.detach().float().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


def _nbytes(entry: torch.Tensor | tuple | list) -> int:
    """Bytes of a cached entry: a tensor, or tensors nested in tuples and lists (an ``Encoding``)."""
    return entry.nbytes if isinstance(entry, torch.Tensor) else sum(_nbytes(e) for e in entry)


class EmbeddingCache:
    """Per-slice ``SamSegmenter.encode`` outputs (or ``DecodedSlices``' answers), least recently used dropped first
    beyond ``max_bytes``; ``hits`` and ``misses`` count the encoder's lookups.

    Entries belong to a scope (the device and adapter version): a new scope empties the cache, so an
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

    def lookup(self, scope: Hashable, keys: list[Hashable], count: bool = True) -> list:
        """The entries of ``keys`` in ``scope`` (None where absent); ``count`` adds them to ``hits`` and ``misses``."""
        with self._lock:
            if scope != self._scope:
                self._entries.clear()
                self._scope = scope
            found = [self._entries.get(k) for k in keys]
            if count:
                hit = sum(f is not None for f in found)
                self.hits += hit
                self.misses += len(keys) - hit
            return found

    def store(self, scope: Hashable, key: Hashable, entry: Encoding | torch.Tensor) -> None:
        with self._lock:
            if scope == self._scope and _nbytes(entry) <= self.max_bytes:
                self._entries[key] = entry


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


class DecodedSlices:
    """The decoder's answers for single slices, in ``cache`` under ``scope`` (device and adapter version: an answer
    of another adapter is never served). A key names everything an answer depends on besides the
    weights: the slice's content (``slice_digest``) and the decoding's inputs (see ``lib.infers.interactive``)."""

    def __init__(self, cache: EmbeddingCache, scope: Hashable):
        self.cache = cache
        self.scope = scope

    def get(self, key: Hashable) -> torch.Tensor | None:
        return self.cache.lookup(self.scope, [key], count=False)[0]

    def put(self, key: Hashable, answer: torch.Tensor) -> None:
        self.cache.store(self.scope, key, answer)
