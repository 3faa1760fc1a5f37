"""ICM multi-phase segmentation and candidate extraction."""

import importlib.util
import sys

import numpy as np
import pytest
from scripts.pipeline.candidates import dense_phases, extract_candidates, parenchyma_value
from scripts.pipeline.icm import _first_minimum, icm_segmentation
from scripts.pipeline.lungs import segment_lungs

from conftest import REPO

MEANS = np.array([-850.0, -500.0, -100.0, 40.0])

spec = importlib.util.spec_from_file_location("bench_icm", REPO / "bench" / "bench_icm.py")
bench_icm = importlib.util.module_from_spec(spec)
sys.modules["bench_icm"] = bench_icm
spec.loader.exec_module(bench_icm)


def phantom(noise: float = 60.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four phases of equal share (stripes) plus two blocks, with Gaussian noise: (image, true phase 0..3)."""
    truth = np.zeros((96, 96), int)
    truth[:, 24:48], truth[:, 48:72], truth[:, 72:] = 1, 2, 3
    truth[40:56, 4:20], truth[8:20, 28:44] = 2, 3
    image = MEANS[truth] + np.random.default_rng(seed).normal(0, noise, truth.shape)
    return image, truth


def test_recovers_known_phases():
    image, truth = phantom()
    labels, means = icm_segmentation(image, phases=4, beta=0.7)
    assert labels.shape == image.shape and labels.dtype == np.int32
    assert set(np.unique(labels)) == {1, 2, 3, 4}
    assert (labels - 1 == truth).mean() > 0.99
    np.testing.assert_allclose(means, MEANS, atol=10)


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_equals_the_sequential_per_pixel_updates(beta):
    """The vectorised sweeps (a colour class at a time, neighbour counts from shifted views) are ICM's per-pixel
    updates in raster order within each class (``bench/bench_icm.py``'s loop), to the label, under a mask whose box
    starts on odd rows and columns."""
    image, _ = phantom(noise=110.0, seed=5)
    image = image[:45, 30:77]
    rows, cols = np.mgrid[:45, :47]
    mask = ((rows - 25) / 20) ** 2 + ((cols - 25) / 22) ** 2 <= 1  # box from row 5, column 3
    labels, _ = icm_segmentation(image, mask, beta=beta)
    np.testing.assert_array_equal(labels, bench_icm.icm_loop(image, mask, beta=beta))
    assert len(np.unique(labels[mask])) == 4


def test_first_minimum_breaks_ties_as_argmin():
    # small integer energies tie often; a tie must go to the lowest phase, as np.argmin and the per-pixel loop do
    energies = np.random.default_rng(0).integers(0, 3, size=(4, 40, 50)).astype(float)
    best = _first_minimum(energies)
    assert best.dtype == np.int8
    np.testing.assert_array_equal(best, np.argmin(energies, axis=0))


def test_beta_removes_speckle():
    image, truth = phantom(noise=90.0)
    errors = [int((icm_segmentation(image, beta=b)[0] - 1 != truth).sum()) for b in (0.0, 0.3, 0.7)]
    assert errors[0] > 2 * errors[1] > 0 or errors[1] == 0
    assert errors[2] <= errors[1] < errors[0]
    assert errors[2] < 0.01 * truth.size


def test_deterministic_and_mask():
    image, _ = phantom(seed=3)
    mask = np.zeros(image.shape, bool)
    mask[10:80, 5:90] = True
    a, ma = icm_segmentation(image, mask)
    b, mb = icm_segmentation(image.copy(), mask.copy())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert (a[~mask] == 0).all() and (a[mask] > 0).all()


def test_nan_outside_mask_is_ignored_inside_is_an_error():
    image, _ = phantom()
    mask = np.ones(image.shape, bool)
    mask[0] = False
    image[0, 0] = np.nan
    labels, _ = icm_segmentation(image, mask)
    assert labels[0, 0] == 0
    image[5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        icm_segmentation(image, mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"image": np.zeros((4, 4, 4))}, "2-D"), ({"phases": 1}, "phases"), ({"mask": np.ones((3, 3), bool)}, "mask")],
)
def test_bad_input(kwargs, match):
    args = {"image": np.zeros((8, 8))} | kwargs
    with pytest.raises(ValueError, match=match):
        icm_segmentation(**args)


def test_constant_and_empty_mask():
    labels, means = icm_segmentation(np.full((16, 16), -850.0))
    assert (labels > 0).all() and np.nanmax(means) == -850.0
    labels, means = icm_segmentation(np.zeros((8, 8)), np.zeros((8, 8), bool))
    assert (labels == 0).all() and np.isnan(means).all()


def test_few_levels_each_get_a_phase():
    """A noise-free region of two levels (a phantom; a nodule that is a large share of the scope) keeps them apart:
    quantile thresholds of two levels coincide and would put both in one phase."""
    image = np.full((20, 20), -850.0)
    image[5:12, 5:12] = 20.0  # 49 of 400 pixels: multi-Otsu cannot split two levels into four classes
    labels, means = icm_segmentation(image, phases=4)
    assert set(np.unique(labels)) == {1, 2}
    assert (labels[image == 20.0] == 2).all() and (labels[image == -850.0] == 1).all()
    np.testing.assert_allclose(means[:2], [-850.0, 20.0])
    assert np.isnan(means[2:]).all()


def test_candidates_area_spacing_and_scope():
    labels = np.ones((40, 40), np.int32)
    labels[5:9, 5:9] = 4  # 16 px
    labels[20:22, 20:22] = 3  # 4 px
    labels[30:35, 30:35] = 2  # not dense
    means = np.array([-850.0, -700.0, -300.0, 20.0])
    np.testing.assert_array_equal(dense_phases(means), [3, 4])
    scope = np.ones((40, 40), bool)
    found = extract_candidates(labels, means, scope, spacing=(0.7, 0.7), min_area_mm2=7.0)
    assert len(found) == 1 and found[0].bbox == (5, 5, 9, 9)
    assert found[0].area_mm2 == pytest.approx(16 * 0.49)
    found = extract_candidates(labels, means, scope, spacing=(1.5, 1.5), min_area_mm2=7.0)
    assert sorted(c.area_mm2 for c in found) == pytest.approx([9.0, 36.0])
    scope[:, 15:] = False
    assert len(extract_candidates(labels, means, scope, spacing=(1.5, 1.5))) == 1
    # diagonal neighbours join one 8-connected candidate
    labels[10, 10] = labels[11, 11] = 4
    assert len(extract_candidates(labels, means, np.ones((40, 40), bool), min_area_mm2=1)) == 3
    assert parenchyma_value(labels, means) == -850.0


def test_lung_mask_keeps_juxtapleural_nodule_and_drops_chest_wall():
    """With the lead's lung mask, a nodule touching the pleura is a candidate; the chest wall is not."""
    yy, xx = np.mgrid[:128, :128]
    body = ((yy - 64) / 58) ** 2 + ((xx - 64) / 60) ** 2 < 1
    lungs_true = (((yy - 64) / 40) ** 2 + ((xx - 40) / 18) ** 2 < 1) | (
        ((yy - 64) / 40) ** 2 + ((xx - 88) / 18) ** 2 < 1
    )
    nodule = (yy - 64) ** 2 + (xx - 27) ** 2 < 25  # on the lateral pleura of the left lung (its edge at x = 22)
    hu = np.where(body, 40.0, -1000.0)
    hu[lungs_true] = -850.0
    hu[nodule] = 30.0
    hu += np.random.default_rng(0).normal(0, 20, hu.shape)
    spacing = (0.8, 0.8)
    lungs = segment_lungs(hu, spacing)
    labels, means = icm_segmentation(hu, lungs)
    scope = np.zeros(hu.shape, bool)
    scope[40:90, 5:50] = True  # reaches into the chest wall
    found = extract_candidates(labels, means, scope, lungs, spacing)
    assert len(found) == 1
    assert (found[0].mask & nodule).sum() > 0.8 * nodule.sum()
    wall = body & ~lungs_true & ~nodule
    assert (found[0].mask & wall).sum() < 0.1 * found[0].mask.sum()
    # without the lung mask the chest wall in the scope becomes a (large) candidate
    labels, means = icm_segmentation(hu)
    assert any((c.mask & wall).sum() > 100 for c in extract_candidates(labels, means, scope, None, spacing))
