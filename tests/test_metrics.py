"""The paper's metrics against values computed by hand on small masks."""

import math

import numpy as np
import pytest
from scripts.evaluation.metrics import (
    binned_mean_sd,
    classification_summary,
    count_found_nodules,
    detection_summary,
    mean_sd,
    slice_outcome,
)


def box(shape=(8, 8), *boxes):
    """A bool mask with the given (r0, r1, c0, c1) boxes set, ends exclusive."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


LABEL = box((8, 8), (1, 3, 1, 3))  # 4 px


def test_true_positive_dice_and_doa_at_the_slice_spacing():
    pred = box((8, 8), (2, 4, 1, 4))  # 6 px, 2 of them on the label
    out = slice_outcome(pred, LABEL, spacing=(0.5, 0.8))
    assert out["outcome"] == "TP" and out["positive"] and out["overlap"]
    assert not out["unmatched_component"]
    assert out["dice"] == pytest.approx(2 * 2 / (6 + 4))
    assert out["area_pred_mm2"] == pytest.approx(6 * 0.4)
    assert out["area_label_mm2"] == pytest.approx(4 * 0.4)
    assert out["doa_mm2"] == pytest.approx(2 * 0.4)
    # the same masks at another spacing: Dice unchanged, DOA scales with the pixel area
    assert slice_outcome(pred, LABEL, spacing=(1.5, 2.0))["doa_mm2"] == pytest.approx(2 * 3.0)


def test_true_positive_with_an_extra_component():
    pred = LABEL | box((8, 8), (6, 8, 6, 8))  # the label exactly plus 4 px elsewhere
    out = slice_outcome(pred, LABEL)
    assert out["outcome"] == "TP" and out["unmatched_component"]
    assert out["dice"] == pytest.approx(8 / 12)
    assert out["doa_mm2"] == pytest.approx(4.0)


def test_fp_nodule_fn_fp_tn():
    miss = slice_outcome(box((8, 8), (5, 7, 5, 7)), LABEL)
    assert (miss["outcome"], miss["dice"], miss["doa_mm2"], miss["unmatched_component"]) == ("FP_nodule", 0, None, True)
    fn = slice_outcome(np.zeros((8, 8)), LABEL)
    assert (fn["outcome"], fn["dice"], fn["predicted"], fn["unmatched_component"]) == ("FN", 0, False, False)
    empty = np.zeros((8, 8), dtype=np.uint8)
    fp = slice_outcome(box((8, 8), (0, 1, 0, 1)), empty)
    assert (fp["outcome"], fp["positive"], fp["dice"]) == ("FP", False, None)
    tn = slice_outcome(empty, empty)
    assert (tn["outcome"], tn["dice"], tn["area_pred_mm2"]) == ("TN", None, 0.0)


def test_connectivity_decides_what_is_one_component():
    pred = box((8, 8), (2, 3, 2, 3), (3, 4, 3, 4))  # one px on the label, one diagonal to it off the label
    assert not slice_outcome(pred, LABEL, connectivity=2)["unmatched_component"]
    assert slice_outcome(pred, LABEL, connectivity=1)["unmatched_component"]
    with pytest.raises(ValueError, match="connectivity"):
        slice_outcome(pred, LABEL, connectivity=3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        slice_outcome(np.zeros((8, 7)), LABEL)


def test_two_nodules_found():
    label = box((8, 8), (0, 2, 0, 2), (5, 7, 5, 7))
    assert count_found_nodules(np.zeros((8, 8)), label) == (0, 2)
    assert count_found_nodules(box((8, 8), (1, 2, 1, 2)), label) == (1, 2)
    assert count_found_nodules(box((8, 8), (1, 6, 1, 6)), label) == (2, 2)
    assert count_found_nodules(box((8, 8), (3, 4, 3, 4)), label) == (0, 2)


def test_mean_sd_is_the_population_sd():
    assert mean_sd([1, 2, 3]) == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2 / 3)), "n": 3}
    assert mean_sd([]) == {"mean": None, "sd": None, "n": 0}


def test_detection_summary_both_readings():
    tp = slice_outcome(box((8, 8), (2, 4, 1, 4)), LABEL)  # dice 0.4
    tp_extra = slice_outcome(LABEL | box((8, 8), (6, 8, 6, 8)), LABEL)  # dice 2/3, an unmatched component
    fp_nodule = slice_outcome(box((8, 8), (5, 7, 5, 7)), LABEL)
    fn = slice_outcome(np.zeros((8, 8)), LABEL)
    empty = np.zeros((8, 8))
    fp = slice_outcome(box((8, 8), (0, 1, 0, 1)), empty)
    tn = slice_outcome(empty, empty)
    outcomes = [tp, tp_extra, fp_nodule, fn, fp, tn, tn]

    s = detection_summary(outcomes, "exclusive")
    assert s["counts"] == {
        "S+": 4,
        "S-": 3,
        "TP": 2,
        "FN": 1,
        "FP": 1,
        "FP_nodule_exclusive": 1,
        "FP_nodule_component": 2,
        "FP_nodule": 1,
    }
    assert (s["TPR"], s["FPR"], s["FPR_nodule"]) == (0.5, pytest.approx(1 / 3), 0.25)
    assert s["dice"]["mean"] == pytest.approx((0.4 + 2 / 3) / 4)
    assert s["dice"]["n"] == 4
    assert s["tp_dice"]["mean"] == pytest.approx((0.4 + 2 / 3) / 2)
    assert s["tp_dice"]["sd"] == pytest.approx((2 / 3 - 0.4) / 2)
    assert s["tp_doa_mm2"]["mean"] == pytest.approx((2 + 4) / 2)

    c = detection_summary(outcomes, "component")
    assert c["counts"]["FP_nodule"] == 2 and c["FPR_nodule"] == 0.5 and c["TPR"] == 0.5

    with pytest.raises(ValueError, match="fp_nodule_rule"):
        detection_summary(outcomes, "slice")


def test_rates_are_none_without_a_denominator():
    s = detection_summary([slice_outcome(np.zeros((4, 4)), np.zeros((4, 4)))])
    assert s["TPR"] is None and s["FPR"] == 0.0 and s["tp_dice"]["mean"] is None


def test_binned_mean_sd():
    bins = binned_mean_sd([1, 2, 3, 4], [3, 4.9, 12, 50], [3, 5, 10, 20])
    assert [(b["low_mm"], b["high_mm"], b["n"]) for b in bins] == [(3, 5, 2), (5, 10, 0), (10, 20, 1)]
    assert (bins[0]["mean"], bins[0]["sd"]) == (1.5, 0.5)
    assert bins[1]["mean"] is None and (bins[2]["mean"], bins[2]["sd"]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="increasing"):
        binned_mean_sd([1], [4], [5, 3])
    with pytest.raises(ValueError, match="diameters"):
        binned_mean_sd([1, 2], [4], [3, 5])


def test_classification_accuracy_and_auc():
    s = classification_summary([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0])
    assert s == {"accuracy": 0.5, "auc": pytest.approx(0.75), "n": 4}
    assert classification_summary([0.9, 0.2], [1, 1]) == {"accuracy": 0.5, "auc": None, "n": 2}
