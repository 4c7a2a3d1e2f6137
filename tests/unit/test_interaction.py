"""Interactive segmentation on its own: simulated clicks, drawing clicks into a mask prompt, propagation through a
volume, prompt-aware training's iteration hook, annotators' interactions replayed by training, and the log that
keeps them until a label is saved."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from lib.annotator_prompts import InteractionLog
from lib.evaluation import dice
from lib.infers.embedding_cache import DecodedSlices, EmbeddingCache
from lib.infers.interactive import click_session, clicked_class, propagate
from lib.networks.hf_sam import HFSam
from lib.networks.sam_segmenter import Prompts, SamSegmenter, SliceFeatures, build_segmenter
from lib.trainers.simulated_prompts import PROMPT_PREFIX, SimulatedInteraction, prepare_prompted_batch, replay
from lib.transforms.clicks import (
    centre,
    click_cells,
    click_region,
    correct_by_clicks,
    draw_clicks,
    error_click,
    interior_click,
    jittered_box,
    mask_logits,
    perturbed_mask,
)
from lib.transforms.slices import (
    BOX_MARK,
    NEGATIVE_MARK,
    POSITIVE_MARK,
    InteractionMapd,
    InteractionPromptsd,
    WithInteractionSliced,
    volume_transforms,
)

LABELS = {"white matter": 1, "grey matter": 2}


def disk(shape, centre_xy, radius) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (cols - centre_xy[0]) ** 2 + (rows - centre_xy[1]) ** 2 <= radius**2


# ---- simulated clicks -------------------------------------------------------------------------------------
def test_clicks_go_to_the_centre_of_the_largest_error():
    target = disk((64, 64), (20, 30), 10) | disk((64, 64), (50, 50), 4)
    assert centre(disk((64, 64), (20, 30), 10)) == (20, 30)
    assert error_click(np.zeros_like(target), target) == (20, 30, 1)  # the larger missed region first
    too_much = target | disk((64, 64), (45, 12), 12)
    assert error_click(too_much, target) == (45, 12, 0)  # a negative click where too much was taken
    assert error_click(target, target) is None


def test_first_clicks_boxes_and_perturbed_masks_stay_on_the_object():
    rng = np.random.default_rng(0)
    target = disk((64, 64), (30, 30), 12)
    for _ in range(20):
        x, y, label = interior_click(target, rng)
        assert label == 1 and target[y, x]
        x0, y0, x1, y1 = jittered_box(target, rng)
        assert 0 <= x0 < x1 <= 63 and 0 <= y0 < y1 <= 63
        assert abs(x0 - 18) <= 2.5 and abs(x1 - 42) <= 2.5  # within 10 % of the box's size
        moved = perturbed_mask(torch.from_numpy(target), rng).numpy()
        assert 0.3 < (moved & target).sum() / target.sum() <= 1.0 + 1e-9 or moved.sum() > target.sum()
    logits = mask_logits(torch.from_numpy(target), (16, 16))
    assert logits.shape == (1, 16, 16) and logits[0, 7, 7] == 8.0 and logits[0, 0, 0] == -8.0


def test_a_click_speaks_for_the_similar_tissue_around_it_and_is_drawn_in():
    image = np.zeros((64, 64), dtype=np.float32)
    image[8:24, 8:40] = 0.5  # a bright band; the click at (20, 16) lies in it
    region = click_region(image, (20.0, 16.0, 1), radius=64, tolerance=0.1)
    assert region.sum() == 16 * 32 and region[8:24, 8:40].all()
    assert click_region(image, (20.0, 16.0, 1), radius=6, tolerance=0.1).sum() < region.sum()  # bounded around it
    cells = click_cells([(20.0, 16.0, 1), (60.0, 60.0, 0)], image, (16, 16), radius_fraction=1.0, tolerance=0.1)
    logits = torch.zeros(1, 16, 16)
    drawn = draw_clicks(logits, cells)
    assert (drawn[0, 2:6, 2:10] == 8.0).all() and drawn[0, 15, 15] == -8.0
    assert logits.abs().sum() == 0  # the input is left alone


# ---- propagation on a stub network ------------------------------------------------------------------------
class BrightTube:
    """A stand-in for SamSegmenter with the interface propagation uses: bright (> 0.5) cells left of column 11 are
    class 1, other bright cells class 2; the prompted decoding finds a class only inside its box or next to its
    mask prompt, like a network that follows prompts."""

    prompt_encoder = SimpleNamespace(mask_input_size=(16, 16))
    object_logit = staticmethod(SamSegmenter.object_logit)

    def prepare(self, image, encode=None):
        low = torch.nn.functional.avg_pool2d(image, 4)  # 64 -> 16 cells
        return low, SliceFeatures(image=image, taps=[])

    @staticmethod
    def classes(found: torch.Tensor) -> torch.Tensor:
        left = torch.zeros_like(found)
        left[..., :11] = 1
        one, two = found * left, found * (1 - left)
        return torch.cat([1 - one - two, one, two], dim=1) * 10 - 5

    def decode(self, embedding, features):
        return self.classes((embedding > 0.5).float())

    def decode_prompted(self, embedding, features, prompts: Prompts):
        bright = embedding[:, 0] > 0.5
        allowed = torch.zeros_like(bright)
        for b in range(len(bright)):
            corners = prompts.points[b][prompts.point_labels[b] >= 2] / 4
            if len(corners):
                (x0, y0), (x1, y1) = corners.tolist()
                allowed[b, int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
            if prompts.masks is not None:
                near = torch.nn.functional.max_pool2d((prompts.masks[b : b + 1] > 0).float(), 3, 1, 1)[0, 0] > 0
                allowed[b] |= near
        return self.classes((bright & allowed).float()[:, None])


@pytest.fixture
def tube() -> torch.Tensor:
    """(1, 64, 64, 12): a bright disk on slices 3..8 that drifts right by 2 pixels per slice, a second bright
    disk elsewhere on every slice."""
    volume = torch.zeros(1, 64, 64, 12)
    for k in range(12):
        if 3 <= k <= 8:
            volume[0, :, :, k] = torch.from_numpy(disk((64, 64), (20 + 2 * k, 24), 8)).float()
        volume[0, :, :, k] += torch.from_numpy(disk((64, 64), (52, 52), 6)).float()
    return volume


def test_one_click_follows_the_structure_through_the_volume_and_stops(tube):
    probabilities, found, target_class = propagate(BrightTube(), tube, {5: {"points": [(30.0, 24.0, 1)], "box": None}})
    assert target_class == 1 and found == [3, 4, 5, 6, 7, 8]
    mask = probabilities > 0.5
    assert not mask[..., :3].any() and not mask[..., 9:].any()
    assert not mask[44:60, 44:60].any(), "the other bright disk was never pointed at"
    for k in range(3, 9):
        assert mask[24, 20 + 2 * k, k], k


def test_a_box_names_the_structure_and_bounds_limit_the_walk(tube):
    box = {"points": [], "box": (10.0, 10.0, 40.0, 40.0)}
    _, found, _ = propagate(BrightTube(), tube, {4: box}, target_class=1, bounds=(4, 6))
    assert found == [4, 5, 6]
    with pytest.raises(ValueError, match="background points alone"):
        propagate(BrightTube(), tube, {4: {"points": [(5.0, 5.0, 0)], "box": None}})


def test_prompted_slices_apart_are_joined_and_cached_slices_are_encoded_once(tube):
    calls = []
    stub = BrightTube()
    original = stub.prepare
    stub.prepare = lambda image, encode=None: calls.append(image.shape[0]) or original(image, encode)
    prompts = {3: {"points": [(26.0, 24.0, 1)], "box": None}, 8: {"points": [(36.0, 24.0, 1)], "box": None}}
    _, found, _ = propagate(stub, tube, prompts, batch_size=4)
    assert found == [3, 4, 5, 6, 7, 8]
    assert sum(calls) <= 12 and max(calls) <= 4


def test_decoded_slices_are_remembered_so_a_new_click_under_a_box_decodes_its_slice_alone(tube):
    stub = BrightTube()
    decoded_items = []
    for name in ("decode", "decode_prompted"):
        original = getattr(stub, name)
        setattr(stub, name, lambda embedding, *args, _run=original: decoded_items.append(len(embedding)) or _run(embedding, *args))
    memo = DecodedSlices(EmbeddingCache(64 << 20), ("cpu", 1, "torch-fp32"))
    box = (10.0, 10.0, 40.0, 40.0)
    under_box = {k: {"points": [], "box": box} for k in range(3, 9)}  # an roi puts its box on every slice of its range
    clicked = {**under_box, 6: {"points": [(32.0, 24.0, 1)], "box": box}}
    for prompts in (under_box, clicked):
        expected = propagate(BrightTube(), tube, prompts, target_class=1, bounds=(3, 8))
        decoded_items.clear()
        answer = propagate(stub, tube, prompts, target_class=1, bounds=(3, 8), decoded=memo)
        torch.testing.assert_close(answer[0], expected[0])
        assert answer[1:] == expected[1:]
    assert sum(decoded_items) == 1, "the clicked slice's prompted decoding; its automatic segmentation is remembered"
    decoded_items.clear()
    propagate(stub, tube, clicked, target_class=1, bounds=(3, 8), decoded=memo)
    assert decoded_items == []
    # A click outside any box: the walk's slices below the click follow what they followed before.
    decoded_items.clear()
    propagate(stub, tube, {3: {"points": [(26.0, 24.0, 1)], "box": None}}, target_class=1, decoded=memo)
    first_walk = sum(decoded_items)
    decoded_items.clear()
    prompts = {3: {"points": [(26.0, 24.0, 1)], "box": None}, 7: {"points": [(34.0, 24.0, 1)], "box": None}}
    answer = propagate(stub, tube, prompts, target_class=1, decoded=memo)
    torch.testing.assert_close(answer[0], propagate(BrightTube(), tube, prompts, target_class=1)[0])
    assert sum(decoded_items) < first_walk


def test_the_simulated_annotator_clicks_on_what_it_sees_and_hands_it_on_as_mask_prompt(tube):
    stub = BrightTube()
    plane = tube[0, :, :, 5].numpy()
    target = plane > 0.5
    target[44:60, 44:60] = False  # the structure is the drifting disk, not the other one
    embedding, features = stub.prepare(tube[..., 5][None])
    session = {"prompt": {"points": [(30.0, 24.0, 1)], "box": None}, "mask": torch.zeros(1, 16, 16), "class": 1, "target": target}
    rounds = correct_by_clicks(stub, embedding, features, [session], [plane], 6)
    scores = [dice(torch.nn.functional.interpolate(r, size=(64, 64), mode="bilinear")[0, 0].numpy() > 0, target) for r in rounds]
    # No box and an empty mask prompt: the stub answers only next to what it was handed, so the answer grows from the
    # clicks drawn in, round after round, and every click so far is drawn over it.
    assert scores == sorted(scores) and scores[-1] > scores[0]
    assert len(session["prompt"]["points"]) > 1 and session["prompt"]["points"][0] == (30.0, 24.0, 1)
    assert all(r[0, 0, 6, 7] == 8.0 for r in rounds), "the first click (30, 24) is drawn over every answer"


def test_clicked_class_reads_the_point_or_the_box():
    logits = torch.zeros(1, 3, 16, 16)
    logits[0, 2, :8] = 5.0  # class 2 in the top half
    logits[0, 1, 8:] = 5.0
    assert clicked_class(logits, {"points": [(10.0, 4.0, 1)], "box": None}, 64) == 2
    assert clicked_class(logits, {"points": [(10.0, 60.0, 1)], "box": None}, 64) == 1
    assert clicked_class(logits, {"points": [], "box": (0.0, 40.0, 63.0, 63.0)}, 64) == 1


# ---- the real network ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def network():
    return build_segmenter(HFSam, "tiny", 3).eval()


def test_a_click_session_reports_dice_after_every_click(network):
    image = torch.rand(1, 256, 256)
    target = disk((256, 256), (100, 120), 30)
    with torch.no_grad():
        dices = click_session(network, image, target, target_class=1, clicks=4)
    assert len(dices) == 4 and all(0.0 <= d <= 1.0 for d in dices)


def test_the_training_hook_prompts_a_share_of_the_slices_and_runs_the_step(network):
    """SimulatedInteraction is the trainer's iteration_update: it adds prompts and the object channel of the
    label, then hands the batch to the engine's own iteration."""
    label = torch.zeros(4, 1, 256, 256, dtype=torch.long)
    label[:3, 0, 60:120, 60:160] = 1
    label[:3, 0, 140:200, 80:120] = 2  # the last slice holds no structure
    batch = {
        "image": torch.rand(4, 1, 256, 256),
        "label": label.clone(),
        "click_map": torch.zeros(4, 1, 256, 256, dtype=torch.uint8),
        "click_class": torch.zeros(4, dtype=torch.long),
    }
    engine = SimpleNamespace(network=network, state=SimpleNamespace(device="cpu"), _iteration=lambda engine, data: data)
    out = SimulatedInteraction(share=1.0, max_corrections=2, seed=1)(engine, batch)
    assert out["label"].shape == (4, 2, 256, 256)
    torch.testing.assert_close(out["label"][:, :1], label)
    for b in range(3):
        classes = set(out["label"][b, 1].unique().tolist())
        assert classes in ({0, 1}, {0, 2}), classes
        chosen = max(classes)
        labels = out[PROMPT_PREFIX + "point_labels"][b]
        points = out[PROMPT_PREFIX + "points"][b][labels >= 0]
        assert len(points) >= 1 and bool(out[PROMPT_PREFIX + "mask_valid"][b])
        assert (points >= 0).all() and (points <= 255).all()
        first = labels[0].item()
        if first == 1:  # an interior click lies on the prompted class
            x, y = points[0].round().long().tolist()
            assert label[b, 0, y, x] == chosen
    assert (out["label"][3, 1] == -1).all() and not bool(out[PROMPT_PREFIX + "mask_valid"][3])

    image, target, args, kwargs = prepare_prompted_batch(out, "cpu")
    assert isinstance(kwargs["prompts"], Prompts) and kwargs["prompts"].masks.shape == (4, 1, 64, 64)
    logits = network(image, **kwargs)
    assert logits.shape == (4, 6, 256, 256)
    assert torch.isfinite(network.training_loss(logits, target))


def test_a_replayed_interaction_becomes_the_prompt():
    clicks = np.zeros((64, 64), dtype=np.uint8)
    clicks[10:30, 10:40] = BOX_MARK
    clicks[19:22, 19:22] = POSITIVE_MARK
    clicks[49:52, 9:12] = NEGATIVE_MARK
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[15:25, 15:35] = 2
    replayed = replay(clicks, labels, click_class=0)
    assert replayed["class"] == 2  # the class under the first positive point: the client named none
    assert replayed["prompt"]["points"] == [(20.0, 20.0, 1), (10.0, 50.0, 0)]
    assert replayed["prompt"]["box"] == (10.0, 10.0, 39.0, 29.0)
    assert replay(clicks, labels, click_class=1)["class"] == 1
    assert replay(np.zeros_like(clicks), labels, 1) is None


# ---- annotators' interactions, kept and replayed ------------------------------------------------------------
@pytest.fixture
def interaction_volume(tmp_path) -> dict:
    data = np.zeros((40, 30, 12), dtype=np.float32)
    data[10:30, 5:25, 2:10] = 100.0
    label = (data > 0).astype(np.uint8)
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    return Compose(volume_transforms(64, "MR", LABELS))({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})


def test_an_annotators_interaction_is_drawn_on_its_slice_and_cropped_first(interaction_volume):
    interactions = [
        {"label": "white matter", "foreground": [[20, 15, 6]], "background": [[2, 2, 6]], "roi": [12, 28, 6, 24, 6, 6]},
        {"label": None, "foreground": [[99, 1, 1]]},  # does not fit this volume: left out
        {"label": "lesion", "foreground": [[20, 15, 6]]},  # a structure outside the labels: left out
    ]
    converted = InteractionPromptsd(LABELS)({**interaction_volume, "interactions": interactions})
    assert "interactions" not in converted and len(converted["interaction_prompts"]) == 1
    target_class, prompted = converted["interaction_prompts"][0]
    assert target_class == 1 and list(prompted) == [6]

    mapped = InteractionMapd()(converted)
    assert "interaction_prompts" not in mapped and mapped["click_class"] == 1 and mapped["click_slice"] == 6
    marks = mapped["click_map"][0]
    assert marks.shape == (64, 64, 12) and marks[..., :6].sum() == 0 and marks[..., 7:].sum() == 0
    assert {int(v) for v in marks[..., 6].unique()} == {0, POSITIVE_MARK, NEGATIVE_MARK, BOX_MARK}

    from monai.transforms import RandCropByPosNegLabeld

    keys = ["image", "label", "click_map"]
    cropper = WithInteractionSliced(RandCropByPosNegLabeld(keys, "label", (-1, -1, 1), num_samples=3), keys)
    crops = cropper(mapped)
    assert len(crops) == 3 and "click_slice" not in crops[0]
    torch.testing.assert_close(torch.as_tensor(crops[0]["click_map"]), torch.as_tensor(marks[None, ..., 6:7]))

    none = InteractionMapd()(InteractionPromptsd(LABELS)(dict(interaction_volume)))
    assert none["click_slice"] == -1 and none["click_map"].sum() == 0 and none["click_class"] == 0


def test_the_log_keeps_each_segments_latest_prompts_until_a_label_takes_them():
    log = InteractionLog(max_volumes=2)
    log.record("a", {"label": "white matter", "foreground": [[1, 2, 3]], "device": "cpu"})
    log.record("a", {"label": "white matter", "foreground": [[1, 2, 3], [4, 5, 6]]})  # Slicer resends all points
    log.record("a", {"label": None, "roi": [1, 2, 3, 4, 5, 6]})
    log.record("a", {"label": "grey matter"})  # no prompts: nothing to keep
    assert log.take("a") == [
        {"label": "white matter", "foreground": [[1, 2, 3], [4, 5, 6]]},
        {"label": None, "roi": [1, 2, 3, 4, 5, 6]},
    ]
    assert log.take("a") == []
    for image_id in "bcd":
        log.record(image_id, {"foreground": [[1, 1, 1]]})
    assert log.take("b") == [] and log.take("d")  # the oldest volume made room


def test_the_log_survives_a_restart_in_its_folder_and_stays_there(tmp_path):
    store = tmp_path / "interactions"
    log = InteractionLog(str(store), max_volumes=2)
    log.record("../../escape", {"label": "white matter", "foreground": [[1, 2, 3]]})
    log.record("b", {"label": None, "roi": [1, 2, 3, 4, 5, 6]})
    assert len(list(store.iterdir())) == 2 and not (tmp_path / "escape").exists()
    (store / "junk.json").write_text("{not json")  # reported and left alone

    restarted = InteractionLog(str(store), max_volumes=2)
    assert restarted.take("../../escape") == [{"label": "white matter", "foreground": [[1, 2, 3]]}]
    assert len(list(store.iterdir())) == 2  # b's file and the junk
    restarted.record("c", {"foreground": [[1, 1, 1]]})
    restarted.record("d", {"foreground": [[2, 2, 2]]})  # the oldest volume, b, made room, on disk too
    again = InteractionLog(str(store), max_volumes=2)
    assert again.take("b") == [] and again.take("c") and again.take("d") == [{"label": None, "foreground": [[2, 2, 2]]}]
    assert [p.name for p in store.iterdir()] == ["junk.json"]


def test_a_partly_annotated_label_does_not_teach_its_missing_classes_as_background():
    """An annotator drew only grey matter (class 2): white matter (1) under that label's background is unknown.
    The marked background (``prepare_prompted_batch`` through ``mark_unannotated``) costs the same whether the
    network says background or white matter there, and the loss is the marginal one: -log(p_bg + p_wm)."""
    from monai.losses import DiceCELoss

    from lib.networks.sam_segmenter import marginalise_unannotated, mark_unannotated

    label = torch.zeros(2, 1, 8, 8, dtype=torch.int64)
    label[:, 0, :, :3] = 2
    annotated = torch.tensor([[True, False, True], [True, True, True]])
    marked = mark_unannotated(label, annotated)
    assert (marked[0, 0, :, 3:] == -2).all() and (marked[0, 0, :, :3] == 2).all() and torch.equal(marked[1], label[1])
    batch = prepare_prompted_batch({"image": torch.zeros(2, 1, 8, 8), "label": label, "annotated": annotated}, "cpu")
    torch.testing.assert_close(batch[1], marked)

    loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.1, lambda_dice=0.9)
    says = {}
    for name, where in (("background", 0), ("white matter", 1)):
        logits = torch.full((2, 3, 8, 8), -5.0)
        logits[:, 2, :, :3] = 5.0
        logits[:, where, :, 3:] = 5.0
        says[name] = logits
    unmarked = {name: float(loss(logits[:1], label[:1])) for name, logits in says.items()}
    marginal = {name: float(loss(*marginalise_unannotated(logits[:1], marked[:1]))) for name, logits in says.items()}
    assert unmarked["white matter"] > unmarked["background"] + 0.5
    assert abs(marginal["white matter"] - marginal["background"]) < 1e-4

    logits = torch.randn(1, 3, 8, 8)
    merged, target = marginalise_unannotated(logits, marked[:1])
    p, q = torch.softmax(logits, 1), torch.softmax(merged, 1)
    torch.testing.assert_close(q[:, 0, :, 3:], p[:, 0, :, 3:] + p[:, 1, :, 3:])
    assert (q[:, 1, :, 3:] == 0).all() and torch.equal(q[..., :3], p[..., :3]) and (target >= 0).all()
