"""The hospital path end to end: a real Orthanc with sample volumes as DICOM series (fixture `dicomweb_studies`),
the app served on its DICOMweb root, driven by MONAILabelClient."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicomweb_client.api import DICOMwebClient
from test_client_loop import SLICER_LABEL_INFO, client_for, swapped_ground_truth, wait_for_training

from lib.configs import MODEL_CONFIGS
from lib.dicom_seg import write_dicom_seg

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from upload_dicom import volume_to_series  # noqa: E402

MODEL_LABELS = {"white matter": 1, "grey matter": 2}


@pytest.fixture
def studies(dicomweb_studies) -> str:
    """The servers of this module serve Orthanc's DICOMweb root."""
    return dicomweb_studies


def series_by_sample(dicomweb: str) -> dict[str, str]:
    """{sample name: SeriesInstanceUID} of the MR series in the PACS (PatientID carries the sample name)."""
    found = DICOMwebClient(dicomweb).search_for_series(search_filters={"Modality": "MR"}, fields=["PatientID"])
    return {s["00100020"]["Value"][0]: s["0020000E"]["Value"][0] for s in found}


def assert_on_grid_of(label_path: Path, sample: Path) -> None:
    label, image = sitk.ReadImage(str(label_path)), sitk.ReadImage(str(sample))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)


def test_series_infer_and_dicom_seg(start_server, studies, dicomweb_samples, sample_data, tmp_path):
    server = start_server(("models", "all"))
    client = client_for(server, tmp_path)
    series = series_by_sample(studies)
    assert sorted(series) == sorted(dicomweb_samples), series
    assert server.get("/datastore/?output=stats").json()["total"] == len(dicomweb_samples)
    sample = "brain_003"
    sample_path = sample_data / "brain-mri" / f"{sample}.nii.gz"

    # every model infers on a series fetched from Orthanc; the label lies on the series' grid
    labels = {}
    for model in MODEL_CONFIGS:  # the server serves "all"
        result_file, result = client.infer(model, series[sample], {"result_extension": ".nii.gz"})
        labels[model] = tmp_path / f"{model}.nii.gz"
        shutil.copyfile(result_file, labels[model])
        assert_on_grid_of(labels[model], sample_path)
    assert result["instances"] >= 1

    # output=dicom_seg: a SEG referencing the series, segments named after the model's labels
    response = server.post(f"/infer/hf_sam?image={series[sample]}&output=dicom_seg", data={"params": json.dumps({"label_info": []})})
    assert response.status_code == 200, response.text[:500]
    seg_path = tmp_path / "prediction.dcm"
    seg_path.write_bytes(response.content)
    seg = hd.seg.segread(str(seg_path))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[sample]
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert set(names.values()) <= set(MODEL_LABELS) and names, names
    # the SEG carries the same voxels as the label the same model returned
    prediction = np.asarray(nib.load(str(labels["hf_sam"])).dataobj)
    sources = [s.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    pixels = seg.get_pixels_by_source_instance(sources, combine_segments=True)
    for number, name in names.items():
        assert (pixels == number).sum() == (prediction == MODEL_LABELS[name]).sum(), name


def test_saved_correction_is_a_seg_in_orthanc_and_trains(start_server, studies, dicomweb_samples, sample_data, tmp_path):
    server = start_server(("models", "hf_sam"))
    client = client_for(server, tmp_path)
    series = series_by_sample(studies)
    image_id = series["brain_002"]

    corrected = swapped_ground_truth(sample_data, "brain_002", tmp_path / "corrected.nii.gz")
    client.save_label(image_id, str(corrected), tag="final", params={"label_info": SLICER_LABEL_INFO})

    # Orthanc holds a SEG that references the series, with the segments the annotator named
    pacs = DICOMwebClient(studies)
    segs = pacs.search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 1, segs
    study_uid, seg_uid = segs[0]["0020000D"]["Value"][0], segs[0]["0020000E"]["Value"][0]
    meta = pydicom.Dataset.from_json(pacs.retrieve_series_metadata(study_uid, seg_uid)[0])
    assert meta.ReferencedSeriesSequence[0].SeriesInstanceUID == image_id
    assert sorted(s.SegmentLabel for s in meta.SegmentSequence) == ["grey matter", "white matter"]

    # at once a labelled volume: next_sample hands out only the other two (each once), and training uses it
    handed_out = [client.next_sample("random", {}).get("id") for _ in range(len(dicomweb_samples))]
    assert sorted(handed_out[:2]) == sorted(set(series.values()) - {image_id}) and handed_out[2] is None, handed_out
    # a SEG that reached the PACS another way (another viewer, another server) is read back as a label too
    other = series["brain_003"]
    sources = tmp_path / "brain_003-series"
    sources.mkdir()
    for i, ds in enumerate(volume_to_series(sample_data / "brain-mri" / "brain_003.nii.gz")):
        ds.save_as(str(sources / f"{i}.dcm"))
    assert str(ds.SeriesInstanceUID) == other
    truth = sample_data / "brain-mri-groundtruth" / "brain_003.nii.gz"
    pacs.store_instances([pydicom.dcmread(write_dicom_seg(str(sources), str(truth), [], MODEL_LABELS))])

    task = client.train_start("hf_sam", {"max_epochs": 1})
    wait_for_training(client, server, task["id"])
    split = json.loads((server.app_dir / "model" / "hf_sam_split.json").read_text())
    assert sorted(split["train"]) == sorted([image_id, other]), split
    assert server.info()["models"]["hf_sam"]["adapter_version"] == 1


def test_upload_script_sends_a_dicom_folder_as_it_is(orthanc, sample_data, tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    for i, ds in enumerate(volume_to_series(sample_data / "brain-mri" / "brain_005.nii.gz")):
        ds.save_as(str(folder / f"IM{i:04d}"))  # no extension, as many PACS exports name them
    sent = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "upload_dicom.py"), "--url", orthanc, str(folder)], capture_output=True, text=True
    )
    assert sent.returncode == 0, sent.stderr
    assert series_by_sample(orthanc) == {"brain_005": sent.stdout.split()[0]}
    missing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "upload_dicom.py"), "--url", orthanc, str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr
