"""Every scan of a folder runs to the end: the nodule table's measurements cost memory linear in a component, and a
scan whose mask covers most of the lungs is written."""

import json
import resource
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from known_response import DomeNet
from monai.bundle import ConfigParser
from scripts.assemble import _largest_axial_diameter, axial_axis, nodule_table
from scripts.lung_mask import segment_lungs
from scripts.prepare import scans

SIZE = 64
# With DomeNet's NAM, which covers the window, coarse masks that are nearly all of the lungs: every ICM phase dense
# (the fixed cut below air), no trimming, splitting or least area
LUNGS = {
    "mode": "coarse",
    "dense_rule": "fixed",
    "dense_hu": -1100.0,
    "icm_in_scope": False,
    "trim_partial_volume": False,
    "split_mm": 0.0,
    "min_area_mm2": 0.0,
}


def _settings(size=SIZE):
    """The record of a model trained on ``size`` slices (no checkpoint needed: the network is given)."""
    settings = {"gap_levels": 1, "width": 1.0, "in_channels": 1, "head_channels": 1024, "batch_norm": False}
    return {**settings, "image_size": size, "pixel_spacing_mm": None, "hu_window": [-1000.0, 400.0], "context_mm": None}


def _parser(bundle_root, **overrides):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "model_settings": _settings(), "network": DomeNet(), **overrides})
    return parser


@contextmanager
def address_space_limit(extra_gib):
    """Allocations beyond ``extra_gib`` more than the process holds now fail with a MemoryError (Linux), so that a
    measurement that is not linear in the component fails the test instead of exhausting the machine."""
    if not Path("/proc/self/status").is_file():
        yield
        return
    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = held + int(extra_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _brute_force_diameter(component, affine, axis):
    """Largest distance between any two pixel corners of a slice, over the slices, all pairs in 3-D mm."""
    in_plane = [a for a in range(3) if a != axis]
    corners = np.array([[dx, dy] for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    best = 0.0
    for index in range(component.shape[axis]):
        pixels = np.argwhere(np.take(component, index, axis=axis)).astype(float)
        if len(pixels) == 0:
            continue
        voxels = np.zeros((4 * len(pixels), 3))
        voxels[:, in_plane] = (pixels[:, None, :] + corners[None]).reshape(-1, 2)
        points = voxels @ affine[:3, :3].T
        best = max(best, float(np.linalg.norm(points[:, None] - points[None], axis=-1).max()))
    return best


def test_largest_axial_diameter_equals_brute_force_on_small_components():
    """Random small components on anisotropic, permuted and slightly rotated grids: the hull of each row's end
    pixels in the slice's own plane gives the same diameter as all pairs of pixel corners."""
    rng = np.random.default_rng(0)
    angle = np.radians(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    grids = [
        np.diag([0.7, 0.7, 2.5]),
        np.diag([-0.6, 0.9, 5.0]),
        np.diag([0.8, 0.6, 3.0])[:, [2, 0, 1]],  # the axial axis first, as in a permuted volume
        rotation @ np.diag([0.7, 1.1, 2.0]),
    ]
    for trial in range(40):
        affine = np.eye(4)
        affine[:3, :3] = grids[trial % len(grids)]
        component = rng.random(rng.integers(2, 12, size=3)) < rng.uniform(0.2, 0.8)
        axis = axial_axis(affine)
        expected = _brute_force_diameter(component, affine, axis)
        assert _largest_axial_diameter(component, affine, axis) == pytest.approx(expected, abs=1e-9), trial


def test_large_component_is_measured_fast_in_little_memory():
    """A 300 x 300 pixel blob over 3 slices (all pairs of its 360,000 pixel corners asked for 2.8 TiB): its table row
    in a fraction of a second and under 64 MB (15 MB, mostly the list of its voxels), the diameter the blob's
    corner-to-corner diagonal."""
    mask = np.zeros((320, 320, 3), np.uint8)
    mask[10:310, 10:310] = 1
    affine = np.diag([0.7, 0.8, 5.0, 1.0])
    tracemalloc.start()
    start = time.perf_counter()
    try:
        rows = nodule_table(mask, affine, np.full(mask.shape, 0.9, np.float32), "coarse")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == 1 and rows[0]["largest_axial_diameter_mm"] == pytest.approx(np.hypot(210.0, 240.0), abs=0.01)
    assert seconds < 5.0 and peak < 64 * 2**20, (seconds, peak / 2**20)


def test_scan_whose_mask_covers_the_lungs_runs_to_the_end(bundle_root, tmp_path):
    """Every lung slice segmented (threshold 0) with a mask that is nearly all of the lungs (a NAM that covers the
    window, every phase dense, coarse mode): the scan is written, and its table agrees with the mask. No step may ask
    for 6 GiB more than the process holds: all pairs of the corners of a lung's slice (8,000 pixels at 1.1 mm) took
    24 GiB."""
    path = Path(scans(str(tmp_path / "scans"), cases=1, seed=4, size=256, n_slices=8)[0])
    overrides = {
        "model_settings": _settings(256),
        "input": str(path),
        "output_dir": str(tmp_path / "out"),
        "threshold": 0.0,
        "overview": False,
        **LUNGS,
    }
    with address_space_limit(6.0):
        summary = _parser(bundle_root, **overrides).get_parsed_content("evaluator").run()
    assert [d["name"] for d in summary["done"]] == [path.name[: -len(".nii.gz")]]
    name = summary["done"][0]["name"]
    result = json.loads((tmp_path / "out" / name / f"{name}_nodules.json").read_text())
    image = nib.load(path)
    mask = np.asarray(nib.load(tmp_path / "out" / name / f"{name}_mask.nii.gz").dataobj) > 0
    lungs = segment_lungs(np.clip(np.asarray(image.dataobj, np.float64), -1000, 400), image.header.get_zooms()[:3])
    assert (mask & lungs).sum() >= 0.8 * lungs.sum(), "the mask should cover most of the lungs"
    voxel_mm3 = float(np.prod(image.header.get_zooms()[:3]))
    assert sum(n["volume_mm3"] for n in result["nodules"]) == pytest.approx(mask.sum() * voxel_mm3, rel=1e-4)
    assert max(n["largest_axial_diameter_mm"] for n in result["nodules"]) > 100.0  # a lung's height, not a nodule's
