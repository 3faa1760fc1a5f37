"""Every scan of a folder runs to the end: the nodule table's measurements cost memory linear in a component, a scan
whose mask covers most of the lungs is written, and a scan that fails anywhere (post-processing, writing) is reported
by name while the others are written, with nothing of it left behind."""

import json
import resource
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from known_response import DomeNet, given_network_settings
from monai.bundle import ConfigParser
from monai.transforms import MapTransform
from scripts.data.prepare import scans
from scripts.pipeline.assemble import _largest_axial_diameter, axial_axis, nodule_table
from scripts.pipeline.lungs import segment_lungs
from scripts.pipeline.read import ScanError
from scripts.pipeline.settings import config_overrides
from scripts.pipeline.write import ScanWriter
from scripts.utils.io import write_folder_atomically

SIZE = 64
# With DomeNet's NAM, which covers the window, coarse masks that are nearly all of the lungs: every ICM phase dense
# (the fixed cut below air), no trimming, splitting or least area
LUNGS = {
    "mode": "coarse",
    **config_overrides(
        {
            "candidates": {
                "dense_rule": "fixed",
                "dense_hu": -1100.0,
                "icm_in_scope": False,
                "trim_partial_volume": False,
                "split_mm": 0.0,
                "min_area_mm2": 0.0,
            }
        }
    ),
}


def _parser(bundle_root, **overrides):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "model_settings": given_network_settings(SIZE),
            "network": DomeNet(),
            **overrides,
        }
    )
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
        "model_settings": given_network_settings(256),
        "input": str(path),
        "output_dir": str(tmp_path / "out"),
        "threshold": 0.0,
        "min_height_ratio": 0.0,  # the mask over the lungs of 8 slices is flat: kept, as this test needs it
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


class FailOnd(MapTransform):
    """A post-processing step that fails, as the diameter of a large component once did, on the scans named."""

    def __init__(self, names):
        super().__init__("pred")
        self.names = set(names)

    def __call__(self, data):
        if data["name"] in self.names:
            raise MemoryError("Unable to allocate 23.7 GiB for an array with shape (32600, 32600, 3)")
        return data


class FailingWriter(ScanWriter):
    """A ScanWriter whose overview, written after the mask and the CSV files, fails on the scans named."""

    def __init__(self, names, **kwargs):
        super().__init__(**kwargs)
        self.names = set(names)

    def _overview(self, path, data, result, name):
        if name in self.names:
            raise OSError(28, "No space left on device")
        super()._overview(path, data, result, name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three small synthetic scans."""
    root = tmp_path_factory.mktemp("scans")
    scans(str(root), cases=3, seed=5, size=SIZE, n_slices=8)
    return root


def _failing_run(bundle_root, source, out, post=(), write=(), **overrides):
    """The evaluator on ``source`` with a post-processing step failing on the scans ``post`` and a writer failing on
    the scans ``write``, both given through the config."""
    overrides = {"mode": "coarse", "threshold": 0.0, **overrides}
    parser = _parser(bundle_root, input=str(source), output_dir=str(out), **overrides)
    parser["postprocessing"]["transforms"].append(FailOnd(post))
    parser["writer"] = FailingWriter(write, output_dir=str(out), version="test")
    return parser.get_parsed_content("evaluator")


def test_failures_in_post_processing_and_writing_are_reported_and_the_others_written(
    bundle_root, folder, tmp_path, capsys
):
    out = tmp_path / "out"
    runner = _failing_run(bundle_root, folder, out, post=["SYN-0000"], write=["SYN-0001"])
    with pytest.raises(ScanError, match=r"2 of 3 scan\(s\) failed: SYN-0000; SYN-0001"):
        runner.run()
    log = capsys.readouterr()
    assert "SYN-0000: FAILED: MemoryError while post-processing: Unable to allocate 23.7 GiB" in log.out + log.err
    assert "SYN-0001: FAILED: OSError while writing: [Errno 28] No space left on device" in log.out + log.err
    summary = json.loads((out / "summary.json").read_text())
    assert [d["name"] for d in summary["done"]] == ["SYN-0002"]
    assert (out / "SYN-0002" / "SYN-0002_nodules.json").is_file()
    failed = {f["name"]: f for f in summary["failed"]}
    assert failed["SYN-0000"]["step"] == "post-processing" and "Unable to allocate" in failed["SYN-0000"]["reason"]
    assert failed["SYN-0001"]["step"] == "writing" and "No space left" in failed["SYN-0001"]["reason"]
    assert "_overview" in failed["SYN-0001"]["traceback"]  # where a bug is, for its report
    # nothing of the failed scans: no folder, no file, no temporary folder (SYN-0001's mask and CSVs were written)
    assert sorted(p.name for p in out.iterdir()) == ["SYN-0002", "summary.json"]


def test_a_failed_rewrite_keeps_the_earlier_outputs_whole(bundle_root, folder, tmp_path):
    """Re-running a finished scan with other settings (``skip_done`` False) when its writing now fails leaves the
    earlier outputs as they were, not the new mask and tables beside the old picture and JSON."""
    out, scan = tmp_path / "out", folder / "SYN-0001.nii.gz"
    _failing_run(bundle_root, scan, out).run()
    before = {p.name: p.read_bytes() for p in (out / "SYN-0001").iterdir()}
    rerun = _failing_run(bundle_root, scan, out, write=["SYN-0001"], skip_done=False, **LUNGS)
    with pytest.raises(ScanError, match=r"1 of 1 scan\(s\) failed: SYN-0001"):
        rerun.run()
    assert {p.name: p.read_bytes() for p in (out / "SYN-0001").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["SYN-0001", "summary.json"]


def test_a_scan_without_lungs_is_refused_naming_it(bundle_root, tmp_path, capsys):
    # a body of soft tissue in air (a phantom, or a scan of another region): nothing to classify
    rows, cols = np.mgrid[:SIZE, :SIZE]
    body = (rows - SIZE / 2) ** 2 + (cols - SIZE / 2) ** 2 < (0.4 * SIZE) ** 2
    hu = np.where(body, 40.0, -1000.0)[..., None] + np.random.default_rng(0).normal(0, 10, (SIZE, SIZE, 12))
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.diag([1.5, 1.5, 2.5, 1.0])), tmp_path / "phantom.nii.gz")
    out = tmp_path / "out"
    parser = _parser(bundle_root, input=str(tmp_path / "phantom.nii.gz"), output_dir=str(out))
    with pytest.raises(ScanError, match=r"1 of 1 scan\(s\) failed: phantom"):
        parser.get_parsed_content("evaluator").run()
    log = capsys.readouterr()
    assert "phantom: FAILED: " in log.out + log.err and "no lungs found (is it a chest CT?)" in log.out + log.err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


class Interrupted(ScanWriter):
    """A ScanWriter interrupted (Ctrl-C) while writing the overview, after the mask and the CSV files."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def _overview(self, path, data, result, name):
        self.seen.append(name)
        raise KeyboardInterrupt


def test_keyboard_interrupt_stops_the_run_leaving_nothing(bundle_root, folder, tmp_path):
    out = tmp_path / "out"
    parser = _parser(bundle_root, input=str(folder), output_dir=str(out), mode="coarse", threshold=0.0)
    writer = parser["writer"] = Interrupted(output_dir=str(out))
    with pytest.raises(KeyboardInterrupt):
        parser.get_parsed_content("evaluator").run()
    assert writer.seen == ["SYN-0000"] and list(out.iterdir()) == []


def test_folder_written_atomically(tmp_path):
    """A folder appears whole or not at all, and a failed rewrite keeps the earlier one."""
    target = tmp_path / "scan"
    with write_folder_atomically(target) as folder:
        (folder / "a.txt").write_text("first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"] and (target / "a.txt").read_text() == "first"
    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with write_folder_atomically(target) as folder:
                (folder / "a.txt").write_text("second")
                raise error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"] and (target / "a.txt").read_text() == "first"
    with write_folder_atomically(target) as folder:
        (folder / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


def test_flat_nodules_are_dropped_on_any_grid_orientation():
    """One slice 20 mm wide (a slice-wise false positive) goes; a 10 mm ball and a 4 mm dot on one slice stay."""
    from scripts.pipeline.assemble import drop_flat_nodules

    mask = np.zeros((60, 60, 20), bool)
    mask[5:25, 5:25, 3] = True  # 20 x 20 mm on one 2.5 mm slice: height / width 0.09
    x, y, z = np.mgrid[:60, :60, :20]
    mask |= (x - 40) ** 2 + (y - 40) ** 2 + ((z - 10) * 2.5) ** 2 <= 25  # a ball of 10 mm
    mask[10:14, 45:49, 15] = True  # 4 mm on one slice: 0.44
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    kept, dropped = drop_flat_nodules(mask, affine, 0.25)
    assert dropped == 1 and not kept[5:25, 5:25, 3].any() and kept.sum() == mask.sum() - 400
    assert drop_flat_nodules(mask, affine, 0.0)[1] == 0
    # the slices along the first voxel axis (a sagittal-first grid): the same answer
    permuted = np.moveaxis(mask, 2, 0)
    affine_p = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]], float)
    kept_p, dropped_p = drop_flat_nodules(permuted, affine_p, 0.25)
    assert dropped_p == 1 and np.array_equal(kept_p, np.moveaxis(kept, 2, 0))
