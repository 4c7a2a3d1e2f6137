#!/usr/bin/env python3
"""Build the synthetic brain-MRI sample datastore used by the samfewshot app.

Every subject is the MNI ICBM152 2009a symmetric T1 template (shipped inside nilearn, so nothing is
downloaded) warped by a seeded random elastic + affine deformation, with an MR-like bias field and
Rician noise. Grey/white-matter labels come from the template's tissue probability maps, warped with
the same deformation, so image and label stay consistent.

Output (``--output-dir``, default ``<repo>/sample-datasets``):

    brain-mri/brain_000.nii.gz ...                 images: a MONAI Label LocalDatastore
    brain-mri/labels/final/brain_000.nii.gz ...    labels for the first ``--labelled`` images only
    brain-mri-groundtruth/brain_000.nii.gz ...     labels for all images (evaluation / oracle)
    brain-mri-groundtruth/labels.json              {"white matter": 1, "grey matter": 2}
    brain-mri-groundtruth/manifest.json            written last: its presence means "complete"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# torch/monai/nilearn/nibabel are imported inside the functions that need them: importing MONAI
# alone takes seconds, and `setup.sh` calls this script with --skip-existing on every run.

GENERATOR_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
DATASTORE_DIR = "brain-mri"
GROUNDTRUTH_DIR = "brain-mri-groundtruth"
LABELS = {"white matter": 1, "grey matter": 2}

MAX_INTENSITY = 900.0  # template max (1.0) -> 900: white matter ~780, grey ~590, CSF ~240
CROP_MARGIN_MM = 16.0  # background kept around the brain; covers the rotation/scale/warp below
ELASTIC_SIGMA_MM = (9.0, 13.0)  # smoothness of the random displacement field
ELASTIC_RMS_MM = (1.0, 2.5)  # per-axis RMS displacement in mm; larger values start to fold the field
ROTATE_DEG = 4.0
SCALE_FRACTION = 0.05
BIAS_COEFF = 0.15  # Legendre coefficients in [-c, c]: gain varies ~15-30 % over the brain
NOISE_STD_MAX = 30.0  # Rician sigma drawn from [0, 30]: white-matter SNR >= ~25


def case_id(index: int) -> str:
    return f"brain_{index:03d}"


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
    data = {
        k: MetaTensor(torch.from_numpy(v.get_fdata(dtype=np.float32))[None], affine=torch.as_tensor(v.affine))
        for k, v in imgs.items()
    }
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


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write via a hidden temporary name + rename, so a killed run never leaves a truncated volume."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def expected_files(output_dir: Path, count: int, labelled: int) -> list[Path]:
    ds, gt = output_dir / DATASTORE_DIR, output_dir / GROUNDTRUTH_DIR
    files = [gt / "labels.json"]
    for i in range(count):
        files += [ds / f"{case_id(i)}.nii.gz", gt / f"{case_id(i)}.nii.gz"]
        if i < labelled:
            files.append(ds / "labels" / "final" / f"{case_id(i)}.nii.gz")
    return files


def existing_manifest(output_dir: Path, params: dict) -> dict | None:
    """The manifest of a complete previous run with the same parameters, else None."""
    try:
        manifest = json.loads((output_dir / GROUNDTRUTH_DIR / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in params.items()):
        return None
    # Extra files (e.g. labels saved later through MONAI Label) are fine; missing ones are not.
    if not all(p.is_file() for p in expected_files(output_dir, params["count"], params["labelled"])):
        return None
    return manifest


def clear_dir(path: Path) -> None:
    """Empty `path` (dotfiles such as .datastore.json included), creating it if needed."""
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_args(count: int, labelled: int, spacing: float) -> str | None:
    if count < 1:
        return f"--count must be >= 1 (got {count})"
    if not 0 <= labelled <= count:
        return f"--labelled must be between 0 and --count (got {labelled})"
    if not spacing > 0:
        return f"--spacing must be > 0 (got {spacing})"
    return None


def generate(
    output_dir: str | os.PathLike = REPO_ROOT / "sample-datasets",
    seed: int = 0,
    count: int = 8,
    labelled: int = 2,
    spacing: float = 1.5,
    skip_existing: bool = False,
) -> dict:
    """Generate the datastore + ground truth under `output_dir`; returns the manifest."""
    error = check_args(count, labelled, spacing)
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
    if skip_existing:
        manifest = existing_manifest(output_dir, params)
        if manifest is not None:
            print(f"[sample-data] {output_dir / DATASTORE_DIR} is complete (seed {seed}, {count} volumes); skipping")
            return manifest

    start = time.perf_counter()
    import monai
    import nilearn
    from tqdm import tqdm

    ds_dir, gt_dir = output_dir / DATASTORE_DIR, output_dir / GROUNDTRUTH_DIR
    # Drop the manifest first so an interrupted run never looks complete; then start clean, since
    # stale volumes, labels or a stale .datastore.json would not match the new images.
    (gt_dir / "manifest.json").unlink(missing_ok=True)
    clear_dir(ds_dir)
    clear_dir(gt_dir)
    (ds_dir / "labels" / "final").mkdir(parents=True)

    template = load_template(spacing)
    affine = template["image"].affine.numpy().astype(np.float64)
    transform = make_subject_transform(spacing)

    volumes = []
    for i in tqdm(range(count), desc="brain-mri", unit="vol"):
        sseed = subject_seed(seed, i)
        image, label = deform_subject(template, transform, sseed)
        name = f"{case_id(i)}.nii.gz"
        write_nifti(image, affine, ds_dir / name)
        write_nifti(label, affine, gt_dir / name)
        if i < labelled:
            write_nifti(label, affine, ds_dir / "labels" / "final" / name)
        volumes.append(
            {
                "id": case_id(i),
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
        "source": "MNI ICBM152 2009a nonlinear symmetric T1 + GM/WM probability maps "
        f"(bundled with nilearn {nilearn.__version__})",
        "monai_version": monai.__version__,
        "volumes": volumes,
    }
    write_json(manifest, gt_dir / "manifest.json")  # last: marks the output complete
    print(
        f"[sample-data] wrote {count} volumes of shape {manifest['shape']} to {ds_dir} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "sample-datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=8, help="number of volumes")
    parser.add_argument("--labelled", type=int, default=2, help="volumes whose label is put in the datastore")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm")
    parser.add_argument(
        "--skip-existing", action="store_true", help="do nothing if a complete run with these parameters exists"
    )
    args = parser.parse_args(argv)
    error = check_args(args.count, args.labelled, args.spacing)
    if error:
        parser.error(error)
    generate(args.output_dir, args.seed, args.count, args.labelled, args.spacing, args.skip_existing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
