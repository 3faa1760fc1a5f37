"""A quick start's detection per nodule kind: which of the test split's solid, part-solid and ground-glass nodule
slices the classifier calls positive, and which each row of Table 1 finds.

The synthetic source knows each nodule's kind (``SyntheticSource.nodule_kinds``); the dataset records the source's
settings, so the kinds are drawn again from them, without rendering a volume. Only the test slices with one nodule
are counted (a slice with two may hold two kinds); which nodule is on a slice is the dataset writer's rule. For each
kind and row: ``n``, the share the classifier calls positive (none for the U-Net, which has no classifier), the share
found (the prediction overlaps the ground truth, Table 1's TP), the share found of those called positive, and TP
Dice. Prints a table; JSON to ``--out``.

    PYTHONPATH=bundle python experiments/quickstart_by_kind.py RUN_DIR [--predictions DIR ...]
        [--out experiments/results/quickstart_by_kind.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np
from scripts.data.dataset import STATE_DIR, load_split
from scripts.data.labels import slice_classes
from scripts.data.synthetic import NODULE_KINDS, SyntheticSource
from scripts.networks.checkpoint import bundle_version
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


def slice_kinds(dataset_dir: Path) -> dict[str, str]:
    """The kind of the nodule on each test slice with one nodule, by the slice's image file name.

    Which nodule makes a slice positive is decided by the dataset writer's own rule, ``slice_classes`` with the
    dataset's ``min_experts`` (from its summary; datasets written before 0.5.5 have it only in ``.state/``).
    """
    summary = json.loads((dataset_dir / "dataset_summary.json").read_text())
    if summary.get("source") != "synthetic":
        raise ValueError(f"{dataset_dir}: not a synthetic dataset (source {summary.get('source')!r})")
    if "min_experts" in summary:
        min_experts = summary["min_experts"]
    else:
        min_experts = json.loads((dataset_dir / STATE_DIR / "settings.json").read_text())["min_experts"]
    n_cases = sum(len(subjects) for subjects in summary["subjects"].values())
    source = SyntheticSource(n_cases=n_cases, **summary["source_settings"])
    subjects = {}  # per subject: the nodules of each slice and each nodule's kind, drawn once for all its slices
    kinds = {}
    for entry in load_split(dataset_dir, "test", ("class", "nodules", "subject", "slice")):
        if entry["class"] != 1 or entry["nodules"] != 1:
            continue
        subject = entry["subject"]
        if subject not in subjects:
            classes = slice_classes(source.annotations(subject), min_experts=min_experts)
            subjects[subject] = classes.nodules, source.nodule_kinds(subject)
        members, nodule_kinds = subjects[subject]
        (index,) = members[entry["slice"]]
        kinds[Path(entry["image"]).name] = nodule_kinds[index]
    return kinds


def slice_truths(dataset_dir: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The ground truth of the named test slices (by image file name), read once for every row."""
    wanted = set(names)
    return {
        Path(e["image"]).name: np.asarray(nib.load(e["label"]).dataobj) > 0
        for e in load_split(dataset_dir, "test", ("label",))
        if Path(e["image"]).name in wanted
    }


def row_by_kind(predictions: Path, kinds: dict[str, str], truths: dict[str, np.ndarray]) -> dict:
    """One prediction directory's counts per kind."""
    tallies = {kind: {"n": 0, "positive": 0, "found": 0, "dice": []} for kind in NODULE_KINDS}
    for name, kind in kinds.items():
        record = json.loads((predictions / "records" / name.replace(".nii.gz", ".json")).read_text())
        truth = truths[name]
        mask_file = predictions / "masks" / name
        pred = np.asarray(nib.load(mask_file).dataobj) > 0 if mask_file.is_file() else np.zeros_like(truth)
        tally = tallies[kind]
        tally["n"] += 1
        if "positive" in record:  # the U-Net's records have no classifier call
            tally["positive"] += bool(record["positive"])
        else:
            tally["positive"] = None
        overlap = int(np.count_nonzero(truth & pred))
        if overlap:
            tally["found"] += 1
            tally["dice"].append(2.0 * overlap / (truth.sum() + pred.sum()))
    return {
        kind: {
            "n": t["n"],
            "classifier_positive": t["positive"],
            "found": t["found"],
            "tp_dice": round(float(np.mean(t["dice"])), 3) if t["dice"] else None,
        }
        for kind, t in tallies.items()
        if t["n"]
    }


def main(argv: list[str] | None = None) -> dict:
    """Count per kind for every row under ``RUN_DIR/predictions``; print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished quick start's --out (dataset/, predictions/)")
    parser.add_argument(
        "--predictions",
        type=Path,
        nargs="+",
        default=None,
        help="prediction directories (default: every one under RUN_DIR/predictions; experiments/quickstart_rules.py's "
        "are under RUN_DIR/rules)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "quickstart_by_kind.json")
    args = parser.parse_args(argv)
    dataset_dir = args.run_dir / "dataset"
    kinds = slice_kinds(dataset_dir)
    truths = slice_truths(dataset_dir, kinds)
    rows = {}
    rows_dirs = args.predictions or sorted(
        p for p in (args.run_dir / "predictions").iterdir() if (p / "records").is_dir()
    )
    width = max(len(p.name) for p in rows_dirs) + 2
    print(f"{'row':<{width}}{'kind':<14}{'n':>5}{'called +':>10}{'found':>8}{'found of +':>12}{'TP Dice':>9}")
    for predictions in rows_dirs:
        rows[predictions.name] = row_by_kind(predictions, kinds, truths)
        for kind, r in rows[predictions.name].items():
            positive = r["classifier_positive"]
            called = f"{positive / r['n']:>10.2f}" if positive is not None else f"{'-':>10}"
            found_of_positive = f"{r['found'] / positive:>12.2f}" if positive else f"{'-':>12}"
            dice = f"{r['tp_dice']:.2f}" if r["tp_dice"] is not None else "-"
            print(
                f"{predictions.name:<{width}}{kind:<14}{r['n']:>5}{called}{r['found'] / r['n']:>8.2f}"
                f"{found_of_positive}{dice:>9}"
            )
    result = {"run_dir": str(args.run_dir.resolve()), "bundle_version": bundle_version(REPO / "bundle"), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
