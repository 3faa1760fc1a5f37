"""A tiny dataset in the prepared format, for tests: bright disks ("nodules") in a noisy lung-like slice."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_erosion
from skimage.draw import disk, ellipse
from skimage.morphology import disk as disk_footprint

SPACING_MM = (0.7, 0.7)
# brighter than the body so that a tiny network trained for seconds tells the classes apart
NODULE_HU = 300.0


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Air, a soft-tissue body and two lungs with noise and a few thin vessels, in HU; and the lung mask."""
    hu = np.full((size, size), -1000.0)
    hu[ellipse(size / 2, size / 2, size * 0.46, size * 0.48, shape=hu.shape)] = 40.0
    for col in (size * 0.3, size * 0.7):
        rr, cc = ellipse(size / 2, col, size * 0.36, size * 0.17, shape=hu.shape)
        hu[rr, cc] = -850.0
    lung = hu == -850.0
    hu[lung] += rng.normal(0.0, 40.0, int(lung.sum())).round()  # lung texture beside the noise below
    for _ in range(3):
        r0, c0 = rng.integers(0, size, 2)
        rr, cc = np.nonzero(lung)
        pick = rng.integers(len(rr))
        line_r = np.linspace(r0, rr[pick], size).round().astype(int).clip(0, size - 1)
        line_c = np.linspace(c0, cc[pick], size).round().astype(int).clip(0, size - 1)
        keep = lung[line_r, line_c]
        hu[line_r[keep], line_c[keep]] = -500.0
    hu += rng.normal(0.0, 30.0, hu.shape)
    return hu, lung


def _nodule_centres(rng: np.random.Generator, lung: np.ndarray, radius: float, count: int) -> list[tuple[int, int]]:
    """``count`` centres of disks of ``radius`` that lie inside the lungs, in different lungs when two."""
    rows, cols = np.nonzero(binary_erosion(lung, disk_footprint(int(np.ceil(radius)))))
    half = lung.shape[1] // 2
    centres = []
    for side in range(count):
        pool = np.flatnonzero((cols < half) == (side == 0))
        pick = pool[rng.integers(len(pool))]
        centres.append((int(rows[pick]), int(cols[pick])))
    return centres


def _save(array: np.ndarray, path: Path, dtype: type) -> None:
    affine = np.diag([SPACING_MM[0], SPACING_MM[1], 1.0, 1.0])
    nib.save(nib.Nifti1Image(array.astype(dtype), affine), str(path))


def write_tiny_dataset(out_dir: str | Path, n_subjects: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write ``n_subjects`` subjects of 4 nodule and 4 empty slices each, split 4:1:1 by subject, to ``out_dir``.

    Nodule slices hold one disk (two on every fourth) of radius ``size / 16`` to ``size / 10`` at about 30 HU.
    Returns ``out_dir``.
    """
    if n_subjects < 3:
        raise ValueError(f"n_subjects must be at least 3 (one per split), got {n_subjects}.")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "lungs").mkdir(parents=True, exist_ok=True)
    n_val = n_test = max(1, n_subjects // 6)
    splits = ["training"] * (n_subjects - n_val - n_test) + ["validation"] * n_val + ["test"] * n_test
    datalist: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for index, split in enumerate(splits):
        subject = f"TINY-{index:04d}"
        for slice_index in range(8):
            hu, lung = _background(rng, size)
            mask = np.zeros((size, size), dtype=np.uint8)
            diameters: list[float] = []
            if slice_index < 4:
                count = 2 if slice_index == 3 else 1
                radius = float(rng.uniform(size / 16, size / 10))
                for r, c in _nodule_centres(rng, lung, radius, count):
                    rr, cc = disk((r, c), radius, shape=mask.shape)
                    mask[rr, cc] = 1
                    diameters.append(2 * radius * SPACING_MM[0])
                hu[mask > 0] = NODULE_HU + rng.normal(0.0, 30.0, int(mask.sum()))
            name = f"{subject}_{slice_index:03d}.nii.gz"
            _save(np.clip(hu, -1024, 3071), out / "images" / name, np.int16)
            _save(mask, out / "labels" / name, np.uint8)
            _save(lung.astype(np.uint8), out / "lungs" / name, np.uint8)
            datalist[split].append(
                {
                    "image": f"images/{name}",
                    "label": f"labels/{name}",
                    "lung": f"lungs/{name}",
                    "class": int(bool(diameters)),
                    "subject": subject,
                    "slice": slice_index,
                    "nodules": len(diameters),
                    "diameters_mm": diameters,
                }
            )
    (out / "datalist.json").write_text(json.dumps(datalist, indent=4))
    return out
