"""The scan inference as a user runs it: `python -m monai.bundle run --config_file configs/inference.json` on a folder
holding a DICOM series, a NIfTI volume and bad inputs; every bad input is reported by name, nothing half-written."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from scripts.networks.checkpoint import TrainingRecord
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.read import CheckScand, LoadScand, ScanError, scan_datalist

SPACING = 4.0  # coarse pixels keep the run short


def _copy_slices(source, target, every=1, count=None):
    target.mkdir(parents=True)
    files = sorted(source.iterdir())[::every][:count]
    for path in files:
        shutil.copy(path, target / path.name)
    return sorted(target.iterdir())


@pytest.fixture(scope="module")
def scans(lidc_root, tmp_path_factory):
    """A folder as a user might have it: two good scans and six bad inputs."""
    folder = tmp_path_factory.mktemp("scans")
    shutil.copytree(lidc_root / "LIDC-IDRI-0003", folder / "LIDC-IDRI-0003")  # patient folder: DICOM + XML below
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(lidc_root / "LIDC-IDRI-0001" / "ct"))[::2])
    sitk.WriteImage(image, str(folder / "chest.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((64, 64), -1000, np.int16), np.eye(4)), folder / "flat.nii.gz")
    nan = np.full((32, 32, 8), -1000.0, np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), folder / "nan.nii.gz")
    whole = (folder / "chest.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 3])
    for path in _copy_slices(lidc_root / "LIDC-IDRI-0001" / "ct", folder / "mr", count=4):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    _copy_slices(lidc_root / "LIDC-IDRI-0001" / "ct", folder / "gap", count=12)
    sitk_order = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "gap"))
    (folder / "gap" / sitk_order[6].split("/")[-1]).unlink()
    _copy_slices(lidc_root / "LIDC-IDRI-0001" / "ct", folder / "two" / "a", count=3)
    for path in sorted((lidc_root / "LIDC-IDRI-0003").rglob("*.dcm"))[:3]:
        shutil.copy(path, folder / "two" / "a" / f"other-{path.name}")
    return folder


BAD = {
    "flat": "expected a 3-D CT volume",
    "nan": "NaN or infinite",
    "truncated": "could not be read",
    "mr": "modality MR, not CT",
    "gap": "uneven slice spacing",
    "two": "holds 2 DICOM series",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_refused_naming_the_file(scans, name):
    path = next(p for p in scans.iterdir() if p.name.split(".")[0] == name)
    with pytest.raises(ScanError, match=BAD[name]) as error:
        CheckScand("image")(LoadScand("image")({"image": str(path)}))
    assert path.name in str(error.value)


def test_compressed_dicom_reads_as_the_uncompressed_series(lidc_root, tmp_path):
    """A series in a compressed transfer syntax (RLE lossless, written by pydicom) reads to the same HU volume."""
    from pydicom.uid import RLELossless

    plain = _copy_slices(lidc_root / "LIDC-IDRI-0001" / "ct", tmp_path / "plain", count=6)
    for path in _copy_slices(lidc_root / "LIDC-IDRI-0001" / "ct", tmp_path / "rle", count=6):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(next((tmp_path / "rle").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    assert len(plain) == 6
    read = [LoadScand("image")({"image": str(tmp_path / name)})["image"] for name in ("plain", "rle")]
    assert read[0].shape == (1, 512, 512, 6)
    np.testing.assert_array_equal(read[0].numpy(), read[1].numpy())
    np.testing.assert_allclose(read[0].affine, read[1].affine)


def test_oblique_grid_is_refused(tmp_path):
    """A grid 30 degrees off the patient axes is refused; 10 degrees is processed on its own grid."""
    volume = np.random.default_rng(0).integers(-1000, 400, (32, 32, 8)).astype(np.int16)
    for degrees, refused in ((30.0, True), (10.0, False)):
        angle = np.radians(degrees)
        affine = np.eye(4)
        affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        path = tmp_path / f"oblique{int(degrees)}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), path)
        data = LoadScand("image")({"image": str(path)})
        if refused:
            with pytest.raises(ScanError, match=r"oblique, 30\.0 degrees from the patient axes"):
                CheckScand("image")(data)
        else:
            checked = CheckScand("image")(data)["image"]
            np.testing.assert_allclose(checked.affine, affine, atol=1e-6)  # its own grid: neither snapped nor resampled
            np.testing.assert_array_equal(np.asarray(checked[0]), volume)


def test_datalist_sources(scans, tmp_path):
    names = [item["name"] for item in scan_datalist(scans)]
    # in a folder run the MR series is left out (a patient's chest X-rays are not a failure); given alone, it is refused
    assert names == ["LIDC-IDRI-0003", "chest", "flat", "gap", "nan", "truncated", "two"]
    assert scan_datalist(scans / "chest.nii.gz") == [
        {"image": str(scans / "chest.nii.gz"), "source": str(scans / "chest.nii.gz"), "name": "chest"}
    ]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"scans": [str(scans / "chest.nii.gz"), {"image": str(scans / "LIDC-IDRI-0003")}]}))
    assert [i["name"] for i in scan_datalist(listed)] == ["chest", "LIDC-IDRI-0003"]
    listed.write_text("{not json")
    with pytest.raises(ScanError, match="list.json: malformed JSON"):
        scan_datalist(listed)
    with pytest.raises(ScanError, match="no such scan"):
        scan_datalist(tmp_path / "missing")


def test_cli_on_a_folder_of_scans(bundle_root, scans, tmp_path):
    model = GAPClassifier(width=0.0625, head_channels=64)
    record = TrainingRecord(model, [{"image": "", "spacing_mm": [SPACING, SPACING]}], 96, (-1000, 400), bundle_root)
    torch.save({"model": model.state_dict(), "config": record.state_dict()}, tmp_path / "model.pt")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle_root / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle_root),
        "--ckpt_path",
        str(tmp_path / "model.pt"),
        "--input",
        str(scans),
        "--output_dir",
        str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode != 0, "a run with failed scans must end with an error"
    assert "5 of 7 scan(s) failed" in log, log[-4000:]
    assert "NvImgCodec" not in log, "a notice about a GPU codec the run does not use"
    failing = {name: reason for name, reason in BAD.items() if name != "mr"}
    for name, reason in failing.items():
        assert f"{name}: FAILED:" in log and reason in log, name
        assert not (out / name).exists(), f"{name}: a failed scan left outputs"
    assert f"{scans / 'mr'}: no CT series below it (modality MR): left out" in log and not (out / "mr").exists()
    for name, grid in (("LIDC-IDRI-0003", None), ("chest", scans / "chest.nii.gz")):
        result = json.loads((out / name / f"{name}_nodules.json").read_text())
        assert result["scan"] == name and result["mode"] == "fine" and len(result["slices"]) > 50
        mask = sitk.ReadImage(str(out / name / f"{name}_mask.nii.gz"))
        reference = sitk.ReadImage(str(grid)) if grid else None
        if reference is not None:
            assert mask.GetSize() == reference.GetSize()
            np.testing.assert_allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(mask.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
            np.testing.assert_allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert (out / "LIDC-IDRI-0003" / "LIDC-IDRI-0003_seg.dcm").is_file()
    assert not list(out.rglob(".tmp-*")), "temporary files left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(d["name"] for d in summary["done"]) == ["LIDC-IDRI-0003", "chest"]
    assert sorted(f["name"] for f in summary["failed"]) == sorted(failing)
    # the re-run skips the finished scans and meets the bad ones again
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert "5 of 5 scan(s) failed" in again.stdout + again.stderr
