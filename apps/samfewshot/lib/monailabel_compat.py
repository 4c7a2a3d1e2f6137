"""Every place the app changes or reaches into monailabel 0.8.5, in one module.

The app is built on monailabel's public task classes; where 0.8.5 is wrong or unsafe for this app, the fix is made
here at start-up (``install``) or in a base class the app's classes derive from (``AppFixes``, ``HookedEngines``,
``LastCompleteStats``).
``WORKAROUNDS`` lists each one: what upstream does, the upstream code it works around, and when it can go. Another
monailabel version is refused at start-up (``check_version``): each entry must be re-read against it first.

Other code uses only monailabel's public API, plus the protected task hooks monailabel's own sample apps override
(``BasicInferTask._get_network``, ``BasicTrainTask._create_*``), listed here too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import monailabel
import monailabel.datastore.dicom
import monailabel.datastore.utils.convert
import monailabel.endpoints.infer
import monailabel.endpoints.proxy
import monailabel.transform.cache as cache
import requests
import requests.adapters
import torch
from fastapi import FastAPI
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.endpoints.user import auth
from monailabel.tasks.train.basic_train import Context

from lib.auth import from_token
from lib.dicom_seg import write_dicom_seg

logger = logging.getLogger(__name__)

MONAILABEL_VERSION = "0.8.5"


@dataclass(frozen=True)
class Workaround:
    """One change to monailabel: ``where`` it is made, what ``upstream`` does wrong, and when it can go (``until``)."""

    where: str
    upstream: str
    until: str


WORKAROUNDS = (
    Workaround(
        "lib.datastore.CheckedDatastore.refresh: one reconciliation at a time",
        "LocalDatastore.refresh rebuilds the index without a lock, and the file watcher's thread calls it on every "
        "file event while request threads call it too (remove_label here, save_label upstream): two at once fail "
        "with 'dictionary changed size during iteration' (monailabel/datastore/local.py, _remove_non_existing)",
        "monailabel serialises refresh",
    ),
    Workaround(
        "lib.datastore.CheckedDatastore.remove_label: refreshes the index at once",
        "with auto_reload (the server's default) LocalDatastore.remove_label only deletes the file and leaves the "
        "index to the file watcher, so for a moment (seconds on a loaded host) a deleted label is still listed and "
        "a run started then trains on it (monailabel/datastore/local.py)",
        "monailabel updates its index in remove_label whatever auto_reload is",
    ),
    Workaround(
        "install: monailabel.endpoints.user.auth.from_token -> lib.auth.from_token",
        "calls jwt.decode without algorithms=; PyJWT 2 then refuses every token, so MONAI_LABEL_AUTH_ENABLE locks "
        "everyone out (monailabel/endpoints/user/auth.py)",
        "monailabel names the algorithms and checks exp and iss",
    ),
    Workaround(
        "install: nifti_to_dicom_seg in monailabel.datastore.utils.convert, monailabel.datastore.dicom and "
        "monailabel.endpoints.infer -> lib.dicom_seg.write_dicom_seg (highdicom)",
        "writes DICOM SEG with dcmqi's itkimage2segimage, downloaded from GitHub at start-up, or pydicom-seg, which "
        "drops segments the client did not describe",
        "monailabel writes SEG with highdicom (its newer releases start to)",
    ),
    Workaround(
        "clear_dicomweb_lists: the cachetools caches of DICOMWebDatastore.list_images / get_labeled_images",
        "caches the DICOMweb series lists for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (2 h) and does not drop them when "
        "it stores a SEG, so a label just saved is not seen by next_sample or training",
        "monailabel invalidates the lists on save_label",
    ),
    Workaround(
        "install: settings.MONAI_LABEL_SESSIONS / _SESSION_PATH / _INFER_CONCURRENCY",
        "keeps sessions under the user's home directory and runs inferences in parallel by default, each with a "
        "whole model's memory on the same cores",
        "these become --conf or documented defaults upstream (they stay settings)",
    ),
    Workaround(
        "lib.routes.install on monailabel.app.app (FastAPI's private APIRouter._mark_routes_changed), from main.py",
        "serves unchecked endpoints that read and write outside the datastore (sessions, infer params replacing the "
        "image, archives unpacked anywhere, OHIF static files by any path, wsi, reload): see README 'Security'",
        "never for the policy itself; the private call goes when FastAPI stops caching included routes",
    ),
    Workaround(
        "AppFixes._download_dcmqi_tools",
        "downloads dcmqi from GitHub whenever the datastore is DICOMweb; SEG is written with highdicom here",
        "with the SEG writer above",
    ),
    Workaround(
        "AppFixes.__init__: MONAILabelApp._auto_update_scoring = False",
        "re-runs every scoring method after every next_sample request; scores here change only with the model",
        "monailabel makes it an argument",
    ),
    Workaround(
        "HookedEngines._create_trainer / _create_evaluator",
        "BasicTrainTask builds its engines without iteration_update, event_names and additional_metrics from its "
        "own hooks, and with a CheckpointSaver of the whole network; the adapters here are published on completion",
        "monailabel passes its hooks through and makes the checkpoint handler optional",
    ),
    Workaround(
        "LastCompleteStats.stats (the train stats /info/ shows)",
        "a training run copies its stats over the model's train_stats.json in place after every epoch (shutil.copy "
        "in monailabel/tasks/train/handler.py) while BasicTrainTask.stats json.loads that file for /info/, so a read "
        "in between answered /info/ with 500 (seen in a test polling /info/ during a run)",
        "monailabel writes the stats to a temporary file and renames it over the old one",
    ),
    Workaround(
        "infers, trainers, strategies, scoring_methods, server_mode: MONAILabelApp's private _infers, _trainers, "
        "_strategies, _scoring_methods, _server_mode",
        "keeps the app's tasks and whether it serves in private attributes, with no public accessor; the route checks "
        "and the app's own infer/next_sample/scoring need them by name",
        "monailabel exposes them (read-only accessors)",
    ),
    Workaround(
        "install: monailabel.endpoints.proxy.requests -> PacsRequests (timeouts); lib.endpoint_bodies.proxy runs the "
        "forwarding in a worker thread",
        "forwards DICOMweb requests to the PACS with blocking requests calls and no timeout inside the event loop "
        "(monailabel/endpoints/proxy.py), so a PACS that accepts and never answers stalls every client of the server",
        "monailabel forwards with an async client and timeouts",
    ),
    Workaround(
        "with_pacs_timeouts: the DICOMweb datastore's private _client._session gets an adapter with PACS_TIMEOUT_S",
        "builds its DICOMwebClient on a requests session without timeouts (monailabel/interfaces/app.py), so a PACS "
        "that accepts and never answers hangs /info/, next sample and every datastore call for good",
        "monailabel (or dicomweb-client) takes a timeout",
    ),
    Workaround(
        "forget_prepared_volumes: monailabel.transform.cache's module-private _data_mem_cache",
        "keeps CacheTransformDatad's in-memory entries (the SAM tasks' prepared volumes) in a module-private "
        "ExpiringDict with no way to empty it; scripts/benchmark.py and the tests need a volume seen for the first time",
        "monailabel offers a clear() for its transform cache",
    ),
    Workaround(
        "batch_devices: the options of POST /batch/infer get multi_gpu false on a host without CUDA GPUs",
        "BatchInferTask defaults multi_gpu to true and spreads the volumes over torch.cuda.device_count() GPUs, so on "
        "a host without one every batch run fails in the background with a modulo by zero "
        "(monailabel/interfaces/tasks/batch_infer.py)",
        "monailabel runs a batch on the request's device when it sees no GPU",
    ),
    Workaround(
        "lib.trainers.adapter_trainer.AdapterTrainer.__call__ sets BasicTrainTask's private _disable_meta_tracking per run",
        "turns MONAI's process-wide meta tracking off for the whole run when asked to, also when the run is inside the "
        "server (run_sync), where other requests then load volumes without their affine",
        "monailabel decides it per process (only in its training subprocess)",
    ),
    Workaround(
        "lib.infers.resident.ResidentModelInfer._get_network, lib.endpoint_bodies (the app's bodies of unsafe endpoints)",
        "builds a network per task from a file path; the app serves one resident network per model, hot-swapping "
        "adapters. The handlers: see their docstrings",
        "a protected hook monailabel's sample apps override too; stays",
    ),
)


def infers(app) -> dict[str, Any]:
    """The app's infer tasks by name (MONAILabelApp keeps them in ``_infers`` without a public accessor)."""
    return app._infers


def trainers(app) -> dict[str, Any]:
    return app._trainers


def strategies(app) -> dict[str, Any]:
    return app._strategies


def scoring_methods(app) -> dict[str, Any]:
    return app._scoring_methods


def batch_devices(options: dict[str, Any]) -> dict[str, Any]:
    """Batch infer options the batch task can run on this host: ``multi_gpu`` false without CUDA GPUs
    (``WORKAROUNDS``; the route refuses an explicit true there)."""
    return options if torch.cuda.device_count() else {**options, "multi_gpu": False}


def server_mode(app) -> bool:
    """Whether the app runs inside a server (MONAILabelApp's ``_server_mode``), not a subprocess or a script."""
    return app._server_mode


def check_version(version: str = monailabel.__version__) -> None:
    """The workarounds were written against ``MONAILABEL_VERSION``; another version stops the app."""
    if version != MONAILABEL_VERSION:
        raise RuntimeError(
            f"samfewshot runs on monailabel {MONAILABEL_VERSION}, not {version}: its workarounds of monailabel "
            f"(lib/monailabel_compat.py) must be checked against {version} first; install monailabel=={MONAILABEL_VERSION}"
        )


def install(model_dir: str, endpoint_groups: frozenset[str], default_labels: Mapping[str, int]) -> None:
    """Apply the workarounds that change monailabel's modules and settings (idempotent). The route policy is
    installed by the app itself (``lib.routes.install``), once the server's FastAPI application exists."""
    check_version()
    auth.from_token = from_token

    def nifti_to_dicom_seg(series_dir, label, label_info, file_ext="*", use_itk=True) -> str:
        # monailabel's signature; file_ext and use_itk (dcmqi) have no meaning for the highdicom writer
        return write_dicom_seg(series_dir, label, label_info, default_labels)

    for module in (monailabel.datastore.utils.convert, monailabel.datastore.dicom, monailabel.endpoints.infer):
        module.nifti_to_dicom_seg = nifti_to_dicom_seg
    monailabel.endpoints.proxy.requests = PacsRequests

    # Sessions (3D Slicer's upload of a volume that is not in the datastore) live in the model folder unless the
    # administrator points MONAI_LABEL_SESSION_PATH elsewhere; one inference at a time unless
    # MONAI_LABEL_INFER_CONCURRENCY says otherwise (the event loop stays free meanwhile).
    settings.MONAI_LABEL_SESSIONS = "sessions" in endpoint_groups
    settings.MONAI_LABEL_SESSION_PATH = os.environ.get("MONAI_LABEL_SESSION_PATH") or os.path.join(model_dir, "sessions")
    if "MONAI_LABEL_INFER_CONCURRENCY" not in os.environ:
        settings.MONAI_LABEL_INFER_CONCURRENCY = 1


# A PACS gets this long to accept a connection and then to send each part of its answer (seconds).
PACS_TIMEOUT_S = (10.0, 120.0)


class PacsRequests:
    """What monailabel's proxy calls of ``requests`` (``get``, ``post``), with ``PACS_TIMEOUT_S``."""

    RequestException = requests.RequestException

    @staticmethod
    def get(url: str, **kwargs: Any) -> requests.Response:
        return requests.get(url, timeout=PACS_TIMEOUT_S, **kwargs)

    @staticmethod
    def post(url: str, **kwargs: Any) -> requests.Response:
        return requests.post(url, timeout=PACS_TIMEOUT_S, **kwargs)


class _TimedAdapter(requests.adapters.HTTPAdapter):
    def send(self, request, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or PACS_TIMEOUT_S
        return super().send(request, **kwargs)


def with_pacs_timeouts(datastore: DICOMWebDatastore) -> DICOMWebDatastore:
    """``datastore`` with ``PACS_TIMEOUT_S`` on every request its DICOMweb client sends."""
    session = datastore._client._session
    for scheme in ("http://", "https://"):
        session.mount(scheme, _TimedAdapter())
    return datastore


def fastapi_app() -> FastAPI | None:
    """MONAI Label's FastAPI application inside a server; None in a training subprocess or a script."""
    return getattr(sys.modules.get("monailabel.app"), "app", None)


def forget_prepared_volumes() -> None:
    """Drop every prepared volume (MONAI Label's in-memory transform cache), as if no volume had been seen."""
    cache.init_cache()
    cache._data_mem_cache.clear()


def clear_dicomweb_lists() -> None:
    """Drop MONAI Label's cached DICOMweb series lists, so a SEG just stored counts as a label at once."""
    for method in (DICOMWebDatastore.list_images, DICOMWebDatastore.get_labeled_images):
        method.cache.clear()


class AppFixes:
    """Mixed into the MONAILabelApp: no dcmqi download, no re-scoring after every next_sample."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._auto_update_scoring = False

    def _download_dcmqi_tools(self):
        """SEG is written with highdicom (``install``)."""


class HookedEngines:
    """Mixed into a BasicTrainTask: MONAI's engines with the task's own hooks passed through and no CheckpointSaver.
    ``prepare_batch`` is the task's (``self.prepare_batch``)."""

    def _create_evaluator(self, context: Context):
        if not context.val_datalist:
            return None
        return SupervisedEvaluator(
            device=context.device,
            val_data_loader=self.val_data_loader(context),
            network=context.network,
            inferer=self.val_inferer(context),
            postprocessing=self._validate_transforms(self.val_post_transforms(context), "Validation", "post"),
            key_val_metric=self.val_key_metric(context),
            additional_metrics=self.val_additional_metrics(context),
            val_handlers=self.val_handlers(context),
            iteration_update=self.val_iteration_update(context),
            event_names=self.event_names(context),
        )

    def _create_trainer(self, context: Context):
        return SupervisedTrainer(
            device=context.device,
            max_epochs=context.max_epochs,
            train_data_loader=self.train_data_loader(context),
            network=context.network,
            optimizer=context.optimizer,
            loss_function=self.loss_function(context),
            inferer=self.train_inferer(context),
            amp=self._amp,
            postprocessing=self._validate_transforms(self.train_post_transforms(context), "Training", "post"),
            key_train_metric=self.train_key_metric(context),
            additional_metrics=self.train_additional_metrics(context),
            train_handlers=self.train_handlers(context),
            iteration_update=self.train_iteration_update(context),
            event_names=self.event_names(context),
            prepare_batch=self.prepare_batch,
        )


class LastCompleteStats:
    """Mixed into a BasicTrainTask: its train stats as last read whole, while a run rewrites the file in place. Each
    call gets its own copy (callers add to it)."""

    def stats(self) -> dict[str, Any]:
        try:
            self._last_stats = super().stats()
        except ValueError:  # a half-written file (JSONDecodeError): the run is copying its stats right now
            logger.debug(f"{self._stats_path} is being written; answering with the stats read before")
        return dict(getattr(self, "_last_stats", {}))
