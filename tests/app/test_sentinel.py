"""Safe continual updates: a run's adapter is served only if it scores on the sentinel volumes at least as well as
the served one (within the tolerance); a worse one is kept as a candidate, and the stats and /info/ say why."""

from __future__ import annotations

import json
import os

import torch
from ignite.engine import Events

LABEL_INFO = {"label_info": [{"name": "white matter", "idx": 1}, {"name": "grey matter", "idx": 2}]}
# With half the volumes for the sentinel and two to train first, the third labelled volume (brain_002) is the sentinel.
REQUEST = {"model": "hf_sam", "max_epochs": 3, "val_split": 0.5, "device": "cpu"}


class ZeroAdapter:
    """A train handler that wipes every trainable tensor after each step: a deliberately damaged candidate, which
    predicts background everywhere (sentinel Dice 0)."""

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        with torch.no_grad():
            for p in self.network.parameters():
                if p.requires_grad:
                    p.zero_()


def make_app(app_dir, studies):
    from main import SamFewShotApp

    return SamFewShotApp(str(app_dir), str(studies), {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})


def test_a_worse_adapter_is_kept_as_a_candidate_and_a_better_one_is_served(app_dir, studies, sample_data, monkeypatch):
    from monailabel.config import settings

    from lib.adapters import publish_adapter, read_adapter, serve_candidate
    from lib.networks.lora import adapter_state_dict
    from lib.trainers.adapter_trainer import SENTINEL_TOLERANCE, AdapterTrainer

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    app = make_app(app_dir, studies)
    truth = sample_data / "brain-mri-groundtruth"
    app.datastore().save_label("brain_002", str(truth / "brain_002.nii.gz"), "final", dict(LABEL_INFO))
    model = app.models["hf_sam"].model
    # served: the untrained tensors as version 1, which segment the sentinel a little (the tiny weights are seeded)
    assert publish_adapter(model.adapter_path, adapter_state_dict(model.build_network()), model.adapter_config()) == 1
    served_file = open(model.adapter_path, "rb").read()

    # a damaged run scores 0 on the sentinel: kept aside, the served adapter untouched, and /info/ says why
    original = AdapterTrainer.train_handlers
    monkeypatch.setattr(AdapterTrainer, "train_handlers", lambda self, context: original(self, context) + [ZeroAdapter(context.network)])
    damaged = app.train(REQUEST)["publication"]
    monkeypatch.setattr(AdapterTrainer, "train_handlers", original)
    assert not damaged["served"] and "version" not in damaged, damaged
    assert damaged["candidate_metric"] == 0.0
    assert damaged["served_metric"] > SENTINEL_TOLERANCE
    assert damaged["served_version"] == 1 and "< served" in damaged["reason"]
    assert open(model.adapter_path, "rb").read() == served_file
    assert app.infer({"model": "hf_sam", "image": "brain_003", "device": "cpu"})["params"]["adapter_version"] == 1
    assert app.info()["train_stats"]["hf_sam"]["publication"] == damaged
    candidate = read_adapter(damaged["candidate"])
    assert candidate["candidate"] and candidate["info"]["metric"] == 0.0
    assert all(not t.any() for t in candidate["state_dict"].values())

    # a person may still serve the candidate, as a new version; a run that beats it is then served
    assert serve_candidate(model.adapter_path, damaged["candidate"]) == 2
    assert read_adapter(model.adapter_path)["info"]["served_from_candidate"] == os.path.basename(damaged["candidate"])
    better = app.train(REQUEST)["publication"]
    assert better["served"] and better["version"] == 3, better
    assert better["served_metric"] == 0.0 and better["candidate_metric"] >= better["served_metric"]
    assert ">= served" in better["reason"]


def test_without_a_sentinel_volume_the_stats_say_nothing_was_checked(app_dir, studies, monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    app = make_app(app_dir, studies)
    publication = app.train({**REQUEST, "max_epochs": 1})["publication"]
    assert publication["served"] and publication["version"] == 1
    assert publication["sentinel_volumes"] == [] and publication["served_metric"] is None
    assert publication["reason"].startswith("no sentinel volume yet, so nothing was checked")
    assert app.info()["train_stats"]["hf_sam"]["publication"] == publication


def test_the_sentinel_survives_a_restart_and_never_trains(app_dir, studies, sample_data, monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    truth = sample_data / "brain-mri-groundtruth"
    app = make_app(app_dir, studies)
    app.datastore().save_label("brain_002", str(truth / "brain_002.nii.gz"), "final", dict(LABEL_INFO))
    first = app.train({**REQUEST, "max_epochs": 1})["publication"]
    assert first["served"] and first["reason"].startswith("no adapter was served yet (the base weights score")
    split_path = app_dir / "model" / "hf_sam_split.json"
    split = json.loads(split_path.read_text())
    assert split == {"train": ["brain_000", "brain_001"], "val": ["brain_002"]}

    # a restarted server (a new app on the same folders) with two more labels: old volumes keep their side, the new
    # ones are placed by the same rule, and the sentinel volume is never trained on
    restarted = make_app(app_dir, studies)
    for image_id in ("brain_003", "brain_004"):
        restarted.datastore().save_label(image_id, str(truth / f"{image_id}.nii.gz"), "final", dict(LABEL_INFO))
    publication = restarted.train({**REQUEST, "max_epochs": 1})["publication"]
    assert publication["served_version"] == 1 and publication["reason"].startswith("sentinel val_mean_dice")
    after = json.loads(split_path.read_text())
    assert after["train"][:2] == split["train"] and after["val"][0] == "brain_002"
    assert sorted(after["train"] + after["val"]) == ["brain_000", "brain_001", "brain_002", "brain_003", "brain_004"]
    assert publication["sentinel_volumes"] == after["val"]
    from lib.adapters import read_adapter

    run = read_adapter(publication.get("candidate") or restarted.models["hf_sam"].model.adapter_path)["info"]
    assert run["run_id"] == publication["run_id"]
    assert sorted(run["train_volumes"]) == sorted(after["train"])
