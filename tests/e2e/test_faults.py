"""Faults against a real server: a training run killed mid-epoch, and a server restart.

A killed run must leave the served adapter byte-identical (nothing is published before a run completes) and the
next run must resume from it; a restarted server must come back with its adapters, scores and train/val split.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from monailabel.client import MONAILabelClient
from test_client_loop import adapter_version, client_for, train_tasks, wait_for_training

from lib.configs import SAM_MODELS

pytestmark = pytest.mark.e2e

KILL_DEADLINE_S = 180
SCORING_DEADLINE_S = 600  # scoring all 8 sample volumes; generous for a loaded CI machine


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.pt"))}


def training_process(server) -> psutil.Process | None:
    """The training subprocess MONAI Label started for the server (``python -m monailabel.interfaces.utils.app -m train``)."""
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "monailabel.interfaces.utils.app" in cmdline and cmdline[cmdline.index("-m", 2) + 1] == "train":
            return child
    return None


def kill_training_mid_epoch(server, from_epoch: int) -> None:
    """SIGKILL the running training subprocess once its log shows it in epoch ``from_epoch``."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline:
        process = training_process(server)
        if process and f"Epoch[{from_epoch}]" in server.log():
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            return
        time.sleep(0.2)
    pytest.fail(f"training never reached epoch {from_epoch}\n{server.log_tail()}")


def wait_until_not_running(server, task_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = next(t for t in train_tasks(server) if t["id"] == task_id)
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(0.5)
    pytest.fail(f"task {task_id} still listed as running after its process was killed\n{server.log_tail()}")


def test_killed_training_keeps_the_served_adapter_and_the_next_run_resumes(start_server, app_dir, studies, tmp_path):
    server = start_server()
    client = client_for(server, tmp_path)
    model_dir = app_dir / "model"

    wait_for_training(client, server, client.train_start("hf_sam", {"max_epochs": 2})["id"])
    assert adapter_version(server, "hf_sam") == 1
    published = file_digests(model_dir)
    split = (model_dir / "hf_sam_split.json").read_text()

    long_run = client.train_start("hf_sam", {"max_epochs": 500})
    kill_training_mid_epoch(server, from_epoch=3)
    task = wait_until_not_running(server, long_run["id"])
    assert task["status"] != "DONE"

    assert file_digests(model_dir) == published, "the killed run changed a published adapter file"
    assert not [p.name for p in model_dir.rglob(".tmp-*")], "the killed run left a partial file"
    assert (model_dir / "hf_sam_split.json").read_text() == split
    assert adapter_version(server, "hf_sam") == 1
    _, result = client.infer("hf_sam", "brain_002", {})
    assert result["adapter_version"] == 1  # the server kept serving throughout

    wait_for_training(client, server, client.train_start("hf_sam", {"max_epochs": 2})["id"])
    assert "hf_sam: resuming from adapter version 1" in server.log()
    assert adapter_version(server, "hf_sam") == 2


def uncertainty_scores(studies: Path) -> dict[str, dict]:
    """{image id: {model: score entry}} as the datastore JSON holds them."""
    objects = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    return {i: o["image"].get("info", {}).get("uncertainty", {}) for i, o in objects.items()}


def wait_for_scoring(server) -> None:
    deadline = time.monotonic() + SCORING_DEADLINE_S
    while True:
        response = server.get("/scoring/")
        if response.status_code == 200 and response.json().get("status") not in ("SUBMITTED", "RUNNING"):
            assert response.json()["status"] == "DONE", response.json()
            return
        assert time.monotonic() < deadline, f"scoring did not finish\n{server.log_tail()}"
        time.sleep(1)


def test_restart_recovers_adapters_scores_and_split(start_server, app_dir, studies, tmp_path):
    server = start_server()
    client = client_for(server, tmp_path)
    wait_for_training(client, server, client.train_start("hf_sam", {"max_epochs": 2})["id"])
    assert server.post("/scoring/uncertainty", json={"model": "hf_sam"}).status_code == 200
    wait_for_scoring(server)
    scores = uncertainty_scores(studies)
    assert all(s["hf_sam"]["adapter_version"] == 1 for s in scores.values()), scores
    split = json.loads((app_dir / "model" / "hf_sam_split.json").read_text())
    versions = {m: adapter_version(server, m) for m in SAM_MODELS}
    server.stop()

    restarted = start_server()
    assert {m: adapter_version(restarted, m) for m in versions} == versions == {"hf_sam": 1, "masg_sam": 0}
    # Scoring again keeps the stored scores of an unchanged adapter instead of recomputing them.
    assert restarted.post("/scoring/uncertainty", json={"model": "hf_sam"}).status_code == 200
    wait_for_scoring(restarted)
    assert "'scored': 0, 'skipped': 8" in restarted.log()
    assert uncertainty_scores(studies) == scores
    client = MONAILabelClient(restarted.url, tmpdir=str(tmp_path / "client"))
    assert client.next_sample("uncertainty", {"model": "hf_sam"}).get("id") in scores
    _, result = client.infer("hf_sam", "brain_002", {})
    assert result["adapter_version"] == 1
    wait_for_training(client, restarted, client.train_start("hf_sam", {"max_epochs": 1})["id"])
    assert json.loads((app_dir / "model" / "hf_sam_split.json").read_text()) == split
    assert "hf_sam: resuming from adapter version 1" in restarted.log()
