"""Evaluation time per thousand slices, on a generated split of 384x384 slices and one or more methods' masks.

Usage: ``PYTHONPATH=bundle python bench/bench_evaluate.py [--slices 300] [--methods 2] [--size 384]``; prints a table
and writes ``bench/results/evaluate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scripts.evaluation.evaluate import SegmentationEvaluation
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


def make_split(root: Path, preds: list[Path], n: int, size: int, seed: int = 0) -> None:
    """Half the slices with a disc-shaped nodule (some with two), half without; each method's masks are the
    label shifted and grown at random, with some misses and false positives."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    items = []
    for i in range(n):
        stem, positive = f"case{i // 50:03d}_{i}", i % 2 == 0
        label = np.zeros((size, size), np.uint8)
        diameters = []
        for _ in range((1 + (i % 20 == 0)) if positive else 0):
            r, c, radius = *rng.integers(40, size - 40, 2), rng.uniform(2, 15)
            label[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = 1
            diameters.append(2 * radius * 0.7)
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        image = np.full((size, size), -800, np.int16)
        nib.save(nib.Nifti1Image(image, affine), str(root / "images" / f"{stem}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / f"{stem}.nii.gz"))
        for pred_dir in preds:
            shift = rng.integers(-3, 4, 2)
            pred = np.roll(label, tuple(shift), axis=(0, 1)) if rng.random() > 0.2 else np.zeros_like(label)
            if rng.random() < 0.1:
                pred[10:20, 10:20] = 1
            nib.save(nib.Nifti1Image(pred, affine), str(pred_dir / "masks" / f"{stem}.nii.gz"))
            (pred_dir / "records" / f"{stem}.json").write_text(json.dumps({"probability": float(rng.random())}))
        items.append(
            {
                "image": f"images/{stem}.nii.gz",
                "label": f"labels/{stem}.nii.gz",
                "class": int(positive),
                "subject": stem.split("_")[0],
                "slice": i,
                "nodules": len(diameters),
                "diameters_mm": diameters,
            }
        )
    (root / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": items}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--methods", type=int, default=2)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "evaluate.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        preds = [Path(tmp) / f"method{m}" for m in range(args.methods)]
        for folder in [root / "images", root / "labels"] + [p / s for p in preds for s in ("masks", "records")]:
            folder.mkdir(parents=True)
        make_split(root, preds, args.slices, args.size)
        names = ["1-GAP coarse", "1-GAP fine", "2-GAP coarse", "2-GAP fine", "3-GAP coarse", "3-GAP fine", "U-Net"]
        predictions = {names[m % len(names)] + ("" if m < len(names) else f" {m}"): p for m, p in enumerate(preds)}
        start = time.perf_counter()
        SegmentationEvaluation(root, predictions, Path(tmp) / "out").run()
        seconds = time.perf_counter() - start

    per_k = seconds / (args.slices * args.methods) * 1000
    result = {
        "benchmark": "evaluate",
        "slices": args.slices,
        "methods": args.methods,
        "size": args.size,
        "seconds": round(seconds, 3),
        "seconds_per_1000_slices_per_method": round(per_k, 3),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "processor": platform.processor()},
    }
    print("| slices | methods | size | total (s) | s per 1000 slices per method |")
    print("|---|---|---|---|---|")
    print(f"| {args.slices} | {args.methods} | {args.size} | {seconds:.2f} | {per_k:.2f} |")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
