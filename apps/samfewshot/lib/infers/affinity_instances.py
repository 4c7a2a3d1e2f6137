"""EM volume -> neuron instance label: FGNet's refined affinities by sliding window, then seeded watershed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import waterz
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import Activationsd
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed
from torch import nn

from lib.checks.requests import infer_option
from lib.engines.openvino_engine import EncoderEngine
from lib.errors import http_errors
from lib.infers.resident import ResidentModelInfer
from lib.networks.affinities import AFFINITY_AXES
from lib.served_model import ServedModel
from lib.transforms import boundary_map, em_volume_transforms


def affinity_watershed(
    affinity: np.ndarray | torch.Tensor,
    seed_affinity: float = 0.9,
    merge_affinity: float = 0.3,
    min_fragment_size: int = 50,
    seed_fraction: float = 0.2,
) -> np.ndarray:
    """(3, X, Y, Z) affinities in [0, 1] -> (X, Y, Z) uint32 instance ids 1..N.

    1. Seeds: face-connected components of voxels whose six incident edges average at least ``seed_affinity``.
       On a perfect map every voxel beside a boundary scores at most 5/6, so seeds of touching cells never meet.
       A model not yet confident anywhere (early in fine-tuning) still gets seeds: the threshold is relaxed to the
       ``seed_fraction`` most interior voxels when fewer pass it.
    2. Watershed of the voxel boundary map (``boundary_map``) from the seeds: fragments, rather too many than too
       few (a weak section-to-section affinity cuts a neurite into per-section pieces).
    3. Agglomeration (``agglomerate``): the neighbouring pair with the highest mean contact affinity merges, again
       and again, until no pair averages above ``merge_affinity``. The default thresholds had the lowest VOI on
       the labelled EM samples (scripts/tune_agglomeration.py, docs/benchmarks.md).
    4. Fragments under ``min_fragment_size`` voxels dissolve into their neighbours (flooded again), so every voxel
       keeps a cell and no specks remain.
    """
    affinity = torch.as_tensor(affinity, dtype=torch.float32)
    boundary = boundary_map(affinity).numpy()
    threshold = max(1 - seed_affinity, float(np.quantile(boundary, seed_fraction)))
    seeds, _ = ndimage.label(boundary <= threshold)
    fragments = watershed(boundary, markers=seeds)
    instances = agglomerate(fragments, affinity, merge_affinity)
    sizes = np.bincount(instances.ravel())
    small = sizes < min_fragment_size
    small[0] = False
    if small.any() and not small[1:].all():
        instances[small[instances]] = 0
        instances = watershed(boundary, markers=instances)
    return relabel_sequential(instances)[0].astype(np.uint32)


def agglomerate(fragments: np.ndarray, affinity: torch.Tensor, merge_affinity: float) -> np.ndarray:
    """Iterative mean-affinity agglomeration of fragments (ids >= 1): repeatedly merge the adjacent pair whose
    contact edges have the highest mean affinity, a merged region's contacts pooling their edges (so the mean is
    weighted by contact area), until no pair averages above ``merge_affinity``.

    Why iterative: merging every pair above the threshold at once (single linkage) joins two cells through any
    fragment that touches both strongly; here, once that fragment has joined one cell, its strong contact is pooled
    with the cells' weak common face and the pair stays apart. This is waterz's mean-affinity rule (Funke et al.,
    2018), run by waterz itself: a maintained, compiled implementation with binary wheels. scikit-image's
    ``merge_hierarchical`` gives the same partition but took 7.8 s for 4700 fragments of a 256x256x64 volume,
    waterz 0.26 s. waterz prints its progress to stdout and has no switch to silence it.
    """
    # waterz pairs affinity channel d with spatial axis d; ours pair with AFFINITY_AXES.
    axes = [axis % 3 for axis in AFFINITY_AXES]
    affs = torch.as_tensor(affinity, dtype=torch.float32).permute(0, *(1 + a for a in axes))
    segments = np.ascontiguousarray(fragments.transpose(axes), dtype=np.uint64)
    merged = next(waterz.agglomerate(np.ascontiguousarray(affs.numpy()), [1 - merge_affinity], fragments=segments))
    return merged.transpose(np.argsort(axes)).astype(np.int64)


class AffinityWatershedd:
    """Dictionary transform: ``pred`` (3, X, Y, Z) affinity probabilities -> (X, Y, Z) instance ids, with the
    number of instances in ``data['instances']``."""

    def __init__(self, seed_affinity: float, merge_affinity: float, min_fragment_size: int):
        self.seed_affinity = seed_affinity
        self.merge_affinity = merge_affinity
        self.min_fragment_size = min_fragment_size

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        with http_errors():
            seed = infer_option(d, "seed_affinity", self.seed_affinity)
            merge = infer_option(d, "merge_affinity", self.merge_affinity)
            min_size = infer_option(d, "min_fragment_size", self.min_fragment_size)
        instances = affinity_watershed(d["pred"].detach().cpu(), seed, merge, min_size)
        d["instances"] = int(instances.max())
        # The image's meta carries the affine the writer stores; ids need 16 or 32 bits, never the default 8.
        d["pred"] = MetaTensor(torch.from_numpy(instances.astype(np.int64)), meta=d["image"].meta)
        d["result_dtype"] = np.uint16 if d["instances"] < 2**16 else np.uint32
        return d


class EncodedBy(nn.Module):
    """``network`` with its image encoder replaced by ``encoder``: forward(x) = network(x, encode=encoder)."""

    def __init__(self, network: nn.Module, encoder: Callable):
        super().__init__()
        self.network = network
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, encode=self.encoder)


class AffinityInstances(ResidentModelInfer):
    """Any MONAI-readable EM volume (section axis last) -> percentile-normalised -> FGNet refined affinities over
    overlapping patches (Gaussian-weighted) -> seeded watershed -> instance label on the input's own grid.

    Request options: ``seed_affinity`` (default 0.9), ``merge_affinity`` (0.3), ``min_fragment_size`` in voxels (50),
    ``sw_overlap`` (0.25).

    Args:
        model: the served FGNet model.
        patch_size: (X, Y, Z) sliding-window patch in voxels, X and Y multiples of 32; the engine compiles for (X, Y).
        device: the default device requests run on, and the resident network lives on (``cpu``, ``cuda`` ...).
        batch_size: patches per forward of the sliding window.
        seed_affinity: default mean affinity a voxel needs to seed the watershed (in (0, 1]); a request may override it.
        merge_affinity: default mean contact affinity at which the iterative agglomeration stops (in [0, 1]).
        min_fragment_size: default size in voxels below which an instance dissolves into its neighbours.
        description: the task's description in MONAI Label; default names the model and its backbone.
        preload: build the resident network (and start the engine's build) at start-up rather than on the first request.
        engine: compiles FGNet's SAM2 section encoder for CPU requests; None runs torch throughout.
    """

    def __init__(
        self,
        model: ServedModel,
        patch_size: Sequence[int],
        device: str = "cpu",
        batch_size: int = 2,
        seed_affinity: float = 0.9,
        merge_affinity: float = 0.3,
        min_fragment_size: int = 50,
        description: str = "",
        preload: bool = False,
        engine: EncoderEngine | None = None,
    ):
        self.patch_size = tuple(patch_size)
        self.batch_size = batch_size
        self.seed_affinity = seed_affinity
        self.merge_affinity = merge_affinity
        self.min_fragment_size = min_fragment_size
        super().__init__(
            model,
            engine=engine,
            preload=preload,
            description=description or f"{model.name} ({model.backbone}) neuron instances from 3D affinities",
            config={
                "device": device,
                "seed_affinity": seed_affinity,
                "merge_affinity": merge_affinity,
                "min_fragment_size": min_fragment_size,
                "sw_overlap": 0.25,
            },
        )

    def encoding_graph(self, network: nn.Module) -> nn.Module:
        return network.image_encoding(self.patch_size[:2])

    def _get_network(self, device, data):
        """The resident FGNet, its SAM2 section encoder run by the engine once that is ready for the served adapter."""
        network = super()._get_network(device, data)
        compiled = self.compiled_encoder(device) if data is not None else None
        if data is not None:
            data["engine"] = compiled.label if compiled else "torch"
        return EncodedBy(network, compiled) if compiled else network

    def pre_transforms(self, data=None) -> list:
        return em_volume_transforms()

    def inferer(self, data=None) -> Inferer:
        with http_errors():
            overlap = infer_option(data or {}, "sw_overlap", 0.25)
        return SlidingWindowInferer(
            roi_size=self.patch_size, sw_batch_size=self.batch_size, overlap=overlap, mode="gaussian", progress=False
        )

    def inverse_transforms(self, data=None):
        return None  # no geometric transform ran: the instances are already on the input's grid

    def post_transforms(self, data=None) -> list:
        return [
            Activationsd(keys="pred", sigmoid=True),
            AffinityWatershedd(self.seed_affinity, self.merge_affinity, self.min_fragment_size),
        ]

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        result_file, result_json = super().writer(data, extension, dtype)
        result_json["instances"] = data.get("instances", 0)
        return result_file, result_json
