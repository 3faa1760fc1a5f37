"""The segmenter's settings, one small group per step (scope, ICM, candidates, screening), and the named presets.

The defaults of each group are the bundle's (the candidate rules that hold on real CT; ``docs/segmentation_choices.md``
says why each departs from the paper). ``PRESETS`` names the other sets in use: ``"paper"``, the candidate rule as the
paper gives it, and ``"quickstart"``, the quick start's. A preset holds only the groups it changes:
``WeaklySupervisedSegmenter(mode, **PRESETS["paper"])`` segments with it, and ``preset_overrides("quickstart")`` gives
the config overrides that select it (``segmenter#candidates#dense_rule`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "HU_WINDOW",
    "ScopeSettings",
    "ICMSettings",
    "CandidateSettings",
    "ScreeningSettings",
    "GROUPS",
    "PRESETS",
    "settings_group",
    "preset_changes",
    "config_overrides",
    "preset_overrides",
]

# The lung window that maps HU to the classifier's input [0, 1] (the training configs' hu_window).
HU_WINDOW = (-1000.0, 400.0)


@dataclass(frozen=True)
class ScopeSettings:
    """Scope C: the most prominent watershed blob of the NAM (``scripts.pipeline.scope``).

    Args:
        sigma: Gaussian smoothing of the NAM in pixels before it is normalised to [0, 1].
        threshold: the watershed's domain is where the normalised NAM reaches this.
        min_distance: least distance in pixels between two watershed markers (about half the NAM's stride).
        multi_gap_min_peak: multi-GAP modes: least normalised peak of a multi-GAP blob inside C1 that replaces C1.
        n_nodules: ``"two_nodule"`` mode: the blobs segmented, most prominent first.
    """

    sigma: float = 1.0
    threshold: float = 0.2
    min_distance: int = 8
    multi_gap_min_peak: float = 0.5
    n_nodules: int = 2


@dataclass(frozen=True)
class ICMSettings:
    """The multi-phase ICM segmentation of the slice's lungs (``scripts.pipeline.icm.icm_segmentation``).

    Args:
        phases: intensity phases.
        beta: weight of the Potts prior on 8-neighbours.
        max_sweeps: sweeps at most (it stops earlier when no label changes).
    """

    phases: int = 4
    beta: float = 0.7
    max_sweeps: int = 15


@dataclass(frozen=True)
class CandidateSettings:
    """Which ICM phases make nodule candidates, and how candidates are cut (``scripts.pipeline.candidates``).

    Args:
        dense_rule: ``"relative"``: phases denser than the parenchyma phase by ``dense_margin_hu`` make candidates;
            ``"fixed"``: phases above ``dense_hu``.
        dense_hu: the fixed rule's cut (HU); in both rules the parenchyma is the least dense phase under it that holds
            a tenth of the lungs (``parenchyma_value``): what the relative rule counts from, what the trim cuts from
            and what R-NAM fills a candidate with.
        dense_margin_hu: see ``dense_rule``.
        min_area_mm2: smaller candidates are dropped.
        icm_in_scope: fit the phases again on the lungs within each scope, so that a faint nodule filling much of
            the scope gets a phase of its own.
        trim_partial_volume: cut candidates at half way between the parenchyma and their own median HU.
        trim_iterations: with the trim, cut again from the median of what is left, this many times at most.
        side_tissue_px: when > 0 (with the trim), what the trim cut off beside a candidate, at least this many
            pixels thick (a ground-glass nodule against a vessel), becomes a candidate of its own; 0: off.
        split_mm: split candidates at necks thinner than a disk of this radius (nodules from vessels, rims along the
            pleura); 0: off.
        drop_thin: with ``split_mm``, drop what no such disk fits in (vessels along their length).
        split_vessel_mm: with ``split_mm``, first cut candidates at the calibre of a vessel of this radius, keeping
            what that cuts off split at ``split_mm``; 0: off.
    """

    dense_rule: str = "relative"
    dense_hu: float = -600.0
    dense_margin_hu: float = 100.0
    min_area_mm2: float = 7.0
    icm_in_scope: bool = True
    trim_partial_volume: bool = True
    trim_iterations: int = 3
    side_tissue_px: float = 2.0
    split_mm: float = 1.0
    drop_thin: bool = True
    split_vessel_mm: float = 2.0

    def extract_arguments(self, icm: ICMSettings) -> dict[str, Any]:
        """These settings as ``scripts.pipeline.candidates.extract_candidates``'s keyword arguments, its phases fitted
        again in the scope with ``icm`` when ``icm_in_scope``."""
        return {
            "min_value": float(self.dense_hu),
            "min_area_mm2": float(self.min_area_mm2),
            "rule": self.dense_rule,
            "margin_hu": float(self.dense_margin_hu),
            "refit": asdict(icm) if self.icm_in_scope else None,
            "trim": bool(self.trim_partial_volume),
            "trim_iterations": int(self.trim_iterations),
            "side_px": float(self.side_tissue_px),
            "split_mm": float(self.split_mm),
            "split_vessel_mm": float(self.split_vessel_mm),
            "drop_thin": bool(self.drop_thin),
        }


@dataclass(frozen=True)
class ScreeningSettings:
    """R-NAM screening of the candidates (``scripts.pipeline.screen.rnam_scores``).

    Args:
        crop: compute R-NAMs on the exact stride-aligned crop around the scope and, for a ``GAPClassifier``, recompute
            only the window each candidate changes (the same scores; False: the full image, the reference).
        batch_size: masked copies per forward or window (None: all at once, or on the incremental path nearby
            candidates together, ``screen._groups``); it changes the speed, not the scores (beyond float rounding).
        reduced_precision: with the segmenter's ``precision`` bfloat16, R-NAM screens in bfloat16 too (on the
            incremental path; R-NAM 2x faster); off, or in int8 or float32: float32. R-NAM's pick stayed float32's on
            98.9 % / 97.6 % of the positive slices of the quick start's model / a width-1 model screening in
            bfloat16, on 99.6 % / 98.8 % screening in float32 (target 98 %), so it is off by default; after int8's
            classification float32 screening kept 98.5 %, bfloat16's 97.5 %, int8's 96.7 % (docs/precision.md).
    """

    crop: bool = True
    batch_size: int | None = None
    reduced_precision: bool = False


# The groups by their names in the segmenter's arguments and in the configs' ``segmenter`` section.
GROUPS = {"scope": ScopeSettings, "icm": ICMSettings, "candidates": CandidateSettings, "screening": ScreeningSettings}

# Named presets: the groups each changes from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # the bundle's defaults: the candidate rules that hold on real CT
    "real_ct": {},
    # the paper's candidate rule as first built: a fixed -600 HU cut on phases fitted in the whole slice's lungs, no
    # trimming, no splitting
    "paper": {
        "candidates": CandidateSettings(
            dense_rule="fixed",
            icm_in_scope=False,
            trim_partial_volume=False,
            side_tissue_px=0.0,
            split_mm=0.0,
            split_vessel_mm=0.0,
        )
    },
    # the quick start's: the defaults with the paper's fixed cut. On its 2.25 mm pixels the vessels' partial-volume
    # halo is a phase of its own about 200 HU above the parenchyma, and the relative cut takes every vessel with it.
    "quickstart": {"candidates": CandidateSettings(dense_rule="fixed")},
}


def settings_group(name: str, value: Any) -> Any:
    """The group ``name`` (a key of ``GROUPS``) from its object, a mapping of its fields (a config section), or None
    (its defaults)."""
    kind = GROUPS[name]
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(kind)})
        if unknown:
            raise ValueError(f"unknown {name} settings {unknown}; known: {[f.name for f in fields(kind)]}")
        return kind(**value)
    raise TypeError(f"{name} settings must be a {kind.__name__} or a mapping of its fields, got {type(value).__name__}")


def preset_changes(name: str) -> dict[str, dict[str, Any]]:
    """``{group: {field: value}}``: the fields preset ``name`` changes from the defaults."""
    changes = {}
    for group, value in PRESETS[name].items():
        default = GROUPS[group]()
        changed = {
            f.name: getattr(value, f.name) for f in fields(value) if getattr(value, f.name) != getattr(default, f.name)
        }
        if changed:
            changes[group] = changed
    return changes


def config_overrides(changes: Mapping[str, Mapping[str, Any]], key: str = "segmenter") -> dict[str, Any]:
    """``{"<key>#<group>#<field>": value}``: the config overrides that set ``changes`` (``{group: {field: value}}``)
    on the segmenter under ``key``."""
    return {f"{key}#{group}#{field}": value for group, changed in changes.items() for field, value in changed.items()}


def preset_overrides(name: str, key: str = "segmenter") -> dict[str, Any]:
    """Config overrides that give the segmenter under ``key`` the preset ``name`` (what it changes from the
    defaults)."""
    return config_overrides(preset_changes(name), key)
