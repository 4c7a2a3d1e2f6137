"""scripts/gpu_check.sh: on a machine without CUDA it refuses to run the GPU check (exit 3, saying why) and runs the
whole check on the CPU with --cpu, so the script keeps working where no GPU is."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from lib.configs import MODEL_CONFIGS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def test_without_cuda_the_gpu_check_fails_loudly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the check would run for real")
    run = subprocess.run([str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "CUDA was asked for" in run.stderr and "--cpu" in run.stderr


def test_unknown_option_is_refused(tmp_path):
    run = subprocess.run([str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown option --gpu" in run.stderr


@pytest.mark.slow
def test_the_check_runs_on_the_cpu(tmp_path):
    run = subprocess.run([str(SCRIPT), "--cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["device"] == "cpu" and summary["device_name"]
    assert set(summary["steps"].values()) == {"ok"}
    assert set(summary["models"]) == set(MODEL_CONFIGS)
    assert all(m["slices_per_s"] > 0 and m["update_served_s"] > 0 for m in summary["models"].values())
    assert summary["ddp"]["backend"] == "gloo" and summary["ddp"]["adapter_version"] == 1
    assert "model | backbone | precision" in run.stdout
