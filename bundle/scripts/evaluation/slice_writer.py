"""Per-slice outputs of the weakly supervised segmenter: masks, NAMs, JSON records and Fig. 2-like PNG panels.

``PredictionWriter`` (an Ignite handler) reads the segmenter's named outputs from each decollated item (``mask``,
``nam``, ``scope``, ``candidates`` back on the input geometry after ``Invertd``, and the ``record``) and writes
``masks/<stem>.nii.gz``, ``nams/<stem>.nii.gz`` and ``records/<stem>.json`` for every slice, and
``panels/<stem>.png`` for a sample across outcomes and subjects (listed in ``panels/index.json``) under an
output folder, every file to a temporary name first and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ..data.dataset import slice_stem
from ..pipeline.context import centre_channel
from ..utils.io import write_json, write_nifti
from .panels import OUTCOMES, panel_outcome, save_panel

__all__ = [
    "PredictionWriter",
]


def _pack(array: np.ndarray) -> tuple[tuple[int, ...], str, bytes]:
    """A small map kept until the panels are drawn, compressed (scope and candidate maps are mostly zero)."""
    array = np.ascontiguousarray(array)
    return array.shape, array.dtype.str, zlib.compress(array.tobytes(), 1)


def _unpack(packed: tuple[tuple[int, ...], str, bytes]) -> np.ndarray:
    shape, dtype, data = packed
    return np.frombuffer(zlib.decompress(data), dtype=dtype).reshape(shape)


class PredictionWriter:
    """Ignite handler writing each segmented item's mask, NAM and record, and panels for a sample of the slices.

    Files go to ``<output_dir>/{masks,nams,records,panels}/<stem>``, ``stem`` being the image file name without
    ``.nii.gz``; masks and NAMs get the source file's affine, and must have its shape (the postprocessing
    inverts any padding/cropping first).

    Panels are drawn when the epoch completes, for up to ``max_panels`` slices sampled across outcomes
    (:data:`OUTCOMES`: TP, miss, wrong place, FP, ...; one from each in turn) and, within an outcome, across
    subjects (one slice of each subject in turn, slices in a fixed pseudo-random order by name, so not consecutive
    slices of one nodule). ``panels/index.json`` lists them with the number of slices of each outcome. When every
    slice was called negative, the writer says so (a warning, and ``all_negative`` in the index).

    The ground truth (only drawn, never fed to the network) is read from the item's ``label`` or, since a
    ``SupervisedEvaluator`` keeps a label file name only in its batch (its ``prepare_batch`` passes on tensors
    alone), from the batch item's ``label`` file.

    Args:
        output_dir: output folder.
        max_panels: panels drawn per run.
        keys: ``(image, mask, nam, scope, candidates, record, label)`` keys of the decollated items (the segmenter's
            named outputs; the record as JSON text).
        settings: what made the masks (``WeaklySupervisedSegmenter.settings()``, the bundle version), written to
            ``<output_dir>/settings.json`` when a run starts.
    """

    def __init__(
        self,
        output_dir: str,
        max_panels: int = 16,
        keys: Sequence[str] = ("image", "mask", "nam", "scope", "candidates", "record", "label"),
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_panels = max_panels
        self.keys = tuple(keys)
        self.settings = None if settings is None else dict(settings)
        self.reset()

    def reset(self) -> None:
        """Forget the slices seen (a new run)."""
        self.panels = 0
        self._pending: list[dict] = []
        self._seen = self._called_positive = 0
        self._outcomes: dict[str, int] = {}
        self._max_probability = float("-inf")

    def start(self) -> None:
        """A new run: forget the slices seen and write ``settings.json``."""
        self.reset()
        if self.settings is not None:
            write_json(self.output_dir / "settings.json", self.settings)

    def attach(self, engine) -> None:
        """Write the settings when ``engine`` starts, the files after every iteration, the panels when its epoch
        completes."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.start())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self.write_panels())

    def __call__(self, engine) -> None:
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [None] * len(outputs)
        for item, batch_item in zip(outputs, batch):
            self.write_item(item, batch_item)

    def write_item(self, item: Mapping[str, Any], batch_item: Mapping[str, Any] | None = None) -> None:
        """Write one decollated item's files (``batch_item``: its input item, where a label file may be named)."""
        image_key, mask_key, nam_key, scope_key, cand_key, record_key, label_key = self.keys
        source = str(item[image_key].meta["filename_or_obj"])
        stem = slice_stem(source)
        src = nib.load(source)
        mask = _plane(item[mask_key], src.shape, source).astype(np.uint8)
        nam = _plane(item[nam_key], src.shape, source)
        write_nifti(self.output_dir / "masks" / f"{stem}.nii.gz", mask, src.affine, np.uint8)
        write_nifti(self.output_dir / "nams" / f"{stem}.nii.gz", nam, src.affine, np.float32)
        record = {"image": source, **json.loads(item[record_key])}
        write_json(self.output_dir / "records" / f"{stem}.json", record)

        label = _ground_truth(item.get(label_key), None if batch_item is None else batch_item.get(label_key), src)
        self._seen += 1
        self._called_positive += record["status"] != "negative"
        self._max_probability = max(self._max_probability, float(record["probability"]))
        outcome = panel_outcome(mask, label, record["status"])
        if outcome is None:
            return
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        subject = batch_item.get("subject") if isinstance(batch_item, Mapping) else None
        self._pending.append(
            {
                "stem": stem,
                "subject": str(subject) if subject is not None else stem.rsplit("_", 1)[0],
                "outcome": outcome,
                "source": source,
                "record": record,
                "label": None if label is None else _pack(label.astype(np.uint8)),
                "scope": _pack(_plane(item[scope_key], src.shape, source).round().astype(np.int16)),
                "candidates": _pack(_plane(item[cand_key], src.shape, source).round().astype(np.int16)),
                "order": zlib.crc32(stem.encode()),  # a fixed shuffle: neighbouring slices spread out
            }
        )

    def sample(self) -> list[dict]:
        """The slices to draw: one of each outcome in turn, within an outcome one of each subject in turn."""
        queues = []
        for outcome in OUTCOMES:
            by_subject: dict[str, list[dict]] = {}
            for entry in sorted((p for p in self._pending if p["outcome"] == outcome), key=lambda p: p["order"]):
                by_subject.setdefault(entry["subject"], []).append(entry)
            lists = list(by_subject.values())
            queue = [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]
            queues.append(queue)
        chosen = []
        for i in range(max(map(len, queues), default=0)):
            chosen += [queue[i] for queue in queues if i < len(queue)]
        return chosen[: max(self.max_panels, 0)]

    def write_panels(self) -> dict:
        """Draw the sampled panels and write ``panels/index.json``; returns what the index holds."""
        panels = []
        for entry in self.sample():
            record, stem = entry["record"], entry["stem"]
            src = nib.load(entry["source"])
            nam = np.asarray(nib.load(str(self.output_dir / "nams" / f"{stem}.nii.gz")).dataobj, np.float32)
            mask = np.asarray(nib.load(str(self.output_dir / "masks" / f"{stem}.nii.gz")).dataobj)
            title = (
                f"{stem} (subject {entry['subject']}): {entry['outcome']}; "
                f"p(nodule) = {record['probability']:.3f}, {record['status']}"
            )
            save_panel(
                self.output_dir / "panels" / f"{stem}.png",
                _slice_itself(np.asarray(src.dataobj, dtype=np.float32)),
                nam,
                _unpack(entry["scope"]).astype(int),
                _unpack(entry["candidates"]).astype(int),
                record["chosen"],
                mask,
                None if entry["label"] is None else _unpack(entry["label"]),
                title=title,
                scores=[c["rnam_score"] for c in record["candidates"]],
                areas_mm2=[c["area_mm2"] for c in record["candidates"]],
                base_scope_box=record.get("base_scope_box") if record.get("scope_refined") else None,
            )
            panels.append({"stem": stem, "subject": entry["subject"], "outcome": entry["outcome"]})
        self.panels = len(panels)
        all_negative = self._seen > 0 and self._called_positive == 0
        message = None
        if all_negative:
            message = (
                f"every one of the {self._seen} slices was called negative (highest p(nodule) "
                f"{self._max_probability:.3f}): nothing was segmented"
                + (
                    f"; the panels show {self._outcomes['miss']} missed nodule slice(s)"
                    if "miss" in self._outcomes
                    else ""
                )
                + ". Check the model, its image_size and the threshold."
            )
            logging.getLogger(__name__).warning("%s: %s", self.output_dir, message)
        index = {
            "slices": self._seen,
            "called_positive": self._called_positive,
            "all_negative": all_negative,
            "message": message,
            "outcomes": {o: self._outcomes.get(o, 0) for o in OUTCOMES},
            "panels": panels,
        }
        write_json(self.output_dir / "panels" / "index.json", index)
        return index


def _ground_truth(value: Any, fallback: Any, source_image: Any) -> np.ndarray | None:
    """The ``(H, W)`` ground truth of a slice from a label file name, a MetaTensor naming its file, or an array;
    None when neither ``value`` nor ``fallback`` gives one."""
    for candidate in (value, fallback):
        if isinstance(candidate, torch.Tensor) and "filename_or_obj" in getattr(candidate, "meta", {}):
            candidate = candidate.meta["filename_or_obj"]  # the file: the tensor went through the preprocessing
        if isinstance(candidate, (str, os.PathLike)) and str(candidate):
            path = Path(candidate)
            if not path.is_file():
                raise FileNotFoundError(f"missing ground truth for {source_image.get_filename()}: {path}")
            label = np.asarray(nib.load(str(path)).dataobj)
            label = (
                label.reshape(label.shape[:2]) if label.ndim > 2 and label.size == np.prod(label.shape[:2]) else label
            )
            if label.shape != source_image.shape[:2]:
                raise ValueError(
                    f"{path}: ground truth shape {label.shape} differs from the image's {source_image.shape}"
                )
            return label > 0
        if isinstance(candidate, (np.ndarray, torch.Tensor)):
            return _plane(candidate, source_image.shape, str(source_image.get_filename())) > 0
    return None


def _slice_itself(image: np.ndarray) -> np.ndarray:
    """The slice of a slice file: the file itself, or the centre channel of a 2.5-D one ``(H, W, C)``."""
    return image[..., centre_channel(image.shape[2])] if image.ndim == 3 else image


def _plane(value: Any, shape: tuple[int, ...], source: str) -> np.ndarray:
    """A ``(1, H, W)`` tensor as an ``(H, W)`` array of the source image's shape (``(H, W)``, or ``(H, W, C)`` for
    a 2.5-D slice)."""
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    array = array.reshape(array.shape[-2:]) if array.ndim == 3 and array.shape[0] == 1 else array
    if array.shape != tuple(shape[:2]) or len(shape) not in (2, 3):
        raise ValueError(f"{source}: prediction shape {array.shape} differs from the image shape {tuple(shape)}")
    return array
