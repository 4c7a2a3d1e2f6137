"""Image-embedding reuse: the same logits as the network, the encoder skipped for slices seen before, a new
scope (adapter version) never served an old embedding, and the memory budget kept."""

from __future__ import annotations

import torch

from lib.infers.embedding_cache import CachedEncoding, EmbeddingCache
from lib.networks.hf_sam import HFSam
from lib.networks.sam_segmenter import Prompts, build_segmenter


def encoder_calls(network) -> list[int]:
    """Batch sizes the image encoder runs on, recorded by a hook on its first layer."""
    calls: list[int] = []
    network.image_encoder.patch_embed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def tiny_network():
    return build_segmenter(HFSam, "tiny", 3, 4, None).eval()  # its AWFFM reads the cached tap


def test_cached_encoding_gives_the_network_output_and_skips_the_encoder_for_seen_slices():
    torch.manual_seed(0)
    network = tiny_network()
    calls = encoder_calls(network)
    cache = EmbeddingCache(64 << 20)
    cached = CachedEncoding(network, cache, ("cpu", 0, "fp32"))
    slices = torch.rand(3, 1, 256, 256)
    with torch.no_grad():
        expected = network(slices)
        calls.clear()
        torch.testing.assert_close(cached(slices), expected)
        assert calls == [3] and len(cache) == 3
        # One new slice beside two known ones: only the new one is encoded.
        mixed = torch.cat([slices[:2], torch.rand(1, 1, 256, 256)])
        torch.testing.assert_close(cached(mixed), network(mixed))
        assert calls == [3, 1, 3]  # cached pass encodes 1, the direct call 3
        # Prompts change the decoder only: the embedding is reused and the prompted logits are the network's.
        prompts = Prompts(points=torch.tensor([[[100.0, 120.0]]]), point_labels=torch.tensor([[1]]))
        calls.clear()
        torch.testing.assert_close(cached(slices[:1], prompts), network(slices[:1], prompts))
        assert calls == [1]  # the direct call only
    assert cache.hits == 2 + 1 and cache.misses == 3 + 1


def test_a_new_scope_empties_the_cache():
    torch.manual_seed(0)
    network = tiny_network()
    calls = encoder_calls(network)
    cache = EmbeddingCache(64 << 20)
    slices = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        CachedEncoding(network, cache, ("cpu", 1, "fp32"))(slices)
        network.image_encoder.neck[0].weight.mul_(2)  # a new adapter changed the encoder
        expected = network(slices)
        calls.clear()
        torch.testing.assert_close(CachedEncoding(network, cache, ("cpu", 2, "fp32"))(slices), expected)
    assert calls == [2]


def test_budget_keeps_the_most_recently_used_slices():
    torch.manual_seed(0)
    network = tiny_network()
    with torch.no_grad():
        embedding, taps = network.encode(torch.rand(1, 3, 256, 256))
        per_slice = sum(t[0].nbytes for t in (embedding, *taps))
    cache = EmbeddingCache(2 * per_slice)
    cached = CachedEncoding(network, cache, ("cpu", 0, "fp32"))
    a, b, c = torch.rand(3, 1, 1, 256, 256)
    with torch.no_grad():
        for s in (a, b, c):
            cached(s)
        assert len(cache) == 2 and cache.nbytes <= 2 * per_slice
        cached(c)
        cached(b)
        assert cache.hits == 2
        cached(a)  # evicted first
    assert cache.misses == 4
