"""A picture of where the NAM looks: a dozen nodule slices with their NAM, ground truth and NAM peak.

The slices come from different subjects, hits (peak near the nodule) and misses alike, so the picture shows what
the localisation figures (``scripts.evaluation.localisation``) summarise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..utils.io import write_atomically
from .localisation import TOLERANCE_PX, localise

__all__ = ["choose_slices", "draw_nam_sheet"]


def choose_slices(slices: Sequence[Mapping], n: int = 12, seed: int = 0) -> list[int]:
    """Indices of up to ``n`` nodule slices of distinct ``subject``s, half hits and half misses where there are
    enough of each (the rest filled from the other kind), drawn with ``seed``.

    Each item holds ``class``, ``subject``, and for nodule slices ``nam``, ``label`` and ``lung`` (``(H, W)``).
    """
    rng = np.random.default_rng(seed)
    hit: dict[int, bool] = {}
    for index in rng.permutation(len(slices)):
        item = slices[index]
        if int(item["class"]) == 1:
            hit[int(index)] = localise(item["nam"], item["label"], item["lung"]).near
    chosen: list[int] = []
    subjects: set[str] = set()
    quota = {True: (n + 1) // 2, False: n // 2}
    for fill in (False, True):  # first each kind up to its quota, then whatever is left
        for kind in (True, False):
            for index in (i for i, h in hit.items() if h == kind):
                taken = sum(hit[i] == kind for i in chosen)
                if len(chosen) >= n or (not fill and taken >= quota[kind]):
                    break
                subject = str(slices[index]["subject"])
                if subject not in subjects:
                    chosen.append(index)
                    subjects.add(subject)
    return chosen


def draw_nam_sheet(slices: Sequence[Mapping], path: str | os.PathLike, n: int = 12, seed: int = 0) -> list[int]:
    """Draw up to ``n`` nodule slices (see ``choose_slices``) to a PNG at ``path``; return the indices drawn.

    Each item holds ``image`` (``(C, H, W)`` in [0, 1]; the centre channel is shown), ``nam``, ``label`` and
    ``lung`` (``(H, W)``), ``class``, ``subject`` and optionally ``probability``. Each panel shows the slice, the NAM
    over it, the ground truth's outline (white) and the NAM's peak (a cross: green when near the nodule, red when
    not).
    """
    chosen = choose_slices(slices, n, seed)
    if not chosen:
        raise ValueError("no nodule slice to draw")
    columns = min(4, len(chosen))
    rows = -(-len(chosen) // columns)
    figure = Figure(figsize=(3 * columns, 3.2 * rows))  # no pyplot: nothing global holds the figure
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, chosen):
        item = slices[index]
        image = np.asarray(item["image"], float)
        image = image[image.shape[0] // 2] if image.ndim == 3 else image
        nam = np.asarray(item["nam"], float)
        where = localise(nam, item["label"], item["lung"])
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow((nam - nam.min()) / max(float(np.ptp(nam)), 1e-12), cmap="jet", alpha=0.35)
        ax.contour(np.asarray(item["label"]) > 0, levels=[0.5], colors="white", linewidths=0.8)
        ax.plot(where.peak[1], where.peak[0], "x", color="lime" if where.near else "red", markersize=9, mew=2)
        probability = f", p {float(item['probability']):.2f}" if "probability" in item else ""
        ax.set_title(f"{item['subject']}{probability}\n{'hit' if where.near else 'miss'}", fontsize=8)
    figure.suptitle(
        f"NAM on test nodule slices: peak (x) within {TOLERANCE_PX} px of the ground truth (white) is a hit", fontsize=9
    )
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    return chosen
