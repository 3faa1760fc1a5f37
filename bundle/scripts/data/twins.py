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

from ..utils.io import read_json, write_json, write_nifti
from .dataset import slice_affine, write_slice_image
from .real_ct import RealCtSource

__all__ = ["add_twin_negatives"]


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
    size = int(read_json(dataset_dir / "dataset_summary.json")["size"])
    hosts: dict[str, np.ndarray] = {}  # each host scan read once, not once a slice
    count = 0
    for split in splits:
        twins = []
        for item in datalist.get(split, []):
            if not _inserted_only(item):
                continue
            scan = item["scan"]
            if scan not in hosts:
                hosts[scan] = source.host_volume(scan)
            stem = "twin-" + Path(item["image"]).name.removesuffix(".nii.gz")
            write_slice_image(
                dataset_dir / "images" / f"{stem}.nii.gz",
                hosts[scan],
                item["slice"],
                item["crop_origin"],
                size,
                source.host_spacing(scan),
                int(item["in_channels"]),
                item.get("context_mm"),
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
