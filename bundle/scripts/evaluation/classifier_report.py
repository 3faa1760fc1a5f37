"""The classifier's report on a labelled split: AUC, accuracy, where its NAM looks, and a picture of it.

``ClassifierReport`` is a handler of ``configs/classify.json``'s evaluator: it collects each slice's nodule
probability and NAM (on the slice's own grid, after ``Invertd``), compares them with the prepared split's classes,
ground truth and lung masks (``scripts.evaluation.localisation``), and at the end prints the figures, writes them to
``classifier_report.json`` and draws ``nam_sheet.png`` (``scripts.evaluation.nam_sheet``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events

from ..data.dataset import load_split, slice_stem
from ..utils.io import write_json
from .localisation import TOLERANCE_PX, SliceLocalisation, format_localisation, localisation_summary, localise
from .nam_sheet import draw_nam_sheet

__all__ = ["ClassifierReport"]

logger = logging.getLogger(__name__)


def _plane(array: Any) -> np.ndarray:
    """A ``(H, W)`` plane of a ``(1, H, W)``, ``(H, W)`` or ``(H, W, 1)`` array; a 2.5-D ``(C, H, W)`` image keeps
    its channels."""
    array = np.asarray(array, dtype=np.float32)
    return array.reshape(array.shape[-2:]) if array.size == np.prod(array.shape[-2:]) else array


class ClassifierReport:
    """Collect the evaluator's probabilities and NAMs on a labelled split, then report (see the module docstring).

    Args:
        dataset_dir: the prepared dataset the evaluator runs on.
        split: its split (items with ``image``, ``class``, ``label`` and ``lung``).
        output_dir: where ``classifier_report.json`` and ``nam_sheet.png`` go.
        tolerance_px: distance within which the NAM's peak counts as on the nodule.
        threshold: the nodule probability from which a slice is called a nodule slice (for the accuracy).
        sheet_slices: slices in the picture (0: none).
        probability_key, nam_key, image_key: keys of the decollated engine output items.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str,
        output_dir: str | os.PathLike,
        tolerance_px: int = TOLERANCE_PX,
        threshold: float = 0.5,
        sheet_slices: int = 12,
        probability_key: str = "probability",
        nam_key: str = "nam",
        image_key: str = "image",
    ) -> None:
        items = load_split(dataset_dir, split, required=("image", "class", "label", "lung"))
        self.items = {slice_stem(item["image"]): item for item in items}
        self.output_dir = Path(output_dir)
        self.tolerance_px = tolerance_px
        self.threshold = threshold
        self.sheet_slices = sheet_slices
        self.keys = (probability_key, nam_key, image_key)
        self.classes: list[int] = []
        self.probabilities: list[float] = []
        self.found: list[SliceLocalisation] = []
        self.pictured: dict[tuple[str, bool], dict] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.classes, self.probabilities, self.found, self.pictured = [], [], [], {}

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        probability_key, nam_key, image_key = self.keys
        for out in [output] if isinstance(output, dict) else output:
            name = getattr(out[image_key], "meta", {}).get("filename_or_obj", "")
            item = self.items.get(slice_stem(str(name)))
            if item is None:
                raise ValueError(f"{name}: the evaluator's slice is not in the report's split")
            self.classes.append(int(item["class"]))
            self.probabilities.append(float(np.asarray(out[probability_key]).ravel()[0]))
            if self.classes[-1] != 1:
                continue
            nam = _plane(out[nam_key])
            label = np.asarray(nib.load(str(item["label"])).dataobj) > 0
            lung = np.asarray(nib.load(str(item["lung"])).dataobj) > 0
            self.found.append(localise(nam, label, lung, self.tolerance_px))
            # the arrays are kept for the picture only: one hit and one miss per subject
            subject = slice_stem(item["image"]).rsplit("_", 1)[0]
            key = (subject, self.found[-1].near)
            if key not in self.pictured:
                self.pictured[key] = {
                    "class": 1,
                    "subject": subject,
                    "probability": self.probabilities[-1],
                    "image": _plane(out[image_key]),
                    "nam": nam,
                    "label": label,
                    "lung": lung,
                }

    def _report(self, engine: Engine) -> None:
        summary = {**localisation_summary(self.found, self.probabilities, self.classes, self.threshold)}
        summary["threshold"] = self.threshold
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "classifier_report.json", summary)
        if self.sheet_slices:
            draw_nam_sheet(list(self.pictured.values()), self.output_dir / "nam_sheet.png", self.sheet_slices)
        logger.info(format_localisation(summary))
