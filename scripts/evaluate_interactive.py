r"""``evaluate.py interactive``: the interactive protocol of the CVPR 2025 challenge "Foundation Models for Interactive
3D Biomedical Image Segmentation" run through a server's interactive task, with the requests 3D Slicer sends.

    .venv/bin/python scripts/evaluate.py interactive --server http://127.0.0.1:8000 --model hf_sam \
        --groundtruth sample-datasets/brain-mri-groundtruth --cases brain_005 brain_006 brain_007 --out-dir /tmp/cvpr25

A case is a datastore image with a ground-truth volume: in --groundtruth (same name, same grid), else its final
label on the server; --cases picks some (default: every image with one). Each structure (ground-truth id) is
prompted in parallel, as the challenge's CVPR25_iter_eval.py does (lib.evaluation has its box, click and scores):

1. its box (get_boxes.py: the 2D box on the slice of the structure's middle voxel, jittered, and the z range), sent
   as 3D Slicer's ``roi`` [i0, i1, j0, j1, k0, k1]; the app puts that box on every slice of the range and bounds
   its answer by it, where the challenge leaves the use of the box to the model;
2. to 6. one click more each, at the centre of the largest error of the previous step's prediction (foreground
   where under-segmented, background where over-segmented), sent with the box and every earlier click.

A structure's request is ``POST /infer/<model>_interactive`` with ``label`` its segment name (the model's name for
that id; another id is named as --groundtruth's labels.json names it, else ``structure <id>``, and answered as a
new structure),
``foreground``, ``background`` and ``roi``. The binary answers are merged in id order (a later structure wins
where two overlap) into the step's prediction; a request that fails counts as an empty answer and is counted.
Timing is each request's round trip (the challenge times each model run; it allows 90 s per structure).

Writes to --out-dir: metrics.csv (the challenge's columns per case, plus each structure's final Dice in the merged
prediction and of its own last answer, ``answer_DSC``, which tells an empty answer from an overwritten one),
summary.json and summary.md (the means; seconds per structure), dice_vs_interactions.png; prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from evaluate import load_label, volume_files

from lib.evaluation import BOX_SEED, CHALLENGE_CLICKS, challenge_box, challenge_click, challenge_scores, dice, interaction_auc

STEPS = CHALLENGE_CLICKS + 1  # the box, then the clicks
TIME_LIMIT_S = 90.0  # per structure, the challenge's


def as_zyx(volume: np.ndarray) -> np.ndarray:
    """A volume in the app's voxel order (i, j, k) in the challenge's (z, y, x)."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0))


def structure_names(info: dict[str, Any], model: str, ids: list[int], groundtruth: Path | None) -> dict[int, str]:
    """The segment name sent for each ground-truth id: the model's label of that id, else its name in the ground
    truth's labels.json (--groundtruth), else ``structure <id>``."""
    labels = info["models"][model].get("labels") or {}
    known = {int(i): name for name, i in labels.items()} if isinstance(labels, dict) else {}
    listed = groundtruth / "labels.json" if groundtruth is not None else None
    named = {int(i): name for name, i in json.loads(listed.read_text()).items()} if listed and listed.is_file() else {}
    return {i: known.get(i) or named.get(i) or f"structure {i}" for i in ids}


class Case:
    """One case's ground truth (z, y, x), its voxel size (z, y, x) in mm, and the prompts so far per structure."""

    def __init__(self, name: str, truth_ijk: np.ndarray, spacing_ijk: tuple[float, ...]):
        self.name = name
        self.truth = as_zyx(truth_ijk.astype(np.int64))
        self.spacing = tuple(reversed(spacing_ijk[:3]))
        self.ids = [int(i) for i in np.unique(self.truth) if i != 0]
        rng = np.random.RandomState(BOX_SEED)
        self.boxes = {i: challenge_box(self.truth == i, rng) for i in self.ids}
        self.clicks: dict[int, dict[str, list[list[int]]]] = {i: {"foreground": [], "background": []} for i in self.ids}

    def request(self, i: int, name: str) -> dict[str, Any]:
        """3D Slicer's deepgrow request for structure ``i``: its name, its clicks and its box, as [i, j, k] indices."""
        b = self.boxes[i]
        roi = [b["z_mid_x_min"], b["z_mid_x_max"], b["z_mid_y_min"], b["z_mid_y_max"], b["z_min"], b["z_max"]]
        return {"label": name, **self.clicks[i], "roi": roi}

    def add_clicks(self, seg: np.ndarray) -> None:
        for i in self.ids:
            click = challenge_click(seg == i, self.truth == i)
            if click is not None:
                (z, y, x), foreground = click
                self.clicks[i]["foreground" if foreground else "background"].append([x, y, z])


def run_case(client: Any, task: str, case: Case, names: dict[int, str]) -> dict[str, Any]:
    """The six steps on one case: its row of metrics."""
    import nibabel as nib
    from monailabel.client.client import MONAILabelClientException

    row: dict[str, Any] = {"CaseName": case.name, "num_class": len(case.ids), "failed_requests": 0}
    dscs, nsds, total = [], [], 0.0
    seg = np.zeros_like(case.truth)
    answers: dict[int, np.ndarray] = {}
    for step in range(1, STEPS + 1):
        if step > 1:
            case.add_clicks(seg)
        seg = np.zeros_like(case.truth)
        seconds = 0.0
        for i in case.ids:
            start = time.perf_counter()
            try:
                path, _ = client.infer(task, case.name, case.request(i, names[i]))
            except MONAILabelClientException as e:
                print(f"{case.name} step {step} {names[i]!r}: {e.msg}", file=sys.stderr)
                row["failed_requests"] += 1
                continue
            finally:
                seconds += time.perf_counter() - start
            answers[i] = as_zyx(np.asarray(nib.load(path).dataobj)) > 0
            seg[answers[i]] = i
        dsc, nsd = challenge_scores(case.truth, seg, case.spacing)
        row[f"RunningTime_{step}"], row[f"DSC_{step}"], row[f"NSD_{step}"] = seconds, dsc, nsd
        dscs.append(dsc)
        nsds.append(nsd)
        total += seconds
    row.update(TotalRunningTime=total, seconds_per_structure=total / len(case.ids))
    row.update(DSC_AUC=interaction_auc(dscs), NSD_AUC=interaction_auc(nsds), DSC_Final=dscs[-1], NSD_Final=nsds[-1])
    for i in case.ids:
        row[f"DSC_Final {names[i]}"] = dice(seg == i, case.truth == i)
        # The structure's own last answer, before later ids overwrote it in the merged prediction
        row[f"answer_DSC {names[i]}"] = dice(answers[i], case.truth == i) if i in answers else 0.0
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "seconds_per_structure"]
    keys += sorted({k for row in rows for k in row if k.startswith(("DSC_Final ", "answer_DSC "))})
    keys += [f"DSC_{s}" for s in range(1, STEPS + 1)] + [f"NSD_{s}" for s in range(1, STEPS + 1)]
    means = {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}
    slowest = max(row["seconds_per_structure"] for row in rows)
    over = [row["CaseName"] for row in rows if row["seconds_per_structure"] > TIME_LIMIT_S]
    failed = sum(row["failed_requests"] for row in rows)
    return {"cases": len(rows), "mean": means, "max_seconds_per_structure": slowest, "over_time_limit": over, "failed_requests": failed}


def markdown(summary: dict[str, Any]) -> str:
    m = summary["mean"]
    finals = [k for k in m if k.startswith(("DSC_Final ", "answer_DSC "))]
    head = ["cases", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", *finals, "s / structure (max)", "failed requests"]
    cells = [str(summary["cases"]), *(f"{m[k]:.3f}" for k in ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", *finals])]
    cells += [f"{m['seconds_per_structure']:.1f} ({summary['max_seconds_per_structure']:.1f})", str(summary["failed_requests"])]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |"])


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, STEPS + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric in ("DSC", "NSD"):
        ax.plot(steps, [summary["mean"][f"{metric}_{s}"] for s in steps], marker="o", label=f"mean {metric}")
    ax.set_xticks(list(steps), ["box"] + [f"+{c} click" for c in range(1, STEPS)], rotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"CVPR25 interactive protocol, {summary['cases']} case(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ground_truth(client: Any, objects: dict[str, Any], folder: Path | None) -> dict[str, Path]:
    """Ground-truth files by datastore image id: --groundtruth's volumes of datastore images, else final labels."""
    if folder is not None:
        return {name: path for name, path in volume_files(folder).items() if name in objects}
    labelled = [i for i, obj in objects.items() if "final" in (obj.get("labels") or {})]
    return {i: Path(client.download_label(i, "final")) for i in labelled}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evaluate.py interactive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", required=True, help="the MONAI Label server's URL")
    parser.add_argument("--model", default="hf_sam", help="the served model; its interactive task is <model>_interactive")
    parser.add_argument("--groundtruth", type=Path, help="folder of ground-truth volumes named as the images (default: final labels)")
    parser.add_argument("--cases", nargs="+", help="datastore image ids (default: every image with ground truth)")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    if args.groundtruth is not None and not args.groundtruth.is_dir():
        parser.error(f"--groundtruth {args.groundtruth} is not a folder")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:  # the answers and downloaded labels, removed after the run
        client = MONAILabelClient(args.server.rstrip("/"), tmpdir=scratch)
        try:
            info = client.info()
            task = f"{args.model}_interactive"
            if task not in info["models"]:
                interactive = sorted(n for n, m in info["models"].items() if m.get("type") == "deepgrow")
                parser.error(f"the server has no task {task!r}; its interactive tasks: {', '.join(interactive) or 'none'}")
            truth = ground_truth(client, client.datastore()["objects"], args.groundtruth)
            names = args.cases or sorted(truth)
            missing = [n for n in names if n not in truth]
            if missing or not names:
                found = ", ".join(sorted(truth)) or "none"
                parser.error(f"no ground truth for {', '.join(missing) or 'any datastore image'} (images with some: {found})")
            rows = []
            for name in names:
                ids, _, spacing = load_label(truth[name])
                case = Case(name, ids, spacing)
                rows.append(run_case(client, task, case, structure_names(info, args.model, case.ids, args.groundtruth)))
                print(f"{name}: DSC_Final {rows[-1]['DSC_Final']:.3f}, {rows[-1]['seconds_per_structure']:.1f} s per structure", flush=True)
        except MONAILabelClientException as e:
            print(f"evaluate.py interactive: error: {e.msg}", file=sys.stderr)
            return 1
    with open(args.out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    (args.out_dir / "summary.json").write_text(json.dumps({"server": args.server, "model": args.model, **summary}, indent=2) + "\n")
    table = markdown(summary)
    (args.out_dir / "summary.md").write_text(table + "\n")
    plot(summary, args.out_dir / "dice_vs_interactions.png")
    print(table)
    return 0
