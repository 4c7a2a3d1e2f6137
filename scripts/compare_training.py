"""Held-out Dice of HF-SAM under both training recipes, over several seeds, side by side.

    .venv/bin/python scripts/compare_training.py                               # tiny, 50 epochs, seeds 0 1 2
    .venv/bin/python scripts/compare_training.py --epochs 2 --seeds 0 --recipes fewshot

For every recipe (``--conf recipe``) and seed, a private copy of the app and of the
sample brain-MRI datastore (its labelled volumes, brain_000 and brain_001) trains from the same start for --epochs
with the recipe's own learning rate and the app's trainer as served (half of the slices with simulated clicks);
the held-out volumes (--held-out, ground truth in sample-datasets/brain-mri-groundtruth) are then segmented through
the app's infer. Writes results.csv and a Markdown table (mean and standard deviation over the seeds) to --out-dir
and prints the table.
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
from simulate_active_learning import APP, SAMPLES, held_out_dice

COLUMNS = ["recipe", "seed", "epochs", "dice_wm", "dice_gm", "dice_mean", "train_seconds", "adapter_tensors", "adapter_values"]


def run(recipe: str, seed: int, args, work: str) -> dict:
    import torch

    from lib.adapters import read_adapter
    from main import SamFewShotApp

    torch.manual_seed(seed)
    np.random.seed(seed)
    app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    shutil.copytree(os.path.join(SAMPLES, "brain-mri"), studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    conf = {
        "models": "hf_sam",
        "backbone": args.backbone,
        "engine": "torch",
        "device": "cpu",
        "auto_scoring": "false",
        "recipe": recipe,
    }
    app = SamFewShotApp(app_dir, studies, conf)
    start = time.perf_counter()
    app.train({"model": "hf_sam", "max_epochs": args.epochs, "val_split": 0, "device": "cpu"})
    seconds = time.perf_counter() - start
    images = [os.path.join(SAMPLES, "brain-mri", f"{name}.nii.gz") for name in args.held_out]
    wm, gm = held_out_dice(app, "hf_sam", images, os.path.join(SAMPLES, "brain-mri-groundtruth"), "cpu")
    state = read_adapter(os.path.join(app_dir, "model", "hf_sam.pt"))["state_dict"]
    return {
        "recipe": recipe,
        "seed": seed,
        "epochs": args.epochs,
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
    lines = ["| recipe | seeds | WM Dice | GM Dice | mean Dice | train s | adapter values |", "|---|---|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        group = [r for r in rows if r["recipe"] == recipe]
        dice = " | ".join(summary([r[c] for r in group]) for c in ("dice_wm", "dice_gm", "dice_mean"))
        seconds = statistics.mean(r["train_seconds"] for r in group)
        lines.append(f"| {recipe} | {len(group)} | {dice} | {seconds:.0f} | {group[0]['adapter_values']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fewshot,paper")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--held-out", nargs="+", default=["brain_005", "brain_006", "brain_007"])
    parser.add_argument("--out-dir", default="compare_training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for recipe in args.recipes.split(","):
            with tempfile.TemporaryDirectory(prefix="compare-") as work:
                rows.append(run(recipe, seed, args, work))
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
