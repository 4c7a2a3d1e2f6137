"""List the published adapter versions of a model (and the candidates the sentinel guard kept back), serve an earlier
one or a candidate, or import a checkpoint of the official HF-SAM / SAMed / H-SAM training code as a new version.

    .venv/bin/python scripts/adapters.py list hf_sam
    .venv/bin/python scripts/adapters.py restore hf_sam 3
    .venv/bin/python scripts/adapters.py restore hf_sam --candidate apps/samfewshot/model/candidates/hf_sam.20261203_101500.pt
    .venv/bin/python scripts/adapters.py import --format samed --model hf_sam epoch_299.pth
    .venv/bin/python scripts/adapters.py import --format samed --model hf_sam --labels '{"RV": 1, "Myo": 2, "LV": 3}' acdc.pth

A restore publishes the old (or kept) tensors as a new version (atomically), so a running server picks it up at its
next request without a restart, and the history keeps every version, the restored one included.

An import reads the LoRA rank and the class count from the file (mask tokens = classes + background) and names
every tensor it could not map. Label names: ``--labels`` JSON, or the official order for 9 classes (Synapse) and 4
(ACDC). The server must then run with the same backbone, labels and rank: the command prints the ``--conf`` to pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "apps", "samfewshot"))

from lib.adapters import (  # noqa: E402
    ADAPTER_FORMAT_VERSION,
    AdapterError,
    candidates_dir,
    history_path,
    list_versions,
    publish_adapter,
    read_adapter_record,
    restore_adapter,
    serve_candidate,
)

# Label orders of the official code's test scripts (Synapse's class_to_name; ACDC as TransUNet's).
OFFICIAL_LABELS = {
    9: ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"],
    4: ["RV", "Myo", "LV"],
}


def list_adapters(model: str, model_dir: str) -> None:
    path = os.path.join(model_dir, f"{model}.pt")
    served = read_adapter_record(path)["version"] if os.path.exists(path) else 0
    for version in list_versions(path):
        payload = read_adapter_record(history_path(path, version))
        info = payload.get("info", {})
        metric = f"{info.get('metric_name', '')} {info.get('metric', float('nan')):.4f}" if "metric" in info else ""
        origin = f" (restored from v{info['restored_from']})" if "restored_from" in info else ""
        origin += f" (imported from {info['imported_from']})" if "imported_from" in info else ""
        if payload.get("format_version") != ADAPTER_FORMAT_VERSION:
            origin += f" (format {payload.get('format_version')}: this version cannot serve it)"
        mark = "*" if version == served else " "
        print(f"{mark} v{version:04d}  {payload['created']}  {metric}{origin}")
    if served == 0:
        print(f"no adapter published for {model} in {model_dir}: the base weights are served")
    folder = candidates_dir(path)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith(f"{model}.") and name.endswith(".pt"):
            info = read_adapter_record(os.path.join(folder, name)).get("info", {})
            print(
                f"  candidate {os.path.join(folder, name)}: {info.get('metric_name')} {info.get('metric', float('nan')):.4f}, "
                f"served then {info.get('served_metric') or float('nan'):.4f} (not served)"
            )


def import_samed(path: str, model: str, model_dir: str, backbone: str, labels_json: str | None) -> int:
    """Publish the checkpoint at ``path`` as the next adapter version of ``model``; returns the version."""
    import torch

    from lib.checkpoint_import import samed_adapter, samed_layout
    from lib.configs import MODEL_CONFIGS
    from lib.networks.lora import adapter_state_dict
    from lib.networks.sam_backbone import VIT_ENCODERS
    from lib.networks.sam_segmenter import build_segmenter

    if backbone not in VIT_ENCODERS:
        raise AdapterError(
            f"SAMed, H-SAM and HF-SAM checkpoints hold LoRA for SAM's ViT; --backbone {backbone} is not one of {', '.join(VIT_ENCODERS)}"
        )

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"cannot read '{path}': {e}") from e
    rank, num_classes = samed_layout(state)
    if labels_json:
        labels = json.loads(labels_json)
    elif num_classes in OFFICIAL_LABELS:
        labels = {name: i + 1 for i, name in enumerate(OFFICIAL_LABELS[num_classes])}
    else:
        raise AdapterError(f"the checkpoint has {num_classes - 1} classes; name them with --labels '{{\"name\": 1, ...}}'")
    if len(labels) != num_classes - 1:
        raise AdapterError(
            f"--labels names {len(labels)} classes, the checkpoint has {num_classes - 1} (its mask tokens less the background)"
        )
    conf = {"backbone": backbone, "labels": json.dumps(labels), "lora_rank": str(rank), "engine": "torch"}
    config = MODEL_CONFIGS[model]()
    config.init(model, model_dir, conf, None)
    network = build_segmenter(config.network_cls, backbone, num_classes, rank, **config.network_options())
    adapter, report = samed_adapter(state, adapter_state_dict(network), len(network.image_encoder.blocks))
    for key, why in report.unused.items():
        print(f"  not imported: {key}: {why}")
    for name in report.not_in_file:
        print(f"  not in the file, kept at its initial value: {name}")
    info = {"imported_from": os.path.abspath(path), "import_format": "samed", "not_imported": sorted(report.unused)}
    version = publish_adapter(config.model.adapter_path, adapter, config.model.adapter_config(), info)
    print(f"{model}: {path} published as version {version} (LoRA rank {rank}, {num_classes - 1} classes)")
    print(f"serve it with: --conf models {model} --conf backbone {backbone} --conf lora_rank {rank} --conf labels '{json.dumps(labels)}'")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    model_dir = {"default": os.path.join(REPO, "apps", "samfewshot", "model"), "help": "the server's model folder"}
    listing = actions.add_parser("list", help="published versions")
    listing.add_argument("model", help="model name, e.g. hf_sam")
    listing.add_argument("--model-dir", **model_dir)
    restore = actions.add_parser("restore", help="serve an earlier version again")
    restore.add_argument("model")
    restore.add_argument("version", type=int, nargs="?", help="version to restore (see: list)")
    restore.add_argument("--candidate", help="a candidate the sentinel guard kept back (see: list), instead of a version")
    restore.add_argument("--model-dir", **model_dir)
    imports = actions.add_parser("import", help="publish an official checkpoint as a new version")
    imports.add_argument("file", help="checkpoint saved by the official training code (save_lora_parameters)")
    imports.add_argument("--format", required=True, choices=["samed"], help="samed: SAMed, H-SAM and HF-SAM checkpoints")
    imports.add_argument("--model", required=True, choices=["hf_sam"], help="the model it becomes an adapter of")
    imports.add_argument("--backbone", default="vit_b", help="the SAM backbone it was trained on (default vit_b)")
    imports.add_argument("--labels", help='label names as JSON {"name": id}, ids 1..N in the checkpoint\'s class order')
    imports.add_argument("--model-dir", **model_dir)
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            list_adapters(args.model, args.model_dir)
        elif args.action == "restore":
            path = os.path.join(args.model_dir, f"{args.model}.pt")
            if (args.version is None) == (args.candidate is None):
                parser.error("restore takes a version or --candidate FILE, one of them")
            if args.candidate:
                print(f"{args.model}: {args.candidate} is served as version {serve_candidate(path, args.candidate)}")
            else:
                version = restore_adapter(path, args.version)
                print(f"{args.model}: version {args.version} is served again as version {version}")
        else:
            import_samed(args.file, args.model, args.model_dir, args.backbone, args.labels)
    except (AdapterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
