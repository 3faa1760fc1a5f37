"""Running the scan inference over many scans: one after the other, a failing scan reported and skipped.

``ScanRunner`` is the ``evaluator`` of ``configs/inference.json``: for each item of its dataset (whose transform is
the config's ``preprocessing``) it runs the inferer, the ``postprocessing`` and the writer, with a progress bar and
one line per scan. A scan that fails, whatever the error and the step (a ``ScanError``: unreadable, two series, not
CT, no lungs ...; or anything else in reading, inference, post-processing or writing: a ``MemoryError``, a bug in a
transform, a writer failure), is reported by name with the reason, recorded in the summary, and the others go on;
the writer leaves nothing of it. The run then ends with an error listing the failed scans. ``KeyboardInterrupt``
stops the run at once. With ``torch.distributed`` initialised (``torchrun``), process ``r`` of ``n`` takes the scans
``r, r + n, ...``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.data import Dataset, decollate_batch
from tqdm import tqdm

from ..utils.io import write_json
from .read import ScanError

__all__ = ["ScanRunner"]


def _scan_error(error: BaseException | None) -> ScanError | None:
    """The ``ScanError`` an error is, or was raised from; None for any other error."""
    while error is not None:
        if isinstance(error, ScanError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _reason(error: Exception, step: str) -> str:
    """What to tell the user about a failed scan: a ``ScanError``'s message (it names the file and the problem), else
    the error's type and message and the step it happened in. MONAI's ``apply_transform`` re-raises a transform's
    error as ``RuntimeError("applying transform <object at 0x...>")`` from it, which says neither what nor why: the
    error it wraps is reported instead."""
    cause = _scan_error(error)
    if cause is not None:
        return str(cause)
    while (
        isinstance(error, RuntimeError) and str(error).startswith("applying transform") and error.__cause__ is not None
    ):
        error = error.__cause__
    return f"{type(error).__name__} while {step}" + (f": {error}" if str(error) else "")


class ScanRunner:
    """Segment every scan of ``dataset`` and write its outputs.

    Args:
        dataset: items ``{"image", "source", "name"}`` (``scripts.pipeline.read.scan_datalist``) with the preprocessing.
        network: the classifier (weights loaded).
        inferer: the scan inferer (``scripts.pipeline.scan_inferer.ScanSegmenter``).
        postprocessing: from the inferer's named outputs (under ``pred``, as MONAI Label gives them) back to the input
            grid and the tables (``FlattenSubKeysd``, ``scripts.pipeline.assemble.InvertTogetherd``, ``ScanResultd``).
        writer: writes one scan's outputs, all or nothing (``scripts.pipeline.write.ScanWriter``).
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
        """Process this process' share of the scans; return ``{"done": [...], "failed": [...]}``.

        Each failed scan's entry holds its ``name``, the ``step`` that failed (reading, inference, post-processing or
        writing) and the ``reason``; for an error that is not a ``ScanError`` (a bug, not a bad scan) also the
        ``traceback``.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        indices = list(range(rank, len(self.dataset), world))
        network = self.network.to(self.device).eval()
        done, failed = [], []
        bar = tqdm(indices, desc=f"scans (process {rank})" if world > 1 else "scans", unit="scan", disable=not indices)
        for index in bar:
            item = self.dataset.data[index]
            name = item.get("name", str(item.get("image")))
            start = time.perf_counter()
            step = ["reading"]
            try:
                result, written = self._process(index, network, step)
            except Exception as err:  # KeyboardInterrupt and SystemExit are not Exceptions: they stop the run
                reason = _reason(err, step[0])
                entry = {"name": name, "step": step[0], "reason": reason}
                if _scan_error(err) is None:
                    entry["traceback"] = "".join(traceback.format_exception(type(err), err, err.__traceback__))
                failed.append(entry)
                tqdm.write(f"{name}: FAILED: {reason}")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # give the failed scan's cached blocks back for the next scan
                continue
            seconds = time.perf_counter() - start
            nodules = result["nodules"]
            called = sum(row["called_nodule"] for row in result["slices"])
            done.append({"name": name, "nodules": len(nodules), "seconds": round(seconds, 2), "outputs": written})
            tqdm.write(
                f"{name}: {len(nodules)} nodule(s), {called} of {len(result['slices'])} slices called "
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

    def _process(self, index: int, network: torch.nn.Module, step: list[str]) -> tuple[dict[str, Any], dict[str, Path]]:
        """Read, segment, post-process and write scan ``index``; return its tables and the paths written.

        ``step[0]`` names the step under way, for the report of a failure. The scan's volumes are local here, so that
        they are freed on return, before the next scan is read, rather than held through it.
        """
        data = self.dataset[index]
        step[0] = "inference"
        with torch.no_grad():
            data["pred"] = decollate_batch(self.inferer(data["image"][None].to(self.device), network))[0]
        step[0] = "post-processing"
        data = self.postprocessing(data)
        step[0] = "writing"
        written = self.writer(data)
        return data["result"], written
