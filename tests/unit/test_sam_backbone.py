"""SAM ViT backbone: encoder geometry, block taps, official-checkpoint layout and loader errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib.networks.hf_sam import HFSam
from lib.networks.lora import adapter_state_dict
from lib.networks.sam_backbone import (
    OFFICIAL_CHECKPOINTS,
    SAM_ENCODERS,
    CheckpointError,
    build_image_encoder,
    encode_with_taps,
    get_encoder_spec,
)
from lib.networks.sam_segmenter import build_segmenter
from lib.weights import load_official_checkpoint

VIT_B = get_encoder_spec("vit_b")
TINY = get_encoder_spec("tiny")
NUM_CLASSES = 3


# --------------------------------------------------------------------------------------------- encoder shapes


@pytest.mark.parametrize("backbone", ["tiny", "vit_b"])
def test_image_encoder_shapes_and_taps(backbone):
    spec = get_encoder_spec(backbone)
    torch.manual_seed(0)
    encoder = build_image_encoder(spec).eval()
    e = spec.img_size // 16
    assert spec.embedding_size == e
    batch = 2 if backbone == "tiny" else 1  # vit_b at 512 is a few seconds per image on CPU
    x = torch.rand(batch, 3, spec.img_size, spec.img_size)
    taps_wanted = spec.global_attn_indexes[:2]
    with torch.no_grad():
        embedding = encoder(x)
        tapped_embedding, taps = encode_with_taps(encoder, x, taps_wanted)
    assert embedding.shape == (batch, spec.prompt_dim, e, e)
    assert torch.equal(tapped_embedding, embedding)
    assert len(taps) == len(taps_wanted)
    for tap in taps:
        assert tap.shape == (batch, spec.embed_dim, e, e)
    assert not torch.equal(taps[0], taps[1])


def test_taps_are_the_requested_block_outputs_tiny():
    torch.manual_seed(0)
    encoder = build_image_encoder(TINY).eval()
    x = torch.rand(1, 3, TINY.img_size, TINY.img_size)
    wanted = (1, 2)
    with torch.no_grad():
        _, taps = encode_with_taps(encoder, x, wanted)
        h = encoder.patch_embed(x) + encoder.pos_embed
        expected = []
        for i, block in enumerate(encoder.blocks):
            h = block(h)
            if i in wanted:
                expected.append(h.permute(0, 3, 1, 2))
    assert len(taps) == 2
    for tap, ref in zip(taps, expected):
        assert torch.equal(tap, ref)


def test_encode_with_taps_other_blocks_tiny():
    torch.manual_seed(0)
    encoder = build_image_encoder(TINY).eval()
    x = torch.rand(1, 3, TINY.img_size, TINY.img_size)
    with torch.no_grad():
        _, taps_0 = encode_with_taps(encoder, x, (0,))
        _, taps_03 = encode_with_taps(encoder, x, (0, 3))
        _, none = encode_with_taps(encoder, x, ())
    assert len(taps_0) == 1 and len(taps_03) == 2 and none == []
    assert torch.equal(taps_0[0], taps_03[0])
    assert not torch.equal(taps_03[0], taps_03[1])


def test_get_encoder_spec_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        get_encoder_spec("nope")
    message = str(err.value)
    assert "nope" in message
    for name in SAM_ENCODERS:
        assert name in message
    assert {"vit_b", "vit_l", "vit_h", "tiny"} <= set(SAM_ENCODERS)


# --------------------------------------------------------------------------------------- official checkpoint


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout vit_b checkpoint (the segment_anything architecture at 1024, random weights).

    Position embeddings and relative position tables start at zero in segment_anything, so they are filled with
    random values here (otherwise any resizing would pass); the seed differs from build_segmenter's, so no tensor
    can match the app's own random initialisation by chance.
    """
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        sam = sam_model_registry["vit_b"]()
        state = {k: v.detach().clone() for k, v in sam.state_dict().items()}
        del sam
        for k in state:
            if k == "image_encoder.pos_embed" or ".attn.rel_pos_" in k:
                state[k] = torch.randn_like(state[k])
    path = tmp_path_factory.mktemp("official") / "sam_vit_b_random.pth"
    torch.save(state, path)
    yield path, state
    path.unlink()  # ~375 MB; pytest keeps recent tmp dirs around


@pytest.fixture(scope="module")
def loaded_segmenter(official):
    path, _ = official
    return build_segmenter(HFSam, "vit_b", NUM_CLASSES, sam_state=load_official_checkpoint(str(path), VIT_B))


def test_official_layout_is_what_the_loader_expects(official):
    _, state = official
    assert state["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert state["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    assert state["mask_decoder.mask_tokens.weight"].shape == (4, 256)
    assert any(k.startswith("mask_decoder.iou_prediction_head.") for k in state)


def test_load_official_checkpoint_resizes_to_512(official):
    path, state = official
    adapted = load_official_checkpoint(str(path), VIT_B)
    assert set(adapted) == set(state)
    assert adapted["image_encoder.pos_embed"].shape == (1, 32, 32, 768)
    for i in range(VIT_B.depth):
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if i in (2, 5, 8, 11):
                assert adapted[key].shape == (63, 64), key
                # linear resampling of the official table, not a crop or new random values
                expected = F.interpolate(state[key].T[None], size=63, mode="linear", align_corners=False)[0].T
                assert torch.allclose(adapted[key], expected), key
            else:
                assert adapted[key].shape == (27, 64), key
                assert torch.equal(adapted[key], state[key]), key
    # everything else passes through unchanged
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(adapted[key], state[key])


def test_build_segmenter_loads_official_weights(official, loaded_segmenter):
    _, state = official
    model = loaded_segmenter
    enc = model.image_encoder

    # the official fused qkv, split into q, k, v bit for bit; peft keeps q and v as the frozen base layers of their LoRA
    for i in (0, 3):
        qkv = enc.blocks[i].attn.qkv
        weight, bias = state[f"image_encoder.blocks.{i}.attn.qkv.weight"], state[f"image_encoder.blocks.{i}.attn.qkv.bias"]
        for j, part in enumerate((qkv.q.base_layer, qkv.k, qkv.v.base_layer)):
            assert torch.equal(part.weight, weight[j * 768 : (j + 1) * 768])
            assert torch.equal(part.bias, bias[j * 768 : (j + 1) * 768])
        assert torch.equal(enc.blocks[i].attn.rel_pos_h, state[f"image_encoder.blocks.{i}.attn.rel_pos_h"])
    assert torch.equal(enc.neck[0].weight, state["image_encoder.neck.0.weight"])
    assert torch.equal(enc.patch_embed.proj.weight, state["image_encoder.patch_embed.proj.weight"])

    # resized absolute position embedding = bilinear interpolation of the official one
    pos = state["image_encoder.pos_embed"]
    expected = F.interpolate(pos.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert enc.pos_embed.shape == (1, 32, 32, 768)
    assert torch.equal(enc.pos_embed.detach(), expected)
    assert enc.blocks[2].attn.rel_pos_h.shape == (63, 64)

    # one mask token and hypernetwork head per class; class k starts from official token/head k % 4
    decoder = model.mask_decoder
    official_tokens = state["mask_decoder.mask_tokens.weight"]
    assert decoder.mask_tokens.weight.shape == (NUM_CLASSES, 256)
    for k in range(NUM_CLASSES):
        assert torch.equal(decoder.mask_tokens.weight[k].detach(), official_tokens[k % 4])
        head = decoder.output_hypernetworks_mlps[k]
        for j, layer in enumerate(head.layers):
            assert torch.equal(layer.weight.detach(), state[f"mask_decoder.output_hypernetworks_mlps.{k % 4}.layers.{j}.weight"])
    assert torch.equal(decoder.iou_token.weight.detach(), state["mask_decoder.iou_token.weight"])
    assert torch.equal(
        decoder.transformer.layers[0].self_attn.q_proj.weight.detach(),
        state["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"],
    )
    assert decoder.iou_prediction_head is None
    assert torch.equal(model.prompt_encoder.no_mask_embed.weight.detach(), state["prompt_encoder.no_mask_embed.weight"])

    # LoRA starts as a no-op (B = 0) so the loaded model computes official SAM
    for i in range(VIT_B.depth):
        assert all(torch.count_nonzero(getattr(enc.blocks[i].attn.qkv, p).lora_B["default"].weight) == 0 for p in "qv")


def test_mask_tokens_wrap_around_for_more_than_four_classes():
    """Class k takes SAM's token/head k % 4, also beyond SAM's four tokens (on the tiny geometry, no second vit_b)."""
    torch.manual_seed(0)
    model = HFSam(TINY, 6)
    sam_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randn(4, TINY.prompt_dim)
    sam_state["mask_decoder.mask_tokens.weight"] = tokens
    hyper = "mask_decoder.output_hypernetworks_mlps."
    heads = {k: v for k, v in sam_state.items() if k.startswith(hyper)}
    for key in heads:
        del sam_state[key]
    for k in range(4):  # SAM's four heads, head k filled with the value k
        for j in range(3):
            for kind in ("weight", "bias"):
                sam_state[f"{hyper}{k}.layers.{j}.{kind}"] = torch.full_like(heads[f"{hyper}0.layers.{j}.{kind}"], float(k))
    model.load_sam_state(sam_state)
    for k in range(6):
        assert torch.equal(model.mask_decoder.mask_tokens.weight[k].detach(), tokens[k % 4])
        for layer in model.mask_decoder.output_hypernetworks_mlps[k].layers:
            assert torch.all(layer.weight == float(k % 4)) and torch.all(layer.bias == float(k % 4))


def test_vit_b_adapter_is_a_small_fraction_of_the_model(loaded_segmenter):
    state = adapter_state_dict(loaded_segmenter)
    trainable = sum(v.numel() for v in state.values())
    total = sum(p.numel() for p in loaded_segmenter.parameters())
    assert total > 80_000_000
    assert trainable < 0.1 * total
    assert not any(k.startswith("image_encoder.") and "lora_" not in k for k in state)


# ------------------------------------------------------------------------------------------ loader errors


def test_vit_b_checkpoint_for_tiny_backbone(official):
    path, _ = official
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(str(path), TINY)
    message = str(err.value)
    assert "vit_b" in message and "tiny" in message
    assert "--conf backbone" in message and "sam_checkpoint" in message


def test_vit_b_checkpoint_for_tiny_segmenter(official):
    path, _ = official
    with pytest.raises(CheckpointError, match="vit_b"):
        build_segmenter(HFSam, "tiny", NUM_CLASSES, sam_state=load_official_checkpoint(str(path), TINY))


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_official_checkpoint(str(path), VIT_B)
    assert str(path) in str(err.value)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a pytorch file\x00\x01\x02" * 100)
    with pytest.raises(CheckpointError, match="cannot read SAM checkpoint") as err:
        load_official_checkpoint(str(path), VIT_B)
    assert str(path) in str(err.value)


def test_file_not_holding_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3), torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_official_checkpoint(str(path), VIT_B)


def test_state_dict_without_pos_embed(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="image_encoder.pos_embed"):
        load_official_checkpoint(str(path), VIT_B)


def test_official_file_name_with_wrong_content_fails_sha256(tmp_path):
    official = OFFICIAL_CHECKPOINTS["vit_b"]
    assert official.filename == "sam_vit_b_01ec64.pth"
    path = tmp_path / official.filename
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}, path)  # readable, but not the official file
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_official_checkpoint(str(path), VIT_B)
    message = str(err.value)
    assert official.sha256 in message
    assert official.url in message


def test_pos_embed_without_blocks_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "stub.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}, path)
    with pytest.raises(CheckpointError, match="no 'image_encoder.blocks"):
        load_official_checkpoint(str(path), VIT_B)


def test_truncated_checkpoints_name_the_file_and_the_missing_tensor(tmp_path, official):
    _, state = official
    without_rel_pos = {k: v for k, v in state.items() if k != "image_encoder.blocks.5.attn.rel_pos_h"}
    path = tmp_path / "no_rel_pos.pth"
    torch.save(without_rel_pos, path)
    with pytest.raises(CheckpointError, match=r"no_rel_pos\.pth.*blocks\.5\.attn\.rel_pos_h"):
        load_official_checkpoint(str(path), VIT_B)

    without_decoder = {k: v for k, v in state.items() if not k.startswith("mask_decoder.transformer.")}
    path = tmp_path / "no_decoder.pth"
    torch.save(without_decoder, path)
    with pytest.raises(CheckpointError, match=r"truncated SAM checkpoint.*missing"):
        build_segmenter(HFSam, "vit_b", 3, sam_state=load_official_checkpoint(str(path), VIT_B))
