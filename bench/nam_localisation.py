"""Does the classifier look at the nodule? Where the NAM peaks on the nodule slices of a prepared split.

Usage: ``PYTHONPATH=bundle python bench/nam_localisation.py DATASET_DIR PREDICTIONS_DIR [--tolerance_px 8]
[--name quickstart]``, where PREDICTIONS_DIR is an ``inference_slices.json`` output (it holds ``nams/``). Prints the
share of nodule slices
whose NAM maximum lies inside the ground truth and within ``tolerance_px`` of it, next to chance (the share of lung
pixels within that distance), and writes ``bench/results/nam_localisation_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scripts.data.dataset import load_split, slice_stem
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


def _plane(path: Path | str) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).squeeze()


def nam_localisation(dataset_dir: str, predictions_dir: str, split: str = "test", tolerance_px: int = 8) -> dict:
    """Shares of nodule slices whose NAM peak is inside the label, and within ``tolerance_px`` of it, with chance."""
    inside = near = chance = 0.0
    items = [item for item in load_split(dataset_dir, split, ("image", "label", "lung")) if item["class"] == 1]
    if not items:
        raise ValueError(f"split {split!r} of {dataset_dir} has no nodule slices")
    for item in items:
        nam_path = Path(predictions_dir) / "nams" / f"{slice_stem(item['image'])}.nii.gz"
        if not nam_path.is_file():
            raise FileNotFoundError(f"no NAM for {item['image']}: {nam_path}")
        nam, label, lung = _plane(nam_path), _plane(item["label"]) > 0, _plane(item["lung"]) > 0
        peak = np.unravel_index(int(nam.argmax()), nam.shape)
        around = ndimage.binary_dilation(label, iterations=tolerance_px)
        inside += label[peak]
        near += around[peak]
        chance += (around & lung).sum() / max(int(lung.sum()), 1)
    n = len(items)
    return {
        "nodule_slices": n,
        "tolerance_px": tolerance_px,
        "peak_inside": inside / n,
        "peak_within_tolerance": near / n,
        "chance_within_tolerance": chance / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("predictions_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tolerance_px", type=int, default=8)
    parser.add_argument("--name", default="quickstart")
    args = parser.parse_args()
    result = nam_localisation(args.dataset_dir, args.predictions_dir, args.split, args.tolerance_px)
    print(json.dumps(result, indent=4))
    write_json(REPO / "bench" / "results" / f"nam_localisation_{args.name}.json", {"args": vars(args), **result})


if __name__ == "__main__":
    main()
