"""Painting and placing LIDC nodule shapes: what the synthetic source and the real-CT insertion share.

A nodule is painted from its experts' *agreement* (the mean of their masks: where the readers disagree it fades),
at a *level* in HU that holds its ground-glass (with a smooth texture of a few mm), its solid core, or both
(``lesion_level``). Where it goes is decided by the source; a nodule against the pleura is one slid outwards in its
slice until one more step would leave the lung (``slide_outward``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["GGO_TEXTURE_MM", "GROUND_GLASS_BELOW_HU", "lesion_level", "random_orientation", "slide_outward"]

GGO_TEXTURE_MM = 1.5  # the size of the denser and fainter patches of ground-glass
GROUND_GLASS_BELOW_HU = -300.0  # a level under this is ground-glass and gets the texture


def lesion_level(
    agreement: np.ndarray,
    ggo_hu: float,
    solid_hu: float,
    core_fraction: float,
    texture_hu: float,
    spacing: Sequence[float],
    rng: np.random.Generator,
    sampling: Sequence[float] | None = None,
) -> np.ndarray:
    """The HU a nodule is painted with, on the grid of its experts' ``agreement`` (float32, in [0, 1]).

    Args:
        agreement: the mean of the experts' masks (a box around the nodule).
        ggo_hu: the level of the ground-glass (or of the whole nodule when it is solid: then ``ggo_hu`` is its
            solid density and gets no texture).
        solid_hu: the density of the solid core.
        core_fraction: the share of the nodule's depth that is solid core: 0 none, 0.5 the inner half (the synthetic
            part-solid nodules), 1 the whole nodule. The depth is the distance to the majority outline
            (``agreement >= 0.5``), the core the voxels deeper than ``1 - core_fraction`` of the largest depth.
        texture_hu: standard deviation of the ground-glass texture (smooth over ``GGO_TEXTURE_MM``); 0 for none.
        spacing: the grid's voxel size in mm (for the texture's size).
        rng: draws the texture.
        sampling: voxel size for the depth; None measures it in voxels (the synthetic source's grid, which is
            nearly isotropic in-plane).

    Returns:
        float32 levels of ``agreement``'s shape.
    """
    level = np.full_like(agreement, ggo_hu)
    if texture_hu > 0 and ggo_hu < GROUND_GLASS_BELOW_HU:
        sigma = [GGO_TEXTURE_MM / s for s in spacing]
        texture = ndimage.gaussian_filter(rng.standard_normal(agreement.shape), sigma).astype(np.float32)
        level += texture * np.float32(texture_hu / max(float(texture.std()), 1e-6))
    if core_fraction > 0:
        depth = ndimage.distance_transform_edt(agreement >= 0.5, sampling=sampling)
        core = ndimage.gaussian_filter((depth > (1.0 - core_fraction) * depth.max()).astype(np.float32), 0.7)
        level += core * (solid_hu - ggo_hu)
    return level


def random_orientation(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The masks ``(n, rows, cols, slices)`` flipped along each axis and transposed in-plane at random (LIDC pixels
    are square, so a transposed nodule is as real as the original)."""
    flips = rng.random(4) < 0.5
    out = masks[:, :: -1 if flips[0] else 1, :: -1 if flips[1] else 1, :: -1 if flips[2] else 1]
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3) if flips[3] else out)


def slide_outward(
    origin: tuple[int, int, int], step: Sequence[float], fits: Callable[[tuple[int, int, int]], bool], max_steps: int
) -> tuple[int, int, int]:
    """Move a placed nodule along ``step`` (pixels per step, in its slice) while it still ``fits``: it ends where
    one more step would take it out of the lung, against the pleura (or the mediastinum)."""
    best = origin
    for k in range(1, max_steps):
        moved = (int(round(origin[0] + k * step[0])), int(round(origin[1] + k * step[1])), origin[2])
        if moved == best:
            continue
        if not fits(moved):
            break
        best = moved
    return best
