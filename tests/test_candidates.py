"""The candidate rule on small hand-made CT slices: ground-glass, partial volume, pleura, vessels.

Each slice is a chest in HU: a body of soft tissue with two lungs of -870 HU parenchyma (with scanner noise), and
a nodule. The candidates come from the stage exactly as the segmenter runs it with its defaults (the real-CT rules).
"""

from dataclasses import asdict

import numpy as np
import pytest
from scipy import ndimage
from scripts.pipeline.candidates import (
    dense_phases,
    extract_candidates,
    parenchyma_value,
    side_tissue,
    split_attached,
    split_vessels,
    trim_partial_volume,
)
from scripts.pipeline.icm import icm_segmentation
from scripts.pipeline.lungs import segment_lungs
from scripts.pipeline.settings import CandidateSettings, ICMSettings

SPACING = (0.7, 0.7)
SHAPE = (160, 200)


def chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HU of a hand-made chest slice and the parenchyma (the lungs' true extent)."""
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    body = ((rows - 80) / 75) ** 2 + ((cols - 100) / 95) ** 2 <= 1
    lungs = (((rows - 80) / 55) ** 2 + ((cols - 55) / 38) ** 2 <= 1) | (
        ((rows - 80) / 55) ** 2 + ((cols - 145) / 38) ** 2 <= 1
    )
    hu = np.where(body, 40.0, -1000.0)
    hu[lungs] = -870.0
    # a few vessels seen in-plane and across: the phases above parenchyma have something to fit
    for r, c in ((60, 40), (100, 150), (70, 160), (110, 50)):
        hu[(rows - r) ** 2 + (cols - c) ** 2 <= 4] = 30.0
    hu[(np.abs(rows - 0.4 * cols - 35) < 1.2) & lungs & (cols > 120) & (cols < 175)] = 20.0
    hu = ndimage.gaussian_filter(hu, 0.8)
    hu += ndimage.gaussian_filter(np.random.default_rng(seed).normal(0, 25, SHAPE), 0.6) * 2
    return hu, lungs


def disk(centre, radius) -> np.ndarray:
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def paint(hu: np.ndarray, mask: np.ndarray, level: float, blur: float = 0.8) -> np.ndarray:
    """The nodule blended in with the scanner's blur (partial volume at its edge)."""
    weight = ndimage.gaussian_filter(mask.astype(float), blur)
    return hu + weight * np.maximum(level - ndimage.gaussian_filter(hu, 1.0), 0)


def candidates(hu: np.ndarray, scope: np.ndarray, **changes) -> tuple[list, np.ndarray]:
    """The segmenter's stage with its default (real-CT) candidate rules, but for ``changes``: lung mask, ICM in the
    lungs, candidates in the scope."""
    icm, rules = ICMSettings(), CandidateSettings(**changes)
    lungs = segment_lungs(hu, SPACING)
    labels, means = icm_segmentation(hu, lungs, **asdict(icm))
    found = extract_candidates(labels, means, scope, lungs, SPACING, hu=hu, **rules.extract_arguments(icm))
    return found, lungs


def only_hit(found, nodule):
    """The one candidate that overlaps ``nodule`` (asserting there is exactly one)."""
    hit = [c for c in found if (c.mask & nodule).any()]
    assert len(hit) == 1, len(hit)
    return hit[0]


def test_ground_glass_becomes_a_candidate():
    hu, _ = chest()
    nodule = disk((80, 60), 7)
    hu = paint(hu, nodule, -700.0)
    found, _ = candidates(hu, disk((80, 60), 28))
    area = only_hit(found, nodule).mask.sum() / nodule.sum()
    assert 0.7 <= area <= 1.3, area


def test_partial_volume_rim_does_not_grow_a_solid_nodule():
    hu, _ = chest(1)
    nodule = disk((80, 55), 6)
    hu = paint(hu, nodule, 30.0, blur=1.2)
    found, _ = candidates(hu, disk((80, 55), 28))
    ratio = only_hit(found, nodule).mask.sum() / nodule.sum()
    assert 0.85 <= ratio <= 1.2, ratio


def test_juxtapleural_nodule_stays_in_the_lungs_and_the_pleura_gives_no_candidate():
    hu, parenchyma = chest(2)
    # a nodule of 14 px against the lateral chest wall of the left-hand lung (whose edge is at column 17)
    nodule = disk((80, 24), 7) & parenchyma
    hu = paint(hu, nodule, 20.0)
    found, lungs = candidates(hu, disk((80, 24), 28))
    assert lungs[nodule].mean() > 0.9
    assert 0.8 <= only_hit(found, nodule).mask.sum() / nodule.sum() <= 1.25
    # a scope on the pleura elsewhere: no candidate at all
    away, _ = candidates(hu, disk((40, 30), 20))
    assert away == []


def test_attached_vessel_is_split_from_the_nodule():
    hu, _ = chest(3)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    nodule = disk((80, 60), 7)
    # a vessel of about 1.5 mm once blurred (the split cuts necks thinner than a 1 mm-radius disk)
    vessel = (rows == 80) & (cols > 60) & (cols < 85)
    hu = paint(hu, nodule | vessel, 30.0, blur=0.7)
    found, _ = candidates(hu, disk((80, 65), 28))
    hit = only_hit(found, nodule)
    assert hit.mask[vessel & ~ndimage.binary_dilation(nodule, iterations=3)].sum() == 0
    assert 0.8 <= hit.mask.sum() / nodule.sum() <= 1.25


def test_vessel_wider_than_a_neck_is_cut_off_the_nodule():
    """A vessel 2 mm wide survives the split at 1 mm necks; the opening at a vessel's calibre (``split_vessel_mm``)
    cuts it off the nodule, and keeps it as a candidate of its own."""
    hu, _ = chest(5)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    nodule = disk((80, 60), 6)
    vessel = (np.abs(rows - 80) <= 1) & (cols > 60) & (cols < 88)
    hu = paint(hu, nodule | vessel, 30.0, blur=0.7)
    scope = disk((80, 66), 28)
    away = vessel & ~ndimage.binary_dilation(nodule, iterations=3)
    found, _ = candidates(hu, scope)
    hit = only_hit(found, nodule)
    assert hit.mask[away].sum() == 0 and 0.9 <= hit.mask.sum() / nodule.sum() <= 1.15
    assert any((c.mask & away).sum() > 0.8 * away.sum() for c in found if c is not hit)
    merged = only_hit(candidates(hu, scope, split_vessel_mm=0.0)[0], nodule)
    assert merged.mask[away].sum() > 0.8 * away.sum()


def test_ground_glass_beside_a_vessel_is_kept_apart_from_it():
    """The trim's level is the vessel's when the vessel is the larger part: by default the ground-glass nodule against
    it is cut away whole; with ``side_tissue_px`` (the default) it is a candidate of its own, and the vessel
    another."""
    hu, _ = chest(4)
    vessel, nodule = disk((80, 52), 7), disk((80, 64), 5) & ~disk((80, 52), 7)
    hu = paint(paint(hu, vessel, 30.0), nodule, -650.0)
    scope = disk((80, 58), 28)
    found, _ = candidates(hu, scope, side_tissue_px=0.0)
    assert not any((c.mask & nodule).sum() > 0.5 * nodule.sum() for c in found)
    found, _ = candidates(hu, scope)
    hit = only_hit(found, nodule)
    assert not (hit.mask & vessel).any() and 0.6 <= hit.mask.sum() / nodule.sum() <= 1.2
    assert any((c.mask & vessel).sum() > 0.5 * vessel.sum() for c in found)
    # the ground-glass ring of a part-solid nodule surrounds its core: it does not become a candidate of its own
    part_solid = paint(paint(chest(1)[0], disk((80, 55), 19), -650.0), disk((80, 55), 14), 30.0)
    scope = disk((80, 55), 28)
    assert len(candidates(part_solid, scope)[0]) == len(candidates(part_solid, scope, side_tissue_px=0.0)[0])


def whole_slice_candidates(labels, means, region, lungs, hu, rules: dict) -> list[np.ndarray]:
    """The candidates' masks as the building blocks give them on the whole slice, each component's mask the size of
    the slice, in raster order of their first pixel (what ``extract_candidates`` does on each component's box)."""
    parenchyma = parenchyma_value(labels, means, lungs, rules["min_value"])
    phases = dense_phases(means, rules["min_value"], rules["rule"], parenchyma, rules["margin_hu"])
    components, n = ndimage.label(np.isin(labels, phases) & region, np.ones((3, 3), bool))
    masks = []
    for k in range(1, n + 1):
        core = trim_partial_volume(components == k, hu, parenchyma, rules["trim_iterations"])
        masks += [core, *side_tissue(components == k, core, hu, parenchyma, rules["side_px"])]
    neck, vessel = rules["split_mm"] / np.array(SPACING), rules["split_vessel_mm"] / np.array(SPACING)
    pieces = [p for m in masks if m.any() for p in split_vessels(m, vessel, neck, rules["drop_thin"])]
    found = []
    for piece in pieces:
        parts, count = ndimage.label(piece, np.ones((3, 3), bool))
        found += [
            parts == j for j in range(1, count + 1) if (parts == j).sum() * np.prod(SPACING) >= rules["min_area_mm2"]
        ]
    return sorted(found, key=lambda m: np.flatnonzero(m)[0])


@pytest.mark.parametrize("corner", [(0, 0), (60, 45), (75, 40)])
def test_each_component_on_its_box_gives_the_whole_slice_s_candidates(corner):
    """``extract_candidates`` works on each component's box grown by what its steps reach: the same candidates as
    the building blocks on the whole slice, with the default rules (trim, side tissue, vessel and neck splits), for
    components inside the slice and cut by its edges (the slice cropped at ``corner``)."""
    hu, parenchyma = chest(6)
    vessel, ground_glass = disk((80, 52), 7), disk((80, 64), 5) & ~disk((80, 52), 7)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    attached = (rows == 100) & (cols > 140) & (cols < 165)
    hu = paint(paint(hu, vessel | disk((100, 140), 6) | attached, 30.0), ground_glass, -650.0)
    hu = paint(hu, disk((60, 130), 4), -500.0)
    crop = (slice(corner[0], None), slice(corner[1], None))
    hu, lungs = hu[crop], parenchyma[crop]
    labels, means = icm_segmentation(hu, lungs, **asdict(ICMSettings()))
    rules = {**CandidateSettings().extract_arguments(ICMSettings()), "refit": None}
    region = lungs.copy()
    found = extract_candidates(labels, means, region, lungs, SPACING, hu=hu, **rules)
    expected = whole_slice_candidates(labels, means, region, lungs, hu, rules)
    assert len(found) == len(expected) >= 6
    assert corner == (0, 0) or any(c.bbox[0] == 0 or c.bbox[1] == 0 for c in found)  # one cut by the slice's edge
    for candidate, mask in zip(found, expected):
        np.testing.assert_array_equal(candidate.mask, mask)
        r, c = np.nonzero(mask)
        assert candidate.bbox == (r.min(), c.min(), r.max() + 1, c.max() + 1)
        assert candidate.area_mm2 == pytest.approx(mask.sum() * np.prod(SPACING))


def test_trim_and_split_helpers():
    rows, cols = np.mgrid[:40, :40]
    core = (rows - 20) ** 2 + (cols - 20) ** 2 <= 36
    hu = ndimage.gaussian_filter(np.where(core, 20.0, -870.0), 1.2)
    rim = hu > -750  # what a low dense cut takes: the blurred edge too
    trimmed = trim_partial_volume(rim, hu, -870.0)
    assert rim.sum() > 1.3 * core.sum() and abs(trimmed.sum() - core.sum()) <= 0.1 * core.sum()
    neck = core | ((np.abs(rows - 20) <= 1) & (cols >= 20))
    pieces = split_attached(neck, np.array([2.0, 2.0]))
    assert len(pieces) == 1 and pieces[0][20, 39] == 0 and pieces[0][core].all()
    with pytest.raises(ValueError, match="HU"):
        extract_candidates(np.ones((4, 4), np.int32), np.array([0.0]), np.ones((4, 4), bool), trim=True)


def test_dense_phase_rules():
    means = np.array([-880.0, -760.0, -650.0, 20.0])
    np.testing.assert_array_equal(dense_phases(means), [4])  # fixed: above -600 HU
    np.testing.assert_array_equal(dense_phases(means, min_value=-700.0), [3, 4])
    np.testing.assert_array_equal(dense_phases(means, rule="relative", parenchyma=-880.0, margin_hu=100.0), [2, 3, 4])
    np.testing.assert_array_equal(dense_phases(means, rule="relative", parenchyma=-760.0, margin_hu=100.0), [3, 4])
    with pytest.raises(ValueError, match="parenchyma"):
        dense_phases(means, rule="relative")
    with pytest.raises(ValueError, match="rule"):
        dense_phases(means, rule="bogus")


@pytest.mark.parametrize("level", [30.0, -450.0, -700.0])
def test_nodule_filling_most_of_the_scope_is_still_a_candidate(level):
    """A large nodule that is most of its scope: the phases fitted in the scope make it the most frequent phase, yet
    it is no parenchyma (a solid one's mean is above the -600 HU cut; a ground-glass one is not the least dense phase
    that holds a tenth of the scope's lungs), so it is still denser than the parenchyma."""
    hu, _ = chest(4)
    nodule = disk((80, 55), 16)
    hu = paint(hu, nodule, level)
    scope = disk((80, 55), 20)
    found, lungs = candidates(hu, scope)
    assert nodule.sum() > 0.6 * (scope & lungs).sum()
    area = only_hit(found, nodule).mask.sum() / nodule.sum()
    assert 0.8 <= area <= 1.2, area


def test_parenchyma_is_the_least_dense_major_phase():
    labels = np.repeat([1, 2, 3, 4], [5, 35, 50, 10]).reshape(10, 10).astype(np.int32)
    means = np.array([-900.0, -850.0, -700.0, 20.0])
    # -700 HU is the most frequent phase under the -600 HU cut (a ground-glass nodule filling half its scope), -900 HU
    # holds 5 % (dark noise): the parenchyma is -850 HU
    assert parenchyma_value(labels, means) == -850.0
    assert parenchyma_value(labels, means, min_share=0.01) == -900.0
    assert parenchyma_value(labels, means, min_share=0.6) == -700.0  # no phase holds the share: the most frequent
    assert parenchyma_value(labels, means, region=labels >= 3) == -700.0
    assert parenchyma_value(labels, means, region=labels == 4) == -900.0  # nothing under the cut: the lowest mean
