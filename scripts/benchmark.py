"""Measure what an annotator waits for: volume inference, an incremental update, the adapter on disk.

    .venv/bin/python scripts/benchmark.py --backbone tiny
    .venv/bin/python scripts/benchmark.py --backbone vit_b --slices 100 --skip-update
    .venv/bin/python scripts/benchmark.py --model fgnet --backbone tiny --slices 32

Runs the app's own code paths (infer task, trainer) on a copy of the sample datastore (brain MRI; EM for fgnet),
with random weights in the official layout when no SAM/SAM2 checkpoint is given (speed does not depend on them).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "samfewshot")
sys.path.insert(0, APP)
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_volume(path: str, reference: str, slices: int) -> None:
    """The reference volume cropped or tiled along the axial axis to ``slices`` slices."""
    import nibabel as nib
    import numpy as np

    ref = nib.load(reference)
    data = np.asarray(ref.dataobj)
    reps = -(-slices // data.shape[2])
    nib.save(nib.Nifti1Image(np.concatenate([data] * reps, axis=2)[..., :slices], ref.affine), path)


def random_official_checkpoint(backbone: str, directory: str) -> str:
    """segment_anything's own architecture with random weights, saved like an official file (speed only)."""
    import torch
    from segment_anything import sam_model_registry

    path = os.path.join(directory, f"random_sam_{backbone}.pth")
    torch.save(sam_model_registry[backbone]().state_dict(), path)
    return path


def random_official_sam2_checkpoint(variant: str, directory: str) -> str:
    """sam2's own SAM 2.1 model with random weights, saved like an official file (speed only)."""
    import torch
    from sam2.build_sam import build_sam2

    config = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}[variant]
    path = os.path.join(directory, f"random_sam2_{variant}.pt")
    model = build_sam2(f"configs/sam2.1/sam2.1_hiera_{config}.yaml", None, device="cpu", apply_postprocessing=False)
    torch.save({"model": model.state_dict()}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--model", default="hf_sam")
    parser.add_argument("--slices", type=int, default=100, help="axial slices of the benchmark volume")
    parser.add_argument("--sam-checkpoint", default=None, help="official SAM file; default: random weights in its layout")
    parser.add_argument("--sam2-variant", default="hiera_t", help="fgnet's SAM2 encoder when the backbone is not tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="warm inference repeats")
    parser.add_argument("--update-epochs", type=int, default=5)
    parser.add_argument("--skip-update", action="store_true", help="do not measure the incremental update")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    import torch
    from main import SamFewShotApp

    work = tempfile.mkdtemp(prefix="samfewshot-bench-")
    try:
        app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
        em = args.model == "fgnet"
        dataset, reference = ("em-neurons", "em_003") if em else ("brain-mri", "brain_003")
        shutil.copytree(os.path.join(REPO, "sample-datasets", dataset), studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
        synthetic_volume(os.path.join(studies, "bench.nii.gz"), os.path.join(studies, f"{reference}.nii.gz"), args.slices)

        conf = {"models": args.model, "backbone": args.backbone, "device": args.device, "auto_scoring": "false"}
        if args.backbone != "tiny" and em:
            conf["sam2_variant"] = args.sam2_variant
            conf["sam2_checkpoint"] = random_official_sam2_checkpoint(args.sam2_variant, work)
        elif args.backbone != "tiny":
            conf["sam_checkpoint"] = args.sam_checkpoint or random_official_checkpoint(args.backbone, work)
        app = SamFewShotApp(app_dir, studies, conf)
        request = {"model": args.model, "image": "bench", "device": args.device}
        results: dict = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "config": vars(args),
        }

        start = time.perf_counter()
        app.infer(request)
        results["infer_cold_s"] = time.perf_counter() - start
        warm = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = app.infer(request)
            warm.append(time.perf_counter() - start)
        results["infer_warm_s"] = min(warm)
        results["infer_warm_slices_per_s"] = args.slices / min(warm)
        results["infer_latencies"] = out["params"]["latencies"]

        if not args.skip_update:
            start = time.perf_counter()
            app.train({"model": args.model, "max_epochs": args.update_epochs, "device": args.device})
            results["update_s"] = time.perf_counter() - start
            results["update_epochs"] = args.update_epochs
            start = time.perf_counter()
            out = app.infer(request)
            results["infer_after_update_s"] = time.perf_counter() - start
            results["adapter_version_served"] = out["params"]["adapter_version"]
            adapter = os.path.join(app_dir, "model", f"{args.model}.pt")
            results["adapter_bytes"] = os.path.getsize(adapter)
        network, _ = app.models[args.model].model.resident(args.device)
        results["trainable_parameters"] = sum(p.numel() for p in network.parameters() if p.requires_grad)
        results["all_parameters"] = sum(p.numel() for p in network.parameters())
        results["peak_rss_mb"] = peak_rss_mb()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'measure':32s} value")
    for key, value in results.items():
        if isinstance(value, (int, float)):
            print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
