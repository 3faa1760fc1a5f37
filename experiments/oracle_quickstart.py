"""The segmentation stage with an oracle NAM on a quick start's test slices, per nodule kind: what each candidate rule
can find at the quick start's 2.25 mm pixels when the classifier is taken out of the way.

``experiments/oracle_scope.py`` measures the stage on real CT at 0.75 mm; this runs the same stage (its ``evaluate``:
the ideal NAM, a Gaussian of ``--nam-sigma`` pixels on the nodule, and one displaced by ``--displacement`` pixels) on
the test slices with one nodule of a finished quick start (``python -m scripts.quickstart``), typed solid, part-solid or
ground-glass by ``experiments/quickstart_by_kind.py``, under the quick start's rule (the fixed -600 HU cut) and the
bundle's defaults (100 HU above the parenchyma). Prints detection, best-candidate and coarse TP Dice, the best
candidate's area ratio and candidates per scope; JSON to ``--out``.

    PYTHONPATH=bundle python experiments/oracle_quickstart.py RUN_DIR [--nam-sigma 16]
        [--out experiments/results/oracle_quickstart.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import oracle_scope
from quickstart_by_kind import slice_kinds
from scripts.data.dataset import load_split
from scripts.networks.checkpoint import bundle_version
from scripts.pipeline.settings import preset_changes
from scripts.utils.io import write_json

EXPERIMENTS = Path(__file__).resolve().parent


GROUPS = ("all solid", "all part-solid", "all ground-glass", "all")


def quickstart_items(dataset_dir: Path) -> list[dict]:
    """``oracle_scope``'s items for the test slices with one nodule: HU, truth, pixel spacing and kind."""
    kinds = slice_kinds(dataset_dir)
    items = []
    for entry in load_split(dataset_dir, "test", ("label", "spacing_mm")):
        name = Path(entry["image"]).name
        if name in kinds:
            items.append(
                {
                    "set": "quickstart",
                    "kind": kinds[name],
                    "place": "quickstart",
                    "name": name,
                    "hu": np.asarray(nib.load(entry["image"]).dataobj),
                    "truth": np.asarray(nib.load(entry["label"]).dataobj) > 0,
                    "spacing": tuple(entry["spacing_mm"]),
                }
            )
    return items


def rules() -> dict[str, dict]:
    """The two rules compared: the bundle's defaults and the quick start's fixed cut on top of them."""
    defaults = oracle_scope._variant("current")
    fixed = {**defaults, "cand": {**defaults["cand"], "rule": preset_changes("quickstart")["candidates"]["dense_rule"]}}
    return {"quick start (fixed -600 HU cut)": fixed, "defaults (100 HU above the parenchyma)": defaults}


def main(argv: list[str] | None = None) -> dict:
    """Run both rules on a quick start's test slices; print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished quick start's --out (dataset/)")
    parser.add_argument("--nam-sigma", type=float, default=oracle_scope.NAM_SIGMA_PX, help="the oracle NAM's sigma, px")
    parser.add_argument("--displacement", type=float, default=oracle_scope.DISPLACEMENT_PX, help="px")
    parser.add_argument("--out", type=Path, default=EXPERIMENTS / "results" / "oracle_quickstart.json")
    args = parser.parse_args(argv)
    items = quickstart_items(args.run_dir / "dataset")
    compared = rules()
    results = {}
    print(f"{'rule':<42}{'group':<18}{'n':>5}{'detected':>10}{'best TP Dice':>14}{'coarse':>8}{'ratio':>7}{'cand.':>7}")
    for name, settings in compared.items():
        results[name] = oracle_scope.evaluate(
            items, settings, sigma_px=args.nam_sigma, displacement_px=args.displacement
        )
        for group in GROUPS:
            s = results[name]["ideal"].get(group)
            if s:
                print(
                    f"{name:<42}{group:<18}{s['n']:>5}{s['detection']:>10.2f}{s['best_tp_dice'] or 0:>14.2f}"
                    f"{s['coarse_tp_dice'] or 0:>8.2f}{s['median_area_ratio'] or 0:>7.2f}"
                    f"{s['candidates_per_scope']:>7.1f}"
                )
    result = {
        "run_dir": str(args.run_dir.resolve()),
        "bundle_version": bundle_version(EXPERIMENTS.parent / "bundle"),
        "nam_sigma_px": args.nam_sigma,
        "displacement_px": args.displacement,
        "rules": compared,
        "results": results,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
