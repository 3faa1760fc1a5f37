"""Benchmark: per-slice latency of the weakly supervised segmentation, split by stage, and R-NAM cost.

On a 384 x 384 chest-like phantom (bench_icm's) with a GAPClassifier (width configurable, random weights:
timings do not depend on the weights), measures: one network forward (logits + NAM), scope, ICM, candidate
extraction (with the segmenter's default rules); for each number of candidates, R-NAM screening full-image one by
one, full-image batched, cropped batched and incremental (cropped, recomputing only what each candidate changes), in
forwards per candidate; the post-processing share of one forward; and the largest differences between the exact
shortcuts' scores and the full-image ones. Prints a table and writes bench/results/segmentation.json.

    PYTHONPATH=bundle python bench/bench_segmentation.py [--width 1.0] [--size 384] [--candidates 4 8] [--threads 1]
"""

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from bench_icm import phantom
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.candidates import Candidate, extract_candidates
from scripts.pipeline.classify import logits_and_nam
from scripts.pipeline.icm import icm_segmentation
from scripts.pipeline.lungs import segment_lungs
from scripts.pipeline.scope import screening_scope
from scripts.pipeline.screen import crop_window, rnam_scores
from scripts.pipeline.settings import CandidateSettings, ICMSettings


def timed(fn, repeats):
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def rel_diff(scores, reference):
    return float(np.max(np.abs(scores - reference)) / np.max(np.abs(reference)))


def padded_candidates(found, scope, k):
    """``k`` candidates: R-NAM cost depends on their number and spread, not their shape, so pad with small
    squares in the scope."""
    found = list(found[:k])
    rows, cols = np.nonzero(scope)
    while len(found) < k:
        m = np.zeros(scope.shape, bool)
        j = len(found)
        m[rows.min() + 2 * j : rows.min() + 2 * j + 3, cols.min() + 3 : cols.min() + 6] = True
        found.append(Candidate(m, 9.0, (0, 0, 0, 0)))
    return found


def show(table):
    for key, value in table.items():
        if key.endswith("_s"):
            print(f"  {key:<42} {1e3 * value:10.1f} ms")
        elif isinstance(value, float):
            print(f"  {key:<42} {value:10.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--candidates", type=int, nargs="+", default=[4, 8], help="candidates screened by R-NAM")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "segmentation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.size
    hu, _ = phantom(size)
    spacing = (0.75 * 384 / size,) * 2
    x = torch.as_tensor(np.clip((hu + 1000) / 1400, 0, 1), dtype=torch.float32)[None, None]
    net = GAPClassifier(gap_levels=1, width=args.width).eval()

    with torch.no_grad():
        t_forward, (_, nam) = timed(lambda: logits_and_nam(net, x), args.repeats)
    # a scope like a nodule's NAM blob (random weights give no meaningful NAM): a 24-px disk in the left lung
    yy, xx = np.mgrid[:size, :size]
    r0, c0 = int(0.4 * size), int(0.3 * size)
    nam_np = nam[0, 0].numpy().astype(np.float64) + 10 * np.exp(-((yy - r0) ** 2 + (xx - c0) ** 2) / (2 * 10.0**2))
    t_scope, scope = timed(lambda: screening_scope(nam_np), args.repeats)
    t_lungs, lungs = timed(lambda: segment_lungs(hu, spacing), args.repeats)
    t_icm, (labels, means) = timed(lambda: icm_segmentation(hu, lungs), args.repeats)
    # the segmenter's default candidate rules (phases fitted again in the scope), candidates from 1 mm^2
    rules = {**CandidateSettings().extract_arguments(ICMSettings()), "min_area_mm2": 1.0}
    t_cand, found = timed(lambda: extract_candidates(labels, means, scope, lungs, spacing, hu=hu, **rules), 3)
    rows, cols = np.nonzero(scope)
    window = crop_window(
        (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1), (size, size), net.nam_stride, net.nam_context_radius
    )
    crop_shape = [s.stop - s.start for s in window] if window else [size, size]
    post = t_scope + t_icm + t_cand
    result = {
        "size": size,
        "width": args.width,
        "threads": args.threads,
        "scope_box_px": [int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)],
        "nam_context_radius": net.nam_context_radius,
        "crop_shape": crop_shape,
        "crop_area_fraction": crop_shape[0] * crop_shape[1] / size**2,
        "forward_s": t_forward,
        "scope_s": t_scope,
        "lung_mask_s": t_lungs,
        "icm_s": t_icm,
        "candidates_s": t_cand,
        "postprocessing_share_of_forward": post / t_forward,
        "rnam": {},
    }
    print(f"size {size}, width {args.width}, {args.threads} thread(s), crop {crop_shape}")
    show(result)
    image, ref = x[0], nam[0, 0].numpy()
    for k in args.candidates:
        masks = np.stack([c.mask for c in padded_candidates(found, scope, k)])
        screen = partial(rnam_scores, net, image, ref, scope, masks, 0.1)
        with torch.no_grad():  # again next to the R-NAM timings: the machine's load drifts
            t_forward, _ = timed(lambda: logits_and_nam(net, x), args.repeats)
        t_one, s_one = timed(lambda: screen(crop=False, batch_size=1), args.repeats)
        t_batch, s_full = timed(lambda: screen(crop=False), args.repeats)
        t_crop, s_crop = timed(lambda: screen(incremental=False), args.repeats)
        t_incr, s_incr = timed(screen, args.repeats)
        rnam = {
            "union_box_px": [int(n) for n in np.ptp(np.nonzero(masks.any(0)), axis=1) + 1],
            "forward_s": t_forward,
            "full_one_by_one_s": t_one,
            "full_batched_s": t_batch,
            "cropped_batched_s": t_crop,
            "incremental_s": t_incr,
            "batched_speedup": t_one / t_batch,
            "forwards_per_candidate_full_one_by_one": t_one / (k * t_forward),
            "forwards_per_candidate_full_batched": t_batch / (k * t_forward),
            "forwards_per_candidate_cropped": t_crop / (k * t_forward),
            "forwards_per_candidate_incremental": t_incr / (k * t_forward),
            "max_rel_diff_cropped_vs_full": rel_diff(s_crop, s_full),
            "max_rel_diff_incremental_vs_full": rel_diff(s_incr, s_full),
            "max_rel_diff_batched_vs_one_by_one": rel_diff(s_full, s_one),
        }
        result["rnam"][str(k)] = rnam
        print(f"R-NAM, {k} candidates in a {rnam['union_box_px']} px box")
        show(rnam)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_out = out.with_name(out.name + ".partial")
    partial_out.write_text(json.dumps(result, indent=2))
    partial_out.replace(out)


if __name__ == "__main__":
    main()
