"""The quick start, end to end at a reduced size: every step's outputs exist and the metrics are complete.

The short quick start (two rows) and the full one (all seven rows of Table 1) share one tiny synthetic dataset: the
full run reuses a copy of the short run's (a finished dataset of the same settings is reused as it is).
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.evaluation.evaluate import PAPER_ORDER
from scripts.pipeline.settings import CandidateSettings
from scripts.quickstart import (
    PAPER_ACCURACY,
    PAPER_TABLE1,
    QUICKSTART_SPECIFICITY,
    QUICKSTART_SYNTHETIC,
    quickstart,
)
from trained_classifier import nodule_probability, prepared_slice, trained_classifier

from conftest import BUNDLE

TINY = {"cases": 8, "size": 96, "width": 0.0625, "epochs": 1, "batch_size": 8, "max_panels": 1}
TINY_UNET = {"unet_features": (4, 4, 8, 8, 16, 4), "unet_batch_size": 8}
SEVEN_ROWS = [name for name in PAPER_ORDER if name != "multi-GAP"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The short quick start at a tiny size, with everything it printed (Python and worker processes alike)."""
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    return out, quickstart(out=str(out), **TINY)


def test_quickstart_runs_every_step(short_run):
    out, metrics = short_run
    dataset = out / "dataset"
    assert (dataset / "datalist.json").is_file() and (dataset / "dataset_summary.json").is_file()
    assert (out / "models" / "model.pt").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    test_items = json.loads((dataset / "datalist.json").read_text())["test"]
    assert test_items
    for mode in ("coarse", "fine"):
        pred = out / "predictions" / f"2gap_{mode}"
        for item in test_items:
            stem = item["image"].split("/")[-1].removesuffix(".nii.gz")
            assert (pred / "masks" / f"{stem}.nii.gz").is_file() and (pred / "records" / f"{stem}.json").is_file()
    evaluation = out / "evaluation"
    assert (evaluation / "table1.md").is_file() and (evaluation / "fig3.png").stat().st_size > 1000
    assert metrics == json.loads((evaluation / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["2-GAP model coarse", "2-GAP model fine"]
    for name in ("2-GAP model coarse", "2-GAP model fine"):
        row = metrics["methods"][name]
        for key in ("TPR", "FPR", "FPR_nodule", "dice", "tp_dice", "tp_doa_mm2", "classification"):
            assert key in row
        # one-nodule slices (S+), clean slices (S-) and the two-nodule slices, which are scored on their own
        n_slices = row["counts"]["S+"] + row["counts"]["S-"] + row["two_nodules"]["slices"]
        assert n_slices == len(test_items)
        assert 0.0 <= row["TPR"] <= 1.0 and 0.0 <= row["FPR"] <= 1.0
    # each row's figures counted here from the masks and labels on disk; its records' probabilities are the trained
    # model's own on each slice
    network = trained_classifier(out / "models" / "model.pt")
    assert network.gap_levels == 2  # the quick start's classifier: conv4_3 and conv5_3 heads
    record = torch.load(out / "models" / "model.pt", weights_only=True)["config"]
    threshold = record["threshold"]
    assert (
        record["threshold_rule"]
        == f"validation specificity {QUICKSTART_SPECIFICITY:g}"
        == "validation specificity 0.95"
    )
    for mode in ("coarse", "fine"):
        row, pred = metrics["methods"][f"2-GAP model {mode}"], out / "predictions" / f"2gap_{mode}"
        outcomes, dice, called = [], [], []
        for item in test_items:
            stem = item["image"].split("/")[-1].removesuffix(".nii.gz")
            probability = json.loads((pred / "records" / f"{stem}.json").read_text())["probability"]
            hu = prepared_slice(dataset / item["image"])
            assert probability == pytest.approx(nodule_probability(network, hu), abs=1e-5), stem
            called.append((probability >= threshold) == (item["class"] == 1))
            if item["nodules"] >= 2:
                continue
            mask = np.asarray(nib.load(pred / "masks" / f"{stem}.nii.gz").dataobj) > 0
            label = np.asarray(nib.load(dataset / item["label"]).dataobj) > 0
            if label.any():
                outcomes.append("TP" if (mask & label).any() else ("FP_nodule" if mask.any() else "FN"))
                dice.append(2 * (mask & label).sum() / (mask.sum() + label.sum()))
            else:
                outcomes.append("FP" if mask.any() else "TN")
        counts = {k: outcomes.count(k) for k in ("TP", "FN", "FP", "TN")}
        assert dice and counts["FP"] + counts["TN"] > 0  # slices of both classes
        assert [row["counts"][k] for k in ("TP", "FN", "FP")] == [counts["TP"], counts["FN"], counts["FP"]]
        assert row["TPR"] == pytest.approx(counts["TP"] / len(dice))
        assert row["FPR"] == pytest.approx(counts["FP"] / (counts["FP"] + counts["TN"]))
        assert row["dice"]["mean"] == pytest.approx(np.mean(dice))
        assert row["classification"]["accuracy"] == pytest.approx(np.mean(called))
    for mode in ("coarse", "fine"):  # the quick start's own candidate rule reached the segmentations
        used = json.loads((out / "predictions" / f"2gap_{mode}" / "settings.json").read_text())["segmenter"]
        assert used["mode"] == mode and used["candidates"]["dense_rule"] == "fixed" != CandidateSettings().dense_rule
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"prepare_s", "train_s", "classify_s", "segment_coarse_s", "segment_fine_s", "evaluate_s"}
    # the classifier's report (AUC, accuracy, where the NAM looks) and its picture, from configs/classify.json
    report = json.loads((out / "classification" / "classifier_report.json").read_text())
    assert report["slices"] == len(test_items) and report["nodule_slices"] == sum(i["class"] for i in test_items)
    assert (out / "classification" / "nam_sheet.png").stat().st_size > 10_000
    # the dataset is reused only with the settings it was made with (an older quick start's would mislead)
    summary = json.loads((dataset / "dataset_summary.json").read_text())
    assert summary["source_settings"]["min_diameter_mm"] == QUICKSTART_SYNTHETIC["min_diameter_mm"]
    datalist = (dataset / "datalist.json").stat().st_mtime_ns
    # again from the command line, as a user would, with everything it prints (worker processes too) in one log
    command = [sys.executable, "-m", "scripts.quickstart", "--out", str(out)]
    for key, value in TINY.items():
        command += [f"--{key}", str(value)]
    done = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert (dataset / "datalist.json").stat().st_mtime_ns == datalist  # reused, not rewritten
    again = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert again["methods"].keys() == metrics["methods"].keys()
    # one line per stage instead of a line per iteration; the warnings that do not concern the user are gone
    assert "train 2-GAP: 7 iterations" in log and "segment coarse: " in log and "segment fine: " in log
    # the classifier's figures, printed as its report (rewritten by this run) says them
    report = json.loads((out / "classification" / "classifier_report.json").read_text())
    assert f"test AUC {report['auc']:.3f}" in log and f"on {100 * report['peak_near']:.1f} % of" in log
    for noise in (
        "Iter:",
        "parsing config_file",
        "pkg_resources",
        "GradScaler",
        "autocast",
        "nvImageCodec",
        "input summary",
    ):
        assert noise not in log, noise
    assert len(log) < 8000, len(log)
    with pytest.raises(ValueError, match="prepared with other settings"):
        quickstart(out=str(out), **{**TINY, "cases": 9})


def _finite_row(row):
    """Every Table 1 figure of a row is a finite number; TP Dice and TP DOA exist exactly when there are TP slices."""
    for key in ("TPR", "FPR", "FPR_nodule"):
        assert math.isfinite(row[key]), key
    assert math.isfinite(row["dice"]["mean"]) and math.isfinite(row["dice"]["sd"])
    has_tp = row["counts"]["TP"] > 0
    for key in ("tp_dice", "tp_doa_mm2"):
        if has_tp:
            assert math.isfinite(row[key]["mean"]) and math.isfinite(row[key]["sd"]), key
        else:
            assert row[key]["mean"] is None, key


def test_full_quickstart_gives_seven_rows_and_resumes(short_run, tmp_path, capsys):
    out = tmp_path / "full"
    # the short run's tiny dataset, reused as it is (same settings), saves preparing it again
    shutil.copytree(short_run[0] / "dataset", out / "dataset")
    summary = quickstart(out=str(out), full=True, **TINY, **TINY_UNET)
    methods = summary["metrics"]["methods"]
    assert list(methods) == SEVEN_ROWS
    for name in SEVEN_ROWS:
        _finite_row(methods[name])
    test_items = json.loads((out / "dataset" / "datalist.json").read_text())["test"]
    for name, row in methods.items():
        assert row["counts"]["S+"] + row["counts"]["S-"] + row["two_nodules"]["slices"] == len(test_items), name
    accuracy = summary["classifiers"]
    assert list(accuracy) == ["1-GAP", "2-GAP", "3-GAP"]
    classes = np.array([i["class"] for i in test_items])
    assert 0 < classes.sum() < len(classes)
    for k in (1, 2, 3):  # each classifier's own calls on the test slices: accuracy at 0.5, and the AUC by its pairs
        network = trained_classifier(out / "models" / f"gap{k}" / "model.pt")
        assert network.gap_levels == k
        p = np.array([nodule_probability(network, prepared_slice(out / "dataset" / i["image"])) for i in test_items])
        pairs = p[classes == 1][:, None] - p[classes == 0][None, :]
        assert accuracy[f"{k}-GAP"]["slices"] == len(test_items)
        assert accuracy[f"{k}-GAP"] == json.loads(
            (out / "classification" / f"gap{k}" / "classifier_report.json").read_text()
        )
        record = torch.load(out / "models" / f"gap{k}" / "model.pt", weights_only=True)["config"]
        threshold = record["threshold"]
        assert accuracy[f"{k}-GAP"]["threshold"] == threshold
        # the 3-GAP classifier starts from the trained 2-GAP one (from scratch it did not train), the others fresh
        assert record["initial_weights"] == (str(out / "models" / "gap2" / "model.pt") if k == 3 else None), k
        assert accuracy[f"{k}-GAP"]["accuracy"] == pytest.approx(np.mean((p >= threshold) == (classes == 1))), k
        assert accuracy[f"{k}-GAP"]["auc"] == pytest.approx(np.mean((pairs > 0) + 0.5 * (pairs == 0))), k
    # the 2-/3-GAP rows ran the multi-GAP modes (their records keep the 1-GAP scope C1 beside the refined C), the
    # 1-GAP rows the plain ones; a 2-/3-GAP checkpoint paired with the wrong multi_gap_levels would not load
    for name, row in methods.items():
        if name == "U-Net":
            continue
        records = [json.loads(p.read_text()) for p in sorted((Path(row["predictions"]) / "records").glob("*.json"))]
        assert len(records) == len(test_items)
        screened = [r for r in records if r["positive"]]
        assert screened and all((r["base_scope_box"] is not None) == name.startswith(("2-", "3-")) for r in screened)
        used = json.loads((Path(row["predictions"]) / "settings.json").read_text())["segmenter"]
        assert used["candidates"]["dense_rule"] == "fixed", name
    report = (out / "report.md").read_text()
    assert report in capsys.readouterr().out  # printed, and written
    for name, paper in PAPER_TABLE1.items():
        assert f"| {name} | paper (LIDC-IDRI) | {paper[0]:.2f} |" in report
    for k, acc in PAPER_ACCURACY.items():
        assert f"| {k}-GAP | {accuracy[f'{k}-GAP']['accuracy']:.3f} | {acc:.3f} |" in report
    assert "two-nodule slices" in report and "Fig. 3" in report and "all steps" in report
    assert json.loads((out / "summary.json").read_text())["all_steps_s"] == summary["all_steps_s"]
    steps = sorted(p.stem for p in (out / "steps").glob("*.json"))
    assert len(steps) == 1 + 4 + 3 + 7 + 1 and summary["skipped_steps"] == []

    # a rerun redoes nothing; after an interruption only the unfinished steps run, their partial outputs removed
    checkpoint = out / "models" / "gap3" / "model.pt"
    stamp = checkpoint.stat().st_mtime_ns
    again = quickstart(out=str(out), full=True, **TINY, **TINY_UNET)
    assert sorted(again["skipped_steps"]) == steps and checkpoint.stat().st_mtime_ns == stamp
    assert again["metrics"] == summary["metrics"]
    (out / "steps" / "segment_unet.json").unlink()
    (out / "steps" / "evaluate.json").unlink()
    stale = out / "predictions" / "unet" / "masks" / "left-by-an-interrupted-run.nii.gz"
    stale.write_bytes(b"")
    resumed = quickstart(out=str(out), full=True, **TINY, **TINY_UNET)
    assert set(steps) - set(resumed["skipped_steps"]) == {"segment_unet", "evaluate"}
    assert not stale.exists() and checkpoint.stat().st_mtime_ns == stamp
    assert resumed["metrics"]["methods"]["U-Net"]["TPR"] == methods["U-Net"]["TPR"]
    with pytest.raises(ValueError, match="other settings"):
        quickstart(out=str(out), full=True, **{**TINY, "epochs": 2}, **TINY_UNET)


def test_step_markers_skip_finished_steps_and_clear_unfinished_ones(tmp_path, capsys):
    from scripts.quickstart import _step

    calls = []
    partial = tmp_path / "predictions" / "unet"
    partial.mkdir(parents=True)
    (partial / "half-written.nii.gz").write_bytes(b"")

    def work():
        assert not partial.exists()  # what an interrupted attempt left is gone before the step runs again
        partial.mkdir(parents=True)
        calls.append(1)

    first = _step(tmp_path, "segment_unet", {"epochs": 1}, [partial], work)
    assert calls == [1] and not first["skipped"] and (tmp_path / "steps" / "segment_unet.json").is_file()
    again = _step(tmp_path, "segment_unet", {"epochs": 1}, [partial], work)
    assert calls == [1] and again["skipped"] and again["seconds"] == first["seconds"]
    assert "segment_unet: finished in an earlier run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings"):
        _step(tmp_path, "segment_unet", {"epochs": 2}, [partial], work)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _step(tmp_path, "evaluate", {"epochs": 1}, [], interrupted)
    assert not (tmp_path / "steps" / "evaluate.json").exists()  # no marker: the next run redoes it
    (tmp_path / "steps" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        _step(tmp_path, "broken", {"epochs": 1}, [], work)


def test_quickstart_with_a_1gap_classifier_gives_the_papers_rows(short_run, tmp_path):
    # --gap_levels 1: the 0.6.0 quick start's classifier, whose rows are the paper's 1-GAP rows
    out = tmp_path / "qs1"
    shutil.copytree(short_run[0] / "dataset", out / "dataset")  # the same settings: reused as it is
    metrics = quickstart(out=str(out), gap_levels=1, **TINY)
    assert list(metrics["methods"]) == ["1-GAP coarse", "1-GAP fine"]
    assert trained_classifier(out / "models" / "model.pt").gap_levels == 1
    assert all((out / "predictions" / f"1gap_{mode}" / "masks").is_dir() for mode in ("coarse", "fine"))
