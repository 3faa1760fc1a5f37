"""The lung mask's morphology runs on the mask's bounding box for speed: it must give what it gives on the whole
slice, also where the mask touches the slice's border."""

import numpy as np
import pytest
from scipy import ndimage
from scripts.pipeline import lungs
from skimage.morphology import convex_hull_image


def _masks():
    rng = np.random.default_rng(0)
    for index in range(12):
        mask = ndimage.gaussian_filter(rng.random((70, 90)), 3) > 0.52
        if index % 3 == 0:
            mask[:, :4] = True  # touches the left border
        if index % 3 == 1:
            mask[-3:, 40:60] = True  # and the bottom one
        yield mask


def _closing_on_the_whole_slice(mask, radius_px):
    sampling = 1.0 / radius_px
    pad = int(np.ceil(radius_px.max())) + 1
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=sampling) <= 1.0
    return (ndimage.distance_transform_edt(dilated, sampling=sampling) > 1.0)[pad:-pad, pad:-pad]


@pytest.mark.parametrize("radius", [(3.0, 3.0), (5.5, 2.5)])
def test_closing_on_the_bounding_box_equals_the_whole_slice(radius):
    radius = np.asarray(radius)
    for mask in _masks():
        np.testing.assert_array_equal(lungs._closing(mask, radius), _closing_on_the_whole_slice(mask, radius))


def test_hole_filling_on_the_bounding_box_equals_the_whole_slice():
    for mask in _masks():
        np.testing.assert_array_equal(lungs._fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_coarse_hull_on_the_bounding_box_equals_the_whole_slice():
    step = 4
    for mask in _masks():
        small = convex_hull_image(mask[::step, ::step])
        hull = np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: mask.shape[0], : mask.shape[1]]
        expected = ndimage.binary_erosion(hull, iterations=step) | mask
        np.testing.assert_array_equal(lungs._coarse_convex_hull(mask, step), expected)
