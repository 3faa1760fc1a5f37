"""Fig. 2-like panels of one segmented slice (image, NAM with the scope, numbered candidates with their R-NAM scores,
the result), and the outcome that decides which slices get one."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ..utils.io import write_atomically

__all__ = ["OUTCOMES", "panel_outcome", "save_panel"]


# Panel outcomes, in the order panels are taken from them (one from each in turn): was the nodule found?
OUTCOMES = (
    "TP",  # a ground-truth nodule, and the mask overlaps it
    "miss",  # a ground-truth nodule, an empty mask (called negative, or nothing segmented)
    "wrong place",  # a ground-truth nodule, a mask elsewhere (FP_nodule)
    "FP",  # no nodule on the slice, a mask
    "segmented",  # a mask, no ground truth given
    "nothing segmented",  # called "nodule", an empty mask, and no nodule on the slice (or no ground truth)
)


def panel_outcome(mask: np.ndarray, label: np.ndarray | None, status: str) -> str | None:
    """The slice's :data:`OUTCOMES` entry, or None for a slice not worth a panel (called negative, no nodule)."""
    found = bool(np.any(mask))
    if label is not None and np.any(label):
        return "TP" if np.any(np.logical_and(mask, label)) else ("wrong place" if found else "miss")
    if found:
        return "FP" if label is not None else "segmented"
    return None if status == "negative" else "nothing segmented"


def save_panel(
    path: str | os.PathLike,
    hu: np.ndarray,
    nam: np.ndarray,
    scopes: np.ndarray,
    candidates: np.ndarray,
    chosen: Sequence[int],
    mask: np.ndarray,
    label: np.ndarray | None = None,
    title: str = "",
    scores: Sequence[float | None] = (),
    areas_mm2: Sequence[float] = (),
    base_scope_box: Sequence[int] | None = None,
) -> None:
    """A Fig. 2-like panel: image + ground truth, NAM with scope(s), numbered candidates with their scores, result.

    Args:
        hu: ``(H, W)`` slice in HU (shown in a lung window).
        nam: ``(H, W)`` raw NAM.
        scopes: ``(H, W)`` int map of the scope(s) (0 = outside).
        candidates: ``(H, W)`` int map, candidate j labelled ``j + 1``.
        chosen: indices of the chosen candidates.
        mask: ``(H, W)`` final mask.
        label: optional ``(H, W)`` ground truth, drawn in lime on the image and on the result.
        title: figure title.
        scores: R-NAM score of each candidate (None where not computed), listed beside the candidates.
        areas_mm2: area of each candidate, listed with its score.
        base_scope_box: multi-GAP modes: C1's box ``[row_start, col_start, row_stop, col_stop]``, drawn dashed.
    """
    fig = Figure(figsize=(17, 5.4))  # no pyplot: nothing global holds the figure
    axes = fig.subplots(1, 4)
    window = {"cmap": "gray", "vmin": -1000, "vmax": 400}
    for ax in axes:
        ax.imshow(hu, **window)
        ax.set_axis_off()

    def contour(ax, m, colour, style="solid", width=1.5) -> None:
        if m is not None and np.any(m):
            ax.contour(np.asarray(m, float), levels=[0.5], colors=colour, linewidths=width, linestyles=style)

    has_label = label is not None
    truth = np.asarray(label, bool) if has_label else None
    axes[0].set_title("image + ground truth" if has_label else "image (no ground truth given)")
    if has_label and not truth.any():
        axes[0].text(0.5, 0.03, "no nodule on this slice", color="white", ha="center", transform=axes[0].transAxes)
    axes[1].imshow(nam, cmap="jet", alpha=0.5)
    for k in range(1, int(scopes.max()) + 1 if scopes.size else 1):
        contour(axes[1], scopes == k, "white")
    if base_scope_box is not None:
        r0, c0, r1, c1 = base_scope_box
        for ax in axes[1:3]:
            ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec="cyan", ls="--", lw=1.2))
    axes[1].set_title("NAM + scope C")
    n_candidates = int(candidates.max()) if candidates.size else 0
    lines = []
    finite = [s for s in scores if s is not None and np.isfinite(s)]
    best = max(finite) if finite else None
    for j in range(n_candidates):
        where = candidates == j + 1
        if not where.any():
            continue
        colour = "red" if j in chosen else "yellow"
        contour(axes[2], where, colour)
        r, c = np.argwhere(where).min(0)
        axes[2].text(
            c,
            r - 1.5,
            f"{j + 1}",
            color=colour,
            fontsize=10,
            fontweight="bold",
            va="bottom",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "edgecolor": "none"},
        )
        line = f"{j + 1}:"
        if j < len(areas_mm2):
            line += f" {areas_mm2[j]:6.1f} mm²"
        if j < len(scores) and scores[j] is not None and np.isfinite(scores[j]):
            line += f"  R-NAM {scores[j]:.3g}" + (f" ({scores[j] / best:.0%})" if best else "")
        lines.append(line + ("  chosen" if j in chosen else ""))
    if len(lines) > 8:  # the panel stays readable; the record has them all
        lines = lines[:8] + [f"... {len(lines) - 8} more in the record"]
    axes[2].set_title("candidates (R-NAM score, % of the best)" if finite else "candidates")
    if lines:
        axes[2].text(
            0.02,
            0.02,
            "\n".join(lines),
            transform=axes[2].transAxes,
            fontsize=9,
            family="monospace",
            color="white",
            va="bottom",
            bbox={"facecolor": "black", "alpha": 0.7, "edgecolor": "none"},
        )
    else:
        axes[2].text(0.5, 0.5, "no candidates", color="yellow", ha="center", transform=axes[2].transAxes)
    # the result filled in translucent red, the ground truth's outline over it: both stay visible where they agree
    axes[3].imshow(np.ma.masked_equal(np.asarray(mask, bool), False), cmap=ListedColormap(["red"]), alpha=0.45)
    contour(axes[3], mask, "red", width=1.0)
    for ax in (axes[0], axes[3]):  # lime is kept for the ground truth alone (tests look for it)
        contour(ax, truth, "lime", width=2.0)
    axes[3].set_title("segmentation")
    if not np.any(mask):
        axes[3].text(0.5, 0.03, "empty", color="red", ha="center", transform=axes[3].transAxes)
    handles = [
        Line2D([], [], color="lime", lw=2, label="ground truth"),
        Line2D([], [], color="white", lw=1.5, label="scope C"),
        Line2D([], [], color="yellow", lw=1.5, label="candidate"),
        Line2D([], [], color="red", lw=1.5, label="chosen / segmentation"),
    ]
    if base_scope_box is not None:
        handles.insert(2, Line2D([], [], color="cyan", lw=1.2, ls="--", label="C1 (1-GAP scope) box"))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles),
        frameon=True,
        facecolor="0.3",
        labelcolor="white",
        fontsize=10,
    )
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
