"""Command line to prepare a dataset: ``python -m scripts.data.prepare synthetic|lidc|real ...`` (in ``bundle/``)."""

from __future__ import annotations

import json
import logging
from typing import Any

import fire

from ..pipeline.context import DEFAULT_CONTEXT_MM
from .dataset import prepare_dataset

__all__ = ["synthetic", "lidc", "real", "scans", "split_names"]


def synthetic(
    out: str,
    cases: int = 24,
    seed: int = 0,
    size: int = 384,
    negative_ratio: float = 1.0,
    negative_sampling: str = "random",
    workers: int = 2,
    in_channels: int = 1,
    context_mm: float = DEFAULT_CONTEXT_MM,
    **source_options: Any,
) -> dict:
    """Generate synthetic chest CT cases (no download) and prepare them.

    Args:
        out: output folder.
        cases: number of synthetic subjects.
        seed: seeds the generator, the split and the negative draw.
        size: slice size in pixels (the paper: 384); smaller sizes keep the anatomy's size in mm.
        negative_ratio: slices without nodule per slice with nodule.
        negative_sampling: ``random`` (the paper) or ``matched`` to the positives' slice heights.
        workers: processes.
        in_channels: 1 (single slices, the paper) or 3 (2.5-D: each slice with its neighbours,
            ``scripts.pipeline.context``).
        context_mm: distance between the channels of a 2.5-D slice.
        source_options: further :class:`scripts.data.synthetic.SyntheticSource` arguments, e.g. the quick start's
            ``--min_diameter_mm 10 --vessel_radius_mm "(2.5, 3.5)"``.
    """
    from .synthetic import SyntheticSource

    source = SyntheticSource(n_cases=cases, seed=seed, size=size, **source_options)
    summary = prepare_dataset(
        source,
        out,
        size=size,
        negative_ratio=negative_ratio,
        negative_sampling=negative_sampling,
        seed=seed,
        workers=workers,
        in_channels=in_channels,
        context_mm=context_mm,
    )
    return _report(summary)


def lidc(
    lidc_root: str,
    out: str,
    workers: int = 2,
    size: int = 384,
    negative_ratio: float = 1.0,
    negative_margin: int = 2,
    negative_sampling: str = "random",
    seed: int = 0,
    patients: list[str] | str | None = None,
    in_channels: int = 1,
    context_mm: float = DEFAULT_CONTEXT_MM,
) -> dict:
    """Prepare LIDC-IDRI scans read through pylidc; a scan that fails is reported and skipped, reruns resume.

    Args:
        lidc_root: folder holding ``<PatientID>/.../*.dcm`` and the XML annotations, as downloaded from TCIA.
        out: output folder.
        workers: processes.
        size: crop size in pixels, centred on the lungs.
        negative_ratio: slices without nodule per slice with nodule.
        negative_margin: slices kept clear around any expert mark before a slice counts as without nodule.
        negative_sampling: ``random`` (the paper) or ``matched`` to the positives' slice heights.
        seed: seeds the split and the negative draw.
        patients: restrict to these patient ids (comma-separated or a list).
        in_channels: 1 (single slices, the paper) or 3 (2.5-D: each slice with its neighbours,
            ``scripts.pipeline.context``).
        context_mm: distance between the channels of a 2.5-D slice.
    """
    from .lidc import LidcSource

    if isinstance(patients, str):
        patients = [p.strip() for p in patients.split(",") if p.strip()]
    source = LidcSource(lidc_root, patients=patients)
    summary = prepare_dataset(
        source,
        out,
        size=size,
        negative_ratio=negative_ratio,
        negative_margin=negative_margin,
        negative_sampling=negative_sampling,
        seed=seed,
        workers=workers,
        on_error="skip",
        in_channels=in_channels,
        context_mm=context_mm,
    )
    return _report(summary)


def real(
    out: str,
    scans: list[str] | str | None = None,
    data_root: str | None = None,
    test: list[str] | str | None = None,
    validation: list[str] | str | None = None,
    variants: int = 4,
    insertions: int = 3,
    seed: int = 0,
    size: int = 384,
    pixel_mm: float | None = 0.75,
    workers: int = 2,
    in_channels: int = 1,
    context_mm: float = DEFAULT_CONTEXT_MM,
    negative_ratio: float = 1.0,
    negative_margin: int = 2,
    negative_sampling: str = "random",
    **source_options: Any,
) -> dict:
    """Prepare the real chest CT scans, their real nodules and real LIDC nodule shapes inserted into their lungs
    (``scripts.data.real_ct``; ``docs/real_ct.md``).

    Args:
        out: output folder.
        scans: the host scans (comma-separated or a list); default the five of ``data_root``
            (``scripts.data.real_ct.REAL_SCANS``).
        data_root: the folder holding ``lidc/`` and ``chest_ct/``; default ``../shared/data`` beside the repository.
        test: scans whose subjects (all their variants) form the test split, e.g. ``LIDC-IDRI-0001`` to score a
            model on it: their LIDC patients' nodule shapes are never inserted either. Default none.
        validation: scans whose subjects form the validation split; default one of the other scans, drawn with
            ``seed``.
        variants: subjects per scan, ``<scan>#0`` ... ``<scan>#<variants - 1>``, each with its own insertions.
        insertions: nodules inserted per subject.
        seed: seeds the insertions, the validation scan and the negative draw.
        size: slice size in pixels (the crop, centred on the lungs).
        pixel_mm: in-plane pixel spacing the scans are resampled to (the paper's 384 px slices are about 0.75 mm);
            None keeps each scan's own (0.56-0.84 mm).
        workers: processes.
        in_channels: 1 (single slices, the paper) or 3 (2.5-D: each slice with its neighbours, ``scripts.context``).
        context_mm: distance between the channels of a 2.5-D slice.
        negative_ratio: slices without nodule per slice with nodule, in each split.
        negative_margin: slices kept clear around every mark, tumour and insertion before a slice is clean.
        negative_sampling: ``random`` (the paper) or ``matched`` to the positives' slice heights.
        source_options: further :class:`scripts.data.real_ct.RealCtSource` arguments, e.g. ``--texture_p
            "(0.2, 0.05, 0.1, 0.15, 0.5)"`` or ``--exclude_shapes "[]"``.
    """
    from .real_ct import RealCtSource

    source = RealCtSource(
        data_root,
        split_names(scans),
        variants=variants,
        insertions=insertions,
        seed=seed,
        size=size,
        pixel_mm=pixel_mm,
        margin=negative_margin,
        test=split_names(test) or (),
        validation=split_names(validation),
        **source_options,
    )
    summary = prepare_dataset(
        source,
        out,
        size=size,
        negative_ratio=negative_ratio,
        negative_margin=negative_margin,
        negative_sampling=negative_sampling,
        seed=seed,
        workers=workers,
        in_channels=in_channels,
        context_mm=context_mm,
        split=source.split(),
    )
    return _report(summary)


def split_names(value: list[str] | tuple[str, ...] | str | None) -> list[str] | None:
    """Names given comma-separated or as a list (fire passes either); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    return [str(n) for n in value]


def scans(out: str, cases: int = 2, seed: int = 0, size: int = 128, **source_options: Any) -> list[str]:
    """Write synthetic chest CT cases as whole scans for ``configs/inference.json``: ``<out>/<subject>.nii.gz`` (int16
    HU, in the axial convention of ``scripts.pipeline.orient``) and the truth, ``<out>/labels/<subject>.nii.gz`` (the
    union of the nodules' STAPLE masks). The quick start's model was trained on ``size`` 256 slices of
    ``QUICKSTART_SYNTHETIC``'s cases (nodules from 10 mm, vessel trunks of 2.5-3.5 mm): make its scans so.

    Args:
        out: output folder.
        cases: number of synthetic subjects.
        seed: seeds the generator.
        size: the slice size the cases are made for (pixel spacing 288 mm / ``size``).
        source_options: further :class:`scripts.data.synthetic.SyntheticSource` arguments.
    """
    import nibabel as nib
    import numpy as np

    from ..pipeline.orient import axial_affine
    from ..utils.io import write_atomically
    from .labels import consensus_mask
    from .synthetic import SyntheticSource

    source = SyntheticSource(n_cases=cases, seed=seed, size=size, **source_options)
    written = []
    for subject in source.subjects():
        case = source.load(subject)
        truth = np.zeros(case.hu.shape, np.uint8)
        for nodule in case.annotations.nodules:
            truth[nodule.box()] |= consensus_mask(nodule)
        affine = axial_affine(case.annotations.spacing, origin=(150.0, 120.0, -200.0))
        for array, path in ((case.hu, f"{out}/{subject}.nii.gz"), (truth, f"{out}/labels/{subject}.nii.gz")):
            image = nib.Nifti1Image(np.asarray(array, np.int16 if array is case.hu else np.uint8), affine)
            write_atomically(path, lambda tmp, image=image: nib.save(image, tmp))
        written.append(f"{out}/{subject}.nii.gz")
        print(f"{subject}: {len(case.annotations.nodules)} nodule(s) -> {written[-1]}")
    return written


def _report(summary: dict) -> dict:
    logging.getLogger(__name__).info(json.dumps(summary["slices"]))
    for subject, error in summary["failed"].items():
        print(f"FAILED {subject}: {error}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fire.Fire({"synthetic": synthetic, "lidc": lidc, "real": real, "scans": scans})
