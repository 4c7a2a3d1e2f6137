"""What every registered model promises, tested for each name in the registry (a new model is tested by default):
the output shape, which parameters train, gradients only where they train, identical seeded rebuilds, and an
adapter that round-trips through its file into the served network."""

from __future__ import annotations

import pytest
import torch

from lib.adapters import publish_adapter
from lib.configs import MODEL_CONFIGS, SAM_MODELS
from lib.networks.fgnet import FGNet
from lib.networks.lora import adapter_state_dict
from lib.networks.sam_segmenter import SamSegmenter


def example(config, network, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(input, label, expected output shape) for the kind of network."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(network, SamSegmenter):
        size = network.spec.img_size
        label = torch.randint(0, network.num_classes, (batch, 1, size, size), generator=generator)
        return torch.rand(batch, 1, size, size, generator=generator), label, (batch, network.num_classes, size, size)
    if isinstance(network, FGNet):
        x, y, z = config.patch_size
        label = torch.randint(0, 4, (batch, 1, x, y, z), generator=generator)
        return torch.rand(batch, 1, x, y, z, generator=generator), label, (batch, 3, x, y, z)
    raise AssertionError(f"no example input for {type(network).__name__}: add its kind here")


# Every model on the test backbone; the SAM models also on the default one (LiteMedSAM: seconds per step, slow tier).
CASES = [pytest.param((name, "tiny"), id=f"{name}-tiny") for name in MODEL_CONFIGS] + [
    pytest.param((name, "litemedsam"), id=f"{name}-litemedsam", marks=pytest.mark.slow) for name in SAM_MODELS
]


@pytest.fixture(scope="module", params=CASES)
def config(request, tmp_path_factory):
    name, backbone = request.param
    config = MODEL_CONFIGS[name]()
    config.init(name, str(tmp_path_factory.mktemp(name)), {"backbone": backbone, "engine": "torch"}, None)
    return config


def test_output_shape(config):
    network = config.build_network().eval()
    image, _, shape = example(config, network)
    with torch.no_grad():
        assert network(image).shape == shape


def test_only_lora_and_the_declared_modules_train_and_get_gradients(config):
    network = config.build_network().train()
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(network.parameters()))
    assert all("lora_" in n or n.startswith(network.trainable_prefixes) for n in trainable)

    image, label, _ = example(config, network)
    network.training_loss(network(image), label).backward()
    for name, p in network.named_parameters():
        assert p.requires_grad or p.grad is None, name
    moved = {n for n, p in network.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad)}
    assert {prefix for prefix in network.trainable_prefixes if any(n.startswith(prefix) for n in moved)}


def test_seeded_rebuild_is_identical_and_leaves_the_global_rng_alone(config):
    rng = torch.get_rng_state()
    a, b = config.build_network().state_dict(), config.build_network().state_dict()
    assert torch.equal(rng, torch.get_rng_state())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_round_trip_into_the_served_network(config):
    network = config.build_network().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    assert publish_adapter(config.model.adapter_path, adapter_state_dict(network), config.model.adapter_config()) == 1
    served, version = config.model.resident("cpu")
    image, _, _ = example(config, network, batch=1)
    with torch.no_grad():
        assert version == 1 and torch.allclose(served(image), network(image), atol=1e-5)
