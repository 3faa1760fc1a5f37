"""Reduced precision against float32 on a trained model's labelled test split: issue #30's "the same answer".

    PYTHONPATH=bundle python bench/bench_precision.py --ckpt runs/quickstart/models/model.pt \
        --dataset_dir runs/quickstart/dataset --preset quickstart [--precision bfloat16 int8 int8_confirmed] [--out DIR]

Segments the test split in fine mode through ``configs/inference_slices.json`` (merged over
``configs/inference.json``, as the quick start does) once in float32, the reference, and once in each
``--precision`` (int8: ``scripts.networks.quantize`` first, calibrated on 32 training slices; ``int8_confirmed``,
``bfloat16_confirmed``: the config's float32 confirmation of the slices at ``confirm_from`` or above, the plain
names without it), then compares each with float32: slice probabilities (largest change), logits near the threshold
(largest change) and the decisions they changed, the share of slices classified in float32, test AUC and the NAM's
localisation (the share of nodule slices whose NAM peaks within 8 px of the nodule, the NAM's percentile on the
nodule), the masks' Dice over the split, and
R-NAM's pick on the slices with one nodule that float32 segments: the same candidate when the two masks overlap with
Dice >= 0.5 (identical masks reported beside). Targets (issue #30): probabilities within 0.02, AUC and localisation
within 0.01, Dice >= 0.95, the same pick on >= 98 % of positive slices. Prints a table and writes
``bench/results/precision_<name>.json``.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scripts.evaluation.localisation import localisation_summary, localise
from scripts.integration.config_runs import BUNDLE_ROOT, SLICE_INFERENCE, quiet_log, run_config
from scripts.networks.quantize import main as quantize
from scripts.pipeline.settings import preset_overrides
from scripts.utils.io import read_json, write_json

REPO = Path(__file__).resolve().parents[1]
SAME_PICK_DICE = 0.5
ARMS = ("bfloat16", "int8", "bfloat16_confirmed", "int8_confirmed")
NEAR_THRESHOLD = 3.0  # logits: the slices whose float32 logit lies this near the threshold's


def segment(
    ckpt: Path, dataset: Path, arm: str, out: Path, preset: str | None, reduced_screening: bool = False
) -> float:
    """Fine segmentation of the test split by ``arm`` (a precision, alone or ``_confirmed`` by float32) into ``out``
    (R-NAM in the precision too with ``reduced_screening``, else float32); returns the seconds it took."""
    precision, _, confirmed = arm.partition("_")
    alone = {} if confirmed else {"confirm_margin": "$None"}  # confirmed: the config's margin; a plain None is dropped
    start = time.perf_counter()
    run_config(
        "run",
        SLICE_INFERENCE,
        desc=f"segment {arm}",
        mode="fine",
        precision=precision,
        **alone,
        ckpt_path=str(ckpt),
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(dataset),
        output_dir=str(out),
        max_panels=0,
        **{"segmenter#screening#reduced_precision": reduced_screening},
        **(preset_overrides(preset) if preset else {}),
    )
    return time.perf_counter() - start


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def split_outputs(dataset: Path, out: Path) -> dict:
    """Per test slice: class, probability, mask and NAM of one segmentation, with the figures of the split."""
    items = read_json(dataset / "datalist.json")["test"]
    stems = [Path(item["image"]).name.removesuffix(".nii.gz") for item in items]
    records = [read_json(out / "records" / f"{stem}.json") for stem in stems]
    probabilities = [record["probability"] for record in records]
    classes = [int(item["class"]) for item in items]
    masks = {stem: _read(out / "masks" / f"{stem}.nii.gz") > 0 for stem in stems}
    found = [
        localise(_read(out / "nams" / f"{stem}.nii.gz"), _read(dataset / item["label"]), _read(dataset / item["lung"]))
        for stem, item in zip(stems, items)
        if item["class"] == 1
    ]
    threshold = read_json(out / "settings.json")["segmenter"]["threshold"]  # the checkpoint's, whatever the precision
    summary = localisation_summary(found, probabilities, classes, threshold)
    return {
        "threshold": threshold,
        "items": items,
        "stems": stems,
        "probabilities": np.asarray(probabilities),
        "float32_share": float(np.mean([record["precision"] == "float32" for record in records])),
        "masks": masks,
        **summary,
    }


def _logits(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def compare(reference: dict, other: dict) -> dict:
    """``other`` against ``reference`` (float32) on the same split."""
    overlap = total = 0
    same, identical, positives = 0, 0, 0
    threshold = reference["threshold"]
    logits = _logits(reference["probabilities"])
    change = np.abs(logits - _logits(other["probabilities"]))
    near = np.abs(logits - _logits(np.array([threshold]))[0]) <= NEAR_THRESHOLD
    for item, stem in zip(reference["items"], reference["stems"]):
        a, b = reference["masks"][stem], other["masks"][stem]
        overlap, total = overlap + (a & b).sum(), total + a.sum() + b.sum()
        if item["nodules"] == 1 and a.any():  # R-NAM chose a candidate in float32 on a nodule slice
            positives += 1
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            same += dice >= SAME_PICK_DICE
            identical += bool(np.array_equal(a, b))
    return {
        "probability_max_change": float(np.abs(reference["probabilities"] - other["probabilities"]).max()),
        # near the threshold, where a change can decide: float32's logit within NEAR_THRESHOLD of the threshold's
        "logit_max_change_near_threshold": float(change[near].max()) if near.any() else 0.0,
        "decisions_changed": int(
            ((reference["probabilities"] >= threshold) != (other["probabilities"] >= threshold)).sum()
        ),
        "classified_in_float32_share": other["float32_share"],
        "auc": other["auc"],
        "auc_change": other["auc"] - reference["auc"],
        "peak_near": other["peak_near"],
        "peak_near_change": other["peak_near"] - reference["peak_near"],
        "percentile_change": other["percentile"] - reference["percentile"],
        "mask_dice": float(2 * overlap / total) if total else 1.0,
        "positive_slices_segmented_in_float32": positives,
        "same_pick_share": same / positives if positives else None,
        "identical_mask_share": identical / positives if positives else None,
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--ckpt", required=True, help="a trained classifier checkpoint")
    cli.add_argument("--dataset_dir", required=True, help="the prepared dataset it was trained on")
    cli.add_argument(
        "--precision",
        nargs="+",
        default=["bfloat16", "int8"],
        choices=ARMS,
        help="precisions alone, or _confirmed: the slices at confirm_from or above classified again in float32",
    )
    cli.add_argument("--preset", default=None, help="the segmenter's preset (the quick start's model: quickstart)")
    cli.add_argument("--reduced_screening", action="store_true", help="R-NAM in each precision too (else float32)")
    cli.add_argument("--name", default="quickstart", help="names the results file")
    cli.add_argument("--compare_only", action="store_true", help="compare the segmentations already in --out")
    cli.add_argument("--out", default=str(REPO / "runs" / "bench_precision"))
    args = cli.parse_args()
    ckpt, dataset, out = Path(args.ckpt).resolve(), Path(args.dataset_dir).resolve(), Path(args.out).resolve()
    results = REPO / "bench" / "results" / f"precision_{args.name}.json"
    seconds = read_json(results)["seconds"] if args.compare_only and results.exists() else {}  # the runs' own
    with quiet_log():
        if any(arm.startswith("int8") for arm in args.precision) and not args.compare_only:
            start = time.perf_counter()
            quantize(["--ckpt", str(ckpt), "--dataset_dir", str(dataset)])
            seconds["quantize"] = time.perf_counter() - start
        for precision in [] if args.compare_only else ["float32", *args.precision]:
            reduced = args.reduced_screening and precision != "float32"
            seconds[precision] = segment(ckpt, dataset, precision, out / precision, args.preset, reduced)
    reference = split_outputs(dataset, out / "float32")
    rows = {p: compare(reference, split_outputs(dataset, out / p)) for p in args.precision}
    print(
        f"float32: AUC {reference['auc']:.4f}, NAM near the nodule {100 * reference['peak_near']:.1f} %, "
        f"percentile {reference['percentile']:.1f}"
    )
    for precision, row in rows.items():
        print(
            f"{precision}: probabilities within {row['probability_max_change']:.4f}; AUC {row['auc']:.4f} "
            f"({row['auc_change']:+.4f}); NAM near {100 * row['peak_near']:.1f} % ({100 * row['peak_near_change']:+.1f}"
            f" points), percentile {row['percentile_change']:+.2f}; mask Dice {row['mask_dice']:.3f}; R-NAM's pick the "
            f"same on {100 * row['same_pick_share']:.1f} % of {row['positive_slices_segmented_in_float32']} positive "
            f"slices (identical masks {100 * row['identical_mask_share']:.1f} %); logits near the threshold within "
            f"{row['logit_max_change_near_threshold']:.3f}, {row['decisions_changed']} decisions changed; "
            f"{100 * row['classified_in_float32_share']:.1f} % of the slices in float32"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    write_json(
        results,
        {
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads"
            f", torch {torch.__version__}",
            "commit": commit.stdout.strip(),
            "checkpoint": str(ckpt),
            "dataset": str(dataset),
            "reduced_screening": args.reduced_screening,
            "float32": {k: reference[k] for k in ("auc", "accuracy", "peak_near", "percentile", "slices")},
            "precisions": rows,
            "seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
