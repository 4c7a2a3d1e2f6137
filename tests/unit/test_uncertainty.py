"""Predictive uncertainty: flip + MC-dropout averaged softmax, normalised entropy, foreground score, mc_dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.networks.sam_segmenter import SamSegmenter, build_segmenter
from lib.scoring.uncertainty import foreground_uncertainty, normalised_entropy, tta_probabilities

K = 3


class ToyNet(nn.Module):
    """A small segmenter that is NOT flip-equivariant (asymmetric kernel plus a position ramp), so averaging over
    flips gives something different from the plain softmax; ``mc_dropout`` acts like SamSegmenter's."""

    def __init__(self, k: int = K):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(k, 1, 3, 3, generator=g))
        self.mc_dropout = 0.0
        self.seen_dropout: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_dropout.append(self.mc_dropout)
        h, w = x.shape[-2:]
        ramp = torch.linspace(0, 2, w)[None, None, None, :] + torch.linspace(0, 1, h)[None, None, :, None]
        y = F.conv2d(x, self.weight, padding=1) + ramp * torch.arange(self.weight.shape[0])[None, :, None, None]
        if self.mc_dropout:
            y = F.dropout(y, self.mc_dropout, training=True)
        return y


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.mc_dropout = 0.0
        self.seen_dropout: list[float] = []

    def forward(self, x):
        self.seen_dropout.append(self.mc_dropout)
        raise RuntimeError("boom")


@pytest.fixture
def slices() -> torch.Tensor:
    return torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def _by_hand(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        identity = torch.softmax(net(x), 1)
        left_right = torch.flip(torch.softmax(net(torch.flip(x, (-1,))), 1), (-1,))
        up_down = torch.flip(torch.softmax(net(torch.flip(x, (-2,))), 1), (-2,))
    return (identity + left_right + up_down) / 3


def test_tta_probabilities_shape_and_sum(slices):
    net = ToyNet()
    p = tta_probabilities(net, slices, mc_samples=2, dropout=0.3, batch_size=2)
    assert p.shape == (5, K, 12, 12)
    assert torch.allclose(p.sum(1), torch.ones(5, 12, 12), atol=1e-5)
    assert (p >= 0).all() and (p <= 1).all()


def test_tta_probabilities_without_dropout_is_the_flip_average(slices):
    net = ToyNet()
    expected = _by_hand(net, slices)
    # the network is not flip-equivariant, so this comparison can tell a missing (or un-undone) flip apart
    with torch.no_grad():
        plain = torch.softmax(net(slices), 1)
    assert not torch.allclose(expected, plain, atol=1e-3)

    p = tta_probabilities(net, slices, mc_samples=1, dropout=0.0, batch_size=2)  # 3 batches: 2 + 2 + 1
    assert torch.allclose(p, expected, atol=1e-6)
    again = tta_probabilities(net, slices, mc_samples=3, dropout=0.0, batch_size=8)
    assert torch.equal(p, tta_probabilities(net, slices, mc_samples=1, dropout=0.0, batch_size=2))  # deterministic
    assert torch.allclose(again, expected, atol=1e-6)  # more passes without dropout change nothing
    assert set(net.seen_dropout) == {0.0}


def test_tta_probabilities_with_dropout_is_stochastic_and_resets_it(slices):
    net = ToyNet()
    a = tta_probabilities(net, slices, mc_samples=2, dropout=0.5)
    b = tta_probabilities(net, slices, mc_samples=2, dropout=0.5)
    assert not torch.allclose(a, b)
    assert set(net.seen_dropout) == {0.5}  # every pass ran with dropout on
    assert net.mc_dropout == 0.0  # and it is off again afterwards
    assert net.seen_dropout.count(0.5) == 2 * 3 * 2  # calls x flips x mc samples (one batch of 5)


def test_tta_probabilities_resets_dropout_when_the_network_raises(slices):
    net = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        tta_probabilities(net, slices, mc_samples=2, dropout=0.25)
    assert net.seen_dropout == [0.25]
    assert net.mc_dropout == 0.0


def test_normalised_entropy_uniform_is_one_one_hot_is_zero():
    uniform = torch.full((2, K, 4, 5), 1.0 / K)
    e = normalised_entropy(uniform)
    assert e.shape == (2, 4, 5)
    assert torch.allclose(e, torch.ones_like(e), atol=1e-5)

    one_hot = F.one_hot(torch.randint(0, K, (2, 4, 5), generator=torch.Generator().manual_seed(0)), K).permute(0, 3, 1, 2).float()
    assert torch.allclose(normalised_entropy(one_hot), torch.zeros(2, 4, 5), atol=1e-5)

    # two classes with p = (0.5, 0.5) out of K = 4: entropy log 2 / log 4 = 0.5
    half = torch.tensor([0.5, 0.5, 0.0, 0.0])[None, :, None]
    assert normalised_entropy(half).item() == pytest.approx(0.5, abs=1e-5)


def test_foreground_uncertainty_ignores_background_voxels():
    # 4x4 slice: left half predicted background but nearly uniform, right half confidently foreground
    p = torch.empty(1, K, 4, 4)
    p[:, :, :, :2] = torch.tensor([0.34, 0.33, 0.33])[:, None, None]
    p[:, :, :, 2:] = torch.tensor([0.01, 0.98, 0.01])[:, None, None]
    assert (p.argmax(1)[..., :2] == 0).all() and (p.argmax(1)[..., 2:] == 1).all()
    certain = normalised_entropy(torch.tensor([0.01, 0.98, 0.01])[None, :, None]).item()
    overall = normalised_entropy(p).mean().item()
    assert certain < 0.15 < 0.5 < overall
    score = foreground_uncertainty(p)
    assert isinstance(score, float)
    assert score == pytest.approx(certain, abs=1e-5)


def test_foreground_uncertainty_falls_back_to_all_voxels_without_foreground():
    p = torch.empty(1, K, 2, 2)
    p[:, :, 0] = torch.tensor([0.9, 0.05, 0.05])[:, None]
    p[:, :, 1] = torch.tensor([0.4, 0.3, 0.3])[:, None]
    assert (p.argmax(1) == 0).all()
    expected = normalised_entropy(p).mean().item()
    assert 0 < expected < 1
    assert foreground_uncertainty(p) == pytest.approx(expected, abs=1e-6)


def test_entropy_is_normalised_by_the_number_of_classes():
    coin = torch.tensor([0.5, 0.5])[None, :, None]
    assert normalised_entropy(coin).item() == pytest.approx(1.0, abs=1e-6)
    p = torch.tensor([0.2, 0.8])[None, :, None]
    expected = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / math.log(2)
    assert normalised_entropy(p).item() == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def segmenter() -> SamSegmenter:
    return build_segmenter(SamSegmenter, "tiny", K).eval()


def test_sam_segmenter_mc_dropout(segmenter):
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    assert segmenter.mc_dropout == 0.0 and not segmenter.training
    with torch.no_grad():
        a, b = segmenter(x), segmenter(x)
        assert torch.equal(a, b)  # eval mode, no dropout: deterministic
        segmenter.mc_dropout = 0.3
        try:
            c, d = segmenter(x), segmenter(x)
        finally:
            segmenter.mc_dropout = 0.0
        e = segmenter(x)
    assert c.shape == a.shape == (1, K, 64, 64)
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, a)
    assert torch.equal(e, a)  # switching it off restores the deterministic network
