"""The 2.5-D input (each slice with its neighbours as the channels): the shared rule, the dataset format, training,
and inference on prepared slices and on a scan, end to end at a small size."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from known_response import InputRecorder, given_network_settings
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts.data.dataset import prepare_dataset
from scripts.data.prepare import scans
from scripts.data.synthetic import SyntheticSource
from scripts.integration.config_runs import SLICE_INFERENCE, config_files
from scripts.networks import quantize
from scripts.networks.checkpoint import read_checkpoint
from scripts.pipeline.context import centre_channel, context_offsets, stack_context
from scripts.pipeline.crop import crop_window
from scripts.pipeline.lungs import segment_lungs
from scripts.pipeline.orient import axial_affine
from scripts.pipeline.scan_inferer import ScanSegmenter
from scripts.pipeline.segmenter import WeaklySupervisedSegmenter
from trained_classifier import nodule_probability, prepared_slice, trained_classifier

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SIZE, CASES, SEED = 64, 8, 3
TINY = {"width": 0.0625, "head_channels": 64, "image_size": SIZE, "batch_size": 8, "num_workers": 0}


def test_offsets_and_centre():
    np.testing.assert_array_equal(context_offsets(1), [0])
    np.testing.assert_array_equal(context_offsets(3), [-1, 0, 1])
    assert centre_channel(3) == 1 and centre_channel(1) == 0
    with pytest.raises(ValueError, match="odd"):
        context_offsets(2)


def test_neighbours_at_the_slice_spacing_are_the_adjacent_slices():
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    stacked = stack_context(volume, [0, 2, 5], 3, slice_spacing_mm=2.5, context_mm=2.5)
    assert stacked.shape == (4, 5, 3, 3) and stacked.dtype == np.int16  # exact: no interpolation
    np.testing.assert_array_equal(stacked[:, :, 1], volume[..., [1, 2, 3]])
    np.testing.assert_array_equal(stacked[:, :, 0], volume[..., [0, 0, 1]])  # the first slice repeats below
    np.testing.assert_array_equal(stacked[:, :, 2], volume[..., [4, 5, 5]])  # and the last above


def test_neighbours_are_taken_in_mm_not_in_slices():
    volume = np.broadcast_to(np.arange(10, dtype=float) * 1.25, (2, 2, 10))  # value = height in mm
    at_two_slices = stack_context(volume, [4], 3, slice_spacing_mm=1.25, context_mm=2.5)
    np.testing.assert_allclose(at_two_slices[0, 0, 0], [2.5, 5.0, 7.5])
    interpolated = stack_context(volume, [4], 3, slice_spacing_mm=1.25, context_mm=1.875)  # 1.5 slices
    np.testing.assert_allclose(interpolated[0, 0, 0], [5.0 - 1.875, 5.0, 5.0 + 1.875])


def test_a_2_5_d_input_needs_a_step():
    with pytest.raises(ValueError, match="context_mm"):
        stack_context(np.zeros((2, 2, 3)), [1], 3, slice_spacing_mm=2.5, context_mm=None)
    with pytest.raises(ValueError, match="context_mm"):
        ScanSegmenter(WeaklySupervisedSegmenter(), 64, 4, in_channels=3, context_mm=None)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One synthetic source prepared as single slices and as 2.5-D slices."""
    root = tmp_path_factory.mktemp("context")
    source = SyntheticSource(n_cases=CASES, seed=SEED, size=SIZE, min_diameter_mm=10.0)
    for channels in (1, 3):
        prepare_dataset(source, root / f"c{channels}", size=SIZE, seed=SEED, progress=False, in_channels=channels)
    return source, root


def _items(folder: Path) -> list[dict]:
    datalist = json.loads((folder / "datalist.json").read_text())
    return [dict(item, split=split) for split, items in datalist.items() for item in items]


@pytest.mark.parametrize("channels", [1, 3])
def test_int8_calibration_reads_training_slices_as_the_network_takes_them(datasets, channels):
    # ``quantize --dataset_dir``: slices spread over the training split, channels first, in the HU window
    folder = datasets[1] / f"c{channels}"
    items = json.loads((folder / "datalist.json").read_text())["training"]
    slices = quantize.training_slices(folder, (-1000, 400), count=5)
    assert slices.shape == (5, channels, SIZE, SIZE) and slices.dtype == np.float32
    for got, item in ((slices[0], items[0]), (slices[-1], items[-1])):
        hu = prepared_slice(folder / item["image"]).reshape(channels, SIZE, SIZE)
        np.testing.assert_allclose(got, np.clip((hu + 1000) / 1400, 0, 1), atol=1e-6)


def test_2_5_d_images_hold_the_slice_and_its_neighbours(datasets):
    source, root = datasets
    single, context = _items(root / "c1"), _items(root / "c3")
    assert [(i["subject"], i["slice"], i["split"]) for i in single] == [
        (i["subject"], i["slice"], i["split"]) for i in context
    ]
    assert all(i["in_channels"] == 3 and i["context_mm"] == 2.5 for i in context)
    volumes = {}
    for one, three in zip(single, context):
        image = nib.load(str(root / "c3" / three["image"]))
        assert image.shape == (SIZE, SIZE, 3)
        np.testing.assert_allclose(image.header.get_zooms(), [*three["spacing_mm"], 2.5])
        channels = np.asarray(image.dataobj)
        np.testing.assert_array_equal(channels[..., 1], np.asarray(nib.load(str(root / "c1" / one["image"])).dataobj))
        # the outer channels are the neighbouring slices of the source volume, cropped the same way
        if three["subject"] not in volumes:
            volumes[three["subject"]] = source.load(three["subject"]).hu
        hu = volumes[three["subject"]]
        r, c = three["crop_origin"]
        for channel, k in zip((0, 2), (max(three["slice"] - 1, 0), min(three["slice"] + 1, hu.shape[2] - 1))):
            window = hu[max(r, 0) : r + SIZE, max(c, 0) : c + SIZE, k]
            placed = channels[max(-r, 0) : max(-r, 0) + window.shape[0], max(-c, 0) : max(-c, 0) + window.shape[1]]
            np.testing.assert_array_equal(placed[..., channel], np.rint(window).astype(np.int16))


def _messages(error: BaseException) -> list[str]:
    """The messages of an error and of those it was raised from (MONAI wraps a transform's error)."""
    chain = []
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    return chain


def test_a_single_slice_model_refuses_2_5_d_slices_by_name(datasets, tmp_path):
    _, root = datasets
    workflow = _train_workflow(root / "c3", tmp_path, in_channels=1)
    with pytest.raises(Exception) as caught:
        workflow.initialize()  # the dataset caches its slices: the first one is refused there
        workflow.run()
    chain = _messages(caught.value)
    assert any("a 3-channel (2.5-D) slice" in m and "in_channels 3" in m and "c3/images/" in m for m in chain), chain


def _train_workflow(dataset: Path, out: Path, **override) -> ConfigWorkflow:
    settings = {
        "bundle_root": str(REPO / "bundle"),
        "dataset_dir": str(dataset),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "logs"),
        "max_epochs": 1,
        "amp": False,
        **TINY,
        **override,
    }
    return ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", **settings)


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    _, root = datasets
    out = tmp_path_factory.mktemp("trained25d")
    workflow = _train_workflow(root / "c3", out, in_channels=3)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return out / "models" / "model.pt"


def test_the_checkpoint_records_the_2_5_d_input(trained):
    state, record = read_checkpoint(trained)
    assert state["features.0.weight"].shape[1] == 3
    assert record["in_channels"] == 3 and record["context_mm"] == 2.5


def test_inference_on_2_5_d_slices(datasets, trained, tmp_path):
    _, root = datasets
    out = tmp_path / "predictions"
    workflow = ConfigWorkflow(
        config_file=config_files(SLICE_INFERENCE),
        workflow_type="infer",
        bundle_root=str(REPO / "bundle"),
        dataset_dir=str(root / "c3"),
        ckpt_path=str(trained),
        output_dir=str(out),
        mode="coarse",
        threshold=0.0,  # every slice is segmented: the whole path runs on 3-channel slices
        num_workers=0,
        batch_size=4,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    network = trained_classifier(trained)
    test = [i for i in _items(root / "c3") if i["split"] == "test"]
    assert test
    segmented = 0
    for item in test:
        stem = Path(item["image"]).name[: -len(".nii.gz")]
        mask = nib.load(str(out / "masks" / f"{stem}.nii.gz"))
        assert mask.shape[:2] == (SIZE, SIZE)
        record = json.loads((out / "records" / f"{stem}.json").read_text())
        assert record["status"] != "negative"
        # the trained network's own probability on the slice and its two neighbours, windowed by hand
        channels = np.asarray(nib.load(str(root / "c3" / item["image"])).dataobj, np.float64).transpose(2, 0, 1)
        assert record["probability"] == pytest.approx(nodule_probability(network, channels), abs=1e-5), stem
        voxels = int((np.asarray(mask.dataobj) > 0).sum())
        assert voxels * np.prod(item["spacing_mm"]) == pytest.approx(record["mask_area_mm2"])
        segmented += record["status"] == "segmented" and voxels > 0
    assert segmented > 0


def test_inference_on_a_scan_with_a_2_5_d_model(trained, tmp_path):
    folder = tmp_path / "scans"
    scans(str(folder), cases=1, seed=SEED, size=SIZE, min_diameter_mm=10.0)
    out = tmp_path / "results"
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        workflow_type="infer",
        bundle_root=str(REPO / "bundle"),
        ckpt_path=str(trained),
        input=str(folder),
        output_dir=str(out),
        threshold=0.0,
        dicom_seg=False,
        overview=False,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    scan = nib.load(str(folder / "SYN-0000.nii.gz"))
    mask = nib.load(str(out / "SYN-0000" / "SYN-0000_mask.nii.gz"))
    assert mask.shape == scan.shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
    slices = (out / "SYN-0000" / "SYN-0000_slices.csv").read_text().splitlines()
    assert len(slices) == scan.shape[2] + 1
    table = json.loads((out / "SYN-0000" / "SYN-0000_nodules.json").read_text())["slices"]
    voxels = (np.asarray(mask.dataobj) > 0).sum(axis=(0, 1))
    assert [row["nodule_voxels"] for row in table] == voxels.tolist() and voxels.sum() > 0
    # the scan is on the axial grid at the training slices' pixel spacing: the network sees the writer's window around
    # the lungs, each slice with those context_mm (2.5 mm) above and below, interpolated, the ends repeated
    spacing = scan.header.get_zooms()
    assert spacing[:2] == pytest.approx((4.5, 4.5)) and np.allclose(scan.affine[:3, :3], axial_affine(spacing)[:3, :3])
    hu = np.asarray(scan.dataobj, np.float64)
    lungs = segment_lungs(np.clip(hu, -1000.0, 400.0), spacing)
    (r, c), step = crop_window(lungs, SIZE), 2.5 / spacing[2]
    assert 0 <= r <= hu.shape[0] - SIZE and 0 <= c <= hu.shape[1] - SIZE
    window = hu[r : r + SIZE, c : c + SIZE]
    assert [row["classified"] for row in table] == lungs.any(axis=(0, 1)).tolist() and lungs.any()
    network = trained_classifier(trained)
    for row in [row for row in table if row["classified"]]:
        heights = np.clip(row["slice"] + np.array([-step, 0.0, step]), 0, hu.shape[2] - 1)
        below, above = np.floor(heights).astype(int), np.ceil(heights).astype(int)
        share = (heights - below)[:, None, None]
        channels = (1 - share) * window[..., below].transpose(2, 0, 1) + share * window[..., above].transpose(2, 0, 1)
        assert row["probability"] == pytest.approx(nodule_probability(network, channels), abs=6e-5), row["slice"]


def test_the_scan_path_feeds_what_the_dataset_writer_wrote(datasets, tmp_path):
    """The 2.5-D inputs the scan inference builds equal the prepared 2.5-D training slices, pixel for pixel."""
    source, root = datasets
    folder = tmp_path / "scans"
    scans(str(folder), cases=CASES, seed=SEED, size=SIZE, min_diameter_mm=10.0)
    item = next(i for i in _items(root / "c3") if i["class"] == 1)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    settings = given_network_settings(SIZE, in_channels=3, context_mm=2.5)
    parser.update({"bundle_root": str(REPO / "bundle"), "model_settings": settings})
    volume = parser.get_parsed_content("preprocessing")({"image": str(folder / f"{item['subject']}.nii.gz")})["image"]
    recorder = InputRecorder(3)
    inferer = parser.get_parsed_content("inferer")
    assert inferer.in_channels == 3 and inferer.context_mm == 2.5
    result = inferer.segment_scan(volume, recorder)
    with_lung = np.flatnonzero(result.lungs.any(axis=(0, 1)))
    seen = dict(zip(with_lung.tolist(), torch.cat(recorder.seen).numpy()))
    prepared = np.asarray(nib.load(str(root / "c3" / item["image"])).dataobj, dtype=np.float64)
    expected = np.clip((prepared + 1000.0) / 1400.0, 0.0, 1.0).transpose(2, 0, 1)
    # the writer may move its window to hold the nodules; compare where both windows see the scan
    corner = crop_window(result.lungs, SIZE)
    dr, dc = item["crop_origin"][0] - corner[0], item["crop_origin"][1] - corner[1]
    got = seen[item["slice"]]
    rows = slice(max(dr, 0), SIZE + min(dr, 0))
    cols = slice(max(dc, 0), SIZE + min(dc, 0))
    rows_e = slice(max(-dr, 0), SIZE + min(-dr, 0))
    cols_e = slice(max(-dc, 0), SIZE + min(-dc, 0))
    assert abs(dr) < SIZE // 4 and abs(dc) < SIZE // 4
    np.testing.assert_allclose(got[:, rows, cols], expected[:, rows_e, cols_e], atol=1e-6)


def test_the_segmenter_segments_the_middle_channel():
    """ICM and the candidates work on the slice itself, not on a neighbour: a blob only in the middle channel is
    found, one only in the outer channels is not."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    lung = (yy - 32) ** 2 / 28**2 + (xx - 32) ** 2 / 24**2 < 1
    blob = (yy - 30) ** 2 + (xx - 36) ** 2 < 25
    parenchyma = np.where(lung, -850.0, 40.0)
    with_blob = np.where(blob, 20.0, parenchyma)
    nam = np.exp(-((yy - 30) ** 2 + (xx - 36) ** 2) / (2 * 6.0**2)).astype(np.float32)
    segmenter = WeaklySupervisedSegmenter(mode="coarse", candidates={"min_area_mm2": 1.0})

    def found(channels):
        image = torch.as_tensor(np.clip((np.stack(channels) + 1000.0) / 1400.0, 0, 1), dtype=torch.float32)
        return segmenter.segment(image, None, 0.9, nam, (1.0, 1.0), lung_mask=lung).mask.astype(bool)

    middle = found([parenchyma, with_blob, parenchyma])
    assert (middle & blob).sum() >= 0.8 * blob.sum()
    assert not found([with_blob, parenchyma, with_blob]).any()


def test_the_multi_gap_model_must_take_the_same_slices():
    from scripts.networks.gap_classifier import GAPClassifier

    single = GAPClassifier(gap_levels=2, width=0.0625, head_channels=8).eval()
    context = GAPClassifier(gap_levels=1, width=0.0625, head_channels=8, in_channels=3).eval()
    segmenter = WeaklySupervisedSegmenter(mode="multi_gap", multi_gap_network=single)
    with pytest.raises(ValueError, match="multi-GAP classifier takes 1 input channel"):
        segmenter.classify(torch.zeros(2, 3, 32, 32), context)


def test_the_u_net_refuses_2_5_d_slices_by_name(datasets, tmp_path):
    _, root = datasets
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train_unet.json"),
        workflow_type="train",
        bundle_root=str(REPO / "bundle"),
        dataset_dir=str(root / "c3"),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "logs"),
        image_size=SIZE,
        max_epochs=1,
        num_workers=0,
        amp=False,
    )
    with pytest.raises(Exception) as caught:
        workflow.initialize()
        workflow.run()
    chain = _messages(caught.value)
    assert any("a 3-channel (2.5-D) slice" in m and "prepare single slices" in m for m in chain), chain
