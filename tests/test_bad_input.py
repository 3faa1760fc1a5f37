"""Bad input through the bundle's commands: the error names the file and the problem."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.networks.gap_classifier import GAPClassifier


def _bundle_run(bundle_root, *args):
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=bundle_root,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "config, run_id",
    [
        ("configs/train.json", "training"),
        ("['configs/inference.json','configs/inference_slices.json']", "run"),
        ("configs/evaluate.json", "run"),
    ],
)
def test_missing_dataset_is_named(bundle_root, tmp_path, config, run_id):
    missing = tmp_path / "no_such_dataset"
    result = _bundle_run(bundle_root, run_id, "--config_file", config, "--dataset_dir", str(missing))
    assert result.returncode != 0
    assert f"{missing}/datalist.json" in result.stderr
    assert any(word in result.stderr for word in ("does not exist", "not found", "no datalist"))


def test_volume_where_a_slice_is_expected_is_named(bundle_root, tmp_path):
    model = GAPClassifier(width=0.0625)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    slices = tmp_path / "slices"
    slices.mkdir()
    volume = slices / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.full((32, 32, 4), -800, np.int16), np.eye(4)), volume)
    result = _bundle_run(
        bundle_root,
        "run",
        "--config_file",
        "['configs/inference.json','configs/inference_slices.json']",
        "--input_dir",
        str(slices),
        "--ckpt_path",
        str(tmp_path / "model.pt"),
        "--width",
        "0.0625",
        "--image_size",
        "32",
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert result.returncode != 0
    assert "volume.nii.gz" in result.stderr and "2-D" in result.stderr
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_check_sliced_names_the_problem():
    from monai.data import MetaTensor
    from scripts.training.transforms import CheckSliced

    check = CheckSliced(keys="image")
    good = MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "good.nii.gz"})
    assert check({"image": good})["image"] is good
    with pytest.raises(ValueError, match="mask.nii.gz: expected CT values in HU"):
        check({"image": MetaTensor(torch.zeros(1, 8, 8, dtype=torch.bool), meta={"filename_or_obj": "mask.nii.gz"})})
    nan = torch.zeros(1, 8, 8)
    nan[0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="nan.nii.gz: the image has NaN"):
        check({"image": MetaTensor(nan, meta={"filename_or_obj": "nan.nii.gz"})})
    with pytest.raises(ValueError, match=r"vol.nii.gz: expected a 2-D slice with one channel, got .*\(8, 8, 4\)"):
        check({"image": MetaTensor(torch.zeros(1, 8, 8, 4), meta={"filename_or_obj": "vol.nii.gz"})})
