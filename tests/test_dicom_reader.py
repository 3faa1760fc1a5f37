"""The pydicom series reader (``DicomSeriesReader``) gives what MONAI's ITK reader gives: the same voxels in HU on the
same RAS grid, on series written here with a known geometry (oblique, flipped, anisotropic, not square, files in no
order, a rescale per slice), and ``LoadScand`` reads compressed series with ITK to the same volume; ``CheckScand``
refuses values that are not finite or not HU; damaged series are refused naming the problem; a collection's CT series
are found below its patients' folders; a DICOM SEG is written without notices about the source's data."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid
from scripts.pipeline.read import CheckScand, DicomSeriesReader, LoadScand, ScanError, scan_datalist
from scripts.pipeline.write import write_dicom_seg

ROWS, COLUMNS, SLICES = 20, 24, 5
PIXEL_SPACING = (0.6, 0.8)  # DICOM's order: between rows, between columns
STEP = 2.5


def _orientation(degrees: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions (LPS), turned ``degrees`` about the patient's z; ``flip`` mirrors the columns'."""
    angle = np.radians(degrees)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    column = np.array([-np.sin(angle), np.cos(angle), 0.0]) * (-1.0 if flip else 1.0)
    return row, column


def write_series(folder, stored, row, column, slopes, intercepts, origin=(-40.0, 25.0, -310.0), seed=0):
    """One CT series of ``stored`` (slices, rows, columns) int16 values, slice k at ``origin + k STEP normal``, written
    under file names and instance numbers in a shuffled order; returns the expected HU, (columns, rows, slices)."""
    folder.mkdir(parents=True)
    normal = np.cross(row, column)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(len(stored))
    for name, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{name:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "reader-test", int(name) + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *column)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * STEP * normal]
        ds.PixelSpacing = [str(v) for v in PIXEL_SPACING]
        ds.SliceThickness = str(STEP)
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = str(slopes[k]), str(intercepts[k])
        ds.PixelData = stored[k].astype("<i2").tobytes()
        ds.save_as(folder / f"{name:03d}.dcm", enforce_file_format=True)
    hu = stored * np.asarray(slopes, float)[:, None, None] + np.asarray(intercepts, float)[:, None, None]
    return hu.transpose(2, 1, 0).astype(np.float32)


def _stored(seed=0):
    return np.random.default_rng(seed).integers(0, 2000, (SLICES, ROWS, COLUMNS)).astype(np.int16)


def _read(folder, reader):
    return LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(str(folder))


@pytest.mark.parametrize("degrees, flip", [(0.0, False), (0.0, True), (10.0, False), (-15.0, True)])
def test_series_reader_gives_itks_voxels_and_grid(tmp_path, degrees, flip):
    row, column = _orientation(degrees, flip)
    slopes = [0.5, 1.0, 2.0, 1.0, 0.5]
    intercepts = [-1024.0, -1000.0, -1024.0, -990.0, -1024.0]
    expected = write_series(tmp_path / "ct", _stored(), row, column, slopes, intercepts)

    ours = _read(tmp_path / "ct", DicomSeriesReader())
    itk = _read(tmp_path / "ct", ITKReader(affine_lps_to_ras=True))

    assert ours.shape == itk.shape == (1, COLUMNS, ROWS, SLICES)
    np.testing.assert_array_equal(ours[0].numpy(), expected)  # each slice's own rescale, in the normal's order
    np.testing.assert_array_equal(ours.numpy(), itk.numpy())
    np.testing.assert_allclose(ours.affine, itk.affine, atol=1e-4)
    np.testing.assert_allclose(ours.meta["spacing"], itk.meta["spacing"], atol=1e-6)
    np.testing.assert_allclose(ours.meta["spacing"], [PIXEL_SPACING[1], PIXEL_SPACING[0], STEP], atol=1e-6)
    # voxel (0, 0, 0) is the first slice's ImagePositionPatient, in RAS
    lowest = min(
        (pydicom.dcmread(p) for p in (tmp_path / "ct").iterdir()),
        key=lambda ds: np.array(ds.ImagePositionPatient, float) @ np.cross(row, column),
    )
    np.testing.assert_allclose(
        np.asarray(ours.affine)[:3, 3], np.array(lowest.ImagePositionPatient, float) * [-1, -1, 1], atol=1e-4
    )
    assert ours.meta["space"] == itk.meta["space"] == "RAS"


def test_load_scand_reads_a_compressed_series_with_itk_to_the_same_volume(tmp_path, monkeypatch):
    row, column = _orientation(5.0, False)
    expected = write_series(tmp_path / "plain", _stored(1), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
    write_series(tmp_path / "rle", _stored(1), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
    for path in (tmp_path / "rle").iterdir():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)

    plain, rle = (LoadScand("image")({"image": str(tmp_path / name)})["image"] for name in ("plain", "rle"))

    np.testing.assert_array_equal(plain[0].numpy(), expected)
    np.testing.assert_array_equal(plain.numpy(), rle.numpy())
    np.testing.assert_allclose(plain.affine, rle.affine, atol=1e-4)

    def refuse(self, data, **kwargs):
        raise RuntimeError("the pydicom reader was asked")

    monkeypatch.setattr(DicomSeriesReader, "read", refuse)
    np.testing.assert_array_equal(LoadScand("image")({"image": str(tmp_path / "rle")})["image"].numpy(), rle.numpy())
    with pytest.raises(ScanError, match="the pydicom reader was asked"):
        LoadScand("image")({"image": str(tmp_path / "plain")})


def test_load_scand_is_built_without_the_gpu_codec_notice():
    # MONAI's fallback readers include its GPU DICOM codec's, which warns on every run where the codec is absent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoadScand("image")
    assert not [w for w in caught if "NvImgCodec" in str(w.message)]


def _edit(path, **tags):
    """Rewrite one DICOM file with ``tags`` set (None: the tag removed)."""
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def _damage(folder, problem):
    """Damage the series written in ``folder`` (files 000.dcm...; file k is not slice k: write_series shuffles)."""
    files = sorted(folder.iterdir())
    if problem == "empty":
        for path in files:
            path.unlink()
        (folder / "notes.txt").write_text("no images here")
    elif problem == "unreadable":
        files[1].write_bytes(b"not a DICOM file")
    elif problem == "two folders":
        (folder / "more").mkdir()
        files[0].rename(folder / "more" / files[0].name)
    elif problem == "one image":
        for path in files[1:]:
            path.unlink()
    elif problem == "no position":
        _edit(files[3], ImagePositionPatient=None)
    elif problem == "no orientation":
        for path in files:
            _edit(path, ImageOrientationPatient=None)
    elif problem == "orientation":
        _edit(files[2], ImageOrientationPatient=["0", "1", "0", "1", "0", "0"])
    elif problem == "same position":
        _edit(files[2], ImagePositionPatient=pydicom.dcmread(files[4]).ImagePositionPatient)
    elif problem == "sheared":  # each slice moved along the rows in proportion to its height: a gantry tilt
        for path in files:
            x, y, z = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
            _edit(path, ImagePositionPatient=[f"{v:.4f}" for v in (x + 0.5 * (z + 310.0), y, z)])


@pytest.mark.parametrize(
    "problem, message",
    [
        ("empty", r"ct: no DICOM files in this folder"),
        ("unreadable", r"001\.dcm: not a readable DICOM file"),
        ("two folders", r"ct: the series is spread over 2 folders"),
        ("one image", r"ct: a single DICOM image, not a scan"),
        ("no position", r"ct: 003\.dcm has no ImagePositionPatient"),
        ("no orientation", r"ct: 000\.dcm and 4 more have no ImageOrientationPatient"),
        ("orientation", r"ct: the slices differ in orientation"),
        ("same position", r"ct: two slices at the same position"),
        ("sheared", r"ct: the slices are sheared by 26\.6 degrees \(gantry tilt\)"),
    ],
)
def test_a_damaged_series_is_refused_naming_the_folder_and_the_problem(tmp_path, problem, message):
    row, column = _orientation(0.0, False)
    write_series(tmp_path / "ct", _stored(), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
    _damage(tmp_path / "ct", problem)
    with pytest.raises(ScanError, match=message):
        LoadScand("image")({"image": str(tmp_path / "ct")})


def test_a_patients_ct_series_is_found_below_its_folder(tmp_path, caplog):
    """A collection as TCIA's downloads hold it (patient / study / series): each patient's CT series is its scan,
    named after the patient, its chest X-rays left out; a patient with two CT series gets a scan for each; a folder
    with no CT series is left out with a warning (refused when given alone); a CT series spread over two folders, or
    beginning with another series' file, stays one scan whose reading says why."""
    row, column = _orientation(0.0, False)
    hu = {}

    def series(folder, seed, modality="CT"):
        hu[folder] = write_series(tmp_path / folder, _stored(seed), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
        if modality != "CT":
            for path in (tmp_path / folder).iterdir():
                _edit(path, Modality=modality)

    series("data/P1/1-ct-study/2-axial", 1)
    series("data/P1/3-xray-study/4-frontal", 2, "DX")
    series("data/P2/study/a", 3)
    series("data/P2/study/b", 4)
    series("data/P3/study/seg", 5, "SEG")
    series("data/P4/study/x", 6)
    for path in sorted((tmp_path / "data/P4/study/x").iterdir())[:2]:  # the same series in two folders
        (tmp_path / "data/P4/study/y").mkdir(exist_ok=True)
        path.rename(tmp_path / "data/P4/study/y" / path.name)
    series("data/P5/study/ct", 7)  # a CT series whose first file is a dose report of another series
    dose = tmp_path / "data/P5/study/ct/0-dose.dcm"
    shutil.copy(tmp_path / "data/P5/study/ct/000.dcm", dose)
    _edit(dose, Modality="SR", SeriesInstanceUID=generate_uid())

    with caplog.at_level(logging.WARNING, logger="scripts.pipeline.read"):
        items = scan_datalist(tmp_path / "data")
    assert [(i["name"], Path(i["image"]).relative_to(tmp_path / "data").as_posix()) for i in items] == [
        ("P1", "P1/1-ct-study/2-axial"),
        ("P2_study_a", "P2/study/a"),
        ("P2_study_b", "P2/study/b"),
        ("P4", "P4"),
        ("P5", "P5/study/ct"),
    ]
    assert f"{tmp_path / 'data/P3'}: no CT series below it (modality SEG): left out" in caplog.text
    assert all(i["source"] == i["image"] for i in items)
    read = {i["name"]: i for i in items}
    np.testing.assert_array_equal(LoadScand("image")(read["P1"])["image"][0].numpy(), hu["data/P1/1-ct-study/2-axial"])
    with pytest.raises(ScanError, match=r"P4: the series is spread over 2 folders"):
        LoadScand("image")(read["P4"])
    with pytest.raises(ScanError, match=r"ct: holds 2 DICOM series"):
        LoadScand("image")(read["P5"])
    listed = tmp_path / "list.json"  # a patient's folder listed is that patient's scan, even without a CT series
    listed.write_text(json.dumps([str(tmp_path / "data/P1"), str(tmp_path / "data/P3")]))
    series_folder = str(tmp_path / "data/P1/1-ct-study/2-axial")
    p3 = str(tmp_path / "data/P3")
    assert scan_datalist(listed) == [
        {"image": series_folder, "source": series_folder, "name": "P1"},
        {"image": p3, "source": p3, "name": "P3"},
    ]
    with pytest.raises(ScanError, match=r"P3: modality SEG, not CT"):
        LoadScand("image")({"image": p3})


# the patient's and study's attributes a SEG copies (type 2: present, may be empty), which write_series leaves out
STUDY_ATTRIBUTES = (
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def test_dicom_seg_of_a_one_part_patient_name_is_written_without_a_notice(tmp_path):
    # TCIA's series carry names such as "Lung_Dx-A0002", which pydicom doubts on every copy into the SEG
    row, column = _orientation(0.0, False)
    write_series(tmp_path / "ct", _stored(), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
    for path in (tmp_path / "ct").iterdir():
        _edit(path, PatientName="Lung_Dx-A0002", **dict.fromkeys(STUDY_ATTRIBUTES, ""))
    image = LoadScand("image")({"image": str(tmp_path / "ct")})["image"]
    mask = np.zeros(image.shape[1:], np.uint8)
    mask[5:9, 6:10, 2] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_seg(tmp_path / "seg.dcm", mask, np.asarray(image.affine), tmp_path / "ct", "test")
    assert not [w for w in caught if "person name" in str(w.message)]
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert str(seg.PatientName) == "Lung_Dx-A0002" and int(seg.NumberOfFrames) == 1


def test_undecodable_pixel_data_is_refused_naming_the_file(tmp_path):
    row, column = _orientation(0.0, False)
    write_series(tmp_path / "ct", _stored(), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
    damaged = sorted((tmp_path / "ct").iterdir())[2]
    ds = pydicom.dcmread(damaged)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(damaged)

    with pytest.raises(ScanError, match="pixel data") as error:
        LoadScand("image")({"image": str(tmp_path / "ct")})
    assert damaged.name in str(error.value)


def test_load_scand_gives_the_meta_dict_when_image_only_is_turned_off(tmp_path):
    """MONAI Label's bundle task sets ``image_only`` off on every ``LoadImaged`` and reads ``<key>_meta_dict``."""
    row, column = _orientation(0.0, False)
    write_series(tmp_path / "ct", _stored(), row, column, [1.0] * SLICES, [-1024.0] * SLICES)
    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(_stored().transpose(2, 1, 0), np.diag([0.8, 0.6, STEP, 1.0])), volume)
    load = LoadScand("image")
    load._loader.image_only = False
    for source in (tmp_path / "ct", volume):  # pydicom's path and ITK's
        data = load({"image": str(source)})
        assert data["image"].shape == (1, COLUMNS, ROWS, SLICES)
        np.testing.assert_allclose(data["image_meta_dict"]["affine"], data["image"].affine)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_scand_counts_values_that_are_not_finite(bad):
    """A volume handed over as a tensor (MONAI Label may) is checked too: one bad voxel is found and counted."""
    volume = MetaTensor(torch.full((1, 8, 8, 4), -1000.0), affine=torch.eye(4))
    CheckScand("image")({"image": volume})
    volume[0, 3, 3, 3] = bad
    with pytest.raises(ScanError, match="1 voxels are NaN or infinite"):
        CheckScand("image")({"image": volume})
    with pytest.raises(ScanError, match=r"values from 1000 to 1400 do not look like CT"):
        CheckScand("image")({"image": MetaTensor(torch.linspace(1000, 1400, 256).reshape(1, 8, 8, 4))})
