"""scripts/adapters.py: list published versions and serve an earlier one again."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import adapters  # noqa: E402

from lib.adapters import publish_adapter, read_adapter  # noqa: E402


def test_list_and_restore(tmp_path, capsys):
    path = str(tmp_path / "hf_sam.pt")
    config = {"model": "hf_sam", "backbone": "tiny"}
    publish_adapter(path, {"w": torch.ones(2)}, config, {"metric_name": "val_mean_dice", "metric": 0.5})
    publish_adapter(path, {"w": torch.zeros(2)}, config, {"metric_name": "val_mean_dice", "metric": 0.4})

    assert adapters.main(["list", "hf_sam", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  v0001" in out and "* v0002" in out and "val_mean_dice 0.5000" in out

    assert adapters.main(["restore", "hf_sam", "1", "--model-dir", str(tmp_path)]) == 0
    assert "served again as version 3" in capsys.readouterr().out
    served = read_adapter(path)
    assert served["version"] == 3 and served["info"]["restored_from"] == 1
    assert torch.equal(served["state_dict"]["w"], torch.ones(2))


def test_empty_model_dir_says_base_weights_are_served(tmp_path, capsys):
    assert adapters.main(["list", "hf_sam", "--model-dir", str(tmp_path)]) == 0
    assert "base weights are served" in capsys.readouterr().out


def test_a_kept_candidate_is_listed_and_can_be_served(tmp_path, capsys):
    from lib.adapters import keep_candidate

    path = str(tmp_path / "hf_sam.pt")
    config = {"model": "hf_sam", "backbone": "tiny"}
    publish_adapter(path, {"w": torch.ones(2)}, config, {"metric_name": "val_mean_dice", "metric": 0.5})
    info = {"metric_name": "val_mean_dice", "metric": 0.3, "served_metric": 0.5}
    kept = keep_candidate(path, {"w": torch.zeros(2)}, config, info, "20261203_101500")

    assert adapters.main(["list", "hf_sam", "--model-dir", str(tmp_path)]) == 0
    assert f"candidate {kept}: val_mean_dice 0.3000, served then 0.5000" in capsys.readouterr().out
    assert adapters.main(["restore", "hf_sam", "--candidate", kept, "--model-dir", str(tmp_path)]) == 0
    assert "is served as version 2" in capsys.readouterr().out
    served = read_adapter(path)
    assert torch.equal(served["state_dict"]["w"], torch.zeros(2)) and served["info"]["served_from_candidate"] == Path(kept).name
    # a published version is not a candidate
    assert adapters.main(["restore", "hf_sam", "--candidate", path, "--model-dir", str(tmp_path)]) == 1
    assert "not a kept candidate" in capsys.readouterr().err
