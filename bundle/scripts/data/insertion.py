"""Painting a real LIDC nodule shape into a real CT scan the way the scanner would have imaged it.

1. **Fine shape.** Each reader's mask becomes a smooth 3-D shape (shape-based interpolation: the signed distance to
   the reader's outline, interpolated linearly) sampled on a fine grid: ``FINE_PIXEL_MM`` in-plane, ``FINE_Z_MM`` in
   z, wherever the nodule lies in relation to the scan's slices (a random phase).
2. **Partial volume.** The fine occupancy is averaged over each pixel and over each slice's *thickness* (the slab
   the scanner integrates): a nodule that fills a third of a 5 mm slab adds a third of its density there, and one
   between two thick slices shows faintly on both.
3. **Scanner blur.** The slab images are blurred in-plane by a Gaussian of the reconstruction kernel's width.
4. **Blend, noise kept.** Each voxel gains ``W * (L - H)``: ``W`` the share of it the nodule fills, ``L`` the nodule's
   density there, ``H`` the scan's own value without its noise (the lung's level smoothed around it; a vessel's or
   a wall's own value); the scan's noise stays on top, as a real nodule has it, and denser tissue stays as it is.

The readers' masks at the scan's voxels (``RenderedShape.experts``: a reader's mask holds a voxel when half of it is
inside that reader's shape) are the nodule's annotation, from which the dataset writer takes the slice class (at least
two readers) and the label (STAPLE), as for a real LIDC nodule.

The paper trains on LIDC-IDRI and inserts nothing: all of this, and every constant below, is *inferred*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .lesions import lesion_level

__all__ = ["FINE_PIXEL_MM", "FINE_Z_MM", "RenderedShape", "render_shape", "blend_nodule", "noise_hu"]

FINE_PIXEL_MM = 0.4  # the fine grid's in-plane step at most: a pixel of the scan is split into whole sub-pixels
FINE_Z_MM = 0.25  # the fine grid's z step at most: each slab is sampled at this step or finer
SMOOTH_MM = 1.5  # the lung's level without its noise (H) is smoothed over this
DENSER_THAN_LUNG_HU = -400.0  # from this a voxel is a vessel or a wall: its H is its own value, left out of the lung's
NOISE_CAP_SD = 3.0  # a painted voxel ends at most this many noise SDs above the nodule's level (see blend_nodule)


def _interp_matrix(n_source: int, positions: np.ndarray) -> np.ndarray:
    """``(len(positions), n_source)`` weights of linear interpolation at ``positions`` (in source indices), the ends
    repeated beyond the source."""
    positions = np.clip(np.asarray(positions, dtype=np.float64), 0, n_source - 1)
    low = np.minimum(np.floor(positions).astype(int), max(n_source - 2, 0))
    frac = positions - low
    matrix = np.zeros((len(positions), n_source), dtype=np.float32)
    rows = np.arange(len(positions))
    matrix[rows, low] = 1.0 - frac
    if n_source > 1:
        matrix[rows, low + 1] += frac
    return matrix


@dataclass
class RenderedShape:
    """A nodule shape rendered on a scan's grid, in a box of the scan's voxels, before it is placed.

    Attributes:
        experts: ``(n_readers, rows, cols, slices)`` bool: each reader's mask at the scan's voxels.
        weight: ``(rows, cols, slices)`` float32: the share of each voxel the nodule fills (the readers' agreement,
            averaged over the pixel and the slab, blurred like the scanner): ``W``.
        agreement: the readers' agreement on the fine grid (for the nodule's density, once placed).
        fine_spacing: ``(row, col, z)`` step of the fine grid in mm.
        supersample: fine pixels per scan pixel along each in-plane axis.
        per_slab: fine z samples per slab.
        blur_px: the scanner blur's sigma in scan pixels.
    """

    experts: np.ndarray
    weight: np.ndarray
    agreement: np.ndarray
    fine_spacing: tuple[float, float, float]
    supersample: int
    per_slab: int
    blur_px: float

    def to_scan(self, fine: np.ndarray) -> np.ndarray:
        """A fine-grid field averaged over each scan pixel and each slab: ``(rows, cols, slices)``."""
        rows, cols, slices = self.weight.shape
        s, z = self.supersample, self.per_slab
        return fine.reshape(rows, s, cols, s, slices, z).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)

    def blur(self, field: np.ndarray) -> np.ndarray:
        """The scanner's in-plane blur of a slab field."""
        return ndimage.gaussian_filter(field, (self.blur_px, self.blur_px, 0.0)) if self.blur_px > 0 else field

    def density(
        self,
        ggo_hu: float,
        solid_hu: float,
        core_fraction: float,
        texture_hu: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """``M``: the slab and pixel average of agreement x level (``scripts.data.lesions.lesion_level`` on the fine
        grid, depth measured in mm), blurred like ``weight``; the nodule's mean level in a voxel is ``M / W``."""
        level = lesion_level(
            self.agreement,
            ggo_hu,
            solid_hu,
            core_fraction,
            texture_hu,
            self.fine_spacing,
            rng,
            sampling=self.fine_spacing,
        )
        return self.blur(self.to_scan(self.agreement * level))


def render_shape(
    masks: np.ndarray,
    spacing: tuple[float, float, float],
    pixel_mm: float,
    slice_step_mm: float,
    thickness_mm: float,
    z_phase: float,
    blur_mm: float,
) -> RenderedShape:
    """Render readers' masks ``(n, rows, cols, slices)`` at ``spacing`` on a scan's grid (see the module docstring).

    Args:
        masks: the readers' masks, as LIDC gives them (box-local).
        spacing: their voxel size in mm.
        pixel_mm: the scan's pixel spacing.
        slice_step_mm: the distance between the scan's slices.
        thickness_mm: the thickness of the slab each slice integrates (the DICOM SliceThickness).
        z_phase: where the shape's first voxel lies from the nearest slice centre below it, in ``[0, slice_step_mm)``.
        blur_mm: sigma of the scanner's in-plane blur.
    """
    masks = np.pad(np.asarray(masks, dtype=bool), ((0, 0), (1, 1), (1, 1), (1, 1)))  # closed outlines
    n, rows, cols, slices = masks.shape
    spacing = tuple(float(s) for s in spacing)
    supersample = max(1, int(np.ceil(pixel_mm / FINE_PIXEL_MM)))
    per_slab = max(1, int(np.ceil(thickness_mm / FINE_Z_MM)))
    fine_px = pixel_mm / supersample
    blur_px = blur_mm / pixel_mm
    pad = int(np.ceil(3.0 * blur_px)) + 1  # room for the blur around the shape
    # in-plane: a box of scan pixels centred on the shape; the fine samples' positions in the masks' indices
    axes = []
    for n_source, step in ((rows, spacing[0]), (cols, spacing[1])):
        n_box = int(np.ceil(n_source * step / pixel_mm)) + 2 * pad
        centre = (n_source - 1) / 2 * step
        fine = centre + ((np.arange(n_box * supersample) + 0.5) / supersample - n_box / 2) * pixel_mm
        axes.append((n_box, fine / step))
    # z: the slabs that meet the shape (its outline ends half-way to the empty padding slices)
    z_low, z_high = 0.5 * spacing[2], (slices - 1.5) * spacing[2]
    half = thickness_mm / 2
    first = int(np.floor((z_low - half - z_phase) / slice_step_mm)) + 1
    last = max(first, int(np.ceil((z_high + half - z_phase) / slice_step_mm)) - 1)
    centres = z_phase + np.arange(first, last + 1) * slice_step_mm
    offsets = -half + (np.arange(per_slab) + 0.5) * thickness_mm / per_slab
    fine_z = (centres[:, None] + offsets[None, :]).ravel()
    along_rows = _interp_matrix(rows, axes[0][1])
    along_cols = _interp_matrix(cols, axes[1][1])
    along_z = _interp_matrix(slices, fine_z / spacing[2])
    occupancy = []
    for mask in masks:
        # signed distance to the reader's outline in mm, negative inside; interpolated linearly, axis by axis
        inside = ndimage.distance_transform_edt(mask, sampling=spacing)
        outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
        distance = (outside - inside).astype(np.float32)
        distance = np.tensordot(along_rows, distance, (1, 0))  # (fine rows, cols, slices)
        distance = np.tensordot(distance, along_cols, (1, 1))  # (fine rows, slices, fine cols)
        distance = np.tensordot(distance, along_z, (1, 1))  # (fine rows, fine cols, fine z)
        occupancy.append(distance < 0)
    rendered = RenderedShape(
        experts=np.empty(0, bool),
        weight=np.zeros((axes[0][0], axes[1][0], len(centres)), np.float32),
        agreement=np.mean(occupancy, axis=0, dtype=np.float32),
        fine_spacing=(fine_px, fine_px, thickness_mm / per_slab),
        supersample=supersample,
        per_slab=per_slab,
        blur_px=blur_px,
    )
    experts = []
    for reader in occupancy:
        share = rendered.to_scan(reader.astype(np.float32))
        mask = share >= 0.5
        if not mask.any() and share.max() > 0:  # a reader's nodule thinner than half a slab keeps its fullest voxel
            mask = share == share.max()
        experts.append(mask)
    rendered.experts = np.stack(experts)
    rendered.weight = rendered.blur(rendered.to_scan(rendered.agreement))
    return rendered


def blend_nodule(
    hu: np.ndarray, weight: np.ndarray, density: np.ndarray, pixel_mm: float, noise_sd: float
) -> np.ndarray:
    """The scan's box ``hu`` (float32) with the nodule of ``weight`` (``W``) and ``density`` (``M``) painted in.

    Each voxel gains ``W * max(0, L - H)`` with ``L = M / W``. ``H`` is, on the lung (below ``DENSER_THAN_LUNG_HU``),
    the lung's level: the scan smoothed over ``SMOOTH_MM`` over lung voxels only (a normalised convolution, so that a
    vessel or the pleura beside it does not raise it); on a denser voxel, its own value. So the lung's noise stays
    on the nodule, and where the scan is denser than the nodule nothing changes. A vessel too faint to count as
    dense gets the lung's ``H``, below its own value, and the gain could lift it above the nodule; no voxel is
    therefore raised past ``max(its value, L + NOISE_CAP_SD * noise_sd)``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    sigma = (max(1.0, SMOOTH_MM / pixel_mm),) * 2 + (0.0,)
    lung = (hu < DENSER_THAN_LUNG_HU).astype(np.float32)
    share = ndimage.gaussian_filter(lung, sigma)
    level_of_lung = ndimage.gaussian_filter(hu * lung, sigma) / np.maximum(share, 1e-3)
    smooth = np.where((lung > 0) & (share > 1e-3), level_of_lung, hu)
    filled = weight > 1e-4
    level = np.where(filled, density / np.maximum(weight, 1e-4), 0.0).astype(np.float32)
    gain = np.where(filled, weight * np.maximum(level - smooth, 0.0), 0.0)
    ceiling = np.maximum(hu, level + NOISE_CAP_SD * noise_sd)
    return np.where(filled, np.minimum(hu + gain, ceiling), hu).astype(np.float32)


def noise_hu(hu: np.ndarray, lungs: np.ndarray, pixel_mm: float, slices: list[int]) -> float:
    """The scan's noise SD in the lung (robust: the MAD of the difference to the scan smoothed over 1.5 mm, in lung
    parenchyma), from a few ``slices``."""
    residuals = []
    for k in slices:
        image = hu[..., k].astype(np.float32)
        smooth = ndimage.gaussian_filter(image, SMOOTH_MM / pixel_mm)
        parenchyma = lungs[..., k] & (smooth < -700) & (smooth > -980)
        residuals.append((image - smooth)[parenchyma])
    values = np.concatenate(residuals) if residuals else np.zeros(0)
    if values.size < 100:
        return 30.0  # *inferred*: a standard kernel's lung noise, when the lungs are too small to measure it
    return float(1.4826 * np.median(np.abs(values - np.median(values))))
