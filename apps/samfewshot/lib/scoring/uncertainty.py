"""Predictive uncertainty of a SAM segmenter: mean softmax over test-time flips and Monte-Carlo dropout."""

from __future__ import annotations

import math

import torch
from torch import nn

from lib.transforms.labels import argmax_labels

# Identity, left-right and anterior-posterior flips of an axial slice (B, C, H, W).
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,))


@torch.no_grad()
def tta_probabilities(
    network: nn.Module, slices: torch.Tensor, mc_samples: int = 1, dropout: float = 0.0, batch_size: int = 8
) -> torch.Tensor:
    """slices (N, 1, S, S) -> mean class probabilities (N, K, S, S) over ``FLIPS`` x ``mc_samples`` passes with
    Monte-Carlo dropout ``dropout`` on the decoder (0: flips only)."""
    if len(slices) == 0:
        raise ValueError("no slices to estimate uncertainty on")
    network.mc_dropout = dropout
    try:
        total = None
        for start in range(0, len(slices), batch_size):
            x = slices[start : start + batch_size]
            mean = 0
            for flip in FLIPS:
                for _ in range(mc_samples):
                    logits = network(torch.flip(x, flip) if flip else x)
                    mean = mean + torch.softmax(torch.flip(logits, flip) if flip else logits, dim=1).float()
            mean = mean / (len(FLIPS) * mc_samples)
            total = mean if total is None else torch.cat([total, mean])
        return total
    finally:
        network.mc_dropout = 0.0


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) probabilities -> (N, ...) entropy / log K, in [0, 1]."""
    k = probabilities.shape[1]
    return -(probabilities * probabilities.clamp_min(1e-8).log()).sum(1) / math.log(k)


def foreground_uncertainty(probabilities: torch.Tensor) -> float:
    """Mean normalised entropy over the voxels predicted as foreground, so empty slices do not dilute it; the
    mean over all voxels when nothing is predicted."""
    entropy = normalised_entropy(probabilities)
    foreground = argmax_labels(probabilities, 1).squeeze(1) > 0
    return float(entropy[foreground].mean() if foreground.any() else entropy.mean())


def class_entropies(probabilities: torch.Tensor) -> list[float]:
    """Per foreground class k, the normalised entropy averaged with the class's own probability as weight:
    defined for every class, also one the model does not predict anywhere yet (ClaSP PE's class stratification)."""
    entropy = normalised_entropy(probabilities)
    weights = probabilities[:, 1:].flatten(2).transpose(0, 1).flatten(1)  # (K-1, N*H*W)
    return ((weights * entropy.flatten()[None]).sum(1) / weights.sum(1).clamp_min(1e-8)).tolist()
