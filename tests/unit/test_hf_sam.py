"""HF-SAM on the tiny backbone: shapes at every stage, which parameters train, AWFFM and the two fusion steps."""

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
K = 3
TRAINABLE_PREFIXES = ("prompt_encoder.", "mask_decoder.", "tap_projections.", "fusion_before.", "fusion_after.")
LORA = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.lora_[AB]\.default\.weight$")


@pytest.fixture(scope="module")
def model():
    return build_segmenter(HFSam, "tiny", K).eval()


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(7)
    return torch.rand(1, 1, S, S, generator=g)


@pytest.fixture(scope="module")
def base_logits(model, image):
    with torch.no_grad():
        return model(image)


def _logits(net, x):
    with torch.no_grad():
        return net(x)


# --------------------------------------------------------------------------------------------------- shapes


def test_forward_shapes_one_and_three_channels(model):
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(2, 1, S, S, generator=g)
    out1 = _logits(model, x1)
    assert out1.shape == (2, K, S, S)
    assert torch.isfinite(out1).all()
    # a grey slice repeated to three channels is what the 1-channel input means
    out3 = _logits(model, x1[:1].expand(-1, 3, -1, -1).clone())
    assert out3.shape == (1, K, S, S)
    assert torch.allclose(out1[:1], out3, atol=1e-5)
    # different inputs give different logits (the network is not constant)
    assert not torch.allclose(out1[0], out1[1])


def test_forward_other_input_size(model):
    x = torch.rand(1, 1, 200, 200, generator=torch.Generator().manual_seed(2))
    out = _logits(model, x)
    assert out.shape == (1, K, 200, 200)
    y = torch.rand(1, 3, 120, 300, generator=torch.Generator().manual_seed(3))
    assert _logits(model, y).shape == (1, K, 120, 300)


def test_stage_shapes(model, image, base_logits):
    x = image.expand(-1, 3, -1, -1)
    with torch.no_grad():
        embedding, taps = encode_with_taps(model.image_encoder, x, model.tap_indexes)
        assert model.tap_indexes == SPEC.global_attn_indexes[:2]
        assert embedding.shape == (1, SPEC.prompt_dim, E, E)
        assert [t.shape for t in taps] == [(1, SPEC.embed_dim, E, E)] * 2
        projected = model.project_taps(taps)
        assert [t.shape for t in projected] == [(1, SPEC.prompt_dim, E, E)] * 2
        features = SliceFeatures(image=x, taps=projected)
        fused = model.fuse_before(embedding, features)
        assert fused.shape == embedding.shape
        masks = model.decode(fused, features)
        assert masks.shape == (1, K, 4 * E, 4 * E)
        # forward = decode, upsampled to the input size
        expected = F.interpolate(masks, size=(S, S), mode="bilinear", align_corners=False)
    assert torch.allclose(base_logits, expected, atol=1e-6)


def test_awffm_keeps_shape_and_starts_as_identity():
    torch.manual_seed(0)
    fusion = AWFFM(SPEC.prompt_dim, 2)
    high = torch.randn(2, SPEC.prompt_dim, E, E)
    lows = [torch.randn(2, SPEC.prompt_dim, E, E) for _ in range(2)]
    assert torch.count_nonzero(fusion.gate) == 0
    out = fusion(high, lows)
    assert out.shape == high.shape
    assert torch.equal(out, high)  # zero gate: the pretrained embedding passes unchanged
    with torch.no_grad():
        fusion.gate.fill_(0.5)
    out = fusion(high, lows)
    assert out.shape == high.shape
    assert not torch.allclose(out, high)
    # the low-level sources matter once the gate is open
    other = fusion(high, [lows[0], torch.randn_like(lows[1])])
    assert not torch.allclose(out, other)


# --------------------------------------------------------------------------------------- trainable parameters


def test_exactly_the_intended_parameters_train(model):
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}

    lora = {n for n in names if LORA.match(n)}
    blocks_with_lora = {int(LORA.match(n).group(1)) for n in lora}
    assert blocks_with_lora == set(range(SPEC.depth))
    assert len(lora) == 2 * SPEC.depth  # A and B on every block's qkv, nothing else wrapped
    assert not any("lora_" in n for n in names if n not in lora)

    expected = lora | {n for n in names if n.startswith(TRAINABLE_PREFIXES)}
    assert trainable == expected
    for prefix in TRAINABLE_PREFIXES:
        assert any(n.startswith(prefix) for n in trainable), prefix

    frozen_encoder = {n for n in names if n.startswith("image_encoder.") and n not in lora}
    assert frozen_encoder and not (frozen_encoder & trainable)
    for n in (
        "image_encoder.blocks.0.attn.qkv.base_layer.weight",
        "image_encoder.blocks.0.attn.qkv.base_layer.bias",
        "image_encoder.blocks.0.norm1.weight",
        "image_encoder.blocks.1.attn.rel_pos_h",
        "image_encoder.neck.0.weight",
        "image_encoder.pos_embed",
        "image_encoder.patch_embed.proj.weight",
    ):
        assert n in names and not names[n].requires_grad, n


def test_no_iou_prediction_head(model):
    assert model.mask_decoder.iou_prediction_head is None
    assert not any("iou_prediction_head" in n for n, _ in model.named_parameters())
    assert not any("iou_prediction_head" in k for k in model.state_dict())


def test_gradients_reach_only_trainable_parameters(model, image):
    net = copy.deepcopy(model).train()
    target = torch.randint(0, K, (1, S, S), generator=torch.Generator().manual_seed(4))
    loss = F.cross_entropy(net(image), target)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert grads[n] is None, n
    with_grad = {n for n, g in grads.items() if g is not None and torch.count_nonzero(g) > 0}
    assert all(n.startswith(TRAINABLE_PREFIXES) or LORA.match(n) for n in with_grad)
    # what should learn from the first step does get a gradient
    for i in range(SPEC.depth):
        assert f"image_encoder.blocks.{i}.attn.qkv.lora_B.default.weight" in with_grad
    for n in ("fusion_before.gate", "fusion_after.gate", "mask_decoder.mask_tokens.weight", "mask_decoder.output_upscaling.0.weight"):
        assert n in with_grad, n


# ---------------------------------------------------------------------------------------- two fusion steps


@pytest.mark.parametrize("step", ["fusion_before", "fusion_after"])
def test_both_fusion_steps_are_live(model, image, base_logits, step):
    net = copy.deepcopy(model)
    base = base_logits
    with torch.no_grad():
        getattr(net, step).gate.fill_(0.5)
    changed = _logits(net, image)
    assert changed.shape == base.shape
    assert not torch.allclose(base, changed, atol=1e-4), f"{step} does not reach the logits"


def test_fusion_steps_use_the_projected_taps(model, image):
    """The fused features come from the tap projections: changing a projection changes the logits once fused."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        net.fusion_before.gate.fill_(0.5)
        net.fusion_after.gate.fill_(0.5)
    base = _logits(net, image)
    with torch.no_grad():
        net.tap_projections[1][0].weight.mul_(-1.0)
    assert not torch.allclose(base, _logits(net, image), atol=1e-4)
