"""scripts/benchmark.py reports every figure docs/benchmarks.md records, from one run. Values are not asserted
(timings belong in the benchmark); the test checks that each figure is there and that they agree with each other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import benchmark  # noqa: E402

pytestmark = pytest.mark.slow


def test_one_run_reports_speed_hardware_limit_update_and_size(tmp_path, sample_data):
    out = tmp_path / "bench.json"
    args = ["--backbone", "tiny", "--slices", "6", "--air-slices", "3", "--in-plane", "160", "--repeats", "1", "--engine", "openvino"]
    assert benchmark.main([*args, "--update-epochs", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())

    positive = [
        "infer_cold_s",
        "infer_warm_s",
        "reinfer_cached_embeddings_s",
        "reference_s_per_slice",
        "paired_network_s_per_slice",
        "gflop_per_slice",
        "fp32_matmul_gflops",
        "bf16_matmul_gflops",
        "update_s",
        "adapter_bytes",
        "peak_rss_mb",
        "click_on_inferred_s",
        "click_decoder_s_per_slice",
        "engine_conversion_s",
        "torch_infer_warm_s",
        "torch_speedup_over_reference",
    ]
    assert all(r[key] > 0 for key in positive), {key: r.get(key) for key in positive}
    assert r["skipped_slices"] == 6  # the air above and below never reaches the network
    assert r["infer_warm_slices_per_s"] == pytest.approx(12 / r["infer_warm_s"])
    assert r["network_slices_per_s"] == pytest.approx(6 / r["infer_warm_s"])
    achieved = r["gflop_per_slice"] * r["network_slices_per_s"]
    assert r["fraction_of_bf16_peak"] == pytest.approx(achieved / r["bf16_matmul_gflops"])
    assert r["fraction_of_peak"] == pytest.approx(achieved / max(r["fp32_matmul_gflops"], r["bf16_matmul_gflops"]))
    assert r["peak_rss_mb"] >= r["peak_rss_infer_mb"] > 0
    assert r["speedup_over_reference"] == pytest.approx(r["infer_warm_slices_per_s"] * r["reference_s_per_slice"])
    assert r["paired_network_speedup"] == pytest.approx(r["reference_s_per_slice"] / r["paired_network_s_per_slice"])
    # the engine's figures beside torch's, from the same run
    assert r["engine"].startswith("openvino-") and r["engine_failure"] == ""
    assert 0.9 < r["label_agreement_with_fp32_torch"] <= 1 and 0.9 < r["torch_label_agreement_with_fp32_torch"] <= 1
    assert r["torch_speedup_over_reference"] == pytest.approx(12 / r["torch_infer_warm_s"] * r["reference_s_per_slice"])
    assert r["adapter_version_served"] == 1  # the update was served by the next request
    assert 0 < r["trainable_parameters"] < r["all_parameters"]
