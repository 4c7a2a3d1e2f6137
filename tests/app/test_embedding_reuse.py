"""Re-inference reuses image embeddings: the same label with the encoder skipped, clicks on the interactive task
decoded on the cached embeddings, and a newly published adapter never served an embedding of the previous one."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def label_of(result) -> np.ndarray:
    return np.asarray(nib.load(result["label"]).dataobj)


def test_reinference_reuses_embeddings_until_the_adapter_changes(app_dir, studies):
    from main import SamFewShotApp

    app = SamFewShotApp(str(app_dir), str(studies), {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    cache = app._infers["hf_sam"].embeddings
    request = {"model": "hf_sam", "image": "brain_002", "device": "cpu"}

    first = app.infer(request)
    segmented = encoded = cache.misses
    assert encoded > 0 and cache.hits == 0 and len(cache) == encoded

    # Same volume and adapter, a click on the interactive task: the slices segmented before come from the cache;
    # only slices without content (skipped by the segmentation) that the propagation reaches are encoded.
    prompted = app.infer({**request, "model": "hf_sam_interactive", "foreground": [[60, 70, 62]], "label": "white matter"})
    assert prompted["params"]["prompted_slices"] == [62]
    assert cache.hits >= 1 and cache.misses - encoded <= first["params"]["skipped_slices"]
    # The click's decoded slices are kept beside the embeddings, never in their place.
    assert len(cache) == cache.misses and len(app._infers["hf_sam_interactive"].decodings) > 0
    encoded = cache.misses
    again = app.infer(request)
    assert np.array_equal(label_of(again), label_of(first))

    app.train({"model": "hf_sam", "max_epochs": 1, "device": "cpu"})
    retrained = app.infer(request)
    assert retrained["params"]["adapter_version"] == 1
    assert cache.misses == encoded + segmented  # every slice encoded again by the new adapter
