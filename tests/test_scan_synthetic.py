"""Whole-scan inference on synthetic scans with known nodules: the nodule table against the truth, and the scans of
a folder shared over two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from known_response import SpotNet, given_network_settings
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage
from scripts.data.prepare import scans
from scripts.networks.checkpoint import TrainingRecord
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.assemble import ScanResultd
from scripts.pipeline.crop import crop_window
from scripts.pipeline.lungs import segment_lungs

SIZE = 128


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory):
    """A synthetic scan with two solid nodules (15 and 21 mm) written as the user would get it (``prepare scans``), and
    its truth read back from the label volume, each nodule numbered."""
    folder = tmp_path_factory.mktemp("synthetic")
    scans(str(folder), cases=2, seed=0, size=SIZE, nodule_types_p=(1.0, 0.0, 0.0))  # solid: what SpotNet sees
    image = nib.load(folder / "SYN-0001.nii.gz")
    truth, count = ndimage.label(np.asarray(nib.load(folder / "labels" / "SYN-0001.nii.gz").dataobj) > 0)
    return image, folder / "SYN-0001.nii.gz", truth


def _truth_table(image, truth):
    """The known nodules' centroids (voxels, RAS mm) and volumes, computed from the label volume alone."""
    voxel_mm3 = float(np.prod(image.header.get_zooms()[:3]))
    rows = []
    for j in range(1, truth.max() + 1):
        centre = np.argwhere(truth == j).mean(axis=0)
        rows.append((centre, (image.affine @ [*centre, 1.0])[:3], (truth == j).sum() * voxel_mm3))
    return sorted(rows, key=lambda r: r[0][2])


def test_nodule_table_of_known_nodules(bundle_root, synthetic_case):
    """The table of a mask that is the truth itself: count, centroids and volumes as the label volume says."""
    image, path, truth = synthetic_case
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "model_settings": given_network_settings(SIZE)})
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    outputs = {
        "mask": (truth > 0).astype(np.float32),
        "slice_probability": np.full(truth.shape, 0.9, np.float32),
        "lungs": np.ones(truth.shape, np.float32),
    }
    for key, array in outputs.items():
        data[key] = MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(image.affine))
    table = ScanResultd(mode="fine")(data)["result"]["nodules"]
    assert len(table) == 2
    for found, (centre, world, volume) in zip(
        sorted(table, key=lambda n: n["centroid_voxel"][2]), _truth_table(image, truth)
    ):
        np.testing.assert_allclose(found["centroid_voxel"], centre, atol=0.01)
        np.testing.assert_allclose(found["centroid_ras_mm"], world, atol=0.01)
        np.testing.assert_allclose(found["centroid_lps_mm"], world * [-1, -1, 1], atol=0.01)
        assert abs(found["volume_mm3"] - volume) <= 0.01 * volume
        assert found["max_slice_probability"] == pytest.approx(0.9)


def test_scan_inference_finds_the_known_nodules(bundle_root, synthetic_case, tmp_path):
    """End to end with a classifier that looks where the nodules are (a tight NAM: these nodules are 7-9 px wide):
    each known nodule found once, its centroid within a voxel of the truth's, and a table that agrees with the mask
    it wrote (the table of the truth itself is the test above)."""
    image, path, truth = synthetic_case
    spacing = image.header.get_zooms()[:3]
    hu = np.asarray(image.dataobj, np.float64)
    corner = crop_window(segment_lungs(np.clip(hu, -1000, 400), spacing), SIZE)
    centres = [np.argwhere(truth == j).mean(axis=0) for j in (1, 2)]
    network = SpotNet(
        [(c[0] - corner[0], c[1] - corner[1]) for c in centres],
        SIZE,
        sigma_px=1.5,
        fill=0.25,
        blur_px=0.0,
        reach_px=1.5,
    )
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "model_settings": given_network_settings(SIZE),
            "network": network,
            "input": str(path),
            "output_dir": str(tmp_path),
            "mode": "two_nodule",
            "segmenter#screening#crop": False,
            "overview": False,
        }
    )
    parser.get_parsed_content("evaluator").run()
    result = json.loads((tmp_path / "SYN-0001" / "SYN-0001_nodules.json").read_text())
    # the table says what made it: the bundle version and the segmenter's settings, the config's overrides included
    assert result["bundle_version"] == json.loads((bundle_root / "configs" / "metadata.json").read_text())["version"]
    assert result["segmenter"]["mode"] == "two_nodule" and result["segmenter"]["screening"]["crop"] is False
    assert result["segmenter"]["candidates"] == parser.get_parsed_content("segmenter#candidates")
    nodules = result["nodules"]
    # each known nodule is the one row whose slices hold its centre and whose centroid is within 3 voxels in-plane, its
    # centroid within a voxel of the truth's. The oracle may also fire where other dense tissue crosses its places on
    # other slices: rows of their own, beside a nodule's slices or away from both
    for centre, _, _ in _truth_table(image, truth):
        on_it = [
            n
            for n in nodules
            if n["slice_first"] <= round(centre[2]) <= n["slice_last"]
            and np.abs(np.subtract(n["centroid_voxel"][:2], centre[:2])).max() <= 3.0
        ]
        assert len(on_it) == 1, ([n["centroid_voxel"] for n in nodules], centre)
        np.testing.assert_allclose(on_it[0]["centroid_voxel"], centre, atol=1.0)
    mask = nib.load(tmp_path / "SYN-0001" / "SYN-0001_mask.nii.gz")
    voxels = np.asarray(mask.dataobj)
    assert voxels.shape == truth.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
    voxel_mm3 = float(np.prod(mask.header.get_zooms()[:3]))
    assert sum(n["volume_mm3"] for n in nodules) == pytest.approx(voxels.sum() * voxel_mm3, rel=1e-4)
    assert all((voxels[truth == j] > 0).any() for j in (1, 2)), "the mask misses a nodule"


def test_two_processes_share_the_scans(bundle_root, tmp_path):
    """torchrun with two gloo processes: every scan done exactly once, outputs identical to one process."""
    folder = tmp_path / "scans"
    names = [Path(p).name[: -len(".nii.gz")] for p in scans(str(folder), cases=3, seed=2, size=64, n_slices=16)]
    model = GAPClassifier(width=0.0625, head_channels=64)
    record = TrainingRecord(model, [{"image": "", "spacing_mm": [4.5, 4.5]}], 64, (-1000, 400), bundle_root)
    torch.save({"model": model.state_dict(), "config": record.state_dict()}, tmp_path / "model.pt")

    def run(out, launcher, configs):
        command = [sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", configs]
        command += ["--ckpt_path", str(tmp_path / "model.pt"), "--input", str(folder), "--output_dir", str(out)]
        command += ["--threshold", "0.0", "--mode", "coarse", "--overview", "False"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "one", [], "configs/inference.json")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(tmp_path / "two", launcher, "['configs/inference.json','configs/multi_gpu_inference.json']")
    shares = [json.loads((tmp_path / "two" / f"summary.rank{r}.json").read_text())["done"] for r in (0, 1)]
    assert sorted(d["name"] for share in shares for d in share) == names, "each scan exactly once"
    assert all(shares), "both processes working"
    for name in names:
        one = nib.load(tmp_path / "one" / name / f"{name}_mask.nii.gz")
        two = nib.load(tmp_path / "two" / name / f"{name}_mask.nii.gz")
        np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))
        np.testing.assert_array_equal(one.affine, two.affine)
        tables = [json.loads((tmp_path / d / name / f"{name}_nodules.json").read_text()) for d in ("one", "two")]
        assert tables[0]["nodules"] == tables[1]["nodules"] and tables[0]["slices"] == tables[1]["slices"]
    assert sum(json.loads((tmp_path / "one" / "summary.json").read_text())["done"][i]["nodules"] for i in range(3)) > 0


# Each mode that chooses among the candidates, and the mode that keeps every candidate of the same scope(s) C.
KEEPS_ALL = {"fine": "coarse", "multi_gap": "multi_gap_coarse", "two_nodule": "coarse"}


@pytest.fixture(scope="module")
def segment_in_mode(bundle_root, tmp_path_factory):
    """``segment(mode)``: a small synthetic scan segmented through configs/inference.json in that mode with untrained
    1-/2-GAP checkpoints, every slice with lung called "nodule"; each mode runs once, its summary and table kept."""
    folder = tmp_path_factory.mktemp("modes")
    scans(str(folder), cases=1, seed=3, size=64, n_slices=12)
    torch.manual_seed(0)
    for levels, name in ((1, "model.pt"), (2, "model_2gap.pt")):
        model = GAPClassifier(gap_levels=levels, width=0.0625, head_channels=64)
        record = TrainingRecord(model, [{"image": "", "spacing_mm": [4.5, 4.5]}], 64, (-1000, 400), bundle_root)
        torch.save({"model": model.state_dict(), "config": record.state_dict()}, folder / name)
    done = {}

    def segment(mode):
        if mode not in done:
            parser = ConfigParser()
            parser.read_config(str(bundle_root / "configs" / "inference.json"))
            out = folder / f"out-{mode}"
            parser.update(
                {
                    "bundle_root": str(bundle_root),
                    "ckpt_path": str(folder / "model.pt"),
                    "multi_gap_ckpt_path": str(folder / "model_2gap.pt"),
                    "input": str(folder / "SYN-0000.nii.gz"),
                    "output_dir": str(out),
                    "mode": mode,
                    "threshold": 0.0,  # every slice with lung is segmented
                    "min_height_ratio": 0.0,  # an untrained model's one-slice blobs are what these tests look at
                    "overview": False,
                }
            )
            summary = parser.get_parsed_content("evaluator").run()
            done[mode] = summary, json.loads((out / "SYN-0000" / "SYN-0000_nodules.json").read_text()), out
        return done[mode]

    return folder, segment


@pytest.mark.parametrize("mode", ["coarse", "fine", "multi_gap", "multi_gap_coarse", "two_nodule"])
def test_every_mode_runs_on_a_scan(segment_in_mode, mode):
    """Every mode segments some slice, and the table agrees with the mask; a mode that chooses (R-NAM) keeps fewer
    voxels than the mode that keeps every candidate of the same scope on a slice with several candidates."""
    folder, segment = segment_in_mode
    summary, result, out = segment(mode)
    assert [d["name"] for d in summary["done"]] == ["SYN-0000"]
    assert result["mode"] == mode and result["nodules"] and all(n["mode"] == mode for n in result["nodules"])
    assert sum(s["called_nodule"] for s in result["slices"]) == sum(s["classified"] for s in result["slices"]) > 0
    mask, image = nib.load(out / "SYN-0000" / "SYN-0000_mask.nii.gz"), nib.load(folder / "SYN-0000.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
    voxels = [s["nodule_voxels"] for s in result["slices"]]
    assert voxels == (np.asarray(mask.dataobj) > 0).sum(axis=(0, 1)).tolist() and sum(voxels) > 0
    if mode in KEEPS_ALL:
        every = [s["nodule_voxels"] for s in segment(KEEPS_ALL[mode])[1]["slices"]]
        assert len(every) == len(voxels)
        assert any(v < e for v, e in zip(voxels, every)), (voxels, every)
        if mode != "two_nodule":  # one scope: the chosen candidate is one of those the other mode keeps
            assert all(v <= e for v, e in zip(voxels, every)), (voxels, every)


def test_outputs_go_back_to_an_oblique_resampled_scans_grid_in_one_resampling(bundle_root, synthetic_case, tmp_path):
    """``configs/inference.json``'s postprocessing takes the inferer's three outputs back to the input grid in one
    resampling (``InvertTogetherd``): the same arrays as ``Invertd`` key by key, on the input's shape and affine, for a
    scan stored with flipped axes whose pixels the model's spacing resamples (in-plane 0.7 mm to 1.0-1.2 mm)."""
    from monai.transforms import Invertd

    image = synthetic_case[0]
    volume = np.asarray(image.dataobj)[::2, ::2, ::4].astype(np.int16)  # small: 64 x 64 x n
    affine = np.diag([-0.7, 0.7, -2.5, 1.0])  # rows to the right, slices downwards: Orientationd flips both
    affine[:3, 3] = (12.0, -30.0, 80.0)
    scan = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), scan)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    settings = {"pixel_spacing_mm": [1.0, 1.2], "hu_window": [-1000.0, 400.0], "image_size": 64, "in_channels": 1}
    parser.update({"bundle_root": str(bundle_root), "model_settings": settings, "threshold": 0.5})
    preprocessing = parser.get_parsed_content("preprocessing")
    data = preprocessing({"image": str(scan)})
    model_grid = data["image"].shape[1:]
    assert model_grid[0] < volume.shape[0]  # resampled to coarser pixels
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "mask": (torch.rand(1, *model_grid, generator=generator) > 0.7).float(),
        "slice_probability": torch.rand(1, 1, 1, model_grid[2], generator=generator).expand(1, *model_grid),
        "lungs": (torch.rand(1, *model_grid, generator=generator) > 0.3).float(),
    }
    for key, array in outputs.items():
        data[key] = MetaTensor(array.clone(), meta=data["image"].meta)
    together = parser.get_parsed_content("postprocessing").transforms[2]
    assert type(together).__name__ == "InvertTogetherd"
    each = Invertd(list(outputs), preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True)
    got, expected = together(dict(data)), each(dict(data))
    for key in outputs:
        assert tuple(got[key].shape) == (1, *volume.shape), key
        np.testing.assert_allclose(got[key].affine.numpy(), affine, atol=1e-4)
        torch.testing.assert_close(got[key].as_tensor(), expected[key].as_tensor(), rtol=0, atol=0)
    # each key came back as itself: the split follows the stacking order
    assert 0.1 < got["mask"].float().mean() < 0.5 < got["lungs"].float().mean()
