"""Twin negatives: each slice with an inserted nodule, written again from its host scan without the nodule.

On five real host scans a classifier finds easier cues than the nodule: which scan a slice comes from (the scans give
different shares of nodule slices, since their clean slices run out at different counts), and where in the chest it
lies. A twin is the same host slice, the same crop and context channels, with nothing inserted: the pair differs only
by the nodule, so only the nodule tells them apart (*inferred*; the figures are in ``docs/README.md``). Slices with a
real nodule have no clean twin and get none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..pipeline.context import stack_context
from ..pipeline.crop import crop
from ..utils.io import read_json, write_json, write_nifti
from .dataset import slice_affine
from .real_ct import RealCtSource

__all__ = ["add_twin_negatives"]

AIR_HU = -1000


def _inserted_only(item: dict) -> bool:
    info = item.get("nodule_info") or []
    return item["class"] == 1 and bool(info) and all(n.get("origin") == "inserted" for n in info)


def add_twin_negatives(source: RealCtSource, dataset_dir: str | Path, splits: Sequence[str] = ("training",)) -> int:
    """Write a twin of every inserted-nodule slice of ``splits`` into ``dataset_dir`` and add it to the datalist.

    The twin's item is its nodule slice's with ``class`` 0, an empty label, no nodules, and ``twin_of`` naming the
    nodule slice's image. Idempotent: a datalist that holds twins already is left as it is.

    Args:
        source: the source the dataset was prepared from (its hosts give the clean pixels).
        dataset_dir: a dataset prepared from ``source`` (``scripts.data.dataset.prepare_dataset``).
        splits: the datalist's splits to add twins to.

    Returns:
        the number of twins in the datalist.
    """
    dataset_dir = Path(dataset_dir)
    datalist = read_json(dataset_dir / "datalist.json")
    done = sum(1 for split in splits for item in datalist.get(split, []) if "twin_of" in item)
    if done:
        return done
    count = 0
    for split in splits:
        twins = []
        for item in datalist.get(split, []):
            if not _inserted_only(item):
                continue
            host = source.host_volume(item["scan"])
            spacing_z = source.host_spacing(item["scan"])[2]
            channels = int(item["in_channels"])
            stacked = stack_context(host, [item["slice"]], channels, spacing_z, item.get("context_mm"))[..., 0, :]
            hu = np.rint(stacked if channels > 1 else stacked[..., 0]).astype(np.int16)
            size = int(read_json(dataset_dir / "dataset_summary.json")["size"])
            stem = "twin-" + Path(item["image"]).name.removesuffix(".nii.gz")
            spacing = [*item["spacing_mm"], item["context_mm"]] if channels > 1 else item["spacing_mm"]
            write_nifti(
                dataset_dir / "images" / f"{stem}.nii.gz",
                crop(hu, tuple(item["crop_origin"]), size, AIR_HU),
                slice_affine(spacing),
            )
            empty = np.zeros((size, size), np.uint8)
            write_nifti(dataset_dir / "labels" / f"{stem}.nii.gz", empty, slice_affine(item["spacing_mm"]))
            twins.append(
                {
                    **item,
                    "image": f"images/{stem}.nii.gz",
                    "label": f"labels/{stem}.nii.gz",
                    "class": 0,
                    "nodules": 0,
                    "diameters_mm": [],
                    "label_pixels": 0,
                    "nodule_info": [],
                    "twin_of": item["image"],
                }
            )
        datalist[split] = datalist.get(split, []) + twins
        count += len(twins)
    write_json(dataset_dir / "datalist.json", datalist)
    return count
