"""Simulated annotators clicking on held-out volumes: what clicks and boxes buy, before and after prompt-aware training.

    .venv/bin/python scripts/simulate_clicks.py                                  # LiteMedSAM, 50 epochs (the server default), hf_sam
    .venv/bin/python scripts/simulate_clicks.py --backbone tiny                  # the random test backbone
    .venv/bin/python scripts/simulate_clicks.py --epochs 0 --out-dir /tmp/zero   # zero-shot figures only
    .venv/bin/python scripts/simulate_clicks.py --epochs 0 --encoder openvino-int8 --out-dir /tmp/zero8   # int8 encoder
    .venv/bin/python scripts/simulate_clicks.py --epochs 2 --slices 2 --clicks 5 --out-dir /tmp/clicks   # a quick look
    .venv/bin/python scripts/simulate_clicks.py --variants before --out-dir /tmp/c   # one training now ...
    .venv/bin/python scripts/simulate_clicks.py --variants after --skip-zero-shot --out-dir /tmp/c   # ... one later

Two private copies of the app and of the sample brain-MRI datastore (its two labelled volumes) are trained for
--epochs from the same start: one prompt-free (``interactive_share`` 0: the prompt path gets no training), one with
the shared trainer's simulated interactions (``--interactive-share``, 0.5 as the trainer). On the held-out volumes (ground truth from
sample-datasets/brain-mri-groundtruth), in the model's own slices, per structure:

* prompt-free Dice of the class head on --slices slices spread over the structure;
* a simulated annotator on the same slices (``lib.infers.interactive.click_session``): the first click at the
  centre of the structure, each next at the centre of the largest error, all clicks and the previous mask fed to
  SAM's prompt decoder: Dice after 1, 3 and 5 clicks, NoC@85 and NoC@90 (clicks to reach Dice 0.85 / 0.90, at most
  --clicks);
* one box on the structure's largest slice, propagated through the volume (``propagate``): 3D Dice;
* the latency of one click on a volume already segmented (through the app's infer, embeddings cached).

Before any training (zero-shot), on the same slices, the object decoding of the pretrained backbone
(``object_prompt_dice``): Dice of a box around the structure, of one click at its centre, and of both; and one box
on the structure's largest slice propagated through the volume by the object decoding (3D Dice).

Writes results.json, a Markdown table and a Dice-vs-clicks plot (PNG) to --out-dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "samfewshot")
SAMPLES = os.path.join(REPO, "sample-datasets")
sys.path.insert(0, APP)
os.environ["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
os.environ["MONAI_LABEL_TRACKING_ENABLED"] = "false"

STRUCTURES = {1: "white matter", 2: "grey matter"}


def private_app(work: str, model: str, args):
    """A private app and datastore copy, untrained."""
    import torch

    from main import SamFewShotApp

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    shutil.copytree(os.path.join(SAMPLES, "brain-mri"), studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    conf = {"models": model, "backbone": args.backbone, "engine": "torch", "device": args.device, "auto_scoring": "false"}
    return SamFewShotApp(app_dir, studies, conf)


def train(app, model: str, share: float, args) -> None:
    """Train ``app``'s model for ``args.epochs`` with ``interactive_share`` = ``share``."""
    if args.epochs:
        start = time.perf_counter()
        request = {"model": model, "max_epochs": args.epochs, "val_split": 0, "device": args.device, "interactive_share": share}
        app.train(request | ({"lr": args.lr} if args.lr else {}))
        logging.info(f"trained interactive_share={share} in {time.perf_counter() - start:.0f} s")


def held_out_slices(truth: np.ndarray, c: int, args) -> np.ndarray:
    """--slices slice indices spread over the slices where class ``c`` covers at least --min-area pixels."""
    present = np.nonzero((truth == c).sum((0, 1)) >= args.min_area)[0]
    return present[np.linspace(0, len(present) - 1, args.slices).round().astype(int)]


def zero_shot(app, model: str, args) -> dict:
    """The untrained model's object decoding on the held-out volumes: per structure, the mean 2D Dice of a box, a
    centre click and both (``object_prompt_dice``), and the 3D Dice of one box propagated (``propagate``)."""
    import torch

    from lib.evaluation import dice
    from lib.infers.interactive import object_prompt_dice, propagate
    from lib.transforms.clicks import box_of

    served = app.models[model].model
    network, _ = served.resident(args.device)
    encode = zero_shot_encoder(network, served, args) if args.encoder != "torch" else None
    per_structure = {c: {"2d": [], "box_3d": []} for c in STRUCTURES}
    for image_id in args.held_out:
        volume, truth = model_space(
            os.path.join(SAMPLES, "brain-mri", f"{image_id}.nii.gz"),
            os.path.join(SAMPLES, "brain-mri-groundtruth", f"{image_id}.nii.gz"),
            served.img_size,
            served.modality,
            served.intensity,
        )
        with torch.no_grad():
            for c in STRUCTURES:
                for k in held_out_slices(truth, c, args):
                    per_structure[c]["2d"].append(object_prompt_dice(network, volume[..., k], truth[..., k] == c, encode))
                k = int(np.argmax((truth == c).sum((0, 1))))
                prompt = {k: {"points": [], "box": box_of(truth[..., k] == c)}}
                probabilities, _, _ = propagate(network, volume, prompt, c, encode, batch_size=2, by_class=False)
                per_structure[c]["box_3d"].append(dice(probabilities.numpy() > 0.5, truth == c))
    return {
        name: {
            **{f"{kind}_dice": float(np.mean([d[kind] for d in per_structure[c]["2d"]])) for kind in ("box", "click", "box_click")},
            "box_propagated_3d_dice": float(np.mean(per_structure[c]["box_3d"])),
            "slices": len(per_structure[c]["2d"]),
        }
        for c, name in STRUCTURES.items()
    }


def zero_shot_encoder(network, served, args):
    """The untrained network's image encoder on OpenVINO as --encoder names it (``openvino-<precision>``), built as
    the server's engine builds it; an int8 graph is calibrated on the first labelled volume, not a held-out one."""
    from lib.engines.openvino_engine import EncoderEngine, calibration_slices

    precision = args.encoder.split("-", 1)[1]
    quantize = "int8" if precision == "int8" else "none"
    cache = tempfile.mkdtemp(prefix="samfewshot-clicks-engine-")
    engine = EncoderEngine(args.model, cache, "auto" if quantize == "int8" else precision, quantize=quantize)
    volume, _ = model_space(
        os.path.join(SAMPLES, "brain-mri", "brain_000.nii.gz"),
        os.path.join(SAMPLES, "brain-mri-groundtruth", "brain_000.nii.gz"),
        served.img_size,
        served.modality,
        served.intensity,
    )
    engine.claim("zero-shot")
    engine.prepare("zero-shot", network.image_encoding(), network.model_input(calibration_slices(volume)))
    engine.wait()
    compiled = engine.encoder("zero-shot")
    shutil.rmtree(cache, ignore_errors=True)
    if compiled is None:
        raise SystemExit(f"--encoder {args.encoder}: the engine failed: {engine.failure}")
    logging.info(f"zero-shot encoder: {compiled.label}")
    return compiled


def model_space(path: str, truth: str, network_size: int, modality: str, intensity: dict):
    """The volume (1, S, S, D) and its ground truth (S, S, D) as the model sees them (RAS, resized in-plane)."""
    from monai.transforms import Compose

    from lib.transforms import volume_transforms

    data = Compose(volume_transforms(network_size, modality, {"white matter": 1, "grey matter": 2}, intensity))(
        {"image": path, "label": truth}
    )
    return data["image"].as_tensor().float(), data["label"].as_tensor()[0].long().numpy()


def evaluate(app, model: str, args) -> dict:
    import torch

    from lib.evaluation import clicks_to_reach, dice
    from lib.infers.interactive import click_session, propagate
    from lib.transforms.clicks import box_of

    served = app.models[model].model
    network, _ = served.resident(args.device)
    per_structure = {c: {"prompt_free": [], "clicks": [], "box_3d": []} for c in STRUCTURES}
    for image_id in args.held_out:
        path = os.path.join(SAMPLES, "brain-mri", f"{image_id}.nii.gz")
        volume, truth = model_space(
            path, os.path.join(SAMPLES, "brain-mri-groundtruth", f"{image_id}.nii.gz"), served.img_size, served.modality, served.intensity
        )
        with torch.no_grad():
            for c in STRUCTURES:
                areas = (truth == c).sum((0, 1))
                for k in held_out_slices(truth, c, args):
                    image = volume[..., k]
                    classes = network(image[None]).argmax(1)[0].numpy()
                    per_structure[c]["prompt_free"].append(dice(classes == c, truth[..., k] == c))
                    per_structure[c]["clicks"].append(click_session(network, image, truth[..., k] == c, c, args.clicks))
                k = int(np.argmax(areas))
                box = box_of(truth[..., k] == c)
                probabilities, _, _ = propagate(network, volume, {k: {"points": [], "box": box}}, c, batch_size=2)
                per_structure[c]["box_3d"].append(dice(probabilities.numpy() > 0.5, truth == c))
    summary = {}
    for c, name in STRUCTURES.items():
        sessions = np.array(per_structure[c]["clicks"])
        summary[name] = {
            "slices": len(sessions),
            "prompt_free_dice": float(np.mean(per_structure[c]["prompt_free"])),
            "dice_after_clicks": {str(n): float(sessions[:, n - 1].mean()) for n in (1, 3, 5) if n <= args.clicks},
            "dice_curve": sessions.mean(0).round(4).tolist(),
            "noc85": float(np.mean([clicks_to_reach(s, 0.85) for s in sessions])),
            "noc90": float(np.mean([clicks_to_reach(s, 0.90) for s in sessions])),
            "box_propagated_3d_dice": float(np.mean(per_structure[c]["box_3d"])),
        }
    return summary


def click_latency(app, model: str, args) -> dict:
    """Seconds of one interactive request on a volume the segmentation task has just inferred (median of 3)."""
    image = os.path.join(SAMPLES, "brain-mri", f"{args.held_out[0]}.nii.gz")
    app.infer({"model": model, "image": image, "device": args.device})
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        result = app.infer(
            {"model": f"{model}_interactive", "image": image, "device": args.device, "foreground": [[59, 71, 62]], "label": "white matter"}
        )
        seconds.append(time.perf_counter() - start)
        os.remove(result["file"])
    return {"seconds": round(statistics.median(seconds), 3), "found_slices": len(result["params"]["found_slices"])}


def table(results: dict) -> str:
    lines = [
        "| structure | zero-shot: box, 2D Dice | one centre click | box + click | box + propagation, 3D Dice |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {s['box_dice']:.3f} | {s['click_dice']:.3f} | {s['box_click_dice']:.3f} | {s['box_propagated_3d_dice']:.3f} |"
            for name, s in results.get("zero_shot", {}).items()
        ),
    ]
    if not results["variants"]:
        return "\n".join(lines)
    lines += [
        "",
        "| structure | training | prompt-free Dice | Dice @1 | @3 | @5 click(s) | NoC@85 | NoC@90 | box + propagation, 3D Dice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, summary in results["variants"].items():
        for name, s in summary.items():
            d = s["dice_after_clicks"]
            lines.append(
                f"| {name} | {variant} prompt-aware training | {s['prompt_free_dice']:.3f} | {d.get('1', float('nan')):.3f} | "
                f"{d.get('3', float('nan')):.3f} | {d.get('5', float('nan')):.3f} | {s['noc85']:.1f} | {s['noc90']:.1f} | "
                f"{s['box_propagated_3d_dice']:.3f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STRUCTURES), figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, STRUCTURES.values()):
        for variant, style in (("before", "--"), ("after", "-")):
            s = results["variants"][variant][name]
            ax.plot(range(1, len(s["dice_curve"]) + 1), s["dice_curve"], style, label=f"clicks, {variant} prompt-aware training")
            ax.axhline(s["prompt_free_dice"], linestyle=style, color="grey", linewidth=1, label=f"prompt-free, {variant}")
        ax.set_title(name)
        ax.set_xlabel("clicks")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("slice Dice (held-out volumes)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from lib.configs import SAM_MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_sam", choices=SAM_MODELS)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, help="default: the training recipe's own")
    parser.add_argument("--interactive-share", type=float, default=0.5, help="of the prompt-aware run (the trainer's default)")
    parser.add_argument("--held-out", default="brain_005,brain_006,brain_007")
    parser.add_argument("--slices", type=int, default=8, help="slices per structure and volume")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--min-area", type=int, default=200, help="pixels of the structure for a slice to count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join(REPO, "docs", "click_simulation"))
    parser.add_argument(
        "--variants",
        default="before,after",
        help="trainings to run: before (prompt-free) and after (prompt-aware); one at a time adds to --out-dir's results",
    )
    parser.add_argument("--skip-zero-shot", action="store_true", help="do not measure the untrained model again")
    parser.add_argument(
        "--encoder",
        default="torch",
        choices=["torch", "openvino-fp32", "openvino-bf16", "openvino-int8"],
        help="what runs the image encoder of the zero-shot figures (the trained variants run torch)",
    )
    args = parser.parse_args()
    args.held_out = args.held_out.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("monailabel", "lib", "ignite", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)

    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "variants", "skip_zero_shot")}
    path = os.path.join(args.out_dir, "results.json")
    results = {"args": settings, "variants": {}}
    if os.path.exists(path):  # an earlier invocation's variants, kept when it ran with the same settings
        with open(path) as f:
            earlier = json.load(f)
        if earlier.get("args") == settings:
            results = earlier
    variants = args.variants.split(",") if args.epochs else []
    if not args.skip_zero_shot:
        work = tempfile.mkdtemp(prefix="samfewshot-clicks-zero-")
        try:
            results["zero_shot"] = zero_shot(private_app(work, args.model, args), args.model, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for variant in variants:
        work = tempfile.mkdtemp(prefix=f"samfewshot-clicks-{variant}-")
        try:
            app = private_app(work, args.model, args)
            train(app, args.model, 0.0 if variant == "before" else args.interactive_share, args)
            results["variants"][variant] = evaluate(app, args.model, args)
            if variant == "after":
                results["click_latency"] = click_latency(app, args.model, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    text = table(results)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if set(results["variants"]) == {"before", "after"}:
        plot(results, os.path.join(args.out_dir, "dice_vs_clicks.png"))
    if "click_latency" in results:
        print(f"click on an inferred volume: {results['click_latency']}")


if __name__ == "__main__":
    main()
