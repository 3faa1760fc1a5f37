"""The lung mask's morphology (and the candidates' hole filling) runs on the mask's bounding box for speed: it must
give what it gives on the whole slice, also where the mask touches the slice's border."""

import numpy as np
import pytest
from scipy import ndimage
from scripts.pipeline import lungs
from scripts.utils.morphology import fill_holes
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
    rings = np.zeros((70, 90), bool)
    rings[30:41, 50:61] = True
    rings[31:40, 51:60] = False  # a one-pixel ring far from the borders (a candidate's rim): its hole is filled
    for mask in [*_masks(), rings, np.zeros((70, 90), bool)]:
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    assert fill_holes(rings)[35, 55]


def test_coarse_hull_on_the_bounding_box_equals_the_whole_slice():
    step = 4
    for mask in _masks():
        small = convex_hull_image(mask[::step, ::step])
        hull = np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: mask.shape[0], : mask.shape[1]]
        expected = ndimage.binary_erosion(hull, iterations=step) | mask
        np.testing.assert_array_equal(lungs._coarse_convex_hull(mask, step), expected)


def _chest(slices=9, size=96):
    """A body of soft tissue in air with two lungs whose size changes from slice to slice ``(rows, cols, slices)``."""
    rows, cols = np.mgrid[:size, :size]
    volume = np.full((size, size, slices), -1000.0)
    for s in range(slices):
        body = ((rows - 48) / 40) ** 2 + ((cols - 48) / 44) ** 2 <= 1
        volume[body, s] = 40.0
        for centre in (28, 68):
            radius = 10 + s
            volume[(rows - 48) ** 2 + (cols - centre) ** 2 <= radius**2, s] = -850.0
    return volume


def test_threads_segment_each_slice_as_one_thread_does():
    """The slices run in a thread pool: the volume's mask is each slice's own mask, in order, whatever the workers."""
    volume = _chest()
    alone = [lungs.segment_lungs(volume[..., s], (1.0, 1.0)) for s in range(volume.shape[2])]
    assert len({int(m.sum()) for m in alone}) == volume.shape[2]  # every slice differs: an order mix-up shows
    for workers in (1, 3, None):
        np.testing.assert_array_equal(
            lungs.segment_lungs(volume, (1.0, 1.0, 2.0), workers=workers), np.stack(alone, -1)
        )


def test_coarse_hull_of_a_body_too_small_for_its_grid_is_the_body():
    """A body that no pixel of the coarse grid falls on (a fleck at the border of a slice) is its own hull."""
    mask = np.zeros((40, 40), bool)
    mask[1:3, 1:3] = True  # every 4th pixel from 0 misses it
    np.testing.assert_array_equal(lungs._coarse_convex_hull(mask, 4), mask)
