"""Coarse 3-D chest anatomy in Hounsfield units for the synthetic CT source.

Coordinates are millimetres with the origin at the volume's centre: ``y`` runs anterior to posterior (image rows),
``x`` from the patient's right to left (image columns), ``z`` inferior to superior (slices). Shapes are analytic
(superellipses varying with ``z``), so the lungs can be tested at any point without rendering a volume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["ChestAnatomy", "grow_tree", "render_tubes", "BLOOD_HU", "AIR_HU", "AIRWAY_WALL_HU"]

AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0  # contrast-free blood: vessels and heart
LIVER_HU = 55.0
AIRWAY_WALL_HU = 20.0
CSF_HU = 15.0
DISC_HU = 80.0

# ribs repeat along z with this pitch (mm) and fall this many mm per radian from the spine to the sternum
RIB_PITCH_MM = 25.0
RIB_SLOPE_MM = 40.0


def _level(y, x, cy, cx, ay, ax, p: float = 2.0):
    """Superellipse level ``|dx/ax|^p + |dy/ay|^p``: 1 on the boundary, < 1 inside.

    On a grid pass ``y`` as a column and ``x`` as a row: the powers then run on 1-D arrays only.
    """
    ay = np.maximum(ay, 1e-3)
    ax = np.maximum(ax, 1e-3)
    return np.abs((x - cx) / ax) ** p + np.abs((y - cy) / ay) ** p


@dataclass
class ChestAnatomy:
    """Random parameters of one chest and the shapes they define (all lengths in mm).

    Build one with :meth:`random`; ``lung`` tests points, ``render_slice`` paints one axial slice.
    """

    scale_y: float
    scale_x: float
    fat_mm: float
    muscle_mm: float
    heart_top: float
    heart_x: float
    heart_size: float
    aorta_x: float
    carina_z: float
    dome_z: float
    rib_phase: float
    disc_phase: float
    lung_hu: float
    lung_gradient_hu: float

    # canonical (unscaled) layout, see the module docstring for the axes
    body_ax: float = 150.0
    body_ay: float = 110.0
    cavity_cy: float = -6.0
    wall_mm: float = 8.0
    spine_cy: float = 25.0
    half_height_mm: float = 60.0

    @classmethod
    def random(cls, rng: np.random.Generator) -> ChestAnatomy:
        """A chest drawn with ``rng``."""
        return cls(
            scale_y=float(rng.uniform(0.9, 1.05)),
            scale_x=float(rng.uniform(0.9, 1.04)),
            fat_mm=float(rng.uniform(6.0, 22.0)),
            muscle_mm=float(rng.uniform(8.0, 14.0)),
            heart_top=float(rng.uniform(0.0, 0.4)),
            heart_x=float(rng.uniform(12.0, 26.0)),
            heart_size=float(rng.uniform(0.85, 1.1)),
            aorta_x=float(rng.uniform(20.0, 28.0)),
            carina_z=float(rng.uniform(20.0, 45.0)),
            dome_z=float(rng.uniform(-90.0, -45.0)),
            rib_phase=float(rng.uniform(0.0, RIB_PITCH_MM)),
            disc_phase=float(rng.uniform(0.0, 28.0)),
            lung_hu=float(rng.uniform(-900.0, -850.0)),
            lung_gradient_hu=float(rng.uniform(20.0, 60.0)),
        )

    # ---- geometry in canonical coordinates (u = y / scale_y, v = x / scale_x) ----

    def _canonical(self, y, x):
        return np.asarray(y, dtype=np.float32) / self.scale_y, np.asarray(x, dtype=np.float32) / self.scale_x

    def _cavity_axes(self, z):
        """Semi-axes (ay, ax) of the pleural cavity, narrowing towards the apex."""
        up = np.clip(np.asarray(z, dtype=np.float32) / self.half_height_mm, 0.0, 1.5)
        shrink = 1.0 - 0.15 * up**2
        ax = (self.body_ax - self.fat_mm - self.muscle_mm - self.wall_mm) * shrink
        ay = 71.0 * shrink
        return ay, ax

    def _heart_factor(self, z):
        t = np.asarray(z, dtype=np.float32) / self.half_height_mm
        return np.sqrt(np.clip((self.heart_top - t) / (self.heart_top + 1.0), 0.0, 1.0)) * self.heart_size

    def _dome(self, u, v):
        """z of the right hemidiaphragm's dome (liver below it)."""
        return self.dome_z - 30.0 * (((v + 55.0) / 75.0) ** 2 + (u / 80.0) ** 2)

    def lung(self, y, x, z, margin: float = 0.0) -> np.ndarray:
        """True where ``(y, x, z)`` (mm, broadcastable arrays) lies inside a lung by at least ``margin`` mm."""
        u, v = self._canonical(y, x)
        z = np.asarray(z, dtype=np.float32)
        ay, ax = self._cavity_axes(z)
        inside = _level(u, v, self.cavity_cy, 0.0, ay - margin, ax - margin, 2.4) <= 1.0
        inside &= self._outside_spine(u, v, margin)
        inside &= _level(u, v, 12.0, self.aorta_x, 13.0 + margin, 13.0 + margin) > 1.0  # descending aorta
        inside &= _level(u, v, -12.0, 0.0, 42.0 + margin, 27.0 + margin) > 1.0  # mediastinum
        inside &= ~((u < -12.0) & (np.abs(v) < 9.0 + margin))  # anterior junction
        h = self._heart_factor(z)
        inside &= _level(u, v, -28.0, self.heart_x, 48.0 * h + margin, 62.0 * h + margin) > 1.0
        inside &= z > self._dome(u, v) + margin
        return inside

    def cavity(self, y, x, z) -> np.ndarray:
        """True inside the pleural cavity (lungs and mediastinum): where vessels and airways may be drawn."""
        u, v = self._canonical(y, x)
        ay, ax = self._cavity_axes(z)
        return (_level(u, v, self.cavity_cy, 0.0, ay, ax, 2.4) <= 1.0) & self._outside_spine(u, v)

    @staticmethod
    def _outside_spine(u, v, margin=0.0):
        """True outside the block of spine and paraspinal muscle that the lungs wrap around."""
        return _level(u, v, 35.0, 0.0, 35.0 + margin, 26.0 + margin, 2.5) > 1.0

    def hilum(self, side: int) -> np.ndarray:
        """``(y, x, z)`` of the right (``side=-1``) or left (``side=+1``) hilum, where the vessel trees start."""
        return np.array([-8.0 * self.scale_y, side * 30.0 * self.scale_x, self.carina_z - 20.0])

    def trachea(self) -> np.ndarray:
        """Airway segments ``(p, q, r0, r1)`` of the trachea and both main bronchi (rows of 8 numbers)."""
        top = np.array([-12.0 * self.scale_y, 0.0, self.carina_z + 120.0])
        carina = np.array([-12.0 * self.scale_y, 0.0, self.carina_z])
        segs = [np.r_[top, carina, 8.5, 8.0]]
        for side in (-1, 1):
            segs.append(np.r_[carina, self.bronchus_end(side), 6.5, 5.5])
        return np.array(segs)

    def bronchus_end(self, side: int) -> np.ndarray:
        """Where a main bronchus enters its lung and the bronchial tree starts."""
        return np.array([-2.0 * self.scale_y, side * 34.0 * self.scale_x, self.carina_z - 25.0])

    def lung_centre(self, side: int, z: float) -> np.ndarray:
        """A point near the middle of one lung at height ``z``, for outward directions."""
        return np.array([0.0, side * 65.0 * self.scale_x, z])

    # ---- rendering ----

    def render_slice(self, y: np.ndarray, x: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paint the static tissues of the axial slice at height ``z``.

        Args:
            y: ``(rows, 1)`` row coordinates in mm.
            x: ``(1, cols)`` column coordinates in mm.
            z: the slice's height in mm.

        Returns:
            ``(hu, lung, cavity)``: float32 HU before vessels, nodules, blur and noise, and two bool masks.
        """
        u, v = self._canonical(y, x)
        shape = np.broadcast_shapes(u.shape, v.shape)
        hu = np.full(shape, AIR_HU, dtype=np.float32)
        body_ay, body_ax = self.body_ay, self.body_ax
        hu[_level(u, v, 0.0, 0.0, body_ay, body_ax, 2.3) <= 1.0] = FAT_HU
        f = self.fat_mm
        muscle = _level(u, v, -0.3 * f + 4.0, 0.0, body_ay - 0.7 * f - 4.0, body_ax - f, 2.3) <= 1.0
        hu[muscle] = MUSCLE_HU
        self._paint_ribs(hu, u, v, z)
        self._paint_spine(hu, u, v, z)
        cavity = self.cavity(y, x, z)
        hu[cavity] = FAT_HU  # mediastinal fat around the organs painted next
        self._paint_mediastinum(hu, u, v, z)
        hu[cavity & (z <= self._dome(u, v))] = LIVER_HU
        lung = self.lung(y, x, z)
        ay, _ = self._cavity_axes(z)
        depth = np.clip((u - self.cavity_cy + ay) / (2 * ay), 0.0, 1.0)  # 0 anterior, 1 posterior
        hu[lung] = np.broadcast_to(self.lung_hu + self.lung_gradient_hu * depth**2, shape)[lung]
        return hu, lung, cavity

    def _paint_ribs(self, hu, u, v, z) -> None:
        ay, ax = self._cavity_axes(z)
        level = _level(u, v, self.cavity_cy, 0.0, ay, ax, 2.4)
        rows, cols = np.nonzero((level > 1.0) & (level < 1.5))  # a ring around the cavity holds the ribs
        uu, vv = np.broadcast_to(u, level.shape)[rows, cols], np.broadcast_to(v, level.shape)[rows, cols]
        rho = level[rows, cols] ** (1 / 2.4)
        out_mm = (rho - 1.0) * np.hypot(uu - self.cavity_cy, vv) / rho  # about the distance outside the cavity
        thick = 7.0
        radial = np.abs(out_mm - 1.5 - thick / 2) / (thick / 2)
        phi = np.arctan2(np.abs(vv), uu - self.cavity_cy)  # 0 towards the spine, pi towards the sternum
        frac = (z + RIB_SLOPE_MM * phi - self.rib_phase) / RIB_PITCH_MM
        height = np.abs(frac - np.round(frac)) * RIB_PITCH_MM / 5.5  # ribs are 11 mm tall
        extent = np.hypot(radial, height)  # an oval cross-section
        rib = (extent < 1.0) & (phi > 0.3)
        bone = rib & (phi < 2.3)
        hu[rows[bone], cols[bone]] = np.where(extent > 0.7, 700.0, 260.0)[bone]  # cortex around marrow
        cartilage = rib & (phi >= 2.3) & (phi < 2.75)
        hu[rows[cartilage], cols[cartilage]] = 140.0
        sternum = _level(u, v, self.cavity_cy - ay - 7.0, 0.0, 6.0, 15.0) <= 1.0
        hu[sternum] = np.where(_level(u, v, self.cavity_cy - ay - 7.0, 0.0, 4.0, 13.0) <= 1.0, 300.0, 650.0)[sternum]

    def _paint_spine(self, hu, u, v, z) -> None:
        cy = self.spine_cy
        disc = ((z - self.disc_phase) % 28.0) < 5.0
        r = _level(u, v, cy, 0.0, 19.0, 21.0)
        body = r <= 1.0
        hu[body] = DISC_HU if disc else np.where(r > 0.77, 650.0, 240.0)[body]
        for cyy, cxx, ayy, axx in ((cy + 30.0, 0.0, 13.0, 13.0), (cy + 50.0, 0.0, 20.0, 5.0)):
            hu[_level(u, v, cyy, cxx, ayy, axx) <= 1.0] = 500.0  # neural arch, spinous process
        for side in (-1, 1):
            hu[_level(u, v, cy + 20.0, side * 26.0, 6.0, 15.0) <= 1.0] = 450.0  # transverse processes
        hu[_level(u, v, cy + 30.0, 0.0, 8.0, 8.0) <= 1.0] = CSF_HU  # spinal canal

    def _paint_mediastinum(self, hu, u, v, z) -> None:
        h = self._heart_factor(z)
        if h > 0:
            hu[_level(u, v, -28.0, self.heart_x, 48.0 * h, 62.0 * h) <= 1.0] = FAT_HU + 20.0  # pericardial fat
            hu[_level(u, v, -28.0, self.heart_x, 48.0 * h - 4.0, 62.0 * h - 4.0) <= 1.0] = BLOOD_HU
        for cy, cx, r in ((12.0, self.aorta_x, 12.0), (4.0, -8.0, 7.0)):  # descending aorta, oesophagus
            hu[_level(u, v, cy, cx, r, r) <= 1.0] = BLOOD_HU
        if h < 0.6:  # above the heart: ascending aorta, pulmonary trunk and superior vena cava
            for cy, cx, r in ((-30.0, -4.0, 15.0), (-22.0, 22.0, 13.0), (-26.0, -28.0, 10.0)):
                hu[_level(u, v, cy, cx, r, r) <= 1.0] = BLOOD_HU


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` scaled to unit length."""
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors perpendicular to the rows of ``d``."""
    return _unit(np.cross(d, rng.normal(size=d.shape)))


def _turn(d: np.ndarray, rng: np.random.Generator, angle: float) -> np.ndarray:
    """The rows of ``d`` (unit vectors) turned by ``angle`` radians in random directions."""
    return np.cos(angle) * d + np.sin(angle) * _perpendicular(d, rng)


def grow_tree(
    root: np.ndarray,
    directions: np.ndarray,
    radius: float,
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rng: np.random.Generator,
    min_radius: float = 0.5,
    max_segments: int = 1500,
) -> np.ndarray:
    """A random branching tree of tapering tubes, grown one generation at a time from ``root``.

    Each branch is 5-8 radii long and splits in two following Murray's law (``r^3 = r1^3 + r2^3``), the larger
    child turning less and both leaning away from the root; a branch whose end would leave the region given by
    ``inside`` turns a little further, up to three times, and then stops.

    Args:
        root: ``(3,)`` start point (mm).
        directions: ``(n, 3)`` initial directions of the trunks.
        radius: radius of the trunks (mm).
        inside: ``inside(points (n, 3), margins_mm (n,)) -> bool (n,)``, where branches may go.
        rng: the random generator.
        min_radius: branches thinner than this end the tree.
        max_segments: at most this many segments (the last generation is cut short).

    Returns:
        ``(n_segments, 8)``: start (3), end (3), start radius, end radius.
    """
    root = np.asarray(root, dtype=float)
    d = _unit(np.asarray(directions, dtype=float))
    p = np.tile(root, (len(d), 1))
    r = np.full(len(d), float(radius))
    segments, count = [], 0
    while len(r) and count < max_segments:
        length = np.clip(r * rng.uniform(5.0, 8.0, len(r)), 3.0, 25.0)[:, None]
        ok = np.zeros(len(r), dtype=bool)
        for attempt in range(4):
            todo = np.flatnonzero(~ok)
            if attempt:
                d[todo] = _turn(d[todo], rng, 0.4 * attempt)
            q = p[todo] + length[todo] * d[todo]
            ok[todo] = inside(q, 0.5 * r[todo]) & inside((p[todo] + q) / 2, 0.5 * r[todo])
        p, d, r = p[ok], d[ok], r[ok]
        q = p + length[ok] * d
        r_end = 0.95 * r
        segments.append(np.column_stack([p, q, r, r_end])[: max_segments - count])
        count += len(segments[-1])
        grow = r_end >= min_radius
        q, d, r_end = q[grow], d[grow], r_end[grow]
        alpha = rng.uniform(0.5, 1.0, len(r_end))  # radius ratio of the two children
        r1 = r_end / (1 + alpha**3) ** (1 / 3)
        axis = _perpendicular(d, rng)
        outward = 0.25 * _unit(q - root)
        turn1 = (rng.uniform(0.1, 0.5, len(r1)) * alpha)[:, None]
        turn2 = rng.uniform(0.6, 1.2, len(r1))[:, None]
        child1 = _unit(np.cos(turn1) * d + np.sin(turn1) * axis + outward)
        child2 = _unit(np.cos(turn2) * d - np.sin(turn2) * axis + outward)
        p, d, r = np.concatenate([q, q]), np.concatenate([child1, child2]), np.concatenate([r1, alpha * r1])
    return np.concatenate(segments).reshape(-1, 8) if segments else np.zeros((0, 8))


def render_tubes(
    segments: np.ndarray, y: np.ndarray, x: np.ndarray, z: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Partial-volume occupancy in ``[0, 1]`` of tapering tubes on a grid.

    Args:
        segments: ``(n, 8)`` start (3), end (3), start radius, end radius, in mm.
        y, x, z: 1-D voxel-centre coordinates (mm) of the grid's rows, columns and slices (evenly spaced).
        out: an array of the grid's shape to take the maximum with, filled in place.

    Returns:
        ``(len(y), len(x), len(z))`` float32: each voxel's covered fraction (maximum over the tubes).
    """
    if out is None:
        out = np.zeros((len(y), len(x), len(z)), dtype=np.float32)
    axes = (np.asarray(y, float), np.asarray(x, float), np.asarray(z, float))
    steps = [a[1] - a[0] if len(a) > 1 else 1.0 for a in axes]
    pixel = min(steps[0], steps[1])
    # a thick slice shows a tube over its whole thickness: distances along z count from the slab's faces
    slab = max(steps[2] - pixel, 0.0) / 2
    for p, q, r0, r1 in ((s[:3], s[3:6], s[6], s[7]) for s in segments):
        reach = max(r0, r1) + pixel
        lo = np.minimum(p, q) - reach - np.array([0, 0, slab])
        hi = np.maximum(p, q) + reach + np.array([0, 0, slab])
        idx = [np.flatnonzero((a >= lo[k]) & (a <= hi[k])) for k, a in enumerate(axes)]
        if any(len(i) == 0 for i in idx):
            continue
        box = tuple(slice(i[0], i[-1] + 1) for i in idx)
        cy, cx, cz = (axes[k][box[k]] for k in range(3))
        w = [cy[:, None, None] - p[0], cx[None, :, None] - p[1], cz[None, None, :] - p[2]]
        d = q - p
        t = np.clip((w[0] * d[0] + w[1] * d[1] + w[2] * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
        res = [w[k] - t * d[k] for k in range(3)]
        res[2] = np.maximum(np.abs(res[2]) - slab, 0.0)
        dist = np.sqrt(res[0] ** 2 + res[1] ** 2 + res[2] ** 2)
        r = r0 + t * (r1 - r0)
        occ = np.clip((r - dist) / pixel + 0.5, 0.0, 1.0) * np.minimum(1.0, 2.0 * r / pixel)
        np.maximum(out[box], occ.astype(np.float32), out=out[box])
    return out
