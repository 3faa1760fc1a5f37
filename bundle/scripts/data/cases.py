"""The data model every CT source hands to the dataset writer.

A source (synthetic, LIDC-IDRI, ...) produces, per subject, the annotations alone (cheap: used to
plan the split and the negative sampling) and, on demand, the CT volume. Arrays are indexed
``(row, column, slice)`` with slices in ascending z, the order pylidc uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Nodule", "CaseAnnotations", "CaseVolume", "CaseSource"]


@dataclass
class Nodule:
    """One nodule: the masks of the experts who drew it, in a common bounding box.

    Args:
        masks: ``(n_experts, rows, cols, slices)`` bool, one mask per expert, box-local.
        origin: ``(row, col, slice)`` of the box's first voxel in the volume.
        diameter_mm: the nodule's diameter (mean over experts).
        info: JSON values that say where the nodule comes from (e.g. real or inserted, its LIDC annotations, its
            texture rating); the dataset writer records them with every slice the nodule makes *with nodule*.
    """

    masks: np.ndarray
    origin: tuple[int, int, int]
    diameter_mm: float
    info: dict = field(default_factory=dict)

    @property
    def n_experts(self) -> int:
        return int(self.masks.shape[0])

    def box(self) -> tuple[slice, slice, slice]:
        """The box as index slices into the volume."""
        return tuple(slice(o, o + n) for o, n in zip(self.origin, self.masks.shape[1:]))  # type: ignore[return-value]


@dataclass
class CaseAnnotations:
    """What is known about one subject's scan without reading its images.

    Args:
        subject: the subject (patient) id; splits never put one subject in two sets.
        shape: ``(rows, cols, slices)`` of the volume.
        spacing: ``(row, col, slice)`` spacing in mm.
        nodules: nodules of at least 3 mm, each with its expert masks.
        marked_slices: ``(slices,)`` bool, True where any expert marked anything (nodules of any
            size, also those left out of ``nodules``): such slices are never negatives.
        info: JSON values about the subject that the dataset writer adds to each of its slices' items (e.g. the
            real scan a subject was made from); its keys must not be the writer's own.
        not_negative: ``(slices,)`` bool or None: slices the source keeps out of the negatives without any margin
            around them (unlike ``marked_slices``), e.g. slices without lung, or slices another subject made from
            the same scan draws its negatives from.
    """

    subject: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    nodules: list[Nodule] = field(default_factory=list)
    marked_slices: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    not_negative: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.marked_slices is None:
            self.marked_slices = np.zeros(self.shape[2], dtype=bool)


@dataclass
class CaseVolume:
    """A subject's CT volume with its annotations.

    Args:
        annotations: as returned by the source's ``annotations``.
        hu: ``(rows, cols, slices)`` CT values in Hounsfield units.
        lung_mask: ``(rows, cols, slices)`` bool, or None for the writer to segment the lungs.
    """

    annotations: CaseAnnotations
    hu: np.ndarray
    lung_mask: np.ndarray | None = None


class CaseSource(Protocol):
    """What the dataset writer needs from a source of CT cases.

    A source may also have ``settings() -> dict``: the JSON-valued parameters that shape its cases. The writer
    records them with the dataset and refuses to resume a dataset prepared with other ones.
    """

    name: str

    def subjects(self) -> list[str]:
        """The subject ids, in a stable order."""

    def annotations(self, subject: str) -> CaseAnnotations:
        """The subject's annotations, without reading images."""

    def load(self, subject: str) -> CaseVolume:
        """The subject's volume; raises an error naming the subject and the problem on bad data."""
