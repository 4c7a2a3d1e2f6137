"""Incremental fine-tuning of a served model's adapter on saved ``final`` labels: the LoRA weights and the modules that
train in full; shared by every model (FGNet's subclass adds its EM data and metrics, at LoRA rank 0 by default).

Training samples foreground-weighted axial slices; validation segments whole held-out volumes slice by slice.
The validation volumes are the **sentinel set**: the train/val split is persisted (``<model>_split.json``), so a
volume never moves between training and sentinel, across runs and restarts, and every earlier training volume stays
in training (replay). Each run resumes from the published adapter. The sentinel is scored once before the first
epoch (the served adapter) and after each epoch; at the end the run's best adapter is published atomically, as a
new numbered version, only if its sentinel score is at least the served adapter's minus ``SENTINEL_TOLERANCE`` (the
first adapter is served in any case: the base weights' segmentation head is untrained).
Otherwise it is kept under ``candidates/`` and the train stats (``publication``, also in ``/info/``) and the log
say why. Without a sentinel volume the last epoch is published, and the stats say that nothing was checked. No
full-model checkpoints are written: the frozen backbone never leaves the base weights.

Scale-out runs through MONAI Label's ``multi_gpu`` request: one process per GPU (``gpus`` "all" or "0,1,..."),
torch DDP, NCCL; with ``device`` cpu the same path runs ``len(gpus)`` processes over gloo. Each process trains on
its share of the volumes with ``train_batch_size`` per process, so the effective batch is processes x
``train_batch_size``; ``lr`` is used as given (not scaled with the process count) and the schedule counts the
steps of one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
from functools import partial
from typing import Any

import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.inferers import SimpleInferer, SliceInferer
from monai.transforms import Activationsd, AsDiscreted, EnsureTyped, Lambdad
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.utils.others.generic import strtobool

from lib.adapters import AdapterError, keep_candidate, publish_adapter, published_version
from lib.annotator_prompts import INTERACTIONS_KEY, check_interactions
from lib.checks.volumes import check_label, stored_image_grid
from lib.compute import autocast
from lib.errors import InvalidInput
from lib.files import atomic_write
from lib.label_check import held_out_reason
from lib.monailabel_compat import HookedEngines, LastCompleteStats
from lib.networks.lora import adapter_state_dict
from lib.served_model import ServedModel
from lib.trainers.recipes import RECIPES, Recipe
from lib.trainers.simulated_prompts import SimulatedInteraction, prepare_prompted_batch
from lib.transforms import training_slice_transforms, volume_transforms

logger = logging.getLogger(__name__)

# A run's adapter is served if its sentinel score is at least the served one's minus this: a candidate that also
# learned the newest corrections is worth a loss inside the noise of a few sentinel volumes, not more.
SENTINEL_TOLERANCE = 0.005


def warmup_poly(total_steps: int, warmup_steps: int, power: float = 0.9):
    """LR factor: linear warm-up over ``warmup_steps``, then polynomial decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return factor


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (its parameter names have no 'module.' prefix)."""
    return getattr(network, "module", network)


def autocast_iteration(engine, batchdata: dict[str, Any], step=None, precision: str = "bf16"):
    """One training iteration (``step``, else the trainer's own) under ``precision``'s autocast on its device."""
    with autocast(precision, str(engine.state.device)):
        return (step or engine._iteration)(engine, batchdata)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AdapterTrainer(HookedEngines, LastCompleteStats, BasicTrainTask):
    """Fine-tunes the adapter (LoRA weights and the other trainable modules) of a ``ServedModel``.

    Args:
        model: the served model; runs resume from its published adapter, and its adapter file's folder holds the
            train/val split, the training stats and the adapters published.
        description: the task's description in MONAI Label; default "Incremental LoRA fine-tuning of <name>".
        recipe: optimiser, schedule and loss (``lib.trainers.recipes``); a train request's ``lr`` overrides its rate.
        slices_per_volume: random axial slices drawn from each training volume per epoch.
        foreground_ratio: share of those slices centred on labelled voxels; the rest are centred on background.
        min_train_volumes: a new volume goes to validation only once at least this many volumes train.
        interactive_share: share of training slices that get simulated interactions (``lib.trainers.simulated_prompts``);
            0 trains prompt-free; a train request's ``interactive_share`` overrides it.
        precision: ``fp32``, or ``bf16`` to run each training iteration (simulated interactions, forward and backward)
            under bf16 autocast, already resolved from ``auto``; weights, gradients, optimiser state and the loss stay
            fp32. On a CPU with native bf16 a LiteMedSAM step ran 2.6x faster (docs/benchmarks.md).
        config: MONAI Label train settings over the defaults (``max_epochs`` 50, ``val_split`` 0.2, batch sizes 1, ...).
    """

    def __init__(
        self,
        model: ServedModel,
        description: str = "",
        recipe: Recipe = RECIPES["fewshot"],
        slices_per_volume: int = 8,
        foreground_ratio: float = 0.75,
        min_train_volumes: int = 2,
        interactive_share: float = 0.0,
        precision: str = "fp32",
        config: dict[str, Any] | None = None,
    ):
        self.model = model
        self.recipe = recipe
        self.precision = precision
        self.unusable: list[dict[str, str]] = []  # what of the stored data the run could not use, with the reason
        # The simulated prompts reach the network; the paper recipe's loss reads the decoder's own logits.
        self.prepare_batch = partial(prepare_prompted_batch, decoder_resolution=recipe.decoder_resolution)
        self.slices_per_volume = slices_per_volume
        self.foreground_ratio = foreground_ratio
        self.min_train_volumes = min_train_volumes
        defaults = {
            "max_epochs": 50,
            "lr": recipe.lr,
            "val_split": 0.2,
            "train_batch_size": 1,
            "val_batch_size": 1,
            "dataset": "CacheDataset",
            "dataloader": "DataLoader",
            "multi_gpu": False,
            "tracking": "None",
            "interactive_share": interactive_share,
        }
        defaults.update(config or {})
        model_dir = os.path.dirname(os.path.abspath(model.adapter_path))
        super().__init__(
            model_dir=model_dir,
            description=description or f"Incremental LoRA fine-tuning of {model.name}",
            config=defaults,
            amp=False,
            stats_path=os.path.join(model_dir, f"{model.name}_train_stats.json"),
            labels=model.labels,
            disable_meta_tracking=True,
            tracking=None,
            # The prompt encoder's point and box embeddings get no gradient from a batch without prompts.
            find_unused_parameters=True,
        )

    def __call__(self, request, datastore: Datastore):
        """MONAI Label's run; a ``multi_gpu`` request gets a process-group backend for its device (NCCL on CUDA,
        gloo on CPU) and a rendezvous on a free loopback port unless it names its own.

        MONAI's meta tracking is process-wide: only a training process of its own (the run in its main thread)
        turns it off for speed. A run inside the server (``run_sync``, in a worker thread) keeps it, or the
        server's other requests would load volumes without their geometry meanwhile."""
        self._disable_meta_tracking = threading.current_thread() is threading.main_thread()
        request = dict(request)
        multi = request.get("multi_gpu", self.config()["multi_gpu"])
        request["multi_gpu"] = multi if isinstance(multi, bool) else strtobool(str(multi))
        if request["multi_gpu"]:
            cuda = str(request.get("device", self.config()["device"])).startswith("cuda")
            request.setdefault("distributed_backend", "nccl" if cuda else "gloo")
            request.setdefault("distributed_url", f"tcp://127.0.0.1:{free_loopback_port()}")
        return super().__call__(request, datastore)

    def _device(self, context: Context):
        if context.multi_gpu and not str(context.request["device"]).startswith("cuda"):
            return torch.device("cpu")
        return super()._device(context)

    def _create_network_and_optimizer(self, context: Context):
        """MONAI Label's, except that DDP gets device ids only on CUDA (a CPU module must be wrapped without any)."""
        network = self.network(context).to(context.device)
        context.network = network
        optimizer = self.optimizer(context)
        if context.multi_gpu:
            ids = [context.device.index] if context.device.type == "cuda" else None
            network = torch.nn.parallel.DistributedDataParallel(
                network, device_ids=ids, output_device=ids and ids[0], find_unused_parameters=self._find_unused_parameters
            )
        return network, optimizer

    def process_share(self, context: Context, count: int) -> int:
        """How many of ``count`` volumes one process trains on (MONAI Label splits only when each gets one)."""
        if context.multi_gpu and count // context.world_size:
            return math.ceil(count / context.world_size)
        return count

    # ---- data -------------------------------------------------------------------------------------------
    def pre_process(self, request, datastore: Datastore):
        """The datastore's final labels, each with the ``label_info`` its client saved (for id remapping).

        Stored data a run cannot use (planted past the datastore's checks, or stored before them) never fails the
        run: a volume whose image or label is unreadable, off its image's grid or holds ids nobody named is left
        out, prompts stored malformed are dropped, each named with its reason in ``self.unusable``. So is a label
        the label-quality check flagged and nobody confirmed (``lib.label_check``).
        A DICOMweb datastore first fetches the SEG labels in the PACS (saved through this server or elsewhere)
        into its local cache; its own ``get_label_uri`` takes a SEG series id, the cache is keyed by image id.
        """
        final = DefaultLabelTag.FINAL
        self.unusable = []
        if isinstance(datastore, DICOMWebDatastore):
            datastore.datalist()
            label_uri = partial(LocalDatastore.get_label_uri, datastore, label_tag=final)
        else:
            label_uri = partial(datastore.get_label_uri, label_tag=final)
        known_ids = getattr(datastore, "known_ids", None)  # what the datastore lets a label hold without names
        datalist = []
        for image_id in sorted(datastore.get_labeled_images(final)):
            label_id = datastore.get_labels_by_image_id(image_id)[final]
            item = {"id": image_id, "image": datastore.get_image_uri(image_id), "label": label_uri(label_id)}
            info = datastore.get_label_info(label_id, final) or {}
            try:
                image = stored_image_grid(item["image"])
            except InvalidInput as e:
                self.leave_out(image_id, "image", e)
                continue
            try:
                check_label(item["label"], image, known_ids, info.get("label_info"), name=f"{image_id} ({final})")
            except InvalidInput as e:
                self.leave_out(image_id, "label", e)
                continue
            held_out = held_out_reason(info, self.model.name)
            if held_out:
                self.leave_out(image_id, "label", held_out)
                continue
            if info.get("label_info"):
                item["label_info"] = info["label_info"]
            if float(request.get("interactive_share", self.config()["interactive_share"])) and info.get(INTERACTIONS_KEY):
                try:  # replayed by training (lib.annotator_prompts); stored before the datastore checked them, perhaps
                    item["interactions"] = check_interactions(info[INTERACTIONS_KEY])
                except ValueError as e:
                    self.leave_out(image_id, INTERACTIONS_KEY, e)
            datalist.append(item)
        return datalist

    def leave_out(self, image_id: str, what: str, error: Exception | str) -> None:
        """A stored ``what`` (image, label, interactions) of ``image_id`` the run does not use, and why."""
        outcome = "the volume is left out of this run" if what in ("image", "label") else "the run goes on without them"
        logger.warning(f"{self.model.name}: the stored {what} of {image_id} cannot be used, {outcome}: {error}")
        self.unusable.append({"id": image_id, "what": what, "reason": str(error)})

    def split_path(self, context: Context) -> str:
        return os.path.join(self._model_dir, f"{self.model.name}_split.json")

    def partition_datalist(self, context: Context, shuffle=False):
        """Persisted split. Known volumes keep their side; a new volume goes to validation only while the
        validation share is below ``val_split`` and enough volumes remain to train on."""
        path = self.split_path(context)
        split = {"train": [], "val": []}
        if os.path.exists(path):
            with open(path) as f:
                split = json.load(f)
        val_split = float(context.request["val_split"])
        items = {d["id"]: d for d in context.datalist}
        for image_id in sorted(items):
            if image_id in split["train"] or image_id in split["val"]:
                continue
            total = len(split["train"]) + len(split["val"]) + 1
            wants_val = len(split["val"]) + 1 <= math.floor(val_split * total)
            side = "val" if wants_val and len(split["train"]) >= self.min_train_volumes else "train"
            split[side].append(image_id)
        if context.local_rank == 0:
            with atomic_write(path) as f:
                json.dump(split, f, indent=2)
        train = [items[i] for i in split["train"] if i in items]
        val = [items[i] for i in split["val"] if i in items]
        logger.info(f"{self.model.name}: {len(train)} training / {len(val)} validation volumes (split {path})")
        return train, val

    def train_pre_transforms(self, context: Context):
        return training_slice_transforms(
            self.model.img_size,
            self.model.modality,
            self.model.labels,
            self.slices_per_volume,
            self.foreground_ratio,
            self.model.intensity,
        )

    def val_pre_transforms(self, context: Context):
        return volume_transforms(self.model.img_size, self.model.modality, self.model.labels, self.model.intensity) + [
            EnsureTyped(keys=["image", "label"])
        ]

    def train_post_transforms(self, context: Context):
        classes = self.model.num_classes
        return [
            # Metrics read the class head: with simulated prompts the last channels are the prompted object's; a
            # partly annotated label's marked background (mark_unannotated) counts as background.
            Lambdad(keys="pred", func=lambda p: p[:classes]),
            Lambdad(keys="label", func=lambda label: label[:1].clamp(min=0)),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=self.model.num_classes),
        ]

    # ---- optimisation -----------------------------------------------------------------------------------
    def network(self, context: Context):
        network = self.model.build_network()
        try:
            payload = self.model.load_adapter(network)
            if payload:
                logger.info(f"{self.model.name}: resuming from adapter version {payload['version']}")
        except AdapterError as e:
            logger.warning(f"{self.model.name}: not resuming, starting a new adapter: {e}")
        loss = self.recipe.segmentation_loss()
        if loss is not None:
            network.segmentation_loss = loss
        return network

    def optimizer(self, context: Context):
        params = [p for p in context.network.parameters() if p.requires_grad]
        return self.recipe.make_optimizer(params, float(context.request["lr"]))

    def loss_function(self, context: Context):
        # The network owns its loss: 0.1*CE + 0.9*Dice, plus whatever auxiliary terms the model has.
        return unwrap(context.network).training_loss

    def lr_scheduler_handler(self, context: Context):
        steps_per_epoch = math.ceil(self.process_share(context, len(context.train_datalist)) / context.train_batch_size)
        total = max(1, steps_per_epoch * context.max_epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(context.optimizer, warmup_poly(total, int(self.recipe.warmup_fraction * total)))
        return LrScheduleHandler(schedule, print_lr=False, epoch_level=False)

    def train_handlers(self, context: Context):
        """MONAI Label's, with the sentinel also scored before the first epoch: the served adapter's score, on the
        same volumes the run's epochs are scored on."""
        handlers = super().train_handlers(context)
        for handler in handlers:
            if isinstance(handler, ValidationHandler):
                handler.exec_at_start = True
        return handlers

    def train(self, rank, world_size, request, datalist):
        """MONAI Label's run, whose result also says whether its adapter was published (``publication``)."""
        stats = super().train(rank, world_size, request, datalist)
        publication = self.stats().get("publication") if rank == 0 else None
        if publication and publication["run_id"] == request["run_id"]:
            stats["publication"] = publication
        return stats

    def train_inferer(self, context: Context):
        return SimpleInferer()

    def train_iteration_update(self, context: Context):
        share = float(context.request.get("interactive_share", self.config()["interactive_share"]))
        # Seeded from torch's seed, so a seeded run (scripts/simulate_clicks.py) simulates the same interactions.
        step = SimulatedInteraction(share=share, seed=torch.initial_seed() % 2**32) if share > 0 else None
        if self.precision == "fp32":
            return step
        # MONAI's own ``amp`` autocasts CUDA only; this covers the CPU too.
        return partial(autocast_iteration, step=step, precision=self.precision)

    def val_inferer(self, context: Context):
        size = self.model.img_size
        return SliceInferer(roi_size=(size, size), sw_batch_size=8, spatial_dim=2, progress=False)

    def train_key_metric(self, context: Context):
        return {self.TRAIN_METRIC_MEAN_DICE: MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def val_key_metric(self, context: Context):
        return {self.VAL_METRIC_MEAN_DICE: MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def finalize(self, context: Context):
        """Keep the best adapter of this run in memory; publish it once, when the run completes."""
        super().finalize(context)  # train_stats for clients, early stopping
        if context.local_rank == 0:
            self._publish_best_on_completion(context)
        if context.multi_gpu:
            # MONAI Label destroys the process group right after the run; the ranks leave it together, after
            # rank 0 has published (a rank once ended in SIGABRT at this point while rank 0 had yet to publish).
            context.trainer.add_event_handler(Events.COMPLETED, lambda engine: torch.distributed.barrier())

    def _publish_best_on_completion(self, context: Context):
        watched = context.evaluator or context.trainer
        best = {"metric": -math.inf, "state": None, "epoch": 0}
        served = {"metric": None, "version": published_version(self.model.adapter_path)}

        def remember(engine):
            metric = engine.state.metrics.get(engine.state.key_metric_name, -math.inf)
            if context.trainer.state.epoch == 0:  # the sentinel scored before training: the served adapter
                served["metric"] = float(metric)
            # Without validation the last epoch wins: later epochs have seen more slices.
            elif context.evaluator is None or metric >= best["metric"]:
                best.update(metric=metric, state=adapter_state_dict(unwrap(context.network)), epoch=context.trainer.state.epoch)

        def publish(engine):
            if best["state"] is None:
                return
            metric_name = watched.state.key_metric_name
            info = {
                "run_id": context.run_id,
                "epoch": best["epoch"],
                "metric": float(best["metric"]),
                "metric_name": metric_name,
                "train_volumes": [d["id"] for d in context.train_datalist],
                "val_volumes": [d["id"] for d in context.val_datalist],
                "served_metric": served["metric"],
                "processes": context.world_size if context.multi_gpu else 1,
                "recipe": self.recipe.name,
            }
            decision = {**self.sentinel_decision(context, info, served), "unusable": list(self.unusable)}
            if decision["served"]:
                decision["version"] = publish_adapter(self.model.adapter_path, best["state"], self.model.adapter_config(), info)
                logger.info(f"{self.model.name}: published adapter version {decision['version']}: {decision['reason']}")
            else:
                decision["candidate"] = keep_candidate(
                    self.model.adapter_path, best["state"], self.model.adapter_config(), info, context.run_id
                )
                logger.warning(f"{self.model.name}: adapter of run {context.run_id} not served: {decision['reason']}")
            self.record_publication(decision)

        watched.add_event_handler(Events.EPOCH_COMPLETED, remember)
        context.trainer.add_event_handler(Events.COMPLETED, publish)

    def sentinel_decision(self, context: Context, info: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
        """Whether the run's best adapter may be served: {"served", "reason", the sentinel figures}."""
        name, candidate, reference = info["metric_name"], info["metric"], served["metric"]
        decision = {
            "served": True,
            "run_id": context.run_id,
            "sentinel_volumes": info["val_volumes"],
            "metric_name": name,
            "candidate_metric": candidate,
            "served_metric": reference,
            "served_version": served["version"],
            "tolerance": SENTINEL_TOLERANCE,
        }
        if context.evaluator is None:
            decision["reason"] = (
                "no sentinel volume yet, so nothing was checked: the run's last epoch is served. A new labelled volume "
                f"joins the sentinel while it holds under val_split of the volumes and {self.min_train_volumes} train"
            )
            return decision
        now = published_version(self.model.adapter_path)
        if now == 0 == served["version"]:
            # The base weights' segmentation head is untrained: their score (kept for the record) protects nothing.
            decision["reason"] = f"no adapter was served yet (the base weights score {reference:.4f}): the first one is served"
        elif now != served["version"]:
            reason = f"adapter version {now} was published during the run, which compared against version {served['version']}"
            decision.update(served=False, reason=reason)
        elif candidate >= reference - SENTINEL_TOLERANCE:
            decision["reason"] = f"sentinel {name} {candidate:.4f} >= served {reference:.4f} - {SENTINEL_TOLERANCE}"
        else:
            decision.update(served=False, reason=f"sentinel {name} {candidate:.4f} < served {reference:.4f} - {SENTINEL_TOLERANCE}")
        return decision

    def record_publication(self, decision: dict[str, Any]) -> None:
        """The decision into this run's train stats (``publication``), which ``/info/`` shows."""
        stats = self.stats()
        stats["publication"] = decision
        with atomic_write(self._stats_path) as f:
            json.dump(stats, f, indent=2)
