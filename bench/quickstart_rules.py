"""The candidate rules of the segmentation stage on the quick start's Table 1: does a rule that helps on real CT
(``bench/oracle_scope.py``) cost anything on the embedded default?

It re-segments the test split of a finished quick start (``python -m scripts.quickstart``) with its trained 1-GAP
classifier, coarse and fine, once per variant of the candidate rules (``configs/inference_slices.json``'s
``dense_rule``, ``icm_in_scope``, ``trim_partial_volume`` or ``split_mm`` set on top of its defaults), evaluates them
together with ``configs/evaluate.json`` and prints the Table 1 rows side by side; JSON goes to
``bench/results/quickstart_rules.json``. The classifier is the same for every variant, so the rows differ only by
the rule.

    python bench/quickstart_rules.py RUN_DIR [--variants paper defaults ...] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))

from scripts.atomic import write_json  # noqa: E402
from scripts.evaluate import format_number  # noqa: E402
from scripts.quickstart import QUICKSTART_CANDIDATES, _run_config  # noqa: E402
from scripts.segmenter import PAPER_CANDIDATES  # noqa: E402

# each variant: what it sets on top of configs/inference_slices.json's defaults (the real-CT candidate rules)
VARIANTS: dict[str, dict] = {
    "paper": dict(PAPER_CANDIDATES),
    "defaults": {},
    "defaults without trim": {"trim_partial_volume": False},
    "defaults without refit": {"icm_in_scope": False},
    "defaults without split": {"split_mm": 0.0},
    "quick start (defaults, fixed cut)": dict(QUICKSTART_CANDIDATES),
    "quick start with side tissue": {**QUICKSTART_CANDIDATES, "side_tissue_px": 2.0},
}
COLUMNS = {"TPR": "TPR", "FPR_nodule": "FPR_nodule", "Dice": "dice", "TP Dice": "tp_dice", "TP DOA mm^2": "tp_doa_mm2"}


def segment(run_dir: Path, rule: dict, mode: str, out_dir: Path) -> float | None:
    """One variant's predictions on the test split; returns the seconds spent, None when an earlier run's are reused."""
    if (out_dir / "panels" / "index.json").is_file():  # written last
        return None
    start = time.perf_counter()
    _run_config(
        "run",
        "inference_slices.json",
        bundle_root=str(BUNDLE),
        dataset_dir=str(run_dir / "dataset"),
        ckpt_path=str(run_dir / "models" / "model.pt"),
        mode=mode,
        max_panels=0,
        output_dir=str(out_dir),
        **rule,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished quick start's --out (dataset/, models/model.pt)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default="", help="suffix of the JSON file")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    work = run_dir / "rules"
    predictions, seconds = {}, {}
    for name in args.variants:
        for mode in ("coarse", "fine"):
            row = f"{name} {mode}"
            out_dir = work / f"{''.join(ch if ch.isalnum() else '_' for ch in name)}_{mode}"
            seconds[row] = segment(run_dir, VARIANTS[name], mode, out_dir)
            predictions[row] = str(out_dir)
    _run_config(
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
    print(f"{'variant':<40}" + "".join(f"{c:>13}" for c in COLUMNS))
    for row in predictions:
        m = metrics["methods"][row]
        rows[row] = {c: _value(m, key) for c, key in COLUMNS.items()}
        print(f"{row:<40}" + "".join(f"{format_number(rows[row][c], 3):>13}" for c in COLUMNS))
    name = f"quickstart_rules{'_' + args.name if args.name else ''}.json"
    write_json(
        REPO / "bench" / "results" / name,
        {
            "run_dir": str(run_dir),
            "variants": {n: VARIANTS[n] for n in args.variants},
            "rows": rows,
            "seconds": seconds,
        },
    )


def _value(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return value.get("mean") if isinstance(value, dict) else value


if __name__ == "__main__":
    main()
