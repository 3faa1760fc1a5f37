"""Which nodule slices does a classifier tell from clean ones? Its test AUC by the nodule's size on the slice.

    PYTHONPATH=bundle python experiments/auc_by_size.py DATASET_DIR CLASSIFICATION_DIR --name NAME [--out FILE]

Reads the test split of a prepared dataset (``datalist.json``: each slice's class, ground-truth pixels, pixel
spacing and the mean diameters of its nodules) and the probabilities ``configs/classify.json`` wrote
(``nodule_probability.csv``), and gives the AUC of each group of nodule slices against *all* the clean test slices:
by the nodule's area on the slice (a nodule's pole is a few pixels however large the nodule) and by the largest
nodule's diameter. A group's share of the nodule slices times its AUC says how much of the overall AUC it can move.
Prints a table and writes ``experiments/results/auc_by_size_<name>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from scripts.data.dataset import load_split
from scripts.evaluation.metrics import classification_summary
from scripts.utils.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
AREA_EDGES_MM2 = (0.0, 25.0, 60.0, 130.0, 400.0, np.inf)  # 25 mm^2 ~ a 5.6 mm disc; 130 mm^2 ~ 13 mm
DIAMETER_EDGES_MM = (0.0, 6.0, 10.0, 15.0, np.inf)


def read_probabilities(classification_dir: Path) -> dict[str, float]:
    """``{image file name: nodule probability}`` from ``nodule_probability.csv``."""
    with open(classification_dir / "nodule_probability.csv", newline="") as handle:
        return {Path(row[0]).name: float(row[1]) for row in csv.reader(handle) if row}


def auc_by_group(values: np.ndarray, edges: tuple, positives: np.ndarray, negatives: np.ndarray) -> list[dict]:
    """AUC of the nodule slices whose ``values`` fall in each ``[edges[i], edges[i + 1])`` against every clean slice."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        group = positives[(values >= low) & (values < high)]
        if len(group) == 0:
            continue
        scores = np.concatenate([negatives, group])
        labels = np.concatenate([np.zeros(len(negatives)), np.ones(len(group))])
        auc = classification_summary(scores, labels)["auc"]
        rows.append({"from": low, "to": None if np.isinf(high) else high, "slices": len(group), "auc": round(auc, 3)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("dataset")
    cli.add_argument("classification")
    cli.add_argument("--name", required=True)
    cli.add_argument("--out", default=None, help="the JSON to write (default: experiments/results/auc_by_size_<name>)")
    args = cli.parse_args(argv)
    probabilities = read_probabilities(Path(args.classification))
    items = load_split(args.dataset, "test", ("image", "class"))
    missing = [item["image"] for item in items if Path(item["image"]).name not in probabilities]
    if missing:
        raise SystemExit(f"{args.classification}: no probability for {len(missing)} test slices, e.g. {missing[0]}")
    score = np.array([probabilities[Path(item["image"]).name] for item in items])
    nodule = np.array([int(item["class"]) == 1 for item in items])
    area = np.array([item["label_pixels"] * float(np.prod(item["spacing_mm"])) for item in items])
    diameter = np.array([max(item["diameters_mm"], default=0.0) for item in items])
    overall = classification_summary(score, nodule.astype(int))["auc"]
    result = {
        "dataset": str(Path(args.dataset).resolve()),
        "classification": str(Path(args.classification).resolve()),
        "test_auc": round(overall, 4),
        "nodule_slices": int(nodule.sum()),
        "clean_slices": int((~nodule).sum()),
        "by_area_mm2": auc_by_group(area[nodule], AREA_EDGES_MM2, score[nodule], score[~nodule]),
        "by_diameter_mm": auc_by_group(diameter[nodule], DIAMETER_EDGES_MM, score[nodule], score[~nodule]),
    }
    print(f"test AUC {result['test_auc']} ({result['nodule_slices']} nodule, {result['clean_slices']} clean slices)")
    for key, unit in (("by_area_mm2", "mm^2 on the slice"), ("by_diameter_mm", "mm diameter")):
        for row in result[key]:
            print(f"  {row['from']:>6} - {row['to'] or 'inf':>6} {unit}: {row['slices']:>4} slices, AUC {row['auc']}")
    write_json(Path(args.out) if args.out else RESULTS / f"auc_by_size_{args.name}.json", result)
    return result


if __name__ == "__main__":
    main()
