"""The bundle's model for real chest CT, in one command: ``python -m scripts.real_ct_model`` (in bundle/).

Five real scans hold too few slices to train a classifier from scratch (about 200 training slices), so the model
starts from the quick start's synthetic classifier and is fine-tuned on the real-CT training set (*inferred*; the
figures are in ``docs/README.md``). The steps, each through the bundle's own configs:

1. the quick start's synthetic dataset and the 0.6.0 quick start's 1-GAP classifier (``configs/train.json``; skipped
   with ``--synthetic_model``);
2. the real-CT training set (``scripts.data.prepare real``) at the synthetic model's slice size and pixel spacing;
3. ``configs/train.json`` again on the real set, starting from every weight of the synthetic model
   (``initial_weights``);
4. with ``--test`` (scans held out), the classifier's report on the held-out scans' slices
   (``configs/classify.json``).

The model is ``<out>/models/model.pt``; ``docs/README.md`` says how the shipped ``models/model.pt`` was made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire

from .data.dataset import prepare_dataset
from .data.prepare import split_names
from .data.real_ct import RealCtSource
from .data.twins import add_twin_negatives
from .integration.config_runs import quiet_log
from .networks.checkpoint import read_checkpoint
from .quickstart import classifier_settings, classify_split, prepare_quickstart_dataset, train_classifier
from .utils.io import read_json, write_json

__all__ = ["real_ct_model"]

# The splits that get twin negatives: training, and validation so that the best epoch and the decision threshold are
# chosen on slices told apart by the nodule alone; the test split stays as the scans are.
TWIN_SPLITS = ("training", "validation")


def real_ct_model(
    out: str = "../runs/real_ct_model",
    test: list[str] | str | None = None,
    scans: list[str] | str | None = None,
    synthetic_model: str | None = None,
    data_root: str | None = None,
    synthetic_cases: int = 400,
    synthetic_size: int = 256,
    synthetic_epochs: int = 12,
    epochs: int = 40,
    learning_rate: float = 3e-4,
    batch_size: int = 30,
    variants: int = 12,
    negative_sampling: str = "matched",
    twins: bool = True,
    decision_specificity: float = 0.98,
    seed: int = 0,
    workers: int = 2,
) -> Path:
    """Train the real-CT model into ``<out>/models/model.pt`` and return its path.

    Args:
        out: folder for everything the run makes.
        test: scans held out of the real training set (their subjects form its test split and their LIDC patients'
            nodule shapes are never inserted), e.g. ``LIDC-IDRI-0001`` for the leave-one-out benchmark; default
            none (the shipped model).
        scans: the real host scans (comma-separated or a list); default the five of ``data_root``.
        synthetic_model: a quick start model to start from (``<quickstart out>/models/model.pt``); default: train
            one here with the quick start's recipe (about 13 minutes on 2 cores).
        data_root: the folder holding ``lidc/`` and ``chest_ct/``; default ``../shared/data`` beside the repository.
        synthetic_cases: the quick start's synthetic subjects (when ``synthetic_model`` is not given).
        synthetic_size: the quick start's slice size (when ``synthetic_model`` is not given); the real set is made
            at the synthetic model's slice size and pixel spacing.
        synthetic_epochs: the quick start's epochs (when ``synthetic_model`` is not given).
        epochs: fine-tuning epochs on the real set (the best validation epoch is kept).
        learning_rate: Adam's fine-tuning learning rate, decayed by 5 % an epoch.
        batch_size: batch size of both trainings.
        variants: subjects per real scan, each with its own inserted nodules (``prepare real``).
        negative_sampling: ``matched``: the clean slices are drawn at the heights of the nodule slices, so that the
            height of a slice in the chest does not tell the classes apart; ``random``: as the paper.
        decision_specificity: the share of the validation split's clean slices the decision threshold keeps
            negative. 0.98 (*inferred*): a scan has about 100 lung slices and a few nodule slices, so at most 4 false
            positive nodules a scan asks for a specificity near 0.97 or more per slice.
        twins: add a twin negative of every training slice with an inserted nodule (``scripts.data.twins``).
        seed: seeds the data and the trainings.
        workers: processes preparing the data.
    """
    out_dir = Path(out).resolve()
    timings = {}
    with quiet_log():
        if synthetic_model is None:
            start = time.perf_counter()
            synthetic_dir = out_dir / "synthetic"
            settings = classifier_settings(synthetic_dir / "dataset", synthetic_size, 0.125, 3)
            prepare_quickstart_dataset(synthetic_dir / "dataset", synthetic_cases, synthetic_size, seed, workers, 3)
            # the 0.6.0 quick start's 1-GAP classifier, the one the shipped model was made from (the threshold is
            # chosen again in the fine-tuning, so the synthetic one's specificity does not matter)
            synthetic_model = str(
                train_classifier(synthetic_dir, "", 1, settings, synthetic_epochs, batch_size, 1e-3, seed, 0.9)
            )
            timings["synthetic_s"] = time.perf_counter() - start
        _, record = read_checkpoint(synthetic_model)
        if record is None or record.get("pixel_spacing_mm") is None:
            raise ValueError(f"{synthetic_model}: no training record with its pixel spacing; give a quick start model")

        start = time.perf_counter()
        dataset_dir = out_dir / "dataset"
        source = RealCtSource(
            data_root,
            split_names(scans),
            variants=variants,
            seed=seed,
            size=record["image_size"],
            pixel_mm=record["pixel_spacing_mm"][0],
            test=split_names(test) or (),
        )
        summary = prepare_dataset(
            source,
            dataset_dir,
            size=record["image_size"],
            seed=seed,
            workers=workers,
            negative_sampling=negative_sampling,
            in_channels=record["in_channels"],
            context_mm=record["context_mm"] or 2.5,
            split=source.split(),
        )
        if twins:
            add_twin_negatives(source, dataset_dir, TWIN_SPLITS)
            datalist = read_json(dataset_dir / "datalist.json")
            for split in TWIN_SPLITS:
                summary["slices"][split]["twin_negatives"] = sum("twin_of" in item for item in datalist[split])
        print(json.dumps(summary["slices"]), flush=True)
        timings["real_dataset_s"] = time.perf_counter() - start

        start = time.perf_counter()
        settings = {
            **classifier_settings(dataset_dir, record["image_size"], record["width"], record["in_channels"]),
            "initial_weights": str(Path(synthetic_model).resolve()),
        }
        model = train_classifier(
            out_dir, "", 1, settings, epochs, batch_size, learning_rate, seed, decision_specificity
        )
        timings["fine_tune_s"] = time.perf_counter() - start

        if source.test:
            start = time.perf_counter()
            classify_split(out_dir / "classification", model, 1, settings)
            timings["classify_s"] = time.perf_counter() - start
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    write_json(out_dir / "timings.json", timings)
    return model


if __name__ == "__main__":
    fire.Fire(real_ct_model)
