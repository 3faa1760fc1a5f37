"""Training throughput (slices/s) and peak memory of the 1/2/3-GAP classifiers on the current device.

One SGD step = forward, cross-entropy, backward and update with the bundle's parameter groups, on random
slices of ``--image-size`` pixels. Each configuration runs in a fresh process so that its peak memory
(CUDA: max allocated; CPU: max resident set size of the process) is its own.

    PYTHONPATH=bundle python bench/bench_training.py                            # paper sizes (width 1, batch 30): a GPU
    PYTHONPATH=bundle python bench/bench_training.py --width 0.125 --batch-size 4 --iters 2  # a quick CPU run

The weights are in the channels-last layout and the input a plain tensor, as ``configs/train.json`` trains since
0.5.3. ``--compare`` also times what it did before: the contiguous layout, and the input a MONAI ``MetaTensor``
carrying each slice's header (the engines' batch). The quick start's classifier:

    PYTHONPATH=bundle python bench/bench_training.py --width 0.125 --image-size 128 --batch-norm --gap-levels 1 \
        --iters 40 --compare --output bench/results/training_quickstart.json
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import platform
import resource
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import LoadImaged
from scripts.networks.gap_classifier import GAPClassifier
from scripts.utils.io import write_json

LEARNING_RATES = {1: 1e-2, 2: 2e-3, 3: 1e-3}


def _loaded_batch(images: torch.Tensor) -> MetaTensor:
    """``images`` as the engines got them until 0.5.3: NIfTI slices read by ``LoadImaged`` and collated, a batched
    MetaTensor with each slice's header (its metadata is what every operation copies)."""
    with tempfile.TemporaryDirectory() as folder:
        items = []
        for index, image in enumerate(images.cpu().numpy()):
            path = Path(folder) / f"slice_{index:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image[0], np.diag([0.75, 0.75, 1.0, 1.0])), str(path))
            items.append(LoadImaged("image", ensure_channel_first=True, image_only=True)({"image": str(path)}))
        return list_data_collate(items)["image"].to(images.device)


def run_one(
    gap_levels: int,
    width: float,
    image_size: int,
    batch_size: int,
    iters: int,
    warmup: int,
    amp: bool,
    batch_norm: bool = False,
    metatensor: bool = False,
    channels_last: bool = False,
) -> dict:
    """Time ``iters`` training steps after ``warmup`` ones; return throughput and peak memory."""
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = GAPClassifier(gap_levels=gap_levels, width=width, batch_norm=batch_norm).to(
        device, memory_format=memory_format
    )
    lr = LEARNING_RATES[gap_levels]
    new_layers = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    optimizer = torch.optim.SGD(
        [{"params": model.features.parameters(), "lr": lr}, {"params": new_layers, "lr": 10 * lr}], momentum=0.9
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    images = torch.rand(batch_size, 1, image_size, image_size, device=device)
    if metatensor:
        images = _loaded_batch(images)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {
        "gap_levels": gap_levels,
        "width": width,
        "image_size": image_size,
        "batch_size": batch_size,
        "iters": iters,
        "amp": amp and device.type == "cuda",
        "batch_norm": batch_norm,
        "input": "MetaTensor" if metatensor else "tensor",
        "memory_format": "channels_last" if channels_last else "contiguous",
        "device": (
            torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        ),
        "seconds_per_step": seconds / iters,
        "slices_per_s": batch_size * iters / seconds,
        "peak_memory_mib": peak_mib,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _isolated(kwargs: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_one, kwds=kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap-levels", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-amp", action="store_true", help="full precision on CUDA too")
    parser.add_argument("--batch-norm", action="store_true", help="the classifier with batch normalisation")
    parser.add_argument(
        "--compare", action="store_true", help="also the contiguous layout, and a MetaTensor input (before 0.5.3)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "training.json")
    args = parser.parse_args()
    if args.iters < 1 or args.batch_size < 1:
        parser.error("--iters and --batch-size must be at least 1")

    # (channels_last, metatensor): 0.5.3's training, then the layout alone before it, then all of 0.5.2's
    variants = [(True, False), (False, False), (False, True)] if args.compare else [(True, False)]
    rows = []
    for gap_levels, (channels_last, metatensor) in itertools.product(args.gap_levels, variants):
        if gap_levels not in LEARNING_RATES:
            parser.error(f"--gap-levels must be 1, 2 or 3, got {gap_levels}")
        settings = dict(
            gap_levels=gap_levels,
            width=args.width,
            image_size=args.image_size,
            batch_size=args.batch_size,
            iters=args.iters,
            warmup=args.warmup,
            amp=not args.no_amp,
            batch_norm=args.batch_norm,
            metatensor=metatensor,
            channels_last=channels_last,
        )
        rows.append(_isolated(settings))

    print(
        f"{'GAP':>3} {'width':>6} {'size':>5} {'batch':>5} {'input':>10} {'layout':>13} {'s/step':>8} "
        f"{'slices/s':>9} {'peak MiB':>9}  device"
    )
    for r in rows:
        print(
            f"{r['gap_levels']:>3} {r['width']:>6g} {r['image_size']:>5} {r['batch_size']:>5} {r['input']:>10} "
            f"{r['memory_format']:>13} {r['seconds_per_step']:>8.3f} {r['slices_per_s']:>9.2f} "
            f"{r['peak_memory_mib']:>9.0f}  {r['device']}"
        )
    result = {"benchmark": "training", "torch": torch.__version__, "platform": platform.platform(), "results": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
