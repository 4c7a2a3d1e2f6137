r"""Score segmentations against ground truth: folders of predictions with the app's protocol, or a model run on a
public dataset with its paper's protocol (``paper``).

Prediction folders:

    .venv/bin/python scripts/evaluate.py --task segmentation --predictions preds/hf_sam \
        --groundtruth sample-datasets/brain-mri-groundtruth
    .venv/bin/python scripts/evaluate.py --task instances --predictions preds/fgnet \
        --groundtruth sample-datasets/em-neurons-groundtruth --output fgnet_scores.json

Every ground-truth volume (.nii.gz, .nii or .nrrd) needs a prediction of the same name (the extension may differ)
on the same grid; predictions without ground truth are left out. segmentation: Dice and HD95 in mm per class of
--labels (default: labels.json beside the ground truth). instances: VOI split/merge and adapted Rand error, with
ground-truth id 0 (unlabelled) ignored; see apps/samfewshot/lib/evaluation.py. Prints one row per volume and the
mean, and with --output writes JSON {"task", "per_volume", "mean"}. A class absent from both volumes scores nan
and is left out of the mean; one that is missed or hallucinated scores HD95 inf, which the mean keeps (JSON:
NaN / Infinity, as Python's json module writes and reads them).

Papers' protocols: the model is built as the server builds it (its TaskConfig, --conf as the server's, the adapter
published in --model-dir/<model>.pt, e.g. by scripts/adapters.py import), run on the dataset's test cases, and
scored as the papers' code scores:

    .venv/bin/python scripts/evaluate.py paper --dataset synapse --data data/Synapse --model hf_sam \
        --model-dir runs/hf_sam_synapse --conf backbone vit_b --output synapse.json
    .venv/bin/python scripts/evaluate.py paper --dataset acdc --data data/ACDC --model masg_sam \
        --model-dir runs/masg_sam_acdc --conf backbone vit_b
    .venv/bin/python scripts/evaluate.py paper --dataset cremi --data data/cremi/sample_A_20160501.hdf \
        --sections=-50: --model fgnet --model-dir runs/fgnet_cremi
    .venv/bin/python scripts/evaluate.py paper --dataset ac3 --data data/AC3AC4 --sections :100 \
        --model fgnet --model-dir runs/fgnet_ac4

Datasets (--data); --cases or --list (a file, one name a line) pick cases, by default the dataset's test list:
* synapse (8 abdominal organs, CT; the TransUNet / SAMed / H-SAM / HF-SAM preprocessed set): DATA/test_vol_h5/
  <case>.npy.h5 (or DATA holding them), h5 datasets ``image`` (D, 512, 512) intensities clipped to [-125, 275] and
  scaled to [0, 1], ``label`` (D, 512, 512) ids 0-8; cases from DATA/lists/lists_Synapse/test_vol.txt when
  present, else every volume. Class ids and names as HF-SAM's test.py: 1 spleen, 2 right kidney, 3 left kidney,
  4 gallbladder, 5 liver, 6 stomach, 7 aorta, 8 pancreas.
* acdc (RV, Myo, LV in cine MR; SSL4MIS's / WSL4MIS's h5 volumes, which SAM-UNet reads too; the official HF-SAM
  code has no ACDC loader): <case>.h5 (e.g. patient001_frame01.h5) with ``image`` (D, H, W) min-max scaled to
  [0, 1] and ``label`` (D, H, W) ids 1 RV, 2 Myo, 3 LV, in DATA/data/ (SSL4MIS), DATA/ACDC_training_volumes/
  (WSL4MIS) or DATA; cases from DATA/test.list (SSL4MIS's split) when present, else every volume.
* cremi: CREMI files (DATA a file, or a folder of .hdf/.h5) with ``volumes/raw`` (Z, Y, X),
  ``volumes/labels/neuron_ids`` and the ``resolution`` attribute (z, y, x nm); as in cremi_python, id 2^64 - 1 is
  background and ignored and every other id (0 too) is a neuron; --cremi-border NM also ignores the voxels within
  NM of a boundary in their section (cremi_python's border mask; off by default). Case: the file name.
* ac3 / ac4 (Kasthuri et al.; the SNEMI3D volumes): DATA/AC3_inputs.h5 and DATA/AC3_labels.h5 (AC4_* for ac4),
  each with the dataset ``main`` (Z, Y, X); label 0 is unlabelled and ignored, as in SNEMI3D.
  --sections START:STOP keeps those sections of an EM volume (a Python slice: -50: is the last 50).

Segmentation protocol (HF-SAM's test.py / utils.test_single_volume, ACDC too): each slice is zoomed to the model's
input size with scipy's order-3 spline, segmented (arg-max of the class logits), zoomed back with order 0; per case
and class, Dice and HD95 in voxels with medpy's definitions and the papers' conventions
(lib.evaluation.percase_dice_hd95: both non-empty: Dice, HD95; prediction but no ground truth: 1, 0; otherwise
0, 0); per class the mean over cases, and the mean over classes. Prints each case's and the mean per-class Dice (%)
with the mean Dice and HD95, and the per-class HD95. The network is the served one in fp32, run on batches of
slices directly: the protocol's resize replaces the app's inference transforms. --conf labels defaults to the
dataset's classes (the names above, ids 1..N, as scripts/adapters.py import names them); the adapter must agree
with the rest of --conf as the server's would (pass the lora_rank the import printed, and the modality a MASG-SAM
adapter was trained with: it words the class prompts).

Instance protocol: FGNet through the app's inference task (normalisation, Gaussian-weighted sliding window,
seeded watershed and agglomeration of lib/infers/affinity_instances.py; engine torch unless --conf engine says
otherwise), then VOI split, VOI merge (bits), the adapted Rand error as the CREMI reference code computes it, and
the CREMI score sqrt(VOI sum x ARAND) (lib.evaluation.cremi_scores); the mean row averages the cases.

--output writes JSON: dataset, model, backbone, adapter_version, per_case, mean (and per_class, classes, input_size
for the segmentation protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "samfewshot"))
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")

SUFFIXES = (".nii.gz", ".nii", ".nrrd")
# NIfTI xyzt_units, spatial part (code & 7): metre, millimetre, micrometre -> factor to mm.
NIFTI_UNIT_TO_MM = {1: 1000.0, 2: 1.0, 3: 0.001}


def volume_files(folder: Path) -> dict[str, Path]:
    """Label volumes in `folder`, keyed by name without extension."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        name = path.name[: -len(suffix)]
        if name in found:
            raise ValueError(f"{folder} holds two volumes named {name!r}: {found[name].name} and {path.name}")
        found[name] = path
    return found


def load_label(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(ids, affine, voxel size in mm). Read with MONAI as the app reads volumes; ids keep their stored integer type."""
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, dtype=None)(str(path))
    # EM volumes store micrometres (NIfTI has no nm unit); NRRD and unit-less NIfTI are taken as mm.
    factor = NIFTI_UNIT_TO_MM.get(int(img.meta.get("xyzt_units", 2)) & 7, 1.0)
    spacing = tuple(float(s) * factor for s in img.pixdim)
    return np.asarray(img), img.affine.numpy(), spacing


def read_labels(value: str | None, groundtruth: Path) -> dict[str, int]:
    """--labels as a JSON file or string; by default the labels.json the sample data writes beside its ground truth."""
    if value is None:
        default = groundtruth / "labels.json"
        if not default.is_file():
            raise ValueError(f"--task segmentation needs --labels: {default} does not exist")
        value = str(default)
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        labels = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--labels is neither a JSON file nor a JSON object: {e}") from None
    if not isinstance(labels, dict) or not all(isinstance(i, int) and i > 0 for i in labels.values()):
        raise ValueError(f'--labels must map class names to ids >= 1, like {{"liver": 1}} (got {labels!r})')
    return labels


def evaluate(task: str, predictions: Path, groundtruth: Path, labels: dict[str, int] | None = None) -> dict:
    """Scores of every ground-truth volume and their mean; raises ValueError on missing or mismatched volumes."""
    from lib.evaluation import instance_scores, segmentation_scores

    truths, preds = volume_files(groundtruth), volume_files(predictions)
    if not truths:
        raise ValueError(f"no {'/'.join(SUFFIXES)} volumes in {groundtruth}")
    missing = sorted(set(truths) - set(preds))
    if missing:
        raise ValueError(f"no prediction in {predictions} for {len(missing)} ground-truth volume(s): {', '.join(missing)}")

    per_volume = {}
    for name, truth_path in truths.items():
        gt, gt_affine, spacing = load_label(truth_path)
        pred, pred_affine, _ = load_label(preds[name])
        if pred.shape != gt.shape or not np.allclose(pred_affine, gt_affine, atol=1e-3 * min(spacing)):
            raise ValueError(
                f"{preds[name].name} and {truth_path.name} differ in geometry: shape {pred.shape} vs {gt.shape}, "
                f"affine\n{np.round(pred_affine, 6)}\nvs\n{np.round(gt_affine, 6)}"
            )
        if task == "instances":
            per_volume[name] = instance_scores(pred, gt)
        else:
            per_volume[name] = segmentation_scores(pred, gt, labels, spacing)
    return {"task": task, "per_volume": per_volume, "mean": mean_scores(list(per_volume.values()))}


def mean_scores(scores: list[dict]) -> dict:
    """Mean of each (possibly nested) score over volumes, nan entries left out; inf stays inf."""
    first = scores[0]
    if isinstance(first, dict):
        return {key: mean_scores([s[key] for s in scores]) for key in first}
    kept = [v for v in scores if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def columns(row: dict) -> dict[str, float]:
    """Flat column name -> value: metric for instances, metric[class] for segmentation (all Dice columns first)."""
    if not any(isinstance(v, dict) for v in row.values()):
        return row
    metrics = next(iter(row.values()))
    return {f"{metric}[{name}]": row[name][metric] for metric in metrics for name in row}


def table(result: dict) -> str:
    rows = [(name, columns(scores)) for name, scores in result["per_volume"].items()]
    rows.append(("mean", columns(result["mean"])))
    return format_rows("volume", rows)


def format_rows(first_head: str, rows: list[tuple[str, dict[str, float | None]]], digits: int = 4) -> str:
    """Fixed-width text table: a name column, then one column per key of the first row; None leaves a cell blank."""
    heads = list(rows[0][1])
    first = max(len(first_head), *(len(name) for name, _ in rows))
    widths = [max(len(h), 8) for h in heads]
    lines = ["  ".join([f"{first_head:<{first}}", *(f"{h:>{w}}" for h, w in zip(heads, widths))])]
    for name, values in rows:
        cells = ("" if values[h] is None else f"{values[h]:.{digits}f}" for h in heads)
        lines.append("  ".join([f"{name:<{first}}", *(f"{c:>{w}}" for c, w in zip(cells, widths))]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Papers' protocols


class DataError(ValueError):
    """The dataset folder or a file in it is not in the layout the protocol reads."""


class Dataset(NamedTuple):
    """A public test set: which model kind it needs, its classes (slices) or nominal voxel size (EM, z y x nm)."""

    kind: str  # "slices" (SAM models, classes) or "instances" (FGNet)
    classes: dict[int, str] | None = None
    resolution_nm: tuple[float, float, float] | None = None


DATASETS = {
    # Ids and names of HF-SAM's test.py (class_to_name), the TransUNet preprocessing's label ids.
    "synapse": Dataset(
        "slices",
        {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "aorta", 8: "pancreas"},
    ),
    # ACDC's label ids, kept by the SSL4MIS / WSL4MIS h5 files.
    "acdc": Dataset("slices", {1: "RV", 2: "Myo", 3: "LV"}),
    "cremi": Dataset("instances", resolution_nm=(40.0, 4.0, 4.0)),
    "ac3": Dataset("instances", resolution_nm=(29.0, 6.0, 6.0)),
    "ac4": Dataset("instances", resolution_nm=(29.0, 6.0, 6.0)),
}
# A case's h5 files: (image file, label file), the same file twice when one holds both.
Files = tuple[Path, Path]


def read_case_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path} lists no cases: expected one case name a line")
    return names


def pick_cases(found: dict[str, Files], names: Sequence[str] | None, where: Path) -> dict[str, Files]:
    """The cases ``names`` (all when None) of ``found``, in the order given; a missing one is an error."""
    if not found:
        raise DataError(f"no volumes in {where}")
    if names is None:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        some = ", ".join(list(found)[:5]) + (", ..." if len(found) > 5 else "")
        raise DataError(f"{where} has no volume for case(s) {', '.join(missing)} (it has {some})")
    return {n: found[n] for n in names}


def slice_cases(dataset: str, data: Path, names: Sequence[str] | None) -> dict[str, Files]:
    """Synapse or ACDC test volumes in ``data``: {case: (h5 file, h5 file)}; ``names`` default to the test list."""
    if not data.is_dir():
        raise DataError(f"--data {data} is not a folder (expected the {dataset} folder, see --help)")
    if dataset == "synapse":
        folders, suffix, default_list = [data / "test_vol_h5", data], ".npy.h5", data / "lists" / "lists_Synapse" / "test_vol.txt"
    else:
        folders, suffix, default_list = [data / "data", data / "ACDC_training_volumes", data], ".h5", data / "test.list"
    folder = next(f for f in folders if (f.is_dir() and any(f.glob(f"*{suffix}"))) or f == data)
    found = {p.name[: -len(suffix)]: (p, p) for p in sorted(folder.glob(f"*{suffix}"))}
    if not found:
        layout = "test_vol_h5/<case>.npy.h5" if dataset == "synapse" else "data/<case>.h5 or ACDC_training_volumes/<case>.h5"
        raise DataError(f"no {dataset} volumes in {data}: expected {layout}")
    if names is None and default_list.is_file():
        names = read_case_list(default_list)
    # SSL4MIS's lists may carry the file extension.
    names = [n[: -len(suffix)] if n.endswith(suffix) else n for n in names] if names else None
    return pick_cases(found, names, folder)


def em_cases(dataset: str, data: Path) -> dict[str, Files]:
    """EM volumes: {case: (file with the raw volume, file with the labels)}; one file holds both for CREMI."""
    if dataset == "cremi":
        if data.is_file():
            return {data.name.split(".")[0]: (data, data)}
        if not data.is_dir():
            raise DataError(f"--data {data} does not exist (expected a CREMI .hdf file or a folder of them)")
        files = sorted(p for p in data.iterdir() if p.suffix in (".hdf", ".h5", ".hdf5"))
        if not files:
            raise DataError(f"no CREMI files (.hdf, .h5) in {data}")
        return {p.name.split(".")[0]: (p, p) for p in files}
    name = dataset.upper()
    folder = data.parent if data.is_file() else data
    inputs, labels = folder / f"{name}_inputs.h5", folder / f"{name}_labels.h5"
    if not (inputs.is_file() and labels.is_file()):
        raise DataError(f"--data {data}: expected {name}_inputs.h5 and {name}_labels.h5 (dataset 'main', Z x Y x X) in {folder}")
    return {name: (inputs, labels)}


def parse_sections(value: str | None) -> slice:
    """--sections START:STOP (Python slice of the section axis)."""
    if value is None:
        return slice(None)
    parts = value.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        raise DataError(f"--sections {value!r}: expected START:STOP, e.g. :100 or -50: (write --sections=-50:)") from None


# h5 datasets (image, label) of a case, and the layout an error message asks for.
LAYOUTS = {
    "synapse": (("image", "label"), "datasets 'image' and 'label' (D, H, W)"),
    "acdc": (("image", "label"), "datasets 'image' and 'label' (D, H, W)"),
    "cremi": (("volumes/raw", "volumes/labels/neuron_ids"), "volumes/raw and volumes/labels/neuron_ids (CREMI's test files have none)"),
    "ac3": (("main", "main"), "the volume (Z, Y, X) in dataset 'main'"),
    "ac4": (("main", "main"), "the volume (Z, Y, X) in dataset 'main'"),
}


def open_h5(path: Path) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({e})") from None


def read_case(
    dataset: str, files: Files, sections: slice = slice(None), shape_only: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, ...] | None]:
    """(image, label, resolution z y x in nm or None) of one case, checked to be one (Z, Y, X) volume (EM: of at
    least 2 voxels an axis, as the app's volume checks ask); with ``shape_only`` only the checks run (image and
    label None), no voxel is read."""
    import h5py

    (image_key, label_key), expected = LAYOUTS[dataset]
    with open_h5(files[0]) as fi, open_h5(files[1]) as fl:
        for f, key, path in ((fi, image_key, files[0]), (fl, label_key, files[1])):
            if not isinstance(f.get(key), h5py.Dataset):
                raise DataError(f"{path} has no dataset '{key}': expected {expected} (it has {', '.join(f) or 'nothing'})")
        image, label = fi[image_key], fl[label_key]
        if image.ndim != 3 or image.shape != label.shape:
            raise DataError(f"{files[0].name}: {image_key} {image.shape} and {label_key} {label.shape} must be one volume")
        depth = len(range(*sections.indices(image.shape[0])))
        if DATASETS[dataset].kind == "instances" and min(depth, *image.shape[1:]) < 2:
            raise DataError(f"{files[0].name}: {(depth, *image.shape[1:])} leaves fewer than 2 voxels along an axis (--sections?)")
        resolution = tuple(float(r) for r in image.attrs.get("resolution", DATASETS[dataset].resolution_nm or ())) or None
        if shape_only:
            return None, None, resolution
        return np.asarray(image[sections]), np.asarray(label[sections]), resolution


def cremi_ground_truth(neuron_ids: np.ndarray) -> np.ndarray:
    """CREMI neuron ids -> ids with 0 = ignored, as cremi_python's NeuronIds does: every id plus 1, so that the
    background 2^64 - 1 wraps to 0 and a neuron with id 0 stays a neuron."""
    ids = neuron_ids.astype(np.uint64) + np.uint64(1)
    if ids.max() >= 2**63:  # special ids near 2^64 would not fit int64: renumber, keeping 0 at 0
        ids = np.unique(ids, return_inverse=True)[1].reshape(ids.shape) + int(ids.min() != 0)
    return ids.astype(np.int64)


def cremi_border_mask(ids: np.ndarray, max_dist: float) -> np.ndarray:
    """cremi_python's border mask: True within ``max_dist`` pixels (in-plane) of a pixel whose 4-neighbours in its
    section hold another id (those pixels are relabelled background, so ignored)."""
    from scipy import ndimage

    mask = np.zeros(ids.shape, bool)
    for z, section in enumerate(ids):
        padded = np.pad(section, 1, mode="edge")
        inside = (
            (section == padded[:-2, 1:-1]) & (section == padded[2:, 1:-1]) & (section == padded[1:-1, :-2]) & (section == padded[1:-1, 2:])
        )
        mask[z] = ndimage.distance_transform_edt(inside) <= max(max_dist, 0.0)
    return mask


def check_model(model: str, dataset: str) -> None:
    from lib.configs import MODEL_CONFIGS, SAM_MODELS

    kind = DATASETS[dataset].kind
    wanted = SAM_MODELS if kind == "slices" else tuple(m for m in MODEL_CONFIGS if m not in SAM_MODELS)
    if model not in wanted:
        raise DataError(f"--model {model} does not segment {dataset} ({kind}): use one of {', '.join(wanted)}")


def build_config(model: str, model_dir: Path, conf: dict[str, str], dataset: str) -> Any:
    """The model's TaskConfig, initialised as the server initialises it; the dataset fills the --conf the user left
    out: its classes as labels, and the torch engine."""
    from lib.configs import MODEL_CONFIGS

    spec = DATASETS[dataset]
    defaults = {"engine": "torch"}
    if spec.classes:
        defaults["labels"] = json.dumps({name: i for i, name in spec.classes.items()})
    config = MODEL_CONFIGS[model]()
    config.init(model, str(model_dir), {**defaults, **conf}, None)
    if spec.classes and config.model.num_classes - 1 != len(spec.classes):
        raise DataError(
            f"{model} was configured with {config.model.num_classes - 1} classes (--conf labels {config.conf['labels']}), "
            f"{dataset} has {len(spec.classes)}: ids 1..{len(spec.classes)} = {', '.join(spec.classes.values())}"
        )
    return config


def segment_slices(network: Any, image: np.ndarray, size: int, device: str, batch_size: int) -> np.ndarray:
    """(D, H, W) image in [0, 1] -> (D, H, W) class ids as HF-SAM's test_single_volume: each slice zoomed to
    size x size (scipy order 3), arg-max of the network's logits, zoomed back (order 0)."""
    import torch
    from scipy.ndimage import zoom

    depth, h, w = image.shape
    same = (h, w) == (size, size)
    prediction = np.zeros(image.shape, np.int64)
    with torch.inference_mode():
        for start in range(0, depth, batch_size):
            batch = [s if same else zoom(s, (size / h, size / w), order=3) for s in image[start : start + batch_size]]
            logits = network(torch.from_numpy(np.stack(batch)).float()[:, None].to(device))
            for i, out in enumerate(logits.argmax(1).cpu().numpy()):
                prediction[start + i] = out if same else zoom(out, (h / size, w / size), order=0)
    return prediction


def slices_protocol(config: Any, dataset: str, cases: dict[str, Files], batch_size: int) -> dict[str, Any]:
    from lib.evaluation import percase_dice_hd95

    classes = DATASETS[dataset].classes
    device = str(config.device)
    network, version = config.model.resident(device)
    report_adapter(config, version)
    per_case = {}
    for n, (case, files) in enumerate(cases.items(), start=1):
        image, label, _ = read_case(dataset, files)
        ids = np.unique(label)
        if not np.array_equal(ids, np.round(ids)) or ids.min() < 0 or ids.max() > len(classes):
            raise DataError(f"{files[1]}: label ids {ids[:10].tolist()} are not integers in 0..{len(classes)}")
        prediction = segment_slices(network, image, config.model.img_size, device, batch_size)
        per_case[case] = {name: dict(zip(("dice", "hd95"), percase_dice_hd95(prediction == i, label == i))) for i, name in classes.items()}
        case_mean = np.mean([s["dice"] for s in per_case[case].values()])
        print(f"[{n}/{len(cases)}] {case}: {image.shape[0]} slices, mean Dice {100 * case_mean:.2f}", file=sys.stderr)
    per_class = {name: {m: float(np.mean([per_case[c][name][m] for c in per_case])) for m in ("dice", "hd95")} for name in classes.values()}
    mean = {m: float(np.mean([s[m] for s in per_class.values()])) for m in ("dice", "hd95")}
    return {**describe(config, dataset, version, "slices"), "per_case": per_case, "per_class": per_class, "mean": mean}


def em_protocol(config: Any, dataset: str, cases: dict[str, Files], sections: slice, border_nm: float | None) -> dict[str, Any]:
    import nibabel as nib

    from lib.evaluation import cremi_scores

    task = config.infer()
    device = str(config.device)
    per_case, version = {}, 0
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        for n, (case, files) in enumerate(cases.items(), start=1):
            raw, ids, resolution = read_case(dataset, files, sections)
            # cremi_python's ids: background 2^64 - 1 -> 0 (ignored); SNEMI3D's 0 is unlabelled already.
            ids = cremi_ground_truth(ids) if dataset == "cremi" else ids.astype(np.int64)
            if border_nm:
                ids[cremi_border_mask(ids, border_nm / resolution[1])] = 0
            # The server reads volumes with the section axis last, in micrometres (NIfTI has no nm unit).
            path = Path(tmp) / f"{case}.nii"
            image = nib.Nifti1Image(np.ascontiguousarray(raw.transpose(2, 1, 0)), np.diag([r / 1000 for r in resolution[::-1]] + [1.0]))
            image.header.set_xyzt_units("micron")
            nib.save(image, path)
            _, data = task({"image": str(path), "device": device, "skip_writer": "true"})
            version = int(data.get("adapter_version", 0))
            if n == 1:
                report_adapter(config, version)
            prediction = np.asarray(data["pred"]).transpose(2, 1, 0)
            per_case[case] = cremi_scores(prediction, ids)
            print(f"[{n}/{len(cases)}] {case}: {raw.shape} voxels, {int(data.get('instances', 0))} instances", file=sys.stderr)
            path.unlink()
    mean = mean_scores(list(per_case.values()))
    return {**describe(config, dataset, version, "instances"), "per_case": per_case, "mean": mean}


def describe(config: Any, dataset: str, version: int, kind: str) -> dict[str, Any]:
    head = {"dataset": dataset, "model": config.name, "backbone": config.model.backbone, "adapter_version": version}
    if kind == "slices":
        head["classes"] = {str(i): name for i, name in DATASETS[dataset].classes.items()}
        head["input_size"] = config.model.img_size
    return head


def report_adapter(config: Any, version: int) -> None:
    if version == 0:
        print(f"warning: no adapter at {config.model.adapter_path}: scoring {config.name}'s base weights", file=sys.stderr)


def paper_table(result: dict[str, Any]) -> str:
    """Per case and overall: per-class Dice (%) with the mean Dice (%) and HD95 (voxels); or the EM scores."""
    title = f"{result['dataset']}: {result['model']} ({result['backbone']}), adapter version {result['adapter_version']}"
    if "per_class" not in result:
        keys = {"voi_split": "VOI split", "voi_merge": "VOI merge", "voi": "VOI sum", "arand": "ARAND", "cremi_score": "CREMI score"}
        rows = [(case, {h: s[k] for k, h in keys.items()}) for case, s in [*result["per_case"].items(), ("mean", result["mean"])]]
        return title + "\n" + format_rows("case", rows)
    names = list(result["per_class"])

    def row(scores: dict[str, dict[str, float]]) -> dict[str, float]:
        dice = {name: 100 * scores[name]["dice"] for name in names}
        return {**dice, "Dice": float(np.mean(list(dice.values()))), "HD95": float(np.mean([scores[n]["hd95"] for n in names]))}

    rows = [(case, row(scores)) for case, scores in result["per_case"].items()]
    rows.append(("mean", row(result["per_class"])))
    hd95 = {name: result["per_class"][name]["hd95"] for name in names}
    rows.append(("HD95", {**hd95, "Dice": None, "HD95": result["mean"]["hd95"]}))
    return title + "\n" + format_rows("case", rows, digits=2)


def paper_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evaluate.py paper",
        description=__doc__[__doc__.index("Papers' protocols") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=tuple(DATASETS))
    parser.add_argument("--data", type=Path, required=True, help="the dataset folder (cremi: also one file)")
    parser.add_argument("--model", required=True, help="hf_sam or masg_sam (synapse, acdc), fgnet (cremi, ac3, ac4)")
    parser.add_argument("--model-dir", type=Path, default=REPO / "apps" / "samfewshot" / "model", help="where <model>.pt is published")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="the server's --conf (repeatable)")
    parser.add_argument("--cases", nargs="+", help="case names (default: the dataset's test list, else every volume)")
    parser.add_argument("--list", type=Path, help="file of case names, one a line")
    parser.add_argument("--sections", help="EM: START:STOP of the section axis, e.g. :100 (write --sections=-50: for a negative start)")
    parser.add_argument("--cremi-border", type=float, metavar="NM", help="cremi: ignore voxels within NM of a boundary in their section")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per forward (synapse, acdc)")
    parser.add_argument("--output", type=Path, help="write the scores to this JSON file")
    args = parser.parse_args(argv)

    from fastapi import HTTPException

    from lib.adapters import AdapterError
    from lib.networks.sam_backbone import CheckpointError

    spec = DATASETS[args.dataset]
    try:
        check_model(args.model, args.dataset)
        if args.list is not None and not args.list.is_file():
            raise DataError(f"--list {args.list} is not a file (expected case names, one a line)")
        if not args.model_dir.is_dir():
            raise DataError(f"--model-dir {args.model_dir} is not a folder (expected the folder holding {args.model}.pt)")
        if args.cremi_border is not None and args.dataset != "cremi":
            raise DataError("--cremi-border applies to --dataset cremi only")
        if args.sections is not None and spec.kind == "slices":
            raise DataError("--sections applies to the EM datasets (cremi, ac3, ac4) only")
        names = args.cases or (read_case_list(args.list) if args.list else None)
        sections = parse_sections(args.sections)
        if spec.kind == "slices":
            cases = slice_cases(args.dataset, args.data, names)
        else:
            cases = pick_cases(em_cases(args.dataset, args.data), names, args.data)
        for files in cases.values():  # every file's layout before the model is built
            read_case(args.dataset, files, sections, shape_only=True)
        config = build_config(args.model, args.model_dir, dict(args.conf), args.dataset)
        if spec.kind == "slices":
            result = slices_protocol(config, args.dataset, cases, max(args.batch_size, 1))
        else:
            result = em_protocol(config, args.dataset, cases, sections, args.cremi_border)
    except (ValueError, CheckpointError, AdapterError) as e:
        print(f"evaluate.py paper: error: {e}", file=sys.stderr)
        return 1
    except HTTPException as e:
        print(f"evaluate.py paper: error: {e.detail}", file=sys.stderr)
        return 1
    report(paper_table(result), result, args.output)
    return 0


def report(text: str, result: dict, output: Path | None) -> None:
    """Print the table; write the scores as JSON to ``output`` when given."""
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["paper"]:
        return paper_main(argv[1:])
    if argv[:1] == ["interactive"]:
        from evaluate_interactive import main as interactive_main

        return interactive_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="evaluate.py paper --help: run a model on a public dataset with its paper's protocol. evaluate.py "
        "interactive --help: the CVPR 2025 interactive challenge's protocol through a server's interactive task.",
    )
    parser.add_argument("--task", choices=("segmentation", "instances"), required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="folder of predicted label volumes")
    parser.add_argument("--groundtruth", type=Path, required=True, help="folder of ground-truth label volumes")
    parser.add_argument("--labels", help='segmentation: JSON file or string {"name": id} (default: GROUNDTRUTH/labels.json)')
    parser.add_argument("--output", type=Path, help="write the scores to this JSON file")
    args = parser.parse_args(argv)
    for folder in (args.predictions, args.groundtruth):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    try:
        labels = read_labels(args.labels, args.groundtruth) if args.task == "segmentation" else None
        result = evaluate(args.task, args.predictions, args.groundtruth, labels)
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    report(table(result), result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
