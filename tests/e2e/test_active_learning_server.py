"""Active learning through a real server: scores computed by the server, strategies handed out exclusively, the
per-voxel uncertainty map stored as a datastore label; driven by MONAILabelClient."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

pytestmark = pytest.mark.e2e

SCORING_DEADLINE_S = 600  # two scoring subprocesses; minutes only when the CPU is shared


def image_info(client: MONAILabelClient) -> dict[str, dict]:
    return {i: o["image"].get("info", {}) for i, o in client.datastore()["objects"].items()}


def test_scores_strategies_and_uncertainty_map(start_server, tmp_path):
    server = start_server(("auto_scoring", "true"), ("models", "hf_sam"), ("handout_timeout", "3600"))
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))

    # the server scores every volume at start-up, in the background
    deadline = time.monotonic() + SCORING_DEADLINE_S
    while not all("uncertainty" in i and "embedding" in i for i in image_info(client).values()):
        assert time.monotonic() < deadline, f"scores missing after {SCORING_DEADLINE_S} s\n{server.log_tail()}"
        time.sleep(2)
    for info in image_info(client).values():
        assert 0.0 <= info["uncertainty"]["hf_sam"]["score"] <= 1.0
        assert info["uncertainty"]["hf_sam"]["adapter_version"] == 0
        assert len(info["embedding"]["hf_sam"]["vector"]) == 64

    # two annotators asking at the same time get different volumes, never a labelled one
    labelled = {"brain_000", "brain_001"}
    barrier, picks = threading.Barrier(2), []

    def ask(strategy: str) -> None:
        barrier.wait()
        picks.append(MONAILabelClient(server.url, tmpdir=str(tmp_path)).next_sample(strategy, {})["id"])

    threads = [threading.Thread(target=ask, args=(s,)) for s in ("uncertainty", "hybrid")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(picks)) == 2 and not set(picks) & labelled, picks
    for strategy in ("diversity", "random", "first"):
        pick = client.next_sample(strategy, {})["id"]
        assert pick not in labelled and pick not in picks, (strategy, pick, picks)
        picks.append(pick)

    # the uncertainty map beside the label, stored under the 'uncertainty' tag in the image's geometry
    _, result = client.infer("hf_sam", picks[0], {"uncertainty": True, "result_extension": ".nii.gz"})
    assert result["uncertainty"]["tag"] == "uncertainty", result
    path = tmp_path / "uncertainty.nii.gz"
    response = server.get(f"/datastore/label?label={result['uncertainty']['label']}&tag=uncertainty")
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    image = nib.load(str(server.studies / f"{picks[0]}.nii.gz"))
    uncertainty = nib.load(str(path))
    assert uncertainty.shape == image.shape
    np.testing.assert_allclose(uncertainty.affine, image.affine, atol=1e-4)
    values = np.asarray(uncertainty.dataobj)
    assert values.dtype == np.uint8 and values.max() > 0
