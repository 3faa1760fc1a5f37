"""Reading CT scans: a DICOM series folder, or a NIfTI, NRRD or MHA volume, checked before anything is computed.

``LoadScand`` is MONAI's ``LoadImaged`` with two readers. A DICOM series in an uncompressed transfer syntax is read
by ``DicomSeriesReader`` (pydicom), compressed series and volume files by MONAI's ITK reader (``ITKReader``: GDCM
decodes every compressed DICOM transfer syntax). Both give the same voxels on the same grid, with the affine in RAS as
MONAI's spatial transforms expect. Before the pixels are read, a DICOM folder is checked to hold one CT series with
evenly spaced, parallel slices, since the ITK reader would otherwise read the first of two series, or space the
slices of a series with a gap evenly, without a word. ``CheckScand`` then refuses what is not a 3-D CT volume in HU.
``scan_datalist`` turns a scan, a folder of scans or a datalist file into the items the inference config runs on;
in a folder of scans a patient's folder (TCIA's patient / study / series) stands for the CT series below it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data import ImageReader, ITKReader, MetaTensor
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ensure_tuple
from pydicom.misc import is_dicom

__all__ = [
    "VOLUME_SUFFIXES",
    "ScanError",
    "scan_name",
    "dicom_series",
    "DicomSeriesReader",
    "LoadScand",
    "CheckScand",
    "scan_datalist",
]

logger = logging.getLogger(__name__)

# What finding the scans in a folder reads of a DICOM file
_SERIES_TAGS = ["Modality", "SeriesInstanceUID"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Even spacing: consecutive slice positions may differ from the median step by this fraction of it.
SPACING_TOLERANCE = 0.01
# Slices whose position steps leave the slice normal by more than this are sheared (a gantry tilt).
SHEAR_TOLERANCE_DEG = 1.0
# A voxel axis this far from every patient axis makes the grid oblique beyond what "axial slices" can mean.
MAX_OBLIQUITY_DEG = 20.0
# Air is about -1000 HU: a scan whose lowest value is above this is not CT in HU (unrescaled, or not CT).
MAX_AIR_HU = -500.0


class ScanError(ValueError):
    """A scan that cannot be segmented; the message names the file and the problem."""


def scan_name(path: str | os.PathLike) -> str:
    """The name a scan's outputs are named after: a volume's file name without its suffix, a DICOM folder's name."""
    path = Path(path)
    for suffix in VOLUME_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _is_dicom_file(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() == ".dcm" or is_dicom(str(path)))


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_dicom_file(p))


def dicom_series(folder: str | os.PathLike, pixels: bool = False) -> tuple[Path, list[pydicom.Dataset]]:
    """Check that ``folder`` holds one CT series of evenly spaced parallel slices; return its folder and headers.

    The headers are sorted along the slice normal; with ``pixels`` they keep their pixel data (one pass over the
    files for ``DicomSeriesReader``). The series' files must lie in one folder (the ITK reader reads a folder); they
    may be below ``folder``.

    Raises:
        ScanError: no DICOM files, two series, not CT, one slice, slices of different size or orientation,
            two slices at one position, missing slices (uneven spacing), or a sheared (gantry-tilted) stack.
    """
    folder = Path(folder)
    files = _dicom_files(folder)
    if not files:
        raise ScanError(f"{folder}: no DICOM files in this folder")
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=not pixels))
        except Exception as err:  # pydicom raises many types for damaged files
            raise ScanError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    series: dict[str, list[int]] = {}
    for index, ds in enumerate(headers):
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(index)
    if len(series) > 1:
        found = ", ".join(f"{uid or '(none)'} ({len(idx)} files)" for uid, idx in series.items())
        raise ScanError(f"{folder}: holds {len(series)} DICOM series: {found}; give each series its own folder")
    modality = {str(ds.get("Modality", "")) for ds in headers}
    if modality != {"CT"}:
        raise ScanError(f"{folder}: modality {'/'.join(sorted(modality)) or 'unknown'}, not CT")
    parents = {path.parent for path in files}
    if len(parents) > 1:
        raise ScanError(f"{folder}: the series is spread over {len(parents)} folders; put its files in one")
    if len(headers) < 2:
        raise ScanError(f"{folder}: a single DICOM image, not a scan (a scan needs at least 2 slices)")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
        missing = [files[i].name for i, ds in enumerate(headers) if key not in ds]
        if missing:
            which = f"{missing[0]} has" if len(missing) == 1 else f"{missing[0]} and {len(missing) - 1} more have"
            raise ScanError(f"{folder}: {which} no {key}")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in headers}) > 1:
        raise ScanError(f"{folder}: the slices differ in size")
    orientation = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    if np.abs(orientation - orientation[0]).max() > 1e-4:
        raise ScanError(f"{folder}: the slices differ in orientation (ImageOrientationPatient)")
    normal = np.cross(orientation[0][:3], orientation[0][3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    order = np.argsort(positions @ normal)
    positions, headers = positions[order], [headers[i] for i in order]
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if (np.abs(along) < 1e-3).any():
        at = positions[1:][np.abs(along) < 1e-3][0]
        raise ScanError(f"{folder}: two slices at the same position {tuple(np.round(at, 2))}")
    step = float(np.median(along))
    uneven = np.abs(along - step) > SPACING_TOLERANCE * step
    if uneven.any():
        raise ScanError(
            f"{folder}: uneven slice spacing ({along.min():.3g} to {along.max():.3g} mm, usually {step:.3g} mm): "
            f"{int(uneven.sum())} gap(s), missing slices?"
        )
    off_normal = np.degrees(np.arccos(np.clip(along / np.linalg.norm(steps, axis=1), -1.0, 1.0)))
    if off_normal.max() > SHEAR_TOLERANCE_DEG:
        raise ScanError(
            f"{folder}: the slices are sheared by {off_normal.max():.1f} degrees (gantry tilt); resample the series "
            "to an orthogonal grid first"
        )
    return parents.pop(), headers


def _check_nifti_values(path: Path) -> None:
    """ITK's NIfTI reader turns NaN into 0 and reads a truncated ``.nii.gz`` without a word (the missing voxels
    come out as 0), so a NIfTI file's data are read through once with nibabel first, which refuses both."""
    try:
        values = np.asarray(nib.load(str(path)).dataobj)
        if values.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                raise ScanError(f"{path}: {bad} voxels are NaN or infinite")
    except ScanError:
        raise
    except Exception as err:  # nibabel raises many types for truncated files
        raise ScanError(f"{path}: could not be read ({type(err).__name__}: {err})") from None


def _is_uncompressed_series(folder: Path) -> bool:
    """Whether the first DICOM file under ``folder`` is in an uncompressed transfer syntax."""
    first = next(iter(_dicom_files(folder)), None)
    if first is None:
        return False
    try:
        syntax = pydicom.dcmread(first, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
    except Exception:  # a damaged file is reported by dicom_series, on the ITK path
        return False
    return syntax is not None and not syntax.is_compressed


class DicomSeriesReader(ImageReader):
    """MONAI image reader of one DICOM CT series with pydicom; gives what ``ITKReader(affine_lps_to_ras=True)`` gives.

    The array is (column, row, slice) in HU (each file's rescale applied), float32, the slices sorted along their
    normal; the affine is RAS: the first slice's ImagePositionPatient, the ImageOrientationPatient's row and column
    directions times the PixelSpacing, and the normal times the slice step. The series is checked as
    ``dicom_series`` checks it, in the same pass over the files that reads the pixels.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for one folder."""
        names = ensure_tuple(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> list[pydicom.Dataset]:
        """The series' datasets, pixel data included, sorted along the slice normal."""
        (folder,) = ensure_tuple(data)
        return dicom_series(folder, pixels=True)[1]

    def get_data(self, img: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, dict]:
        """(array of shape (columns, rows, slices), meta with ``affine``, ``original_affine``, ``spacing``, ...)."""
        first, last = img[0], img[-1]
        # (column, row, slice) and C-contiguous, as ITKReader's array is: each slice written transposed in place
        volume = np.empty((int(first.Columns), int(first.Rows), len(img)), np.float32)
        for k, ds in enumerate(img):
            try:
                pixels = ds.pixel_array
            except Exception as err:  # pydicom raises many types for undecodable pixel data
                raise ScanError(f"{ds.filename}: its pixel data could not be decoded ({type(err).__name__}: {err})")
            if pixels.shape != (volume.shape[1], volume.shape[0]):
                raise ScanError(f"{ds.filename}: {pixels.shape} pixels, the series' slices have {volume.shape[1::-1]}")
            slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
            volume[:, :, k] = (pixels * slope + intercept).T  # in float64: ITK's values to the bit (tests)
        orientation = np.array([float(v) for v in first.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        origin = np.array([float(v) for v in first.ImagePositionPatient])
        step = float((np.array([float(v) for v in last.ImagePositionPatient]) - origin) @ normal) / (len(img) - 1)
        spacing = np.array([float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), step])
        lps = np.eye(4)
        lps[:3, :3] = np.stack([orientation[:3], orientation[3:], normal], axis=1) * spacing
        lps[:3, 3] = origin
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        meta = {
            "spacing": spacing,
            "original_affine": affine,
            "affine": affine.copy(),
            "space": "RAS",
            "spatial_shape": np.array(volume.shape),
            "original_channel_dim": float("nan"),
        }
        return volume, meta


class LoadScand(LoadImaged):
    """``LoadImaged`` for CT scans: a DICOM series in an uncompressed transfer syntax with ``DicomSeriesReader``,
    anything else with MONAI's ITK reader, a DICOM folder checked before its pixels are read.

    ``data[key]`` is a volume file or a DICOM series folder. A series is read from the folder that holds its files
    (a patient folder with the series below it will do) and must come out with one slice per file. Any failure is a
    ``ScanError`` naming the file. The image comes out channel first, its meta in the ``MetaTensor`` (and in a meta dict
    too where ``image_only`` is turned off, as MONAI Label does).
    """

    def __init__(self, keys: str | Sequence[str] = "image", **kwargs: Any) -> None:
        # MONAI builds every reader it knows as a fallback, and its GPU DICOM codec's reader warns when that codec is
        # not installed: a notice on every run that concerns no user here (DICOM is read by the two readers above)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            super().__init__(
                keys, reader=ITKReader(affine_lps_to_ras=True), ensure_channel_first=True, image_only=True, **kwargs
            )
        self.series_reader = DicomSeriesReader()

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if not isinstance(d[key], (str, os.PathLike)):
                continue  # already loaded (MONAI Label may hand over a tensor)
            loaded = self._load(Path(d[key]), reader)
            if self._loader.image_only:
                d[key] = loaded
            else:  # MONAI Label turns image_only off and reads the meta dict, as LoadImaged writes it
                d[key], d[meta_key or f"{key}_{postfix}"] = loaded
        return d

    def _load(self, path: Path, reader: Any) -> torch.Tensor | tuple[torch.Tensor, dict]:
        slices = None
        if path.is_dir() and reader is None and _is_uncompressed_series(path):
            reader = self.series_reader  # checks the series as dicom_series does, in the pass that reads the pixels
        elif path.is_dir():
            series_folder, headers = dicom_series(path)
            path, slices = series_folder, len(headers)
        elif not path.is_file():
            raise ScanError(f"{path}: no such file or folder")
        elif not path.name.lower().endswith(VOLUME_SUFFIXES):
            raise ScanError(f"{path}: not a scan (expected a DICOM folder or one of {', '.join(VOLUME_SUFFIXES)})")
        elif path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_values(path)
        try:
            image = self._loader(str(path), reader)
        except ScanError:
            raise
        except Exception as err:  # ITK, nibabel and pydicom raise many types for truncated or damaged files
            raise ScanError(f"{path}: could not be read ({type(err).__name__}: {err})") from None
        read = image[0] if isinstance(image, tuple) else image
        if slices is not None and read.shape[-1] != slices:
            raise ScanError(f"{path}: the ITK reader read {read.shape[-1]} of the series' {slices} slices")
        return image


class CheckScand(MapTransform):
    """Refuse, naming the file, what is not a 3-D CT volume in HU on an axial-like grid (after ``LoadScand``).

    Grids within ``max_obliquity_deg`` of the patient axes are processed in their own voxel grid, which
    ``Orientationd`` only permutes and flips, and every output is written back on it exactly.
    """

    def __init__(self, keys: str = "image", max_obliquity_deg: float = MAX_OBLIQUITY_DEG) -> None:
        super().__init__(keys)
        self.max_obliquity_deg = float(max_obliquity_deg)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            name = image.meta.get("filename_or_obj", key) if hasattr(image, "meta") else key
            spatial = tuple(image.shape[1:])
            if image.ndim != 4 or image.shape[0] != 1 or min(spatial) < 2:
                raise ScanError(f"{name}: expected a 3-D CT volume, got an image of shape {tuple(image.shape)}")
            if image.dtype == torch.bool or image.is_complex():
                raise ScanError(f"{name}: expected CT values in HU, got data of type {image.dtype}")
            values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            low, high = (float(v) for v in torch.aminmax(values))  # one pass; NaN or inf show in the extremes
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ScanError(f"{name}: {int((~torch.isfinite(values)).sum())} voxels are NaN or infinite")
            if low > MAX_AIR_HU:
                raise ScanError(
                    f"{name}: values from {low:g} to {high:g} do not look like CT in HU (air is about -1000 HU); "
                    "rescale it to HU first"
                )
            axes = np.asarray(image.affine, float)[:3, :3]
            cosines = np.abs(axes / np.linalg.norm(axes, axis=0)).max(axis=0)
            angle = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
            if angle > self.max_obliquity_deg:
                raise ScanError(
                    f"{name}: the grid is oblique, {angle:.1f} degrees from the patient axes (at most "
                    f"{self.max_obliquity_deg:g}); resample it to axial slices first"
                )
        return d


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES) and not path.name.startswith(".tmp-")


def _holds_dicom(folder: Path) -> bool:
    """Whether DICOM files lie directly in ``folder``."""
    return any(_is_dicom_file(p) for p in folder.iterdir())


def _series_below(folder: Path) -> dict[Path, tuple[str, str]] | None:
    """``{folder: (Modality, SeriesInstanceUID)}`` of the folders at or below ``folder`` that hold DICOM files
    directly, from the first file of each, or from all of them where the first is not CT (a CT series may begin with
    a dose report: a folder with any CT file counts as CT); None when one of those files cannot be read."""
    series = {}
    for root, _, names in os.walk(folder):
        headers = []
        for path in filter(_is_dicom_file, (Path(root) / name for name in sorted(names))):
            try:
                headers.append(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SERIES_TAGS))
            except Exception:  # pydicom raises many types for damaged files
                return None
            if str(headers[0].get("Modality", "")) == "CT":
                break
        if headers:
            ds = next((ds for ds in headers if str(ds.get("Modality", "")) == "CT"), headers[0])
            series[Path(root)] = (str(ds.get("Modality", "")), str(ds.get("SeriesInstanceUID", "")))
    return series


def _scans_below(folder: Path, in_folder_of_scans: bool = False) -> list[tuple[Path, str]]:
    """The scans, ``(path, name)``, of a folder with DICOM files below it (a patient's or a study's, as TCIA's
    downloads hold them): each CT series folder, named after ``folder`` (and after the series' folder below it where
    it holds several); the other series (a patient's chest X-rays, a SEG) left out. With no CT series below it,
    ``folder`` stays one scan, as it does with a damaged file or a series spread over folders: reading it says why;
    ``in_folder_of_scans`` it is left out instead, with a warning (other modalities only) or without (no DICOM)."""
    series = _series_below(folder)
    ct = {path: uid for path, (modality, uid) in (series or {}).items() if modality == "CT"}
    if in_folder_of_scans and series is not None and not ct:
        if series:
            modalities = "/".join(sorted({modality or "unknown" for modality, _ in series.values()}))
            logger.warning("%s: no CT series below it (modality %s): left out", folder, modalities)
        return []
    if not ct or len(set(ct.values())) < len(ct):
        return [(folder, scan_name(folder))]
    if len(ct) == 1:
        return [(next(iter(ct)), scan_name(folder))]
    return [(path, "_".join((folder.name, *path.relative_to(folder).parts))) for path in sorted(ct)]


def _scans_in(folder: Path) -> list[tuple[Path, str]]:
    """The scans of a folder: the folder when DICOM files lie directly in it (one series), else each volume in it and
    the CT series below each of its folders (``_scans_below``; a folder of other modalities only is left out)."""
    if _holds_dicom(folder):
        return [(folder, scan_name(folder))]
    scans: list[tuple[Path, str]] = []
    for entry in sorted(folder.iterdir()):
        if _is_volume(entry):
            scans.append((entry, scan_name(entry)))
        elif entry.is_dir():
            scans.extend(_scans_below(entry, in_folder_of_scans=True))
    return scans


def scan_datalist(
    source: str | os.PathLike, output_dir: str | os.PathLike = "", skip_done: bool = True
) -> list[dict[str, str]]:
    """Items ``{"image": path, "source": path, "name": scan name}`` of a scan, a folder of scans, or a datalist
    file (``image`` becomes the loaded volume; ``source`` keeps the path for the writers).

    Args:
        source: a volume file; a DICOM series folder; a folder whose entries are volumes and folders with DICOM
            files below them (a series, or a patient's or study's folder, whose CT series are its scans:
            ``_scans_below``); or a JSON datalist (a list of such paths or of ``{"image": path}``, or
            ``{"scans": [...]}``; relative paths are taken from the datalist's folder).
        output_dir: where outputs go; with ``skip_done``, scans whose nodule table is there already are left out.
        skip_done: leave out finished scans (a re-run only does the rest).

    Raises:
        ScanError: the source does not exist, holds no scan, or two scans share a name.
    """
    source = Path(source)
    if not str(source) or not source.exists():
        raise ScanError(f"{source}: no such scan, folder or datalist (give input=<scan, folder or datalist.json>)")
    if source.is_file() and source.suffix.lower() == ".json":
        try:
            listed = json.loads(source.read_text())
        except json.JSONDecodeError as err:
            raise ScanError(f"{source}: malformed JSON ({err})") from None
        listed = listed.get("scans", []) if isinstance(listed, dict) else listed
        paths = [Path(entry["image"] if isinstance(entry, dict) else entry) for entry in listed]
        paths = [p if p.is_absolute() else source.parent / p for p in paths]
        # a listed folder stands for its series, or for the CT series below it
        scans = [s for p in paths for s in (_scans_below(p) if p.is_dir() else [(p, scan_name(p))])]
    elif source.is_dir():
        scans = _scans_in(source)
    else:
        scans = [(source, scan_name(source))]
    if not scans:
        raise ScanError(f"{source}: holds no scan (DICOM series folders or {', '.join(VOLUME_SUFFIXES)} files)")
    items, seen = [], {}
    for path, name in scans:
        if name in seen:
            raise ScanError(f"two scans are named {name!r} ({seen[name]} and {path}); their outputs would collide")
        seen[name] = path
        if skip_done and output_dir and (Path(output_dir) / name / f"{name}_nodules.json").is_file():
            continue
        items.append({"image": str(path), "source": str(path), "name": name})
    return items
