"""Forgetting curve: a sequence of incremental updates, each after one more labelled volume, with the sentinel Dice of
the adapter served after each (the sentinel guard of lib/trainers/adapter_trainer.py in the loop).

    .venv/bin/python scripts/prepare_sample_data.py --dataset cohort      # the varied pool (once)
    .venv/bin/python scripts/forgetting_curve.py                          # 6 updates after the first run
    .venv/bin/python scripts/forgetting_curve.py --updates 1 --epochs 1 --initial 3 --out-dir /tmp/curve
    .venv/bin/python scripts/forgetting_curve.py --wrong-label 3 --out-dir docs/forgetting_curve/wrong_label

A private copy of the app and of the pool starts with ``--initial`` labelled volumes (a seeded draw); the first run
puts ``--sentinel-share`` of them in the sentinel, and the later runs add none (val_split 0), so every update is
scored on the same sentinel volumes. Each update labels the next volume (ground truth as the annotator) and trains
from the served adapter on every label so far. Per update the CSV records the guard's decision and figures (the
served adapter's sentinel Dice before, the run's candidate's, the served one's after) and the served adapter's Dice
on the held-out volumes (never in the datastore); the PNG draws them, with what an unguarded server would have served.
``--wrong-label K`` makes update K an annotator's mistake: its volume is saved with white and grey matter swapped.
Each saved label goes through the server's label-quality check (``lib.label_check``) before the run: the CSV
records its agreement with the served adapter (``label_check``) and the labels the run held out (``held_out``).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulate_active_learning import add_data_arguments, held_out_dice, private_app, resolve_data, set_seeds  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def swapped_label(path: str, labels: dict[str, int], directory: str) -> str:
    """A copy of the label at ``path`` with the first two labels' ids swapped: a plausible annotator mistake."""
    import nibabel as nib

    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    a, b = list(labels.values())[:2]
    data[np.asarray(image.dataobj) == a], data[np.asarray(image.dataobj) == b] = b, a
    out = os.path.join(directory, "wrong_" + os.path.basename(path))
    nib.save(nib.Nifti1Image(data, image.affine, image.header), out)
    return out


def run_sequence(args, labels: dict[str, int], pool: list[str], held_out: list[str]) -> list[dict]:
    from lib.label_check import CHECK_KEY

    set_seeds(args.seed)
    order = random.Random(args.seed).sample(pool, args.initial + args.updates)
    label_info = {"label_info": [{"name": name, "idx": idx} for name, idx in labels.items()]}
    held_paths = [os.path.join(args.images, f"{i}.nii.gz") for i in held_out]
    work = tempfile.mkdtemp(prefix="samfewshot-forgetting-")
    try:
        app = private_app(args, labels, pool, work)
        datastore = app.datastore()
        rows = []
        for update in range(args.updates + 1):
            added = order[: args.initial] if update == 0 else [order[args.initial + update - 1]]
            for image_id in added:
                truth = os.path.join(args.truth, f"{image_id}.nii.gz")
                if update == args.wrong_label:
                    truth = swapped_label(truth, labels, work)
                app.on_save_label(image_id, datastore.save_label(image_id, truth, "final", dict(label_info)))
            app.wait_label_checks()  # as a server: each saved label checked against the served adapter first
            set_seeds(args.seed * 1000 + update)
            start = time.perf_counter()
            request = {"model": args.model, "max_epochs": args.epochs, "lr": args.lr, "device": args.device}
            request["val_split"] = args.sentinel_share if update == 0 else 0.0
            decision = app.train(request)["publication"]
            seconds = time.perf_counter() - start
            after = decision["candidate_metric"] if decision["served"] else decision["served_metric"]
            dice = held_out_dice(app, args.model, held_paths, args.truth, labels, args.device)
            checks = {}
            for image_id in added:
                info = datastore.get_label_info(datastore.get_labels_by_image_id(image_id)["final"], "final") or {}
                record = (info.get(CHECK_KEY) or {}).get(args.model)
                if record:
                    checks[image_id] = f"{record['agreement']:.3f}{' flagged' if record['flagged'] else ''}"
            rows.append(
                {
                    "update": update,
                    "labelled_volumes": len(datastore.get_labeled_images("final")),
                    "added": ",".join(added) + (" (wrong label)" if update == args.wrong_label else ""),
                    "sentinel_volumes": ",".join(decision["sentinel_volumes"]),
                    "served": decision["served"],
                    "served_version": app.models[args.model].model.served_version(),
                    "sentinel_dice_before": round(decision["served_metric"], 4),
                    "candidate_sentinel_dice": round(decision["candidate_metric"], 4),
                    "sentinel_dice_after": round(after, 4),
                    "heldout_dice_mean": round(float(np.nanmean(list(dice.values()))), 4),
                    "train_seconds": round(seconds, 1),
                    "label_check": ",".join(f"{i} {c}" for i, c in checks.items()),
                    "held_out": ",".join(u["id"] for u in decision.get("unusable", [])),
                    "reason": decision["reason"],
                }
            )
            print(
                f"update {update}: +{','.join(added)} -> {'served' if decision['served'] else 'kept as candidate'}; sentinel "
                f"{rows[-1]['sentinel_dice_before']:.3f} -> {after:.3f} (candidate {decision['candidate_metric']:.3f}); "
                f"held-out {rows[-1]['heldout_dice_mean']:.3f}",
                flush=True,
            )
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["update"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.plot(x, [r["sentinel_dice_after"] for r in rows], marker="o", label="served adapter, sentinel")
    ax.plot(x, [r["candidate_sentinel_dice"] for r in rows], marker="x", linestyle="--", label="each run's candidate (unguarded), sentinel")
    ax.plot(x, [r["heldout_dice_mean"] for r in rows], marker="s", linestyle=":", label="served adapter, held-out volumes")
    for r in rows:
        if not r["served"]:
            point = (r["update"], r["candidate_sentinel_dice"])
            ax.annotate("kept", point, textcoords="offset points", xytext=(0, -12), fontsize=7, ha="center")
    ax.set_xlabel("update (one more labelled volume each)")
    ax.set_ylabel("Dice")
    ax.set_xticks(x)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--initial", type=int, default=5, help="labelled volumes of the first run")
    parser.add_argument("--sentinel-share", type=float, default=0.4, help="val_split of the first run: the sentinel's share")
    parser.add_argument("--updates", type=int, default=6, help="updates after the first run, one labelled volume each")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--wrong-label", type=int, default=None, metavar="K", help="update K saves a label with two labels swapped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join(REPO, "docs", "forgetting_curve"))
    args = parser.parse_args(argv)

    labels, pool, held_out = resolve_data(parser, args)
    if args.initial < 3 or args.initial + args.updates > len(pool):
        parser.error(f"--initial {args.initial} (>= 3: two train, one sentinel) + --updates {args.updates} exceed the pool of {len(pool)}")

    os.makedirs(args.out_dir, exist_ok=True)
    logging.disable(logging.INFO)  # the trainer logs every iteration
    try:
        rows = run_sequence(args, labels, pool, held_out)
    finally:
        logging.disable(logging.NOTSET)
    csv_path, png_path = os.path.join(args.out_dir, "forgetting_curve.csv"), os.path.join(args.out_dir, "forgetting_curve.png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{args.model} {args.backbone}, {args.epochs} epochs/update, sentinel {rows[0]['sentinel_volumes']}, seed {args.seed}"
    plot(rows, png_path, title)

    served = [r["sentinel_dice_after"] for r in rows]
    drops = [a - b for a, b in zip(served, served[1:])]
    candidates = [r["candidate_sentinel_dice"] for r in rows]
    candidate_drop = max([a - b for a, b in zip(candidates, candidates[1:])] + [0.0])
    print(
        f"served sentinel Dice: {' '.join(f'{v:.3f}' for v in served)}; largest drop from one update to the next "
        f"{max(drops + [0.0]):.4f}; first -> last {served[0]:.3f} -> {served[-1]:.3f}"
    )
    print(f"the runs' own candidates (what each would have served without the guard): largest drop {candidate_drop:.4f}")
    print(f"kept as candidates: {sum(not r['served'] for r in rows)} of {len(rows)} runs\nCSV: {csv_path}\nPNG: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
