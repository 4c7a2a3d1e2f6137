#!/usr/bin/env python3
"""Build the sample datastores used by the samfewshot app: brain MRI and serial-section EM.

brain-mri: every subject is the MNI ICBM152 2009a symmetric T1 template (shipped inside nilearn, so
nothing is downloaded) warped by a seeded random elastic + affine deformation, with an MR-like bias
field and Rician noise. Grey/white-matter labels come from the template's tissue probability maps,
warped with the same deformation, so image and label stay consistent.

em-neurons: synthetic anisotropic (4 x 4 x 40 nm) EM-like volumes of space-filling neurites: each
cell is the region nearest to a random smooth centre line running mostly along z, with membranes,
mitochondria, vesicles, blur and noise drawn on top. Labels are instance ids 1..N.

Output (``--output-dir``, default ``<repo>/sample-datasets``):

    brain-mri/brain_000.nii.gz ...                 images: a MONAI Label LocalDatastore
    brain-mri/labels/final/brain_000.nii.gz ...    labels for the first ``--labelled`` images only
    brain-mri-groundtruth/brain_000.nii.gz ...     labels for all images (evaluation / oracle)
    brain-mri-groundtruth/labels.json              {"white matter": 1, "grey matter": 2}
    brain-mri-groundtruth/manifest.json            written last: its presence means "complete"
    em-neurons/em_000.nii.gz ...                   the same layout for the EM set (no labels.json:
    em-neurons/labels/final/em_000.nii.gz ...      instance ids carry no names)
    em-neurons-groundtruth/em_000.nii.gz ...
    em-neurons-groundtruth/manifest.json
    brain-mri-cohort/, brain-mri-cohort-groundtruth/   --dataset cohort (not part of "all"): a varied synthetic
                                                       cohort for active-learning studies, see COHORT_* below
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

# torch/monai/nilearn/nibabel/scipy/skimage are imported inside the functions that need them: importing
# MONAI alone takes seconds, and `setup.sh` calls this script with --skip-existing on every run.

REPO_ROOT = Path(__file__).resolve().parents[1]


class Layout(NamedTuple):
    """Where one sample dataset lives under the output dir and what a complete run leaves there."""

    datastore: str
    groundtruth: str
    prefix: str
    groundtruth_extras: tuple[str, ...] = ()

    def case_id(self, index: int) -> str:
        return f"{self.prefix}_{index:03d}"

    def expected_files(self, output_dir: Path, count: int, labelled: int) -> list[Path]:
        ds, gt = output_dir / self.datastore, output_dir / self.groundtruth
        files = [gt / name for name in self.groundtruth_extras]
        for i in range(count):
            files += [ds / f"{self.case_id(i)}.nii.gz", gt / f"{self.case_id(i)}.nii.gz"]
            if i < labelled:
                files.append(ds / "labels" / "final" / f"{self.case_id(i)}.nii.gz")
        return files


BRAIN = Layout("brain-mri", "brain-mri-groundtruth", "brain", ("labels.json",))
EM = Layout("em-neurons", "em-neurons-groundtruth", "em")
COHORT = Layout("brain-mri-cohort", "brain-mri-cohort-groundtruth", "mr", ("labels.json",))

GENERATOR_VERSION = 1
LABELS = {"white matter": 1, "grey matter": 2}

MAX_INTENSITY = 900.0  # template max (1.0) -> 900: white matter ~780, grey ~590, CSF ~240
CROP_MARGIN_MM = 16.0  # background kept around the brain; covers the rotation/scale/warp below
ELASTIC_SIGMA_MM = (9.0, 13.0)  # smoothness of the random displacement field
ELASTIC_RMS_MM = (1.0, 2.5)  # per-axis RMS displacement in mm; larger values start to fold the field
ROTATE_DEG = 4.0
SCALE_FRACTION = 0.05
BIAS_COEFF = 0.15  # Legendre coefficients in [-c, c]: gain varies ~15-30 % over the brain
NOISE_STD_MAX = 30.0  # Rician sigma drawn from [0, 30]: white-matter SNR >= ~25

# The cohort: each volume draws one value per axis of variation, the way a clinical MR cohort differs. Tissue means
# (arbitrary units, like the int16 T1 set) per contrast for white matter, grey matter, CSF and lesion; T1 keeps the
# template's own image and darkens lesions to the lesion value.
COHORT_GENERATOR_VERSION = 1
COHORT_LABELS = {"white matter": 1, "grey matter": 2, "lesion": 3}
COHORT_CONTRASTS = {
    "T1": None,
    "T2": {"wm": 330.0, "gm": 560.0, "csf": 950.0, "lesion": 820.0},
    "FLAIR": {"wm": 420.0, "gm": 600.0, "csf": 90.0, "lesion": 960.0},
}
COHORT_T1_LESION = 430.0
COHORT_SPACINGS_MM = ((1.5, 1.5, 1.5), (2.0, 2.0, 2.0), (1.2, 1.2, 3.0))  # the last: thick axial slices
COHORT_ORIENTATIONS = ("RAS", "LPS", "PIL")  # PIL: a sagittal acquisition stored slice-first
COHORT_AXIAL_COVERAGE = (0.6, 1.0)  # share of the brain's axial extent inside the field of view
COHORT_LESION_SHARE = 0.4  # volumes with lesions
COHORT_LESIONS = (2, 6)  # lesions per volume with lesions
COHORT_LESION_RADIUS_MM = (4.0, 11.0)
COHORT_NOISE_STD = (5.0, 45.0)  # Rician sigma
COHORT_BIAS_COEFF = (0.05, 0.3)

EM_GENERATOR_VERSION = 1
EM_SPACING_NM = (4.0, 4.0, 40.0)  # x, y, z: 40 nm sections imaged at 4 nm per pixel
EM_CELLS = (15, 40)  # neurite profiles per 640 x 640 nm section (the default field); scaled by section area
EM_TILT_DEG = 35.0  # largest angle between a neurite and the z axis
EM_WIGGLE_NM = (10.0, 40.0)  # amplitude of the centre lines' sinusoidal meander
EM_WIGGLE_PERIOD_NM = (400.0, 1500.0)
EM_CURVE_STEP_NM = 10.0  # sampling of the centre lines, well below the 40 nm section thickness
EM_TONE = (0.62, 0.05)  # cytoplasm grey (0..1) and its spread between cells
EM_TEXTURE = 0.05  # amplitude of the smooth cytoplasm granularity
EM_MEMBRANE = 0.05  # before the blur, which lifts a 2-3 px membrane to ~0.3
EM_MITO, EM_MITO_WALL = 0.38, 0.15  # mitochondria: dark matrix, darker double membrane
EM_VESICLE, EM_VESICLE_LUMEN = 0.2, 0.5
EM_BLUR_VOXELS = (1.0, 1.0, 0.5)
EM_SECTION_GAIN = 0.03  # section-to-section brightness variation (thickness, staining)
EM_PHOTONS = 200.0  # shot noise: variance = intensity / EM_PHOTONS
EM_READ_NOISE = 0.015


def subject_seed(seed: int, index: int) -> int:
    # Independent, order-free stream per (seed, subject): regenerating one subject or changing
    # --count does not change the others.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def load_template(spacing: float):
    """MNI152 T1 (scaled to MR-like intensities) + GM/WM probabilities on a cropped `spacing` mm RAS grid.

    Returns a dict of (1, X, Y, Z) float32 MetaTensors with keys image/gm/wm.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, CropForegroundd, ScaleIntensityd, Spacingd
    from nilearn import datasets

    imgs = {
        "image": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
    }
    data = {k: MetaTensor(torch.from_numpy(v.get_fdata(dtype=np.float32))[None], affine=torch.as_tensor(v.affine)) for k, v in imgs.items()}
    keys = list(data)
    # The nilearn affines are already RAS (positive diagonal), so no reorientation is needed.
    prepare = Compose(
        [
            # Crop at 1 mm (template is skull-stripped, background is exactly 0) before resampling.
            CropForegroundd(keys, source_key="image", margin=math.ceil(CROP_MARGIN_MM)),
            Spacingd(keys, pixdim=(spacing,) * 3, mode="bilinear"),
            ScaleIntensityd("image", minv=0.0, maxv=MAX_INTENSITY),
        ]
    )
    prepared = prepare(data)
    return {k: prepared[k] for k in keys}  # drop the crop's bookkeeping entries (foreground_*_coord)


def make_subject_transform(spacing: float):
    """Random per-subject transform; reseed with `.set_random_state(seed)` before each subject."""
    from monai.transforms import Compose, Rand3DElasticd, RandBiasFieldd, RandRicianNoised

    # Rand3DElastic smooths U(-1, 1) voxel noise with a Gaussian of sigma s (voxels) and multiplies by
    # `magnitude`; the smoothed field has std ~0.0865 * s**-1.5, so pick magnitude for an RMS in mm
    # that does not depend on the grid spacing.
    sigma = tuple(s / spacing for s in ELASTIC_SIGMA_MM)
    sigma_mid = sum(sigma) / 2
    magnitude = tuple(rms / spacing * sigma_mid**1.5 / 0.0865 for rms in ELASTIC_RMS_MM)
    keys = ["image", "gm", "wm"]
    return Compose(
        [
            # One deformation for image and both probability maps, so the labels follow the anatomy.
            Rand3DElasticd(
                keys,
                sigma_range=sigma,
                magnitude_range=magnitude,
                prob=1.0,
                rotate_range=(math.radians(ROTATE_DEG),) * 3,
                scale_range=(SCALE_FRACTION,) * 3,
                mode="bilinear",
                padding_mode="zeros",
            ),
            # Acquisition effects on the image only: coil gain, then magnitude-image noise.
            RandBiasFieldd("image", degree=3, coeff_range=(-BIAS_COEFF, BIAS_COEFF), prob=1.0),
            RandRicianNoised("image", prob=1.0, std=NOISE_STD_MAX, sample_std=True),
        ]
    )


def make_cohort_deformation(spacing: float):
    """The subjects' elastic + affine deformation of ``make_subject_transform``, applied to the image, both tissue
    maps and the brain mask, without the acquisition effects (each cohort volume draws its own)."""
    transform = make_subject_transform(spacing).transforms[0]
    transform.keys = ("image", "gm", "wm", "brain")
    transform.mode = ("bilinear",) * 4
    transform.padding_mode = ("zeros",) * 4
    return transform


def draw_lesions(wm: np.ndarray, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of 2-6 ellipsoidal white-matter lesions (inside voxels at least half white matter)."""
    lesion = np.zeros(wm.shape, bool)
    centres = np.argwhere(wm > 0.9)
    grid = np.indices(wm.shape, sparse=True)
    for _ in range(rng.integers(COHORT_LESIONS[0], COHORT_LESIONS[1] + 1)):
        centre = centres[rng.integers(len(centres))]
        radii = rng.uniform(*COHORT_LESION_RADIUS_MM, size=3) / spacing
        lesion |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    return lesion & (wm >= 0.5)


def cohort_volume(template, deformation, spacing: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One cohort volume: (int16 image, uint8 label, affine, description), in its own grid and orientation."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, RandBiasFieldd, RandRicianNoised, Spacingd

    rng = np.random.default_rng(seed)
    deformation.set_random_state(seed=seed)
    out = deformation({k: v.clone() for k, v in template.items()})
    gm, wm = (np.clip(out[k][0].numpy(), 0.0, 1.0) for k in ("gm", "wm"))
    csf = np.clip(out["brain"][0].numpy() - gm - wm, 0.0, 1.0)
    has_lesions = bool(rng.random() < COHORT_LESION_SHARE)
    lesion = draw_lesions(wm, spacing, rng) if has_lesions else np.zeros(wm.shape, bool)
    contrast = str(rng.choice(list(COHORT_CONTRASTS)))
    means = COHORT_CONTRASTS[contrast]
    if means is None:
        image = np.where(lesion, COHORT_T1_LESION, out["image"][0].numpy())
    else:
        image = wm * means["wm"] + gm * means["gm"] + csf * means["csf"]
        image = np.where(lesion, means["lesion"], image)
    label = np.argmax(np.stack([1.0 - wm - gm, wm, gm]), axis=0).astype(np.uint8)
    label[lesion] = COHORT_LABELS["lesion"]

    pixdim = COHORT_SPACINGS_MM[rng.integers(len(COHORT_SPACINGS_MM))]
    noise, bias = rng.uniform(*COHORT_NOISE_STD), rng.uniform(*COHORT_BIAS_COEFF)
    affine = template["image"].affine
    data = {
        "image": MetaTensor(torch.from_numpy(image.astype(np.float32))[None], affine=affine),
        "label": MetaTensor(torch.from_numpy(label)[None].float(), affine=affine),
    }
    acquire = Compose(
        [
            Spacingd(("image", "label"), pixdim=pixdim, mode=("bilinear", "nearest")),
            RandBiasFieldd("image", degree=3, coeff_range=(-bias, bias), prob=1.0),
            RandRicianNoised("image", prob=1.0, std=noise),
        ]
    )
    acquire.set_random_state(seed=seed)
    out = acquire(data)
    image = np.clip(np.rint(out["image"][0].numpy()), 0, np.iinfo(np.int16).max).astype(np.int16)
    label = np.rint(out["label"][0].numpy()).astype(np.uint8)
    affine = out["image"].affine.numpy().astype(np.float64)

    # Field of view: a contiguous share of the axial slices that hold brain, placed at random.
    brain_z = np.flatnonzero(label.any(axis=(0, 1)))
    keep = max(1, round(rng.uniform(*COHORT_AXIAL_COVERAGE) * len(brain_z)))
    first = brain_z[0] + rng.integers(0, len(brain_z) - keep + 1)
    low, high = max(0, first - 2), min(label.shape[2], first + keep + 2)
    image, label = image[..., low:high], label[..., low:high]
    affine = affine @ nib.affines.from_matvec(np.eye(3), [0, 0, low])

    orientation = str(rng.choice(COHORT_ORIENTATIONS))
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(orientation)))
    image = nib.orientations.apply_orientation(image, ornt)
    label = nib.orientations.apply_orientation(label, ornt)
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, out["image"].shape[1:3] + (high - low,))
    description = {
        "contrast": contrast,
        "lesions": has_lesions,
        "spacing_mm": list(pixdim),
        "orientation": orientation,
        "axial_coverage": round(keep / len(brain_z), 3),
        "noise_std": round(float(noise), 1),
        "bias_coeff": round(float(bias), 3),
    }
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine, description


def generate_cohort(
    output_dir: str | os.PathLike = REPO_ROOT / "sample-datasets",
    seed: int = 0,
    count: int = 24,
    labelled: int = 0,
    spacing: float = 1.5,
    skip_existing: bool = False,
) -> dict:
    """Generate the varied brain-MRI cohort (``COHORT_*``) under `output_dir`; returns the manifest. ``spacing`` is
    the grid the template is deformed on before each volume is resampled to its own voxel size."""
    error = check_args(count, labelled, spacing=spacing)
    if error:
        raise ValueError(error)
    output_dir = Path(output_dir)
    params = {
        "generator_version": COHORT_GENERATOR_VERSION,
        "seed": int(seed),
        "count": int(count),
        "labelled": int(labelled),
        "spacing_mm": float(spacing),
    }
    manifest = existing_manifest(COHORT, output_dir, params) if skip_existing else None
    if manifest is not None:
        return manifest

    start = time.perf_counter()
    import nilearn
    from tqdm import tqdm

    ds_dir, gt_dir = start_fresh(COHORT, output_dir)
    template = load_template(spacing)
    # The template is skull-stripped with an exact-zero background: whatever is above it is brain (CSF included).
    template["brain"] = (template["image"] > 0.02 * MAX_INTENSITY).float()
    deformation = make_cohort_deformation(spacing)
    volumes = []
    for i in tqdm(range(count), desc="brain-mri-cohort", unit="vol"):
        sseed = subject_seed(seed, i)
        image, label, affine, description = cohort_volume(template, deformation, spacing, sseed)
        write_case(COHORT, output_dir, i, i < labelled, image, label, affine)
        volumes.append(
            {
                "id": COHORT.case_id(i),
                "seed": sseed,
                "labelled_in_datastore": i < labelled,
                **description,
                "shape": [int(s) for s in image.shape],
                "label_fraction": {k: round(float(np.mean(label == v)), 5) for k, v in COHORT_LABELS.items()},
            }
        )
    write_json(COHORT_LABELS, gt_dir / "labels.json")
    manifest = {
        **params,
        "labels": COHORT_LABELS,
        "source": f"synthetic cohort from the MNI ICBM152 2009a template and its GM/WM maps (bundled with nilearn {nilearn.__version__})",
        "volumes": volumes,
    }
    write_json(manifest, gt_dir / "manifest.json")  # last: marks the output complete
    print(f"[sample-data] wrote {count} cohort volumes to {ds_dir} in {time.perf_counter() - start:.1f} s")
    return manifest


def deform_subject(template, transform, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject: (int16 image, uint8 label), both (X, Y, Z)."""
    transform.set_random_state(seed=seed)
    out = transform({k: v.clone() for k, v in template.items()})
    image = np.clip(np.rint(out["image"][0].numpy()), 0, np.iinfo(np.int16).max).astype(np.int16)
    gm = np.clip(out["gm"][0].numpy(), 0.0, 1.0)
    wm = np.clip(out["wm"][0].numpy(), 0.0, 1.0)
    # Index in the stack is the label id: 0 background, 1 white matter, 2 grey matter.
    label = np.argmax(np.stack([1.0 - wm - gm, wm, gm]), axis=0).astype(np.uint8)
    return image, label


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, units: str = "mm") -> None:
    """Write via a hidden temporary name + rename, so a killed run never leaves a truncated volume."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units(units)
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def existing_manifest(layout: Layout, output_dir: Path, params: dict) -> dict | None:
    """The manifest of a complete previous run with the same parameters (said on stdout), else None."""
    try:
        manifest = json.loads((output_dir / layout.groundtruth / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in params.items()):
        return None
    # Extra files (e.g. labels saved later through MONAI Label) are fine; missing ones are not.
    if not all(p.is_file() for p in layout.expected_files(output_dir, params["count"], params["labelled"])):
        return None
    where, seed, count = output_dir / layout.datastore, params["seed"], params["count"]
    print(f"[sample-data] {where} is complete (seed {seed}, {count} volumes); skipping")
    return manifest


def clear_dir(path: Path) -> None:
    """Empty `path` (dotfiles such as .datastore.json included), creating it if needed."""
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def start_fresh(layout: Layout, output_dir: Path) -> tuple[Path, Path]:
    """Empty datastore and ground-truth folders; returns their paths.

    The manifest goes first so an interrupted run never looks complete; then everything else, since stale
    volumes, labels or a stale .datastore.json would not match the new images.
    """
    ds_dir, gt_dir = output_dir / layout.datastore, output_dir / layout.groundtruth
    (gt_dir / "manifest.json").unlink(missing_ok=True)
    clear_dir(ds_dir)
    clear_dir(gt_dir)
    (ds_dir / "labels" / "final").mkdir(parents=True)
    return ds_dir, gt_dir


def write_case(
    layout: Layout,
    output_dir: Path,
    index: int,
    labelled: bool,
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    units: str = "mm",
) -> None:
    """Image into the datastore, label into the ground truth and, for the few-shot start, into labels/final."""
    name = f"{layout.case_id(index)}.nii.gz"
    write_nifti(image, affine, output_dir / layout.datastore / name, units)
    write_nifti(label, affine, output_dir / layout.groundtruth / name, units)
    if labelled:
        write_nifti(label, affine, output_dir / layout.datastore / "labels" / "final" / name, units)


def check_args(count: int, labelled: int, spacing: float | None = None, shape: Sequence[int] | None = None) -> str | None:
    if count < 1:
        return f"--count must be >= 1 (got {count})"
    if not 0 <= labelled <= count:
        return f"--labelled must be between 0 and --count (got {labelled})"
    if spacing is not None and not spacing > 0:
        return f"--spacing must be > 0 (got {spacing})"
    if shape is not None and (len(shape) != 3 or min(shape) < 2):
        return f"--em-shape must be three sizes >= 2 (got {list(shape)})"
    return None


def generate(
    output_dir: str | os.PathLike = REPO_ROOT / "sample-datasets",
    seed: int = 0,
    count: int = 8,
    labelled: int = 2,
    spacing: float = 1.5,
    skip_existing: bool = False,
) -> dict:
    """Generate the brain-MRI datastore + ground truth under `output_dir`; returns the manifest."""
    error = check_args(count, labelled, spacing=spacing)
    if error:
        raise ValueError(error)
    output_dir = Path(output_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "count": int(count),
        "labelled": int(labelled),
        "spacing_mm": float(spacing),
    }
    manifest = existing_manifest(BRAIN, output_dir, params) if skip_existing else None
    if manifest is not None:
        return manifest

    start = time.perf_counter()
    import monai
    import nilearn
    from tqdm import tqdm

    ds_dir, gt_dir = start_fresh(BRAIN, output_dir)

    template = load_template(spacing)
    affine = template["image"].affine.numpy().astype(np.float64)
    transform = make_subject_transform(spacing)

    volumes = []
    for i in tqdm(range(count), desc="brain-mri", unit="vol"):
        sseed = subject_seed(seed, i)
        image, label = deform_subject(template, transform, sseed)
        write_case(BRAIN, output_dir, i, i < labelled, image, label, affine)
        volumes.append(
            {
                "id": BRAIN.case_id(i),
                "seed": sseed,
                "labelled_in_datastore": i < labelled,
                "label_fraction": {k: round(float(np.mean(label == v)), 5) for k, v in LABELS.items()},
            }
        )

    write_json(LABELS, gt_dir / "labels.json")
    manifest = {
        **params,
        "shape": [int(s) for s in template["image"].shape[1:]],
        "labels": LABELS,
        "source": f"MNI ICBM152 2009a nonlinear symmetric T1 + GM/WM probability maps (bundled with nilearn {nilearn.__version__})",
        "monai_version": monai.__version__,
        "volumes": volumes,
    }
    write_json(manifest, gt_dir / "manifest.json")  # last: marks the output complete
    print(f"[sample-data] wrote {count} volumes of shape {manifest['shape']} to {ds_dir} in {time.perf_counter() - start:.1f} s")
    return manifest


def neurite_labels(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Space-filling instance ids 1..N (x, y, z): every voxel belongs to the neurite with the nearest centre line.

    Distances are taken in nm, so the 10x thicker sections shape the cells as they would in tissue. Centre
    lines may start up to 10 % of the field beyond its edges, so neurites also leave and enter through the
    sides, and random placement alone gives thin and thick calibres.
    """
    from scipy.spatial import cKDTree

    spacing = np.asarray(EM_SPACING_NM)
    extent = np.asarray(shape) * spacing
    n = max(2, round(rng.uniform(*EM_CELLS) * extent[0] * extent[1] / (160 * 4.0) ** 2))
    margin = 0.1 * extent[:2]
    z = np.arange(-2 * spacing[2], extent[2] + 2 * spacing[2], EM_CURVE_STEP_NM)
    sites = []
    for _ in range(n):
        centre = rng.uniform(-margin, extent[:2] + margin)
        direction = rng.uniform(0, 2 * math.pi)
        slope = math.tan(math.radians(rng.uniform(0, EM_TILT_DEG)))
        tilt = slope * np.array([math.cos(direction), math.sin(direction)])
        amplitude = rng.uniform(*EM_WIGGLE_NM, 2)
        period = rng.uniform(*EM_WIGGLE_PERIOD_NM, 2)
        phase = rng.uniform(0, 2 * math.pi, 2)
        xy = centre + np.outer(z - extent[2] / 2, tilt) + amplitude * np.sin(2 * math.pi * z[:, None] / period + phase)
        sites.append(np.column_stack([xy, z]))
    tree = cKDTree(np.concatenate(sites))
    owner = np.repeat(np.arange(1, n + 1, dtype=np.int64), len(z))

    xs, ys = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij")
    labels = np.empty(shape, np.int64)
    for k in range(shape[2]):  # one section at a time keeps memory flat for large fields
        query = np.column_stack([xs.ravel(), ys.ravel(), np.full(xs.size, k * spacing[2])])
        labels[..., k] = owner[tree.query(query, workers=-1)[1]].reshape(xs.shape)
    return single_pieces(labels)


def single_pieces(labels: np.ndarray) -> np.ndarray:
    """Relabel so that every cell is one 6-connected piece with ids 1..N.

    A nearest-centre-line region is connected in continuous space, but 40 nm sections and the field's edge can
    cut a thin or clipped region into pieces; all but each cell's largest piece go to their nearest neighbour.
    """
    from skimage.measure import label as connected_pieces
    from skimage.segmentation import expand_labels, relabel_sequential

    pieces = connected_pieces(labels, background=0, connectivity=1)  # ids are >= 1: every voxel gets a piece
    sizes = np.bincount(pieces.ravel())
    cell_of_piece = np.zeros(sizes.size, np.int64)
    cell_of_piece[pieces.ravel()] = labels.ravel()
    keep = np.zeros(sizes.size, bool)
    for cell in np.unique(labels):
        own = np.flatnonzero(cell_of_piece == cell)
        keep[own[np.argmax(sizes[own])]] = True
    labels = np.where(keep[pieces], labels, 0)
    labels = expand_labels(labels, distance=np.inf, spacing=EM_SPACING_NM)
    labels = relabel_sequential(labels)[0]  # cells that own no voxel leave no gap in the ids
    return labels.astype(np.uint16 if labels.max() < 2**16 else np.uint32)


def smooth_noise(shape: Sequence[int], sigma: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length `sigma` (voxels)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def em_membranes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2-3 px thick membranes along the cell boundaries, drawn per section (each section is imaged on its own).

    The volume's border is no boundary: a cell cut by the field of view ends there without a membrane.
    """
    from scipy.ndimage import binary_dilation
    from skimage.segmentation import find_boundaries

    edges = np.stack([find_boundaries(labels[..., k], mode="thick") for k in range(labels.shape[2])], axis=-1)
    in_plane = np.zeros((3, 3, 1), bool)
    in_plane[1, :, 0] = in_plane[:, 1, 0] = True
    thicker = smooth_noise(labels.shape, (6.0, 6.0, 1.0), rng) > 0
    return edges | (binary_dilation(edges, in_plane) & thicker)


def draw_organelles(image: np.ndarray, labels: np.ndarray, membrane: np.ndarray, rng: np.random.Generator) -> None:
    """Mitochondria (ellipsoids elongated along z) and vesicle clusters, each clipped to the cell it starts in."""
    from scipy.ndimage import distance_transform_edt

    spacing = np.asarray(EM_SPACING_NM)
    clearance = distance_transform_edt(~membrane, sampling=EM_SPACING_NM) if membrane.any() else np.full(labels.shape, np.inf)
    n_cells = int(labels.max())

    def region(centre: tuple[int, ...], half_nm: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Box around `centre` covering +-half_nm, clipped to the volume, and its voxel offsets in nm."""
        half = np.ceil(half_nm / spacing).astype(int)
        box = tuple(slice(max(c - h, 0), min(c + h + 1, s)) for c, h, s in zip(centre, half, labels.shape))
        axes = [(np.arange(b.start, b.stop) - c) * d for b, c, d in zip(box, centre, spacing)]
        return box, np.meshgrid(*axes, indexing="ij")

    def paint(box: tuple[slice, ...], inside: np.ndarray, cell: int, value: float) -> None:
        keep = inside & (labels[box] == cell) & ~membrane[box]
        image[box][keep] = value

    candidates = np.flatnonzero(clearance > 50.0)
    for _ in range(rng.poisson(0.8 * n_cells) if candidates.size else 0):
        centre = np.unravel_index(rng.choice(candidates), labels.shape)
        cell = labels[centre]
        a = rng.uniform(20.0, 40.0)
        b = a * rng.uniform(0.6, 1.0)
        length = rng.uniform(120.0, 400.0)
        angle = rng.uniform(0, math.pi)
        box, (dx, dy, dz) = region(centre, np.array([a, a, length]))
        u, v = dx * math.cos(angle) + dy * math.sin(angle), -dx * math.sin(angle) + dy * math.cos(angle)
        inside = (u / a) ** 2 + (v / b) ** 2 + (dz / length) ** 2 <= 1
        matrix = (u / (a - 6)) ** 2 + (v / (b - 6)) ** 2 + (dz / length) ** 2 <= 1
        paint(box, inside, cell, EM_MITO_WALL)
        paint(box, matrix, cell, EM_MITO)

    candidates = np.flatnonzero(clearance > 80.0)
    for _ in range(rng.poisson(0.2 * n_cells) + 1 if candidates.size else 0):
        centre = np.array(np.unravel_index(rng.choice(candidates), labels.shape))
        cell = labels[tuple(centre)]
        for _ in range(rng.integers(8, 25)):
            offset = np.append(np.rint(rng.normal(0, 12.0, 2)), rng.integers(-1, 2))
            position = tuple(int(c) for c in np.clip(centre + offset, 0, np.array(labels.shape) - 1))
            r = rng.uniform(16.0, 22.0)
            box, (dx, dy, dz) = region(position, np.array([r, r, 0.0]))
            distance = np.hypot(dx, dy)
            paint(box, distance <= r, cell, EM_VESICLE)
            paint(box, distance <= r - 6, cell, EM_VESICLE_LUMEN)


def render_em(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 EM-like image of `labels`: grey cytoplasm with per-cell tone and texture, dark membranes and
    organelles, then the microscope's blur, section-to-section gain, shot and read noise."""
    from scipy.ndimage import gaussian_filter

    tone = rng.normal(*EM_TONE, int(labels.max()) + 1).astype(np.float32)
    image = tone[labels] + EM_TEXTURE * smooth_noise(labels.shape, (1.5, 1.5, 0.3), rng)
    membrane = em_membranes(labels, rng)
    image[membrane] = EM_MEMBRANE
    draw_organelles(image, labels, membrane, rng)
    image = gaussian_filter(image, EM_BLUR_VOXELS)
    image *= rng.normal(1.0, EM_SECTION_GAIN, labels.shape[2]).astype(np.float32)
    image = rng.poisson(np.clip(image, 0, None) * EM_PHOTONS) / EM_PHOTONS
    image += rng.normal(0.0, EM_READ_NOISE, labels.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def em_volume(shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic EM volume: (uint8 image, instance labels 1..N), both (x, y, z)."""
    rng = np.random.default_rng(seed)
    labels = neurite_labels(shape, rng)
    return render_em(labels, rng), labels


def generate_em(
    output_dir: str | os.PathLike = REPO_ROOT / "sample-datasets",
    seed: int = 0,
    count: int = 6,
    labelled: int = 2,
    shape: tuple[int, int, int] = (160, 160, 32),
    skip_existing: bool = False,
) -> dict:
    """Generate the EM datastore + instance ground truth under `output_dir`; returns the manifest."""
    error = check_args(count, labelled, shape=shape)
    if error:
        raise ValueError(error)
    output_dir = Path(output_dir)
    params = {
        "generator_version": EM_GENERATOR_VERSION,
        "seed": int(seed),
        "count": int(count),
        "labelled": int(labelled),
        "shape": [int(s) for s in shape],
        "spacing_nm": list(EM_SPACING_NM),
    }
    manifest = existing_manifest(EM, output_dir, params) if skip_existing else None
    if manifest is not None:
        return manifest

    start = time.perf_counter()
    from tqdm import tqdm

    ds_dir, gt_dir = start_fresh(EM, output_dir)
    # NIfTI has no nm unit: the affine is in micrometres, and the header says so.
    affine = np.diag([s / 1000.0 for s in EM_SPACING_NM] + [1.0])
    volumes = []
    for i in tqdm(range(count), desc="em-neurons", unit="vol"):
        sseed = subject_seed(seed, i)
        image, label = em_volume(shape, sseed)
        write_case(EM, output_dir, i, i < labelled, image, label, affine, units="micron")
        volumes.append({"id": EM.case_id(i), "seed": sseed, "labelled_in_datastore": i < labelled, "cells": int(label.max())})

    manifest = {
        **params,
        "source": "synthetic: nearest-centre-line regions of random neurites, membranes, organelles, blur, noise",
        "volumes": volumes,
    }
    write_json(manifest, gt_dir / "manifest.json")  # last: marks the output complete
    print(f"[sample-data] wrote {count} volumes of shape {manifest['shape']} to {ds_dir} in {time.perf_counter() - start:.1f} s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "sample-datasets")
    parser.add_argument(
        "--dataset", choices=("brain", "em", "all", "cohort"), default="all", help="which sample set to build ('all': brain and em)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, help="number of volumes (default: 8 brain, 6 EM, 24 cohort)")
    parser.add_argument("--labelled", type=int, help="volumes whose label is put in the datastore (default 2; cohort 0)")
    parser.add_argument("--spacing", type=float, default=1.5, help="brain: isotropic voxel size in mm")
    parser.add_argument("--em-shape", type=int, nargs=3, default=(160, 160, 32), metavar=("X", "Y", "Z"), help="EM: voxels per volume")
    parser.add_argument("--skip-existing", action="store_true", help="do nothing if a complete run with these parameters exists")
    args = parser.parse_args(argv)
    if args.dataset == "cohort":
        count, labelled = 24 if args.count is None else args.count, args.labelled or 0
        error = check_args(count, labelled, spacing=args.spacing)
        if error:
            parser.error(error)
        generate_cohort(args.output_dir, args.seed, count, labelled, args.spacing, args.skip_existing)
        return 0
    args.labelled = 2 if args.labelled is None else args.labelled
    brain_count = 8 if args.count is None else args.count
    em_count = 6 if args.count is None else args.count
    brain, em = args.dataset in ("brain", "all"), args.dataset in ("em", "all")
    error = None
    if brain:
        error = check_args(brain_count, args.labelled, spacing=args.spacing)
    if em:
        error = error or check_args(em_count, args.labelled, shape=args.em_shape)
    if error:  # before anything is written: a bad EM option must not cost a brain rebuild first
        parser.error(error)
    if brain:
        generate(args.output_dir, args.seed, brain_count, args.labelled, args.spacing, args.skip_existing)
    if em:
        generate_em(args.output_dir, args.seed, em_count, args.labelled, tuple(args.em_shape), args.skip_existing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
