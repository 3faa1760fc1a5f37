"""Panels that answer "was the nodule found?": the ground truth drawn, outcomes and subjects sampled, all-negative said.

The ground truth is drawn in lime, a colour nothing else in a panel's image sub-panels uses, so counting pure lime
pixels there tells whether it was drawn.
"""

import json
import logging

import nibabel as nib
import numpy as np
import torch
from matplotlib.image import imread
from monai.bundle import run
from monai.data import MetaTensor
from scripts.evaluation.panels import OUTCOMES, panel_outcome, save_panel
from scripts.evaluation.slice_writer import PredictionWriter
from scripts.integration.config_runs import SLICE_INFERENCE, config_files
from scripts.networks.gap_classifier import GAPClassifier

SIZE = 32


def lime_pixels(png, part: str = "image") -> int:
    """Pure lime pixels in one sub-panel (``image``: the first, ``result``: the last), above the legend strip."""
    rgb = np.round(imread(png)[..., :3] * 255).astype(int)
    height, width = rgb.shape[:2]
    cols = slice(0, width // 4) if part == "image" else slice(3 * width // 4, width)
    region = rgb[: int(0.9 * height), cols]
    return int(np.all(region == (0, 255, 0), axis=-1).sum())


def square(r, c, half=3, shape=(SIZE, SIZE)):
    m = np.zeros(shape, np.uint8)
    m[r - half : r + half + 1, c - half : c + half + 1] = 1
    return m


def test_save_panel_draws_the_ground_truth_and_lists_the_scores(tmp_path):
    hu = np.full((SIZE, SIZE), -850.0)
    hu[10:17, 10:17] = 30.0
    label, cands = square(13, 13), square(13, 13).astype(int) + 2 * square(24, 24, 2)
    args = (hu, np.random.default_rng(0).normal(size=(SIZE, SIZE)), square(16, 16, 10), cands, [0], square(13, 13))
    save_panel(tmp_path / "gt.png", *args, label=label, scores=[0.25, 0.05], areas_mm2=[49.0, 25.0])
    save_panel(tmp_path / "no_gt.png", *args, label=None, scores=[0.25, 0.05], areas_mm2=[49.0, 25.0])
    assert lime_pixels(tmp_path / "gt.png", "image") > 20 and lime_pixels(tmp_path / "gt.png", "result") > 20
    assert lime_pixels(tmp_path / "no_gt.png", "image") == 0 and lime_pixels(tmp_path / "no_gt.png", "result") == 0
    assert lime_pixels(tmp_path / "gt.png", "image") > 3 * lime_pixels(tmp_path / "gt.png", "result") / 4
    # an empty ground truth draws nothing in lime either
    save_panel(tmp_path / "clean.png", *args, label=np.zeros((SIZE, SIZE), np.uint8))
    assert lime_pixels(tmp_path / "clean.png", "image") == 0


def test_panel_outcomes():
    gt, elsewhere, none = square(10, 10), square(25, 25), np.zeros((SIZE, SIZE), np.uint8)
    assert panel_outcome(gt, gt, "segmented") == "TP"
    assert panel_outcome(none, gt, "negative") == "miss" and panel_outcome(none, gt, "no_candidates") == "miss"
    assert panel_outcome(elsewhere, gt, "segmented") == "wrong place"
    assert panel_outcome(elsewhere, none, "segmented") == "FP"
    assert panel_outcome(elsewhere, None, "segmented") == "segmented"
    assert panel_outcome(none, none, "no_scope") == "nothing segmented"
    assert panel_outcome(none, none, "negative") is None and panel_outcome(none, None, "negative") is None


def write_slice(root, stem, label, nodule=None):
    """A slice at -850 HU with a 30 HU ``nodule`` (default: where ``label`` is), and its label file."""
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    image = np.where((label if nodule is None else nodule) > 0, 30, -850).astype(np.int16)
    for folder, array in (("images", image), ("labels", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(root / folder / f"{stem}.nii.gz"))
    return str(root / "images" / f"{stem}.nii.gz"), str(root / "labels" / f"{stem}.nii.gz")


def hand_made_item(root, stem, label, mask, status="segmented", probability=0.9):
    """A decollated item as the postprocessing leaves it (the segmenter's named outputs), and its batch item naming the
    label file."""
    image, label_path = write_slice(root, stem, label)

    def plane(a):
        return MetaTensor(torch.as_tensor(np.asarray(a, np.float32))[None], meta={"filename_or_obj": image})

    cands = mask.astype(np.float32)
    result = {
        "probability": probability,
        "status": status,
        "chosen": [0] if mask.any() else [],
        "candidates": [{"area_mm2": float(mask.sum() * 0.64), "bbox": [0, 0, 1, 1], "rnam_score": 1.0}]
        * int(mask.any()),
        "scope_refined": False,
        "base_scope_box": None,
    }
    item = {"image": plane(np.zeros_like(label)), "mask": plane(mask), "nam": plane(np.zeros_like(label))}
    item.update({"scope": plane(np.ones_like(label)), "candidates": plane(cands), "record": json.dumps(result)})
    item["label"] = None
    return item, {"image": image, "label": label_path}


def test_panels_span_outcomes_and_subjects(tmp_path):
    gt, elsewhere, none = square(10, 10), square(24, 24), np.zeros((SIZE, SIZE), np.uint8)
    cases = [(f"A_{i:04d}", gt, gt) for i in range(10)]  # ten consecutive TP slices of one nodule
    cases += [("B_0001", gt, gt), ("C_0001", gt, gt)]  # one TP slice each in two other subjects
    cases += [("D_0001", none, elsewhere), ("D_0002", none, elsewhere), ("E_0001", gt, none), ("F_0001", gt, elsewhere)]
    cases += [(f"G_{i:04d}", none, none) for i in range(5)]  # called negative, nothing there: no panel
    writer = PredictionWriter(str(tmp_path / "out"), max_panels=6)
    for stem, label, mask in cases:
        item, batch_item = hand_made_item(
            tmp_path / "data", stem, label, mask, "segmented" if mask.any() else "negative"
        )
        writer.write_item(item, batch_item)
    index = writer.write_panels()
    assert index["outcomes"] == {"TP": 12, "miss": 1, "wrong place": 1, "FP": 2, "segmented": 0, "nothing segmented": 0}
    outcomes = [p["outcome"] for p in index["panels"]]
    # one of each outcome in turn (the next TP from another subject): not a run of slices of subject A
    assert outcomes == ["TP", "miss", "wrong place", "FP", "TP", "FP"]
    tp_subjects = [p["subject"] for p in index["panels"] if p["outcome"] == "TP"]
    assert len(tp_subjects) == 2 and len(set(tp_subjects)) == 2
    assert [p["subject"] for p in index["panels"] if p["outcome"] == "FP"] == ["D", "D"]
    pngs = sorted(p.stem for p in (tmp_path / "out" / "panels").glob("*.png"))
    assert pngs == sorted(p["stem"] for p in index["panels"])
    assert json.loads((tmp_path / "out" / "panels" / "index.json").read_text()) == index
    assert not index["all_negative"] and index["message"] is None
    for panel in index["panels"]:  # the ground truth came from the batch item's label file
        lime = lime_pixels(tmp_path / "out" / "panels" / f"{panel['stem']}.png")
        assert (lime > 10) if panel["outcome"] != "FP" else (lime == 0), panel


def test_the_writer_says_when_every_slice_is_negative(tmp_path, caplog):
    gt, none = square(10, 10), np.zeros((SIZE, SIZE), np.uint8)
    writer = PredictionWriter(str(tmp_path / "out"))
    for stem, label in (("A_0001", gt), ("A_0002", none), ("B_0001", none)):
        item, batch_item = hand_made_item(tmp_path / "data", stem, label, none, "negative", probability=0.2)
        writer.write_item(item, batch_item)
    with caplog.at_level(logging.WARNING, logger="scripts.evaluation.slice_writer"):
        index = writer.write_panels()
    assert index["all_negative"] and index["slices"] == 3 and index["called_positive"] == 0
    assert "every one of the 3 slices was called negative" in index["message"] and "0.200" in index["message"]
    assert index["message"] in caplog.text
    assert [p["outcome"] for p in index["panels"]] == ["miss"]  # the missed nodule is still shown


def test_inference_config_panels_show_the_ground_truth(tmp_path, bundle_root):
    """configs/inference_slices.json end to end: the label files named by the datalist reach the panels."""
    root, items = tmp_path / "data", []
    for i, subject in enumerate(("P", "Q")):
        for j, label in enumerate((square(12 + 4 * i, 14, 3, (64, 64)), np.zeros((64, 64), np.uint8))):
            stem = f"{subject}_{j:04d}"
            # Q_0000's label marks a place where its image shows nothing: a mask on its nodule is in the wrong place
            write_slice(root, stem, label, square(30, 30, 3, (64, 64)) if stem == "Q_0000" else None)
            item = {"image": f"images/{stem}.nii.gz", "label": f"labels/{stem}.nii.gz", "class": int(label.any())}
            items.append({**item, "subject": subject, "slice": j, "nodules": int(label.any()), "diameters_mm": []})
    (root / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": items}))
    torch.manual_seed(0)
    net = GAPClassifier(gap_levels=1, width=1 / 16)
    with torch.no_grad():
        net.fc.bias[1] = 3.0  # every slice called "nodule": the whole pipeline runs
    torch.save(net.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"

    def infer(output_dir, **extra):
        run(
            "run",
            config_file=config_files(SLICE_INFERENCE),
            bundle_root=str(bundle_root),
            dataset_dir=str(root),
            ckpt_path=str(tmp_path / "model.pt"),
            output_dir=str(output_dir),
            width=1 / 16,
            image_size=64,
            **{"segmenter#candidates#min_area_mm2": 3.0},
            use_lung_mask=False,
            device="cpu",
            mode="fine",
            **extra,
        )

    infer(out)
    index = json.loads((out / "panels" / "index.json").read_text())
    assert index["slices"] == 4 and not index["all_negative"]
    drawn = {p["stem"]: p["outcome"] for p in index["panels"]}
    # each slice's outcome from its written mask and its label file, counted here
    expected = {}
    for item in items:
        stem = item["image"][len("images/") : -len(".nii.gz")]
        mask = np.asarray(nib.load(str(out / "masks" / f"{stem}.nii.gz")).dataobj) > 0
        label = np.asarray(nib.load(str(root / item["label"])).dataobj) > 0
        if label.any():
            expected[stem] = "TP" if (mask & label).any() else ("wrong place" if mask.any() else "miss")
        else:
            expected[stem] = "FP" if mask.any() else "nothing segmented"  # every slice is called "nodule"
    assert drawn == expected
    assert index["outcomes"] == {o: list(expected.values()).count(o) for o in OUTCOMES}
    assert expected["P_0000"] == "TP" and expected["Q_0000"] == "wrong place"
    for stem in ("P_0000", "Q_0000"):  # nodule slices: the contour is there
        assert lime_pixels(out / "panels" / f"{stem}.png", "image") > 10, stem
    for stem in set(drawn) - {"P_0000", "Q_0000"}:  # clean slices: nothing in lime
        assert lime_pixels(out / "panels" / f"{stem}.png", "image") == 0, stem

    # every slice called negative: said in the index, and the two nodule slices shown as misses
    infer(tmp_path / "negative", threshold=1.01)
    index = json.loads((tmp_path / "negative" / "panels" / "index.json").read_text())
    assert index["all_negative"] and "every one of the 4 slices was called negative" in index["message"]
    assert sorted((p["stem"], p["outcome"]) for p in index["panels"]) == [("P_0000", "miss"), ("Q_0000", "miss")]
