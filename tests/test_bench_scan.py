"""bench/bench_scan.py's confirm_margin curve on probabilities whose answer is known."""

import importlib.util
import sys

import numpy as np
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_scan", REPO / "bench" / "bench_scan.py")
bench_scan = importlib.util.module_from_spec(spec)
sys.modules["bench_scan"] = bench_scan
spec.loader.exec_module(bench_scan)


def test_margin_curve_counts_the_slices_confirmed_and_the_change_left_on_the_others(monkeypatch):
    """At threshold 0.5 (logit 0) a margin m confirms the slices the reduced precision (not float32) puts at
    sigmoid(-m) or above; the others keep its probability. Six classified slices and one without lung (probability 0
    in both)."""
    reference = np.array([0.10, 0.25, 0.36, 0.45, 0.60, 0.90, 0.0])
    reduced = np.array([0.12, 0.28, 0.40, 0.42, 0.62, 0.88, 0.0])
    monkeypatch.setattr(bench_scan, "MARGINS", (0.5, 1.0, 2.0))
    curve = bench_scan.margin_curve(reference, reduced, 0.5, classified=6)
    assert [p["confirm_margin"] for p in curve] == [0.5, 1.0, 2.0]
    assert [p["confirm_from"] for p in curve] == pytest.approx([0.3775, 0.2689, 0.1192], abs=1e-4)
    # 0.5: 0.12 and 0.28 stay below 0.378 (0.40 goes, though float32's 0.36 is below); 1.0: 0.12 stays; 2.0: none
    assert [p["classified_again_share"] for p in curve] == pytest.approx([4 / 6, 5 / 6, 1.0], abs=1e-4)
    assert [p["max_probability_change"] for p in curve] == pytest.approx([0.03, 0.02, 0.0])
