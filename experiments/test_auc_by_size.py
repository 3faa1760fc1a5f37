"""experiments/auc_by_size.py: each group's AUC against every clean slice, on scores whose answer is known."""

import csv
import json

import auc_by_size
import numpy as np
import pytest


def _write(tmp_path, slices):
    """A datalist's test split and a nodule_probability.csv for ``slices``: (label pixels, diameter, probability)."""
    items, rows = [], []
    for i, (pixels, diameter, probability) in enumerate(slices):
        image = f"images/s{i}.nii.gz"
        items.append(
            {
                "image": image,
                "class": int(pixels > 0),
                "label_pixels": pixels,
                "spacing_mm": [1.0, 2.0],
                "diameters_mm": [diameter] if pixels else [],
            }
        )
        rows.append([str(tmp_path / "dataset" / image), probability])
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "datalist.json").write_text(json.dumps({"test": items}))
    (tmp_path / "classification").mkdir()
    with open(tmp_path / "classification" / "nodule_probability.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def test_groups_by_area_and_diameter(tmp_path):
    clean = [(0, 0, p) for p in (0.1, 0.2, 0.3, 0.4)]
    small = [(5, 4.0, 0.25), (10, 8.0, 0.25)]  # 10 and 20 mm^2 at 2 mm^2 a pixel: ranked in the clean slices' middle
    large = [(40, 12.0, 0.9), (100, 20.0, 0.35)]  # 80 and 200 mm^2: above all clean slices, above three of four
    _write(tmp_path, clean + small + large)
    result = auc_by_size.main(
        [str(tmp_path / "dataset"), str(tmp_path / "classification"), "--name", "t", "--out", str(tmp_path / "r.json")]
    )
    by_area = {row["from"]: row for row in result["by_area_mm2"]}
    assert by_area[0.0] == {"from": 0.0, "to": 25.0, "slices": 2, "auc": 0.5}
    assert by_area[60.0]["slices"] == 1 and by_area[60.0]["auc"] == 1.0
    assert by_area[130.0]["slices"] == 1 and by_area[130.0]["auc"] == 0.75
    assert 25.0 not in by_area  # no nodule slice there
    by_diameter = {row["from"]: (row["slices"], row["auc"]) for row in result["by_diameter_mm"]}
    assert by_diameter == {0.0: (1, 0.5), 6.0: (1, 0.5), 10.0: (1, 1.0), 15.0: (1, 0.75)}
    # the overall AUC is the groups' AUCs weighted by their share of the nodule slices
    weighted = sum(row["slices"] * row["auc"] for row in result["by_area_mm2"]) / result["nodule_slices"]
    assert result["test_auc"] == pytest.approx(weighted) == pytest.approx(np.mean([0.5, 0.5, 1.0, 0.75]))
    assert json.loads((tmp_path / "r.json").read_text())["test_auc"] == result["test_auc"]


def test_a_slice_without_probability_is_named(tmp_path):
    _write(tmp_path, [(0, 0, 0.1), (20, 8.0, 0.9)])
    lines = (tmp_path / "classification" / "nodule_probability.csv").read_text().splitlines()
    (tmp_path / "classification" / "nodule_probability.csv").write_text(lines[0] + "\n")
    with pytest.raises(SystemExit, match="no probability for 1 test slices, e.g. .*s1.nii.gz"):
        auc_by_size.main([str(tmp_path / "dataset"), str(tmp_path / "classification"), "--name", "t"])
