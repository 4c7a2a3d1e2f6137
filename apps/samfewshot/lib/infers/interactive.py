"""Clicks and boxes on a SAM model: the MONAI Label task 3D Slicer and OHIF show under their point tools.

MONAI Label type ``deepgrow``, dimension 3. 3D Slicer sends the segment's name as ``label`` with all its
``foreground``/``background`` points and optionally an ``roi``, and replaces that segment with the binary mask it
gets back; OHIF sends the points without a label and puts the mask on the segment selected there. ``deepgrow``
fits SAM: positive and negative clicks (and a box) point at one structure, which SAM's prompt decoder segments. The
task shares the model's resident network, adapter and image-embedding cache with its segmentation task.

One interaction gives a 3D result (``propagate``), decoded one of two ways (the result's ``prompt_path``):

* ``object``, for a segment name outside the model's labels (a new structure), and for any prompt while a
  pretrained backbone has no adapter yet: SAM's own class-agnostic decoding (``SamSegmenter.decode_object``) of the
  pretrained backbone answers the box and clicks, and the structure is followed slice by slice with a box
  around the previous slice's mask, as LiteMedSAM's official 3D inference does (no mask prompt: it was trained
  without one);
* ``class``, for one of the model's labels (or none) once an adapter is served: the prompted slices are decoded
  for the segment's class, starting from the automatic segmentation with the clicks drawn in as mask prompt; from
  there the structure is followed with SAM's mask prompt (the previous slice's logits) and a box around the previous
  mask.

Either way a walk goes on until the mask vanishes. An ``roi`` also bounds the result: its slices and its box.

What the answer covers (the result's ``scope``) depends on the structure, not on the path: an object (a segment
named in ``--conf object_labels``, such as lesions, or a new structure) is the connected 3D component(s) the prompts
touch (``prompted_components``), so two lesions of one class are two answers; a tissue (the other labels: white
matter, an organ that 3D Slicer keeps as one segment) is the whole class, as the segment it replaces.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.transforms import CastToTyped, Compose, Invertd, Lambdad, SqueezeDimd
from monailabel.interfaces.tasks.infer_v2 import InferType
from scipy import ndimage

from lib.compute import autocast, torch_threads
from lib.evaluation import dice
from lib.infers.embedding_cache import CachedEncoding, DecodedSlices, EmbeddingCache, slice_digest
from lib.infers.slice_segmentation import SamSliceInfer
from lib.networks.sam_segmenter import SamSegmenter, SliceFeatures
from lib.served_model import ServedModel
from lib.transforms.clicks import box_of, click_cells, correct_by_clicks, draw_clicks, error_click
from lib.transforms.prompts import SlicePrompt, batch_prompts, slice_prompts

logger = logging.getLogger(__name__)

# A propagated mask that covers less than this share of the decoder's grid has vanished: the structure ended.
VANISHED_FRACTION = 1e-3
# The box around the previous slice's mask grows by this share of its size on each side (structures widen).
BOX_MARGIN = 0.1


def propagate(
    network: SamSegmenter,
    volume: torch.Tensor,
    prompted: dict[int, SlicePrompt],
    target_class: int | None = None,
    encode: Callable | None = None,
    batch_size: int = 2,
    bounds: tuple[int, int] | None = None,
    by_class: bool = True,
    decoded: DecodedSlices | None = None,
) -> tuple[torch.Tensor, list[int], int | None]:
    """(1, S, S, D) volume, the prompts of some of its slices -> (S, S, D) probabilities of the prompted structure,
    the slices it was found on, and its class.

    Without ``by_class`` the structure is whatever the prompts point at, decoded by ``decode_object`` (the class
    returned is ``target_class`` as given). Otherwise it is class ``target_class``, or when None the foreground class
    the automatic segmentation gives the first foreground point of the lowest prompted slice (or the inside of its
    box). That slice is decoded first,
    then two walks leave it, upwards and downwards, side by side in one decoder batch: a prompted slice is decoded
    with its own prompts and, as mask prompt, the automatic segmentation of the class with the clicks drawn in
    (``draw_clicks``, also drawn over its answer); any other slice with the previous slice's logits as mask prompt
    and a box around that mask. A
    walk ends beyond the prompted slices once the mask vanishes (inside their range it resumes at the next prompted
    slice). ``bounds`` (first, last) limits the slices; ``encode`` replaces the network's encoder (the cache).
    Slices are encoded ``batch_size`` at a time in each walk's direction.

    ``decoded`` keeps every slice's answer (and automatic segmentation) under the slice's content and the inputs of
    its decoding, so the same decoding is never run twice: a prompted slice's answer depends on its own prompts only,
    a followed slice's on the previous answer it follows. The next click on a structure under a box (every slice
    prompted) decodes the clicked slice alone, and one below a walk's start leaves the slices before it as they were.
    """
    depth = volume.shape[-1]
    size = volume.shape[1]
    grid = network.prompt_encoder.mask_input_size
    first, last = bounds or (0, depth - 1)
    low, high = min(prompted), max(prompted)
    prepared: dict[int, tuple[torch.Tensor, SliceFeatures]] = {}
    contents: dict[int, bytes] = {}

    def features(k: int, step: int) -> tuple[torch.Tensor, SliceFeatures]:
        if k not in prepared:
            ks = [j for j in range(k, k + step * batch_size, step) if first <= j <= last and j not in prepared]
            embedding, f = network.prepare(volume[..., ks].permute(3, 0, 1, 2), encode)
            for i, j in enumerate(ks):
                prepared[j] = (embedding[i : i + 1], f.select(i))
        return prepared[k]

    def content(k: int) -> bytes:
        if k not in contents:
            contents[k] = slice_digest(volume[..., k])
        return contents[k]

    def remembered(key: tuple, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        answer = decoded.get(key) if decoded else None
        if answer is None:
            answer = run()
            if decoded:
                decoded.put(key, answer)
        return answer

    def automatic(k: int) -> torch.Tensor:
        """Slice ``k``'s class logits (1, K, g, g) without prompts."""
        return remembered(("automatic", content(k)), lambda: network.decode(*features(k, 1)))

    def kept(out: torch.Tensor) -> torch.Tensor | None:
        """The logits handed to the next slice, or None once the structure has vanished."""
        return out if (out > 0).sum() >= max(1, VANISHED_FRACTION * out.shape[-1] * out.shape[-2]) else None

    cells: dict[int, list] = {}

    def clicks(k: int) -> list:
        """A prompted slice's clicks as cells of the decoder's grid (``click_cells``, once per slice: drawn into its
        mask prompt and over its answer); none on the object path."""
        if not by_class or k not in prompted:
            return []
        if k not in cells:
            cells[k] = click_cells(prompted[k]["points"], volume[0, :, :, k].float().cpu().numpy(), grid)
        return cells[k]

    # The object path has no class to take away from: each of its prompted slices must point at something.
    if not by_class and any(p["box"] is None and not any(label == 1 for *_, label in p["points"]) for p in prompted.values()):
        raise ValueError("background points alone do not say which structure to segment: add a foreground point, a box or a label")
    if by_class and target_class is None:
        target_class = clicked_class(automatic(low), prompted[low], size)

    def item(k: int, previous: torch.Tensor | None) -> tuple:
        """(slice, prompt, mask prompt or None, key of its answer): its own prompts, or following the previous slice."""
        if k in prompted:
            prompt = prompted[k]
            key = (content(k), by_class, target_class, prompt["box"], tuple(prompt["points"]))
            return k, prompt, None, key
        prompt = _follow(previous, size)
        if not by_class:  # the object decoding takes no mask prompt: the box around the previous mask is all it follows
            return k, prompt, None, (content(k), False, target_class, prompt["box"])
        return k, prompt, previous, (content(k), True, target_class, slice_digest(previous))

    def mask_prompt(k: int, previous: torch.Tensor | None) -> torch.Tensor:
        if previous is not None:
            return previous
        chosen = torch.tensor([target_class], device=volume.device)
        return draw_clicks(network.object_logit(automatic(k), chosen)[0], clicks(k))[None]

    def decode(items: list[tuple], steps: list[int]) -> list[torch.Tensor]:
        answers = [decoded.get(key) if decoded else None for *_, key in items]
        todo = [(i, step) for i, (answer, step) in enumerate(zip(answers, steps)) if answer is None]
        if not todo:
            return answers
        encoded = [features(items[i][0], step) for i, step in todo]
        embedding = torch.cat([e for e, _ in encoded])
        f = SliceFeatures.cat([x for _, x in encoded])
        batch = [items[i] for i, _ in todo]
        if not by_class:
            outs = [out[None] for out in network.decode_object(f, batch_prompts([p for _, p, _, _ in batch], embedding.device))]
        else:
            masks = torch.cat([mask_prompt(k, previous) for k, _, previous, _ in batch])
            prompts = batch_prompts([p for _, p, _, _ in batch], embedding.device, masks=masks)
            chosen = torch.full((len(batch),), target_class, device=embedding.device)
            outs = network.object_logit(network.decode_prompted(embedding, f, prompts), chosen)
            outs = [draw_clicks(out, clicks(k))[None] for (k, *_), out in zip(batch, outs)]
        for (i, _), out in zip(todo, outs):
            answers[i] = out
            if decoded:
                decoded.put(items[i][-1], out)
        return answers

    logits = {low: decode([item(low, None)], [1])[0]}
    walks = {1: low + 1, -1: low - 1}  # direction -> the slice it decodes next
    previous = {step: kept(logits[low]) for step in walks}
    while walks:
        items, steps = [], []
        for step in list(walks):
            k = walks[step]
            while step > 0 and k <= high and k not in prompted and previous[step] is None:
                k += 1  # a gap between prompted slices where the structure vanished: on to the next prompted one
            beyond = k > high if step > 0 else True
            if not first <= k <= last or (beyond and previous[step] is None and k not in prompted):
                del walks[step]
                continue
            items.append(item(k, previous[step]))
            steps.append(step)
        for (k, *_), step, out in zip(items, steps, decode(items, steps) if items else []):
            logits[k] = out
            previous[step] = kept(out)
            walks[step] = k + step
    probabilities = torch.zeros(size, volume.shape[2], depth, device=volume.device)
    for k, out in logits.items():
        probabilities[..., k] = torch.sigmoid(F.interpolate(out.float(), size=volume.shape[1:3], mode="bilinear", align_corners=False))[
            0, 0
        ]
    found = sorted(k for k, out in logits.items() if (out > 0).any())
    return probabilities, found, target_class


# The interactive task's cache of decoded slices is this many times smaller than the embedding cache.
DECODINGS_SHARE = 4


# A segment name this similar to one of the model's labels (difflib's ratio, case ignored) is taken for a typo of it.
NEAR_DUPLICATE_RATIO = 0.8


def near_duplicate(name: str, labels: Mapping[str, int]) -> str | None:
    """The model label ``name`` is a near-duplicate of ("Grey Matter", "gray matter" for "grey matter"), or None."""
    folded = {label.casefold(): label for label in labels}
    match = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=NEAR_DUPLICATE_RATIO)
    return folded[match[0]] if match else None


def clicked_class(logits: torch.Tensor, prompt: SlicePrompt, size: int) -> int:
    """The foreground class (1..K-1) a prompt points at, from class logits (1, K, g, g): the most probable at the
    first foreground point, else over the box; a prompt of background points alone names none."""
    probabilities = torch.softmax(logits.float()[0], dim=0)[1:]
    scale = logits.shape[-1] / size
    positives = [(x, y) for x, y, label in prompt["points"] if label == 1]
    if positives:
        x, y = (min(int(v * scale), logits.shape[-1] - 1) for v in positives[0])
        return 1 + int(probabilities[:, y, x].argmax())
    if prompt["box"] is not None:
        x0, y0, x1, y1 = (int(v * scale) for v in prompt["box"])
        return 1 + int(probabilities[:, y0 : y1 + 1, x0 : x1 + 1].flatten(1).mean(1).argmax())
    raise ValueError("background points alone do not say which structure to segment: add a foreground point, a box or a label")


def prompted_components(mask: np.ndarray, prompted: dict[int, SlicePrompt]) -> np.ndarray:
    """The parts of ``mask`` (S, S, D; ``[y, x, slice]``) that the prompts touch: its 26-connected 3D components
    holding a foreground point, or, on a prompted slice without one, reaching into the slice's box."""
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    touched = set()
    for k, prompt in prompted.items():
        positives = [(x, y) for x, y, label in prompt["points"] if label == 1]
        for x, y in positives:
            touched.add(components[min(int(y), mask.shape[0] - 1), min(int(x), mask.shape[1] - 1), k])
        if not positives and prompt["box"] is not None:
            x0, y0, x1, y1 = (int(v) for v in prompt["box"])
            touched.update(np.unique(components[y0 : y1 + 1, x0 : x1 + 1, k]).tolist())
    touched.discard(0)
    return np.isin(components, sorted(touched))


def click_session(
    network: SamSegmenter, image: torch.Tensor, target: np.ndarray, target_class: int, clicks: int, encode: Callable | None = None
) -> list[float]:
    """A simulated annotator on one slice (1, S, S) segmenting class ``target_class``, whose true mask is
    ``target`` (S, S): the first click at the centre of the structure, with the automatic segmentation as mask
    prompt, each next one at the centre of the largest error (``correct_by_clicks``), as interactive segmentation is
    evaluated; Dice after each click."""
    first = error_click(np.zeros_like(target), target)
    if first is None:
        return [1.0] * clicks
    embedding, features = network.prepare(image[None], encode)
    plane = image[0].float().cpu().numpy()
    automatic = network.object_logit(network.decode(embedding, features), torch.tensor([target_class], device=embedding.device))
    prompt: SlicePrompt = {"points": [first], "box": None}
    mask = draw_clicks(automatic[0].float().cpu(), click_cells(prompt["points"], plane, automatic.shape[-2:]))
    session = {"prompt": prompt, "mask": mask, "class": target_class, "target": target}
    return [
        dice(_upsampled(answers[:1], target.shape) > 0, target)
        for answers in correct_by_clicks(network, embedding, features, [session], [plane], clicks)
    ]


def object_prompt_dice(network: SamSegmenter, image: torch.Tensor, target: np.ndarray, encode: Callable | None = None) -> dict[str, float]:
    """What the object decoding (``decode_object``, no class, no training needed) makes of one prompt on one slice
    (1, S, S) whose structure is ``target`` (S, S): Dice after a box around it, after one click at its centre, and
    after both."""
    _, features = network.prepare(image[None], encode)
    box, click = box_of(target), error_click(np.zeros_like(target), target)
    answers = {}
    for kind, prompt in (
        ("box", {"points": [], "box": box}),
        ("click", {"points": [click], "box": None}),
        ("box_click", {"points": [click], "box": box}),
    ):
        logits = network.decode_object(features, batch_prompts([prompt], features.image.device))
        answers[kind] = dice(_upsampled(logits, target.shape) > 0, target)
    return answers


def _upsampled(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


def _follow(previous: torch.Tensor, size: int) -> SlicePrompt:
    """The box prompt of the slice after one whose logits (1, 1, g, g) are ``previous``: around its mask, grown
    by ``BOX_MARGIN``, in model-input pixels of ``size``."""
    x0, y0, x1, y1 = box_of((previous[0, 0] > 0).cpu().numpy())
    scale = size / previous.shape[-1]
    grow_x, grow_y = BOX_MARGIN * (x1 - x0 + 1), BOX_MARGIN * (y1 - y0 + 1)
    box = [(x0 - grow_x) * scale, (y0 - grow_y) * scale, (x1 + 1 + grow_x) * scale - 1, (y1 + 1 + grow_y) * scale - 1]
    return {"points": [], "box": tuple(float(np.clip(v, 0, size - 1)) for v in box)}


def float_encoding(encode: Callable, precision: str, device, threads: int) -> Callable:
    """``encode`` under ``precision``'s autocast on ``threads`` CPU threads, its outputs in fp32: the decoder, which
    propagation runs once per slice, then runs in fp32, where its small products are faster on a CPU than in bf16
    (docs/benchmarks.md)."""

    def run(image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch_threads(threads), autocast(precision, device):
            embedding, taps = encode(image)
        return embedding.float(), [t.float() for t in taps]

    return run


class SliceInteraction(SamSliceInfer):
    """``<model>_interactive``: clicks and an optional box on a volume -> the clicked structure's binary mask on the
    volume's own grid (1 inside). Request: ``foreground``/``background`` [[i, j, k], ...] and ``roi`` [i0, i1, j0,
    j1, k0, k1] in voxel indices of the volume as stored; ``label``, the segment's name (3D Slicer): one of the
    model's labels selects its class; a name outside them is a new structure, segmented by SAM's own object
    decoding (a near-duplicate of a label, such as "Grey Matter", is refused with that label's name). The result
    names the segment (``label_names``), the slices it covers, the path that answered (``prompt_path``) and what the
    answer covers (``scope``: ``object`` or ``class``).

    Args:
        model: the served SAM model; its resident network, adapter and labels are the segmentation task's.
        embeddings: the model's image-embedding cache, shared with its segmentation task, so clicks on a volume just
            segmented run only the decoder. The decoder's answers for single slices (``DecodedSlices``) are kept in a
            cache of their own, a quarter of its size: in the same one they evicted embeddings of the volume being
            annotated, which a LiteMedSAM volume of 125 slices fills (docs/benchmarks.md).
        object_labels: the labels answered as objects (the prompted connected components), not as whole classes.
        description: the task's description in MONAI Label; default names the model and its backbone.
        kwargs: passed on to ``SamSliceInfer`` (``device``, ``batch_size``, ``precision``, ``preload``, ``engine``).
    """

    def __init__(
        self, model: ServedModel, embeddings: EmbeddingCache, object_labels: frozenset[str] = frozenset(), description: str = "", **kwargs
    ):
        description = description or (
            f"{model.name} ({model.backbone}): clicks and boxes segment one structure, propagated through the volume"
        )
        super().__init__(model, embeddings, type=InferType.DEEPGROW, description=description, **kwargs)
        self.object_labels = object_labels
        self.decodings = EmbeddingCache(embeddings.max_bytes // DECODINGS_SHARE)

    def post_transforms(self, data=None) -> list:
        return [
            Invertd(keys="pred", transform=Compose(self._pre), orig_keys="image", nearest_interp=False),
            Lambdad(keys="pred", func=lambda p: p > 0.5),
            SqueezeDimd(keys="pred", dim=0),
            CastToTyped(keys="pred", dtype=np.uint8),
        ]

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        label = data.get("label")
        new_structure = label is not None and label not in self.model.labels
        near = new_structure and near_duplicate(label, self.model.labels)
        if near:
            raise HTTPException(
                status_code=422,
                detail=f"label {label!r} is not one of {self.model.name}'s labels but close to {near!r}: send {near!r}, "
                f"or a name unlike the model's labels ({', '.join(self.model.labels)}) for a new structure",
            )
        image = data["image"]
        try:
            prompted = slice_prompts(image, data)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        if not prompted:
            raise HTTPException(status_code=422, detail="send foreground or background points ([[i, j, k], ...]) or an roi to segment")
        pointed = any(p["box"] is not None or any(kind == 1 for *_, kind in p["points"]) for p in prompted.values())
        if label in self.object_labels and not pointed:
            raise HTTPException(
                status_code=422,
                detail=f"background points alone do not say which {label!r} to segment ({label!r} is answered object by object, "
                "--conf object_labels): add a foreground point or a box",
            )
        cached = self._get_network(device, data)
        network, encode, decoded = (
            (cached.network, cached.encode, DecodedSlices(self.decodings, cached.scope))
            if isinstance(cached, CachedEncoding)
            else (cached, cached.encode, None)
        )
        # A structure outside the label set, and anything before a pretrained model's first adapter, is answered by
        # SAM's own object decoding; `tiny` is random either way and keeps the class path for its labels.
        by_class = not new_structure and (not self.model.pretrained or data["adapter_version"] > 0)
        boxed = sorted(k for k, p in prompted.items() if p["box"] is not None)
        bounds = (min(boxed[0], min(prompted)), max(boxed[-1], max(prompted))) if data.get("roi") else None
        volume = image.as_tensor().to(device)
        target_class = self.model.labels.get(label) if label is not None else None
        # On a CPU the decoder's small operators ran twice as fast on one thread as on two (thread hand-offs
        # dominate them); the encoder, for slices not cached, keeps every thread (docs/benchmarks.md).
        threads = torch.get_num_threads()
        try:
            with torch.no_grad(), torch_threads(1 if str(device).startswith("cpu") else threads):
                encode = float_encoding(encode, self.precision, device, threads)
                probabilities, found, target_class = propagate(
                    network, volume, prompted, target_class, encode, self.batch_size, bounds, by_class=by_class, decoded=decoded
                )
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        if bounds:
            x0, y0, x1, y1 = prompted[boxed[0]]["box"]
            inside = torch.zeros_like(probabilities[..., 0], dtype=torch.bool)
            inside[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = True
            probabilities = probabilities * inside[..., None]
        names = {i: n for n, i in self.model.labels.items()}
        # An answer the object decoding gave without a class (OHIF's label-less points) is an object as well
        scope = "object" if new_structure or target_class is None or names.get(target_class) in self.object_labels else "class"
        if scope == "object":
            touched = torch.from_numpy(prompted_components((probabilities > 0.5).cpu().numpy(), prompted))
            probabilities = probabilities * touched.to(probabilities.device)
            found = [k for k in found if touched[..., k].any()]
        data["pred"] = MetaTensor(probabilities[None].cpu(), meta=image.meta, applied_operations=image.applied_operations)
        data["prompted_slices"], data["found_slices"], data["target_class"] = sorted(prompted), found, target_class
        data["prompt_path"], data["scope"] = "class" if by_class else "object", scope
        return data

    def __call__(self, request, callbacks=None):
        result_file, result_json = super().__call__(request, callbacks)
        names = {i: n for n, i in self.model.labels.items()}
        # MONAI Label sets the model's labels; the answer is one segment: its class, the new structure the client
        # named, or the object the prompts chose
        name = names.get(result_json["target_class"]) or request.get("label") or "object"
        result_json["label_names"] = {name: 1}
        return result_file, result_json

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        result_file, result_json = super().writer(data, extension, dtype)
        for key in ("prompted_slices", "found_slices", "target_class", "prompt_path", "scope"):
            result_json[key] = data[key]
        return result_file, result_json
