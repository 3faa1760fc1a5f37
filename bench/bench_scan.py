"""Whole-scan inference speed: seconds per scan split into its steps, batched vs one-by-one classification, and the
classifier's precisions (float32, bfloat16, int8) compared in one run.

    PYTHONPATH=bundle python bench/bench_scan.py [--lidc_root ../shared/data/lidc] [--width 1.0] [--image_size 384]
        [--batch_size 8] [--precision float32 bfloat16 int8 int8_confirmed] [--scans LIDC-IDRI-0001]
        [--ckpt CHECKPOINT]

Runs ``configs/inference.json``'s preprocessing, inferer, postprocessing and writer on the real LIDC-IDRI scans (as
DICOM) with a randomly initialised classifier at the paper's size. A random network's probabilities say nothing, so
the slices segmented are chosen by a threshold at the ``--positive_share`` quantile of the probabilities of a
sample of the scan's slices (0.1 by default, more than LIDC's share of nodule slices, so the figure is pessimistic).
One-by-one classification is timed on that sample (``--sample`` slices). The classifier's forwards are those of the
slices (``classify``) and R-NAM's on the masked copies (``screen``); ``segment`` is the rest of the segmentation
(scope, ICM, candidates). Prints a table and writes
``bench/results/bench_scan.json``. Targets (2-core CPU): everything but the classifier forwards under 20 % of them;
batched classification at least 1.3x faster per slice than one at a time; on a GPU, >= 200 slices/s with AMP.

Each ``--precision`` runs the whole scan again with ``configs/inference.json``'s ``precision`` set to it (R-NAM in
float32, the config's default, unless ``--reduced_screening``: then in bfloat16 after bfloat16), its threshold the
same quantile of its own sample (a random network's probabilities lie within a few thousandths of each other, so a
threshold kept from another precision would segment other slices, and more or fewer of them); each later one is
compared with the first (mask Dice, largest probability change), which with a random network says little about a
trained one's agreement (docs/precision.md).
int8 quantises the random network first, calibrated on ``--calibration`` lung slices of the first scan (timed apart).
``int8_confirmed`` and ``bfloat16_confirmed`` classify the slices at ``confirm_from`` or above again in float32 (the
config's ``confirm_margin``; the plain names without it). A random network puts every slice there, so they
need ``--ckpt``: a trained classifier, at ``--image_size``, deciding with its own threshold. With ``--ckpt``, float32
first and int8 or bfloat16 alone, each scan's row also gives the ``confirm_margin`` curve: for each margin of
``MARGINS``, the share of the slices it would classify again and the largest probability change left on the others.
Targets (issue #30, 2-core CPU): the whole scan at least 3x faster than float32; LIDC-IDRI-0001 under 30 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import decollate_batch
from scripts.networks.checkpoint import TrainingRecord
from scripts.networks.gap_classifier import GAPClassifier
from scripts.networks.quantize import quantize_checkpoint, scan_slices
from scripts.pipeline.segmenter import confirmation_line
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


STEPS = ("read", "lungs", "crop", "classify", "segment", "screen", "assemble", "write")
FORWARDS = ("classify", "screen")  # the classifier's forwards: the slices', and R-NAM's on the masked copies
INFERENCE = REPO / "bundle" / "configs" / "inference.json"
CONFIRM_MARGIN = ConfigParser.load_config_file(str(INFERENCE))["confirm_margin"]  # the _confirmed arms' margin
MARGINS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # the confirm_margin curve of a reduced precision alone against float32


def parse_config(args: argparse.Namespace, output_dir: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    settings = {
        "gap_levels": 1,
        "width": args.width,
        "in_channels": 1,
        "head_channels": 1024,
        "batch_norm": False,
        "image_size": args.image_size,
        "pixel_spacing_mm": None,
        "hu_window": [-1000.0, 400.0],
        "context_mm": None,
        "threshold": 0.5,  # replaced by the --positive_share quantile
    }
    common = {
        "bundle_root": str(REPO / "bundle"),
        "output_dir": output_dir,
        "batch_size": args.batch_size,
        "device": args.device,
        "segmenter#screening#reduced_precision": args.reduced_screening,
    }
    if args.ckpt:  # a trained classifier: its record's settings at --image_size, its own threshold
        parser.update({**common, "ckpt_path": str(Path(args.ckpt).resolve()), "image_size": args.image_size})
        return parser
    torch.manual_seed(0)
    network = GAPClassifier(width=args.width).to(args.device).eval()
    checkpoint = Path(output_dir) / "model.pt"  # where int8 finds its model (and its record)
    record = TrainingRecord(network, [], args.image_size, settings["hu_window"], REPO / "bundle")
    torch.save({"model": network.state_dict(), "config": record.state_dict()}, checkpoint)
    # the config builds the network from these settings and loads the checkpoint
    parser.update({**common, "model_settings": settings, "ckpt_path": str(checkpoint)})
    return parser


def bench_scan(
    parser: ConfigParser, scan: Path, args: argparse.Namespace, precision: str
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """One scan in one precision: the report's row, and the mask and slice probabilities (for comparing precisions)."""
    seconds = dict.fromkeys(STEPS, 0.0)
    name, _, confirmed = precision.partition("_")
    parser.update({"precision": name, "confirm_margin": CONFIRM_MARGIN if confirmed else None})
    inferer = parser.get_parsed_content("inferer", lazy=False)  # a segmenter in this precision (everything parsed anew)
    preprocessing = parser.get_parsed_content("preprocessing")  # the instance the postprocessing's Invertd inverts
    network = parser.get_parsed_content("network")
    clock = time.perf_counter()
    data = preprocessing({"image": str(scan), "source": str(scan), "name": scan.name})
    volume = data["image"].to(args.device)
    seconds["read"] = time.perf_counter() - clock

    # one by one, on a sample of the lung slices: per-slice time, and the probabilities that set the threshold
    segmenter = inferer.segmenter
    threshold, segmenter.threshold = segmenter.threshold, 2.0  # nothing positive: classification only
    one_by_one = type(inferer)(
        segmenter, inferer.image_size, 1, inferer.lung_mask_fn, inferer.in_channels, inferer.context_mm
    )
    lungs = segmenter_lungs(volume, inferer)
    sample = np.linspace(lungs[0], lungs[-1], args.sample).round().astype(int)
    timed = one_by_one.segment_scan(volume[..., sample], network)
    per_slice_single = timed.seconds["classify"] / len(sample)
    probabilities = timed.probability[0, 0]
    segmenter.threshold = threshold if args.ckpt else float(np.quantile(probabilities, 1.0 - args.positive_share))

    result = inferer.segment_scan(volume, network)
    for step, value in result.seconds.items():
        seconds[step] += value
    n_classified = int(result.lungs.any(axis=(0, 1)).sum())
    # what the inferer's __call__ returns, without a second run
    data["pred"] = decollate_batch(inferer.named_outputs(result, data["image"]))[0]
    clock = time.perf_counter()
    data = parser.get_parsed_content("postprocessing")(data)
    seconds["assemble"] += time.perf_counter() - clock
    clock = time.perf_counter()
    parser.get_parsed_content("writer")(data)
    seconds["write"] = time.perf_counter() - clock
    forwards = sum(seconds[k] for k in FORWARDS)
    others = sum(v for k, v in seconds.items() if k not in FORWARDS)
    per_slice_batched = seconds["classify"] / max(n_classified, 1)
    row = {
        "scan": scan.name,
        "precision": precision,
        "threshold": segmenter.threshold,
        "slices": int(volume.shape[-1]),
        "classified": n_classified,
        "segmented": len(result.slices),
        "classified_again_in_float32": result.confirmed,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "total_s": round(sum(seconds.values()), 2),
        "non_forward_share": round(others / forwards, 4),
        "non_forward_share_of_slice_forwards": round((others + seconds["screen"]) / seconds["classify"], 4),
        "classify_s_per_slice": {"batched": round(per_slice_batched, 4), "one_by_one": round(per_slice_single, 4)},
        "batching_speedup": round(per_slice_single / per_slice_batched, 3),
        "slices_per_s": round(1.0 / per_slice_batched, 2),
    }
    return row, (result.mask > 0, result.probability[0, 0])


def margin_curve(reference: np.ndarray, reduced: np.ndarray, threshold: float, classified: int) -> list[dict]:
    """What each ``confirm_margin`` of ``MARGINS`` would give, from one scan's slice probabilities in float32
    (``reference``) and in a reduced precision alone: the slices it would classify again (share of the
    ``classified``), and the largest probability change left on the others (those keep the reduced precision's)."""
    curve = []
    for margin in MARGINS:
        confirm_from = confirmation_line(threshold, margin)
        kept = reduced < confirm_from
        change = np.abs(reference - reduced)[kept]
        curve.append(
            {
                "confirm_margin": margin,
                "confirm_from": round(confirm_from, 4),
                "classified_again_share": round(float((~kept).sum() / max(classified, 1)), 4),
                "max_probability_change": round(float(change.max()) if change.size else 0.0, 5),
            }
        )
    return curve


def segmenter_lungs(volume: torch.Tensor, inferer) -> np.ndarray:
    """Indices of the slices that hold lung (what the inferer classifies)."""
    from scripts.pipeline.scan_inferer import _spacing

    lo, hi = inferer.segmenter.intensity_range
    window = volume[0].detach().float().cpu().numpy().astype(np.float64)
    lungs = inferer.lung_mask_fn(lo + window * (hi - lo), _spacing(volume))
    return np.flatnonzero(np.asarray(lungs).any(axis=(0, 1)))


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--lidc_root", default=str(REPO.parent / "shared" / "data" / "lidc"))
    cli.add_argument("--width", type=float, default=1.0)
    cli.add_argument("--image_size", type=int, help="default: 384, or a --ckpt's own")
    cli.add_argument("--batch_size", type=int, default=8)
    cli.add_argument("--sample", type=int, default=16, help="slices timed one by one")
    cli.add_argument("--positive_share", type=float, default=0.1)
    cli.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_argument(
        "--precision",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16", "int8", "bfloat16_confirmed", "int8_confirmed"],
        help="_confirmed: the slices at confirm_from or above classified again in float32 (the config's default)",
    )
    cli.add_argument("--ckpt", help="a trained classifier instead of the random one (its own threshold)")
    cli.add_argument(
        "--reduced_screening",
        action="store_true",
        help="screening.reduced_precision on (R-NAM in bfloat16 after bfloat16)",
    )
    cli.add_argument("--calibration", type=int, default=16, help="int8's calibration slices")
    cli.add_argument("--scans", nargs="*", help="scan folder names under --lidc_root (default: all)")
    cli.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_scan.json"))
    args = cli.parse_args()
    if args.image_size is None and not args.ckpt:
        args.image_size = 384
    scans = sorted(p for p in Path(args.lidc_root).iterdir() if p.is_dir() and (not args.scans or p.name in args.scans))
    rows, calibration = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        parser = parse_config(args, tmp)
        if any(arm.startswith("int8") for arm in args.precision):
            clock = time.perf_counter()
            slices = scan_slices(scans[:1], parser["ckpt_path"], args.calibration)
            quantize_checkpoint(parser["ckpt_path"], slices, f"lung slices of {scans[0].name}")
            calibration = {"slices": len(slices), "seconds": round(time.perf_counter() - clock, 1)}
            print(f"int8 model: quantised in {calibration['seconds']} s on {len(slices)} slices of {scans[0].name}")
        for scan in scans:
            first = None
            for precision in args.precision:
                row, (mask, probability) = bench_scan(parser, scan, args, precision)
                if first is None:
                    first = (mask, probability, row["total_s"])
                else:
                    both = mask.sum() + first[0].sum()  # none: both masks empty, the same answer
                    row["dice_vs_first"] = round(float(2 * (mask & first[0]).sum() / both), 4) if both else 1.0
                    row["max_probability_change"] = round(float(np.abs(probability - first[1]).max()), 5)
                    row["speedup_vs_first"] = round(first[2] / row["total_s"], 2)
                    if args.ckpt and args.precision[0] == "float32" and precision in ("bfloat16", "int8"):
                        row["confirm_margin_curve"] = margin_curve(
                            first[1], probability, row["threshold"], row["classified"]
                        )
                rows.append(row)
                for point in row.get("confirm_margin_curve", []):
                    print(
                        f"  confirm_margin {point['confirm_margin']}: {100 * point['classified_again_share']:.1f} % "
                        f"classified again, the others within {point['max_probability_change']}"
                    )
                print(
                    f"{row['scan']} {precision}: {row['total_s']:.1f} s in all ("
                    + ", ".join(f"{k} {v:.2f}" for k, v in row["seconds"].items())
                    + f"); non-forward {100 * row['non_forward_share']:.1f} % of the forwards; "
                    f"classification {row['slices_per_s']:.2f} slices/s batched, {row['batching_speedup']:.2f}x one "
                    "by one"
                    + (
                        f"; vs {args.precision[0]}: {row['speedup_vs_first']}x, Dice {row['dice_vs_first']}, "
                        f"probabilities within {row['max_probability_change']}"
                        if "dice_vs_first" in row
                        else ""
                    )
                )
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "device": args.device,
        "settings": vars(args),
        "int8_calibration": calibration,
        "scans": rows,
        "targets": {
            "non_forward_share": "< 0.2",
            "batching_speedup": ">= 1.3",
            "gpu_slices_per_s": ">= 200",
            "reduced_precision_speedup": ">= 3 (whole scan)",
            "LIDC-IDRI-0001_s": "< 30",
        },
    }
    write_json(args.out, report)
    print(json.dumps({f"{r['scan']} {r['precision']}": r["seconds"] for r in rows}, indent=1))


if __name__ == "__main__":
    main()
