"""MASG-SAM on the tiny backbone: taps, shapes through HAE/BFE/DSF, ablation switches, which parameters train,
zero-initialised gates, the DSF ramp, boundary targets and the boundary loss, and a short optimisation."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from lib.class_text import TINY_TEXT_WIDTH, ClassTextEmbedder, class_prompts
from lib.networks.masg_sam import (
    BoundaryFeatureEnhancement,
    DynamicSemanticFusion,
    HierarchicalAttentionEnhancement,
    MASGSam,
    boundary_target,
    masg_tap_indexes,
)
from lib.networks.sam_backbone import encode_with_taps, get_encoder_spec
from lib.networks.sam_segmenter import SamSegmenter, SliceFeatures, build_segmenter

SPEC = get_encoder_spec("tiny")
S = SPEC.img_size
E = SPEC.embedding_size
C = SPEC.prompt_dim
K = 3
MODULES = ("hae", "bfe", "dsf")
TRAINABLE_PREFIXES = ("prompt_encoder.", "mask_decoder.", "tap_projections.", "hae.", "bfe.", "dsf.")
LORA = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.[qv]\.lora_[AB]\.default\.weight$")


@pytest.fixture(scope="module")
def class_text():
    return ClassTextEmbedder(tiny=True).embed(class_prompts(["white matter", "grey matter"], "MR"))


def _build(class_text, **kwargs) -> MASGSam:
    return build_segmenter(MASGSam, "tiny", K, class_text=class_text, **kwargs)


@pytest.fixture(scope="module")
def model(class_text):
    return _build(class_text).eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 1, S, S, generator=torch.Generator().manual_seed(7))


def _logits(net, x, prompts=None):
    with torch.no_grad():
        return net(x, prompts)


def _open_gates(net: MASGSam) -> None:
    """Deterministic non-zero values for every zero-initialised gate of the modules the network has."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        if net.hae is not None:
            net.hae.gate.fill_(0.5)
        if net.bfe is not None:
            net.bfe.emphasis.fill_(1.0)
        if net.dsf is not None:
            net.dsf.gate_logit.fill_(1.0)
            last = net.dsf.project[-1]
            last.weight.copy_(0.2 * torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(0.1 * torch.randn(last.bias.shape, generator=g))


def _copy_shared(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst gets src's tensors for every name they share; dst must hold nothing src lacks."""
    own = dst.state_dict()
    missing = sorted(set(own) - set(src.state_dict()))
    assert not missing, missing
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own})


# ------------------------------------------------------------------------------------------------- taps


def test_tap_indexes():
    assert masg_tap_indexes(12) == (3, 5, 7, 11)  # vit_b, as the released MASG-SAM code
    assert masg_tap_indexes(SPEC.depth) == (0, 1, 2, 3) and SPEC.depth == 4
    assert masg_tap_indexes(24) == (7, 11, 15, 23)
    assert masg_tap_indexes(32) == (10, 15, 20, 31)


def test_model_uses_the_masg_taps(model, class_text):
    assert model.tap_indexes == masg_tap_indexes(SPEC.depth)
    assert len(model.tap_projections) == 4
    assert class_text.shape == (K, TINY_TEXT_WIDTH)


# ----------------------------------------------------------------------------------------------- shapes


def test_shapes_through_every_module(model, image):
    b = image.shape[0]
    x = image.expand(-1, 3, -1, -1)
    with torch.no_grad():
        embedding, taps = encode_with_taps(model.image_encoder, x, model.tap_indexes)
        assert embedding.shape == (b, C, E, E)
        projected = model.project_taps(taps)
        assert [t.shape for t in projected] == [(b, C, E, E)] * 4
        features = SliceFeatures(image=x, taps=projected)

        assert model.hae(embedding, projected).shape == (b, C, E, E)
        boundary = model.bfe.boundary_logits(x, projected[0], (4 * E, 4 * E))
        assert boundary.shape == (b, 1, 4 * E, 4 * E)
        upscaled = torch.randn(b, C // 8, 4 * E, 4 * E)
        assert model.bfe(upscaled, boundary).shape == upscaled.shape

        text = model.dsf.text_tokens(model.class_text)
        assert text.shape == (K, C)
        assert model.dsf(embedding, text).shape == (b, C, E, E)
        assert model.class_tokens().shape == (K, C)

        fused = model.fuse_before(embedding, features)
        assert fused.shape == (b, C, E, E)
        masks = model.decode(fused, features)
        assert masks.shape == (b, K, 4 * E, 4 * E)
        expected = F.interpolate(masks, size=(S, S), mode="bilinear", align_corners=False)
    logits = _logits(model, image)
    assert logits.shape == (b, K, S, S)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1])


def test_forward_other_input_size(model):
    x = torch.rand(1, 1, 96, 160, generator=torch.Generator().manual_seed(3))
    assert _logits(model, x).shape == (1, K, 96, 160)


# ------------------------------------------------------------------------------------------- ablations


@pytest.mark.parametrize("off", MODULES)
def test_switched_off_module_is_not_built(class_text, off):
    net = _build(class_text, **{f"use_{off}": False})
    assert getattr(net, off) is None
    for m in MODULES:
        if m != off:
            assert isinstance(getattr(net, m), torch.nn.Module), m
    assert not any(n.startswith(f"{off}.") for n, _ in net.named_parameters())
    assert not any(k.startswith(f"{off}.") for k in net.state_dict())
    out = _logits(net.eval(), torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(5)))
    assert out.shape == (1, K, S, S)


def test_all_modules_on(model):
    assert isinstance(model.hae, HierarchicalAttentionEnhancement)
    assert isinstance(model.bfe, BoundaryFeatureEnhancement)
    assert isinstance(model.dsf, DynamicSemanticFusion)
    names = [n for n, _ in model.named_parameters()]
    for m in MODULES:
        assert any(n.startswith(f"{m}.") for n in names), m


def test_dsf_needs_class_text(class_text):
    with pytest.raises(ValueError, match="class_text"):
        _build(None)
    with pytest.raises(ValueError, match="class_text"):
        _build(class_text[:2])  # 2 rows for 3 classes
    with pytest.raises(ValueError, match="class_text"):
        build_segmenter(MASGSam, "tiny", 4, class_text=class_text)
    # without DSF no text is needed
    net = _build(None, use_dsf=False)
    assert net.dsf is None and "class_text" not in dict(net.named_buffers())


@pytest.fixture(scope="module")
def open_model(model):
    net = copy.deepcopy(model)
    _open_gates(net)
    return net.eval()


@pytest.fixture(scope="module")
def open_logits(open_model, image):
    return _logits(open_model, image)


@pytest.mark.parametrize("off", MODULES)
def test_ablation_changes_the_output(class_text, open_model, open_logits, image, off):
    ablated = _build(class_text if off != "dsf" else None, **{f"use_{off}": False}).eval()
    _copy_shared(open_model, ablated)  # same weights everywhere else: only the missing module differs
    out = _logits(ablated, image)
    assert out.shape == open_logits.shape
    assert not torch.allclose(out, open_logits, atol=1e-4), f"switching {off} off does not change the logits"


@pytest.mark.parametrize("off", MODULES)
def test_closed_gate_equals_ablation(class_text, open_model, image, off):
    """A module whose gate is back at its initial zero is exactly the model without it."""
    closed = copy.deepcopy(open_model)
    with torch.no_grad():
        if off == "hae":
            closed.hae.gate.zero_()
        elif off == "bfe":
            closed.bfe.emphasis.zero_()
        else:
            closed.dsf.project[-1].weight.zero_()
            closed.dsf.project[-1].bias.zero_()
    ablated = _build(class_text if off != "dsf" else None, **{f"use_{off}": False}).eval()
    _copy_shared(open_model, ablated)
    assert torch.allclose(_logits(closed, image), _logits(ablated, image), atol=1e-5)


# ---------------------------------------------------------------------------------------- trainable params


def test_exactly_the_intended_parameters_train(model):
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    lora = {n for n in names if LORA.match(n)}
    assert {int(LORA.match(n).group(1)) for n in lora} == set(range(SPEC.depth))
    assert len(lora) == 4 * SPEC.depth  # A and B on every block's q and v
    assert not any("lora_" in n for n in names if n not in lora)

    expected = lora | {n for n in names if n.startswith(TRAINABLE_PREFIXES)}
    assert trainable == expected
    for prefix in TRAINABLE_PREFIXES:
        assert any(n.startswith(prefix) for n in trainable), prefix
    encoder = {n for n in names if n.startswith("image_encoder.")}
    assert encoder & trainable == lora
    for n in (
        "image_encoder.blocks.0.attn.qkv.q.base_layer.weight",
        "image_encoder.blocks.0.attn.qkv.k.weight",
        "image_encoder.neck.0.weight",
        "image_encoder.pos_embed",
    ):
        assert not names[n].requires_grad, n
    for n in ("hae.gate", "bfe.emphasis", "dsf.gate_logit", "dsf.project.2.weight", "bfe.head.0.weight"):
        assert names[n].requires_grad, n


def test_class_text_is_a_non_persistent_buffer(model, class_text):
    buffers = dict(model.named_buffers())
    assert "class_text" in buffers
    assert torch.equal(buffers["class_text"], class_text.float())
    assert not buffers["class_text"].requires_grad
    assert "class_text" not in dict(model.named_parameters())
    state = model.state_dict()
    assert "class_text" not in state
    assert not any(k.endswith("class_text") for k in state)


def test_gradients_reach_only_trainable_parameters(open_model):
    net = copy.deepcopy(open_model).train()
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    label = torch.randint(0, K, (1, 1, 64, 64), generator=torch.Generator().manual_seed(4))
    net.training_loss(net(x), label).backward()
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad) > 0}
    assert all(n.startswith(TRAINABLE_PREFIXES) or LORA.match(n) for n in with_grad)
    for n in (
        "hae.gate",
        "bfe.emphasis",
        "bfe.head.4.weight",
        "dsf.gate_logit",
        "dsf.project.2.weight",
        "tap_projections.0.0.weight",
        "image_encoder.blocks.0.attn.qkv.q.lora_B.default.weight",
        "image_encoder.blocks.0.attn.qkv.v.lora_B.default.weight",
    ):
        assert n in with_grad, n


# ------------------------------------------------------------------------------------ zero-initialised gates


def test_hae_starts_as_identity():
    torch.manual_seed(0)
    hae = HierarchicalAttentionEnhancement(C, 5)
    embedding = torch.randn(2, C, E, E)
    taps = [torch.randn(2, C, E, E) for _ in range(4)]
    assert torch.count_nonzero(hae.gate) == 0
    assert torch.equal(hae(embedding, taps), embedding)
    with torch.no_grad():
        hae.gate.fill_(0.5)
    out = hae(embedding, taps)
    assert not torch.allclose(out, embedding)
    # the taps matter once the gate is open
    assert not torch.allclose(out, hae(embedding, [*taps[:3], torch.randn_like(taps[3])]))


def test_dsf_text_tokens_start_at_zero(model):
    text = model.dsf.text_tokens(model.class_text)
    assert torch.count_nonzero(text) == 0
    assert torch.equal(model.class_tokens(), model.mask_decoder.mask_tokens.weight)
    # and the fusion itself leaves the embedding unchanged (zero text, zero attention biases)
    embedding = torch.randn(2, C, E, E, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model.dsf(embedding, text), embedding, atol=1e-6)


def test_model_hooks_are_identities_at_init(model, image):
    """At initialisation MASG-SAM computes exactly what plain SAM with the same weights and taps computes."""
    plain = build_segmenter(SamSegmenter, "tiny", K, tap_indexes=model.tap_indexes).eval()
    _copy_shared(model, plain)
    assert torch.allclose(_logits(model, image), _logits(plain, image), atol=1e-5)
    opened = copy.deepcopy(model)
    _open_gates(opened)
    assert not torch.allclose(_logits(opened, image), _logits(plain, image), atol=1e-4)


def test_bfe_starts_as_identity():
    torch.manual_seed(0)
    bfe = BoundaryFeatureEnhancement(C, C // 8)
    features = torch.randn(2, C // 8, 4 * E, 4 * E)
    boundary = torch.randn(2, 1, 4 * E, 4 * E)
    assert torch.count_nonzero(bfe.emphasis) == 0
    assert torch.equal(bfe(features, boundary), features)
    with torch.no_grad():
        bfe.emphasis.fill_(1.0)
    out = bfe(features, boundary)
    assert torch.allclose(out, features * (1 + torch.sigmoid(boundary)))


def test_bfe_boundary_logits_see_image_edges():
    torch.manual_seed(0)
    bfe = BoundaryFeatureEnhancement(C, C // 8)
    tap = torch.randn(1, C, E, E)
    flat = torch.full((1, 3, S, S), 0.5)
    square = flat.clone()
    square[..., 3 * S // 8 : 5 * S // 8, 3 * S // 8 : 5 * S // 8] = 1.0  # edges at 24 and 40 of 64 (4E)
    with torch.no_grad():
        a = bfe.boundary_logits(flat, tap, (4 * E, 4 * E))
        b = bfe.boundary_logits(square, tap, (4 * E, 4 * E))
    diff = (a - b).abs()[0, 0]
    assert diff[20:44, 20:44].max() > 0
    # only near the square's edges does the image gradient differ (two 3x3 convs: +-2 pixels)
    outside = torch.ones_like(diff, dtype=torch.bool)
    outside[20:44, 20:44] = False
    assert diff[outside].max() == 0
    assert diff[30:34, 30:34].max() == 0  # the flat inside of the square neither


# ----------------------------------------------------------------------------------------------- DSF ramp


def test_dsf_gate_ramp():
    torch.manual_seed(0)
    ramp = 4
    dsf = DynamicSemanticFusion(TINY_TEXT_WIDTH, C, num_heads=4, ramp_steps=ramp)
    with torch.no_grad():
        dsf.gate_logit.fill_(0.3)
    full = torch.sigmoid(torch.tensor(0.3))
    embedding = torch.randn(1, C, 4, 4)
    text = torch.randn(K, C)

    dsf.train()
    assert float(dsf.gate()) == 0.0
    gates = []
    for _ in range(ramp + 2):
        dsf(embedding, text)
        gates.append(float(dsf.gate()))
    expected = [min(1.0, n / ramp) * float(full) for n in range(1, ramp + 3)]
    assert gates == pytest.approx(expected)
    assert all(a < b for a, b in zip(gates[:ramp], gates[1:ramp]))
    assert gates[-1] == pytest.approx(float(full))

    dsf.eval()
    steps = int(dsf.steps)
    with torch.no_grad():
        full_delta = dsf(embedding, text) - embedding
    assert int(dsf.steps) == steps  # eval forwards do not count
    assert float(dsf.gate()) == pytest.approx(float(full))
    dsf.steps.zero_()
    assert float(dsf.gate()) == pytest.approx(float(full))  # eval: the full gate whatever the step count

    # the ramp reaches the output: the n-th training forward adds n / ramp of the full contribution
    dsf.train()
    dsf.steps.zero_()
    with torch.no_grad():
        first_delta = dsf(embedding, text) - embedding
    assert torch.allclose(first_delta, full_delta / ramp, atol=1e-6)
    assert full_delta.abs().max() > 1e-3


def test_dsf_step_counter_in_model(class_text):
    net = _build(class_text).train()
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert int(net.dsf.steps) == 0
    with torch.no_grad():
        net(x)
        net(x)
    assert int(net.dsf.steps) == 2  # one step per forward, however often the text tokens are used
    net.eval()
    with torch.no_grad():
        net(x)
    assert int(net.dsf.steps) == 2
    assert "dsf.steps" not in net.state_dict()


# ------------------------------------------------------------------------------------------ boundary target


def _label() -> torch.Tensor:
    label = torch.zeros(16, 16, dtype=torch.long)
    label[4:10, 4:10] = 1  # square
    label[12:, :] = 2  # band along the bottom edge
    return label


def _boundaries_by_hand(label: torch.Tensor) -> torch.Tensor:
    h, w = label.shape
    out = torch.zeros(h, w)
    for r in range(h):
        for c in range(w):
            window = label[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2]
            out[r, c] = float(window.unique().numel() > 1)
    return out


def test_boundary_target_on_a_hand_made_label():
    label = _label()
    target = boundary_target(label[None, None], (16, 16))
    assert target.shape == (1, 1, 16, 16)
    assert set(target.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(target[0, 0], _boundaries_by_hand(label))
    t = target[0, 0]
    # transitions of the square (both sides) and of the band, including the band's own boundary pixels
    assert t[4, 4] == 1 and t[3, 3] == 1 and t[9, 9] == 1 and t[10, 10] == 1 and t[4, 7] == 1
    assert t[11, 0] == 1 and t[12, 15] == 1
    # flat regions: inside the square, inside the band, background between, and at the image border
    assert t[6, 6] == 0 and t[7, 5] == 0 and t[14, 8] == 0 and t[15, 0] == 0
    assert t[0, 0] == 0 and t[2, 2] == 0 and t[0, 15] == 0 and t[10, 0] == 0
    assert t[5:9, 5:9].sum() == 0 and t[13:, :].sum() == 0 and t[:3, :].sum() == 0


def test_boundary_target_pooled_and_batched():
    label = _label()
    batch = torch.stack([label, torch.zeros_like(label)])[:, None]  # second slice: background only
    full = boundary_target(batch, (16, 16))
    pooled = boundary_target(batch, (8, 8))
    assert pooled.shape == (2, 1, 8, 8)
    assert torch.equal(pooled, F.max_pool2d(full, 2))
    assert pooled[0].sum() > 0 and pooled[1].sum() == 0
    assert boundary_target(batch, (32, 32)).shape == (2, 1, 32, 32)


# -------------------------------------------------------------------------------------------- training loss


def _batch(size: int = 64):
    """Two slices with a simple two-class pattern: a bright square (class 1) and a dark bar (class 2)."""
    g = torch.Generator().manual_seed(3)
    image = 0.3 + 0.05 * torch.randn(2, 1, size, size, generator=g)
    label = torch.zeros(2, 1, size, size, dtype=torch.long)
    for b, (r, c) in enumerate([(10, 14), (26, 20)]):
        label[b, 0, r : r + 20, c : c + 20] = 1
        label[b, 0, 50:58, 8 + 8 * b : 40 + 8 * b] = 2
    image[label == 1] += 0.5
    image[label == 2] -= 0.25
    return image.clamp(0, 1), label


def test_training_loss_includes_the_boundary_term(open_model):
    net = copy.deepcopy(open_model).train()
    image, label = _batch()
    logits = net(image)
    cached = net._boundary_logits
    assert cached is not None and cached.shape == (2, 1, 4 * E, 4 * E)
    segmentation = SamSegmenter.training_loss(net, logits, label)
    boundary = net.boundary_loss(cached, boundary_target(label, cached.shape[-2:]))
    loss = net.training_loss(logits, label)
    assert net._boundary_logits is None  # cleared after use
    assert float(boundary) > 0
    assert float(loss) > float(segmentation)
    assert float(loss) == pytest.approx(float(segmentation + net.boundary_weight * boundary), rel=1e-5)
    loss.backward()
    for n, p in net.bfe.head.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
    assert torch.count_nonzero(net.bfe.tap_reduce.weight.grad) > 0
    # a second call without a new forward has no boundary logits left: segmentation loss only
    again = net.training_loss(logits.detach(), label)
    assert float(again) == pytest.approx(float(segmentation), rel=1e-5)


def test_eval_forward_caches_nothing(open_model):
    net = copy.deepcopy(open_model).eval()
    image, label = _batch()
    with torch.no_grad():
        logits = net(image)
    assert net._boundary_logits is None
    assert float(net.training_loss(logits, label)) == pytest.approx(float(SamSegmenter.training_loss(net, logits, label)))


def test_without_bfe_the_loss_is_the_segmentation_loss(class_text):
    net = _build(class_text, use_bfe=False).train()
    image, label = _batch()
    logits = net(image)
    assert float(net.training_loss(logits, label)) == pytest.approx(float(SamSegmenter.training_loss(net, logits, label)))


def test_short_optimisation_lowers_the_loss(class_text):
    net = _build(class_text).train()
    image, label = _batch()
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = net.training_loss(net(image), label)
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    with torch.no_grad():
        last = float(net.training_loss(net(image), label))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.9 * losses[0], (losses, last)
