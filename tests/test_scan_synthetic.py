"""Whole-scan inference on synthetic scans with known nodules: the nodule table against the truth, and the scans of
a folder shared over two processes."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from known_response import SpotNet
from monai.bundle import ConfigParser
from scripts.checkpoint import TrainingRecord
from scripts.crop import crop_window
from scripts.labels import consensus_mask
from scripts.lung_mask import segment_lungs
from scripts.networks import GAPClassifier
from scripts.synthetic import SyntheticSource

SIZE = 128


def _affine(spacing):
    """The NIfTI (RAS) affine of an array in the axial convention: rows to posterior, columns to the patient's
    left, slices upwards; an origin away from 0 so that a lost origin shows."""
    affine = np.zeros((4, 4))
    affine[1, 0], affine[0, 1], affine[2, 2] = -spacing[0], -spacing[1], spacing[2]
    affine[:, 3] = [120.0, 80.0, -210.0, 1.0]
    return affine


def write_case(case, path):
    nib.save(nib.Nifti1Image(case.hu.astype(np.int16), _affine(case.annotations.spacing)), path)


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory):
    source = SyntheticSource(2, seed=0, size=SIZE)
    case = source.load("SYN-0001")  # two nodules of 15 and 21 mm
    folder = tmp_path_factory.mktemp("synthetic")
    write_case(case, folder / "SYN-0001.nii.gz")
    truth = np.zeros(case.hu.shape, np.int32)
    for j, nodule in enumerate(case.annotations.nodules, start=1):
        truth[nodule.box()][consensus_mask(nodule)] = j
    return case, folder / "SYN-0001.nii.gz", truth


def test_nodule_table_matches_the_known_nodules(bundle_root, synthetic_case, tmp_path):
    case, path, truth = synthetic_case
    assert truth.max() == 2
    spacing = case.annotations.spacing
    corner = crop_window(segment_lungs(np.clip(case.hu, -1000, 400), spacing), SIZE)
    centres = [np.argwhere(truth == j).mean(axis=0) for j in (1, 2)]
    network = SpotNet([(c[0] - corner[0], c[1] - corner[1]) for c in centres], SIZE, sigma_px=2.0)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    settings = {"gap_levels": 1, "width": 1.0, "in_channels": 1, "head_channels": 1024, "batch_norm": False}
    settings.update(image_size=SIZE, pixel_spacing_mm=None, hu_window=[-1000.0, 400.0])
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "model_settings": settings,
            "network": network,
            "input": str(path),
            "output_dir": str(tmp_path),
            "mode": "two_nodule",
            "rnam_crop": False,
            "overview": False,
        }
    )
    parser.get_parsed_content("evaluator").run()
    result = json.loads((tmp_path / "SYN-0001" / "SYN-0001_nodules.json").read_text())
    nodules = sorted(result["nodules"], key=lambda n: n["centroid_voxel"][0])
    assert len(nodules) == 2, [n["centroid_voxel"] for n in result["nodules"]]
    voxel_mm3 = float(np.prod(spacing))
    for found, j in zip(nodules, sorted((1, 2), key=lambda j: centres[j - 1][0])):
        np.testing.assert_allclose(found["centroid_voxel"], centres[j - 1], atol=1.0)
        volume = (truth == j).sum() * voxel_mm3
        assert abs(found["volume_mm3"] - volume) <= 0.15 * volume, (found["volume_mm3"], volume)
        world = _affine(spacing) @ np.array([*centres[j - 1], 1.0])
        np.testing.assert_allclose(found["centroid_ras_mm"], world[:3], atol=max(spacing))
        np.testing.assert_allclose(found["centroid_lps_mm"], world[:3] * [-1, -1, 1], atol=max(spacing))


def test_two_processes_share_the_scans(bundle_root, tmp_path):
    """torchrun with two gloo processes: every scan done exactly once, outputs identical to one process."""
    source = SyntheticSource(3, seed=2, size=64, n_slices=16)
    scans = tmp_path / "scans"
    scans.mkdir()
    for subject in source.subjects():
        write_case(source.load(subject), scans / f"{subject}.nii.gz")
    model = GAPClassifier(width=0.0625, head_channels=64)
    record = TrainingRecord(model, [{"image": "", "spacing_mm": [4.5, 4.5]}], 64, (-1000, 400), bundle_root)
    torch.save({"model": model.state_dict(), "config": record.state_dict()}, tmp_path / "model.pt")

    def run(out, launcher, configs):
        command = [sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", configs]
        command += ["--ckpt_path", str(tmp_path / "model.pt"), "--input", str(scans), "--output_dir", str(out)]
        command += ["--threshold", "0.0", "--mode", "coarse", "--overview", "False"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "one", [], "configs/inference.json")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(tmp_path / "two", launcher, "['configs/inference.json','configs/multi_gpu_inference.json']")
    shares = [json.loads((tmp_path / "two" / f"summary.rank{r}.json").read_text())["done"] for r in (0, 1)]
    names = sorted(d["name"] for share in shares for d in share)
    assert names == source.subjects() and all(shares), "each scan exactly once, both processes working"
    for name in source.subjects():
        one = nib.load(tmp_path / "one" / name / f"{name}_mask.nii.gz")
        two = nib.load(tmp_path / "two" / name / f"{name}_mask.nii.gz")
        np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))
        np.testing.assert_array_equal(one.affine, two.affine)
        tables = [json.loads((tmp_path / d / name / f"{name}_nodules.json").read_text()) for d in ("one", "two")]
        assert tables[0]["nodules"] == tables[1]["nodules"] and tables[0]["slices"] == tables[1]["slices"]
    assert sum(json.loads((tmp_path / "one" / "summary.json").read_text())["done"][i]["nodules"] for i in range(3)) > 0
