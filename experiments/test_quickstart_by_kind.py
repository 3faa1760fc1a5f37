"""experiments/quickstart_by_kind.py and experiments/oracle_quickstart.py: each test nodule slice gets the kind its
nodule was painted as, the counts per kind follow the predictions, and the oracle stage runs both rules on those
slices."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import oracle_quickstart
import pytest
import quickstart_by_kind
from scripts.data.dataset import load_split, prepare_dataset, slice_stem
from scripts.data.synthetic import SyntheticSource


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset with all three kinds of nodule, at least 8 mm so that each shows its density."""
    out = tmp_path_factory.mktemp("data")
    source = SyntheticSource(
        n_cases=24, seed=3, size=64, n_slices=16, min_diameter_mm=8.0, nodule_types_p=(0.34, 0.33, 0.33)
    )
    prepare_dataset(source, out, size=64, seed=3, workers=0, progress=False)
    return out


def _write_predictions(dataset: Path, out: Path, miss: str | None) -> None:
    """Records called positive and masks equal to the truth on every test slice, except empty masks on ``miss``'s."""
    kinds = quickstart_by_kind.slice_kinds(dataset)
    (out / "records").mkdir(parents=True)
    (out / "masks").mkdir()
    for item in load_split(dataset, "test", ("label",)):
        stem = slice_stem(item["image"])
        label = np.asarray(nib.load(item["label"]).dataobj)
        if kinds.get(f"{stem}.nii.gz") == miss:
            label = np.zeros_like(label)
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(out / "masks" / f"{stem}.nii.gz"))
        (out / "records" / f"{stem}.json").write_text(json.dumps({"positive": True}))


def test_kinds_are_the_painted_ones(dataset):
    kinds = quickstart_by_kind.slice_kinds(dataset)
    one_nodule = [i for i in load_split(dataset, "test") if i["class"] == 1 and i["nodules"] == 1]
    assert sorted(kinds) == sorted(Path(i["image"]).name for i in one_nodule)  # every one, by the writer's rule
    assert set(kinds.values()) == {"solid", "part-solid", "ground-glass"}
    median_hu = {kind: [] for kind in ("solid", "part-solid", "ground-glass")}
    for item in load_split(dataset, "test", ("label",)):
        kind = kinds.get(f"{slice_stem(item['image'])}.nii.gz")
        if kind:
            label = np.asarray(nib.load(item["label"]).dataobj) > 0
            median_hu[kind].append(float(np.median(np.asarray(nib.load(item["image"]).dataobj)[label])))
    # ground-glass at -800..-550 HU throughout, blurred into the parenchyma at its edge; solid at -10..60 HU, lowered
    # on a nodule's first and last slices by partial volume (a pixel here is 4.5 mm)
    assert all(-850.0 < hu < -500.0 for hu in median_hu["ground-glass"])
    assert np.median(median_hu["solid"]) > -300.0


def test_counts_follow_the_predictions(dataset, tmp_path):
    _write_predictions(dataset, tmp_path / "predictions" / "perfect", miss=None)
    _write_predictions(dataset, tmp_path / "predictions" / "no_ggo", miss="ground-glass")
    (tmp_path / "dataset").symlink_to(dataset)  # the layout of a quick start's --out
    result = quickstart_by_kind.main([str(tmp_path), "--out", str(tmp_path / "by_kind.json")])
    perfect, no_ggo = result["rows"]["perfect"], result["rows"]["no_ggo"]
    for kind, row in perfect.items():
        assert row["n"] == row["classifier_positive"] == row["found"] > 0 and row["tp_dice"] == 1.0
    assert no_ggo["ground-glass"]["found"] == 0 and no_ggo["ground-glass"]["tp_dice"] is None
    assert no_ggo["solid"] == perfect["solid"]
    assert json.loads((tmp_path / "by_kind.json").read_text())["rows"] == result["rows"]


def test_refuses_a_dataset_of_another_source(dataset, tmp_path):
    summary = json.loads((dataset / "dataset_summary.json").read_text())
    (tmp_path / "dataset_summary.json").write_text(json.dumps({**summary, "source": "lidc"}))
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        quickstart_by_kind.slice_kinds(tmp_path)


def test_oracle_stage_on_the_quick_start_slices(dataset, tmp_path):
    """experiments/oracle_quickstart.py runs the stage with an oracle NAM on every typed test slice under both rules."""
    (tmp_path / "dataset").symlink_to(dataset)
    result = oracle_quickstart.main([str(tmp_path), "--nam-sigma", "6", "--out", str(tmp_path / "oracle.json")])
    n = len(quickstart_by_kind.slice_kinds(dataset))
    fixed = result["results"]["quick start (fixed -600 HU cut)"]["ideal"]
    relative = result["results"]["defaults (100 HU above the parenchyma)"]["ideal"]
    for ideal in (fixed, relative):
        assert ideal["all"]["n"] == n and ideal["all solid"]["n"] >= 5
        assert ideal["all solid"]["detection"] >= 0.8  # the oracle scope holds the solid nodules
    # at 4.5 mm pixels "100 HU above the parenchyma" takes the partial-volume halo of the vessels and nodules along
    assert relative["all solid"]["median_area_ratio"] > fixed["all solid"]["median_area_ratio"]
    assert relative["all solid"]["best_tp_dice"] < fixed["all solid"]["best_tp_dice"]
    assert json.loads((tmp_path / "oracle.json").read_text())["nam_sigma_px"] == 6.0
