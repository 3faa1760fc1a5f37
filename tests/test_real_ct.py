"""Tests of the real-CT training set (``python -m scripts.data.prepare real``): two real scans at 2.25 mm, 128 px."""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts.data import real_ct
from scripts.data.dataset import prepare_dataset
from scripts.data.insertion import blend_nodule, render_shape
from scripts.data.labels import marked_slices
from scripts.data.nodule_shapes import NoduleShapeLibrary, lidc_nodule_shapes, lidc_scan_patients, texture_rating
from scripts.data.real_ct import RealCtSource
from scripts.pipeline.crop import crop

HELD_OUT = "LIDC-IDRI-0001"
SCANS = [HELD_OUT, "Lung_Dx-A0002"]
SMALL = dict(pixel_mm=2.25, size=128, variants=2, insertions=3, min_diameter_mm=8.0, texture_p=(0.5, 0, 0, 0, 0.5))
SEED = 5


pytestmark = pytest.mark.usefixtures("isolated_home")


@pytest.fixture(scope="module")
def data_root(lidc_root, chest_ct_root, tmp_path_factory) -> Path:
    """A folder with ``lidc/`` and ``chest_ct/`` (links to the real scans: they are never copied)."""
    if lidc_root.parent == chest_ct_root.parent and lidc_root.name == "lidc" and chest_ct_root.name == "chest_ct":
        return lidc_root.parent
    root = tmp_path_factory.mktemp("data")
    os.symlink(lidc_root, root / "lidc")
    os.symlink(chest_ct_root, root / "chest_ct")
    return root


def _source(data_root: Path, **kwargs) -> RealCtSource:
    return RealCtSource(data_root, SCANS, **{"seed": SEED, "test": [HELD_OUT], **SMALL, **kwargs})


def _prepare(data_root: Path, out: Path) -> tuple[RealCtSource, dict]:
    source = _source(data_root)
    summary = prepare_dataset(
        source, out, size=SMALL["size"], seed=SEED, workers=1, progress=False, split=source.split()
    )
    return source, summary


@pytest.fixture(scope="module")
def prepared(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "set"
    source, summary = _prepare(data_root, out)
    datalist = json.loads((out / "datalist.json").read_text())
    items = [item for split in datalist.values() for item in split]
    return out, source, summary, items


def _read(out: Path, path: str) -> np.ndarray:
    return np.asarray(nib.load(out / path).dataobj)


def _host_slice(source: RealCtSource, item: dict) -> np.ndarray:
    host = source.host_volume(item["scan"])[..., item["slice"]]
    return crop(host, tuple(item["crop_origin"]), SMALL["size"], -1000)


def _boxes(source: RealCtSource, item: dict) -> np.ndarray:
    """Where the subject's inserted nodules may have changed the item's slice: their boxes, in the crop."""
    inside = np.zeros(source.host_volume(item["scan"]).shape[:2], bool)
    for nodule in source.annotations(item["subject"]).nodules:
        box = nodule.box()
        if nodule.info["origin"] == "inserted" and box[2].start <= item["slice"] < box[2].stop:
            inside[box[0], box[1]] = True
    return crop(inside, tuple(item["crop_origin"]), SMALL["size"], False)


def test_nodule_slices_hold_their_inserted_nodule(prepared):
    out, source, _, items = prepared
    fullest: dict = {}  # each inserted nodule's slice with most label
    for item in items:
        label = _read(out, item["label"])
        if item["class"] == 1:
            assert label.any() and label.sum() == item["label_pixels"]
        for info in item["nodule_info"]:
            if info["origin"] == "inserted":
                key = (item["subject"], info["lidc_nodule"])
                if key not in fullest or item["label_pixels"] > fullest[key][0]["label_pixels"]:
                    fullest[key] = (item, info)
    ratings = {info["texture"] for _, info in fullest.values()}
    assert len(fullest) >= 4 and ratings == {1, 5}, (len(fullest), ratings)
    for item, info in fullest.values():
        if item["nodules"] > 1:
            continue
        inside = _read(out, item["label"]).astype(bool)
        image, host = _read(out, item["image"]).astype(float), _host_slice(source, item).astype(float)
        painted, before = np.median(image[inside]), np.median(host[inside])
        assert before < -600, (info, before)  # inserted into lung
        if info["texture"] == 5:  # solid: soft-tissue density, blurred by partial volume at 2.25 mm
            assert painted > -400 and painted - before > 300, (info, painted, before)
        else:  # ground-glass: denser than the lung, far from solid
            assert -850 < painted < -400 and 40 < painted - before < 450, (info, painted, before)
    for item in items:  # nothing changes away from the inserted nodules
        changed = _read(out, item["image"]) != _host_slice(source, item)
        assert not (changed & ~_boxes(source, item)).any()


def test_clean_slices_hold_none_and_nodules_go_into_clean_slices_only(prepared):
    out, source, _, items = prepared
    negatives = [i for i in items if i["class"] == 0]
    assert len(negatives) >= 10
    folder = source.data_root / "chest_ct" / "Lung_Dx-A0002"
    box_z = [z for z, _, _ in real_ct._boxed_tumours("Lung_Dx-A0002", folder / "boxes", folder / "ct")]
    host_z = {s: real_ct._read_scan(s, source.data_root).z_mm for s in SCANS}
    painted, marked = {}, {}  # subject -> slices its insertions changed; scan -> slices with a reader's mark
    for subject in source.subjects():
        changed = source.load(subject).hu != source.host_volume(real_ct.host_name(subject))
        painted[subject] = set(np.flatnonzero(changed.any(axis=(0, 1))).tolist())
        assert painted[subject]
    for scan in SCANS:
        marked[scan] = np.flatnonzero(marked_slices(real_ct._read_scan(scan, source.data_root).annotations))
    for subject, slices in painted.items():  # nodules are inserted into clean slices only
        scan = real_ct.host_name(subject)
        assert all(abs(p - m) > 2 for p in slices for m in marked[scan])
        if scan == "Lung_Dx-A0002":
            assert all(abs(host_z[scan][p] - b) > real_ct.TUMOUR_MARGIN_MM for p in slices for b in box_z)
    for item in negatives:
        assert not _read(out, item["label"]).any() and item["nodule_info"] == []
        assert np.array_equal(_read(out, item["image"]), _host_slice(source, item))
        assert item["slice"] % SMALL["variants"] == item["variant"]  # one subject per clean slice
        assert all(abs(item["slice"] - s) > 2 for s in painted[item["subject"]])
        assert all(abs(item["slice"] - s) > 2 for s in marked[item["scan"]])
        if item["scan"] == "Lung_Dx-A0002":  # away from the tumour boxes by their margin and the writer's
            z = host_z["Lung_Dx-A0002"][item["slice"]]
            assert min(abs(z - b) for b in box_z) > real_ct.TUMOUR_MARGIN_MM + 2 * 8.0 - 1e-6


def test_the_record_names_each_insertion_source(prepared):
    _, source, _, items = prepared
    seen = set()
    for item in items:
        assert item["scan"] in SCANS and item["subject"] == f"{item['scan']}#{item['variant']}"
        assert len(item["nodule_info"]) == (item["nodules"] if item["class"] else 0)
        for info in item["nodule_info"]:
            assert info["origin"] in ("real", "inserted")
            assert info["readers"] == len(info["annotation_ids"]) == len(info["textures"]) >= 2
            assert info["texture"] == texture_rating(info["textures"])
            if info["origin"] == "real":
                assert info["lidc_nodule"] == "LIDC-IDRI-0001/0" and item["variant"] == 0
                continue
            assert info["patient"] not in ("LIDC-IDRI-0001", "LIDC-IDRI-0003")
            assert info["placement"] in ("free", "vessel", "pleura") and info["kind"] in ("solid", "ground-glass")
            seen.add((info["patient"], info["nodule"], tuple(info["annotation_ids"])))
    assert len(seen) >= 4
    scan_id = {patient: scan for scan, patient in sorted(lidc_scan_patients().items(), reverse=True)}
    for patient, nodule, annotation_ids in seen:  # the named LIDC nodule is that shape, with those readers
        shapes = {s.source: s for s in lidc_nodule_shapes(scan_id[patient], 3.0, 30.0)}
        assert shapes[f"{patient}/{nodule}"].annotation_ids == annotation_ids


def test_same_seed_same_bytes(prepared, tmp_path, data_root):
    out, _, _, _ = prepared
    real_ct._HOSTS.clear()
    real_ct._PLANS.clear()  # from scratch: nothing of the first run is reused
    _prepare(data_root, tmp_path / "again")
    files = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.nii.gz"))
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert (out / "datalist.json").read_text() == (tmp_path / "again" / "datalist.json").read_text()
    other = _source(data_root, seed=SEED + 1)
    subject = f"{HELD_OUT}#1"
    assert other.load(subject).hu.tobytes() != _source(data_root).load(subject).hu.tobytes()


def test_the_held_out_scan_and_its_variants_are_all_in_the_test_split(prepared, data_root):
    _, source, summary, items = prepared
    variants = [f"{HELD_OUT}#{k}" for k in range(SMALL["variants"])]
    assert summary["split_rule"] == "given"
    assert summary["subjects"]["test"] == variants
    assert not set(variants) & set(summary["subjects"]["training"] + summary["subjects"]["validation"])
    assert {i["scan"] for i in items if i["subject"] in variants} == {HELD_OUT}
    assert summary["slices"]["test"]["with_nodule"] > 0 and summary["slices"]["training"]["with_nodule"] > 0
    # its nodules are never inserted, even when no shape is excluded by default
    assert HELD_OUT in _source(data_root, exclude_shapes=()).library.exclude_patients


def test_split_keeps_a_scans_subjects_together():
    source = RealCtSource(scans=real_ct.REAL_SCANS, variants=3, test=["LIDC-IDRI-0003"], seed=1)
    split = source.split()
    assert len(split) == 15
    for scan in real_ct.REAL_SCANS:
        assert len({split[f"{scan}#{k}"] for k in range(3)}) == 1
    assert {s for s, v in split.items() if v == "test"} == {f"LIDC-IDRI-0003#{k}" for k in range(3)}
    assert sum(v == "validation" for v in split.values()) == 3
    named = RealCtSource(scans=real_ct.REAL_SCANS, variants=2, validation=["Lung_Dx-A0002"]).split()
    assert {s for s, v in named.items() if v == "validation"} == {"Lung_Dx-A0002#0", "Lung_Dx-A0002#1"}
    with pytest.raises(ValueError, match="not among the scans"):
        RealCtSource(scans=["LIDC-IDRI-0001"], test=["LIDC-IDRI-0003"])
    with pytest.raises(ValueError, match="test and validation"):
        RealCtSource(scans=real_ct.REAL_SCANS, test=["Lung_Dx-A0001"], validation=["Lung_Dx-A0001"])


def test_shape_library_excludes_patients_and_draws_ratings():
    rng = np.random.default_rng(0)
    keep = {"LIDC-IDRI-0072", "LIDC-IDRI-0078"}  # both have nodules of texture 5
    library = NoduleShapeLibrary(exclude_patients=tuple(sorted(set(lidc_scan_patients().values()) - keep)))
    assert {library.draw(rng).patient for _ in range(10)} <= keep
    ground_glass = NoduleShapeLibrary(min_experts=2)
    for _ in range(5):
        shape = ground_glass.draw(rng, texture=1)
        assert shape.texture == 1 and shape.masks.shape[0] >= 2


def test_partial_volume_averages_the_shape_over_each_slab():
    # a 10 mm ball drawn at 0.5 mm, into 5 mm slices with its centre at a slice's centre
    grid = (np.arange(25) - 12) * 0.5
    ball = (grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2) <= 25.0
    masks = np.stack([ball, ball])
    # padded by a voxel, the ball's centre is at 6.5 mm: slices at 1.5, 6.5 and 11.5 mm
    rendered = render_shape(masks, (0.5, 0.5, 0.5), 1.0, 5.0, 5.0, z_phase=1.5, blur_mm=0.0)
    weight = rendered.weight
    centre = (weight.shape[0] // 2, weight.shape[1] // 2)
    column = weight[centre[0], centre[1]]
    assert weight.shape[2] == 3 and column[1] == pytest.approx(1.0, abs=0.02)
    # the neighbouring slab (2.5-7.5 mm from the centre) holds half of the ball's central chord
    assert column[0] == pytest.approx(0.5, abs=0.05) and column[2] == pytest.approx(0.5, abs=0.05)
    # and of the whole ball, its volume: 4/3 pi 5^3 mm^3 (pixel 1 mm^2, slab 5 mm)
    assert weight.sum() * 5.0 == pytest.approx(4 / 3 * np.pi * 125, rel=0.05)
    # the readers' masks at the slices: voxels half inside the shape (the central slab: a disc of 4.84 mm radius)
    assert rendered.experts[0, ..., 1].sum() == pytest.approx(np.pi * 4.84**2, rel=0.1)


def test_blend_keeps_the_scans_noise_and_denser_tissue():
    rng = np.random.default_rng(1)
    hu = (-870 + 40 * rng.standard_normal((40, 40, 1))).astype(np.float32)
    hu[:, 30:33] = 40.0  # a vessel
    weight = np.zeros_like(hu)
    weight[5:35, 5:35] = 1.0
    ggo = blend_nodule(hu, weight, weight * -650.0, 0.75, 40.0)
    solid = blend_nodule(hu, weight, weight * 30.0, 0.75, 40.0)
    inside = (slice(8, 25), slice(8, 25))
    assert np.median(ggo[inside]) == pytest.approx(-650, abs=25) and np.std(ggo[inside]) > 25
    assert np.median(solid[inside]) == pytest.approx(30, abs=25) and np.std(solid[inside]) > 25
    assert np.array_equal(ggo[:, 30:33], hu[:, 30:33])  # the vessel stays on top of ground-glass
    assert np.array_equal(ggo[0:5], hu[0:5]) and np.array_equal(solid[0:5], hu[0:5])


def test_unannotated_tumour_of_c3n_is_kept_out(data_root):
    host = real_ct._load_host("CPTAC-C3N-00247", data_root, 2.25, 128, 2)
    z = real_ct._read_scan("CPTAC-C3N-00247", data_root).z_mm
    tumour = (z >= -204.0 - real_ct.TUMOUR_MARGIN_MM) & (z <= -183.0 + real_ct.TUMOUR_MARGIN_MM)
    assert tumour.sum() == 18 and host.excluded[tumour].all() and not host.excluded[~tumour].any()
    near = ndimage.binary_dilation(tumour, iterations=2)
    assert not host.insertable[near].any() and host.insertable.sum() > 30
    with pytest.MonkeyPatch.context() as mp:  # a cancer patient's scan without boxes nor a recorded tumour
        mp.setattr(real_ct, "UNANNOTATED_TUMOURS", {})
        with pytest.raises(ValueError, match="UNANNOTATED_TUMOURS"):
            real_ct._read_scan("CPTAC-C3N-00247", data_root)


def test_the_default_data_root_is_shared_data_beside_the_repository():
    """``prepare real`` without ``--data_root`` reads ``../shared/data`` beside the repository (a module moved one
    folder deeper once pointed inside the repository)."""
    assert real_ct.DEFAULT_DATA_ROOT == Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_twin_negatives_are_their_nodule_slices_without_the_nodule(prepared, tmp_path):
    from scripts.data.twins import add_twin_negatives

    out, source, _, _ = prepared
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    splits = ("validation", "test")
    count = add_twin_negatives(source, copy, splits)
    datalist = json.loads((copy / "datalist.json").read_text())
    items = [item for split in splits for item in datalist[split]]
    twins = [item for item in items if "twin_of" in item]
    inserted = [i for i in items if i["class"] == 1 and all(n["origin"] == "inserted" for n in i["nodule_info"])]
    assert count == len(twins) == len(inserted) > 0
    by_image = {item["image"]: item for item in items}
    for twin in twins:
        nodule_slice = by_image[twin["twin_of"]]
        assert twin["class"] == 0 and twin["nodule_info"] == [] and not _read(copy, twin["label"]).any()
        image, original = _read(copy, twin["image"]), _read(copy, nodule_slice["image"])
        assert np.array_equal(image, _host_slice(source, twin))  # the host's own pixels
        inside = _boxes(source, nodule_slice)
        assert np.array_equal(image[~inside], original[~inside]) and not np.array_equal(image, original)
    assert add_twin_negatives(source, copy, splits) == count  # a second call adds none
    assert len(json.loads((copy / "datalist.json").read_text())["test"]) == len(datalist["test"])


def test_the_real_ct_model_command_fine_tunes_the_synthetic_model(data_root, tmp_path):
    """``python -m scripts.real_ct_model`` at a tiny size: a synthetic model, the real set with twins, a fine-tuning
    that starts from every weight of the synthetic model, and the report on the held-out scan."""
    import torch
    from scripts.real_ct_model import real_ct_model

    model = real_ct_model(
        out=str(tmp_path),
        test=HELD_OUT,
        scans=[HELD_OUT, "Lung_Dx-A0002", "Lung_Dx-A0001"],
        data_root=str(data_root),
        synthetic_cases=4,
        synthetic_size=128,
        synthetic_epochs=1,
        epochs=1,
        learning_rate=0.0,  # Adam at rate 0 moves nothing: the weights must be the synthetic model's
        variants=1,
        workers=1,
    )
    synthetic = torch.load(tmp_path / "synthetic" / "models" / "model.pt", weights_only=True)
    tuned = torch.load(model, weights_only=True)
    weights = [k for k in synthetic["model"] if k.endswith("weight")]
    assert all(torch.equal(synthetic["model"][k], tuned["model"][k]) for k in weights)
    record = tuned["config"]
    assert record["pixel_spacing_mm"] == pytest.approx([2.25, 2.25], abs=0.01) and record["image_size"] == 128
    assert record["in_channels"] == 3 and record["threshold_rule"] == "validation specificity 0.98"
    datalist = json.loads((tmp_path / "dataset" / "datalist.json").read_text())
    assert {item["scan"] for item in datalist["test"]} == {HELD_OUT}
    for split in ("training", "validation"):
        assert any("twin_of" in item for item in datalist[split])
    assert not any("twin_of" in item for item in datalist["test"])
    report = json.loads((tmp_path / "classification" / "classifier_report.json").read_text())
    assert report["slices"] == len(datalist["test"])
