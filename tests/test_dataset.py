"""The prepared dataset format, the slice rules, STAPLE, the subject split and bad input."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scripts.data.dataset as scripts_dataset
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImaged
from scripts.data.cases import CaseAnnotations, CaseVolume, Nodule
from scripts.data.dataset import (
    SPLITS,
    crop_window,
    inference_datalist,
    load_split,
    plan_dataset,
    prepare_dataset,
    split_subjects,
)
from scripts.data.labels import slice_classes, staple

SHAPE = (80, 80, 12)
SPACING = (0.8, 0.8, 2.5)


def _ball(shape, centre, radius):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


class ToySource:
    """Subjects with a box of 'lung' and one nodule drawn by up to four experts; one subject has none."""

    name = "toy"

    def __init__(self, n: int = 6, nan_subject: str | None = None, spacing=SPACING):
        self.n, self.nan_subject, self.spacing = n, nan_subject, spacing

    def subjects(self):
        return [f"T{i}" for i in range(self.n)]

    def annotations(self, subject):
        i = int(subject[1:])
        if i == self.n - 1:
            return CaseAnnotations(subject, SHAPE, self.spacing)
        masks = np.zeros((3, 12, 12, 6), dtype=bool)
        for e in range(3):  # slightly different experts; expert 2 also marks one slice alone
            masks[e] = _ball((12, 12, 6), (6 + 0.3 * e, 6, 2.5), 4 + 0.2 * e)
        masks[2, ..., 5] = _ball((12, 12), (6, 6), 2)
        masks[:2, ..., 5] = False
        return CaseAnnotations(subject, SHAPE, self.spacing, [Nodule(masks, (30 + i, 35, 3), 6.4)])

    def load(self, subject):
        hu = np.full(SHAPE, -850.0, dtype=np.float32)
        hu[:10], hu[-10:] = 40.0, 40.0
        a = self.annotations(subject)
        for n in a.nodules:
            hu[n.box()][n.masks.sum(0) >= 2] = 30.0
        if subject == self.nan_subject:
            hu[5, 5, 5] = np.nan
        lungs = np.zeros(SHAPE, dtype=bool)
        lungs[10:-10, 10:-10] = True
        return CaseVolume(a, hu, lungs)


def test_slice_rules_on_hand_made_masks():
    masks = np.zeros((2, 4, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3, 0:2] = True  # expert 0 on local slices 0-1
    masks[1, 1:3, 1:3, 1:3] = True  # expert 1 on local slices 1-2: they overlap on slice 1 only
    a = CaseAnnotations("P", (4, 4, 8), SPACING, [Nodule(masks, (0, 0, 2), 4.0)])
    c = slice_classes(a)
    assert np.flatnonzero(c.positive).tolist() == [3]  # two experts overlap -> with nodule
    assert not c.positive[2] and not c.negative[2]  # one expert -> neither
    assert not c.positive[4] and not c.negative[4]
    assert np.flatnonzero(c.negative).tolist() == [0, 1, 5, 6, 7]
    assert c.nodules[3] == [0]
    margin = slice_classes(a, margin=1)
    assert np.flatnonzero(margin.negative).tolist() == [0, 6, 7]
    marks = CaseAnnotations("P", (4, 4, 8), SPACING, [], marked_slices=np.eye(8, dtype=bool)[6])
    assert not slice_classes(marks).negative[6]


def test_staple_on_known_case():
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[:, 2:6, 2:6] = True  # all four agree
    masks[0, 6:8, 2:6] = True  # one expert alone: out
    masks[1:3, 2:6, 6:8] = True  # two of four: STAPLE with equal-quality experts keeps it
    masks[3, 0, 0] = True
    result = staple(masks)
    assert result[2:6, 2:6].all()
    assert not result[6:8].any()
    assert result[2:6, 6:8].all()
    assert not result[0, 0]
    assert np.array_equal(staple(masks[:1]), masks[0])
    with pytest.raises(ValueError, match="n_experts"):
        staple(np.zeros((0, 3, 3), dtype=bool))


def test_split_has_no_leak_and_is_stratified(caplog):
    rng = np.random.default_rng(3)
    share = {f"S{i:03d}": float(rng.uniform(0, 0.3)) if i % 3 else 0.0 for i in range(120)}
    split = split_subjects(share, seed=1)
    assert set(split) == set(share)
    counts = {s: sum(v == s for v in split.values()) for s in SPLITS}
    assert counts == {"training": 80, "validation": 20, "test": 20}
    means = {s: np.mean([share[k] for k, v in split.items() if v == s]) for s in SPLITS}
    assert max(means.values()) - min(means.values()) < 0.02
    assert split_subjects(share, seed=1) == split and split_subjects(share, seed=2) != split
    small = split_subjects({"a": 0.1, "b": 0.2, "c": 0.0}, seed=0)
    assert sorted(small.values()) == sorted(SPLITS)
    with caplog.at_level("WARNING", logger="scripts.data.dataset"):
        two = split_subjects({"a": 0.1, "b": 0.2, "c": 0.0})  # every split a subject, but one without nodule slices
    assert sorted(two.values()) == sorted(SPLITS)
    assert "2 of 3 subjects have slices with nodule, too few to fill 3 splits" in caplog.text


class FewNoduleSource(ToySource):
    """Only T0-T2 have a nodule: the other subjects contribute no slice, since negatives match positives."""

    def annotations(self, subject):
        a = super().annotations(subject)
        return a if int(subject[1:]) < 3 else CaseAnnotations(subject, a.shape, a.spacing)


def test_every_split_gets_a_subject_with_nodules():
    share = {"a": 0.3, "b": 0.2, "c": 0.1, **{f"z{i}": 0.0 for i in range(5)}}
    for seed in range(6):  # the block deal alone leaves a split without a, b or c for seeds 0, 1, 2, 4 and 5
        split = split_subjects(share, seed=seed)
        assert sorted(split[s] for s in "abc") == sorted(SPLITS), seed
        assert split == split_subjects(share, seed=seed)
    source = FewNoduleSource(9)
    plans = plan_dataset([source.annotations(s) for s in source.subjects()], negative_margin=0, seed=4)
    for split in SPLITS:  # before the fix, seed 4 put T0-T2 in training and left validation and test without slices
        chosen = [p for p in plans if p.split == split]
        assert sum(len(p.positives) for p in chosen) == 5 and sum(len(p.negatives) for p in chosen) == 5, split


def _write_datalist(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "datalist.json").write_text(text)
    return root


def test_load_split_names_the_file_and_the_problem(tmp_path):
    item = {"image": "images/a.nii.gz", "class": 1}
    root = _write_datalist(tmp_path / "empty_test", json.dumps({"training": [item], "validation": [item], "test": []}))
    # MONAI's reader fails on an empty test split with a bare IndexError; inference reads the test split
    for read in (lambda: load_split(root, "test"), lambda: inference_datalist(root, "test")):
        with pytest.raises(ValueError, match=r"split 'test' of .*empty_test/datalist\.json is empty .*test 0"):
            read()
    assert load_split(root, "training") == [{"image": str(root / "images" / "a.nii.gz"), "class": 1}]
    with pytest.raises(ValueError, match=r"lacks \['label'\]"):
        load_split(root, "training", required=("image", "label"))
    broken = _write_datalist(tmp_path / "broken", '{"training": [{"image": "a.nii.gz"},')
    with pytest.raises(ValueError, match=r"broken/datalist\.json: malformed JSON at line 1, column 37"):
        load_split(broken, "training")
    listed = _write_datalist(tmp_path / "listed", json.dumps([item]))
    with pytest.raises(ValueError, match=r"listed/datalist\.json: expected an object of splits, got a JSON list"):
        load_split(listed, "training")
    flat = _write_datalist(tmp_path / "flat", json.dumps({"test": "images/a.nii.gz"}))
    with pytest.raises(ValueError, match="split 'test' is a JSON str, not a list"):
        load_split(flat, "test")


def test_malformed_state_is_named_on_resume(tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(ToySource(6), out, size=64, progress=False)
    summary = out / "dataset_summary.json"
    summary.write_text(summary.read_text()[:-20])  # truncated, e.g. by a full disk outside this writer
    with pytest.raises(ValueError, match=r"dataset_summary\.json: malformed JSON"):
        prepare_dataset(ToySource(6), out, size=64, progress=False)
    summary.unlink()
    record = out / ".state" / "T1.json"
    record.write_text("{")
    with pytest.raises(ValueError, match=r"\.state/T1\.json: malformed JSON at line 1, column 2"):
        prepare_dataset(ToySource(6), out, size=64, progress=False)


def test_negatives_equal_positives_per_split():
    source = ToySource(12)
    plans = plan_dataset([source.annotations(s) for s in source.subjects()], negative_margin=0, seed=0)
    for split in SPLITS:
        chosen = [p for p in plans if p.split == split]
        assert sum(len(p.negatives) for p in chosen) == sum(len(p.positives) for p in chosen)
    for p in plans:
        assert not set(p.negatives) & set(p.positives)


def test_crop_window_contains_nodules():
    lungs = np.zeros((100, 100), dtype=bool)
    lungs[10:50, 10:50] = True
    assert crop_window(lungs, 40) == (10, 10)
    assert crop_window(lungs, 40, [(slice(60, 70), slice(20, 25))]) == (30, 10)
    with pytest.raises(ValueError, match="more than the crop size"):
        crop_window(lungs, 40, [(slice(0, 10), slice(0, 5)), (slice(60, 70), slice(0, 5))])


def test_round_trip_through_monai(tmp_path):
    out = tmp_path / "ds"
    summary = prepare_dataset(ToySource(6), out, size=64, seed=0, progress=False)
    assert summary["failed"] == {}
    subjects = [set(summary["subjects"][s]) for s in SPLITS]
    assert all(subjects) and not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    loader = LoadImaged(keys=["image", "label"], image_only=False)
    n_pos = 0
    for split in SPLITS:
        items = load_decathlon_datalist(out / "datalist.json", data_list_key=split, base_dir=out)
        for item in items:
            assert Path(item["image"]).is_file() and item["class"] in (0, 1)
            data = loader(item)
            assert tuple(data["image"].shape) == (64, 64) and tuple(data["label"].shape) == (64, 64)
            assert np.allclose(data["image"].meta["pixdim"][1:3], SPACING[:2])
            assert nib.load(item["image"]).get_data_dtype() == np.int16
            assert nib.load(item["label"]).get_data_dtype() == np.uint8
            label = np.asarray(data["label"])
            assert bool(label.any()) == bool(item["class"]) == (item["nodules"] > 0)
            n_pos += item["class"]
    # per subject with a nodule: local slices 0-4 have >= 2 experts overlapping, slice 5 has one expert only
    assert n_pos == 5 * 5
    assert sum(summary["slices"][s]["with_nodule"] for s in SPLITS) == n_pos
    for split in SPLITS:  # the summary counts what the datalist holds, split by split
        items = load_split(out, split, required=("class",))
        assert summary["slices"][split] == {
            "with_nodule": sum(i["class"] for i in items),
            "without_nodule": sum(1 - i["class"] for i in items),
        }
    datalist = json.loads((out / "datalist.json").read_text())
    assert all(i["slice"] != 8 for items in datalist.values() for i in items if i["subject"] != "T5")


def test_same_seed_same_bytes_and_resume(tmp_path):
    prepare_dataset(ToySource(6), tmp_path / "a", size=64, seed=4, progress=False)
    prepare_dataset(ToySource(6), tmp_path / "b", size=64, seed=4, progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.nii.gz"))
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    # resume: a finished subject is not rewritten, a removed record is redone
    record = next((tmp_path / "a" / ".state").glob("T0.json"))
    image = tmp_path / "a" / json.loads(record.read_text())["items"][0]["image"]
    record.unlink()
    kept = next(p for p in (tmp_path / "a" / "images").glob("T1_*"))
    os.utime(kept, (1, 1))
    os.utime(image, (1, 1))
    prepare_dataset(ToySource(6), tmp_path / "a", size=64, seed=4, progress=False)
    assert kept.stat().st_mtime == 1 and image.stat().st_mtime > 1
    with pytest.raises(ValueError, match="other settings"):
        prepare_dataset(ToySource(6), tmp_path / "a", size=64, seed=5, progress=False)


class ToySourceWithSettings(ToySource):
    def settings(self):
        return {"spacing": self.spacing}  # a tuple: recorded as the list it reads back as


def test_source_settings_are_recorded_and_checked_on_resume(tmp_path):
    plain = prepare_dataset(ToySource(6), tmp_path / "plain", size=64, min_experts=1, progress=False)
    assert plain["source_settings"] == {} and plain["min_experts"] == 1  # a slice's class is decided by it
    summary = prepare_dataset(ToySourceWithSettings(6), tmp_path / "a", size=64, progress=False)
    assert summary["source_settings"] == {"spacing": list(SPACING)}
    assert json.loads((tmp_path / "a" / "dataset_summary.json").read_text())["source_settings"] == {
        "spacing": list(SPACING)
    }
    written = (tmp_path / "a" / "datalist.json").stat().st_mtime_ns
    again = prepare_dataset(ToySourceWithSettings(6), tmp_path / "a", size=64, progress=False)
    assert again == summary and (tmp_path / "a" / "datalist.json").stat().st_mtime_ns == written  # finished: kept
    other = ToySourceWithSettings(6, spacing=(0.7, 0.7, 2.5))
    with pytest.raises(ValueError, match=r"other settings \(source_settings\)"):
        prepare_dataset(other, tmp_path / "a", size=64, progress=False)


def test_bad_input_is_reported_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="T2.*NaN"):
        prepare_dataset(ToySource(6, nan_subject="T2"), tmp_path / "nan", size=64, progress=False)
    assert not (tmp_path / "nan").exists()
    with pytest.raises(RuntimeError, match="T0.*spacing"):
        prepare_dataset(ToySource(6, spacing=None), tmp_path / "nospacing", size=64, progress=False)
    assert not (tmp_path / "nospacing").exists()
    summary = prepare_dataset(
        ToySource(6, nan_subject="T2"), tmp_path / "skip", size=64, on_error="skip", progress=False
    )
    assert list(summary["failed"]) == ["T2"] and "NaN" in summary["failed"]["T2"]
    assert not list((tmp_path / "skip" / "images").glob("T2_*"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write to output"):
        prepare_dataset(ToySource(6), blocker / "ds", size=64, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_dataset(ToySource(6), tmp_path / "full", size=64, progress=False)


def test_contact_sheet(tmp_path):
    from matplotlib.image import imread
    from scripts.data.contact_sheet import contact_sheet

    prepare_dataset(ToySource(6), tmp_path / "ds", size=64, progress=False)
    training = json.loads((tmp_path / "ds" / "datalist.json").read_text())["training"]
    assert sum(i["class"] for i in training) >= 2 and sum(1 - i["class"] for i in training) >= 2
    png = Path(contact_sheet(str(tmp_path / "ds"), n=4))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = np.round(imread(png)[..., :3] * 255).astype(int)
    assert rgb.shape == (3 * 80, 4 * 3 * 80, 3)  # one row of four 3-inch panels at 80 dpi
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    outlined = []
    for panel in np.split(np.arange(rgb.shape[1]), 4):
        # the slice in the lung window (-1000 to 400 HU): the toy's lungs (-850 HU) dark grey, its body (40 HU) light
        levels = rgb[:, panel, 0][grey[:, panel]]
        for hu in (-850.0, 40.0):
            pixels = int((np.abs(levels - (hu + 1000) / 1400 * 255) <= 8).sum())
            assert pixels > 1000, (hu, pixels)
        outlined.append(int(red[:, panel].sum()) > 20)
    assert outlined.count(True) == 2  # half the slices, those with a nodule, have its label outlined in red
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        contact_sheet(str(tmp_path / "missing"))


def test_disk_full_leaves_no_partial_files(tmp_path, monkeypatch):
    import errno

    calls = {"n": 0}
    real_save = nib.save

    def save_then_fail(image, path):
        calls["n"] += 1
        if calls["n"] == 7:  # part-way through a subject: write half a file, then the disk is full
            Path(path).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(image, path)

    monkeypatch.setattr(nib, "save", save_then_fail)  # what the writer's NIfTI files are saved with
    with pytest.raises(RuntimeError, match="No space left"):
        prepare_dataset(ToySource(6), tmp_path / "full_disk", size=64, progress=False)
    assert not (tmp_path / "full_disk").exists()
    calls["n"] = 0
    summary = prepare_dataset(ToySource(6), tmp_path / "skip", size=64, on_error="skip", progress=False)
    ((failed, error),) = summary["failed"].items()
    assert "No space left" in error
    assert not list((tmp_path / "skip").rglob(".tmp-*"))
    assert (
        not list((tmp_path / "skip").rglob(f"{failed}_*"))
        and not (tmp_path / "skip" / ".state" / f"{failed}.json").exists()
    )
    assert len(summary["subjects"]["training"] + summary["subjects"]["validation"] + summary["subjects"]["test"]) == 5


def test_matched_negatives_follow_the_positives_heights():
    rng = np.random.default_rng(0)
    pool = rng.uniform(0, 1, 2000).tolist()  # negatives everywhere along the scan
    positives = rng.normal(0.5, 0.08, 300).clip(0, 0.999).tolist()  # positives in the middle
    chosen = scripts_dataset._matched_draw(pool, positives, 300, rng)
    assert len(set(chosen.tolist())) == 300
    heights = np.asarray(pool)[chosen]
    assert abs(np.mean(heights) - np.mean(positives)) < 0.03 and abs(np.std(heights) - np.std(positives)) < 0.03
    # too few negatives at the positives' heights: the rest are drawn uniformly, still without repeats
    few = scripts_dataset._matched_draw([0.5, 0.51, 0.1, 0.9, 0.95], [0.5] * 10, 4, rng)
    assert {0, 1} <= set(few.tolist()) and len(set(few.tolist())) == 4
    plans = plan_dataset(
        [ToySource(12).annotations(s) for s in ToySource(12).subjects()], negative_margin=0, negative_sampling="matched"
    )
    assert sum(len(p.negatives) for p in plans) == sum(len(p.positives) for p in plans)
    with pytest.raises(ValueError, match="negative_sampling"):
        plan_dataset([ToySource(6).annotations("T0")], negative_sampling="nearby")


def test_malformed_prediction_record_and_datalist_are_named(tmp_path):
    from scripts.data.contact_sheet import contact_sheet
    from scripts.evaluation.evaluate import _read_probability
    from scripts.utils.io import read_json

    records = tmp_path / "pred" / "records"
    records.mkdir(parents=True)
    (records / "S0_0001.json").write_text('{"probability": 0.7')
    with pytest.raises(ValueError, match=r"records/S0_0001\.json: malformed JSON at line 1, column 20"):
        _read_probability(tmp_path / "pred", "S0_0001")
    (records / "S0_0002.json").write_bytes(b'{"probability": "\xff"}')
    with pytest.raises(ValueError, match=r"S0_0002\.json: not a UTF-8 text file"):
        read_json(records / "S0_0002.json")
    _write_datalist(tmp_path / "ds", "{'training': []}")  # Python, not JSON
    with pytest.raises(ValueError, match=r"ds/datalist\.json: malformed JSON at line 1, column 2"):
        contact_sheet(str(tmp_path / "ds"))


class PidRecordingSource(ToySource):
    """A toy source that leaves a file named after each process that plans or loads one of its subjects."""

    def __init__(self, folder: Path, n: int = 8):
        super().__init__(n)
        self.folder = folder

    def annotations(self, subject):
        (self.folder / f"{os.getpid()}").touch()
        return super().annotations(subject)

    def load(self, subject):
        (self.folder / f"{os.getpid()}").touch()
        return super().load(subject)


def test_planning_and_writing_share_one_pool_of_workers(tmp_path):
    # the worker processes that planned write too, so what they cached while planning (the synthetic source's LIDC
    # nodule shapes) serves the writing; a pool of its own for each step starts up to twice as many processes
    (tmp_path / "pids").mkdir()
    source = PidRecordingSource(tmp_path / "pids")
    parallel = prepare_dataset(source, tmp_path / "parallel", size=64, seed=2, workers=2, progress=False)
    pids = {int(p.name) for p in (tmp_path / "pids").iterdir()}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    serial = prepare_dataset(ToySource(8), tmp_path / "serial", size=64, seed=2, workers=1, progress=False)
    assert parallel["slices"] == serial["slices"]
    for path in sorted((tmp_path / "serial").rglob("*.nii.gz")):
        assert path.read_bytes() == (tmp_path / "parallel" / path.relative_to(tmp_path / "serial")).read_bytes()


class DescribedToySource(ToySource):
    """The toy subjects, saying where they and their nodules come from, with slice 0 kept from the negatives."""

    def annotations(self, subject):
        a = super().annotations(subject)
        a.info = {"scan": f"scan-{int(subject[1:]) % 2}"}
        for nodule in a.nodules:
            nodule.info = {"origin": "inserted", "from": subject}
        a.not_negative = np.zeros(SHAPE[2], bool)
        a.not_negative[0] = True
        return a


def test_a_given_split_and_the_sources_record_are_kept(tmp_path):
    split = {f"T{i}": ("test" if i in (0, 1) else "validation" if i == 2 else "training") for i in range(6)}
    summary = prepare_dataset(DescribedToySource(6), tmp_path / "a", size=64, split=split, progress=False)
    assert summary["split_rule"] == "given"
    assert summary["subjects"] == {"training": ["T3", "T4", "T5"], "validation": ["T2"], "test": ["T0", "T1"]}
    datalist = json.loads((tmp_path / "a" / "datalist.json").read_text())
    for name, items in datalist.items():
        for item in items:
            assert split[item["subject"]] == name and item["scan"] == f"scan-{int(item['subject'][1:]) % 2}"
            assert item["nodule_info"] == ([{"origin": "inserted", "from": item["subject"]}] if item["class"] else [])
            assert item["class"] == 1 or item["slice"] != 0
    with pytest.raises(ValueError, match="names no split"):
        prepare_dataset(ToySource(6), tmp_path / "b", size=64, split={"T0": "test"}, progress=False)
    plain = prepare_dataset(ToySource(6), tmp_path / "c", size=64, progress=False)
    assert plain["split_rule"] == "stratified"
    assert all(
        "nodule_info" not in i
        for items in json.loads((tmp_path / "c" / "datalist.json").read_text()).values()
        for i in items
    )
