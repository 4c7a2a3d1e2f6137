"""samfewshot: few-shot SAM adaptations as a MONAI Label app (the --conf keys are listed in the README)."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import monailabel
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import tasks

from lib import monailabel_compat, routes
from lib.activelearning import ClaspPE, Diversity, First, Handouts, Hybrid, RandomChoice, Typicality, Uncertainty
from lib.annotator_prompts import INTERACTIONS_KEY, InteractionLog
from lib.checks.requests import check_choice
from lib.conf import listed_names, parse_conf
from lib.configs import MODEL_CONFIGS, SAM_MODELS
from lib.datastore import SAVED_KEY, CheckedDatastore
from lib.errors import http_errors, one_line
from lib.label_check import check_saved_label, flagged_labels
from lib.monailabel_compat import AppFixes
from lib.scoring import EmbeddingScoring, UncertaintyScoring

logger = logging.getLogger(__name__)


def selected_models(value: str) -> list[str]:
    """Model names from ``--conf models`` ('all', 'segmentation' for every SAM class-segmentation model, or a
    comma-separated list); an unknown name is an error naming the nearest valid one."""
    valid = f"all, segmentation, {', '.join(MODEL_CONFIGS)}"
    names = [m.strip() for m in value.split(",") if m.strip()]
    if "all" in names:
        return list(MODEL_CONFIGS)
    if not names:
        raise ValueError(f"--conf models names no model; valid: {valid}")
    listed_names("models", value, ("segmentation", *MODEL_CONFIGS), valid)
    return list(dict.fromkeys(m for n in names for m in (SAM_MODELS if n == "segmentation" else (n,))))


class SamFewShotApp(AppFixes, MONAILabelApp):
    """Scores are refreshed at start-up and after each training run (``AppFixes``: not after every next_sample)."""

    def __init__(self, app_dir, studies, conf):
        conf = parse_conf(conf)  # unknown keys and bad values stop here, naming the nearest valid one
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self.models = {}
        for name in selected_models(conf["models"]):
            self.models[name] = MODEL_CONFIGS[name]()
            self.models[name].init(name, self.model_dir, conf, None)
        self.auto_train = conf["auto_train"]
        self.label_check = conf["label_check"]
        # One label check at a time, off the request that saved the label (each segments a volume).
        self._label_checks = ThreadPoolExecutor(1, thread_name_prefix="label-check")
        self.auto_scoring = conf["auto_scoring"]
        self.handouts = Handouts(timeout_s=conf["handout_timeout"])
        self.endpoint_groups = routes.parse_endpoint_groups(conf["endpoints"])
        # The DICOM SEG writer (unnamed segments take the models' names), token check, sessions and inference
        # queue, then the route policy, before MONAI Label builds the datastore.
        names = {n: i for config in self.models.values() for n, i in config.model.labels.items()}
        monailabel_compat.install(self.model_dir, self.endpoint_groups, names)
        server = monailabel_compat.fastapi_app()
        if server is not None:
            routes.install(server, self.endpoint_groups)
        self._final_label_ts: dict[str, int] = {}
        self.interactions = InteractionLog(os.path.join(self.model_dir, "interactions"))
        self._train_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="samfewshot",
            description="Few-shot Segment Anything adaptations (HF-SAM, MASG-SAM, FGNet) with incremental fine-tuning",
            version=monailabel.__version__,
        )

    def info(self):
        """MONAI Label's, plus ``label_checks``: the final labels the label-quality check flagged (``lib.label_check``)."""
        info = super().info()
        datastore = self.datastore()
        if isinstance(datastore, CheckedDatastore):
            info["label_checks"] = flagged_labels(datastore)
        return info

    def init_datastore(self) -> Datastore:
        """A local datastore checks every upload (lib/datastore.py); labels without label_info may hold the
        segmentation models' ids, or any id when an instance model (FGNet) is served. A PACS gets timeouts."""
        if self.studies.startswith(("http://", "https://")):
            return monailabel_compat.with_pacs_timeouts(super().init_datastore())
        instances = any(not config.model.labels for config in self.models.values())
        known_ids = None if instances else {i for config in self.models.values() for i in config.model.labels.values()}
        return CheckedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            known_ids=known_ids,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """Each model's tasks: its segmentation task under its name, and for the SAM models an interactive one."""
        infers: dict[str, InferTask] = {}
        for name, config in self.models.items():
            tasks = config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: config.trainer() for name, config in self.models.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        kwargs = {"handouts": self.handouts, "default_model": next(iter(self.models))}
        return {
            "random": RandomChoice(**kwargs),
            "first": First(**kwargs),
            "uncertainty": Uncertainty(**kwargs),
            "diversity": Diversity(**kwargs),
            "typicality": Typicality(**kwargs),
            "clasp_pe": ClaspPE(**kwargs),
            "hybrid": Hybrid(**kwargs),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        models = {name: config.model for name, config in self.models.items() if config.scores_volumes}
        if not models:
            return {}
        device = next(iter(self.models.values())).device
        return {"uncertainty": UncertaintyScoring(models, device), "embedding": EmbeddingScoring(models, device)}

    def infer(self, request, datastore=None):
        """MONAI Label's infer; a requested per-voxel uncertainty map is stored as the image's 'uncertainty' label,
        and the prompts of an interactive request on a datastore volume are remembered for its next final label."""
        with http_errors():
            check_choice(request.get("model"), monailabel_compat.infers(self), "model")
        result = super().infer(request, datastore)
        uncertainty = (result.get("params") or {}).get("uncertainty")
        image_id = request.get("image")
        datastore = datastore or self.datastore()
        if monailabel_compat.infers(self)[request["model"]].type == InferType.DEEPGROW and image_id in datastore.list_images():
            self.interactions.record(image_id, request)
        if uncertainty and uncertainty.get("file"):
            path = uncertainty.pop("file")
            try:
                if image_id in datastore.list_images():
                    info = {"model": request.get("model"), "adapter_version": result["params"].get("adapter_version")}
                    uncertainty["label"] = datastore.save_label(image_id, path, "uncertainty", info)
                    uncertainty["tag"] = "uncertainty"
            except BaseException:
                if result.get("file") and os.path.exists(result["file"]):
                    os.remove(result["file"])  # the request fails: nobody will send or remove the label
                raise
            finally:
                os.remove(path)  # the datastore keeps its own copy; an image from outside it gets the summary only
        return result

    def next_sample(self, request):
        with http_errors():
            check_choice(request.get("strategy") or "random", monailabel_compat.strategies(self), "strategy")
        return super().next_sample(request)

    def on_init_complete(self):
        super().on_init_complete()
        self._final_label_ts = self._final_label_stamps()
        if self.auto_scoring:
            self.async_scoring(None)

    def train(self, request):
        result = super().train(request)
        if self.auto_scoring:
            self.async_scoring(None)
        return result

    def async_scoring(self, method, params=None):
        """In the server, MONAI Label's queued scoring subprocess; elsewhere (a training subprocess, scripts) the
        scoring runs right here instead of being posted to a server on a guessed port."""
        if monailabel_compat.server_mode(self):
            return super().async_scoring(method, params)
        methods = [method] if method else list(monailabel_compat.scoring_methods(self))
        return {m: self.scoring({"method": m, **((params or {}).get(m) or {})}) for m in methods}

    def _final_label_stamps(self) -> dict[str, int]:
        datastore = self.datastore()
        final = DefaultLabelTag.FINAL
        stamps = {}
        for image_id in datastore.get_labeled_images(final):
            label_id = datastore.get_labels_by_image_id(image_id)[final]
            info = datastore.get_label_info(label_id, final) or {}
            stamps[image_id] = int(info.get(SAVED_KEY) or info.get("ts", 0))
        return stamps

    def on_save_label(self, image_id, label_id):
        """A newly saved final label takes the prompts annotators placed on its volume (``lib.annotator_prompts``), is
        checked against the prediction of every model that serves an adapter (``lib.label_check``, in the
        background: the save answers at once), and with ``--conf auto_train true`` then starts fine-tuning every
        model.

        Training runs one at a time (MONAI Label's single-worker queue); a model with a run already waiting
        gets no second one, since that waiting run will read the datastore, new label included, when it starts.
        """
        result = super().on_save_label(image_id, label_id) or {}
        datastore = self.datastore()
        if isinstance(datastore, DICOMWebDatastore):
            monailabel_compat.clear_dicomweb_lists()
        with self._train_lock:
            stamps = self._final_label_stamps()
            if stamps.get(image_id) == self._final_label_ts.get(image_id):
                return result  # not a final label (e.g. an 'original' prediction was stored)
            self._final_label_ts = stamps
            interactions = self.interactions.take(image_id)
            if interactions:
                datastore.update_label_info(label_id, DefaultLabelTag.FINAL, {INTERACTIONS_KEY: interactions})
        checked = [n for n, c in self.models.items() if c.model.labels and c.model.served_version()] if self.label_check else []
        if checked and isinstance(datastore, CheckedDatastore):
            self._label_checks.submit(self._check_label, datastore, image_id, label_id, checked)
            result["label_check"] = checked
        elif self.auto_train:
            result["auto_train"] = self._queue_training(image_id)
        return result

    def _check_label(self, datastore: CheckedDatastore, image_id: str, label_id: str, models: list[str]) -> None:
        """The label-quality check of a saved final label for ``models`` (``lib.label_check``), recorded in its
        info; then training, with ``auto_train``, so that the run knows which labels to hold out."""
        records = {}
        label = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
        saved = datastore.get_label_info(label_id, DefaultLabelTag.FINAL) or {}
        label_info = saved.get("label_info")
        for name in models:
            try:
                segment = partial(self._segmentation_file, name, image_id)
                record = check_saved_label(self.models[name].model, segment, label, label_info)
            except Exception as e:  # a check that cannot run holds nothing out, and says why
                logger.exception(f"{name}: the label check of {image_id} failed")
                record = {"flagged": False, "error": one_line(e)}
            if record:
                records[name] = record
        now = datastore.get_labels_by_image_id(image_id).get(DefaultLabelTag.FINAL)
        still = now == label_id and (datastore.get_label_info(label_id, DefaultLabelTag.FINAL) or {}).get(SAVED_KEY) == saved.get(SAVED_KEY)
        if records and still:  # a label removed or saved again meanwhile gets no record of the one checked
            datastore.record_label_check(label_id, records)
        if self.auto_train:
            self._queue_training(image_id)

    def wait_label_checks(self, timeout: float | None = None) -> None:
        """Return once every label check submitted so far has finished (scripts that train right after a save)."""
        self._label_checks.submit(lambda: None).result(timeout)

    def _segmentation_file(self, model: str, image_id: str) -> str:
        return self.infer({"model": model, "image": image_id})["file"]

    def _queue_training(self, image_id: str) -> list[str]:
        """Queue a run for every model without one waiting; the models queued."""
        with self._train_lock:
            waiting = {t["request"].get("model") for t in tasks("train") if t["status"] == "SUBMITTED"}
            started = []
            for model in monailabel_compat.trainers(self):
                if model not in waiting:
                    AsyncTask.run("train", request={"model": model}, enqueue=True)
                    started.append(model)
        logger.info(f"auto_train: final label for {image_id}; training queued for {started}")
        return started
