"""Score predicted masks of any method against a prepared split: the paper's Table 1 and Fig. 3.

Inputs are the prepared dataset (``datalist.json``, ``images/``, ``labels/``) and, per method, a prediction folder
holding ``masks/<stem>.nii.gz`` for every slice of the split and, optionally, ``records/<stem>.json`` with the
classifier's nodule probability. Slices with one nodule or none give Table 1 (the paper: "segmentation evaluation
is focused on slices with one nodule"); slices with two nodules are counted apart as both / one / none found.
The counting rules are in :mod:`scripts.evaluation.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from ..data.dataset import load_split, slice_stem
from ..utils.io import read_json, write_atomically, write_json, write_text
from .metrics import (
    FP_NODULE_RULES,
    binned_mean_sd,
    classification_summary,
    count_found_nodules,
    detection_summary,
    slice_outcome,
)

__all__ = [
    "PAPER_ORDER",
    "read_mask",
    "score_method",
    "summarize_method",
    "order_methods",
    "format_number",
    "format_mean_sd",
    "table1_cells",
    "format_table1",
    "plot_fig3",
    "SegmentationEvaluation",
]

# Table 1's rows, top to bottom; methods with other names follow in the order given.
PAPER_ORDER = (
    "1-GAP coarse",
    "2-GAP coarse",
    "3-GAP coarse",
    "1-GAP fine",
    "2-GAP fine",
    "3-GAP fine",
    "multi-GAP",
    "U-Net",
)
DEFAULT_BINS_MM = (3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 100.0)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A 2-D mask from a NIfTI file (trailing singleton axes dropped), or an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing mask: {path}")
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    if arr.ndim > 2 and all(n == 1 for n in arr.shape[2:]):
        arr = arr.reshape(arr.shape[:2])
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D slice, got shape {arr.shape}.")
    return arr > 0


def _read_probability(pred_dir: Path, stem: str) -> float | None:
    records = pred_dir / "records"
    if not records.is_dir():
        return None
    path = records / f"{stem}.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing record (the folder {records} exists, so every slice needs one): {path}")
    record = read_json(path)
    if "probability" not in record:
        raise ValueError(f"{path} has no 'probability'.")
    return float(record["probability"])


def score_method(items: Sequence[dict], pred_dir: str | os.PathLike, connectivity: int = 2) -> list[dict]:
    """One row per slice of ``items``: the item's identity, :func:`scripts.evaluation.metrics.slice_outcome` for slices
    with at most one nodule, ``found`` / ``components`` for slices with two or more, and ``probability`` (or None)."""
    pred_dir = Path(pred_dir)
    if not (pred_dir / "masks").is_dir():
        raise FileNotFoundError(f"no masks folder in the predictions: {pred_dir / 'masks'}")
    rows = []
    for item in items:
        stem = slice_stem(item["image"])
        pred_path = pred_dir / "masks" / f"{stem}.nii.gz"
        pred, label = read_mask(pred_path), read_mask(item["label"])
        if pred.shape != label.shape:
            raise ValueError(f"{pred_path}: shape {pred.shape} differs from the label's {label.shape}.")
        positive = int(item["class"]) == 1
        if positive != bool(label.any()):
            raise ValueError(
                f"{item['label']}: class {item['class']} but the mask is {'' if positive else 'not '}empty."
            )
        nodules = int(item.get("nodules", int(positive)))
        diameters = list(item.get("diameters_mm") or [])
        row = {
            "stem": stem,
            "subject": item.get("subject"),
            "slice": item.get("slice"),
            "class": int(positive),
            "nodules": nodules,
            "diameter_mm": float(diameters[0]) if len(diameters) == 1 else None,
            "probability": _read_probability(pred_dir, stem),
        }
        if nodules >= 2:
            row["found"], row["components"] = count_found_nodules(pred, label, connectivity)
        else:
            spacing = nib.load(str(item["image"])).header.get_zooms()[:2]
            row.update(slice_outcome(pred, label, spacing, connectivity))
        rows.append(row)
    return rows


def summarize_method(
    rows: Sequence[dict],
    fp_nodule_rule: str = "exclusive",
    diameter_bins_mm: Sequence[float] = DEFAULT_BINS_MM,
    threshold: float = 0.5,
) -> dict:
    """Table 1, Fig. 3, two-nodule and classification numbers from :func:`score_method`'s rows."""
    single = [r for r in rows if r["nodules"] < 2]
    multi = [r for r in rows if r["nodules"] >= 2]
    summary = detection_summary(single, fp_nodule_rule)
    tp = [r for r in single if r["outcome"] == "TP" and r["diameter_mm"] is not None]
    diameters = [r["diameter_mm"] for r in tp]
    nodule_diameters = [r["diameter_mm"] for r in single if r["class"] == 1 and r["diameter_mm"] is not None]
    summary["by_diameter"] = {
        "tp_dice": binned_mean_sd([r["dice"] for r in tp], diameters, diameter_bins_mm),
        "tp_doa_mm2": binned_mean_sd([r["doa_mm2"] for r in tp], diameters, diameter_bins_mm),
        # every one-nodule slice of the split per bin, found or not: how much each bin's mean stands on
        "nodule_slices": [b["n"] for b in binned_mean_sd(nodule_diameters, nodule_diameters, diameter_bins_mm)],
    }
    summary["two_nodules"] = {
        "slices": len(multi),
        "both": sum(r["found"] >= 2 for r in multi),
        "one": sum(r["found"] == 1 for r in multi),
        "none": sum(r["found"] == 0 for r in multi),
    }
    probs = [r["probability"] for r in rows]
    summary["classification"] = None
    if rows and all(p is not None for p in probs):
        summary["classification"] = classification_summary(probs, [r["class"] for r in rows], threshold)
    return summary


def order_methods(names: Sequence[str]) -> list[str]:
    """``names`` in Table 1's order (matched case-insensitively); unknown names last, in the order given."""
    rank = {n.lower(): i for i, n in enumerate(PAPER_ORDER)}
    return sorted(names, key=lambda n: rank.get(n.lower(), len(PAPER_ORDER)))


def format_number(value: float | None, digits: int) -> str:
    """``value`` to ``digits`` decimals; "-" for None or NaN (a figure that does not exist)."""
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def format_mean_sd(stats: Mapping | Sequence, digits: int) -> str:
    """``mean ± sd`` of ``{"mean", "sd"}`` or a ``(mean, sd)`` pair; "-" when there is no mean."""
    mean, sd = (stats["mean"], stats["sd"]) if isinstance(stats, Mapping) else stats
    return "-" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table1_cells(row: Mapping) -> list[str]:
    """A method's TPR, FPR, FPR_nodule, Dice, TP Dice and TP DOA cells, as Table 1 prints them."""
    cells = [format_number(row[key], 2) for key in ("TPR", "FPR", "FPR_nodule")]
    return cells + [
        format_mean_sd(row["dice"], 2),
        format_mean_sd(row["tp_dice"], 2),
        format_mean_sd(row["tp_doa_mm2"], 1),
    ]


def format_table1(summaries: Mapping[str, dict]) -> str:
    """Markdown laid out like the paper's Table 1, then the two-nodule and classification results."""
    lines = [
        "| Method | TPR | FPR | FPR_nodule | Dice | TP Dice | TP DOA (mm^2) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(table1_cells(s)) + " |")
    first = next(iter(summaries.values()))["counts"]
    lines += [
        "",
        f"Slices with one nodule: {first['S+']}; without nodule: {first['S-']}. Mean ± SD (population SD).",
        "FP_nodule reading: "
        + "; ".join(f"{name}: {s['fp_nodule_rule']}" for name, s in summaries.items())
        + " (exclusive = P non-empty without overlap with the ground truth; component = a connected component of P"
        " without overlap, also on TP slices).",
        "",
        "| Method | two-nodule slices | both found | one found | none found | accuracy | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        two, cls = s["two_nodules"], s["classification"] or {"accuracy": None, "auc": None}
        cells = [str(two["slices"]), str(two["both"]), str(two["one"]), str(two["none"])]
        cells += [format_number(cls["accuracy"], 3), format_number(cls["auc"], 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fig3(summaries: Mapping[str, dict], path: str | os.PathLike) -> Figure:
    """Fig. 3: TP Dice and TP DOA (mean ± SD) against nodule diameter bins, one line per method, as a PNG.

    Each point is labelled with its number of TP slices; a method that found none of a bin's nodule slices gets an open
    marker on the axis labelled "0 TP"; a bin without any one-nodule slice in the split is shaded and marked "no
    nodule slices".
    The tick labels give each bin's one-nodule slices (``n``), found or not. Returns the figure written.
    """
    fig = Figure(figsize=(12, 4.6))  # no pyplot: no global state, the Agg canvas by default
    axes = fig.subplots(1, 2)
    names = list(summaries)
    first = summaries[names[0]]["by_diameter"]
    counts = first.get("nodule_slices") or [None] * len(first["tp_dice"])
    for ax, key, title in zip(axes, ("tp_dice", "tp_doa_mm2"), ("TP Dice", "TP DOA (mm$^2$)")):
        for i, name in enumerate(names):
            bins = summaries[name]["by_diameter"][key]
            x = np.arange(len(bins)) + 0.08 * (i - (len(names) - 1) / 2)  # side by side, bars apart
            mean = [np.nan if b["mean"] is None else b["mean"] for b in bins]
            sd = [np.nan if b["sd"] is None else b["sd"] for b in bins]
            line = ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=name)
            colour = line[0].get_color()
            for xi, b, m, n in zip(x, bins, mean, counts):
                if b["n"]:
                    ax.annotate(str(b["n"]), (xi, m), xytext=(3, 3), textcoords="offset points", fontsize=7)
                elif n != 0:  # nodule slices, none found: said on the axis instead of a silent gap
                    ax.plot([xi], [0.0], marker="o", mfc="none", color=colour, linestyle="none")
                    ax.annotate("0 TP", (xi, 0.0), xytext=(3, 3), textcoords="offset points", fontsize=7, color=colour)
        for j, n in enumerate(counts):
            if n == 0:
                ax.axvspan(j - 0.45, j + 0.45, color="0.9", zorder=0)
                ax.text(
                    j,
                    0.5,
                    "no nodule slices",
                    transform=ax.get_xaxis_transform(),
                    rotation=90,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="0.4",
                )
        bins = first[key]
        ticks = [f"{b['low_mm']:g}-{b['high_mm']:g}" + ("" if n is None else f"\nn={n}") for b, n in zip(bins, counts)]
        ax.set_xticks(np.arange(len(ticks)), ticks)
        ax.set_xlim(-0.6, len(ticks) - 0.4)
        ax.set_xlabel("nodule diameter (mm); n = one-nodule slices in the bin; by the points: TP slices")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


class SegmentationEvaluation:
    """Score several methods' predictions on one split and write ``metrics.json``, ``table1.md`` and ``fig3.png``.

    Args:
        dataset_dir: the prepared dataset.
        predictions: method name -> prediction folder (``masks/``, optional ``records/``).
        output_dir: where the three files go.
        split: the datalist key to score.
        fp_nodule_rules: method name -> ``"exclusive"`` or ``"component"``; others use ``default_fp_nodule_rule``.
        default_fp_nodule_rule: the FP_nodule reading of methods not in ``fp_nodule_rules``.
        diameter_bins_mm: the edges of Fig. 3's diameter bins.
        connectivity: 1 or 2 (4- or 8-neighbours) for connected components.
        threshold: the probability threshold for classification accuracy.
        per_slice: also write every slice's row to ``metrics.json``.
        print_table: print the table written and the files' paths (``configs/evaluate.json`` does).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        predictions: Mapping[str, str | os.PathLike],
        output_dir: str | os.PathLike,
        split: str = "test",
        fp_nodule_rules: Mapping[str, str] | None = None,
        default_fp_nodule_rule: str = "exclusive",
        diameter_bins_mm: Sequence[float] = DEFAULT_BINS_MM,
        connectivity: int = 2,
        threshold: float = 0.5,
        per_slice: bool = True,
        print_table: bool = False,
    ) -> None:
        if not predictions:
            raise ValueError("no predictions to evaluate: give at least one method name -> prediction folder.")
        self.rules = {name: (fp_nodule_rules or {}).get(name, default_fp_nodule_rule) for name in predictions}
        for name, rule in self.rules.items():
            if rule not in FP_NODULE_RULES:
                raise ValueError(f"method {name!r}: fp_nodule_rule must be one of {FP_NODULE_RULES}, got {rule!r}.")
        self.dataset_dir, self.output_dir = Path(dataset_dir), Path(output_dir)
        self.predictions = {name: Path(predictions[name]) for name in order_methods(list(predictions))}
        self.split, self.bins, self.connectivity = split, list(diameter_bins_mm), connectivity
        self.threshold, self.per_slice, self.print_table = threshold, per_slice, print_table

    def run(self) -> dict:
        """Score every method, write the three files and return what ``metrics.json`` holds."""
        items = load_split(self.dataset_dir, self.split, required=("image", "label", "class"))
        methods = {}
        for name, pred_dir in self.predictions.items():
            rows = score_method(items, pred_dir, self.connectivity)
            summary = summarize_method(rows, self.rules[name], self.bins, self.threshold)
            methods[name] = {"predictions": str(pred_dir), **summary, **({"slices": rows} if self.per_slice else {})}
        result = {
            "dataset_dir": str(self.dataset_dir),
            "split": self.split,
            "slices": len(items),
            "diameter_bins_mm": self.bins,
            "methods": methods,
        }
        write_json(self.output_dir / "metrics.json", result)
        table = format_table1(methods)
        write_text(self.output_dir / "table1.md", table)
        plot_fig3(methods, self.output_dir / "fig3.png")
        if self.print_table:
            print(f"\n{table}", flush=True)
            for name in ("table1.md", "metrics.json", "fig3.png"):
                print(f"wrote {self.output_dir / name}", flush=True)
        return result
