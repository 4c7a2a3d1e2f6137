"""Learning checks: a short incremental run on the two labelled sample volumes learns white and grey matter
(hf_sam, masg_sam) or neuron instances (fgnet).

Held-out volumes (never in the datastore's final labels) are segmented through the app's own infer path and
compared with their ground truth. The tiny model is a randomly initialised ViT with LoRA, so the bar is
"clearly above chance": a random labelling with the true class frequencies scores a Dice about equal to the
class fraction (white matter ~0.09, grey matter ~0.15); the tiny model reaches ~0.55 / ~0.76 after 60 epochs
(docs/benchmarks.md). The threshold 0.45 on the mean leaves a wide margin for seed and thread-count noise.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.configs import SAM_MODELS

HELD_OUT = ("brain_005", "brain_006")
MEAN_DICE_THRESHOLD = 0.45

pytestmark = pytest.mark.slow


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def held_out_loss(app, model_name: str, image_id: str, truth_dir) -> float:
    """Segmentation loss (0.1 CE + 0.9 Dice) of the served network on the held-out volume's labelled slices."""
    from monai.transforms import Compose

    from lib.transforms import volume_transforms

    model = app.models[model_name].model
    network, _ = model.resident("cpu")
    data = Compose(volume_transforms(model.img_size, model.modality, model.labels))(
        {"image": str(app.datastore().get_image_uri(image_id)), "label": str(truth_dir / f"{image_id}.nii.gz")}
    )
    image, label = data["image"].permute(3, 0, 1, 2), data["label"].permute(3, 0, 1, 2)  # slices as batch
    keep = label.flatten(1).amax(1) > 0
    with torch.no_grad():
        logits = network(image[keep].as_tensor())
    return float(network.segmentation_loss(logits, label[keep].as_tensor()))


@pytest.mark.parametrize("model", SAM_MODELS)
def test_short_run_learns_white_and_grey_matter(model, app_dir, studies, sample_data):
    from main import SamFewShotApp

    truth = sample_data / "brain-mri-groundtruth"
    app = SamFewShotApp(str(app_dir), str(studies), {"models": model, "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    assert sorted(app.datastore().get_labeled_images()) == ["brain_000", "brain_001"]
    loss_before = np.mean([held_out_loss(app, model, i, truth) for i in HELD_OUT])

    stats = app.train({"model": model, "max_epochs": 60, "lr": 2e-3, "device": "cpu"})
    assert stats["epoch"] == 60

    loss_after = np.mean([held_out_loss(app, model, i, truth) for i in HELD_OUT])
    scores = []
    for image_id in HELD_OUT:
        result = app.infer({"model": model, "image": image_id, "device": "cpu"})
        assert result["params"]["adapter_version"] == 1
        pred = np.asarray(nib.load(result["label"]).dataobj)
        gt = np.asarray(nib.load(truth / f"{image_id}.nii.gz").dataobj)
        scores.append([dice(pred, gt, 1), dice(pred, gt, 2)])
    scores = np.array(scores)
    print(f"{model}: held-out loss {loss_before:.3f} -> {loss_after:.3f}; Dice (WM, GM) per volume {scores.round(3).tolist()}")
    assert loss_after < loss_before
    assert scores.mean() > MEAN_DICE_THRESHOLD
    assert scores.min() > 0.2  # neither class is ignored


EM_HELD_OUT = ("em_002", "em_003", "em_004", "em_005")
# Untrained, the tiny FGNet scores an adapted Rand error of ~0.91 on the held-out EM volumes; 40 epochs bring it
# to ~0.36 (docs/benchmarks.md). 0.6 is well above that and far below chance.
ARAND_THRESHOLD = 0.6


def test_short_run_learns_neuron_instances(app_dir, em_studies, sample_data):
    from lib.evaluation import instance_scores
    from main import SamFewShotApp

    truth = sample_data / "em-neurons-groundtruth"
    app = SamFewShotApp(str(app_dir), str(em_studies), {"models": "fgnet", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    assert sorted(app.datastore().get_labeled_images()) == ["em_000", "em_001"]

    def held_out_arand() -> list[float]:
        scores = []
        for image_id in EM_HELD_OUT:
            result = app.infer({"model": "fgnet", "image": image_id, "device": "cpu"})
            pred = np.asarray(nib.load(result["label"]).dataobj)
            scores.append(instance_scores(pred, np.asarray(nib.load(truth / f"{image_id}.nii.gz").dataobj))["arand"])
        return scores

    before = held_out_arand()
    stats = app.train({"model": "fgnet", "max_epochs": 40, "device": "cpu"})
    assert stats["epoch"] == 40
    after = held_out_arand()
    print(f"fgnet: held-out adapted Rand error {np.round(before, 3).tolist()} -> {np.round(after, 3).tolist()}")
    assert np.mean(after) < ARAND_THRESHOLD < np.mean(before)
    assert all(a < b for a, b in zip(after, before))
