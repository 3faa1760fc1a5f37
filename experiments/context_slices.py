"""Single slices against 2.5-D slices: does the classifier learn the generator's default nodules?

    PYTHONPATH=bundle python experiments/context_slices.py [--cases 400] [--size 128] [--width 0.125] [--epochs 12]
        [--channels 1 3] [--synthetic defaults|quickstart] [--gap_levels 1] [--initial_weights CKPT]
        [--out ../runs/context_slices]

For each input (``--channels``: 1 = the slice alone, the paper; 3 = the slice with its neighbours above and below,
``scripts.pipeline.context``) it prepares the same synthetic cases, trains a quick start classifier
(``configs/train.json``: batch normalisation, Adam, the quick start's width and epochs; ``--gap_levels`` heads, 1 by
default; from every weight of ``--initial_weights`` when given, e.g. a quick start model for a curriculum) and
classifies the test split (``configs/classify.json``, whose report gives the test AUC and where the NAM peaks).
``--synthetic defaults`` is the generator's defaults (3-30 mm nodules, 4.5-5.5 mm vessel trunks), the harder data;
``quickstart`` the quick start's easier settings. Targets on the defaults (issue #27): test AUC >= 0.85 and the NAM
peak within 8 px of the nodule on >= 40 % of nodule slices. Prints a table and writes
``experiments/results/context_slices_<synthetic>_<size>[_<arm>].json``; a rerun reuses finished datasets.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from scripts.data.dataset import prepare_dataset
from scripts.data.synthetic import SyntheticSource
from scripts.integration.config_runs import BUNDLE_ROOT, quiet_log
from scripts.quickstart import QUICKSTART_SPECIFICITY, QUICKSTART_SYNTHETIC, classify_split, train_classifier
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


SYNTHETIC = {"defaults": {}, "quickstart": QUICKSTART_SYNTHETIC}


def run_arm(args: argparse.Namespace, channels: int) -> dict:
    """Prepare, train and classify with ``channels`` input channels; return the figures."""
    out = Path(args.out).resolve() / f"{args.synthetic}_{args.size}px_c{channels}"
    dataset = out / "dataset"
    seconds = {}
    clock = time.perf_counter()
    source = SyntheticSource(n_cases=args.cases, seed=args.seed, size=args.size, **SYNTHETIC[args.synthetic])
    prepare_dataset(
        source,
        dataset,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        negative_sampling="matched",
        in_channels=channels,
        progress=False,
    )
    seconds["prepare"] = time.perf_counter() - clock
    common = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(dataset),
        "width": args.width,
        "image_size": args.size,
        "batch_norm": True,
        "in_channels": channels,
    }
    start = {"initial_weights": str(Path(args.initial_weights).resolve())} if args.initial_weights else {}
    clock = time.perf_counter()
    ckpt = train_classifier(
        out / args.arm,
        "",
        args.gap_levels,
        {**common, **start},
        args.epochs,
        args.batch_size,
        args.learning_rate,
        args.seed,
        QUICKSTART_SPECIFICITY,
    )
    seconds["train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    report = classify_split(out / args.arm / "classification", ckpt, args.gap_levels, common)
    seconds["classify"] = time.perf_counter() - clock
    return {
        "in_channels": channels,
        "test_auc": round(float(report["auc"]), 4),
        "test_accuracy": round(float(report["accuracy"]), 4),
        "nam_peak_within_8px": round(report["peak_near"], 4),
        "nam_peak_inside": round(report["peak_inside"], 4),
        "chance_within_8px": round(report["chance"], 4),
        "test_slices": report["slices"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--cases", type=int, default=400)
    cli.add_argument("--size", type=int, default=128)
    cli.add_argument("--width", type=float, default=0.125)
    cli.add_argument("--epochs", type=int, default=12)
    cli.add_argument("--batch_size", type=int, default=30)
    cli.add_argument("--learning_rate", type=float, default=1e-3)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--workers", type=int, default=2)
    cli.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    cli.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="defaults")
    cli.add_argument("--gap_levels", type=int, choices=(1, 2, 3), default=1)
    cli.add_argument("--initial_weights", default=None, help="a checkpoint to start from (default: from scratch)")
    cli.add_argument("--arm", default="", help="a sub-folder for this training, beside the shared dataset")
    cli.add_argument("--out", default=str(REPO / "runs" / "context_slices"))
    args = cli.parse_args()
    rows = []
    with quiet_log():
        for channels in args.channels:
            rows.append(run_arm(args, channels))
            row = rows[-1]
            print(
                f"{channels} channel(s): test AUC {row['test_auc']:.3f}, accuracy {row['test_accuracy']:.3f}; NAM peak "
                f"within 8 px on {100 * row['nam_peak_within_8px']:.1f} % of nodule slices (inside "
                f"{100 * row['nam_peak_inside']:.1f} %, chance {100 * row['chance_within_8px']:.1f} %); "
                f"{row['seconds']}",
                flush=True,
            )
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        + ("cuda " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "targets": {"test_auc": ">= 0.85", "nam_peak_within_8px": ">= 0.4"},
    }
    name = f"context_slices_{args.synthetic}_{args.size}" + (f"_{args.arm}" if args.arm else "")
    write_json(REPO / "experiments" / "results" / f"{name}.json", report)


if __name__ == "__main__":
    main()
