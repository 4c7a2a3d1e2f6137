"""Choose FGNet's watershed thresholds by VOI on the labelled EM samples, then compare the one-shot agglomeration
it replaced with the iterative mean-affinity one on the held-out samples, on the same affinity maps.

    .venv/bin/python scripts/tune_agglomeration.py --workdir /tmp/fgnet-tune

The first run copies the app and the EM datastore into --workdir and trains the tiny FGNet as
tests/app/test_learning.py does (40 epochs on em_000 and em_001); a later run reuses the adapter published there
and the affinity maps saved beside it (affinities/<volume>.npy), so only the agglomerations run again.
Note: em_000 and em_001 are the training volumes, so the sweep sees better affinities than the held-out volumes.
Prints markdown tables (after waterz's progress output, which it writes to stdout itself), and writes them to
--out: the sweep on em_000/em_001, then on em_002 ... em_005 the one-shot rule at its default against the iterative
rule at the defaults affinity_watershed ships.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "samfewshot"
sys.path.insert(0, str(APP))
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")

TUNE, HELD_OUT = ("em_000", "em_001"), ("em_002", "em_003", "em_004", "em_005")
SEEDS = ((0.9, 0.2), (0.9, 0.1), (0.9, 0.3), (0.8, 0.0))  # (seed_affinity, seed_fraction); the first is the default
MERGES = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7)


def one_shot(fragments, affinity, merge_affinity):
    """The agglomeration before the iterative one: connected components of the fragment pairs whose contact
    edges average above ``merge_affinity`` (single linkage), kept here as the baseline."""
    import torch
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from lib.networks.affinities import AFFINITY_AXES

    labels = torch.as_tensor(fragments.astype(np.int64))
    pairs, values = [], []
    for channel, axis in enumerate(AFFINITY_AXES):
        n = labels.shape[axis]
        current, previous = labels.narrow(axis, 1, n - 1), labels.narrow(axis, 0, n - 1)
        contact = current != previous
        pairs.append(torch.stack([torch.minimum(current, previous)[contact], torch.maximum(current, previous)[contact]], 1))
        values.append(affinity[channel].narrow(axis, 1, n - 1)[contact])
    unique, inverse = torch.unique(torch.cat(pairs), dim=0, return_inverse=True)
    mean = torch.zeros(len(unique)).index_add_(0, inverse, torch.cat(values)) / torch.bincount(inverse)
    edges = unique.numpy()[(mean > merge_affinity).numpy()]
    size = int(fragments.max()) + 1
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(size, size))
    return connected_components(graph, directed=False)[1][fragments] + 1


def affinity_maps(workdir: Path, epochs: int) -> dict[str, np.ndarray]:
    """(3, X, Y, Z) affinity probabilities of every EM sample from the model trained (once) in ``workdir``."""
    names = TUNE + HELD_OUT
    cache = workdir / "affinities"
    if not all((cache / f"{n}.npy").exists() for n in names):
        import torch
        from monai.transforms import Compose

        from main import SamFewShotApp

        app_dir, studies = workdir / "app", workdir / "studies"
        if not app_dir.exists():
            shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
            ignore = shutil.ignore_patterns("datastore_v2.json", ".lock", "original")
            shutil.copytree(REPO / "sample-datasets" / "em-neurons", studies, ignore=ignore)
        conf = {"models": "fgnet", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"}
        app = SamFewShotApp(str(app_dir), str(studies), conf)
        task = app._infers["fgnet"]
        if task.model.served_version() == 0:
            app.train({"model": "fgnet", "max_epochs": epochs, "device": "cpu"})
        cache.mkdir(exist_ok=True)
        for name in names:
            data = Compose(task.pre_transforms())({"image": str(studies / f"{name}.nii.gz")})
            pred = task.run_inferer(data, device="cpu")["pred"]
            np.save(cache / f"{name}.npy", torch.sigmoid(pred.as_tensor()).numpy())
    return {n: np.load(cache / f"{n}.npy") for n in names}


def scores(affinity: np.ndarray, truth: np.ndarray, seed: float, fraction: float, merge: float, old: bool) -> dict:
    from lib.evaluation import instance_scores
    from lib.infers import affinity_instances

    with mock.patch.object(affinity_instances, "agglomerate", one_shot) if old else contextlib.nullcontext():
        instances = affinity_instances.affinity_watershed(affinity, seed, merge, seed_fraction=fraction)
    s = instance_scores(instances, truth)
    return {**s, "cremi": float(np.sqrt(s["voi"] * s["arand"])), "segments": int(instances.max())}


def row(*cells) -> str:
    return "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def mean_of(runs: list[dict], keys=("voi_split", "voi_merge", "voi", "arand", "cremi")) -> list[float]:
    return [float(np.mean([r[k] for r in runs])) for k in keys]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="app copy, trained adapter and affinity maps")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the tables")
    parser.add_argument("--old-merge", type=float, default=0.5, help="the one-shot rule's threshold (its default)")
    args = parser.parse_args(argv)
    import nibabel as nib

    from lib.infers.affinity_instances import affinity_watershed

    args.workdir.mkdir(parents=True, exist_ok=True)
    affinities = affinity_maps(args.workdir, args.epochs)
    truth_dir = REPO / "sample-datasets" / "em-neurons-groundtruth"
    truth = {n: np.asarray(nib.load(truth_dir / f"{n}.nii.gz").dataobj) for n in affinities}

    out = [f"VOI sum (split / merge), mean over {' and '.join(TUNE)}, by merge_affinity:", ""]
    out += [row("rule", "seed_affinity / seed_fraction", *map(str, MERGES)), "|---" * (2 + len(MERGES)) + "|"]
    best = (np.inf,)
    for old, (seed, fraction) in itertools.product((False, True), SEEDS):
        cells = []
        for merge in MERGES:
            split, merged, voi = mean_of(
                [scores(affinities[n], truth[n], seed, fraction, merge, old) for n in TUNE], ("voi_split", "voi_merge", "voi")
            )
            cells.append(f"{voi:.3f} ({split:.2f} / {merged:.2f})")
            if not old and voi < best[0]:
                best = (voi, seed, fraction, merge)
        out.append(row("one-shot" if old else "iterative", f"{seed} / {fraction}", *cells))
    out += ["", f"Lowest VOI sum (iterative): seed_affinity {best[1]}, seed_fraction {best[2]}, merge_affinity {best[3]}.", ""]

    # The comparison runs the iterative rule at the defaults the app ships.
    defaults = {k: v.default for k, v in inspect.signature(affinity_watershed).parameters.items()}
    new = (defaults["seed_affinity"], defaults["seed_fraction"], defaults["merge_affinity"])
    out += [row("volume", "rule", "segments", "VOI split", "VOI merge", "VOI sum", "ARAND", "CREMI sqrt(VOI sum x ARAND)")]
    out += ["|---" * 8 + "|"]
    for old, params in ((True, (SEEDS[0][0], SEEDS[0][1], args.old_merge)), (False, new)):
        rule = f"{'one-shot' if old else 'iterative'} {params[2]}"
        runs = [scores(affinities[n], truth[n], *params, old) for n in HELD_OUT]
        out += [row(n, rule, r["segments"], *mean_of([r])) for n, r in zip(HELD_OUT, runs)]
        out.append(row("**mean**", rule, round(float(np.mean([r["segments"] for r in runs]))), *mean_of(runs)))
    print("\n".join(out))
    if args.out:
        args.out.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
