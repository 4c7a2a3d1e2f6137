"""Nearest-neighbour affinities of an instance label (FGNet's targets and its boundary map; z, y and x offsets).

Arrays are in MONAI's (X, Y, Z) order with Z the section axis; affinity channel 0 is the z offset, 1 the y
offset, 2 the x offset, as connectomics tools order them. Channel c at voxel v describes the edge between v and
its predecessor v - e along that axis.
"""

from __future__ import annotations

import torch

#: spatial axis (counted from the end of an (..., X, Y, Z) array) of affinity channels z, y, x
AFFINITY_AXES = (-1, -2, -3)


def instance_affinities(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (..., X, Y, Z) integer instance ids, 0 = unlabelled -> (affinity, mask), each (..., 3, X, Y, Z) float.

    affinity = 1 where v and v - e carry the same non-zero id, else 0. mask = 1 where both are labelled: an edge
    touching an unlabelled voxel, or leaving the array (the first plane of each axis), teaches nothing.
    """
    if labels.dtype.is_floating_point:
        labels = labels.round().long()
    shape = (*labels.shape[:-3], 3, *labels.shape[-3:])
    affinity = torch.zeros(shape, dtype=torch.float32, device=labels.device)
    mask = torch.zeros_like(affinity)
    for channel, axis in enumerate(AFFINITY_AXES):
        n = labels.shape[axis]
        current, previous = labels.narrow(axis, 1, n - 1), labels.narrow(axis, 0, n - 1)
        labelled = (current != 0) & (previous != 0)
        affinity.select(-4, channel).narrow(axis, 1, n - 1).copy_(labelled & (current == previous))
        mask.select(-4, channel).narrow(axis, 1, n - 1).copy_(labelled)
    return affinity, mask


def boundary_map(affinity: torch.Tensor) -> torch.Tensor:
    """(3, X, Y, Z) affinities in [0, 1] -> (X, Y, Z) boundary strength: 1 - mean affinity over the six edges
    that touch each voxel (both neighbours per axis), so both sides of a boundary light up. Edges leaving the
    volume count as connected."""
    total = torch.zeros(affinity.shape[1:], dtype=affinity.dtype, device=affinity.device)
    for channel, axis in enumerate(AFFINITY_AXES):
        a = affinity[channel]
        n = a.shape[axis]
        total += a  # edge to the predecessor (the first plane's is outside the volume and reads as 0 -> fixed below)
        total.narrow(axis, 0, 1).add_(1 - a.narrow(axis, 0, 1))
        following = torch.ones_like(a)
        following.narrow(axis, 0, n - 1).copy_(a.narrow(axis, 1, n - 1))
        total += following
    return 1 - total / 6
