"""Which levers teach the 1-GAP classifier to see the synthetic nodules, and to look at them?

    PYTHONPATH=bundle python experiments/classifier_levers.py DATASET_DIR --name NAME [--width 0.125] [--epochs 12]
        [--affine] [--bf16] [--independent_rows --nam_from_nodule_row] [--init imagenet --freeze 23 --head 256]
        [--upsample 2] [--twins] [--gap_levels 3]

Trains one variant on a prepared dataset held in memory (a study harness: faster to iterate than
``configs/train.json``, with the same network, data, optimiser and augmentation ranges: Adam, decayed 5 % an epoch,
batch 30, flips and, with ``--affine``, the config's rotation, scale and translation on half the batches), keeps the
epoch of best validation AUC, and reports the test AUC and where the NAM peaks on the test nodule slices
(``scripts.evaluation.localisation``: within 8 px of the nodule, chance, the NAM's percentile on the nodule; also with
the peak sought inside the lungs). The levers of docs/classifier.md:

- ``--independent_rows --nam_from_nodule_row``: the classifier before issue #27's NAM fix (fc's rows started
  independent, the NAM read from the nodule row alone, which keeps the rows' untrained sum);
- the dataset's slices: single or 2.5-D (``prepare ... --in_channels 3``), their size (pixel spacing);
- ``--init imagenet --freeze N``: ImageNet VGG16 (width 1), its first ``N`` layers of ``features`` frozen and their
  activations computed once (bfloat16), the rest trained (``--backbone_lr`` for conv5, ``--lr`` for the head);
- ``--upsample 2``: slices enlarged before the network (ImageNet's filters see objects of tens of pixels);
- ``--twins`` (with a dataset made by ``--make_twins``): every training nodule slice also appears as a negative,
  rendered without its nodules;
- ``--bf16``: bfloat16 autocast in training.

Writes ``experiments/results/classifier_levers/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scripts.data.dataset import load_split, slice_affine
from scripts.data.synthetic import SyntheticSource
from scripts.evaluation.localisation import localisation_summary, localise
from scripts.evaluation.metrics import classification_summary
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.context import stack_context
from scripts.pipeline.crop import crop
from scripts.pipeline.settings import HU_WINDOW
from scripts.utils.io import read_json, write_json, write_nifti

RESULTS = Path(__file__).resolve().parent / "results" / "classifier_levers"


def load(dataset_dir: str, split: str) -> dict:
    """A split in memory: windowed images ``(N, C, H, W)``, classes, ground truth, lung masks."""
    images, classes, labels, lungs = [], [], [], []
    for item in load_split(dataset_dir, split, ("image", "label", "lung", "class")):
        hu = np.asarray(nib.load(item["image"]).dataobj, np.float32)
        hu = hu[None] if hu.ndim == 2 else np.moveaxis(hu, -1, 0)
        images.append(np.clip((hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1))
        classes.append(int(item["class"]))
        labels.append(np.asarray(nib.load(item["label"]).dataobj) > 0)
        lungs.append(np.asarray(nib.load(item["lung"]).dataobj) > 0)
    return {
        "image": torch.from_numpy(np.stack(images)),
        "class": torch.tensor(classes),
        "label": np.stack(labels),
        "lung": np.stack(lungs),
    }


def upsample(split: dict, factor: int) -> dict:
    image = F.interpolate(split["image"], scale_factor=factor, mode="bilinear", align_corners=False)
    grow = lambda masks: masks.repeat(factor, axis=1).repeat(factor, axis=2)  # noqa: E731
    return {**split, "image": image, "label": grow(split["label"]), "lung": grow(split["lung"])}


def random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """train.json's RandAffined ranges on a batch: rotation +-0.175 rad, scale +-10 %, shift +-8 px at 128 px (in
    the field of view's share), each slice with probability 0.5; zeros outside."""
    n = len(x)
    uniform = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    angle, scale, shift = uniform(n) * 0.175, 1 + uniform(n) * 0.1, uniform(n, 2) * (16 / 128)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = shift
    keep = torch.rand(n, generator=generator) < 0.5
    theta[keep] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, align_corners=False, padding_mode="zeros").to(x.dtype)


class FrozenPrefix(torch.nn.Module):
    """The classifier from layer ``start`` of ``features``, fed cached activations of the frozen layers before."""

    def __init__(self, network: GAPClassifier, start: int) -> None:
        super().__init__()
        self.network, self.start = network, start

    def forward_with_nam(self, x: torch.Tensor, size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        activations = self.network.head_activations(x.float(), self.start)
        return self.network.logits_of(activations), self.network.nam_of(activations, size)


def cache_prefix(network: GAPClassifier, start: int, images: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(images), 30):
            out.append(network.features[:start](network.normalize_input(images[i : i + 30])).to(torch.bfloat16))
    return torch.cat(out)


def make_twins(dataset_dir: Path, out_dir: Path) -> None:
    """A copy of a synthetic dataset (by links) whose training split also holds every nodule slice rendered without
    its nodules, as a negative."""
    summary = read_json(dataset_dir / "dataset_summary.json")
    clean = type("WithoutNodules", (SyntheticSource,), {"_paint_lesion": staticmethod(lambda *a, **k: None)})
    n_cases = 1 + max(int(s.split("-")[-1]) for names in summary["subjects"].values() for s in names)
    source = clean(n_cases=n_cases, **summary["source_settings"])
    datalist = read_json(dataset_dir / "datalist.json")
    for folder in ("images", "labels", "lungs"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for path in (dataset_dir / folder).iterdir():
            if not (out_dir / folder / path.name).exists():
                (out_dir / folder / path.name).symlink_to(path.resolve())
    by_subject = defaultdict(list)
    for item in datalist["training"]:
        if item["class"] == 1:
            by_subject[item["subject"]].append(item)
    twins = []
    for subject, items in sorted(by_subject.items()):
        case = source.load(subject)
        for item in items:
            channels = item["in_channels"]
            stacked = stack_context(case.hu, [item["slice"]], channels, case.annotations.spacing[2], 2.5)[..., 0, :]
            hu = np.rint(stacked if channels > 1 else stacked[..., 0]).astype(np.int16)
            size = int(summary["size"])
            stem = f"twin-{subject}_{item['slice']:04d}"
            spacing = [*item["spacing_mm"], item["context_mm"]] if channels > 1 else item["spacing_mm"]
            window = crop(hu, tuple(item["crop_origin"]), size, -1000)
            write_nifti(out_dir / "images" / f"{stem}.nii.gz", window, slice_affine(spacing))
            empty = np.zeros((size, size), np.uint8)
            write_nifti(out_dir / "labels" / f"{stem}.nii.gz", empty, slice_affine(item["spacing_mm"]))
            twins.append({**item, "image": f"images/{stem}.nii.gz", "label": f"labels/{stem}.nii.gz", "class": 0})
    datalist["training"] += twins
    write_json(out_dir / "datalist.json", datalist)
    write_json(out_dir / "dataset_summary.json", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--name", required=True)
    parser.add_argument("--init", choices=("scratch", "imagenet"), default="scratch")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--freeze", type=int, default=0, help="layers of features frozen and cached")
    parser.add_argument("--head", type=int, default=1024)
    parser.add_argument("--gap_levels", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone_lr", type=float, default=None)
    parser.add_argument("--decay", type=float, default=0.95)
    parser.add_argument("--affine", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--upsample", type=int, default=1)
    parser.add_argument("--independent_rows", action="store_true")
    parser.add_argument("--nam_from_nodule_row", action="store_true")
    parser.add_argument("--make_twins", default=None, help="write a twins copy of the dataset here and stop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.make_twins:
        make_twins(Path(args.dataset), Path(args.make_twins))
        return
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    began = time.perf_counter()
    splits = {name: load(args.dataset, name) for name in ("training", "validation", "test")}
    if args.upsample > 1:
        splits = {name: upsample(split, args.upsample) for name, split in splits.items()}
    channels, size = splits["training"]["image"].shape[1], list(splits["training"]["image"].shape[2:])
    imagenet = args.init == "imagenet"
    network = GAPClassifier(
        width=args.width,
        in_channels=channels,
        batch_norm=not imagenet,
        head_channels=args.head,
        gap_levels=args.gap_levels,
        pretrained="imagenet" if imagenet else None,
    )
    if args.independent_rows:
        torch.nn.init.kaiming_uniform_(network.fc.weight, a=5**0.5)
    if args.nam_from_nodule_row:
        network.nam_weights = lambda: network.fc.weight[1]
    network = network.to(memory_format=torch.channels_last)
    inputs = {name: split["image"] for name, split in splits.items()}
    model = None
    if args.freeze:
        for parameter in network.features[: args.freeze].parameters():
            parameter.requires_grad_(False)
        inputs = {name: cache_prefix(network, args.freeze, x) for name, x in inputs.items()}
        model = FrozenPrefix(network, args.freeze)
    seconds = {"load_and_cache": time.perf_counter() - began}
    backbone = [p for p in network.features.parameters() if p.requires_grad]
    new = list(network.heads.parameters()) + list(network.fc.parameters())
    optimizer = torch.optim.Adam(
        [{"params": backbone, "lr": args.backbone_lr or args.lr}, {"params": new, "lr": args.lr}]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, args.decay)

    def forward_with_nam(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.forward_with_nam(x, size) if model is not None else network.forward_with_nam(x)

    def predict(name: str) -> tuple[np.ndarray, np.ndarray]:
        network.eval()
        probabilities, nams = [], []
        with torch.no_grad():
            for i in range(0, len(inputs[name]), 60):
                logits, nam = forward_with_nam(inputs[name][i : i + 60])
                probabilities.append(torch.softmax(logits.float(), 1)[:, 1])
                nams.append(nam[:, 0].float())
        return torch.cat(probabilities).numpy(), torch.cat(nams).numpy()

    start, best, history = time.perf_counter(), (-1.0, None), []
    classes = splits["training"]["class"]
    for epoch in range(args.epochs):
        network.train()
        order, total = torch.randperm(len(classes), generator=generator), 0.0
        for i in range(0, len(order), 30):
            batch = order[i : i + 30]
            x = inputs["training"][batch]
            if args.affine:
                x = random_affine(x, generator)
            for axis in (-1, -2):
                if torch.rand(1, generator=generator) < 0.5:
                    x = x.flip(axis)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = forward_with_nam(x)[0] if model is not None else network(x)
            loss = F.cross_entropy(logits.float(), classes[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        scheduler.step()
        probabilities, _ = predict("validation")
        auc = classification_summary(probabilities, splits["validation"]["class"].numpy())["auc"]
        history.append({"epoch": epoch + 1, "loss": total / len(classes), "val_auc": auc})
        print(history[-1], flush=True)
        if auc > best[0]:
            best = (auc, {k: v.detach().clone() for k, v in network.state_dict().items()})
    seconds["train"] = time.perf_counter() - start
    network.load_state_dict(best[1])
    probabilities, nams = predict("test")
    test = splits["test"]
    nodule = np.flatnonzero(test["class"].numpy() == 1)
    found = [localise(nams[i], test["label"][i], test["lung"][i]) for i in nodule]
    in_lungs = [
        localise(np.where(test["lung"][i] | test["label"][i], nams[i], -np.inf), test["label"][i], test["lung"][i])
        for i in nodule
    ]
    result = {
        "args": vars(args),
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "figures": localisation_summary(found, probabilities, test["class"].numpy()),
        "peak_near_in_lungs": float(np.mean([f.near for f in in_lungs])),
        "rows_sum_norm": float((network.fc.weight[0] + network.fc.weight[1]).norm()),
        "best_validation_auc": best[0],
        "seconds": seconds,
        "history": history,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    write_json(RESULTS / f"{args.name}.json", result)


if __name__ == "__main__":
    main()
