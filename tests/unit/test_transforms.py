"""Transforms: intensity by modality, label remapping by name, invertible inference chain, training slices."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd

from lib.transforms import (
    NormalizeIntensityByModalityd,
    RemapLabelsByNamed,
    argmax_labels,
    client_to_model_ids,
    image_modality,
    inference_transforms,
    training_slice_transforms,
    volume_transforms,
)

LABELS = {"white matter": 1, "grey matter": 2}
S = 64  # model input size for the chains; any size works, a small one keeps the tests fast


# ------------------------------------------------------------------------------------------------- intensity


def test_ct_hu_window():
    hu = torch.tensor([[-1000.0, -125.0, 75.0, 275.0, 2000.0, -25.0]])
    assert image_modality(hu) == "CT"
    out = NormalizeIntensityByModalityd(keys="image")({"image": hu})["image"]
    assert torch.allclose(torch.as_tensor(out), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0, 0.25]]), atol=1e-6)


def test_mr_percentiles_with_clipping():
    g = np.random.default_rng(0)
    values = np.concatenate([g.uniform(100, 900, 995), [5000.0, 7000.0, -50.0, 0.0, 20000.0]]).astype(np.float32)
    mr = torch.from_numpy(values).reshape(1, 10, 10, 10)
    assert image_modality(mr) == "MR"
    out = torch.as_tensor(NormalizeIntensityByModalityd(keys="image")({"image": mr})["image"])
    lo, hi = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values - lo) / (hi - lo), 0.0, 1.0).reshape(1, 10, 10, 10)
    assert out.shape == mr.shape
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert np.allclose(out.numpy(), expected, atol=1e-5)
    # the outliers are clipped, not stretching the range
    assert float(out.flatten()[-1]) == 1.0 and float(out.flatten()[-3]) == 0.0
    assert 0.2 < float(out.median()) < 0.8


def test_litemedsam_normalisation_w400_l40_and_percentiles_of_the_nonzero_voxels():
    options = {"ct_window": (-160.0, 240.0), "nonzero_percentiles": True}  # ServedModel.intensity of litemedsam
    hu = torch.tensor([[-1000.0, -160.0, 40.0, 240.0]])
    out = NormalizeIntensityByModalityd(keys="image", **options)({"image": hu})["image"]
    assert torch.allclose(torch.as_tensor(out), torch.tensor([[0.0, 0.0, 0.5, 1.0]]), atol=1e-6)

    g = np.random.default_rng(0)
    values = np.concatenate([np.zeros(600), g.uniform(100, 900, 395), [5000.0, 7000.0, 20000.0, 30.0, 40.0]]).astype(np.float32)
    mr = torch.from_numpy(values).reshape(1, 10, 10, 10)
    out = torch.as_tensor(NormalizeIntensityByModalityd(keys="image", modality="MR", **options)({"image": mr})["image"]).flatten()
    lo, hi = np.percentile(values[values > 0], [0.5, 99.5])  # pre_CT_MR.py: the non-zero voxels only
    assert lo > 0 and np.allclose(out.numpy(), np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert not out[:600].any()  # the zero voxels stay 0


def test_explicit_modality_override():
    positive = torch.tensor([[0.0, 75.0, 275.0, 500.0]])  # no air: 'auto' would call it MR
    assert image_modality(positive) == "MR"
    ct = torch.as_tensor(NormalizeIntensityByModalityd(keys="image", modality="CT")({"image": positive})["image"])
    assert torch.allclose(ct, torch.tensor([[0.3125, 0.5, 1.0, 1.0]]), atol=1e-6)
    # a per-request 'modality' entry wins over the transform's setting
    hu = torch.linspace(-1000, 1000, 201)[None]
    per_request = NormalizeIntensityByModalityd(keys="image", modality="CT")({"image": hu, "modality": "MR"})["image"]
    per_request = torch.as_tensor(per_request)
    lo, hi = np.percentile(hu.numpy(), [0.5, 99.5])
    assert np.allclose(per_request.numpy(), np.clip((hu.numpy() - lo) / (hi - lo), 0, 1), atol=1e-5)
    # lower-case names are accepted
    assert image_modality(hu, "mr") == "MR" and image_modality(positive, "ct") == "CT"


def test_dicom_modality_tag_is_used():
    values = torch.tensor([[[0.0, 75.0], [275.0, 400.0]]])  # no air
    ct = MetaTensor(values.clone(), meta={"0008|0060": "CT"})
    assert image_modality(ct) == "CT"
    out = torch.as_tensor(NormalizeIntensityByModalityd(keys="image")({"image": ct})["image"])
    assert torch.allclose(out, torch.tensor([[[0.3125, 0.5], [1.0, 1.0]]]), atol=1e-6)
    # the recorded modality also beats the air heuristic the other way round
    mr = MetaTensor(torch.tensor([[-1000.0, 0.0, 500.0, 1000.0]]), meta={"0008|0060": "MR "})
    assert image_modality(mr) == "MR"


# ---------------------------------------------------------------------------------------------------- labels


SLICER_SWAPPED = [{"name": "grey matter", "idx": 1}, {"name": "white matter", "idx": 2}]


def test_client_to_model_ids():
    assert client_to_model_ids(SLICER_SWAPPED, LABELS) == {1: 2, 2: 1}
    assert client_to_model_ids([{"name": "White_Matter", "idx": 7}, {"name": "GREY-matter", "idx": 3}], LABELS) == {7: 1, 3: 2}
    assert client_to_model_ids([{"name": "tumour", "idx": 4}], LABELS) == {4: 0}
    assert client_to_model_ids(None, LABELS) == {1: 1, 2: 2}
    assert client_to_model_ids([], LABELS) == {1: 1, 2: 2}
    with pytest.raises(ValueError, match="name"):
        client_to_model_ids([{"label": "grey matter", "idx": 1}], LABELS)


def _label_volume() -> torch.Tensor:
    label = torch.zeros(1, 4, 4, 2, dtype=torch.int64)
    label[0, :2, :, 0] = 1
    label[0, 2:, :, 1] = 2
    return label


def test_remap_swapped_slicer_ids():
    label = _label_volume()
    out = RemapLabelsByNamed(keys="label", model_labels=LABELS)({"label": label, "label_info": SLICER_SWAPPED})["label"]
    assert torch.equal(out == 2, label == 1)
    assert torch.equal(out == 1, label == 2)
    assert torch.equal(out == 0, label == 0)


def test_remap_loose_names_and_unknown_name_to_background():
    label = _label_volume()
    label[0, 0, 0, 1] = 5
    info = [{"name": "White_Matter", "idx": 2}, {"name": "Grey Matter", "idx": 1}, {"name": "tumour", "idx": 5}]
    out = RemapLabelsByNamed(keys="label", model_labels=LABELS)({"label": label, "label_info": info})["label"]
    assert torch.equal(out == 1, label == 2)
    assert torch.equal(out == 2, label == 1)
    assert int(out[0, 0, 0, 1]) == 0  # the unknown segment became background
    assert torch.equal(out == 0, (label == 0) | (label == 5))


def test_remap_id_missing_from_label_info_is_an_error():
    label = _label_volume()
    label[0, 3, 3, 0] = 3
    remap = RemapLabelsByNamed(keys="label", model_labels=LABELS)
    with pytest.raises(ValueError, match=r"\[3\]") as err:
        remap({"label": label, "label_info": SLICER_SWAPPED})
    assert "label_info" in str(err.value)
    with pytest.raises(ValueError, match=r"\[3\]"):
        remap({"label": label})  # without label_info only the model's own ids are allowed


def test_remap_records_the_classes_a_label_annotates():
    remap = RemapLabelsByNamed(keys="label", model_labels=LABELS, annotated_key="annotated")
    label = _label_volume()
    assert remap({"label": label})["annotated"].tolist() == [True, True, True]  # no names: every class
    only_grey = remap({"label": label * (label == 1), "label_info": [{"name": "Grey Matter", "idx": 1}]})
    assert only_grey["annotated"].tolist() == [True, False, True] and int(only_grey["label"].max()) == 2
    new_structure = remap({"label": label * (label == 1), "label_info": [{"name": "lesion", "idx": 1}]})
    assert new_structure["annotated"].tolist() == [True, False, False]


def test_remap_without_label_info_is_identity():
    label = _label_volume()
    out = RemapLabelsByNamed(keys="label", model_labels=LABELS)({"label": label})["label"]
    assert torch.equal(torch.as_tensor(out), label)


# ---------------------------------------------------------------------------------------- inference chain

# voxel axes (i, j, k) -> world: i runs posterior, j runs left, k runs inferior ("PLI"), anisotropic spacing
SHAPE = (24, 20, 7)
AFFINE = np.array(
    [
        [0.0, -1.2, 0.0, 30.0],
        [-0.8, 0.0, 0.0, 12.0],
        [0.0, 0.0, -2.5, 40.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _ramp() -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    return 100.0 + 10.0 * i + 4.0 * j + 30.0 * k  # MR-like, positive, different slope per axis


@pytest.fixture
def nifti(tmp_path):
    assert nib.aff2axcodes(AFFINE) == ("P", "L", "I")
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(_ramp(), AFFINE), path)
    return path


def test_inference_transforms_and_invert(nifti):
    pre = inference_transforms(S, "auto")
    data = Compose(pre)({"image": str(nifti)})
    image = data["image"]
    assert image.shape == (1, S, S, SHAPE[2])  # the k axis is the axial one
    assert image.dtype == torch.float32
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0

    # a (K, S, S, D) prediction made as slice_segmentation makes it (SliceInferer over the batched image, batch
    # dimension dropped) goes back through Invertd with the same transform instances
    def network(x):  # (B, 1, S, S) -> (B, 3, S, S)
        return torch.cat([x, 1.0 - x, 0.5 * x], dim=1)

    pred = SliceInferer(roi_size=(S, S), sw_batch_size=4, spatial_dim=2, progress=False)(image[None], network)[0]
    assert pred.shape == (3, S, S, SHAPE[2])
    assert isinstance(pred, MetaTensor)  # Invertd reads the geometry from the image's record of operations
    invert = Invertd(keys="pred", transform=Compose(pre), orig_keys="image", nearest_interp=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="transform info")  # Invertd skips silently otherwise
        out = invert({"image": image, "pred": pred})["pred"]
    assert out.shape == (3, *SHAPE)
    assert np.allclose(out.affine.numpy(), AFFINE, atol=1e-5)

    # and lands on the right voxels: compare with the normalised input in its own voxel order
    ramp = _ramp()
    lo, hi = np.percentile(ramp, [0.5, 99.5])
    expected = np.clip((ramp - lo) / (hi - lo), 0, 1)
    back = out[0].numpy()
    assert np.abs(back - expected).mean() < 0.02
    assert np.abs(back - expected).max() < 0.1
    assert np.abs(back - expected[::-1, ::-1, :]).mean() > 0.1  # a missed flip would not pass
    assert np.allclose(out[1].numpy(), 1.0 - back, atol=1e-5)


# ----------------------------------------------------------------------------------------- training slices


@pytest.fixture
def labelled(tmp_path):
    """10 axial slices (RAS on disk), labels only in slices 3 and 4: a random slice is mostly background."""
    shape = (40, 36, 10)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    g = np.random.default_rng(0)
    image = g.normal(300.0, 20.0, shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[12:28, 10:26, 3:5] = 1
    label[16:24, 14:22, 3:5] = 2
    image[label == 1] += 200.0
    image[label == 2] += 400.0
    paths = {}
    for key, array in (("image", image), ("label", label)):
        paths[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), paths[key])
    return paths


@pytest.mark.parametrize("seed", [0, 1])
def test_training_slices_all_foreground(labelled, seed):
    chain = Compose(training_slice_transforms(S, "auto", LABELS, slices_per_volume=8, foreground_ratio=1.0))
    chain.set_random_state(seed=seed)
    samples = chain(dict(labelled))
    assert isinstance(samples, list) and len(samples) == 8
    for sample in samples:
        assert sample["image"].shape == (1, S, S)
        assert sample["label"].shape == (1, S, S)
        assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.int64
        assert set(torch.unique(sample["label"]).tolist()) <= {0, 1, 2}
        assert int((sample["label"] > 0).sum()) > 0
        assert sample["annotated"].tolist() == [True, True, True]


def test_training_slices_with_background_share(labelled):
    chain = Compose(training_slice_transforms(S, "auto", LABELS, slices_per_volume=12, foreground_ratio=0.0))
    chain.set_random_state(seed=0)
    samples = chain(dict(labelled))
    assert len(samples) == 12
    for sample in samples:
        assert sample["image"].shape == (1, S, S)
        assert set(torch.unique(sample["label"]).tolist()) <= {0, 1, 2}
    # only 2 of 10 slices hold labels: centred on background voxels, most samples show none
    assert sum(int((s["label"] > 0).sum()) == 0 for s in samples) >= 6


def test_volume_transforms_remap_slicer_ids(labelled):
    """Saved labels come with Slicer's label_info; training sees the model's ids."""
    chain = Compose(volume_transforms(S, "auto", LABELS))
    plain = chain(dict(labelled))
    swapped = chain(dict(labelled, label_info=[{"name": "Grey_Matter", "idx": 1}, {"name": "white matter", "idx": 2}]))
    assert plain["label"].shape == (1, S, S, 10)
    assert set(torch.unique(plain["label"]).tolist()) == {0, 1, 2}
    assert torch.equal(swapped["label"] == 2, plain["label"] == 1)
    assert torch.equal(swapped["label"] == 1, plain["label"] == 2)


@pytest.mark.parametrize("dim", [0, 1])
def test_argmax_labels_is_torch_argmax_with_the_dimension_kept(dim):
    scores = torch.randint(0, 3, (3, 4, 5, 6)).float()  # many ties: the first highest index wins, as in argmax
    expected = torch.argmax(scores, dim=dim, keepdim=True)
    assert torch.equal(argmax_labels(scores, dim), expected)
    image = MetaTensor(scores, affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    labels = argmax_labels(image)
    assert isinstance(labels, MetaTensor) and torch.equal(labels.affine, image.affine)  # the geometry travels on
