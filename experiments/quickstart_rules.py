"""The candidate rules and the scope of the segmentation stage on the quick start's Table 1: does a rule that helps on
real CT (``experiments/oracle_scope.py``) cost anything on the embedded default?

It re-segments the test split of a finished quick start (``python -m scripts.quickstart``) with its trained 1-GAP
classifier, coarse and fine, once per variant of the candidate rules (``configs/inference_slices.json``'s
candidate settings set on top of its defaults), evaluates them together with ``configs/evaluate.json`` and prints
the Table 1 rows side by side; JSON goes to ``experiments/results/quickstart_rules.json``. Given a full run
(``python -m scripts.quickstart --full``: ``models/gap1``, ``gap2``, ``gap3``) it segments all six weakly supervised
rows of Table 1 instead. A variant's predictions are reused when they were made by this bundle version. The
classifiers are the same for every variant, so the rows differ only by the rule.

    PYTHONPATH=bundle python experiments/quickstart_rules.py RUN_DIR [--variants paper defaults ...] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from scripts.evaluation.evaluate import format_number
from scripts.integration.config_runs import SLICE_INFERENCE, run_config
from scripts.networks.checkpoint import bundle_version
from scripts.pipeline.settings import config_overrides, preset_changes
from scripts.quickstart import WEAK_ROWS
from scripts.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"


PAPER, QUICKSTART = (preset_changes(name)["candidates"] for name in ("paper", "quickstart"))
# each variant: the segmenter settings (``{group: {field: value}}``) it sets on top of the configs' defaults (the
# real-CT candidate rules)
VARIANTS: dict[str, dict] = {
    "paper": {"candidates": PAPER},
    "defaults": {},
    "defaults without trim": {"candidates": {"trim_partial_volume": False}},
    "defaults without refit": {"candidates": {"icm_in_scope": False}},
    "defaults without split": {"candidates": {"split_mm": 0.0}},
    "quick start (defaults, fixed cut)": {"candidates": QUICKSTART},
    "quick start at 0.4.2 (no side tissue, no vessel split)": {
        "candidates": {**QUICKSTART, "side_tissue_px": 0.0, "split_vessel_mm": 0.0}
    },
    # the scope: the watershed's domain at half the NAM's range instead of a fifth (experiments/oracle_scope.py's
    # "+scope0.5")
    "quick start, scope at 0.5": {"candidates": QUICKSTART, "scope": {"threshold": 0.5}},
    # ground-glass at real densities lies under the fixed cut: cuts lower, or margins that skip the vessels'
    # partial-volume halo (a phase about 200 HU above the parenchyma at 2.25 mm)
    "defaults, 150 HU above the parenchyma": {"candidates": {"dense_margin_hu": 150.0}},
    "defaults, 200 HU above the parenchyma": {"candidates": {"dense_margin_hu": 200.0}},
    "quick start, fixed cut at -650 HU": {"candidates": {**QUICKSTART, "dense_hu": -650.0}},
    "quick start, fixed cut at -700 HU": {"candidates": {**QUICKSTART, "dense_hu": -700.0}},
}
COLUMNS = {"TPR": "TPR", "FPR_nodule": "FPR_nodule", "Dice": "dice", "TP Dice": "tp_dice", "TP DOA mm^2": "tp_doa_mm2"}


def segment(run_dir: Path, ckpt: Path, rule: dict, gap_levels: int, mode: str, out_dir: Path) -> float | None:
    """One variant's predictions on the test split; returns the seconds spent, None when an earlier run's are reused
    (made by this bundle version: its defaults are the rules on which the variant is set).

    The 1-GAP model ``ckpt`` classifies and screens; with ``gap_levels`` > 1 the multi-GAP model refines the scope, as
    in the full quick start."""
    if (out_dir / "panels" / "index.json").is_file():  # written last
        made_by = json.loads((out_dir / "settings.json").read_text()).get("bundle_version")
        if made_by == bundle_version(BUNDLE):
            return None
    shutil.rmtree(out_dir, ignore_errors=True)  # an older version's, or a run cut short
    models = run_dir / "models"
    extra = {}
    if gap_levels > 1:
        extra = {"multi_gap_levels": gap_levels, "multi_gap_ckpt_path": str(models / f"gap{gap_levels}" / "model.pt")}
    start = time.perf_counter()
    run_config(
        "run",
        SLICE_INFERENCE,
        bundle_root=str(BUNDLE),
        dataset_dir=str(run_dir / "dataset"),
        ckpt_path=str(ckpt),
        mode=mode,
        max_panels=0,
        output_dir=str(out_dir),
        **config_overrides(rule),
        **extra,
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Segment, evaluate and print each variant's rows; returns what is written to the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished quick start's --out (dataset/, models/)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default="", help="suffix of the JSON file")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default: under experiments/results/)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    work = run_dir / "rules"
    predictions, seconds = {}, {}
    full = (run_dir / "models" / "gap1").is_dir()
    table_rows = WEAK_ROWS if full else {"coarse": (1, "coarse"), "fine": (1, "fine")}
    ckpt = run_dir / "models" / ("gap1" if full else "") / "model.pt"
    for name in args.variants:
        for label, (gap_levels, mode) in table_rows.items():
            row = f"{name} {label}"
            out_dir = work / "".join(ch if ch.isalnum() else "_" for ch in row)
            seconds[row] = segment(run_dir, ckpt, VARIANTS[name], gap_levels, mode, out_dir)
            predictions[row] = str(out_dir)
    run_config(
        "run",
        "evaluate.json",
        bundle_root=str(BUNDLE),
        dataset_dir=str(run_dir / "dataset"),
        predictions=predictions,
        output_dir=str(work / "evaluation"),
        print_table=False,
    )
    metrics = json.loads((work / "evaluation" / "metrics.json").read_text())
    rows = {}
    width = max(len(row) for row in predictions) + 2
    print(f"{'variant':<{width}}" + "".join(f"{c:>13}" for c in COLUMNS))
    for row in predictions:
        m = metrics["methods"][row]
        rows[row] = {c: _value(m, key) for c, key in COLUMNS.items()}
        print(f"{row:<{width}}" + "".join(f"{format_number(rows[row][c], 3):>13}" for c in COLUMNS))
    name = f"quickstart_rules{'_' + args.name if args.name else ''}.json"
    result = {
        "run_dir": str(run_dir),
        "bundle_version": bundle_version(BUNDLE),
        "variants": {n: VARIANTS[n] for n in args.variants},
        "rows": rows,
        "seconds": seconds,
    }
    write_json(args.out or REPO / "experiments" / "results" / name, result)
    return result


def _value(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return value.get("mean") if isinstance(value, dict) else value


if __name__ == "__main__":
    main()
