"""Running the scan inference over many scans: one after the other, a failing scan reported and skipped.

``ScanRunner`` is the ``evaluator`` of ``configs/inference.json``: for each item of its dataset (whose transform is
the config's ``preprocessing``) it runs the inferer, the ``postprocessing`` and the writer, with a progress bar and
one line per scan. A scan that fails with a ``ScanError`` (unreadable, two series, not CT, no lungs ...) is reported
by name with the reason and the others go on; the run then ends with an error listing the failed scans. With
``torch.distributed`` initialised (``torchrun``), process ``r`` of ``n`` takes the scans ``r, r + n, ...``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from monai.data import Dataset
from tqdm import tqdm

from .atomic import write_json
from .read import ScanError

__all__ = ["ScanRunner"]


def _scan_error(error: BaseException | None) -> ScanError | None:
    """The ``ScanError`` an error is, or was raised from; None for any other error (a bug is not a bad scan)."""
    while error is not None:
        if isinstance(error, ScanError):
            return error
        error = error.__cause__ or error.__context__
    return None


class ScanRunner:
    """Segment every scan of ``dataset`` and write its outputs.

    Args:
        dataset: items ``{"image", "source", "name"}`` (``scripts.read.scan_datalist``) with the preprocessing.
        network: the classifier (weights loaded).
        inferer: the scan inferer (``scripts.scan.ScanSegmenter``).
        postprocessing: back to the input grid and the tables (``Invertd``, ``scripts.assemble.ScanResultd``).
        writer: writes one scan's outputs (``scripts.write.ScanWriter``).
        device: where the network and the volumes go.
        summary_path: optional JSON file listing what was done and what failed (one per process when sharded).
    """

    def __init__(
        self,
        dataset: Dataset,
        network: torch.nn.Module,
        inferer: Callable,
        postprocessing: Callable,
        writer: Callable,
        device: str | torch.device = "cpu",
        summary_path: str = "",
    ) -> None:
        self.dataset, self.network, self.inferer = dataset, network, inferer
        self.postprocessing, self.writer = postprocessing, writer
        self.device = torch.device(device)
        self.summary_path = summary_path

    def run(self) -> dict[str, Any]:
        """Process this process' share of the scans; return ``{"done": [...], "failed": [...]}``."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        indices = list(range(rank, len(self.dataset), world))
        network = self.network.to(self.device).eval()
        done, failed = [], []
        bar = tqdm(indices, desc=f"scans (process {rank})" if world > 1 else "scans", unit="scan", disable=not indices)
        for index in bar:
            item = self.dataset.data[index]
            name = item.get("name", str(item.get("image")))
            start = time.perf_counter()
            try:
                data = self.dataset[index]
                volume = data["image"]
                with torch.no_grad():
                    data["pred"] = self.inferer(volume[None].to(self.device), network)[0]
                data = self.postprocessing(data)
                written = self.writer(data)
            except Exception as err:  # MONAI's Compose re-raises a transform's error as a RuntimeError from it
                cause = _scan_error(err)
                if cause is None:
                    raise
                failed.append({"name": name, "reason": str(cause)})
                tqdm.write(f"{name}: FAILED: {cause}")
                continue
            seconds = time.perf_counter() - start
            nodules = data["result"]["nodules"]
            called = sum(row["called_nodule"] for row in data["result"]["slices"])
            done.append({"name": name, "nodules": len(nodules), "seconds": round(seconds, 2), "outputs": written})
            tqdm.write(
                f"{name}: {len(nodules)} nodule(s), {called} of {len(data['result']['slices'])} slices called "
                f"nodule, {seconds:.1f} s -> {written['nodules_json'].parent}"
            )
        summary = {"done": done, "failed": failed}
        if self.summary_path:
            path = self.summary_path if world == 1 else self.summary_path.replace(".json", f".rank{rank}.json")
            write_json(
                path,
                {**summary, "done": [{**d, "outputs": {k: str(v) for k, v in d["outputs"].items()}} for d in done]},
            )
        if failed:  # after the others are done, so that one bad scan costs only itself
            raise ScanError(f"{len(failed)} of {len(indices)} scan(s) failed: " + "; ".join(f["name"] for f in failed))
        return summary
