"""Simulated active learning: does picking volumes with a strategy beat picking them at random?

    .venv/bin/python scripts/simulate_active_learning.py                  # defaults: 5 strategies x 3 seeds x 3 rounds
    .venv/bin/python scripts/simulate_active_learning.py --strategies random,uncertainty --seeds 0 --rounds 2 --epochs 2

The ground truth beside the sample datastore (sample-datasets/brain-mri-groundtruth) plays the annotator. For every
strategy and seed, a private copy of the app and of the datastore starts from --initial labelled volumes (the same
ones for every strategy with the same seed) and is trained; each round the strategy picks the next volume through
the app's own next_sample, the oracle labels it, training resumes from the published adapter, and the held-out
volumes (removed from the datastore copy, so no strategy can pick them) are segmented through the app's infer to
measure Dice. Writes a CSV of every round and a learning-curve PNG to --out-dir and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "samfewshot")
SAMPLES = os.path.join(REPO, "sample-datasets")
sys.path.insert(0, APP)
# Set before monailabel is imported: its settings are read once, at import.
os.environ["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
os.environ["MONAI_LABEL_TRACKING_ENABLED"] = "false"

# The scoring methods each strategy reads (lib/activelearning/strategies.py); a strategy without its scores
# silently falls back to random, so they are computed before every pick.
SCORES_NEEDED = {
    "random": (),
    "first": (),
    "uncertainty": ("uncertainty",),
    "diversity": ("embedding",),
    "hybrid": ("uncertainty", "embedding"),
}
LABEL_INFO = {"label_info": [{"name": "white matter", "idx": 1}, {"name": "grey matter", "idx": 2}]}
COLUMNS = ["strategy", "seed", "round", "labelled_volumes", "picked", "dice_wm", "dice_gm", "dice_mean", "train_seconds"]


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def held_out_dice(app, model: str, images: list[str], truth_dir: str, device: str) -> tuple[float, float]:
    """Mean (WM, GM) Dice over the held-out volumes. app.infer takes an existing file path as the image, so
    volumes outside the datastore go through the same infer path as any client request."""
    import nibabel as nib

    scores = []
    for path in images:
        result = app.infer({"model": model, "image": path, "device": device})
        pred = np.asarray(nib.load(result["file"]).dataobj)
        os.remove(result["file"])
        truth = np.asarray(nib.load(os.path.join(truth_dir, os.path.basename(path))).dataobj)
        scores.append([dice(pred, truth, 1), dice(pred, truth, 2)])
    wm, gm = np.mean(scores, axis=0)
    return float(wm), float(gm)


def simulate_run(strategy: str, seed: int, pool: list[str], args, progress) -> list[dict]:
    """One strategy and seed on a private app and datastore copy; one row per round."""
    import torch

    from main import SamFewShotApp

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    truth_dir = os.path.join(SAMPLES, "brain-mri-groundtruth")
    held_out = [os.path.join(SAMPLES, "brain-mri", f"{i}.nii.gz") for i in args.held_out]
    # Seeded independently of the strategy, so every strategy of a seed starts from the same labelled volumes.
    initial = sorted(random.Random(seed).sample(pool, args.initial))

    work = tempfile.mkdtemp(prefix="samfewshot-al-")
    try:
        app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
        os.makedirs(studies)
        for image_id in pool:  # only the pool: no held-out image and no pre-existing final label
            shutil.copy(os.path.join(SAMPLES, "brain-mri", f"{image_id}.nii.gz"), studies)
        conf = {
            "models": args.model,
            "backbone": "tiny",
            "engine": "torch",
            "device": args.device,
            "handout_timeout": "0",
            "auto_scoring": "false",
        }
        app = SamFewShotApp(app_dir, studies, conf)
        datastore = app.datastore()
        for image_id in initial:
            datastore.save_label(image_id, os.path.join(truth_dir, f"{image_id}.nii.gz"), "final", dict(LABEL_INFO))

        rows, picked = [], ",".join(initial)
        for round_ in range(args.rounds + 1):
            if round_:
                for method in SCORES_NEEDED[strategy]:
                    app.scoring({"method": method, "model": args.model})
                # A fresh seed per round: RandomChoice seeds its own generator from the request.
                picked = app.next_sample({"strategy": strategy, "model": args.model, "seed": seed * 1000 + round_})["id"]
                datastore.save_label(picked, os.path.join(truth_dir, f"{picked}.nii.gz"), "final", dict(LABEL_INFO))
            start = time.perf_counter()
            # val_split 0: every oracle label trains (from 5 volumes on, the trainer would otherwise keep one back
            # for validation); the held-out volumes are the evaluation.
            request = {"model": args.model, "max_epochs": args.epochs, "lr": args.lr, "val_split": 0, "device": args.device}
            app.train(request)
            train_seconds = time.perf_counter() - start
            wm, gm = held_out_dice(app, args.model, held_out, truth_dir, args.device)
            rows.append(
                {
                    "strategy": strategy,
                    "seed": seed,
                    "round": round_,
                    "labelled_volumes": len(datastore.get_labeled_images("final")),
                    "picked": picked,
                    "dice_wm": round(wm, 4),
                    "dice_gm": round(gm, 4),
                    "dice_mean": round((wm + gm) / 2, 4),
                    "train_seconds": round(train_seconds, 2),
                }
            )
            progress.set_postfix(strategy=strategy, seed=seed, dice=f"{(wm + gm) / 2:.3f}")
            progress.update()
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def curves(rows: list[dict], strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """x (labelled volumes) and a (seeds, rounds) array of mean Dice for one strategy."""
    seeds = sorted({r["seed"] for r in rows if r["strategy"] == strategy})
    per_seed = [sorted((r for r in rows if r["strategy"] == strategy and r["seed"] == s), key=lambda r: r["round"]) for s in seeds]
    x = np.array([r["labelled_volumes"] for r in per_seed[0]])
    return x, np.array([[r["dice_mean"] for r in run] for run in per_seed])


def normalised_auc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoid area under each curve divided by the x span: the mean Dice over the labelling budget."""
    return ((y[..., 1:] + y[..., :-1]) / 2 * np.diff(x)).sum(-1) / (x[-1] - x[0])


def summarise(rows: list[dict], strategies: list[str]) -> tuple[list[str], list[str]]:
    """Summary table lines and plain-language verdicts against random (paired by seed)."""
    stats = {}
    for s in strategies:
        x, y = curves(rows, s)
        stats[s] = {"final": y[:, -1], "auc": normalised_auc(x, y) if len(x) > 1 else y[:, -1]}
    table = [f"{'strategy':12s} {'final Dice (mean ± std)':>24s} {'AUC (mean ± std)':>20s}  seeds"]
    for s in strategies:
        f, a = stats[s]["final"], stats[s]["auc"]
        table.append(f"{s:12s} {f.mean():>15.3f} ± {f.std():.3f} {a.mean():>11.3f} ± {a.std():.3f}  {len(f)}")
    if "random" not in stats:
        return table, ["random was not simulated, so nothing is compared against it"]
    verdicts = []
    for s in strategies:
        if s == "random":
            continue
        parts = []
        for key, name in (("final", "final Dice"), ("auc", "AUC")):
            diff = stats[s][key] - stats["random"][key]  # same seed = same initial volumes: a paired difference
            spread = max(stats[s][key].std(), stats["random"][key].std())
            outcome = "better" if diff.mean() > 0 else "worse"
            within = abs(diff.mean()) <= spread
            parts.append(
                f"{name} {diff.mean():+.3f} ({outcome} in {int((diff > 0).sum())}/{len(diff)} seeds"
                f"{', within the seed spread ±' + format(spread, '.3f') if within else ''})"
            )
        beat = all(
            stats[s][k].mean() - stats["random"][k].mean() > max(stats[s][k].std(), stats["random"][k].std()) for k in ("final", "auc")
        )
        verdicts.append(f"{s} vs random: {'; '.join(parts)} -> {'beats random' if beat else 'does not clearly beat random'}")
    return table, verdicts


def plot(rows: list[dict], strategies: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in strategies:
        x, y = curves(rows, s)
        (line,) = ax.plot(x, y.mean(0), marker="o", label=s)
        ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("held-out mean Dice (WM, GM)")
    ax.set_xticks(sorted({r["labelled_volumes"] for r in rows}))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="mean over seeds, band min–max", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_sam")
    parser.add_argument("--strategies", default="random,first,uncertainty,diversity,hybrid", help="comma-separated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--held-out", nargs="+", default=["brain_006", "brain_007"], help="image ids used only for Dice")
    parser.add_argument("--pool", nargs="+", default=None, help="image ids a strategy may pick (default: all but held-out)")
    parser.add_argument("--initial", type=int, default=1, help="labelled volumes before round 1")
    parser.add_argument("--rounds", type=int, default=3, help="volumes picked by the strategy, one per round")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of each incremental training run")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "docs", "al_simulation"))
    args = parser.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in SCORES_NEEDED]
    if unknown or not strategies:
        parser.error(f"unknown strategies {unknown}; valid: {', '.join(SCORES_NEEDED)}")
    images = sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(SAMPLES, "brain-mri")) if f.endswith(".nii.gz"))
    pool = sorted(args.pool) if args.pool else [i for i in images if i not in args.held_out]
    missing = [i for i in args.held_out + pool if i not in images]
    if missing:
        parser.error(f"images {missing} not in sample-datasets/brain-mri (run scripts/prepare_sample_data.py)")
    if set(pool) & set(args.held_out):
        parser.error(f"--pool and --held-out overlap: {sorted(set(pool) & set(args.held_out))}")
    if args.initial < 1 or args.initial + args.rounds > len(pool):
        parser.error(f"--initial {args.initial} + --rounds {args.rounds} must be between 1 and the pool size {len(pool)}")

    from tqdm import tqdm

    os.makedirs(args.out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(args.out_dir, "al_simulation.csv"), os.path.join(args.out_dir, "learning_curve.png")
    rows = []
    started = time.perf_counter()
    # The trainer logs every iteration at INFO, which would bury the progress bar; warnings still show.
    logging.disable(logging.INFO)
    try:
        # Rows are written as each run ends, so an interrupted simulation keeps the runs it finished.
        with (
            open(csv_path, "w", newline="") as f,
            tqdm(total=len(strategies) * len(args.seeds) * (args.rounds + 1), desc="AL simulation", unit="round") as progress,
        ):
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for strategy in strategies:
                for seed in args.seeds:
                    run = simulate_run(strategy, seed, pool, args, progress)
                    writer.writerows(run)
                    f.flush()
                    rows += run
    finally:
        logging.disable(logging.NOTSET)
    elapsed = time.perf_counter() - started

    title = f"{args.model} tiny, {args.epochs} epochs/round, held out {', '.join(args.held_out)}, seeds {' '.join(map(str, args.seeds))}"
    plot(rows, strategies, png_path, title)

    table, verdicts = summarise(rows, strategies)
    print(
        f"\nHeld-out mean Dice after {args.initial + args.rounds} labelled volumes (final) and normalised AUC "
        f"over {args.initial}..{args.initial + args.rounds} volumes; {len(args.seeds)} seed(s), {elapsed / 60:.1f} min"
    )
    print("\n".join(table))
    print("\n".join(verdicts))
    print(f"CSV: {csv_path}\nPNG: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
