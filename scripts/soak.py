"""Soak: simulated annotators on a real server for minutes, with training after every saved label.

    .venv/bin/python scripts/soak.py                                    # 3 annotators, 10 minutes, backbone tiny
    .venv/bin/python scripts/soak.py --annotators 2 --minutes 1 --out-dir /tmp/soak   # a quick look

Starts ``monailabel start_server`` on a free loopback port, on private copies of the app and of the sample brain-MRI
datastore, with ``auto_train`` on. Each annotator (its own ``MONAILabelClient``, as 3D Slicer uses it) repeats: next
sample (``random``; once every volume is labelled or handed out, a random volume again, as a correction), the
automatic segmentation, 3 to 5 clicks on one structure (3D Slicer's request, points inside the ground truth), the
server's info (a read), and saving the ground truth as the final label. At the end: every label saved last is
downloaded and must be byte-identical to what was sent, and the served adapter must segment a volume.

Writes results.json, rss.csv, rss.png (the server process's resident memory over time) and server.log to --out-dir and prints a
Markdown table: requests and 5xx per kind, p50/p95 latency, RSS after the first minute and at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "samfewshot")
SAMPLES = os.path.join(REPO, "sample-datasets")
TRUTH = os.path.join(SAMPLES, "brain-mri-groundtruth")
LABEL_INFO = [{"name": "white matter", "idx": 1}, {"name": "grey matter", "idx": 2}]
SLICER_FORMAT = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: str, args) -> tuple[subprocess.Popen, str]:
    app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    shutil.copytree(os.path.join(SAMPLES, "brain-mri"), studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    port = free_port()
    conf = {"models": "hf_sam", "backbone": args.backbone, "auto_train": "true", "max_epochs": str(args.max_epochs)}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app_dir, "--studies", studies]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    log = open(os.path.join(work, "server.log"), "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {work}/server.log")
        try:
            if requests.get(url + "/info/", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer within 300 s; see {work}/server.log")


def stop_server(process: subprocess.Popen) -> None:
    """The server and its training subprocesses (one process group)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


class Recorder:
    """Every request: kind, seconds, HTTP status (0: no answer)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float, int]] = []

    def call(self, kind: str, fn, *args, **kwargs):
        from monailabel.client.client import MONAILabelClientException

        start, status, result = time.perf_counter(), 200, None
        try:
            result = fn(*args, **kwargs)
        except MONAILabelClientException as e:
            status = e.status_code or 0
        except Exception:
            status = 0
        with self.lock:
            self.calls.append((kind, time.perf_counter() - start, status))
        return result if status == 200 else None


def annotate(url: str, images: list[str], deadline: float, recorder: Recorder, saved: dict, seed: int, work: str) -> None:
    import nibabel as nib
    from monailabel.client import MONAILabelClient

    rng = random.Random(seed)
    client = MONAILabelClient(url, tmpdir=tempfile.mkdtemp(dir=work))
    while time.monotonic() < deadline:
        sample = recorder.call("next sample", client.next_sample, "random", {}) or {}
        image = sample.get("id") or rng.choice(images)
        recorder.call("automatic infer", client.infer, "hf_sam", image, dict(SLICER_FORMAT))
        truth_path = os.path.join(TRUTH, f"{image}.nii.gz")
        truth = np.asarray(nib.load(truth_path).dataobj)
        structure = rng.choice(LABEL_INFO)
        inside = np.argwhere(truth == structure["idx"])
        k = int(inside[rng.randrange(len(inside))][2])
        on_slice = inside[inside[:, 2] == k]
        points: list[list[int]] = []
        for _ in range(rng.randint(3, 5)):
            points.append([int(v) for v in on_slice[rng.randrange(len(on_slice))]])
            params = {"label": structure["name"], "foreground": points, "background": [], **SLICER_FORMAT}
            recorder.call("click", client.infer, "hf_sam_interactive", image, params)
        recorder.call("info (read)", client.info)
        with open(truth_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if recorder.call("save label", client.save_label, image, truth_path, "final", {"label_info": LABEL_INFO}) is not None:
            with recorder.lock:
                saved[image] = digest


def sample_rss(pid: int, start: float, stop: threading.Event, rows: list[tuple[float, float]]) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        rows.append((time.monotonic() - start, process.memory_info().rss / 2**20))
        stop.wait(5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--max-epochs", type=int, default=5, help="epochs of each training run a saved label queues")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="soak")
    args = parser.parse_args()
    import requests

    os.makedirs(args.out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="soak-")
    process, url = start_server(work, args)
    stop = threading.Event()
    try:
        images = sorted(f.removesuffix(".nii.gz") for f in os.listdir(TRUTH) if f.endswith(".nii.gz"))
        recorder, saved, rss = Recorder(), {}, []
        start = time.monotonic()
        deadline = start + 60 * args.minutes
        sampler = threading.Thread(target=sample_rss, args=(process.pid, start, stop, rss), daemon=True)
        sampler.start()
        workers = [
            threading.Thread(target=annotate, args=(url, images, deadline, recorder, saved, args.seed + n, work))
            for n in range(args.annotators)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        sampler.join()

        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(url, tmpdir=work)
        lost = []
        for image, digest in sorted(saved.items()):
            answer = requests.get(url + "/datastore/label", params={"label": image, "tag": "final"}, timeout=60)
            if answer.status_code != 200 or hashlib.sha256(answer.content).hexdigest() != digest:
                lost.append(image)
        served = client.info()["models"]["hf_sam"].get("adapter_version")
        runs = requests.get(url + "/train/", params={"all": "true"}, timeout=60).json()
        runs = [r.get("status") for r in runs] if isinstance(runs, list) else [runs.get("status")]
        final = recorder.call("automatic infer", client.infer, "hf_sam", images[0], dict(SLICER_FORMAT))
    finally:
        stop_server(process)

    kinds = defaultdict(list)
    for kind, seconds, status in recorder.calls:
        kinds[kind].append((seconds, status))
    after_first_minute = [mb for t, mb in rss if t >= 60] or [mb for _, mb in rss]
    results = {
        "annotators": args.annotators,
        "minutes": args.minutes,
        "backbone": args.backbone,
        "max_epochs": args.max_epochs,
        "requests": len(recorder.calls),
        "server_errors": sum(1 for _, _, s in recorder.calls if s >= 500 or s == 0),
        "by_kind": {
            kind: {
                "requests": len(v),
                "5xx_or_no_answer": sum(1 for _, s in v if s >= 500 or s == 0),
                "4xx": sum(1 for _, s in v if 400 <= s < 500),
                "p50_s": percentile([t for t, _ in v], 50),
                "p95_s": percentile([t for t, _ in v], 95),
            }
            for kind, v in sorted(kinds.items())
        },
        "labels_saved": len(saved),
        "labels_lost_or_changed": lost,
        "training_runs": {status: runs.count(status) for status in sorted(set(runs), key=str)},
        "served_adapter_version": served,
        "served_adapter_segments": final is not None,
        "rss_mb_after_first_minute": after_first_minute[0] if after_first_minute else None,
        "rss_mb_end": rss[-1][1] if rss else None,
    }
    first, last = results["rss_mb_after_first_minute"], results["rss_mb_end"]
    results["rss_growth_after_first_minute"] = (last - first) / first if first and last else None
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out_dir, "rss.csv"), "w") as f:
        f.write("seconds,rss_mb\n" + "".join(f"{t:.1f},{mb:.1f}\n" for t, mb in rss))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([t / 60 for t, _ in rss], [mb for _, mb in rss])
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"soak: {args.annotators} annotators, backbone {args.backbone}, auto_train")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "rss.png"), dpi=100)

    print("| kind | requests | 5xx or no answer | 4xx | p50 s | p95 s |\n|---|---|---|---|---|---|")
    for kind, r in results["by_kind"].items():
        print(f"| {kind} | {r['requests']} | {r['5xx_or_no_answer']} | {r['4xx']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} |")
    growth = results["rss_growth_after_first_minute"]
    print(
        f"\ntraining runs {results['training_runs']}; "
        f"labels saved {len(saved)}, lost or changed {len(lost)}; served adapter version {served}, segments: "
        f"{results['served_adapter_segments']}; RSS {first:.0f} MiB after the first minute, {last:.0f} MiB at the end "
        f"({100 * growth:+.1f} %)"
    )
    shutil.copy(os.path.join(work, "server.log"), args.out_dir)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
