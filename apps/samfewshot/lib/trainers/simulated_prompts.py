"""Prompt-aware training: simulated interactions on a share of every batch's slices.

``SimulatedInteraction`` is the SAM trainer's ``iteration_update``, the hook MONAI's DeepEdit and Deepgrow trainers
use (``monai.apps.deepedit.interaction.Interaction``): before a training step, a share of the slices get prompts
drawn from their labels, as interactive segmentation is trained (RITM, SAM, DeepEdit):

* the first prompt is an annotator's own interaction with this volume, replayed (kept with the saved label, see
  ``lib.annotator_prompts``), or a click in the interior of one class's region, a jittered box around it, or that
  region perturbed as a mask prompt with its box (what propagation from the neighbouring slice hands on);
* as mask prompt, the network's own automatic segmentation of that class with the clicks drawn in (or the perturbed
  mask), as at inference;
* then up to ``max_corrections`` clicks at the centre of the largest error of the network's own current
  prediction (no-grad passes), each with the previous logits, clicks drawn in, fed back as SAM's mask prompt.

The step then trains both decodings on every slice: prompt-free against the label, prompted as the prompted class
against the rest (``SamSegmenter.training_loss``; the label carries the prompted class's mask as a second channel).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines.utils import default_prepare_batch
from scipy import ndimage

from lib.networks.sam_segmenter import Prompts, mark_unannotated
from lib.transforms.clicks import (
    box_of,
    click_cells,
    correct_by_clicks,
    draw_clicks,
    interior_click,
    jittered_box,
    mask_logits,
    perturbed_mask,
)
from lib.transforms.prompts import SlicePrompt, batch_prompts
from lib.transforms.slices import BOX_MARK, NEGATIVE_MARK, POSITIVE_MARK

logger = logging.getLogger(__name__)

NO_OBJECT = -1  # the object channel of a label whose slice got no prompt: no object loss
PROMPT_PREFIX = "prompt_"  # the batch keys of the simulated prompts (the fields of ``Prompts``)


class SimulatedInteraction:
    """``iteration_update(engine, batchdata)``: prompts for ``share`` of the slices that hold a structure (first
    prompt: ``replay_share`` an annotator's replayed interaction when the slice has one, else ``box_share`` a box,
    ``mask_share`` a perturbed mask with its box, the rest an interior click), then 0..``max_corrections``
    corrective clicks, then the training step."""

    def __init__(
        self,
        share: float = 0.5,
        max_corrections: int = 4,
        box_share: float = 0.25,
        mask_share: float = 0.25,
        replay_share: float = 0.5,
        seed: int | None = None,
    ):
        self.share = share
        self.max_corrections = max_corrections
        self.box_share = box_share
        self.mask_share = mask_share
        self.replay_share = replay_share
        self.rng = np.random.default_rng(seed)

    def __call__(self, engine, batchdata: dict[str, Any]):
        label = batchdata["label"]
        network = getattr(engine.network, "module", engine.network)  # inside DDP
        grid = network.prompt_encoder.mask_input_size
        clicks = batchdata.get("click_map")
        classes = batchdata.get("click_class")
        starts = [
            self.first_prompt(label[b, 0], None if clicks is None else clicks[b, 0], 0 if classes is None else int(classes[b]), grid)
            for b in range(label.shape[0])
        ]
        if any(starts):
            self.simulate(network, batchdata["image"], starts, int(self.rng.integers(0, self.max_corrections + 1)), engine.state.device)
        empty = {"points": [], "box": None}
        masks = torch.zeros(len(starts), 1, *grid)
        for b, start in enumerate(starts):
            if start:
                masks[b] = start["mask"]
        prompts = batch_prompts(
            [start["prompt"] if start else empty for start in starts],
            "cpu",
            masks=masks,
            mask_valid=torch.tensor([bool(start) for start in starts]),
        )
        batchdata.update({PROMPT_PREFIX + k: v for k, v in vars(prompts).items()})  # tensors: the engine decollates
        target = torch.full_like(label, NO_OBJECT)
        for b, start in enumerate(starts):
            if start:
                target[b, 0] = torch.as_tensor(start["target"], dtype=label.dtype) * start["class"]
        batchdata["label"] = torch.cat([label, target], dim=1)
        return engine._iteration(engine, batchdata)

    # ---- one slice's first prompt ----------------------------------------------------------------------------
    def first_prompt(self, label: torch.Tensor, clicks: torch.Tensor | None, click_class: int, grid) -> dict | None:
        """{"class": c, "target": (H, W) bool mask of c, "prompt": SlicePrompt, "mask": (1, g, g) logits or None}, or
        None for a slice left prompt-free (by chance, or because it holds no structure)."""
        classes = [int(c) for c in torch.unique(label) if c > 0]
        if not classes or self.rng.random() >= self.share:
            return None
        labels = label.cpu().numpy()
        if clicks is not None and bool(clicks.any()) and self.rng.random() < self.replay_share:
            replayed = replay(clicks.cpu().numpy(), labels, click_class)
            if replayed:
                return {**replayed, "mask": None}
        chosen = int(self.rng.choice(classes))
        target = labels == chosen
        start = {"class": chosen, "target": target, "mask": None}
        kind = self.rng.random()
        if kind < self.box_share:
            return {**start, "prompt": {"points": [], "box": jittered_box(target, self.rng)}}
        if kind < self.box_share + self.mask_share:
            shifted = perturbed_mask(torch.from_numpy(target), self.rng).numpy()
            if shifted.any():
                return {**start, "prompt": {"points": [], "box": box_of(shifted)}, "mask": mask_logits(torch.from_numpy(shifted), grid)}
        return {**start, "prompt": {"points": [interior_click(target, self.rng)], "box": None}}

    def simulate(self, network, image: torch.Tensor, starts: list[dict | None], corrections: int, device) -> None:
        """Give every prompted slice its mask prompt and ``corrections`` more clicks, in no-grad passes, as an
        annotator's session goes (``lib.infers.interactive``): the automatic segmentation of its class with the clicks
        drawn in (a propagation-style start keeps its perturbed mask); then each click at the centre of the largest
        error of the prediction so far, drawn into that prediction for the next pass (``correct_by_clicks``)."""
        rows = [b for b, start in enumerate(starts) if start]
        items = [starts[b] for b in rows]
        planes = [image[b, 0].float().numpy() for b in rows]
        grid = network.prompt_encoder.mask_input_size
        with torch.no_grad():
            embedding, features = network.prepare(image[rows].to(device))
            classes = torch.tensor([i["class"] for i in items], device=device)
            automatic = network.object_logit(network.decode(embedding, features), classes).float().cpu()
            for j, item in enumerate(items):
                if item["mask"] is None:
                    item["mask"] = draw_clicks(automatic[j], click_cells(item["prompt"]["points"], planes[j], grid))
        correct_by_clicks(network, embedding, features, items, planes, corrections)


def replay(clicks: np.ndarray, labels: np.ndarray, click_class: int) -> dict | None:
    """An annotator's interaction drawn on this slice (``lib.transforms.slices.InteractionMapd``) back into a
    prompt: one point per drawn mark, the box around the box mark; the target is the class they were for, or the
    class under the first positive point when the client named none."""
    points: list[tuple[float, float, int]] = []
    for mark, sam_label in ((POSITIVE_MARK, 1), (NEGATIVE_MARK, 0)):
        regions, count = ndimage.label(clicks == mark)
        for row, col in ndimage.center_of_mass(clicks == mark, regions, range(1, count + 1)):
            points.append((float(col), float(row), sam_label))
    box = box_of(clicks == BOX_MARK)
    positives = [p for p in points if p[2] == 1]
    target_class = click_class or (int(labels[int(round(positives[0][1])), int(round(positives[0][0]))]) if positives else 0)
    if not target_class or not (points or box):
        return None
    prompt: SlicePrompt = {"points": points, "box": box}
    return {"class": target_class, "target": labels == target_class, "prompt": prompt}


def prepare_prompted_batch(batchdata: dict[str, Any], device=None, non_blocking: bool = False, decoder_resolution: bool = False, **kwargs):
    """MONAI's ``default_prepare_batch``, plus the batch's prompts (when the iteration simulated some) passed to
    the network as ``prompts``. ``decoder_resolution``: the network returns its decoder's logits (a quarter of the
    slice's side) and the label is resized to them by nearest neighbour. A label that annotates only some classes
    has its background marked (``mark_unannotated``), so the loss does not teach the others as background."""
    image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    if "annotated" in batchdata:  # the classes each slice's label annotates (training_slice_transforms)
        label = mark_unannotated(label, batchdata["annotated"])
    options: dict[str, Any] = {}
    if decoder_resolution:
        label = F.interpolate(label.float(), size=(image.shape[-2] // 4, image.shape[-1] // 4), mode="nearest").to(label.dtype)
        options["decoder_resolution"] = True
    if PROMPT_PREFIX + "points" in batchdata:
        fields = {k: batchdata[PROMPT_PREFIX + k] for k in vars(Prompts())}
        options["prompts"] = Prompts(**{k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in fields.items()})
    return (image, label, (), options) if options else (image, label)
