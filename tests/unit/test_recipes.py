"""--conf recipe: the paper recipe's optimiser, schedule and loss are the official HF-SAM training's, and its loss
reads the decoder's own logits against a label resized to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.networks.hf_sam import HFSam
from lib.networks.sam_segmenter import build_segmenter
from lib.trainers.adapter_trainer import warmup_poly
from lib.trainers.recipes import RECIPES
from lib.trainers.simulated_prompts import prepare_prompted_batch


def official_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """utils.DiceLoss of the official code, with softmax: per class over the whole batch, squared sums, smooth 1e-5."""
    probs = torch.softmax(logits, dim=1)
    loss = 0.0
    for i in range(classes):
        score, truth = probs[:, i], (target == i).float()
        loss += 1 - (2 * torch.sum(score * truth) + 1e-5) / (torch.sum(score * score) + torch.sum(truth * truth) + 1e-5)
    return loss / classes


def test_paper_loss_is_the_official_one():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4, 16, 16), generator=g)
    expected = 0.1 * F.cross_entropy(logits, target) + 0.9 * official_dice_loss(logits, target, 3)
    assert torch.allclose(RECIPES["paper"].segmentation_loss()(logits, target[:, None]), expected, atol=1e-6)
    assert RECIPES["fewshot"].segmentation_loss() is None  # the network's own


def test_optimisers_and_schedules():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = RECIPES["paper"].make_optimizer(params, 0.005)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    adamw = RECIPES["fewshot"].make_optimizer(params, 1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    # The official schedule: base_lr * (1 - iter / max_iterations) ** 0.9 from the first step, no warm-up.
    factor = warmup_poly(100, int(RECIPES["paper"].warmup_fraction * 100))
    assert [round(factor(s), 6) for s in (0, 50, 100)] == [1.0, round(0.5**0.9, 6), 0.0]
    assert warmup_poly(100, int(RECIPES["fewshot"].warmup_fraction * 100))(0) == 0.1


def test_decoder_resolution_batches_train_on_the_decoder_logits():
    network = build_segmenter(HFSam, "tiny", 3).train()
    size = network.spec.img_size
    label = torch.zeros(2, 1, size, size, dtype=torch.long)
    label[:, :, size // 4 : size // 2, size // 4 : size // 2] = 2
    batch = {"image": torch.rand(2, 1, size, size), "label": label}
    image, low_label, args, kwargs = prepare_prompted_batch(batch, decoder_resolution=True)
    assert low_label.shape == (2, 1, size // 4, size // 4) and low_label.dtype == torch.long
    assert set(low_label.unique().tolist()) == {0, 2} and (low_label == 2).float().mean() == (label == 2).float().mean()
    logits = network(image, *args, **kwargs)
    assert logits.shape == (2, 3, size // 4, size // 4)
    network.segmentation_loss = RECIPES["paper"].segmentation_loss()
    network.training_loss(logits, low_label).backward()
    assert network.hf_token.weight.grad is not None
    assert len(prepare_prompted_batch(batch)) == 2  # the fewshot recipe: the batch as MONAI prepares it
