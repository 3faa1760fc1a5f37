"""The model that ships with the bundle (``models/model.pt``): listed with its hash, loadable, what
``configs/inference.json`` uses, and finding LIDC-IDRI-0001's nodule (a scan of its training set) as a user runs it."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scripts.evaluation.lidc_truth import lidc_truth
from scripts.evaluation.scan_scores import score_scan
from scripts.integration.config_runs import run_config
from scripts.networks.checkpoint import load_checkpoint, read_checkpoint
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.assemble import axial_axis
from scripts.utils.io import sha256

pytestmark = pytest.mark.usefixtures("isolated_home")


@pytest.fixture(scope="module")
def shipped(bundle_root) -> Path:
    return bundle_root / "models" / "model.pt"


def test_the_shipped_model_is_listed_with_its_sha256(bundle_root, shipped):
    entries = yaml.safe_load((bundle_root / "large_files.yml").read_text())["large_files"]
    entry = next(e for e in entries if e["path"] == "models/model.pt")
    assert entry["hash_type"] == "sha256"
    assert sha256(shipped) == entry["hash_val"]
    assert shipped.stat().st_size < 50 * 1024**2


def test_the_shipped_model_loads_with_its_record(shipped):
    state, record = read_checkpoint(shipped)
    assert record["image_size"] == 256 and record["in_channels"] == 3 and record["gap_levels"] == 1
    assert record["pixel_spacing_mm"] == pytest.approx([1.125, 1.125], abs=0.01)
    assert record["threshold_rule"] == "validation specificity 0.98" and 0 < record["threshold"] < 1
    network = GAPClassifier(
        gap_levels=1, width=record["width"], in_channels=3, head_channels=record["head_channels"], batch_norm=True
    )
    load_checkpoint(network, shipped)


def test_the_inference_config_finds_the_nodule_of_lidc_idri_0001(bundle_root, shipped, lidc_root, tmp_path):
    """A fresh clone's command, ``monai.bundle run --config_file configs/inference.json --input SCAN``, with the
    config's defaults (its checkpoint, threshold and rules). LIDC-IDRI-0001 was in the shipped model's training set."""
    scan = tmp_path / "LIDC-IDRI-0001"
    scan.symlink_to(lidc_root / "LIDC-IDRI-0001" / "ct")
    run_config("run", "inference.json", bundle_root=str(bundle_root), input=str(scan), output_dir=str(tmp_path / "out"))
    image = nib.load(str(tmp_path / "out" / "LIDC-IDRI-0001" / "LIDC-IDRI-0001_mask.nii.gz"))
    mask = np.asarray(image.dataobj) > 0
    nodules, ignore = lidc_truth("LIDC-IDRI-0001", scan, image.affine, mask.shape)
    scores = score_scan(mask, nodules, ignore, axis=axial_axis(image.affine))
    assert scores["nodules"]["LIDC-IDRI-0001/0"]["found"]
    assert scores["nodules"]["LIDC-IDRI-0001/0"]["dice_3d"] > 0.6
    assert scores["false_positives"] <= 4
