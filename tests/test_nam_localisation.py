"""The NAM localisation check in bench/: NAMs peaking on the label score 1, NAMs peaking far away score 0."""

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts.data.dataset import load_split, prepare_dataset, slice_stem
from scripts.data.synthetic import SyntheticSource

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("nam_localisation", REPO / "bench" / "nam_localisation.py")
nam_localisation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nam_localisation)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small prepared synthetic dataset (it carries the lung masks that chance is measured in)."""
    out = tmp_path_factory.mktemp("data")
    prepare_dataset(SyntheticSource(n_cases=6, seed=1, size=96, n_slices=16), out, size=96, seed=1, workers=0)
    return out


def _write_nams(dataset: Path, out: Path, on_nodule: bool) -> int:
    """One NAM per test slice peaking at the label's centre of mass, or at the image corner; returns the count."""
    (out / "nams").mkdir(parents=True)
    items = load_split(dataset, "test", ("label",))
    for item in items:
        label = np.asarray(nib.load(item["label"]).dataobj) > 0
        nam = np.zeros(label.shape, np.float32)
        peak = tuple(int(round(c)) for c in ndimage.center_of_mass(label)) if on_nodule and label.any() else (0, 0)
        nam[peak] = 1.0
        nib.save(nib.Nifti1Image(nam, np.eye(4)), str(out / "nams" / f"{slice_stem(item['image'])}.nii.gz"))
    return sum(item["class"] == 1 for item in items)


def test_peak_on_the_nodule_and_far_from_it(dataset, tmp_path):
    n = _write_nams(dataset, tmp_path / "good", on_nodule=True)
    good = nam_localisation.nam_localisation(str(dataset), str(tmp_path / "good"), tolerance_px=2)
    assert good["nodule_slices"] == n > 0
    assert good["peak_inside"] == 1.0 and good["peak_within_tolerance"] == 1.0
    assert 0 < good["chance_within_tolerance"] < 0.5
    _write_nams(dataset, tmp_path / "bad", on_nodule=False)
    bad = nam_localisation.nam_localisation(str(dataset), str(tmp_path / "bad"), tolerance_px=2)
    assert bad["peak_inside"] == 0.0 and bad["peak_within_tolerance"] == 0.0
    assert bad["chance_within_tolerance"] == pytest.approx(good["chance_within_tolerance"])
    json.dumps(good)  # plain numbers, ready for the results file


def test_missing_nam_names_the_file(dataset, tmp_path):
    (tmp_path / "empty" / "nams").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no NAM for .*nii.gz"):
        nam_localisation.nam_localisation(str(dataset), str(tmp_path / "empty"))
