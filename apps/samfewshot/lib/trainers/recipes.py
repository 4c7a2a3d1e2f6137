"""How the SAM models' adapters train (``--conf recipe``).

* ``fewshot``: AdamW (lr 1e-3, weight decay 0.1), linear warm-up over the first 10 % of a run's steps, then
  polynomial decay (power 0.9) to 0; the network's own loss (0.1 CE + 0.9 Dice per slice) on logits resized to the
  slice.
* ``paper``: the official HF-SAM training (its ``trainer.py``, as SAMed's): SGD (lr 0.005, momentum 0.9, weight
  decay 1e-4), polynomial decay (power 0.9) from the first step; 0.1 CE + 0.9 Dice on the decoder's own logits
  (4h x 4w: 128 x 128 for a 512 input) against the label resized there by nearest neighbour, its Dice as the
  official ``DiceLoss`` (over the whole batch, squared predictions in the denominator, background included).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule and loss of a training run.

    Args:
        name: the ``--conf recipe`` value.
        optimizer: ``adamw`` or ``sgd``.
        lr: peak learning rate; a train request's ``lr`` overrides it.
        weight_decay: the optimiser's weight decay.
        momentum: SGD's momentum.
        warmup_fraction: share of a run's steps with linear warm-up before the polynomial decay.
        decoder_resolution: the loss reads the decoder's logits and a label resized to them, with the official Dice.
    """

    name: str
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float = 0.0
    warmup_fraction: float = 0.0
    decoder_resolution: bool = False

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    def segmentation_loss(self) -> nn.Module | None:
        """The class-head loss this recipe puts in place of the network's own; None keeps the network's."""
        if not self.decoder_resolution:
            return None
        return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True, lambda_ce=0.1, lambda_dice=0.9)


RECIPES = {
    "fewshot": Recipe("fewshot", "adamw", lr=1e-3, weight_decay=0.1, warmup_fraction=0.1),
    "paper": Recipe("paper", "sgd", lr=5e-3, weight_decay=1e-4, momentum=0.9, decoder_resolution=True),
}
