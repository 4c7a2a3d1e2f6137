"""The label-quality check: a saved final label against the served model's own prediction for its volume.

An annotator's mistake (white and grey matter swapped, a label saved on the wrong volume, an empty label where the
structure is plain) passes the datastore's checks, and the sentinel guard notices it only after training on it. So
when a final label is saved and a model serves an adapter, the model segments the volume and the two are compared,
class by class (Dice, over the classes the label names: those it annotates). The served adapter's own score on its
sentinel volumes says how well the model and an annotator usually agree: a label that agrees less than
``AGREEMENT_FRACTION`` of that is flagged (``label_check`` in the label's info, per model), and so is a label two of
whose classes each match the other's prediction better than their own (``confused``: swapped classes, which a model
agreeing little with any label would not show in the mean). A flagged label is held out of that model's training
until an annotator confirms it: saving it again with ``label_confirmed: true``.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from monai.transforms import LoadImage
from monailabel.interfaces.datastore import Datastore

from lib.adapters import read_adapter_record
from lib.evaluation import dice
from lib.served_model import ServedModel
from lib.transforms.labels import client_to_model_ids, slicer_label_info

logger = logging.getLogger(__name__)

# In a final label's info: the server's records ({model: record}), and whether an annotator stands by the label.
CHECK_KEY, CONFIRM_KEY = "label_check", "label_confirmed"

# A label agreeing with the served model less than this share of the adapter's sentinel score is flagged. On the
# tiny forgetting curve correct labels agreed about as well as the sentinel scored (docs/benchmarks.md).
AGREEMENT_FRACTION = 0.5
# Two classes of a label are taken for swapped where each matches the other's prediction by this much more Dice.
CONFUSION_MARGIN = 0.05


def agreement(
    label_path: str, label_info: list | None, prediction_path: str, labels: Mapping[str, int]
) -> tuple[dict[str, float], dict[str, str]]:
    """Dice per class name between a saved label (its client ids mapped to ``labels`` by name) and a prediction in
    the model's ids, both on the volume's grid, over the classes the label names (all without names) that either
    holds; and the swapped ones: {label class: the predicted class it matches better, by ``CONFUSION_MARGIN``, where
    that class's label matches this class's prediction better too}."""
    load = LoadImage(image_only=True)
    label, prediction = load(label_path), np.asarray(load(prediction_path)).squeeze()
    label_info = label_info or slicer_label_info(getattr(label, "meta", {}))
    label = np.asarray(label).squeeze()
    mapping = client_to_model_ids(label_info, labels)
    named = {i for i in mapping.values() if i}
    model_ids = np.zeros_like(label, dtype=np.int64)
    for client_id, model_id in mapping.items():
        model_ids[label == client_id] = model_id
    overlap = {(i, j): dice(prediction == j, model_ids == i) for i in named for j in labels.values()}  # label i, predicted j
    per_class = {name: overlap[i, i] for name, i in labels.items() if i in named and ((prediction == i).any() or (model_ids == i).any())}
    # Swapped: each of two classes matches the other's prediction better than its own. A model that does not predict a
    # class at all (a weak one) shows no swap, rather than a mistake in every label.
    names = {i: name for name, i in labels.items()}
    confused = {
        names[i]: names[j]
        for i in named
        for j in named
        if i != j and overlap[i, j] > overlap[i, i] + CONFUSION_MARGIN and overlap[j, i] > overlap[j, j] + CONFUSION_MARGIN
    }
    return per_class, confused


def check_saved_label(model: ServedModel, segment: Callable[[], str], label_path: str, label_info: list | None) -> dict[str, Any] | None:
    """The check of one saved label for ``model``: {"adapter_version", "agreement", "per_class", "reference",
    "confused", "flagged"}; None while the model serves no adapter (its base weights' class heads are untrained). ``segment``
    segments the label's volume with the served adapter and returns the result file, which is removed here."""
    version = model.served_version()
    if not version:
        return None
    info = read_adapter_record(model.adapter_path).get("info") or {}
    # The sentinel's score when the run had sentinel volumes; else agreement is held against perfect agreement.
    reference = float(info["metric"]) if info.get("val_volumes") and info.get("metric") is not None else 1.0
    prediction = segment()
    try:
        per_class, confused = agreement(label_path, label_info, prediction, model.labels)
    finally:
        os.remove(prediction)
    mean = statistics.fmean(per_class.values()) if per_class else 1.0
    record = {
        "adapter_version": version,
        "agreement": round(mean, 4),
        "per_class": {name: round(value, 4) for name, value in per_class.items()},
        "reference": round(reference, 4),
        "confused": confused,
        "flagged": mean < AGREEMENT_FRACTION * reference or bool(confused),
    }
    if record["flagged"]:
        logger.warning(
            f"{model.name}: the saved label agrees {mean:.3f} with adapter {version} ({per_class}, sentinel score "
            f"{reference:.3f}, classes matching another better: {confused}): held out of training until confirmed ({CONFIRM_KEY})"
        )
    return record


def held_out_reason(info: Mapping[str, Any], model: str) -> str | None:
    """Why ``model``'s training leaves out a final label with this info, or None to train on it."""
    record = (info.get(CHECK_KEY) or {}).get(model)
    if not record or not record.get("flagged") or info.get(CONFIRM_KEY) is True:
        return None
    if record.get("confused"):
        found = "its " + ", ".join(f"{c!r} matches the prediction's {o!r} better" for c, o in record["confused"].items())
    else:
        found = f"under {AGREEMENT_FRACTION} of the adapter's sentinel score {record['reference']}"
    return (
        f"it agrees {record['agreement']} with what adapter {record['adapter_version']} predicts on its volume "
        f"(per class {record['per_class']}), {found}: a swapped or misplaced label? Save it again with {CONFIRM_KEY}: "
        "true if it is right"
    )


def flagged_labels(datastore: Datastore) -> list[dict[str, Any]]:
    """The final labels the check flagged (``/info/``'s ``label_checks``): image, model, agreement, reference, the
    confused classes and whether an annotator confirmed the label (then it trains)."""
    flagged = []
    for image_id in sorted(datastore.get_labeled_images("final")):
        info = datastore.get_label_info(datastore.get_labels_by_image_id(image_id)["final"], "final") or {}
        for model, record in sorted((info.get(CHECK_KEY) or {}).items()):
            if record.get("flagged"):
                flagged.append(
                    {
                        "image": image_id,
                        "model": model,
                        "agreement": record["agreement"],
                        "reference": record["reference"],
                        "confused": record.get("confused", {}),
                        "confirmed": info.get(CONFIRM_KEY) is True,
                    }
                )
    return flagged
