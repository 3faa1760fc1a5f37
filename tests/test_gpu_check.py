"""bench/gpu_check.py at a tiny size on the CPU: the checks that can run here run and give their figures; the
CUDA-only ones are skipped with their reason; a check that raises is reported and the others still run."""

import importlib.util
import json
import math
import sys
import time

import pytest
import torch
from torch import nn

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)

CPU_CHECKS = ["amp_training", "training_throughput", "rnam_batched", "classification_throughput"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: on a GPU run bench/gpu_check.py itself")
def test_cpu_checks_run_tiny_and_cuda_ones_skip(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--tiny", "--only", *CPU_CHECKS, "torchrun_nccl", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["failed"] == []
    checks = report["checks"]
    assert list(checks) == [*CPU_CHECKS, "torchrun_nccl"]
    assert checks["torchrun_nccl"]["status"] == "skipped" and "needs CUDA" in checks["torchrun_nccl"]["reason"]
    amp = checks["amp_training"]
    assert amp["status"] == "pass" and amp["amp"].startswith("bfloat16")
    for name in ("1-GAP", "2-GAP", "3-GAP", "U-Net"):
        assert len(amp[name]["loss_amp"]) == 3 and amp[name]["finite"]
        assert all(math.isfinite(v) for v in amp[name]["loss_amp"] + amp[name]["loss_fp32"])
        assert amp[name]["relative_difference"][0] <= 0.01
    # targets are for a GPU: on a CPU the figures are measured, not judged
    throughput = checks["training_throughput"]
    assert throughput["status"] == "measured" and throughput["bf16_peak_tflops"] is None
    gflops = [throughput[f"{k}-GAP"]["gflop_per_slice_step"] for k in (1, 2, 3)]
    assert gflops[0] < gflops[1] < gflops[2]  # each head adds its convolution
    batch, steps = gpu_check.TINY_SIZE["batch"], 2  # --tiny times 2 steps of each model
    for k in (1, 2, 3):
        entry = throughput[f"{k}-GAP"]
        assert entry["achieved_tflops"] == pytest.approx(entry["slices_per_s"] * entry["gflop_per_slice_step"] / 1e3)
        # half the steps take at least the median, and they all ran within the check's time
        assert entry["slices_per_s"] >= batch * steps / (2 * throughput["seconds"]), k
    # the same training step and the same inference pass timed here: the check's rates agree within a factor of ten
    own = _own_rates()
    assert own["training"] / 10 < throughput["1-GAP"]["slices_per_s"] < 10 * own["training"], own
    classification = checks["classification_throughput"]["slices_per_s"]
    assert own["classification"] / 10 < classification < 10 * own["classification"], own
    rnam = checks["rnam_batched"]
    assert rnam["status"] == "measured" and rnam["candidates"] == 8
    for path in ("full_image", "default"):
        assert rnam[path]["max_rel_diff_batched_vs_one_by_one"] < 1e-3
        assert rnam[path]["batched_speedup"] == pytest.approx(rnam[path]["one_by_one_s"] / rnam[path]["batched_s"])
        assert 0 < rnam[path]["batched_s"] < rnam["seconds"] and 0 < rnam[path]["one_by_one_s"] < rnam["seconds"]
    assert "wrote" in capsys.readouterr().out


def _own_rates(repeats: int = 5) -> dict:
    """Slices/s of the tiny 1-GAP classifier's AMP training step (SGD, cross-entropy) and of its logits-and-NAM pass
    in evaluation mode, the best of ``repeats`` after a first run, as bench/gpu_check.py runs them on a CPU."""
    sizes = gpu_check.TINY_SIZE
    torch.manual_seed(0)
    model = gpu_check.classifier(1, sizes["width"]).to(memory_format=torch.channels_last)
    images = torch.rand(sizes["batch"], 1, sizes["size"], sizes["size"])
    labels = torch.arange(sizes["batch"]) % 2
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    doubled = torch.cat([images, images])  # the classification check's batch

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    def classify() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.forward_with_nam(doubled)

    def best_seconds(step) -> float:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    training = len(images) / best_seconds(train)
    model.eval()
    return {"training": training, "classification": len(doubled) / best_seconds(classify)}


def test_a_failing_check_does_not_stop_the_others(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpu_check, "check_rnam_batched", broken)
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--tiny", "--only", "rnam_batched", "classification_throughput", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 1 and report["failed"] == ["rnam_batched"]
    assert report["checks"]["rnam_batched"] == {
        "status": "error",
        "error": "RuntimeError: CUDA error: out of memory",
        "seconds": report["checks"]["rnam_batched"]["seconds"],
    }
    assert report["checks"]["classification_throughput"]["slices_per_s"] > 0


def test_bench_scan_slot_skips_without_the_script_and_runs_it_when_there(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    with pytest.raises(gpu_check.Skip, match="bench_scan.py does not exist yet"):
        gpu_check.check_bench_scan("", 30)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench_scan.py").write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    result = gpu_check.check_bench_scan("--size 64 --scans 1", 30)
    assert result["status"] == "fail" and result["rc"] == 3
    assert "args ['--size', '64', '--scans', '1']" in result["output_tail"]


def test_flop_count_and_peak_table():
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 2))
    # conv: 2 * (8 * 16 * 16 outputs) * (3 * 3 * 1); linear: 2 * 2 * 2048
    assert gpu_check.count_flops(conv, torch.rand(1, 1, 16, 16)) == 2 * 8 * 256 * 9 + 2 * 2 * 2048
    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.bf16_peak_tflops("NVIDIA L40S") == 362.0 and gpu_check.bf16_peak_tflops("NVIDIA L4") == 121.0
    assert gpu_check.bf16_peak_tflops("Tesla T4") is None
