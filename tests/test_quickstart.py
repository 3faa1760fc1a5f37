"""The quick start, end to end at a reduced size: every step's outputs exist and the metrics are complete."""

import json

import pytest
from scripts.quickstart import QUICKSTART_SYNTHETIC, quickstart


def test_quickstart_runs_every_step(tmp_path):
    out = tmp_path / "qs"
    metrics = quickstart(out=str(out), cases=8, size=96, width=0.0625, epochs=1, batch_size=8)
    dataset = out / "dataset"
    assert (dataset / "datalist.json").is_file() and (dataset / "dataset_summary.json").is_file()
    assert (out / "models" / "model.pt").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    test_items = json.loads((dataset / "datalist.json").read_text())["test"]
    assert test_items
    for mode in ("coarse", "fine"):
        pred = out / "predictions" / f"1gap_{mode}"
        for item in test_items:
            stem = item["image"].split("/")[-1].removesuffix(".nii.gz")
            assert (pred / "masks" / f"{stem}.nii.gz").is_file() and (pred / "records" / f"{stem}.json").is_file()
    evaluation = out / "evaluation"
    assert (evaluation / "table1.md").is_file() and (evaluation / "fig3.png").stat().st_size > 1000
    assert metrics == json.loads((evaluation / "metrics.json").read_text())
    for name in ("1-GAP coarse", "1-GAP fine"):
        row = metrics["methods"][name]
        for key in ("TPR", "FPR", "FPR_nodule", "dice", "tp_dice", "tp_doa_mm2", "classification"):
            assert key in row
        # one-nodule slices (S+), clean slices (S-) and the two-nodule slices, which are scored on their own
        n_slices = row["counts"]["S+"] + row["counts"]["S-"] + row["two_nodules"]["slices"]
        assert n_slices == len(test_items)
        assert 0.0 <= row["TPR"] <= 1.0 and 0.0 <= row["FPR"] <= 1.0
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"prepare_s", "train_s", "segment_coarse_s", "segment_fine_s", "evaluate_s"}
    # the dataset is reused only with the settings it was made with (an older quick start's would mislead)
    summary = json.loads((dataset / "dataset_summary.json").read_text())
    assert summary["source_settings"]["min_diameter_mm"] == QUICKSTART_SYNTHETIC["min_diameter_mm"]
    datalist = (dataset / "datalist.json").stat().st_mtime_ns
    again = quickstart(out=str(out), cases=8, size=96, width=0.0625, epochs=1, batch_size=8)
    assert (dataset / "datalist.json").stat().st_mtime_ns == datalist  # reused, not rewritten
    assert again["methods"].keys() == metrics["methods"].keys()
    with pytest.raises(ValueError, match="prepared with other settings"):
        quickstart(out=str(out), cases=9, size=96, width=0.0625, epochs=1, batch_size=8)
