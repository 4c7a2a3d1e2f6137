"""Simulated active learning: does picking volumes with a strategy save labelled volumes against random picks?

    .venv/bin/python scripts/prepare_sample_data.py --dataset cohort      # the varied pool (once)
    .venv/bin/python scripts/simulate_active_learning.py                  # defaults: 5 seeds, the strategies below
    .venv/bin/python scripts/simulate_active_learning.py --strategies random,hybrid --seeds 0 --budget 1 --epochs 1

The ground truth beside the datastore (``--truth``) plays the annotator. For every strategy and seed a private copy of
the app and of the pool starts from ``--initial`` labelled volumes (the same ones for every strategy with the same
seed) and is trained; each round the strategy picks the next volume through the app's own next_sample (after the
scoring it reads), the oracle labels it, training resumes from the published adapter, and the held-out volumes
(never in the datastore copy) are segmented through the app's infer to measure Dice per label.

Two random baselines: ``random`` (the app's strategy) and ``random-fg``, nnActive's improved random (arXiv
2511.19183) at the volume level: a third of the picks are drawn among the pool volumes whose ground truth holds the
rarest label (an oracle no server has; every volume holds the other labels). A strategy is compared with the better
of the two by area under the budget curve (mean Dice over the budget) and by the labelled volumes it needs to reach
the baseline's final Dice, each as a paired difference over seeds with a 95 % bootstrap interval. Writes the rounds
(CSV), the curves (PNG) and the summary (JSON) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
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
COHORT = os.path.join(REPO, "sample-datasets", "brain-mri-cohort")
sys.path.insert(0, APP)
# Set before monailabel is imported: its settings are read once, at import.
os.environ["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
os.environ["MONAI_LABEL_TRACKING_ENABLED"] = "false"

# The scoring methods each strategy reads (lib/activelearning/strategies.py); they are refreshed before every pick.
SCORES_NEEDED = {
    "random": (),
    "random-fg": (),
    "first": (),
    "uncertainty": ("uncertainty",),
    "diversity": ("embedding",),
    "typicality": ("embedding",),
    "clasp_pe": ("uncertainty", "embedding"),
    "hybrid": ("uncertainty", "embedding"),
}
BASELINES = ("random", "random-fg")
DEFAULT_STRATEGIES = "random,random-fg,typicality,clasp_pe,hybrid"
FG_SHARE = 1 / 3  # random-fg: share of picks among volumes holding the rarest label (nnActive's "33 % FG")


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """Dice of each label present in the truth or the prediction (a label absent from both is left out)."""
    out = {}
    for name, idx in labels.items():
        p, t = pred == idx, truth == idx
        total = p.sum() + t.sum()
        if total:
            out[name] = float(2.0 * np.logical_and(p, t).sum() / total)
    return out


def held_out_dice(app, model: str, images: list[str], truth_dir: str, labels: dict[str, int], device: str) -> dict[str, float]:
    """Per label, the mean Dice over the held-out volumes where it is present. app.infer takes an existing file path
    as the image, so volumes outside the datastore go through the same infer path as any client request."""
    import nibabel as nib

    scores: dict[str, list[float]] = {name: [] for name in labels}
    for path in images:
        result = app.infer({"model": model, "image": path, "device": device})
        pred = np.asarray(nib.load(result["file"]).dataobj)
        os.remove(result["file"])
        truth = np.asarray(nib.load(os.path.join(truth_dir, os.path.basename(path))).dataobj)
        for name, value in dice_per_label(pred, truth, labels).items():
            scores[name].append(value)
    return {name: float(np.mean(v)) if v else float("nan") for name, v in scores.items()}


def rarest_label_volumes(pool: list[str], truth_dir: str, labels: dict[str, int]) -> list[str]:
    """The pool volumes whose ground truth holds the label present in the fewest pool volumes."""
    import nibabel as nib

    present = {i: set(np.unique(np.asarray(nib.load(os.path.join(truth_dir, f"{i}.nii.gz")).dataobj)).tolist()) for i in pool}
    counts = {idx: sum(idx in p for p in present.values()) for idx in labels.values()}
    rarest = min((c, idx) for idx, c in counts.items() if c)[1]
    return [i for i in pool if rarest in present[i]]


def pick(app, strategy: str, seed: int, round_: int, datastore, rare: list[str], args) -> str:
    """The next volume: the app's strategy, or random-fg's oracle draw among the unlabelled pool."""
    rng = random.Random(seed * 1000 + round_)
    if strategy == "random-fg":
        unlabelled = sorted(datastore.get_unlabeled_images())
        rare_left = [i for i in unlabelled if i in rare]
        return rng.choice(rare_left if rare_left and rng.random() < FG_SHARE else unlabelled)
    for method in SCORES_NEEDED[strategy]:
        app.scoring({"method": method, "model": args.model})
    # A fresh seed per round: the strategies seed their own generators from the request.
    return app.next_sample({"strategy": strategy, "model": args.model, "seed": seed * 1000 + round_})["id"]


def set_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name the data, the model and the device (shared with scripts/forgetting_curve.py)."""
    parser.add_argument("--images", default=COHORT, help="folder of the pool and held-out images (NIfTI)")
    parser.add_argument("--truth", default=None, help="their ground-truth labels (default: <images>-groundtruth)")
    parser.add_argument("--labels", default=None, help='label set as JSON {"name": id} (default: <truth>/labels.json)')
    parser.add_argument("--held-out", nargs="+", default=None, help="image ids used only for Dice (default: every 4th image)")
    parser.add_argument("--model", default="hf_sam")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")


def resolve_data(parser: argparse.ArgumentParser, args) -> tuple[dict[str, int], list[str], list[str]]:
    """(label set, pool, held-out ids) from the data options; a missing folder, label set or file is a usage error."""
    args.truth = args.truth or args.images.rstrip("/") + "-groundtruth"
    if not os.path.isdir(args.images) or not os.path.isdir(args.truth):
        parser.error(f"{args.images} or {args.truth} is missing (scripts/prepare_sample_data.py --dataset cohort builds them)")
    try:
        labels = json.loads(args.labels) if args.labels else json.load(open(os.path.join(args.truth, "labels.json")))
    except (OSError, ValueError) as e:
        parser.error(f"no label set: {e}")
    images = sorted(f[: -len(".nii.gz")] for f in os.listdir(args.images) if f.endswith(".nii.gz"))
    held_out = args.held_out if args.held_out is not None else images[::4]
    pool = [i for i in images if i not in held_out]
    missing = [i for i in held_out if i not in images] + [i for i in pool if not os.path.exists(os.path.join(args.truth, f"{i}.nii.gz"))]
    if missing:
        parser.error(f"{missing}: no image in --images or no label in --truth")
    return labels, pool, held_out


def private_app(args, labels: dict[str, int], pool: list[str], work: str, **conf):
    """The app on a copy of itself and of the pool images (nothing labelled) under ``work``, with ``conf`` added."""
    from main import SamFewShotApp

    app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    os.makedirs(studies)
    for image_id in pool:
        shutil.copy(os.path.join(args.images, f"{image_id}.nii.gz"), studies)
    base = {"models": args.model, "backbone": args.backbone, "labels": json.dumps(labels), "engine": "torch", "device": args.device}
    return SamFewShotApp(app_dir, studies, {**base, "auto_scoring": "false", **conf})


def simulate_run(strategy: str, seed: int, pool: list[str], held_out: list[str], labels: dict[str, int], args, progress) -> list[dict]:
    """One strategy and seed on a private app and datastore copy; one row per round."""
    from lib import monailabel_compat

    set_seeds(seed)
    # Seeded independently of the strategy, so every strategy of a seed starts from the same labelled volumes.
    initial = sorted(random.Random(seed).sample(pool, args.initial))
    rare = rarest_label_volumes(pool, args.truth, labels)
    label_info = {"label_info": [{"name": name, "idx": idx} for name, idx in labels.items()]}

    work = tempfile.mkdtemp(prefix="samfewshot-al-")
    try:
        app = private_app(args, labels, pool, work, handout_timeout="0")  # only the pool: no held-out image
        for method in monailabel_compat.scoring_methods(app).values():
            method.max_slices = args.score_slices
            if hasattr(method, "mc_samples"):
                method.mc_samples = 1
        datastore = app.datastore()
        for image_id in initial:
            datastore.save_label(image_id, os.path.join(args.truth, f"{image_id}.nii.gz"), "final", dict(label_info))

        rows, picked = [], ",".join(initial)
        for round_ in range(args.budget + 1):
            if round_:
                picked = pick(app, strategy, seed, round_, datastore, rare, args)
                datastore.save_label(picked, os.path.join(args.truth, f"{picked}.nii.gz"), "final", dict(label_info))
            # Reseeded per round: the first run of a process consumes the generators differently (one-time set-up),
            # and a paired comparison needs every strategy of a seed to train alike on the same volumes.
            set_seeds(seed * 1000 + round_)
            start = time.perf_counter()
            # val_split 0: every oracle label trains; the held-out volumes are the evaluation.
            app.train({"model": args.model, "max_epochs": args.epochs, "lr": args.lr, "val_split": 0, "device": args.device})
            train_seconds = time.perf_counter() - start
            dice = held_out_dice(app, args.model, held_out, args.truth, labels, args.device)
            mean = float(np.nanmean(list(dice.values())))
            rows.append(
                {
                    "strategy": strategy,
                    "seed": seed,
                    "round": round_,
                    "labelled_volumes": len(datastore.get_labeled_images("final")),
                    "picked": picked,
                    **{f"dice_{name.replace(' ', '_')}": round(v, 4) for name, v in dice.items()},
                    "dice_mean": round(mean, 4),
                    "train_seconds": round(train_seconds, 2),
                }
            )
            progress.set_postfix(strategy=strategy, seed=seed, dice=f"{mean:.3f}")
            progress.update()
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def curves(rows: list[dict], strategy: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """x (labelled volumes), a (seeds, rounds) array of mean Dice, and the seeds, for one strategy."""
    seeds = sorted({r["seed"] for r in rows if r["strategy"] == strategy})
    per_seed = [sorted((r for r in rows if r["strategy"] == strategy and r["seed"] == s), key=lambda r: r["round"]) for s in seeds]
    x = np.array([r["labelled_volumes"] for r in per_seed[0]], dtype=float)
    return x, np.array([[r["dice_mean"] for r in run] for run in per_seed]), seeds


def normalised_auc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoid area under each curve divided by the x span: the mean Dice over the labelling budget."""
    if len(x) < 2:
        return y[..., -1]
    return ((y[..., 1:] + y[..., :-1]) / 2 * np.diff(x)).sum(-1) / (x[-1] - x[0])


def volumes_to_reach(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """Labelled volumes at which a curve first reaches ``target`` (linear between rounds); inf if it never does."""
    for j in range(len(x)):
        if y[j] >= target:
            if j == 0:
                return float(x[0])
            return float(x[j - 1] + (target - y[j - 1]) / (y[j] - y[j - 1]) * (x[j] - x[j - 1]))
    return float("inf")


def interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean (scipy), the mean itself for fewer than two values."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.allclose(values, values[0]):
        return float(values.mean()), float(values.mean())
    ci = bootstrap((values,), np.mean, n_resamples=10_000, method="percentile", random_state=seed).confidence_interval
    return float(ci.low), float(ci.high)


def summarise(rows: list[dict], strategies: list[str]) -> dict:
    """Per strategy: final Dice, AUBC; against the stronger random baseline (by mean AUBC): the paired AUBC
    difference and the labelled-volume saving at the baseline's final Dice, each with a 95 % bootstrap interval."""
    stats = {}
    for s in strategies:
        x, y, seeds = curves(rows, s)
        stats[s] = {"x": x, "y": y, "seeds": seeds, "final": y[:, -1], "auc": normalised_auc(x, y)}
    summary: dict = {"strategies": {}}
    baselines = [b for b in BASELINES if b in stats]
    baseline = max(baselines, key=lambda b: stats[b]["auc"].mean()) if baselines else None
    summary["baseline"] = baseline
    for s in strategies:
        st = stats[s]
        entry = {
            "seeds": st["seeds"],
            "final_dice": [float(st["final"].mean()), *interval(st["final"])],
            "aubc": [float(st["auc"].mean()), *interval(st["auc"])],
        }
        if baseline and s != baseline and st["seeds"] == stats[baseline]["seeds"]:
            b = stats[baseline]
            auc_diff = st["auc"] - b["auc"]  # same seed = same initial volumes: a paired difference
            budget = float(b["x"][-1])
            needed_b = np.array([volumes_to_reach(b["x"], yb, yb[-1]) for yb in b["y"]])
            needed_s = np.array([min(volumes_to_reach(st["x"], ys, yb[-1]), budget) for ys, yb in zip(st["y"], b["y"])])
            saving = 1.0 - needed_s / needed_b
            entry.update(
                aubc_vs_baseline=[float(auc_diff.mean()), *interval(auc_diff)],
                aubc_better_seeds=int((auc_diff > 0).sum()),
                volumes_to_baseline_final=[float(needed_s.mean()), float(needed_b.mean())],
                saving_vs_baseline=[float(saving.mean()), *interval(saving)],
                reached_baseline_final=int(sum(volumes_to_reach(st["x"], ys, yb[-1]) <= budget for ys, yb in zip(st["y"], b["y"]))),
            )
        summary["strategies"][s] = entry
    return summary


def report(summary: dict) -> list[str]:
    lines = [f"{'strategy':12s} {'final Dice [95% CI]':>24s} {'AUBC [95% CI]':>24s}   vs {summary['baseline']}: AUBC diff, saving"]
    for s, e in summary["strategies"].items():
        f, a = e["final_dice"], e["aubc"]
        line = f"{s:12s} {f[0]:7.3f} [{f[1]:.3f}, {f[2]:.3f}]   {a[0]:7.3f} [{a[1]:.3f}, {a[2]:.3f}]"
        if "saving_vs_baseline" in e:
            d, v = e["aubc_vs_baseline"], e["saving_vs_baseline"]
            line += (
                f"   {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] ({e['aubc_better_seeds']}/{len(e['seeds'])} seeds), "
                f"{v[0]:+.0%} [{v[1]:+.0%}, {v[2]:+.0%}] ({e['volumes_to_baseline_final'][0]:.1f} vs "
                f"{e['volumes_to_baseline_final'][1]:.1f} volumes; reached in {e['reached_baseline_final']}/{len(e['seeds'])})"
            )
        lines.append(line)
    return lines


def plot(rows: list[dict], strategies: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import t

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for s in strategies:
        x, y, _ = curves(rows, s)
        mean = y.mean(0)
        half = t.ppf(0.975, len(y) - 1) * y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(mean)
        (line,) = ax.plot(x, mean, marker="o", label=s, linestyle="--" if s in BASELINES else "-")
        ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("held-out Dice, mean over labels")
    ax.set_xticks(sorted({r["labelled_volumes"] for r in rows}))
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(title="mean over seeds, 95 % CI band", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"comma-separated, of {', '.join(SCORES_NEEDED)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--initial", type=int, default=1, help="labelled volumes before the first pick (chosen by the seed)")
    parser.add_argument("--budget", type=int, default=5, help="volumes picked by the strategy, one per round")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each incremental training run")
    parser.add_argument("--score-slices", type=int, default=8, help="slices per volume the scoring methods look at")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "docs", "al_simulation"))
    args = parser.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in SCORES_NEEDED]
    if unknown or not strategies:
        parser.error(f"unknown strategies {unknown}; valid: {', '.join(SCORES_NEEDED)}")
    labels, pool, held_out = resolve_data(parser, args)
    if args.initial < 1 or args.initial + args.budget > len(pool):
        parser.error(f"--initial {args.initial} + --budget {args.budget} must be between 1 and the pool size {len(pool)}")

    from tqdm import tqdm

    os.makedirs(args.out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(args.out_dir, "al_simulation.csv"), os.path.join(args.out_dir, "learning_curve.png")
    json_path = os.path.join(args.out_dir, "summary.json")
    held_paths = [os.path.join(args.images, f"{i}.nii.gz") for i in held_out]
    rows = []
    started = time.perf_counter()
    # The trainer logs every iteration at INFO, which would bury the progress bar; warnings still show.
    logging.disable(logging.INFO)
    try:
        # Rows are written as each run ends, so an interrupted simulation keeps the runs it finished.
        with (
            open(csv_path, "w", newline="") as f,
            tqdm(total=len(strategies) * len(args.seeds) * (args.budget + 1), desc="AL simulation", unit="round") as progress,
        ):
            writer = None
            for seed in args.seeds:
                for strategy in strategies:
                    run = simulate_run(strategy, seed, pool, held_paths, labels, args, progress)
                    writer = writer or csv.DictWriter(f, fieldnames=list(run[0]))
                    if f.tell() == 0:
                        writer.writeheader()
                    writer.writerows(run)
                    f.flush()
                    rows += run
    finally:
        logging.disable(logging.NOTSET)
    elapsed = time.perf_counter() - started

    title = (
        f"{args.model} {args.backbone}, {args.epochs} epochs/round, pool {len(pool)}, held out {len(held_out)}, "
        f"seeds {' '.join(map(str, args.seeds))}"
    )
    plot(rows, strategies, png_path, title)
    summary = summarise(rows, strategies)
    summary.update(command=" ".join(sys.argv), minutes=round(elapsed / 60, 1), pool=pool, held_out=held_out)
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"\nHeld-out Dice after {args.initial + args.budget} labelled volumes (final) and AUBC over "
        f"{args.initial}..{args.initial + args.budget}; {len(args.seeds)} seed(s), {elapsed / 60:.1f} min"
    )
    print("\n".join(report(summary)))
    print(f"CSV: {csv_path}\nPNG: {png_path}\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
