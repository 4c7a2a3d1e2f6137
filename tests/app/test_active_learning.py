"""Active learning in-process: scores written per adapter version, strategies, exclusive hand-outs, uncertainty map.

Scoring runs with fewer slices and MC samples than the server default (the code path is the same) to keep the
tests quick on CPU.
"""

from __future__ import annotations

import os
import threading
import time

import nibabel as nib
import numpy as np
import pytest

LABELLED = {"brain_000", "brain_001"}
UNLABELLED = {"brain_002", "brain_003", "brain_004", "brain_005", "brain_006", "brain_007"}
ALL = LABELLED | UNLABELLED
STRATEGIES = ["random", "first", "uncertainty", "diversity", "typicality", "clasp_pe", "hybrid"]
PROMPT_DIM = 64  # tiny backbone


@pytest.fixture
def make_app(app_dir, studies, monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)

    def make(**conf):
        from main import SamFewShotApp

        app = SamFewShotApp(
            str(app_dir),
            str(studies),
            {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false", "device": "cpu", **conf},
        )
        uncertainty, embedding = app._scoring_methods["uncertainty"], app._scoring_methods["embedding"]
        uncertainty.max_slices, uncertainty.mc_samples, embedding.max_slices = 1, 1, 1
        return app

    return make


def _entries(app, key: str) -> dict:
    datastore = app.datastore()
    return {i: datastore.get_image_info(i).get(key, {}).get("hf_sam") for i in datastore.list_images()}


def _check_entries(app, key: str, version: int) -> None:
    entries = _entries(app, key)
    assert set(entries) == ALL
    for image_id, entry in entries.items():
        assert entry is not None, image_id
        assert entry["adapter_version"] == version
        if key == "uncertainty":
            assert 0.0 <= entry["score"] <= 1.0
            assert set(entry["per_class"]) == {"white matter", "grey matter"}
            assert all(0.0 <= v <= 1.0 for v in entry["per_class"].values())
        else:
            vector = np.asarray(entry["vector"])
            assert vector.shape == (PROMPT_DIM,)
            assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    if key == "embedding":
        vectors = np.asarray([e["vector"] for e in entries.values()])
        assert not np.allclose(vectors, vectors[0])  # volumes are told apart


def _publish_new_adapter(app) -> int:
    from lib.adapters import publish_adapter
    from lib.networks.lora import adapter_state_dict

    model = app.models["hf_sam"].model
    network, _ = model.resident("cpu")
    return publish_adapter(model.adapter_path, adapter_state_dict(network), model.adapter_config())


def test_scores_are_written_once_per_adapter_version(make_app):
    app = make_app()
    assert all(e is None for e in _entries(app, "uncertainty").values())

    assert app.scoring({"method": "uncertainty"}) == {"scored": 8, "skipped": 0}
    _check_entries(app, "uncertainty", 0)
    assert app.scoring({"method": "embedding"}) == {"scored": 8, "skipped": 0}
    _check_entries(app, "embedding", 0)
    first = _entries(app, "embedding")

    # nothing changed: nothing is scored again, stored values stay as they were
    assert app.scoring({"method": "uncertainty"}) == {"scored": 0, "skipped": 8}
    assert app.scoring({"method": "embedding"}) == {"scored": 0, "skipped": 8}
    assert _entries(app, "embedding") == first

    assert _publish_new_adapter(app) == 1
    assert app.scoring({"method": "uncertainty"}) == {"scored": 8, "skipped": 0}
    _check_entries(app, "uncertainty", 1)
    assert app.scoring({"method": "embedding"}) == {"scored": 8, "skipped": 0}
    _check_entries(app, "embedding", 1)
    assert app.scoring({"method": "uncertainty", "model": "hf_sam"}) == {"scored": 0, "skipped": 8}

    # every strategy, now with real scores, hands out a distinct volume without a final label, until none is left
    given = []
    for strategy in STRATEGIES:
        result = app.next_sample({"strategy": strategy})
        if len(given) == len(UNLABELLED):
            assert result == {}, strategy
            continue
        assert result["id"] in UNLABELLED, (strategy, result)
        assert os.path.isfile(result["path"])
        given.append(result["id"])
    assert sorted(given) == sorted(UNLABELLED)


def test_training_triggers_scoring_with_the_new_adapter(make_app):
    app = make_app(auto_scoring="true")
    assert all(e is None for e in _entries(app, "uncertainty").values())
    stats = app.train({"model": "hf_sam", "max_epochs": 1, "device": "cpu"})
    assert stats["epoch"] == 1
    assert app.models["hf_sam"].model.served_version() == 1
    _check_entries(app, "uncertainty", 1)
    _check_entries(app, "embedding", 1)


def _set_scores(app, scores=None, vectors=None, model="hf_sam", per_class: dict[str, dict[str, float]] | None = None):
    datastore = app.datastore()
    for image_id in set(scores or {}) | set(per_class or {}):
        info = datastore.get_image_info(image_id).get("uncertainty", {})
        entry = {"score": (scores or {}).get(image_id, 0.5), "per_class": (per_class or {}).get(image_id, {}), "adapter_version": 0}
        datastore.update_image_info(image_id, {"uncertainty": {**info, model: entry}})
    for image_id, vector in (vectors or {}).items():
        info = datastore.get_image_info(image_id).get("embedding", {})
        datastore.update_image_info(image_id, {"embedding": {**info, model: {"vector": vector, "adapter_version": 0}}})


# Labelled volumes sit at (0, 0) and (10, 0); distance of each candidate to the nearest one in the comment.
VECTORS = {
    "brain_000": [0.0, 0.0],
    "brain_001": [10.0, 0.0],
    "brain_002": [1.0, 0.0],  # 1
    "brain_003": [9.0, 0.0],  # 1
    "brain_004": [5.0, 1.0],  # 5.10
    "brain_005": [5.0, 4.0],  # 6.40  <- most diverse overall
    "brain_006": [0.0, 3.0],  # 3
    "brain_007": [10.0, -2.0],  # 2 (but farthest from the candidates' mean and the largest norm)
}
SCORES = {
    "brain_002": 0.2,
    "brain_003": 0.9,  # most uncertain
    "brain_004": 0.8,  # top half (003, 004, 006): farthest from the labelled set <- hybrid
    "brain_005": 0.1,
    "brain_006": 0.7,
    "brain_007": 0.3,
}


def test_strategies_pick_the_expected_volume(make_app):
    app = make_app(handout_timeout="0")  # no hand-out bookkeeping between the calls below
    _set_scores(app, SCORES, VECTORS)
    # another model's scores point elsewhere and must not be read for hf_sam
    _set_scores(app, {"brain_002": 1.0}, {"brain_006": [100.0, 100.0]}, model="masg_sam")

    assert app.next_sample({"strategy": "uncertainty"})["id"] == "brain_003"
    assert app.next_sample({"strategy": "diversity"})["id"] == "brain_005"
    # three clusters: around each labelled volume, and brain_004/005 between them, the one not covered (a tie in
    # typicality goes to the first id); hybrid is typicality while fewer than 3 volumes are labelled
    assert app.next_sample({"strategy": "typicality"})["id"] == "brain_004"
    assert app.next_sample({"strategy": "hybrid"})["id"] == "brain_004"
    assert app.next_sample({"strategy": "first"})["id"] == "brain_002"

    # the request's model selects whose scores are read
    assert app.next_sample({"strategy": "uncertainty", "model": "masg_sam"})["id"] == "brain_002"


def test_clasp_pe_targets_one_class_per_pick(make_app):
    """Two labelled volumes: the first pick targets 'grey matter' (classes in name order, by the covered count), the
    next one, with that volume handed out, 'white matter'."""
    app = make_app(handout_timeout="3600")
    low = {"white matter": 0.01, "grey matter": 0.01}
    per_class = {i: dict(low) for i in UNLABELLED}
    per_class["brain_003"] = {"white matter": 0.9, "grey matter": 0.01}
    per_class["brain_005"] = {"white matter": 0.01, "grey matter": 0.9}
    _set_scores(app, per_class=per_class)
    assert [app.next_sample({"strategy": "clasp_pe", "seed": 0})["id"] for _ in range(2)] == ["brain_005", "brain_003"]


def test_clasp_pe_keeps_a_second_annotator_off_a_near_duplicate(make_app):
    app = make_app(handout_timeout="3600")
    both = {"white matter": 0.9, "grey matter": 0.9}
    per_class = {i: {"white matter": 0.05, "grey matter": 0.05} for i in UNLABELLED}
    per_class.update(brain_005=both, brain_006=dict(both))  # the two most uncertain ones look the same
    vectors = {"brain_002": [0.0, 1.0], "brain_003": [1.0, 0.0], "brain_004": [-1.0, 0.0], "brain_007": [0.0, -1.0]}
    vectors.update(brain_005=[0.6, 0.6], brain_006=[0.6, 0.6])
    _set_scores(app, vectors=vectors, per_class=per_class)
    first = app.next_sample({"strategy": "clasp_pe", "seed": 1})["id"]
    second = app.next_sample({"strategy": "clasp_pe", "seed": 1})["id"]
    assert first in ("brain_005", "brain_006")
    assert second not in ("brain_005", "brain_006")


def test_diversity_treats_handed_out_volumes_as_covered(make_app):
    """A second annotator is not sent a near-duplicate of the volume the first one is labelling."""
    app = make_app(handout_timeout="3600")
    vectors = {
        "brain_000": [0.0, 0.0],
        "brain_001": [0.0, 0.0],
        "brain_002": [10.0, 0.0],
        "brain_003": [10.0, 0.1],
        "brain_004": [0.0, 5.0],
    }
    vectors.update({i: [0.0, 0.0] for i in ("brain_005", "brain_006", "brain_007")})
    _set_scores(app, vectors=vectors)
    first = app.next_sample({"strategy": "diversity"})["id"]
    assert first in ("brain_002", "brain_003")
    assert app.next_sample({"strategy": "diversity"})["id"] == "brain_004"


def test_strategies_fall_back_to_random_without_scores(make_app):
    app = make_app(handout_timeout="0")
    for strategy in ("uncertainty", "diversity", "typicality", "clasp_pe", "hybrid"):
        picks = {app.next_sample({"strategy": strategy, "seed": seed})["id"] for seed in range(12)}
        for seed in range(12):
            assert app.next_sample({"strategy": strategy, "seed": seed}) == app.next_sample({"strategy": "random", "seed": seed})
        assert picks <= UNLABELLED
        assert len(picks) > 1, strategy  # not a fixed choice
    # uncertainty scores alone are not enough for diversity (needs embeddings)
    _set_scores(app, {"brain_004": 0.5})
    assert app.next_sample({"strategy": "uncertainty", "seed": 0})["id"] == "brain_004"
    assert app.next_sample({"strategy": "diversity", "seed": 0}) == app.next_sample({"strategy": "random", "seed": 0})


def test_handouts_are_exclusive_until_all_are_given(make_app):
    app = make_app(handout_timeout="3600")
    given = []
    for i in range(len(UNLABELLED)):
        result = app.next_sample({"strategy": STRATEGIES[i % len(STRATEGIES)]})  # one lock shared by every strategy
        given.append(result["id"])
    assert sorted(given) == sorted(UNLABELLED)
    for strategy in STRATEGIES:
        assert app.next_sample({"strategy": strategy}) == {}


@pytest.mark.parametrize("name", STRATEGIES)
def test_simultaneous_requests_get_distinct_volumes(make_app, monkeypatch, name):
    app = make_app()  # default hand-out timeout
    per_class = {i: {"white matter": s, "grey matter": 1 - s} for i, s in SCORES.items()}
    _set_scores(app, SCORES, VECTORS, per_class=per_class)  # each strategy runs its own selection, not a fallback
    # a slow selection (as with many scores to read) widens the window in which unlocked requests would collide
    strategy = app._strategies[name]
    select = strategy.select

    def slow_select(*args, **kwargs):
        time.sleep(0.05)
        return select(*args, **kwargs)

    monkeypatch.setattr(strategy, "select", slow_select)
    n = len(UNLABELLED)
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def ask(k):
        try:
            barrier.wait(timeout=30)
            results[k] = app.next_sample({"strategy": name, "seed": k})["id"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(results) == sorted(UNLABELLED)


def test_without_handout_timeout_a_volume_can_be_given_again(make_app):
    app = make_app(handout_timeout="0")
    assert app.next_sample({"strategy": "first"})["id"] == "brain_002"
    assert app.next_sample({"strategy": "first"})["id"] == "brain_002"


def _small_volume(app, tmp_path) -> str:
    """A few-slice copy of part of brain_003 added to the datastore, so an infer on it is quick."""
    image = nib.load(app.datastore().get_image_uri("brain_003"))
    data = np.asarray(image.dataobj)[20:100, 20:120, 60:64]
    path = tmp_path / "small_000.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return app.datastore().add_image("small_000", str(path), {})


@pytest.mark.slow
def test_infer_stores_a_per_voxel_uncertainty_map(make_app, studies, tmp_path):
    app = make_app()
    datastore = app.datastore()

    # without the request key: no map, nothing stored (on a small volume to keep this quick)
    small = _small_volume(app, tmp_path)
    plain = app.infer({"model": "hf_sam", "image": small})
    assert "uncertainty" not in plain["params"]
    assert "uncertainty" not in datastore.get_labels_by_image_id(small)
    declined = app.infer({"model": "hf_sam", "image": small, "uncertainty": False})  # once a 500: the flag read as a map
    assert "uncertainty" not in declined["params"] and "uncertainty" not in datastore.get_labels_by_image_id(small)
    with_map = app.infer({"model": "hf_sam", "image": small, "uncertainty": True})
    assert with_map["params"]["uncertainty"]["tag"] == "uncertainty"
    assert "uncertainty" in datastore.get_labels_by_image_id(small)
    # asking for the map does not change the segmentation
    np.testing.assert_array_equal(np.asarray(nib.load(with_map["label"]).dataobj), np.asarray(nib.load(plain["label"]).dataobj))

    assert "uncertainty" not in datastore.get_labels_by_image_id("brain_003")
    result = app.infer({"model": "hf_sam", "image": "brain_003", "uncertainty": True})
    entry = result["params"]["uncertainty"]
    assert entry["tag"] == "uncertainty"
    label_id = datastore.get_labels_by_image_id("brain_003").get("uncertainty")
    assert label_id is not None
    assert label_id == entry.get("label", label_id)
    assert datastore.get_label_info(label_id, "uncertainty").get("adapter_version") == 0

    image = nib.load(studies / "brain_003.nii.gz")
    stored = nib.load(datastore.get_label_uri(label_id, "uncertainty"))
    assert stored.shape == image.shape
    np.testing.assert_allclose(stored.affine, image.affine, atol=1e-4)
    values = np.asarray(stored.dataobj)
    assert values.dtype == np.uint8  # entropy / log K scaled to 0..255
    assert values.max() > 0
    assert entry["mean"] == pytest.approx(values.mean() / 255, abs=2e-3)
    assert entry["max"] == pytest.approx(values.max() / 255, abs=2e-3)

    # the map is not a final label: the volume is still offered for annotation
    assert "brain_003" in datastore.get_unlabeled_images()
    seg = np.asarray(nib.load(result["label"]).dataobj)
    assert seg.shape == image.shape and set(np.unique(seg)) <= {0, 1, 2}


def test_a_string_seed_drives_the_noised_pick_repeatably(make_app):
    """ClaSP PE's generator takes only non-negative integers; a string seed (allowed) stands for one."""
    app = make_app(handout_timeout="0")
    _set_scores(app, per_class={i: {"white matter": 0.5, "grey matter": 0.5} for i in UNLABELLED})
    picks = [app.next_sample({"strategy": "clasp_pe", "seed": "annotator-7"})["id"] for _ in range(2)]
    assert picks[0] == picks[1] and picks[0] in UNLABELLED
