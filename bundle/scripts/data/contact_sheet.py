"""A PNG contact sheet of random prepared slices with their label contours: ``python -m scripts.data.contact_sheet``."""

from __future__ import annotations

from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from ..utils.io import read_json, write_atomically

__all__ = ["contact_sheet"]


def contact_sheet(
    dataset_dir: str, out: str | None = None, n: int = 16, seed: int = 0, split: str = "training", columns: int = 4
) -> str:
    """Draw ``n`` random slices of a prepared split in a lung window, nodule labels outlined in red.

    Args:
        dataset_dir: a prepared dataset (holds ``datalist.json``).
        out: PNG path; default ``<dataset_dir>/contact_sheet.png``.
        n: number of slices; half with nodule where the split has enough.
        seed: seeds the choice of slices.
        split: datalist key.
        columns: slices per row.

    Returns:
        the path of the PNG.
    """
    root = Path(dataset_dir)
    datalist_path = root / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"no prepared dataset at {root}: {datalist_path} is missing")
    items = read_json(datalist_path).get(split, [])
    if not items:
        raise ValueError(f"split {split!r} of {datalist_path} is empty")
    rng = np.random.default_rng(seed)
    positives = [i for i in items if i["class"] == 1]
    negatives = [i for i in items if i["class"] == 0]
    n_pos = min(len(positives), max(n - len(negatives), n // 2))
    chosen = [positives[k] for k in rng.permutation(len(positives))[:n_pos]]
    chosen += [negatives[k] for k in rng.permutation(len(negatives))[: n - n_pos]]
    rows = int(np.ceil(len(chosen) / columns))
    fig = Figure(figsize=(3 * columns, 3 * rows))  # no pyplot: nothing global holds the figure
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, chosen):
        image = np.asarray(nib.load(root / item["image"]).dataobj)
        label = np.asarray(nib.load(root / item["label"]).dataobj)
        ax.imshow(image, cmap="gray", vmin=-1000, vmax=400)
        if label.any():
            ax.contour(label, levels=[0.5], colors="red", linewidths=0.8)
        diameters = ", ".join(f"{d:.0f}" for d in item["diameters_mm"])
        ax.set_title(f"{item['subject']} z{item['slice']}" + (f" ({diameters} mm)" if diameters else ""), fontsize=8)
    fig.tight_layout()
    target = Path(out) if out else root / "contact_sheet.png"
    write_atomically(target, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return str(target)


if __name__ == "__main__":
    fire.Fire(contact_sheet)
