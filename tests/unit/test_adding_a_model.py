"""Adding a model is what docs/architecture.md says: three files. A throwaway fourth SAM model is written into a copy
of the app exactly there (its network, its config with a --conf key of its own, its name in MODEL_CONFIGS), and the
model contract and the app tests, which take their model lists from the registry, then run on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

NETWORK = '''
import torch
from torch import nn

from lib.networks.sam_backbone import EncoderSpec
from lib.networks.sam_segmenter import SamSegmenter, SliceFeatures


class RefinedSam(SamSegmenter):
    """SAM with a residual 3 x 3 convolution on the upscaled features; forward as ``SamSegmenter``."""

    trainable_prefixes = SamSegmenter.trainable_prefixes + ("refine.",)

    def __init__(self, spec: EncoderSpec, num_classes: int, gain: float = 1.0):
        super().__init__(spec, num_classes)
        self.gain = gain
        self.refine = nn.Conv2d(spec.prompt_dim // 8, spec.prompt_dim // 8, 3, padding=1)

    def refine_upscaled(self, upscaled: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        return upscaled + self.gain * self.refine(upscaled)
'''

CONFIG = """
from typing import Any

from lib.conf import ConfKey, declare_conf_keys
from lib.configs.sam_segmentation import SamSegmentationConfig
from lib.networks.refined_sam import RefinedSam

CONF_KEYS = declare_conf_keys(ConfKey("refined_sam_gain", "0.5", "weight of RefinedSam's refinement", kind=float))


class RefinedSamConfig(SamSegmentationConfig):
    network_cls = RefinedSam

    def network_options(self) -> dict[str, Any]:
        return {"gain": self.conf["refined_sam_gain"]}
"""


def test_a_fourth_model_in_the_three_files_passes_the_contract_and_app_tests(tmp_path):
    app = tmp_path / "samfewshot"
    shutil.copytree(REPO / "apps" / "samfewshot", app, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    (app / "lib" / "networks" / "refined_sam.py").write_text(NETWORK)
    (app / "lib" / "configs" / "refined_sam.py").write_text(CONFIG)
    registry = app / "lib" / "configs" / "__init__.py"
    text = registry.read_text().replace('"fgnet": FGNetConfig}', '"fgnet": FGNetConfig, "refined_sam": RefinedSamConfig}')
    registry.write_text("from .refined_sam import RefinedSamConfig\n" + text)

    tests = ["tests/unit/test_model_contract.py", "tests/app/test_app.py", "tests/unit/test_conf.py::test_defaults_are_typed"]
    picked = "refined_sam and not litemedsam or info_lists or defaults_are_typed"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", picked],
        cwd=REPO,
        env={**os.environ, "SAMFEWSHOT_APP_DIR": str(app)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    # on the new model: the contract (4 tests; its --conf key is read when the network is built), the app's infer
    # (2 formats), prompts and train-and-serve; /info/ listing it, and its key's typed default
    assert "10 passed" in summary and "skipped" not in summary, summary
