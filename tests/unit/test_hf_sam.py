"""HF-SAM on the tiny backbone against the official code's decoder: the AWFFM operator (``CIF_block``), the tap, where
the fusion runs, the hf_token, LoRA on q and v, and which parameters train."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from lib.networks.hf_sam import AWFFM, HFSam
from lib.networks.sam_backbone import encode_with_taps, get_encoder_spec
from lib.networks.sam_segmenter import SliceFeatures, build_segmenter

SPEC = get_encoder_spec("tiny")
S = SPEC.img_size
E = SPEC.embedding_size
C = SPEC.prompt_dim
K = 3
TRAINABLE_PREFIXES = ("prompt_encoder.", "mask_decoder.", "tap_projections.", "awffm.", "hf_token.")
LORA = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.([qv])\.lora_[AB]\.default\.weight$")


@pytest.fixture(scope="module")
def model():
    return build_segmenter(HFSam, "tiny", K).eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(7))


def _logits(net, x):
    with torch.no_grad():
        return net(x)


def official_cif_block(fusion: AWFFM, tokens: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``CIF_block.forward(l, h)`` (l = tokens, h = low) of the official mult_attention.py, written out with ``fusion``'s weights
    (conv -> SpatialAttention(3) -> l * S; ChannelAttention(ratio 8, shared bias-free MLP) of l weighting h)."""
    cat = F.conv2d(torch.cat((tokens, low), dim=1), fusion.mix.weight, fusion.mix.bias)
    spatial = torch.sigmoid(
        F.conv2d(torch.cat([cat.mean(1, keepdim=True), cat.max(1, keepdim=True)[0]], 1), fusion.spatial.weight, padding=1)
    )
    tokens = tokens * spatial
    fc1, fc2 = fusion.channel_mlp[0].weight, fusion.channel_mlp[2].weight

    def mlp(x):
        return F.conv2d(F.relu(F.conv2d(x, fc1)), fc2)

    channel = torch.sigmoid(mlp(F.adaptive_avg_pool2d(tokens, 1)) + mlp(F.adaptive_max_pool2d(tokens, 1)))
    return tokens + low * channel


def test_awffm_is_the_official_cif_block():
    torch.manual_seed(0)
    fusion = AWFFM(C)
    assert fusion.mix.bias is not None and fusion.spatial.bias is None and fusion.spatial.kernel_size == (3, 3)
    assert fusion.channel_mlp[0].weight.shape == (C // 8, C, 1, 1) and fusion.channel_mlp[0].bias is None
    tokens, low = torch.randn(2, C, E, E), torch.randn(2, C, E, E)
    with torch.no_grad():
        assert torch.allclose(fusion(tokens, low), official_cif_block(fusion, tokens, low), atol=1e-6)


def test_forward_shapes_one_and_three_channels(model):
    x1 = torch.rand(2, 1, S, S, generator=torch.Generator().manual_seed(1))
    out1 = _logits(model, x1)
    assert out1.shape == (2, K, S, S) and torch.isfinite(out1).all()
    assert torch.allclose(out1[:1], _logits(model, x1[:1].expand(-1, 3, -1, -1).clone()), atol=1e-5)
    assert not torch.allclose(out1[0], out1[1])
    assert _logits(model, torch.rand(1, 3, 120, 300)).shape == (1, K, 120, 300)
    with torch.no_grad():
        assert model(x1, decoder_resolution=True).shape == (2, K, 4 * E, 4 * E)


def test_decoder_runs_as_the_official_one(model, image):
    """One fusion, after the two-way transformer, of the first global block's output projected by a 1x1 conv with
    bias; tokens iou, mask tokens, hf_token; no fusion before the transformer (the official first step is dead)."""
    assert model.tap_indexes == SPEC.global_attn_indexes[:1]
    projection = model.tap_projections[0]
    assert isinstance(projection, torch.nn.Conv2d) and projection.bias is not None
    decoder = model.mask_decoder
    x = image.expand(-1, 3, -1, -1)
    with torch.no_grad():
        embedding, taps = encode_with_taps(model.image_encoder, x, model.tap_indexes)
        low = projection(taps[0])
        assert torch.equal(model.fuse_before(embedding, SliceFeatures(x, [low])), embedding)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, model.hf_token.weight])[None]
        src = embedding + model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        hs, src = decoder.transformer(src, model.prompt_encoder.get_dense_pe(), tokens)
        src = official_cif_block(model.awffm, src.transpose(1, 2).reshape(1, C, E, E), low)
        upscaled = decoder.output_upscaling(src)
        hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(K)], dim=1)
        expected = (hyper @ upscaled.flatten(2)).view(1, K, 4 * E, 4 * E)
        assert torch.allclose(model(image, decoder_resolution=True), expected, atol=1e-5)


def test_hf_token_is_attended_but_has_no_head(model, image):
    assert model.hf_token.weight.shape == (1, C)
    assert len(model.mask_decoder.output_hypernetworks_mlps) == K  # one head per class, none for the token
    net = copy.deepcopy(model)
    with torch.no_grad():
        net.hf_token.weight.normal_(0, 5)
    assert not torch.allclose(_logits(model, image), _logits(net, image), atol=1e-4)


def test_lora_on_q_and_v_of_every_block_at_the_published_rank(model):
    names = dict(model.named_parameters())
    lora = {n: p for n, p in names.items() if LORA.match(n)}
    assert {(int(LORA.match(n).group(1)), LORA.match(n).group(2)) for n in lora} == {(b, p) for b in range(SPEC.depth) for p in "qv"}
    assert len(lora) == 4 * SPEC.depth and not any("lora_" in n for n in names if n not in lora)
    assert all(p.shape[0] == 5 for n, p in lora.items() if ".lora_A." in n)  # HF-SAM's --rank default
    qkv = model.image_encoder.blocks[0].attn.qkv
    assert not qkv.k.weight.requires_grad and not hasattr(qkv.k, "lora_A")


def test_exactly_the_intended_parameters_train(model):
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    lora = {n for n in names if LORA.match(n)}
    assert trainable == lora | {n for n in names if n.startswith(TRAINABLE_PREFIXES)}
    for prefix in TRAINABLE_PREFIXES:
        assert any(n.startswith(prefix) for n in trainable), prefix
    for n in (
        "image_encoder.blocks.0.attn.qkv.q.base_layer.weight",
        "image_encoder.blocks.0.attn.qkv.k.bias",
        "image_encoder.neck.0.weight",
    ):
        assert n in names and not names[n].requires_grad, n
    assert model.mask_decoder.iou_prediction_head is None


def test_gradients_reach_only_trainable_parameters(model, image):
    net = copy.deepcopy(model).train()
    target = torch.randint(0, K, (1, 1, S, S), generator=torch.Generator().manual_seed(4))
    net.training_loss(net(image), target).backward()
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad) > 0}
    assert all(n.startswith(TRAINABLE_PREFIXES) or LORA.match(n) for n in with_grad)
    for n in (
        "image_encoder.blocks.0.attn.qkv.q.lora_B.default.weight",
        "image_encoder.blocks.0.attn.qkv.v.lora_B.default.weight",
        "awffm.mix.weight",
        "awffm.channel_mlp.2.weight",
        "tap_projections.0.bias",
        "hf_token.weight",
        "mask_decoder.mask_tokens.weight",
    ):
        assert n in with_grad, n
