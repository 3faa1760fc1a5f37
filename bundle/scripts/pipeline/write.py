"""The outputs of one scan, named after the scan, under ``<output_dir>/<name>/``, a folder that appears only when all
of them are written (``scripts.utils.io.write_folder_atomically``):

- ``<name>_mask.nii.gz``: the nodule mask, uint8, on the input's grid (shape, spacing, origin, direction);
- ``<name>_seg.dcm``: the same mask as DICOM SEG (highdicom), referencing the source series, when the input was one;
- ``<name>_nodules.csv`` and ``<name>_nodules.json``: the nodule table (``scripts.pipeline.assemble``); the JSON also
  holds the per-slice probabilities, the bundle version and the segmenter's settings, and is written last, so its
  presence marks a finished scan;
- ``<name>_slices.csv``: every slice's nodule probability;
- ``<name>_overview.png``: a coronal projection with the nodules marked, the slice probabilities, and an axial
  close-up with the outline of each nodule.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..utils.io import write_atomically, write_folder_atomically, write_json, write_nifti, write_text
from .assemble import NODULE_COLUMNS, SLICE_COLUMNS
from .read import dicom_series, scan_name

__all__ = ["ScanWriter", "output_paths", "write_dicom_seg", "write_csv", "save_overview"]

MAX_CLOSE_UPS = 6
MAX_LABELS = 20
CLOSE_UP_MM = 60.0


def output_paths(output_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Where each output of scan ``name`` goes."""
    folder = Path(output_dir) / name
    suffixes = {
        "mask": "_mask.nii.gz",
        "seg": "_seg.dcm",
        "nodules_csv": "_nodules.csv",
        "slices_csv": "_slices.csv",
        "overview": "_overview.png",
        "nodules_json": "_nodules.json",
    }
    return {key: folder / f"{name}{suffix}" for key, suffix in suffixes.items()}


def write_dicom_seg(
    path: str | os.PathLike, mask: np.ndarray, affine: np.ndarray, series_folder: str | os.PathLike, version: str
) -> None:
    """Write ``mask`` (on the grid of the series read by ITK, RAS ``affine``) as a binary DICOM SEG of the series.

    Each source slice's frame is found from its ImagePositionPatient through the grid's affine, not from any file
    order. An empty mask still gives a SEG (one empty frame), so that a reader sees "no nodule", not a missing file.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = dicom_series(series_folder)[1]  # headers: highdicom copies their attributes, not their pixels
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    to_voxel = np.linalg.inv(lps_affine)
    frames = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    for index, ds in enumerate(sources):
        voxel = to_voxel @ np.array([*[float(v) for v in ds.ImagePositionPatient], 1.0])
        k = int(round(voxel[2]))
        if not (abs(voxel[0]) < 0.5 and abs(voxel[1]) < 0.5 and 0 <= k < mask.shape[2]):
            raise ValueError(f"{ds.filename}: its position does not match the grid the mask was written on")
        frames[index] = np.asarray(mask)[:, :, k].T  # ITK's (column, row) order -> DICOM (row, column)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="weakly supervised lung nodule segmentation",
            version=version,
            family=codes.cid7162.ArtificialIntelligence,
        ),
    )
    # the patient's attributes are copied from the series as they are: pydicom's doubt about a one-part patient name
    # (TCIA's "Lung_Dx-A0002") concerns the user's data, not this output, and would be printed for every such scan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=9001,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MONAI bundle weakly_supervised_lung_nodule_segmentation",
            manufacturer_model_name="GAP-CNN NAM + ICM + R-NAM",
            software_versions=version,
            device_serial_number="none",
            omit_empty_frames=bool(frames.any()),
        )
    write_atomically(path, lambda tmp: seg.save_as(tmp))


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with ``columns``; list values are joined by spaces; atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        values = [row.get(c) for c in columns]
        writer.writerow(
            ["" if v is None else " ".join(str(x) for x in v) if isinstance(v, list) else v for v in values]
        )
    write_text(path, buffer.getvalue())


def save_overview(
    path: str | os.PathLike,
    window: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    nodules: Sequence[Mapping[str, Any]],
    nodule_voxels: Sequence[tuple[float, float, float]],
    probabilities: np.ndarray,
    threshold: float,
    title: str,
) -> None:
    """A picture read at a glance: coronal projection with the nodules numbered (the ``MAX_LABELS`` largest),
    per-slice probability, and an axial close-up of the ``MAX_CLOSE_UPS`` largest nodules with their outline.

    Args:
        window: ``(rows, cols, slices)`` windowed image in [0, 1], in the axial convention
            (``scripts.pipeline.orient``).
        mask: its nodule mask.
        spacing: (row, col, slice) mm.
        nodules: the nodule table's rows.
        nodule_voxels: each nodule's centroid as (row, col, slice) on this grid.
        probabilities: ``(slices,)`` nodule probability per slice.
        threshold: the "nodule" threshold, drawn on the probability plot.
        title: figure title.
    """
    by_size = sorted(range(len(nodules)), key=lambda j: -nodules[j]["volume_mm3"])
    nodules, nodule_voxels = [nodules[j] for j in by_size], [nodule_voxels[j] for j in by_size]
    shown = min(len(nodules), MAX_CLOSE_UPS)
    # a Figure of its own, not pyplot's: nothing global holds it, so a failed save cannot leak it
    fig = Figure(figsize=(4 * max(3, shown), 8.5))
    grid = fig.add_gridspec(2, max(3, shown))
    coronal = fig.add_subplot(grid[0, :2])
    # anterior-posterior mean projection: the lungs, their vessels and the nodules show as on a chest radiograph
    projection = window.mean(axis=0).T[::-1]
    extent = (0, window.shape[1] * spacing[1], 0, window.shape[2] * spacing[2])
    coronal.imshow(projection, cmap="gray", extent=extent, aspect="equal")
    outline = mask.max(axis=0).T[::-1]
    if outline.any():
        coronal.contour(outline, levels=[0.5], colors="red", linewidths=0.8, extent=extent, origin="upper")
    for row, (r, c, s) in zip(nodules[:MAX_LABELS], nodule_voxels[:MAX_LABELS]):
        coronal.annotate(
            str(row["id"]),
            (c * spacing[1], s * spacing[2]),
            color="yellow",
            fontsize=11,
            xytext=(6, 6),
            textcoords="offset points",
        )
    coronal.set_title(f"coronal projection (patient's right on the left), {len(nodules)} nodule(s)")
    coronal.set_axis_off()
    curve = fig.add_subplot(grid[0, 2:] if grid.ncols > 2 else grid[0, -1])
    curve.plot(np.arange(len(probabilities)), probabilities, color="black", linewidth=1)
    curve.axhline(threshold, color="red", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    curve.set_xlabel("slice (ascending z)")
    curve.set_ylabel("p(nodule)")
    curve.set_ylim(-0.02, 1.02)
    curve.legend(loc="upper right")
    curve.set_title("nodule probability per slice")
    half = [max(8, int(round(CLOSE_UP_MM / 2 / s))) for s in spacing[:2]]
    for j, (row, (r, c, s)) in enumerate(zip(nodules[:shown], nodule_voxels[:shown])):
        ax = fig.add_subplot(grid[1, j])
        k = int(np.clip(round(s), 0, window.shape[2] - 1))
        r0, c0 = max(int(r) - half[0], 0), max(int(c) - half[1], 0)
        crop = (slice(r0, int(r) + half[0]), slice(c0, int(c) + half[1]), k)
        ax.imshow(window[crop], cmap="gray", vmin=0, vmax=1)
        if mask[crop].any():
            ax.contour(mask[crop], levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(
            f"{row['id']}: {row['largest_axial_diameter_mm']:.0f} mm, p={row['max_slice_probability']:.2f}", fontsize=10
        )
        ax.set_axis_off()
    if not nodules:
        ax = fig.add_subplot(grid[1, :])
        ax.text(0.5, 0.5, "no nodule found on this scan", ha="center", va="center", fontsize=16)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=72, format="png"))


class ScanWriter:
    """Write one scan's outputs (see the module docstring) from the post-processed data dict.

    Args:
        output_dir: outputs go to ``<output_dir>/<name>/``.
        dicom_seg: also write DICOM SEG when the input was a DICOM series.
        overview: also write the overview PNG.
        version: the bundle version, recorded in the DICOM SEG and the nodules JSON.
        settings: what made the mask (``WeaklySupervisedSegmenter.settings()``), recorded in the nodules JSON.
        keys: ``(image, pred, model-grid mask, model-grid probability, result)`` keys: the windowed model-grid image,
            the mask on the input grid, the inferer's mask and slice probabilities on the model grid (for the picture),
            and the tables.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        dicom_seg: bool = True,
        overview: bool = True,
        version: str = "unknown",
        keys: Sequence[str] = ("image", "pred", "model_grid_mask", "model_grid_probability", "result"),
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.dicom_seg, self.overview, self.version = dicom_seg, overview, version
        self.settings = None if settings is None else dict(settings)
        self.keys = tuple(keys)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Path]:
        """Write the outputs of one scan; return their paths."""
        image_key, pred_key, _, _, result_key = self.keys
        source = str(data.get("source", data[image_key].meta.get("filename_or_obj", "")))
        name = str(data.get("name") or scan_name(source))
        paths = output_paths(self.output_dir, name)
        pred = data[pred_key]
        mask = np.asarray(pred.detach().cpu())[0].astype(np.uint8)
        affine = np.asarray(pred.affine, float)
        result = {"scan": name, "source": source, **data[result_key]}
        written = {}
        # the scan's files are written in a folder of their own that takes the final name only when all are there,
        # so that a failure on any of them (or Ctrl-C) leaves no part of the scan's outputs
        with write_folder_atomically(paths["nodules_json"].parent) as folder:
            staged = {key: folder / path.name for key, path in paths.items()}
            write_nifti(staged["mask"], mask, affine, np.uint8)
            written["mask"] = paths["mask"]
            if self.dicom_seg and Path(source).is_dir():
                write_dicom_seg(staged["seg"], mask, affine, source, self.version)
                written["seg"] = paths["seg"]
            write_csv(staged["nodules_csv"], result["nodules"], NODULE_COLUMNS)
            write_csv(staged["slices_csv"], result["slices"], SLICE_COLUMNS)
            written.update(nodules_csv=paths["nodules_csv"], slices_csv=paths["slices_csv"])
            if self.overview:
                self._overview(staged["overview"], data, result, name)
                written["overview"] = paths["overview"]
            provenance = {"bundle_version": self.version, "segmenter": self.settings}
            outputs = {k: str(v) for k, v in written.items()}
            write_json(staged["nodules_json"], {**result, **provenance, "outputs": outputs})
            written["nodules_json"] = paths["nodules_json"]
        return written

    def _overview(self, path: Path, data: Mapping[str, Any], result: Mapping[str, Any], name: str) -> None:
        image_key, _, mask_key, probability_key, _ = self.keys
        image = data[image_key]
        window = np.asarray(image.detach().cpu())[0]
        model_affine = np.asarray(image.affine, float)
        to_voxel = np.linalg.inv(model_affine)
        centroids = [tuple(to_voxel[:3, :3] @ n["centroid_ras_mm"] + to_voxel[:3, 3]) for n in result["nodules"]]
        probabilities = np.asarray(data[probability_key].detach().cpu())[0].max(axis=(0, 1))
        save_overview(
            path,
            window,
            np.asarray(data[mask_key].detach().cpu())[0] > 0.5,
            [float(v) for v in image.pixdim[:3]],
            result["nodules"],
            centroids,
            probabilities,
            float(result["threshold"]),
            f"{name}: {len(result['nodules'])} nodule(s), mode {result['mode']}",
        )
