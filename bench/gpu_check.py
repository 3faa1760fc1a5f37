"""The GPU checks in one prepared script: under 8 minutes on one GPU, one JSON with every figure.

    PYTHONPATH=bundle python bench/gpu_check.py     # on a machine with one CUDA GPU: every check at the paper's size
    PYTHONPATH=bundle python bench/gpu_check.py --tiny --only amp_training rnam_batched  # the CPU-capable parts, tiny

Checks (each runs on its own: one that fails or raises is reported as such, and the others still run):

- ``amp_training``: a few training steps of the 1-, 2- and 3-GAP classifiers and the U-Net (networks and U-Net loss
  from the bundle's configs) with AMP as the bundle trains (CUDA: autocast float16 and a GradScaler, like MONAI's
  ``SupervisedTrainer(amp=True)``; CPU: bfloat16 autocast), from the same weights and batch as a float32 run: every
  loss finite, the first step's within 1 % of float32's and the next ones' within 5 %.
- ``torchrun_nccl``: ``torchrun --standalone --nproc_per_node=1`` of this script's worker: the NCCL process group, an
  all-reduce and one DistributedDataParallel step; then the bundle's own multi-GPU training
  (``configs/train.json`` + ``configs/multi_gpu_train.json``) for one epoch on a small synthetic dataset.
- ``training_throughput``: training slices/s of each classifier at 384 px, width 1, batch 30, AMP, beside the GPU's
  dense bf16 ceiling: the network's FLOPs are counted from its convolutions and linear layers (forward; a training
  step counted as 3x the forward). Target: >= 30 % of the ceiling.
- ``rnam_batched``: R-NAM of 8 candidates (``scripts.pipeline.screen.rnam_scores``) in one batch vs one by one
  (``batch_size=1``), on the full image (the paper's formulation; the target, >= 3x, applies to it) and on the
  segmenter's default exact crop with incremental recomputation (reported beside it); the scores must agree.
- ``classification_throughput``: slices/s of the 1-GAP classifier's logits and NAM (what inference computes) at
  384 px, width 1, AMP. Target: >= 200 slices/s.
- ``bench_scan``: ``bench/bench_scan.py`` (the whole-scan benchmark) with ``--scan-args``, when the file exists.

Each subprocess gets ``--timeout`` seconds, cut to what is left of ``--budget`` (450 s), so the whole run stays
under 8 minutes. Targets are judged on a GPU only; on a CPU a check that ran reports ``measured``. The JSON goes to
``bench/results/gpu_check.json`` (``--out``); the exit status is 1 when any check failed or raised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.classify import logits_and_nam
from scripts.pipeline.screen import rnam_scores
from scripts.utils.io import write_json
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"

CHECKS = (
    "amp_training",
    "torchrun_nccl",
    "training_throughput",
    "rnam_batched",
    "classification_throughput",
    "bench_scan",
)
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched on the device name;
# fp16 has the same peak on these parts, so the bundle's float16 AMP is judged against the same ceiling.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 756.0,  # an H100 the name does not place: the lower (PCIe) figure
    "GH200": 989.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}
TARGETS = {"training_share_of_peak": 0.30, "rnam_batched_speedup": 3.0, "classification_slices_per_s": 200.0}
# The paper's sizes (a GPU) and a tiny set for a CPU (the test): (image px, width, batch, U-Net features).
PAPER_SIZE = {"size": 384, "width": 1.0, "batch": 30, "amp_batch": 8, "unet_features": [32, 32, 64, 128, 256, 32]}
TINY_SIZE = {"size": 32, "width": 0.0625, "batch": 4, "amp_batch": 2, "unet_features": [4, 4, 8, 8, 16, 4]}


class Skip(Exception):
    """A check that does not apply here (no CUDA, no file): reported as skipped with the reason."""


def _device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs (the GPU synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _bundle_config(name: str, **overrides: Any):
    """The bundle's config ``configs/<name>`` parsed with ``overrides`` (networks and losses come from it)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / name))
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


def classifier(gap_levels: int, width: float) -> nn.Module:
    """``network_def`` of ``configs/train.json`` (the paper's VGG16 without batch norm) for ``gap_levels`` heads."""
    return _bundle_config("train.json", gap_levels=gap_levels, width=width).get_parsed_content("network_def")


def unet_and_loss(features: list[int]) -> tuple[nn.Module, Callable]:
    """``network_def`` and ``loss`` of ``configs/train_unet.json``."""
    parser = _bundle_config("train_unet.json", features=features)
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")


def _disk_labels(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, 1, size, size)`` masks, each a disk of a nodule's size at a random place (empty for odd items)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(batch, 1, size, size)
    for i in range(0, batch, 2):
        r0, c0 = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator).tolist()
        labels[i, 0] = ((yy - r0) ** 2 + (xx - c0) ** 2 <= (size / 24) ** 2).float()
    return labels


def _train_steps(
    model: nn.Module,
    loss_fn: Callable,
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    amp: bool,
    lr: float,
) -> list[float]:
    """``steps`` SGD steps on one batch; the loss of each, in float32 or with AMP as the bundle uses it."""
    device = images.device
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach().float()))
    return losses


def check_amp_training(sizes: dict, steps: int = 3) -> dict:
    """AMP vs float32 losses of each classifier and the U-Net from identical weights and batches."""
    device = _device()
    generator = torch.Generator().manual_seed(0)
    size, batch = sizes["size"], sizes["amp_batch"]
    images = torch.rand(batch, 1, size, size, generator=generator)
    results, ok = {}, True
    models: dict[str, tuple[Callable[[], nn.Module], Callable, torch.Tensor, float]] = {}
    for k in (1, 2, 3):
        labels = torch.arange(batch) % 2
        models[f"{k}-GAP"] = (lambda k=k: classifier(k, sizes["width"]), F.cross_entropy, labels, 1e-3)
    unet_loss = unet_and_loss(sizes["unet_features"])[1]
    models["U-Net"] = (
        lambda: unet_and_loss(sizes["unet_features"])[0],
        unet_loss,
        _disk_labels(batch, size, generator),
        1e-3,
    )
    for name, (build, loss_fn, targets, lr) in models.items():
        torch.manual_seed(0)
        reference = build()
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        x, y = images.to(device), targets.to(device)
        fp32 = _train_steps(reference.to(device), loss_fn, x, y, steps, amp=False, lr=lr)
        model = build()
        model.load_state_dict(state)
        mixed = _train_steps(model.to(device), loss_fn, x, y, steps, amp=True, lr=lr)
        rel = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(mixed, fp32)]
        finite = all(math.isfinite(v) for v in mixed + fp32)
        within = rel[0] <= 0.01 and all(r <= 0.05 for r in rel[1:])
        results[name] = {"loss_fp32": fp32, "loss_amp": mixed, "relative_difference": rel, "finite": finite}
        ok = ok and finite and within
        del reference, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    amp_dtype = "float16 + GradScaler" if device.type == "cuda" else "bfloat16 (CPU autocast)"
    return {
        "status": "pass" if ok else "fail",
        "amp": amp_dtype,
        "tolerance": "first step 1 %, later steps 5 % of float32",
        "size": size,
        "batch": batch,
        **results,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_worker() -> None:
    """Run under torchrun: NCCL process group, an all-reduce and one DDP step; prints one JSON line."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl")
    device = torch.device("cuda", local_rank)
    value = torch.ones(1, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(value)
    model = nn.parallel.DistributedDataParallel(GAPClassifier(width=0.125).to(device), device_ids=[device])
    loss = F.cross_entropy(model(torch.rand(4, 1, 128, 128, device=device)), torch.tensor([0, 1, 0, 1], device=device))
    loss.backward()
    result = {
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "all_reduce": float(value),
        "ddp_loss": float(loss),
    }
    dist.barrier()
    dist.destroy_process_group()
    print("NCCL_WORKER " + json.dumps(result), flush=True)


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:]


def check_torchrun_nccl(timeout: Callable[[], int] = lambda: 240) -> dict:
    """torchrun with NCCL on one GPU: this script's worker, then the bundle's multi-GPU training for one epoch."""
    if not torch.cuda.is_available():
        raise Skip(
            "needs CUDA: NCCL runs only on NVIDIA GPUs (the CPU path, gloo, is tested in tests/test_training.py)"
        )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    start = time.perf_counter()
    raw = subprocess.run(
        [*torchrun, str(Path(__file__).resolve()), "--nccl-worker"],
        capture_output=True,
        text=True,
        timeout=timeout(),
        env=env,
    )
    lines = [line for line in raw.stdout.splitlines() if line.startswith("NCCL_WORKER ")]
    worker = json.loads(lines[-1].split(" ", 1)[1]) if lines else None
    result: dict[str, Any] = {"worker_rc": raw.returncode, "worker": worker, "worker_s": time.perf_counter() - start}
    if raw.returncode != 0 or worker is None:
        result["worker_log_tail"] = _tail(raw.stdout + raw.stderr)
    ok = raw.returncode == 0 and worker is not None and worker["backend"] == "nccl" and worker["all_reduce"] == 1.0

    from scripts.data.dataset import prepare_dataset
    from scripts.data.synthetic import SyntheticSource

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        prepare_dataset(SyntheticSource(n_cases=8, seed=0, size=128), tmp_path / "data", size=128, seed=0, workers=4)
        result["dataset_s"] = time.perf_counter() - start
        configs = "['configs/train.json','configs/multi_gpu_train.json']"
        command = [*torchrun, "-m", "monai.bundle", "run", "training", "--config_file", configs]
        overrides = {
            "dataset_dir": tmp_path / "data",
            "ckpt_dir": tmp_path / "models",
            "output_dir": tmp_path / "logs",
            "max_epochs": 1,
            "width": 0.125,
            "image_size": 128,
            "batch_size": 8,
            "num_workers": 2,
        }
        for key, value in overrides.items():
            command += [f"--{key}", str(value)]
        start = time.perf_counter()
        bundle = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=timeout(), env=env)
        result["bundle_rc"], result["bundle_s"] = bundle.returncode, time.perf_counter() - start
        saved = sorted(p.name for p in (tmp_path / "models").glob("*.pt"))
        result["bundle_checkpoints"] = saved
        if bundle.returncode != 0 or "model.pt" not in saved:
            result["bundle_log_tail"] = _tail(bundle.stdout + bundle.stderr)
        ok = ok and bundle.returncode == 0 and "model.pt" in saved
    return {"status": "pass" if ok else "fail", **result}


def count_flops(model: nn.Module, image: torch.Tensor) -> float:
    """Forward FLOPs of ``model`` on ``image`` (batch 1): 2 x multiply-adds of every convolution and linear layer."""
    total = 0.0

    def conv_hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2.0 * output.numel() * k

    def linear_hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * output.numel() * module.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(image[:1])
    for h in hooks:
        h.remove()
    return total


def bf16_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU from :data:`BF16_PEAK_TFLOPS`, longest matching key first; None if unknown."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def _amp_step_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, iters: int) -> float:
    """Median seconds of one AMP training step (SGD, cross-entropy) of ``model`` on one batch."""
    device = images.device
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return _timed(step, device, iters, warmup=3 if device.type == "cuda" else 1)


def check_training_throughput(sizes: dict, peak_tflops: float | None, iters: int) -> dict:
    """Training slices/s of each classifier with AMP, and the share of the GPU's bf16 ceiling it reaches."""
    device = _device()
    size, batch = sizes["size"], sizes["batch"]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    peak = peak_tflops if peak_tflops is not None else (bf16_peak_tflops(name) if name else None)
    images = torch.rand(batch, 1, size, size, device=device)
    labels = (torch.arange(batch) % 2).to(device)
    layout = _bundle_config("train.json").get_parsed_content("memory_format")  # the weights as training holds them
    results, ok = {}, True
    for k in (1, 2, 3):
        torch.manual_seed(0)
        model = classifier(k, sizes["width"]).to(device, memory_format=layout)
        flops = 3.0 * count_flops(model, images)  # forward + backward (about twice the forward)
        seconds = _amp_step_seconds(model, images, labels, iters)
        rate = batch / seconds
        entry = {"slices_per_s": rate, "gflop_per_slice_step": flops / 1e9, "achieved_tflops": rate * flops / 1e12}
        if peak:
            entry["share_of_bf16_peak"] = entry["achieved_tflops"] / peak
            ok = ok and entry["share_of_bf16_peak"] >= TARGETS["training_share_of_peak"]
        results[f"{k}-GAP"] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type != "cuda":
        status = "measured"
    elif peak is None:
        status, results["note"] = "fail", f"no bf16 peak known for {name!r}: pass --peak-tflops"
    else:
        status = "pass" if ok else "fail"
    return {
        "status": status,
        "target": f">= {TARGETS['training_share_of_peak']:.0%} of the bf16 peak",
        "device": name or "cpu",
        "bf16_peak_tflops": peak,
        "size": size,
        "width": sizes["width"],
        "batch": batch,
        **results,
    }


def _candidates(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A scope (a disk like a NAM blob) and ``count`` nodule-sized disks inside it, spread over it."""
    yy, xx = np.mgrid[:size, :size]
    r0, c0, radius = 0.45 * size, 0.35 * size, 0.16 * size
    scope = (yy - r0) ** 2 + (xx - c0) ** 2 <= radius**2
    masks = []
    for j in range(count):
        angle = 2 * np.pi * j / count
        r, c = r0 + 0.6 * radius * np.sin(angle), c0 + 0.6 * radius * np.cos(angle)
        masks.append((yy - r) ** 2 + (xx - c) ** 2 <= max(2.0, size / 64) ** 2)
    return scope, np.stack(masks)


def check_rnam_batched(sizes: dict, repeats: int, count: int = 8) -> dict:
    """R-NAM of ``count`` candidates in one batch vs one by one; full image and the segmenter's default path."""
    device = _device()
    size = sizes["size"]
    torch.manual_seed(0)
    model = GAPClassifier(gap_levels=1, width=sizes["width"]).to(device).eval()
    image = torch.rand(1, size, size, device=device)
    with torch.no_grad():
        _, nam = logits_and_nam(model, image[None])
    nam = nam[0, 0].double().cpu().numpy()
    scope, masks = _candidates(size, count)
    results = {}
    for path, options in {"full_image": {"crop": False}, "default": {}}.items():
        scores = {}

        def screen(batch_size: int | None, options: dict = options, scores: dict = scores) -> None:
            scores[batch_size] = rnam_scores(model, image, nam, scope, masks, 0.1, batch_size=batch_size, **options)

        one = _timed(lambda: screen(1), device, repeats)
        batched = _timed(lambda: screen(None), device, repeats)
        diff = float(np.max(np.abs(scores[None] - scores[1]) / np.maximum(np.abs(scores[1]), 1e-12)))
        results[path] = {
            "one_by_one_s": one,
            "batched_s": batched,
            "batched_speedup": one / batched,
            "max_rel_diff_batched_vs_one_by_one": diff,
        }
    # the same scores either way; 1 % leaves room for TF32 convolutions, which CUDA may pick per batch size
    agree = all(r["max_rel_diff_batched_vs_one_by_one"] < 1e-2 for r in results.values())
    if device.type != "cuda":
        status = "measured" if agree else "fail"
    else:
        met = results["full_image"]["batched_speedup"] >= TARGETS["rnam_batched_speedup"]
        status = "pass" if agree and met else "fail"
    return {
        "status": status,
        "target": f"full-image batched >= {TARGETS['rnam_batched_speedup']:g}x one by one, scores equal",
        "candidates": count,
        "size": size,
        "width": sizes["width"],
        **results,
    }


def check_classification_throughput(sizes: dict, repeats: int) -> dict:
    """Slices/s of the 1-GAP classifier's logits and NAM in one pass with AMP (inference)."""
    device = _device()
    size, batch = sizes["size"], 2 * sizes["batch"]
    model = classifier(1, sizes["width"]).to(device).eval()
    images = torch.rand(batch, 1, size, size, device=device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            model.forward_with_nam(images)

    rate = batch / _timed(forward, device, repeats, warmup=3 if device.type == "cuda" else 1)
    if device.type != "cuda":
        status = "measured"
    else:
        status = "pass" if rate >= TARGETS["classification_slices_per_s"] else "fail"
    return {
        "status": status,
        "target": f">= {TARGETS['classification_slices_per_s']:g} slices/s",
        "slices_per_s": rate,
        "size": size,
        "width": sizes["width"],
        "batch": batch,
    }


def check_bench_scan(args: str, timeout: int) -> dict:
    """``bench/bench_scan.py`` with its own arguments, when someone has written it."""
    script = REPO / "bench" / "bench_scan.py"
    if not script.is_file():
        raise Skip(f"{script.relative_to(REPO)} does not exist yet")
    command = [sys.executable, str(script), *shlex.split(args)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return {
        "status": "pass" if done.returncode == 0 else "fail",
        "command": shlex.join(command[1:]),
        "rc": done.returncode,
        "seconds": time.perf_counter() - start,
        "output_tail": _tail(done.stdout + done.stderr),
    }


def run_checks(args: argparse.Namespace) -> dict:
    """Every selected check in turn, each caught on its own; the whole report."""
    sizes = TINY_SIZE if args.tiny else PAPER_SIZE
    iters = 2 if args.tiny else 10
    began = time.perf_counter()

    def timeout() -> int:
        # each subprocess gets --timeout, cut to what is left of --budget so that the whole run stays inside it
        return int(max(30, min(args.timeout, args.budget - (time.perf_counter() - began))))

    runners: dict[str, Callable[[], dict]] = {
        "amp_training": lambda: check_amp_training(sizes),
        "torchrun_nccl": lambda: check_torchrun_nccl(timeout),
        "training_throughput": lambda: check_training_throughput(sizes, args.peak_tflops, iters),
        "rnam_batched": lambda: check_rnam_batched(sizes, repeats=3 if args.tiny else 10),
        "classification_throughput": lambda: check_classification_throughput(sizes, iters),
        "bench_scan": lambda: check_bench_scan(args.scan_args, timeout()),
    }
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "tiny": args.tiny,
        "checks": {},
    }
    for name in args.only or CHECKS:
        start = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            result = runners[name]()
        except Skip as reason:
            result = {"status": "skipped", "reason": str(reason)}
        except Exception as err:  # a check that raises is reported loudly; the others still run
            traceback.print_exc()
            result = {"status": "error", "error": f"{type(err).__name__}: {err}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        result["seconds"] = time.perf_counter() - start
        report["checks"][name] = result
        status = result["status"].upper()
        print(f"{status:8s} {name}: {json.dumps({k: v for k, v in result.items() if k != 'status'}, default=str)}")
        sys.stdout.flush()
    report["seconds"] = time.perf_counter() - began
    report["failed"] = [n for n, r in report["checks"].items() if r["status"] in ("fail", "error")]
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the checks, print a summary, write the JSON; 1 if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (32 px, width 0.0625): a CPU smoke run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not listed")
    parser.add_argument("--scan-args", default="", help="arguments for bench/bench_scan.py")
    parser.add_argument("--timeout", type=int, default=240, help="seconds allowed to each subprocess")
    parser.add_argument("--budget", type=int, default=450, help="seconds for the whole run (subprocesses are cut)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        nccl_worker()
        return 0
    report = run_checks(args)
    write_json(args.out, report)
    print(f"\n{len(report['checks'])} checks in {report['seconds']:.0f} s on {report['device']}:")
    for name, result in report["checks"].items():
        print(f"  {result['status']:8s} {name}")
    print(f"wrote {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
