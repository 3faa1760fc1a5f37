"""Data preparation speed: seconds per real LIDC-IDRI scan with 1 and 2 workers, and per synthetic case.

Usage: ``PYTHONPATH=bundle python bench/bench_prepare.py [--lidc_root ../shared/data/lidc] [--synthetic_cases 6]``;
prints a table and writes ``bench/results/prepare.json``. The real scans are prepared from a temporary folder of links
to them, plus one DB patient given only an XML header (it fails at once, reported as a failure): the dataset split
needs at least three subjects.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from scripts.data.dataset import prepare_dataset
from scripts.data.lidc import LidcSource, patient_scan
from scripts.data.synthetic import SyntheticSource
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


STUB = "LIDC-IDRI-0002"


def lidc_folder(lidc_root: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A folder of links to the real scans, plus the stub patient; returns it and the real patients."""
    root = tmp / "lidc"
    patients = LidcSource(lidc_root).subjects()
    for patient in patients:
        shutil.copytree(lidc_root / patient, root / patient, copy_function=os.symlink)
    (root / STUB).mkdir()
    uid = patient_scan(STUB).series_instance_uid
    header = f"<ResponseHeader><SeriesInstanceUid>{uid}</SeriesInstanceUid></ResponseHeader>"
    (root / STUB / "stub.xml").write_text(f"<LidcReadMessage>{header}</LidcReadMessage>")
    return root, patients


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    return sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def timed_prepare(source, out: Path, workers: int) -> tuple[float, float, dict]:
    """Wall-clock and CPU seconds of one preparation, and its summary."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = prepare_dataset(source, out, workers=workers, on_error="skip", progress=False)
    return time.perf_counter() - start, _cpu_seconds() - cpu, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lidc_root", default=str(REPO.parent / "shared" / "data" / "lidc"))
    parser.add_argument("--synthetic_cases", type=int, default=6)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prepare.json"))
    args = parser.parse_args()
    os.environ["HOME"] = tempfile.mkdtemp()  # pylidc and matplotlib keep their files out of the real HOME

    rows, result = [], {"benchmark": "prepare"}
    with tempfile.TemporaryDirectory() as tmp:
        root, patients = lidc_folder(Path(args.lidc_root), Path(tmp))
        source = LidcSource(root)
        start = time.perf_counter()
        for patient in patients:
            source.load(patient)
        load = (time.perf_counter() - start) / len(patients)
        lidc = {"scans": len(patients), "load_seconds_per_scan": round(load, 2)}
        for workers in (1, 2):
            seconds, cpu, summary = timed_prepare(source, Path(tmp) / f"lidc{workers}", workers)
            slices = sum(sum(v.values()) for v in summary["slices"].values())
            lidc[f"seconds_per_scan_{workers}_workers"] = round(seconds / len(patients), 2)
            lidc[f"cpu_seconds_per_scan_{workers}_workers"] = round(cpu / len(patients), 2)
            rows.append(("LIDC-IDRI", len(patients), workers, slices, seconds, seconds / len(patients), cpu))
        lidc["speed_up"] = round(lidc["seconds_per_scan_1_workers"] / lidc["seconds_per_scan_2_workers"], 2)
        result["lidc"] = lidc
        if args.synthetic_cases >= 3:
            synthetic = SyntheticSource(n_cases=args.synthetic_cases, seed=0)
            seconds, cpu, summary = timed_prepare(synthetic, Path(tmp) / "synthetic", 1)
            slices = sum(sum(v.values()) for v in summary["slices"].values())
            per_case = seconds / args.synthetic_cases
            result["synthetic"] = {
                "cases": args.synthetic_cases,
                "seconds_per_case_1_worker": round(per_case, 2),
                "cpu_seconds_per_case_1_worker": round(cpu / args.synthetic_cases, 2),
            }
            rows.append(("synthetic", args.synthetic_cases, 1, slices, seconds, per_case, cpu))

    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(f"LIDC-IDRI load (read + checks) per scan: {load:.2f} s")
    print("| source | subjects | workers | slices written | total (s) | s per subject | CPU s per subject |")
    print("|---|---|---|---|---|---|---|")
    for name, n, workers, slices, seconds, per, cpu in rows:
        print(f"| {name} | {n} | {workers} | {slices} | {seconds:.1f} | {per:.2f} | {cpu / n:.2f} |")
    print(f"speed-up with 2 workers (LIDC-IDRI): {result['lidc']['speed_up']:.2f}x")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
