"""The active-learning simulation end to end, in a 2-round smoke configuration.

Checks the bookkeeping (what was picked, from where, how many labelled), not whether a strategy helps: with one
epoch per round the tiny model has barely learned anything. `diversity` stands for the scored strategies: it
runs the app's scoring before each pick, and its embedding scoring costs a sixth of the uncertainty scoring
(one pass per slice instead of flips x MC-dropout samples). The pool is cut to 4 volumes, which still leaves the
strategy a choice in every round.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

POOL = ["brain_000", "brain_002", "brain_003", "brain_005"]
HELD_OUT = ["brain_007"]
STRATEGIES = ["random", "diversity"]
ROUNDS = 2

pytestmark = pytest.mark.slow


def test_two_round_simulation_writes_consistent_rows_and_a_plot(tmp_path, sample_data, capsys):
    sys.path.insert(0, str(SCRIPTS))
    from simulate_active_learning import COLUMNS, main

    argv = ["--strategies", ",".join(STRATEGIES), "--seeds", "0", "--rounds", str(ROUNDS), "--epochs", "1"]
    argv += ["--held-out", *HELD_OUT, "--pool", *POOL, "--out-dir", str(tmp_path)]
    assert main(argv) == 0

    with open(tmp_path / "al_simulation.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == len(STRATEGIES) * (ROUNDS + 1)

    initial = {rows[0]["picked"]}
    for strategy in STRATEGIES:
        run = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: int(r["round"]))
        assert [int(r["round"]) for r in run] == list(range(ROUNDS + 1))
        assert [int(r["labelled_volumes"]) for r in run] == list(range(1, ROUNDS + 2))
        # Round 0 records the seed's initial volume: the same for every strategy of a seed.
        assert {run[0]["picked"]} == initial and initial <= set(POOL)
        picked = [r["picked"] for r in run[1:]]
        assert set(picked) <= set(POOL) - initial  # never held out, never already labelled
        assert len(set(picked)) == len(picked)
        for r in run:
            for key in ("dice_wm", "dice_gm", "dice_mean"):
                assert 0.0 <= float(r[key]) <= 1.0
            assert float(r["train_seconds"]) > 0

    with open(tmp_path / "learning_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert all(s in out for s in STRATEGIES) and "diversity vs random" in out
