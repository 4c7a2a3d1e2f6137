"""``scripts/evaluate.py interactive``: the CVPR 2025 interactive challenge's protocol against a real server, with
3D Slicer's requests, for the model's structures and for one it has no label for."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "interactive", *args], capture_output=True, text=True)


def test_box_then_five_clicks_per_structure_through_the_interactive_task(start_server, sample_data, tmp_path):
    server = start_server(("models", "hf_sam"))
    truth = tmp_path / "truth"
    truth.mkdir()
    source = nib.load(str(sample_data / "brain-mri-groundtruth" / "brain_005.nii.gz"))
    ids = np.asarray(source.dataobj).astype(np.uint8)
    ids[40:50, 40:50, 20:26] = 3  # a structure the model has no label for: sent as a new one, named by labels.json
    nib.save(nib.Nifti1Image(ids, source.affine, source.header), str(truth / "brain_005.nii.gz"))
    (truth / "labels.json").write_text(json.dumps({"white matter": 1, "grey matter": 2, "tumour": 3}))

    missing = run("--server", server.url, "--groundtruth", str(truth), "--cases", "brain_006", "--out-dir", str(tmp_path / "x"))
    assert missing.returncode == 2 and "no ground truth for brain_006 (images with some: brain_005)" in missing.stderr

    out = tmp_path / "protocol"
    done = run("--server", server.url, "--groundtruth", str(truth), "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    (row,) = list(csv.DictReader(open(out / "metrics.csv")))
    assert row["CaseName"] == "brain_005" and row["num_class"] == "3" and row["failed_requests"] == "0"
    for step in range(1, 7):
        assert 0 <= float(row[f"DSC_{step}"]) <= 1 and 0 <= float(row[f"NSD_{step}"]) <= 1
        assert float(row[f"RunningTime_{step}"]) > 0
    assert {"DSC_Final white matter", "DSC_Final grey matter", "DSC_Final tumour"} <= set(row)
    # each structure's own last answer: the last id's is what the merged prediction holds of it
    assert {"answer_DSC white matter", "answer_DSC grey matter"} <= set(row) and row["answer_DSC tumour"] == row["DSC_Final tumour"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["mean"]["DSC_Final"] == pytest.approx(float(row["DSC_Final"]))
    assert (out / "dice_vs_interactions.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["dice_vs_interactions.png", "metrics.csv", "summary.json", "summary.md"]
    # 3 structures x (the box, then 5 clicks): each one of 3D Slicer's deepgrow requests
    served = [line for line in server.log().splitlines() if "Infer Request (final)" in line and "'model': 'hf_sam_interactive'" in line]
    assert len(served) == 18 and sum("'label': 'tumour'" in line for line in served) == 6

    # without --groundtruth: the server's final labels are the ground truth
    stored = run("--server", server.url, "--cases", "brain_000", "--out-dir", str(tmp_path / "stored"))
    assert stored.returncode == 0, stored.stderr
    (row,) = list(csv.DictReader(open(tmp_path / "stored" / "metrics.csv")))
    assert row["CaseName"] == "brain_000" and row["num_class"] == "2" and row["failed_requests"] == "0"
