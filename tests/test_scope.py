"""Screening scope from a NAM: watershed basins ranked by peak."""

import numpy as np
import pytest
from scripts.pipeline.scope import bounding_box, nam_basins, refine_scope, screening_scope, top_scopes

YY, XX = np.mgrid[:96, :96]


def blob(r: float, c: float, sigma: float, height: float) -> np.ndarray:
    return height * np.exp(-((YY - r) ** 2 + (XX - c) ** 2) / (2 * sigma**2))


def test_highest_peak_not_broadest():
    nam = blob(20, 20, 3, 3.0) + blob(60, 60, 15, 2.0)  # narrow tall vs broad lower (larger integral)
    scope = screening_scope(nam)
    assert scope is not None and scope[20, 20] and not scope[60, 60]
    r0, c0, r1, c1 = bounding_box(scope)
    assert r1 - r0 < 20 and c1 - c0 < 20
    basins, peaks = nam_basins(nam)
    assert peaks[0] == pytest.approx(1.0) and peaks[1] < peaks[0]
    assert basins[20, 20] == 1 and basins[60, 60] == 2


def test_touching_blobs_split_by_watershed_and_top_k():
    nam = blob(40, 30, 6, 3.0) + blob(40, 52, 6, 2.5) - 0.5  # overlapping domains, one connected region
    scopes = top_scopes(nam, k=3, threshold=0.1)
    assert len(scopes) == 2
    assert scopes[0][40, 30] and scopes[1][40, 52]
    assert not (scopes[0] & scopes[1]).any()
    assert len(top_scopes(nam, k=1)) == 1


@pytest.mark.parametrize("nam", [np.zeros((32, 32)), np.full((32, 32), 7.0), np.full((32, 32), np.nan)])
def test_no_scope(nam):
    assert screening_scope(nam) is None
    assert top_scopes(nam) == []
    basins, peaks = nam_basins(nam)
    assert basins.shape == nam.shape and not basins.any() and peaks.size == 0


def test_partial_nan_and_bad_shape():
    nam = blob(20, 20, 3, 1.0)
    nam[0, 0] = np.nan
    assert screening_scope(nam) is None
    with pytest.raises(ValueError, match="2-D"):
        screening_scope(np.zeros((4, 4, 4)))


def test_refine_scope():
    base = np.zeros((96, 96), bool)
    base[10:50, 10:50] = True
    inside = blob(30, 30, 3, 2.0) + blob(80, 80, 3, 3.0)  # highest blob outside C1, a prominent one inside
    scope, refined = refine_scope(inside, base)
    assert refined and scope[30, 30] and not scope[80, 80] and scope.sum() < base.sum()
    assert not (scope & ~base).any()
    outside = blob(80, 80, 3, 3.0)
    scope, refined = refine_scope(outside, base)
    assert not refined and (scope == base).all()
    scope, refined = refine_scope(np.zeros((96, 96)), base)
    assert not refined and (scope == base).all()
    with pytest.raises(ValueError, match="shape"):
        refine_scope(outside, base[:10])


def test_bounding_box():
    mask = np.zeros((10, 10), bool)
    assert bounding_box(mask) is None
    mask[2:5, 3:4] = True
    assert bounding_box(mask) == (2, 3, 5, 4)
