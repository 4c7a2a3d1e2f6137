"""The active-learning simulation and the forgetting curve, end to end on a tiny budget: a small cohort from the
sample-data script, one training epoch per round, two seeds (so the intervals are computed)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    manifest = load("prepare_sample_data").generate_cohort(out, seed=0, count=6, spacing=3.0)
    assert {v["contrast"] for v in manifest["volumes"]} <= {"T1", "T2", "FLAIR"}
    assert json.loads((out / "brain-mri-cohort-groundtruth" / "labels.json").read_text())["lesion"] == 3
    return out / "brain-mri-cohort"


def test_simulation_writes_rounds_curves_and_intervals(cohort, tmp_path, monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    sim = load("simulate_active_learning")
    out = tmp_path / "al"
    args = ["--images", str(cohort), "--strategies", "random-fg,hybrid", "--seeds", "0", "1", "--budget", "1", "--epochs", "1"]
    assert sim.main(args + ["--held-out", "mr_005", "--score-slices", "2", "--out-dir", str(out)]) == 0

    rows = list(csv.DictReader(open(out / "al_simulation.csv")))
    assert len(rows) == 2 * 2 * 2  # strategies x seeds x (initial + 1 pick)
    assert {"strategy", "seed", "round", "labelled_volumes", "dice_mean", "dice_lesion"} <= set(rows[0])
    pool = {f"mr_00{i}" for i in range(6)} - {"mr_005"}
    for seed in ("0", "1"):  # every strategy of a seed starts from the same volume and trains alike on it
        first = [r for r in rows if r["seed"] == seed and r["round"] == "0"]
        assert len({(r["picked"], r["dice_mean"]) for r in first}) == 1
        for strategy in ("random-fg", "hybrid"):
            run = sorted((r for r in rows if r["strategy"] == strategy and r["seed"] == seed), key=lambda r: int(r["round"]))
            assert [(r["round"], r["labelled_volumes"]) for r in run] == [("0", "1"), ("1", "2")]
            assert run[1]["picked"] in pool - {run[0]["picked"]}  # never held out, never labelled already
            assert all(0.0 <= float(r["dice_mean"]) <= 1.0 and float(r["train_seconds"]) > 0 for r in run)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "random-fg" and "mr_005" in summary["held_out"]
    hybrid = summary["strategies"]["hybrid"]
    low, high = hybrid["saving_vs_baseline"][1:]
    assert low <= hybrid["saving_vs_baseline"][0] <= high
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_curve_records_the_guard_per_update(cohort, tmp_path, monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    curve = load("forgetting_curve")
    out = tmp_path / "curve"
    args = ["--images", str(cohort), "--held-out", "mr_005", "--initial", "3", "--updates", "1", "--epochs", "1", "--out-dir", str(out)]
    assert curve.main(args) == 0
    rows = list(csv.DictReader(open(out / "forgetting_curve.csv")))
    assert [r["labelled_volumes"] for r in rows] == ["3", "4"]
    assert rows[0]["sentinel_volumes"] == rows[1]["sentinel_volumes"] != ""  # one sentinel for the whole sequence
    # the served adapter after one update is what the next run measured before training
    assert float(rows[1]["sentinel_dice_before"]) == pytest.approx(float(rows[0]["sentinel_dice_after"]), abs=1e-4)
    for r in rows:
        expected = r["candidate_sentinel_dice"] if r["served"] == "True" else r["sentinel_dice_before"]
        assert r["sentinel_dice_after"] == expected
    assert (out / "forgetting_curve.png").stat().st_size > 0
