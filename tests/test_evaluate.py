"""The evaluation command on a hand-made split and hand-made predictions of two methods."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread
from scripts.data.dataset import load_split
from scripts.evaluation.evaluate import SegmentationEvaluation, order_methods, plot_fig3

SHAPE = (16, 16)


def box(*boxes):
    m = np.zeros(SHAPE, dtype=np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 1
    return m


def write_nifti(path, array, spacing=(1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([spacing[0], spacing[1], 1.0, 1.0])), str(path))


# stem: (label, spacing, class, nodules, diameters, 1-GAP coarse mask, U-Net mask, 1-GAP coarse probability)
CASES = {
    # TP: dice 2*16/(24+16) = 0.8, DOA 8 px * 0.25 mm^2 = 2 mm^2 (U-Net: the same)
    "a_1": (box((2, 6, 2, 6)), (0.5, 0.5), 1, 1, [4.0], box((2, 6, 2, 8)), box((2, 6, 2, 8)), 0.9),
    # TP: dice 2*8/(8+16) = 2/3, DOA 8 px * 2 mm^2 = 16 mm^2; U-Net adds an unmatched 4 px component:
    # dice 2*8/(12+16) = 4/7, DOA 4 px * 2 mm^2 = 8 mm^2
    "b_2": (box((4, 8, 4, 8)), (1.0, 2.0), 1, 1, [12.0], box((4, 8, 4, 6)), box((4, 8, 4, 6), (12, 14, 12, 14)), 0.8),
    # 1-GAP coarse: FN; U-Net: FP_nodule under both readings
    "c_3": (box((2, 6, 2, 6)), (1.0, 1.0), 1, 1, [4.0], box(), box((10, 12, 10, 12)), 0.3),
    # negatives: 1-GAP coarse FP then TN; U-Net TN twice
    "d_4": (box(), (1.0, 1.0), 0, 0, [], box((0, 1, 0, 1)), box(), 0.6),
    "e_5": (box(), (1.0, 1.0), 0, 0, [], box(), box(), 0.1),
    # two nodules: 1-GAP coarse finds one, U-Net both
    "f_6": (
        box((1, 3, 1, 3), (10, 12, 10, 12)),
        (1.0, 1.0),
        1,
        2,
        [3.5, 4.5],
        box((1, 2, 1, 2)),
        box((1, 12, 1, 12)),
        0.7,
    ),
}


@pytest.fixture
def dataset(tmp_path):
    root, preds = tmp_path / "data", {"1-GAP coarse": tmp_path / "gap", "U-Net": tmp_path / "unet"}
    items = []
    for stem, (label, spacing, cls, nodules, diameters, gap, unet, prob) in CASES.items():
        write_nifti(root / "images" / f"{stem}.nii.gz", np.full(SHAPE, -800, np.int16), spacing)
        write_nifti(root / "labels" / f"{stem}.nii.gz", label, spacing)
        write_nifti(preds["1-GAP coarse"] / "masks" / f"{stem}.nii.gz", gap, spacing)
        write_nifti(preds["U-Net"] / "masks" / f"{stem}.nii.gz", unet, spacing)
        (preds["1-GAP coarse"] / "records").mkdir(exist_ok=True)
        (preds["1-GAP coarse"] / "records" / f"{stem}.json").write_text(json.dumps({"probability": prob}))
        subject, index = stem.split("_")
        items.append(
            {
                "image": f"images/{stem}.nii.gz",
                "label": f"labels/{stem}.nii.gz",
                "class": cls,
                "subject": subject,
                "slice": int(index),
                "nodules": nodules,
                "diameters_mm": diameters,
            }
        )
    datalist = {"training": items[:1], "validation": [], "test": items}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root, {k: str(v) for k, v in preds.items()}


def check_outputs(out_dir):
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["1-GAP coarse", "U-Net"]  # the paper's order, not the given one
    gap, unet = metrics["methods"]["1-GAP coarse"], metrics["methods"]["U-Net"]

    assert gap["fp_nodule_rule"] == "exclusive" and unet["fp_nodule_rule"] == "component"
    assert gap["counts"] == {
        "S+": 3,
        "S-": 2,
        "TP": 2,
        "FN": 1,
        "FP": 1,
        "FP_nodule_exclusive": 0,
        "FP_nodule_component": 0,
        "FP_nodule": 0,
    }
    assert gap["TPR"] == pytest.approx(2 / 3) and gap["FPR"] == 0.5 and gap["FPR_nodule"] == 0.0
    gap_dice = [0.8, 2 / 3, 0.0]
    assert gap["dice"]["mean"] == pytest.approx(np.mean(gap_dice)) and gap["dice"]["sd"] == pytest.approx(
        np.std(gap_dice)
    )
    assert gap["tp_dice"]["mean"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert (gap["tp_doa_mm2"]["mean"], gap["tp_doa_mm2"]["sd"]) == (pytest.approx(9.0), pytest.approx(7.0))
    assert gap["two_nodules"] == {"slices": 1, "both": 0, "one": 1, "none": 0}
    # probabilities >= 0.5 call a, b, d, f "nodule": right on a, b, e, f; AUC 7 of 8 pairs
    assert gap["classification"] == {"accuracy": pytest.approx(4 / 6), "auc": pytest.approx(7 / 8), "n": 6}
    dice_bins = gap["by_diameter"]["tp_dice"]
    assert [b["n"] for b in dice_bins] == [1, 0, 1] and dice_bins[0]["mean"] == pytest.approx(0.8)
    assert gap["by_diameter"]["tp_doa_mm2"][2]["mean"] == pytest.approx(16.0)
    assert gap["by_diameter"]["nodule_slices"] == unet["by_diameter"]["nodule_slices"] == [2, 0, 1]  # a, c; none; b

    assert unet["counts"]["TP"] == 2 and unet["counts"]["FN"] == 0 and unet["counts"]["FP"] == 0
    assert (unet["counts"]["FP_nodule_exclusive"], unet["counts"]["FP_nodule_component"]) == (1, 2)
    assert unet["FPR_nodule"] == pytest.approx(2 / 3) and unet["FPR"] == 0.0
    assert unet["tp_dice"]["mean"] == pytest.approx((0.8 + 4 / 7) / 2)
    assert unet["tp_doa_mm2"]["mean"] == pytest.approx((2 + 8) / 2)
    assert unet["two_nodules"]["both"] == 1 and unet["classification"] is None
    assert len(unet["slices"]) == 6 and unet["slices"][0]["stem"] == "a_1"

    table = (out_dir / "table1.md").read_text().splitlines()
    gap_sd = np.std(gap_dice)
    assert table[0].startswith("| Method | TPR | FPR | FPR_nodule | Dice | TP Dice | TP DOA")
    assert table[2] == f"| 1-GAP coarse | 0.67 | 0.50 | 0.00 | 0.49 ± {gap_sd:.2f} | 0.73 ± 0.07 | 9.0 ± 7.0 |"
    assert table[3].startswith("| U-Net | 0.67 | 0.00 | 0.67 | ")
    assert any("U-Net: component" in line for line in table)
    assert "| 1-GAP coarse | 1 | 0 | 1 | 0 | 0.667 | 0.875 |" in table

    image = imread(out_dir / "fig3.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_python_api(dataset, tmp_path):
    root, preds = dataset
    out = tmp_path / "out"
    result = SegmentationEvaluation(
        root,
        {"U-Net": preds["U-Net"], "1-GAP coarse": preds["1-GAP coarse"]},
        out,
        fp_nodule_rules={"U-Net": "component"},
        diameter_bins_mm=[3, 5, 10, 20],
    ).run()
    assert result["slices"] == 6
    check_outputs(out)


def test_bundle_run_from_repo_root(dataset, tmp_path, bundle_root):
    root, preds = dataset
    out = tmp_path / "cli"
    args = {"dataset_dir": str(root), "predictions": preds, "output_dir": str(out), "diameter_bins_mm": [3, 5, 10, 20]}
    (tmp_path / "args.json").write_text(json.dumps(args))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/evaluate.json"]
    cmd += ["--bundle_root", "bundle", "--args_file", str(tmp_path / "args.json")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=bundle_root.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_outputs(out)
    # the command says what it found and where it wrote it
    table = (out / "table1.md").read_text()
    assert table.strip() in proc.stdout
    for name in ("table1.md", "metrics.json", "fig3.png"):
        assert f"wrote {out / name}" in proc.stdout


def test_fig3_shows_n_per_bin_and_marks_empty_bins(dataset, tmp_path):
    root, preds = dataset
    result = SegmentationEvaluation(root, preds, tmp_path / "out", diameter_bins_mm=[3, 5, 10, 20]).run()
    fig = plot_fig3(result["methods"], tmp_path / "fig3.png")
    for ax in fig.axes:
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["3-5\nn=2", "5-10\nn=0", "10-20\nn=1"]
        texts = [t.get_text() for t in ax.texts]
        assert texts.count("no nodule slices") == 1  # the 5-10 mm bin
        assert sorted(texts) == ["1", "1", "1", "1", "no nodule slices"]  # TP slices beside each point (a; b)
    assert imread(tmp_path / "fig3.png").shape[0] > 100

    # a bin with nodule slices that a method missed entirely says so
    stats = [{"low_mm": 3.0, "high_mm": 5.0, "n": 2, "mean": 0.7, "sd": 0.1}]
    stats += [{"low_mm": lo, "high_mm": hi, "n": 0, "mean": None, "sd": None} for lo, hi in ((5.0, 10.0), (10.0, 20.0))]
    summary = {"by_diameter": {"tp_dice": stats, "tp_doa_mm2": stats, "nodule_slices": [3, 4, 0]}}
    fig = plot_fig3({"1-GAP fine": summary}, tmp_path / "missed.png")
    for ax in fig.axes:
        assert sorted(t.get_text() for t in ax.texts) == ["0 TP", "2", "no nodule slices"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["3-5\nn=3", "5-10\nn=4", "10-20\nn=0"]


def test_errors_name_the_problem(dataset, tmp_path):
    root, preds = dataset
    out = tmp_path / "err"
    with pytest.raises(ValueError, match="no split 'tests'"):
        load_split(root, "tests")
    with pytest.raises(ValueError, match="'validation' .* is empty"):
        load_split(root, "validation")
    with pytest.raises(FileNotFoundError, match="no datalist"):
        load_split(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="fp_nodule_rule"):
        SegmentationEvaluation(root, preds, out, fp_nodule_rules={"U-Net": "slice"})

    os.remove(os.path.join(preds["U-Net"], "masks", "c_3.nii.gz"))
    with pytest.raises(FileNotFoundError, match="missing mask: .*unet/masks/c_3.nii.gz"):
        SegmentationEvaluation(root, {"U-Net": preds["U-Net"]}, out).run()
    write_nifti(tmp_path / "unet" / "masks" / "c_3.nii.gz", np.zeros((16, 15), np.uint8))
    with pytest.raises(ValueError, match="c_3.nii.gz: shape"):
        SegmentationEvaluation(root, {"U-Net": preds["U-Net"]}, out).run()

    os.remove(os.path.join(preds["1-GAP coarse"], "records", "e_5.json"))
    with pytest.raises(FileNotFoundError, match="missing record.*e_5.json"):
        SegmentationEvaluation(root, {"1-GAP coarse": preds["1-GAP coarse"]}, out).run()
    assert not out.exists()  # nothing half-written


def test_order_methods():
    names = ["U-Net", "custom", "3-gap fine", "1-GAP coarse", "multi-GAP"]
    assert order_methods(names) == ["1-GAP coarse", "3-gap fine", "multi-GAP", "U-Net", "custom"]
