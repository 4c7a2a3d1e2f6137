"""FGNet: affinities, module shapes, trainable parameters, the SAM2 checkpoint loader, watershed, a short fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.infers.affinity_instances import affinity_watershed, agglomerate
from lib.networks.affinities import AFFINITY_AXES, boundary_map, instance_affinities
from lib.networks.fgnet import (
    FeatureGuidedAttention,
    FGNet,
    FineGrainedEncoder,
    SamSectionFeatures,
    balanced_affinity_loss,
    build_fgnet,
)
from lib.networks.sam2_backbone import HIERA_VARIANTS, build_sam2_image_encoder
from lib.networks.sam_backbone import CheckpointError
from lib.weights import load_sam2_encoder_file

TINY = HIERA_VARIANTS["tiny"]


def cells(shape=(64, 64, 8), seed=0, count=12) -> torch.Tensor:
    """Space-filling instance label: nearest of ``count`` random column centres (cells run along z), ids 1..count."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, shape[0], size=(count, 2))
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    dist = (xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2
    plane = dist.argmin(-1) + 1
    return torch.as_tensor(np.repeat(plane[..., None], shape[2], axis=-1))


def test_affinities_of_a_hand_made_label():
    # (X, Y, Z) = (3, 3, 2); cell 2 occupies the last column of the first section only; 0 is unlabelled.
    label = torch.tensor([[[1, 1], [1, 1], [2, 1]], [[1, 1], [1, 1], [2, 1]], [[0, 0], [3, 3], [3, 3]]])
    affinity, mask = instance_affinities(label)
    assert affinity.shape == mask.shape == (3, 3, 3, 2)
    z, y, x = affinity
    # z offset: voxel (i, j, 1) vs (i, j, 0); the first section has no predecessor.
    assert z[..., 0].sum() == 0 and mask[0][..., 0].sum() == 0
    assert z[..., 1].tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert mask[0][..., 1].tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1]]
    # y offset: (i, j) vs (i, j - 1) in section 0.
    assert y[..., 0].tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert mask[1][..., 0].tolist() == [[0, 1, 1], [0, 1, 1], [0, 0, 1]]
    # x offset: (i, j) vs (i - 1, j) in section 0; row 2 meets the unlabelled voxel and cell 3.
    assert x[..., 0].tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert mask[2][..., 0].tolist() == [[0, 0, 0], [1, 1, 1], [0, 1, 1]]


def test_affinities_batch_and_boundary_map():
    label = cells((32, 32, 4))
    batched, _ = instance_affinities(torch.stack([label, label]))
    single, _ = instance_affinities(label)
    assert batched.shape == (2, 3, 32, 32, 4) and torch.equal(batched[1], single)
    interior = (boundary_map(single) == 0).numpy()
    # A voxel is interior exactly when its six neighbours inside the volume carry its id.
    lab = label.numpy()
    padded = np.pad(lab, 1, mode="edge")
    same = np.ones(lab.shape, dtype=bool)
    for axis in range(3):
        for shift in (-1, 1):
            same &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1] == lab
    assert np.array_equal(interior, same) and 0 < same.mean() < 1


def test_module_shapes():
    x = torch.rand(2, 1, 64, 96, 4)
    sam = SamSectionFeatures(TINY, out_channels=24, section_batch=3)
    assert sam(x).shape == (2, 24, 16, 24, 4)
    f0, f1, f2 = FineGrainedEncoder((8, 16, 24))(x)
    assert f0.shape == (2, 8, 64, 96, 4) and f1.shape == (2, 16, 32, 48, 4) and f2.shape == (2, 24, 16, 24, 4)
    fga = FeatureGuidedAttention(16, 24, num_heads=4, window=8)
    assert fga(f1, torch.rand(2, 24, 32, 48, 4)).shape == f1.shape
    model = FGNet(TINY)
    model.train()
    assert model(x).shape == (2, 6, 64, 96, 4)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 64, 96, 4)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 1, 48, 64, 4))


def test_feature_guided_attention_stays_in_its_window_and_section():
    torch.manual_seed(0)
    fga = FeatureGuidedAttention(8, 8, num_heads=2, window=4).eval()
    fine, guide = torch.rand(1, 8, 8, 8, 2), torch.rand(1, 8, 8, 8, 2)
    changed = guide.clone()
    changed[:, :, :4, :4, 0] += 1.0  # one window of section 0
    with torch.no_grad():
        delta = (fga(fine, changed) - fga(fine, guide)).abs().sum(dim=1)
    # The gate's 3x3x3 conv reaches one voxel beyond the window; attention itself never leaves it.
    assert delta[0, :4, :4, 0].min() > 0
    assert delta[0, 5:, :, :].max() == 0 and delta[0, :, 5:, :].max() == 0


def test_frozen_and_trainable_parameters():
    frozen = build_fgnet("tiny", lora_rank=0)
    encoder = {n for n, _ in frozen.named_parameters() if n.startswith("sam.encoder.")}
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert encoder and not encoder & trainable
    assert {n.split(".")[0] for n in trainable} == {
        "sam",
        "fge",
        "fga_low",
        "fga_high",
        "up_low",
        "up_high",
        "merge_low",
        "merge_high",
        "coarse_head",
        "refined_head",
    }
    assert all(n.startswith("sam.projections.") for n in trainable if n.startswith("sam."))

    lora = build_fgnet("tiny", lora_rank=4)
    lora_trainable = {n for n, p in lora.named_parameters() if p.requires_grad and n.startswith("sam.encoder.")}
    assert lora_trainable and all("lora_" in n and ".attn.qkv." in n for n in lora_trainable)


def test_official_sam2_checkpoint_loads_through_the_loader(tmp_path):
    from sam2.build_sam import build_sam2

    torch.manual_seed(1)
    official = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", apply_postprocessing=False)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, path)

    encoder = build_sam2_image_encoder(HIERA_VARIANTS["hiera_t"])
    load_sam2_encoder_file(encoder, str(path), HIERA_VARIANTS["hiera_t"])
    reference = official.image_encoder.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in encoder.state_dict().items())
    assert (tmp_path / "sam2.1_hiera_tiny.pt.sha256").exists()  # hash pinned on first use

    with pytest.raises(CheckpointError, match="holds a hiera_t Hiera .* sam2_variant is hiera_s.*--conf sam2_variant hiera_t"):
        load_sam2_encoder_file(build_sam2_image_encoder(HIERA_VARIANTS["hiera_s"]), str(path), HIERA_VARIANTS["hiera_s"])
    with pytest.raises(CheckpointError, match="expected 0+"):
        load_sam2_encoder_file(encoder, str(path), HIERA_VARIANTS["hiera_t"], sha256="0" * 64)

    with open(path, "r+b") as f:  # damage the file after its hash was pinned
        f.seek(1000)
        f.write(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt, partial or replaced"):
        load_sam2_encoder_file(encoder, str(path), HIERA_VARIANTS["hiera_t"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sam2_encoder_file(encoder, str(tmp_path / "missing.pt"), HIERA_VARIANTS["hiera_t"])
    junk = tmp_path / "junk.pt"
    torch.save({"model": {"foo": torch.zeros(1)}}, junk)
    with pytest.raises(CheckpointError, match="not a SAM2 checkpoint"):
        load_sam2_encoder_file(encoder, str(junk), HIERA_VARIANTS["hiera_t"])


def test_watershed_recovers_instances_from_perfect_affinities():
    from lib.evaluation import instance_scores

    label = cells((64, 64, 8), seed=3)
    affinity, _ = instance_affinities(label)
    instances = affinity_watershed(affinity, seed_affinity=0.9, min_fragment_size=10)
    assert instances.shape == tuple(label.shape) and instances.dtype == np.uint32
    assert instances.min() == 1 and instances.max() == label.max()
    scores = instance_scores(instances, label.numpy())
    assert scores["voi_split"] < 0.05 and scores["voi_merge"] < 0.05 and scores["arand"] < 0.01


def test_watershed_dissolves_small_fragments_and_handles_no_seeds():
    label = cells((32, 32, 4), seed=1, count=4)
    affinity, _ = instance_affinities(label)
    affinity[:, 10:12, 10:12, :] = 0.0  # an isolated speck of low affinity inside a cell
    instances = affinity_watershed(affinity, seed_affinity=0.9, min_fragment_size=50)
    assert np.bincount(instances.ravel())[1:].min() >= 50
    assert len(np.unique(instances)) == label.max()
    # An unsure model still gets instances: seeds from its most interior voxels (none reaches 0.9; its boundaries,
    # at 0.2, stay below the default merge_affinity).
    unsure = 0.2 + 0.5 * affinity
    assert len(np.unique(affinity_watershed(unsure, seed_affinity=0.9, min_fragment_size=50))) == label.max()


def test_agglomeration_joins_fragments_by_their_contact_affinity():
    label = cells((32, 32, 4), seed=2, count=5)
    affinity, _ = instance_affinities(label)
    per_section = (label + label.max() * torch.arange(4)).numpy()  # every cell cut into one fragment per section
    merged = agglomerate(per_section, affinity, merge_affinity=0.5)
    pairs = np.unique(np.stack([merged.ravel(), label.numpy().ravel()]), axis=1)
    assert len(np.unique(merged)) == label.max() == pairs.shape[1]  # one merged id per cell, and back
    # Weak section-to-section affinity (below the threshold) keeps the fragments apart.
    weak = affinity.clone()
    weak[0] *= 0.4
    assert len(np.unique(agglomerate(per_section, weak, merge_affinity=0.5))) == len(np.unique(per_section))


def test_agglomeration_pools_contacts_instead_of_chaining():
    # Two cells, A (x < 4) and C (x >= 4, over-segmented into C1 and C2 at y = 4), with a weak common face; a small
    # fragment B on that face (x 3..4, y 0..1) touches A and C1 strongly.
    A, B, C1, C2 = 1, 2, 3, 4
    fragments = np.full((8, 8, 2), A)
    fragments[4:, :4], fragments[4:, 4:], fragments[3:5, :2] = C1, C2, B
    pair_affinity = {(A, B): 0.9, (B, C1): 0.8, (C1, C2): 0.7, (A, C1): 0.1, (A, C2): 0.1}
    labels = torch.as_tensor(fragments)
    affinity = torch.ones((3, *labels.shape))
    for channel, axis in enumerate(AFFINITY_AXES):
        n = labels.shape[axis]
        current, previous = labels.narrow(axis, 1, n - 1), labels.narrow(axis, 0, n - 1)
        edges = affinity[channel].narrow(axis, 1, n - 1)  # a view: writes go into ``affinity``
        for (a, b), value in pair_affinity.items():
            edges[((current == a) & (previous == b)) | ((current == b) & (previous == a))] = value
    # A-B, B-C1 and C1-C2 all average above 0.5, so merging every such pair at once (single linkage) joins all four.
    # Iteratively: A+B first (0.9); then C1+C2 (0.7, above (A+B)-C1's 0.52); (A+B)-(C1+C2) then pools B's 6 strong
    # edges with the 12 weak ones of the A-C face, (6 * 0.8 + 12 * 0.1) / 18 = 0.33, and the cells stay apart.
    merged = agglomerate(fragments, affinity, merge_affinity=0.5)
    assert merged[0, 0, 0] == merged[3, 0, 0] != merged[4, 2, 0] == merged[4, 7, 0]
    assert len(np.unique(merged)) == 2


def test_balanced_loss_ignores_unlabelled_edges():
    target = torch.zeros(1, 3, 4, 4, 2)
    mask = torch.zeros_like(target)
    logits = torch.randn_like(target, requires_grad=True)
    loss = balanced_affinity_loss(logits, target, mask)
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().sum() == 0


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = build_fgnet("tiny", lora_rank=0).train()
    label = cells((64, 64, 8), seed=5)[None, None]
    boundary = boundary_map(instance_affinities(label[0, 0])[0])
    image = (0.7 - 0.5 * (boundary > 0).float() + 0.05 * torch.randn(boundary.shape))[None, None]
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.training_loss(model(image), label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
