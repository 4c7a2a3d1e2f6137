"""Concurrency against a real server: reads answer while inference and training run, and two clients inferring at
once get the results each would get alone.

Responsiveness is checked by order, not by time: reads must complete while an inference is still running (with
MONAI Label's endpoints on the event loop, none would). The latencies measured are printed (`-s`) and recorded
in docs/benchmarks.md.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from test_client_loop import client_for, train_tasks, wait_for_training

pytestmark = pytest.mark.e2e

LONG_VOLUME = "brain_long"


def add_long_volume(studies: Path, repeats: int = 4) -> None:
    """A sample volume tiled ``repeats`` times along z: an inference that lasts several seconds on the tiny model."""
    source = nib.load(str(studies / "brain_003.nii.gz"))
    data = np.concatenate([np.asarray(source.dataobj)] * repeats, axis=2)
    nib.save(nib.Nifti1Image(data, source.affine, source.header), str(studies / f"{LONG_VOLUME}.nii.gz"))


class Reads:
    """Slicer-style reads (/info/, the datastore listing, a datastore image's info) polled in a loop;
    each as (path, status, seconds, finished at)."""

    PATHS = ("/info/", "/datastore/?output=all", "/datastore/image/info?image=brain_002")

    def __init__(self, url: str):
        self.url = url
        self.done: list[tuple[str, int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.PATHS:
                start = time.monotonic()
                status = requests.get(self.url + path, timeout=600).status_code
                end = time.monotonic()
                self.done.append((path, status, end - start, end))
            time.sleep(0.05)

    def __enter__(self) -> Reads:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=600)

    def during(self, start: float, end: float) -> list[tuple[str, int, float, float]]:
        return [r for r in self.done if start < r[3] < end]


def report(what: str, reads: list[tuple[str, int, float, float]]) -> None:
    latencies = np.array([r[2] for r in reads]) * 1000
    print(
        f"{what}: {len(reads)} reads, latency median {np.median(latencies):.0f} ms, "
        f"p95 {np.percentile(latencies, 95):.0f} ms, max {latencies.max():.0f} ms"
    )


def test_reads_answer_while_inference_and_training_run(start_server, studies, tmp_path):
    add_long_volume(studies)
    server = start_server()
    client = client_for(server, tmp_path)
    with Reads(server.url) as reads:
        start = time.monotonic()
        _, result = client.infer("hf_sam", LONG_VOLUME, {})
        end = time.monotonic()
        during_infer = reads.during(start, end)

        task = client.train_start("hf_sam", {"max_epochs": 20})
        train_start = time.monotonic()
        while not [t for t in train_tasks(server) if t["id"] == task["id"] and t["status"] == "RUNNING"]:
            time.sleep(0.2)
        # Inference shares the device with the training run.
        _, during_training_result = client.infer("hf_sam", "brain_002", {})
        wait_for_training(client, server, task["id"])
        during_train = reads.during(train_start, time.monotonic())
    assert result["label_names"] and during_training_result["label_names"]
    print(f"inference of {LONG_VOLUME}: {end - start:.1f} s")
    report("reads during inference", during_infer)
    report("reads during training", during_train)
    assert len(during_infer) >= 3, f"only {len(during_infer)} reads completed during a {end - start:.1f} s inference"
    assert during_train
    failed = {r[0]: r[1] for r in reads.done if r[1] != 200}
    log = server.log()
    first_error = log[log.find("Traceback") :][:4000] if "Traceback" in log else server.log_tail()
    assert not failed, f"{failed}; the server's log from its first traceback:\n{first_error}"


def test_two_clients_inferring_at_once_get_their_own_results(start_server, tmp_path):
    server = start_server(("embedding_cache_mb", "0"))  # both requests really compute
    requests_by_client = {"a": ("hf_sam", "brain_002"), "b": ("masg_sam", "brain_004")}
    alone = {}
    for name, (model, image) in requests_by_client.items():
        path, _ = MONAILabelClient(server.url, tmpdir=str(tmp_path / f"alone-{name}")).infer(model, image, {})
        alone[name] = np.asarray(nib.load(path).dataobj)

    together: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests_by_client))

    def infer(name: str) -> None:
        model, image = requests_by_client[name]
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / f"together-{name}"))
        try:
            barrier.wait()
            path, _ = client.infer(model, image, {})
            together[name] = np.asarray(nib.load(path).dataobj)
        except BaseException as e:  # re-raised below in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=infer, args=(n,)) for n in requests_by_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for name in requests_by_client:
        np.testing.assert_array_equal(together[name], alone[name], err_msg=f"client {name}'s result changed under concurrency")
