"""The two Python steps of scripts/gpu_check.sh: a training run through MONAI Label's multi-GPU path, and the report.

    python scripts/gpu_check.py ddp --device cuda --processes 1 --out DIR/ddp.json
    python scripts/gpu_check.py report DIR

``ddp``: one incremental update of hf_sam (tiny) on the sample brain MRI through MONAI Label's ``multi_gpu`` path,
process group NCCL on CUDA, gloo on the CPU. With two or more processes this is the app's own train request. MONAI
Label runs a one-GPU request without a process group, so for one process the check spawns MONAI Label's worker
(``basic_train.main_worker``) itself, with the request its ``multi_gpu`` branch would build: NCCL, DDP and the
rank-0 publish are exercised on a one-GPU machine.

``report``: reads the benchmark, ddp and test results in DIR, writes DIR/gpu_check.json with the device's name and
prints a table with the goals of a GPU server (vit_b: >= 40 % of the measured bf16 matmul peak, a 100-slice volume
in < 0.2 s of model time, an update served in < 60 s).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "samfewshot")
sys.path.insert(0, APP)
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")

GOALS = {"fraction_of_bf16_peak": 0.40, "volume_100_slices_s": 0.2, "update_served_s": 60.0}


def ddp(device: str, processes: int, out: str) -> int:
    import torch
    from monailabel.tasks.train.basic_train import main_worker
    from monailabel.utils.others.generic import name_to_device

    from lib import monailabel_compat
    from lib.trainers.adapter_trainer import free_loopback_port
    from main import SamFewShotApp

    work = tempfile.mkdtemp(prefix="samfewshot-gpu-check-")
    try:
        app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
        sample = os.path.join(REPO, "sample-datasets", "brain-mri")
        shutil.copytree(sample, studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
        conf = {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "device": device, "auto_scoring": "false"}
        app = SamFewShotApp(app_dir, studies, conf)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        request = {"model": "hf_sam", "max_epochs": 1, "device": device, "multi_gpu": True, "gpus": ",".join(map(str, range(processes)))}
        request.update(distributed_backend=backend, distributed_url=f"tcp://127.0.0.1:{free_loopback_port()}")
        start = time.perf_counter()
        if processes > 1:
            app.train(request)
        else:
            task = monailabel_compat.trainers(app)["hf_sam"]
            req = copy.deepcopy(task.config())
            req.update(request, run_id=datetime.now().strftime("%Y%m%d_%H%M%S"), device=name_to_device(device))
            torch.multiprocessing.spawn(main_worker, nprocs=1, args=(1, req, task.pre_process(req, app.datastore()), task))
        seconds = time.perf_counter() - start
        version = app.models["hf_sam"].model.served_version()
        result = {"backend": backend, "processes": processes, "device": device, "seconds": seconds, "adapter_version": version}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    if version != 1:
        print(f"gpu_check ddp: the {backend} run published no adapter (served version {version})", file=sys.stderr)
        return 1
    return 0


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(directory: str) -> int:
    steps = json.load(open(os.path.join(directory, "steps.json")))
    device = steps["device"]
    benchmarks = {}
    for path in sorted(glob.glob(os.path.join(directory, "benchmark_*.json"))):
        benchmarks[os.path.basename(path)[len("benchmark_") : -len(".json")]] = json.load(open(path))
    ddp_path = os.path.join(directory, "ddp.json")
    summary = {
        "device": device,
        "device_name": device_name(device),
        "steps": steps["results"],
        "ddp": json.load(open(ddp_path)) if os.path.exists(ddp_path) else None,
        "models": {},
    }
    for name, b in benchmarks.items():
        figures = {
            "backbone": b["config"]["backbone"],
            "precision": b.get("precision"),
            "slices_per_s": b.get("network_slices_per_s"),
            "fraction_of_bf16_peak": b.get("fraction_of_bf16_peak"),
            "bf16_matmul_tflops": b["bf16_matmul_gflops"] / 1e3 if "bf16_matmul_gflops" in b else None,
            "volume_100_slices_s": 100 / b["network_slices_per_s"] if b.get("network_slices_per_s") else None,
            "update_served_s": b["update_s"] + b["infer_after_update_s"] if "update_s" in b else None,
            "peak_gpu_memory_infer_mb": b.get("peak_gpu_memory_infer_mb"),
            "peak_gpu_memory_mb": b.get("peak_gpu_memory_mb"),
        }
        summary["models"][name] = figures
    with open(os.path.join(directory, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"\ngpu_check on {summary['device_name']} ({device})")
    for step, outcome in steps["results"].items():
        print(f"  {step:28s} {outcome}")
    if summary["ddp"]:
        d = summary["ddp"]
        what = f"training ({d['backend']}, {d['processes']} process)"
        print(f"  {what:28s} {d['seconds']:.1f} s, adapter v{d['adapter_version']}")
    header = ["model", "backbone", "precision", "slices/s", "% bf16 peak", "100 slices s", "update s", "GPU MB infer", "GPU MB all"]
    print("\n" + " | ".join(header))
    goal_failures = []
    for name, m in summary["models"].items():

        def cell(value, scale=1.0, digits=2):
            return "-" if value is None else f"{value * scale:.{digits}f}"

        print(
            " | ".join(
                [
                    name,
                    m["backbone"],
                    str(m["precision"]),
                    cell(m["slices_per_s"], digits=1),
                    cell(m["fraction_of_bf16_peak"], 100, 1),
                    cell(m["volume_100_slices_s"], digits=3),
                    cell(m["update_served_s"], digits=1),
                    cell(m["peak_gpu_memory_infer_mb"], digits=0),
                    cell(m["peak_gpu_memory_mb"], digits=0),
                ]
            )
        )
        if device.startswith("cuda") and m["backbone"] == "vit_b" and name != "fgnet":
            if (m["fraction_of_bf16_peak"] or 0) < GOALS["fraction_of_bf16_peak"]:
                goal_failures.append(f"{name}: {cell(m['fraction_of_bf16_peak'], 100, 1)} % of the bf16 peak (goal >= 40 %)")
            if (m["volume_100_slices_s"] or float("inf")) >= GOALS["volume_100_slices_s"]:
                goal_failures.append(f"{name}: 100 slices in {cell(m['volume_100_slices_s'], digits=3)} s (goal < 0.2 s)")
            if m["update_served_s"] is not None and m["update_served_s"] >= GOALS["update_served_s"]:
                goal_failures.append(f"{name}: update served in {cell(m['update_served_s'], digits=1)} s (goal < 60 s)")
    if device.startswith("cuda"):
        print("\ngoals: " + ("all met" if not goal_failures else "; ".join(goal_failures)))
    print(f"\nJSON: {os.path.join(directory, 'gpu_check.json')}")
    failed = [s for s, outcome in steps["results"].items() if outcome != "ok"]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    run = actions.add_parser("ddp", help="one update through MONAI Label's multi-GPU path")
    run.add_argument("--device", default="cuda")
    run.add_argument("--processes", type=int, default=1)
    run.add_argument("--out", required=True)
    summary = actions.add_parser("report", help="gpu_check.json and the table")
    summary.add_argument("directory")
    args = parser.parse_args(argv)
    if args.action == "ddp":
        return ddp(args.device, args.processes, args.out)
    return report(args.directory)


if __name__ == "__main__":
    sys.exit(main())
