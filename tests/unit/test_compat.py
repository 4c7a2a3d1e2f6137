"""The monailabel workarounds: one module, a version guard, each one documented."""

from __future__ import annotations

import pytest

from lib import monailabel_compat


def test_another_monailabel_version_is_refused():
    monailabel_compat.check_version("0.8.5")
    with pytest.raises(RuntimeError, match="runs on monailabel 0.8.5, not 0.9.0.*monailabel_compat.py"):
        monailabel_compat.check_version("0.9.0")


def test_each_workaround_says_what_upstream_does_and_when_it_can_go():
    for workaround in monailabel_compat.WORKAROUNDS:
        assert workaround.where and len(workaround.upstream) > 40 and workaround.until


def test_install_replaces_the_token_check_and_seg_writer(tmp_path):
    import monailabel.datastore.utils.convert
    import monailabel.endpoints.infer
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    from lib.auth import from_token

    monailabel_compat.install(str(tmp_path), frozenset({"sessions"}), {"liver": 1})
    assert auth.from_token is from_token
    assert monailabel.endpoints.infer.nifti_to_dicom_seg is monailabel.datastore.utils.convert.nifti_to_dicom_seg
    assert monailabel.endpoints.infer.nifti_to_dicom_seg.__module__ == "lib.monailabel_compat"
    assert settings.MONAI_LABEL_SESSIONS and settings.MONAI_LABEL_SESSION_PATH == str(tmp_path / "sessions")


def test_train_stats_read_while_a_run_rewrites_them_are_the_last_complete_ones(tmp_path):
    import json

    from monailabel.tasks.train.basic_train import BasicTrainTask

    class Task(monailabel_compat.LastCompleteStats, BasicTrainTask):
        network = optimizer = loss_function = train_pre_transforms = train_post_transforms = val_inferer = None

    task = Task(model_dir=str(tmp_path), stats_path=str(tmp_path / "train_stats.json"))
    assert task.stats() == {}
    complete = {"epoch": 3, "best_metric": 0.5}
    (tmp_path / "train_stats.json").write_text(json.dumps(complete, indent=2))
    assert task.stats() == complete
    task.stats()["publication"] = {}  # a caller adding to its answer changes no later one
    assert task.stats() == complete
    (tmp_path / "train_stats.json").write_text(json.dumps({"epoch": 4, "best_metric": 0.6}, indent=2)[:20])  # mid-copy
    with pytest.raises(ValueError):
        BasicTrainTask.stats(task)  # upstream: /info/ answered 500
    assert task.stats() == complete


def test_datastore_refreshes_run_one_at_a_time(tmp_path, monkeypatch):
    import threading
    import time

    from monailabel.datastore.local import LocalDatastore

    from lib.datastore import CheckedDatastore

    datastore = CheckedDatastore(str(tmp_path), auto_reload=False)
    running, overlaps = [], []

    def slow_refresh(self):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.05)
        running.pop()

    monkeypatch.setattr(LocalDatastore, "refresh", slow_refresh)
    threads = [threading.Thread(target=datastore.refresh) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]  # the watcher's and the requests' refreshes never rebuild the index together
