"""The compute paths a GPU server runs, on the device ``SAMFEWSHOT_TEST_DEVICE`` names (default cpu;
scripts/gpu_check.sh sets cuda), for the backbones ``SAMFEWSHOT_TEST_BACKBONES`` lists (default tiny; the check adds
vit_b with random weights in the official layout): every model's forward at the precision and batch the app picks on
that device, and one optimiser step. Asked for cuda on a machine without one, these tests fail; they never skip."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lib.compute import autocast, resolve_precision, torch_device
from lib.configs import MODEL_CONFIGS
from lib.networks.fgnet import FGNet

DEVICE = os.environ.get("SAMFEWSHOT_TEST_DEVICE", "cpu")
BACKBONES = os.environ.get("SAMFEWSHOT_TEST_BACKBONES", "tiny").split(",")
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def random_official_weights(model: str, backbone: str, directory: str) -> dict[str, str]:
    """The --conf that points a non-tiny backbone at random weights in the official file layout (benchmark.py's)."""
    if backbone == "tiny":
        return {}
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPTS / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    if model == "fgnet":
        return {"sam2_variant": "hiera_t", "sam2_checkpoint": benchmark.random_official_sam2_checkpoint("hiera_t", directory)}
    return {"sam_checkpoint": benchmark.random_official_checkpoint(backbone, directory)}


@pytest.fixture(scope="module", params=[(m, b) for b in BACKBONES for m in MODEL_CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def config(request, tmp_path_factory):
    model, backbone = request.param
    directory = str(tmp_path_factory.mktemp(f"{model}-{backbone}"))
    conf = {"backbone": backbone, "engine": "torch", "device": DEVICE, **random_official_weights(model, backbone, directory)}
    config = MODEL_CONFIGS[model]()
    config.init(model, directory, conf, None)
    return config


def batch(config, network, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the app sends it: 8 slices (the CUDA infer batch; 2 to train) or 2 EM patches."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(network, FGNet):
        shape = (2, 1, *config.patch_size)
        return torch.rand(shape, generator=generator), torch.randint(0, 4, shape, generator=generator)
    size = network.spec.img_size
    count = 2 if training else 8
    image = torch.rand(count, 1, size, size, generator=generator)
    return image, torch.randint(0, network.num_classes, (count, 1, size, size), generator=generator)


def test_the_device_is_there():
    assert torch_device(DEVICE) == DEVICE  # raises for cuda without a CUDA device


def test_forward_at_the_app_precision(config):
    device = torch_device(DEVICE)
    network = config.build_network().to(device).eval()
    image, _ = batch(config, network, training=False)
    precision = resolve_precision("auto", device)
    with torch.no_grad(), autocast(precision, device):
        out = network(image.to(device))
    assert out.device.type == torch.device(device).type
    assert out.shape[0] == image.shape[0] and torch.isfinite(out.float()).all()
    if device.startswith("cuda"):
        assert precision == "bf16"  # every GPU the check runs on has bf16


def test_one_training_step_moves_only_the_adapter(config):
    device = torch_device(DEVICE)
    network = config.build_network().to(device).train()
    image, label = batch(config, network, training=True)
    trainable = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in network.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    loss = network.training_loss(network(image.to(device)), label.to(device))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    params = dict(network.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
