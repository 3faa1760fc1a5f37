"""Benchmark: vectorised ICM (scripts.pipeline.icm) against a plain per-pixel loop version of the same algorithm.

Both update the four colour classes of the 8-neighbourhood graph in the same order (inside a class the
pixels are independent, so the loop's raster order gives the same result) and re-estimate the phases the
same way: they must give identical labels. Prints a table and writes bench/results/icm.json.

    PYTHONPATH=bundle python bench/bench_icm.py [--sizes 48 96 384] [--loop-max 96] [--out bench/results/icm.json]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scripts.pipeline.icm import COLOURS, NEIGHBOUR_OFFSETS, icm_segmentation, initial_labels


def icm_loop(image, mask, phases=4, beta=0.7, max_sweeps=15):
    """Reference: the same ICM with explicit Python loops over pixels (for comparison only)."""
    h, w = image.shape
    values = image[mask]
    min_var = (0.01 * float(values.max() - values.min())) ** 2 or np.finfo(float).eps
    labels = -np.ones((h, w), int)
    labels[mask] = initial_labels(values, phases)

    def estimate(means, variances):
        for k in range(phases):
            v = values[labels[mask] == k]
            if v.size:
                means[k], variances[k] = v.mean(), max(v.var(), min_var)
        return means, variances

    means, variances = estimate(np.zeros(phases), np.full(phases, min_var))
    for _ in range(max_sweeps):
        changed = 0
        for r0, c0 in COLOURS:
            for r in range(r0, h, 2):
                for c in range(c0, w, 2):
                    if not mask[r, c]:
                        continue
                    same = [0] * phases
                    for dr, dc in NEIGHBOUR_OFFSETS:
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and labels[rr, cc] >= 0:
                            same[labels[rr, cc]] += 1
                    x = image[r, c]
                    energies = [
                        (x - means[k]) ** 2 / (2 * variances[k]) + 0.5 * math.log(variances[k]) - beta * same[k]
                        for k in range(phases)
                    ]
                    best = int(np.argmin(energies))
                    changed += best != labels[r, c]
                    labels[r, c] = best
        if changed == 0:
            break
        means, variances = estimate(means, variances)
    # same output convention as icm_segmentation: a phase left empty goes last
    empty = np.bincount(labels[mask], minlength=phases) == 0
    order = np.argsort(np.where(empty, np.inf, means), kind="stable")
    rank = np.empty(phases, int)
    rank[order] = np.arange(1, phases + 1)
    out = np.zeros((h, w), np.int32)
    out[mask] = rank[labels[mask]]
    return out


def phantom(size: int, seed: int = 0):
    """A chest-like slice in HU: body, two lungs with vessel-like blobs and a nodule, noise; and the lung mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.where(((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.47) ** 2 < 1, 40.0, -1000.0)
    lungs = np.zeros((size, size), bool)
    for c in (0.3, 0.7):
        lungs |= ((yy - 0.5) / 0.33) ** 2 + ((xx - c) / 0.15) ** 2 < 1
    hu[lungs] = -850.0
    for _ in range(12):
        r, c = rng.uniform(0.25, 0.75), rng.choice([0.3, 0.7]) + rng.uniform(-0.08, 0.08)
        hu[((yy - r) ** 2 + (xx - c) ** 2 < (rng.uniform(0.005, 0.015)) ** 2) & lungs] = -50.0
    hu[(yy - 0.4) ** 2 + (xx - 0.3) ** 2 < 0.02**2] = 20.0
    return hu + rng.normal(0, 25, hu.shape), lungs


def timed(fn, *args, repeats=3):
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 384])
    parser.add_argument("--loop-max", type=int, default=96, help="largest size the loop version runs on")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "icm.json"))
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        hu, lungs = phantom(size)
        for name, mask in (("lungs", lungs), ("slice", np.ones_like(lungs))):
            t_vec, (labels, _) = timed(icm_segmentation, hu, mask)
            row = {"size": size, "mask": name, "pixels": int(mask.sum()), "vectorised_s": t_vec}
            if size <= args.loop_max:
                t_loop, ref = timed(icm_loop, hu, mask, repeats=1)
                row |= {"loop_s": t_loop, "speedup": t_loop / t_vec, "identical": bool((ref == labels).all())}
            rows.append(row)
    print(f"{'size':>5} {'mask':>6} {'pixels':>7} {'vectorised ms':>14} {'loop ms':>10} {'speed-up':>9} identical")
    for r in rows:
        loop = f"{1e3 * r['loop_s']:10.1f} {r['speedup']:9.0f} {r['identical']}" if "loop_s" in r else f"{'-':>10}"
        print(f"{r['size']:5d} {r['mask']:>6} {r['pixels']:7d} {1e3 * r['vectorised_s']:14.1f} {loop}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
    if not all(r.get("identical", True) for r in rows):
        sys.exit("the loop and vectorised ICM disagree")


if __name__ == "__main__":
    main()
