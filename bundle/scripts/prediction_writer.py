"""Per-slice outputs of the weakly supervised segmenter: masks, NAMs, JSON records and Fig. 2-like PNG panels.

``SegmentationResultd`` (a postprocessing transform) copies the segmenter's per-slice details into the data
dict (``result`` as JSON-ready dict, as MONAI Label returns it; ``nam``, ``scope`` and ``candidates`` as arrays
that ``Invertd`` can take back to the input geometry). ``PredictionWriter`` (an Ignite handler) writes
``masks/<stem>.nii.gz``, ``nams/<stem>.nii.gz``, ``records/<stem>.json`` and ``panels/<stem>.png`` under an
output folder, every file to a temporary name first and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .atomic import write_atomically, write_json
from .dataset import slice_stem
from .segmenter import WeaklySupervisedSegmenter

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = [
    "optional_classifier",
    "SegmentationResultd",
    "PredictionWriter",
    "save_panel",
    "write_nifti",
]


def optional_classifier(model: torch.nn.Module, path: str, enabled: bool = True) -> torch.nn.Module | None:
    """``model`` with the checkpoint at ``path`` loaded when ``enabled``, else None (a config switch)."""
    if not enabled:
        return None
    from .networks import load_checkpoint

    return load_checkpoint(model, path).eval()


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    """Write a 2-D array as NIfTI with the given affine, atomically."""
    image = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    image.set_data_dtype(dtype)
    write_atomically(path, lambda tmp: nib.save(image, tmp))


def save_panel(
    path: str | os.PathLike,
    hu: np.ndarray,
    nam: np.ndarray,
    scopes: np.ndarray,
    candidates: np.ndarray,
    chosen: Sequence[int],
    mask: np.ndarray,
    label: np.ndarray | None = None,
    title: str = "",
    scores: Sequence[float | None] = (),
) -> None:
    """A Fig. 2-like panel: image (+ ground truth), NAM with scope(s), candidates (chosen in red), final mask.

    Args:
        hu: ``(H, W)`` slice in HU (shown in a lung window).
        nam: ``(H, W)`` raw NAM.
        scopes: ``(H, W)`` int map of the scope(s) (0 = outside).
        candidates: ``(H, W)`` int map, candidate j labelled ``j + 1``.
        chosen: indices of the chosen candidates.
        mask: ``(H, W)`` final mask.
        label: optional ``(H, W)`` ground truth, drawn in green.
        title: figure title.
        scores: R-NAM score of each candidate (None where not computed), printed beside it.
    """
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    window = {"cmap": "gray", "vmin": -1000, "vmax": 400}
    for ax in axes:
        ax.imshow(hu, **window)
        ax.set_axis_off()

    def contour(ax, m, colour, style="solid") -> None:
        if m is not None and np.any(m):
            ax.contour(np.asarray(m, float), levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)

    axes[0].set_title("image + ground truth")
    axes[1].imshow(nam, cmap="jet", alpha=0.5)
    for k in range(1, int(scopes.max()) + 1 if scopes.size else 1):
        contour(axes[1], scopes == k, "white")
    axes[1].set_title("NAM + scope C")
    for j in range(int(candidates.max()) if candidates.size else 0):
        contour(axes[2], candidates == j + 1, "red" if j in chosen else "yellow")
        if j < len(scores) and scores[j] is not None:
            r, c = np.argwhere(candidates == j + 1).min(0)
            axes[2].text(c, r - 2, f"{scores[j]:.3g}", color="yellow", fontsize=7)
    axes[2].set_title("candidates (R-NAM scores)")
    contour(axes[3], mask, "red")
    axes[3].set_title("segmentation")
    for ax in (axes[0], axes[3]):
        contour(ax, label, "lime")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


class SegmentationResultd(MapTransform):
    """Copy the segmenter's details for this item into the data dict (postprocessing after the inferer).

    Sets ``result`` (the JSON-ready record, as MONAI Label returns ``data["result"]``) and ``(1, H, W)``
    tensors ``nam`` (raw NAM), ``scope`` (scope index per pixel, 0 outside) and ``candidates`` (candidate
    j labelled j + 1) carrying the prediction's meta, so ``Invertd`` can take them back to the input geometry.
    Items of one batch are taken in order.

    Args:
        inferer: the segmenter whose ``last_results`` are read.
        keys: the prediction key (its meta is copied).
        result_key, nam_key, scope_key, candidates_key: output keys.
    """

    def __init__(
        self,
        inferer: WeaklySupervisedSegmenter,
        keys: KeysCollection = "pred",
        result_key: str = "result",
        nam_key: str = "nam",
        scope_key: str = "scope",
        candidates_key: str = "candidates",
    ) -> None:
        super().__init__(keys)
        self.inferer = inferer
        self.out_keys = (result_key, nam_key, scope_key, candidates_key)
        self._batch: list | None = None
        self._next = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        results = self.inferer.last_results
        if results is not self._batch:  # a new inferer call: start again at its first item
            self._batch, self._next = results, 0
        if self._next >= len(results):
            raise ValueError("SegmentationResultd: more items than the segmenter's last call produced")
        result = results[self._next]
        self._next += 1
        pred = d[self.first_key(d)]
        scope_map = np.zeros(result.mask.shape, np.float32)
        for k, s in enumerate(result.scopes):
            scope_map[s & (scope_map == 0)] = k + 1
        cand_map = np.zeros(result.mask.shape, np.float32)
        for j, c in enumerate(result.candidates):
            cand_map[c.mask] = j + 1
        result_key, *array_keys = self.out_keys
        d[result_key] = result.to_record()
        for key, array in zip(array_keys, (result.nam.astype(np.float32), scope_map, cand_map)):
            out = torch.zeros_like(pred, dtype=torch.float32)
            out.copy_(torch.as_tensor(array)[None])
            d[key] = out
        return d


class PredictionWriter:
    """Ignite handler writing each segmented item's mask, NAM, record and (for a sample) panel.

    Files go to ``<output_dir>/{masks,nams,records,panels}/<stem>``, ``stem`` being the image file name without
    ``.nii.gz``; masks and NAMs get the source file's affine, and must have its shape (the postprocessing
    inverts any padding/cropping first).

    Args:
        output_dir: output folder.
        max_panels: panels written for the first this many slices that are segmented or hold a nodule.
        keys: ``(image, pred, nam, scope, candidates, result, label)`` keys of the decollated items.
    """

    def __init__(
        self,
        output_dir: str,
        max_panels: int = 16,
        keys: Sequence[str] = ("image", "pred", "nam", "scope", "candidates", "result", "label"),
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_panels = max_panels
        self.keys = tuple(keys)
        self.panels = 0

    def attach(self, engine) -> None:
        """Write after every iteration of ``engine``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        outputs = engine.state.output
        for item in outputs if isinstance(outputs, list) else [outputs]:
            self.write_item(item)

    def write_item(self, item: Mapping[str, Any]) -> None:
        """Write one decollated item's files."""
        image_key, pred_key, nam_key, scope_key, cand_key, result_key, label_key = self.keys
        source = str(item[image_key].meta["filename_or_obj"])
        stem = slice_stem(source)
        src = nib.load(source)
        mask = _plane(item[pred_key], src.shape, source).astype(np.uint8)
        nam = _plane(item[nam_key], src.shape, source)
        write_nifti(self.output_dir / "masks" / f"{stem}.nii.gz", mask, src.affine, np.uint8)
        write_nifti(self.output_dir / "nams" / f"{stem}.nii.gz", nam, src.affine, np.float32)
        record = {"image": source, **item[result_key]}
        write_json(self.output_dir / "records" / f"{stem}.json", record)
        # the ground truth is only drawn, never fed to the network: read it from its file, whichever way it came
        label_item = item.get(label_key)
        if isinstance(label_item, torch.Tensor) and hasattr(label_item, "meta"):
            label_item = label_item.meta["filename_or_obj"]
        label = np.asarray(nib.load(str(label_item)).dataobj) if isinstance(label_item, (str, Path)) else None
        interesting = record["status"] != "negative" or (label is not None and label.any())
        if self.panels < self.max_panels and interesting:
            self.panels += 1
            save_panel(
                self.output_dir / "panels" / f"{stem}.png",
                np.asarray(src.dataobj, dtype=np.float32),
                nam,
                _plane(item[scope_key], src.shape, source).round().astype(int),
                _plane(item[cand_key], src.shape, source).round().astype(int),
                record["chosen"],
                mask,
                label,
                title=f"{stem}: p(nodule) = {record['probability']:.3f}, {record['status']}",
                scores=[c["rnam_score"] for c in record["candidates"]],
            )


def _plane(value: Any, shape: tuple[int, ...], source: str) -> np.ndarray:
    """A ``(1, H, W)`` tensor as an ``(H, W)`` array of the source image's shape."""
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    array = array.reshape(array.shape[-2:]) if array.ndim == 3 and array.shape[0] == 1 else array
    if array.shape != tuple(shape[:2]) or len(shape) != 2:
        raise ValueError(f"{source}: prediction shape {array.shape} differs from the image shape {tuple(shape)}")
    return array
