"""Held-out Dice of HF-SAM after few-shot training: backbones, labelled volumes and recipes side by side, several seeds.

    .venv/bin/python scripts/compare_training.py --backbones tiny              # 50 epochs, seeds 0 1 2, both recipes
    .venv/bin/python scripts/compare_training.py --backbones litemedsam,tiny --labelled 1 2 --recipes fewshot
    .venv/bin/python scripts/compare_training.py --epochs 2 --seeds 0 --recipes fewshot

For every backbone, number of labelled volumes (--labelled: the first N of the sample's labelled volumes, brain_000
and brain_001, keep their final label), recipe (``--conf recipe``) and seed, a private copy of the app and of the
sample brain-MRI datastore trains from the same start for --epochs with the recipe's own learning rate and the app's
trainer as served (half of the slices with simulated clicks); the held-out volumes (--held-out, ground truth in
sample-datasets/brain-mri-groundtruth) are then segmented through the app's infer. --hf-tap moves HF-SAM's tap to
another of the backbone's tap-able blocks (the alternative docs/models.md rejects). Writes results.csv and a
Markdown table (mean and standard deviation over the seeds) to --out-dir and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from simulate_active_learning import APP, REPO, held_out_dice

SAMPLES = os.path.join(REPO, "sample-datasets")

COLUMNS = [
    "backbone",
    "labelled",
    "recipe",
    "seed",
    "epochs",
    "train_precision",
    "dice_wm",
    "dice_gm",
    "dice_mean",
    "train_seconds",
    "adapter_tensors",
    "adapter_values",
]


def run(backbone: str, labelled: int, recipe: str, seed: int, args, work: str) -> dict:
    import torch

    from lib.adapters import read_adapter
    from lib.compute import resolve_precision
    from main import SamFewShotApp

    torch.manual_seed(seed)
    np.random.seed(seed)
    app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    shutil.copytree(os.path.join(SAMPLES, "brain-mri"), studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    final = os.path.join(studies, "labels", "final")
    for name in sorted(os.listdir(final))[labelled:]:
        os.remove(os.path.join(final, name))
    conf = {
        "models": "hf_sam",
        "backbone": backbone,
        "engine": "torch",
        "device": "cpu",
        "auto_scoring": "false",
        "recipe": recipe,
        "train_precision": args.train_precision,
    }
    app = SamFewShotApp(app_dir, studies, conf)
    start = time.perf_counter()
    app.train({"model": "hf_sam", "max_epochs": args.epochs, "val_split": 0, "device": "cpu"})
    seconds = time.perf_counter() - start
    images = [os.path.join(SAMPLES, "brain-mri", f"{name}.nii.gz") for name in args.held_out]
    labels = app.models["hf_sam"].model.labels
    scores = held_out_dice(app, "hf_sam", images, os.path.join(SAMPLES, "brain-mri-groundtruth"), labels, "cpu")
    wm, gm = scores["white matter"], scores["grey matter"]
    state = read_adapter(os.path.join(app_dir, "model", "hf_sam.pt"))["state_dict"]
    return {
        "backbone": backbone,
        "labelled": labelled,
        "recipe": recipe,
        "seed": seed,
        "epochs": args.epochs,
        "train_precision": resolve_precision(args.train_precision, "cpu", "train_precision"),
        "dice_wm": round(wm, 4),
        "dice_gm": round(gm, 4),
        "dice_mean": round((wm + gm) / 2, 4),
        "train_seconds": round(seconds, 1),
        "adapter_tensors": len(state),
        "adapter_values": sum(v.numel() for v in state.values()),
    }


def summary(values: list[float]) -> str:
    """Mean, with the standard deviation over the seeds when there are several."""
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def table(rows: list[dict]) -> str:
    lines = [
        "| backbone | labelled volumes | recipe | train precision | seeds | WM Dice | GM Dice | mean Dice | train s | adapter values |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["backbone"], r["labelled"], r["recipe"]) for r in rows):
        group = [r for r in rows if (r["backbone"], r["labelled"], r["recipe"]) == key]
        dice = " | ".join(summary([r[c] for r in group]) for c in ("dice_wm", "dice_gm", "dice_mean"))
        seconds = statistics.mean(r["train_seconds"] for r in group)
        cells = [*key, group[0]["train_precision"], len(group), dice, f"{seconds:.0f}", f"{group[0]['adapter_values']:,}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def move_hf_tap(backbone: str, tap: int) -> None:
    """Serve HF-SAM with its low-level feature from tap-able block ``tap`` of ``backbone`` (this process only)."""
    import dataclasses

    from lib.networks import sam_backbone

    spec = sam_backbone.SAM_ENCODERS[backbone]
    if not 0 <= tap < spec.depth:
        raise SystemExit(f"--hf-tap {tap}: {backbone} has tap-able blocks 0..{spec.depth - 1}")
    sam_backbone.SAM_ENCODERS[backbone] = dataclasses.replace(spec, hf_tap=tap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fewshot,paper")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--backbones", default="tiny", help="comma-separated")
    parser.add_argument("--labelled", type=int, nargs="+", default=[2], help="labelled volumes to train on (1 or 2)")
    parser.add_argument("--train-precision", default="auto", help="--conf train_precision: auto (as served), fp32, bf16")
    parser.add_argument("--hf-tap", type=int, help="HF-SAM's tap-able block (default: the backbone's hf_tap)")
    parser.add_argument("--held-out", nargs="+", default=["brain_005", "brain_006", "brain_007"])
    parser.add_argument("--out-dir", default="compare_training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    backbones = args.backbones.split(",")
    if args.hf_tap is not None:
        for backbone in backbones:
            move_hf_tap(backbone, args.hf_tap)
    runs = [(b, n, r) for b in backbones for n in args.labelled for r in args.recipes.split(",")]
    for seed in args.seeds:
        for backbone, labelled, recipe in runs:
            with tempfile.TemporaryDirectory(prefix="compare-") as work:
                rows.append(run(backbone, labelled, recipe, seed, args, work))
            print(rows[-1], flush=True)
            with open(os.path.join(args.out_dir, "results.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
    text = table(rows)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
