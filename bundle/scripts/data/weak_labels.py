"""Weak labels from annotated volumes: what MONAI Label's training sends, turned into the classifier's slices.

An annotator marks nodules on a CT volume (in 3D Slicer, a label volume). Only the slice classes are used, which is
the point of weak supervision: an axial slice with any labelled voxel is a *nodule* slice; a slice with none, and
none within ``negative_margin`` slices, is a *clean* slice; so a dot or a short stroke on each slice a nodule covers
is enough. ``VolumeLabelSource`` reads such volumes the way the scan inference does (``LoadScand``, the axial convention
of ``scripts.pipeline.orient``), and the bundle's own dataset writer (``scripts.data.dataset.prepare_dataset``: lung
crop, negatives drawn to match the positives) makes the slices. ``WeakLabelDataset`` is the training dataset of
``configs/train.json``: it prepares volume items this way and passes prepared slice items through.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, Orientationd
from scipy import ndimage

from ..pipeline.context import DEFAULT_CONTEXT_MM
from ..pipeline.orient import AXIAL_AXCODES
from ..pipeline.read import CheckScand, LoadScand, ScanError, scan_name
from .cases import CaseAnnotations, CaseVolume, Nodule
from .dataset import SPLITS, prepare_dataset

__all__ = ["VolumeLabelSource", "is_volume_item", "prepare_weak_slices", "WeakLabelDataset"]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _label_version(label: str | os.PathLike) -> list[str]:
    """A label file's path, size and modification time: marks added in MONAI Label change them."""
    info = Path(label).stat()
    return [str(label), str(info.st_size), str(info.st_mtime_ns)]


def is_volume_item(item: Mapping[str, Any]) -> bool:
    """Whether a datalist item is a labelled volume (a DICOM folder or a 3-D file) rather than a prepared slice."""
    if "class" in item:
        return False
    image = Path(str(item["image"]))
    if image.is_dir():
        return True
    if image.name.lower().endswith((".nii", ".nii.gz")):
        shape = nib.load(str(image)).shape
        return len(shape) == 3 and min(shape) > 1
    return image.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd"))


class VolumeLabelSource:
    """Labelled CT volumes as a dataset source (``scripts.data.cases.CaseSource``); one reader per volume.

    Each 3-D connected component of a label volume is one nodule marked by one annotator, so the writer is run
    with ``min_experts=1``; the label volume must lie on the image's grid.

    Args:
        items: ``{"image": volume, "label": label volume}``.
    """

    name = "labelled_volumes"

    def __init__(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.items = {scan_name(item["image"]): dict(item) for item in items}
        if len(self.items) != len(items):
            raise ValueError("two labelled volumes share a name; give them distinct file names")
        self._cache: dict[str, CaseVolume] = {}

    def settings(self) -> dict:
        """The volumes and their label files' versions: other volumes or new marks make another dataset."""
        return {name: [str(item["image"]), *_label_version(item["label"])] for name, item in sorted(self.items.items())}

    def subjects(self) -> list[str]:
        return sorted(self.items)

    def annotations(self, subject: str) -> CaseAnnotations:
        return self.load(subject).annotations

    def load(self, subject: str) -> CaseVolume:
        if subject not in self._cache:
            self._cache = {subject: self._read(subject)}  # one volume in memory at a time
        return self._cache[subject]

    def _read(self, subject: str) -> CaseVolume:
        item = self.items[subject]
        reader = Compose(
            [
                LoadScand(keys=["image", "label"]),
                CheckScand(keys="image"),
                Orientationd(keys=["image", "label"], axcodes=AXIAL_AXCODES, labels=_RAS_LABELS),
            ]
        )
        data = reader({"image": str(item["image"]), "label": str(item["label"])})
        image, label = data["image"], data["label"]
        if image.shape != label.shape or not torch.allclose(image.affine, label.affine, atol=1e-3):
            raise ScanError(f"{item['label']}: the label volume is not on the grid of {item['image']}")
        hu = image[0].numpy().astype(np.float32)
        marks = label[0].numpy() > 0
        components, count = ndimage.label(marks, structure=np.ones((3, 3, 3), bool))
        nodules = []
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            masks = (components[box] == index)[None]
            nodules.append(Nodule(masks=masks, origin=tuple(int(s.start) for s in box), diameter_mm=float("nan")))
        spacing = tuple(float(v) for v in image.pixdim[:3])
        annotations = CaseAnnotations(
            subject=subject, shape=hu.shape, spacing=spacing, nodules=nodules, marked_slices=marks.any(axis=(0, 1))
        )
        return CaseVolume(annotations=annotations, hu=hu)


def prepare_weak_slices(
    items: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    size: int = 384,
    negative_margin: int = 2,
    seed: int = 0,
    in_channels: int = 1,
    context_mm: float = DEFAULT_CONTEXT_MM,
) -> list[dict]:
    """Prepare the labelled volumes ``items`` into slices under ``out_dir`` with the dataset writer; return the
    datalist items of all of them (every split: the caller has already split its volumes)."""
    prepare_dataset(
        VolumeLabelSource(items),
        out_dir,
        size=size,
        negative_margin=negative_margin,
        seed=seed,
        min_experts=1,
        on_error="raise",
        progress=False,
        in_channels=in_channels,
        context_mm=context_mm,
    )
    datalist = json.loads((Path(out_dir) / "datalist.json").read_text())
    slices = []
    for split in SPLITS:
        for entry in datalist.get(split, []):
            slices.append(
                {**entry, **{k: str(Path(out_dir) / entry[k]) for k in ("image", "label", "lung") if k in entry}}
            )
    return slices


class WeakLabelDataset(CacheDataset):
    """The classifier's training dataset: prepared slices as they are, labelled volumes turned into slices first.

    Args:
        data: datalist items, prepared slices (with ``class``) or ``{"image": volume, "label": label volume}``
            (what MONAI Label's train task gives).
        transform: the slice transforms.
        prepared_dir: where the slices of labelled volumes go, in a folder named after the volumes and their label
            files' versions (a second run on the same marks reuses it; new marks make a new one).
        size: slice side for the dataset writer (the training ``image_size``).
        negative_margin: clean slices keep this many slices away from any mark.
        in_channels: the network's input channels; 3 makes 2.5-D slices (``scripts.pipeline.context``) of labelled
            volumes.
        context_mm: distance between the channels of a 2.5-D slice.
        kwargs: passed to ``CacheDataset``.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable,
        prepared_dir: str | os.PathLike,
        size: int = 384,
        negative_margin: int = 2,
        in_channels: int = 1,
        context_mm: float = DEFAULT_CONTEXT_MM,
        **kwargs: Any,
    ) -> None:
        volumes = [item for item in data if is_volume_item(item)]
        slices = [dict(item) for item in data if not is_volume_item(item)]
        if volumes:
            versions = sorted([str(v["image"]), *_label_version(v["label"])] for v in volumes)
            versions.append([in_channels, context_mm if in_channels > 1 else None])
            key = hashlib.sha1(json.dumps(versions).encode()).hexdigest()[:12]
            slices += prepare_weak_slices(
                volumes, Path(prepared_dir) / key, size, negative_margin, in_channels=in_channels, context_mm=context_mm
            )
        super().__init__(data=slices, transform=transform, **kwargs)
