"""The segmenter as a MONAI inferer, and the slice inference (configs/inference.json with inference_slices.json merged)
end to end on tiny slices."""

import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from monai.data import MetaTensor, decollate_batch
from scripts.integration.config_runs import CLASSIFY, SLICE_INFERENCE, config_files
from scripts.networks.checkpoint import TrainingRecord
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.segmenter import WeaklySupervisedSegmenter
from scripts.pipeline.settings import GROUPS, preset_changes
from test_rnam import RegionNet

SIZE = 64
SPACING = 1.6


class ScopedNet(RegionNet):
    """RegionNet plus a fixed smooth bump: the bump shapes the scope, the weighted region decides R-NAM."""

    def __init__(self, weight: torch.Tensor, bump: torch.Tensor) -> None:
        super().__init__(weight)
        self.register_buffer("bump", bump)

    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, nam = super().forward_with_nam(x)
        return logits, nam + self.bump


def scoped_net(region: tuple[int, int], bumps: list[tuple[int, int, float, float]]) -> ScopedNet:
    """NAM depends on the input only around ``region``; bumps ``(row, col, sigma, height)`` make the blobs."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    weight = torch.full((1, 1, SIZE, SIZE), 0.05)
    r, c = region
    weight[..., r - 5 : r + 6, c - 5 : c + 6] = 1.0
    bump = sum(h * torch.exp(-((yy - br) ** 2 + (xx - bc) ** 2) / (2 * s**2)) for br, bc, s, h in bumps)
    return ScopedNet(weight, bump[None, None].float()).eval()


def slice_with_blobs(*centres: tuple[int, int]) -> torch.Tensor:
    """A windowed slice (0.1 ~ -860 HU) with 5x5 bright blobs (0.75 ~ +50 HU) at the centres."""
    x = 0.1 + 0.01 * torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for r, c in centres:
        x[..., r - 2 : r + 3, c - 2 : c + 3] = 0.75
    return x


def test_fine_coarse_two_nodule_on_a_known_nam():
    blobs = [(20, 20), (26, 28), (46, 46)]
    x = slice_with_blobs(*blobs)
    seg = WeaklySupervisedSegmenter("fine", spacing=(0.7, 0.7))
    net = scoped_net((26, 28), [(23, 24, 8, 2.0)])
    out = seg(x, net)
    (result,) = seg.segment_batch(x, net)
    assert set(out) == {"mask", "nam", "scope", "candidates", "record"} and result.status == "segmented"
    assert all(out[key].shape == (1, 1, SIZE, SIZE) for key in ("mask", "nam", "scope", "candidates"))
    assert len(result.candidates) >= 2 and len(result.chosen) == 1
    chosen = result.candidates[result.chosen[0]]
    assert chosen.mask[26, 28] and (out["mask"][0, 0].numpy() == chosen.mask).all()
    assert chosen.score == max(c.score for c in result.candidates)
    assert chosen.area_mm2 == pytest.approx(25 * 0.49)
    # the named outputs are this slice's: its NAM, its scope, its candidates numbered from 1, its record
    np.testing.assert_array_equal(out["nam"][0, 0].numpy(), result.nam)
    assert (out["scope"][0, 0].numpy() == 1).sum() == result.scopes[0].sum()
    assert (out["candidates"][0, 0].numpy() == result.chosen[0] + 1).sum() == chosen.mask.sum()
    record = json.loads(out["record"][0])
    assert record == json.loads(json.dumps(result.to_record()))
    assert record["chosen"] == result.chosen and record["candidates"][0]["rnam_score"] is not None

    coarse = WeaklySupervisedSegmenter("coarse")
    mask = coarse(x, net)["mask"][0, 0].numpy().astype(bool)
    union = np.any([c.mask for c in coarse.segment_batch(x, net)[0].candidates], axis=0)
    assert (mask == union).all() and mask.sum() > chosen.mask.sum()

    two = WeaklySupervisedSegmenter("two_nodule")
    net = scoped_net((20, 20), [(20, 20, 8, 2.0), (46, 46, 6, 1.5)])
    mask = two(x, net)["mask"][0, 0].numpy()
    (result,) = two.segment_batch(x, net)
    assert len(result.scopes) == 2 and len(result.chosen) == 2
    assert mask[20, 20] and mask[46, 46] and not mask[26, 28]


def test_multi_gap_refines_scope_and_screens_with_the_classifier():
    x = slice_with_blobs((20, 20), (26, 28))
    multi = scoped_net((20, 20), [(20, 20, 3, 2.0)])
    seg = WeaklySupervisedSegmenter("multi_gap", multi_gap_network=multi)
    net = scoped_net((26, 28), [(23, 24, 8, 2.0)])
    mask = seg(x, net)["mask"][0, 0].numpy()
    (result,) = seg.segment_batch(x, net)
    assert result.refined and result.base_scope[20, 20] and result.base_scope[26, 28]
    assert result.scopes[0][20, 20] and not result.scopes[0][26, 28]
    assert result.status == "segmented" and mask[20, 20] and not mask[26, 28]
    assert result.candidates[0].score > 0
    coarse = WeaklySupervisedSegmenter("multi_gap_coarse", multi_gap_network=multi)
    coarse_mask = coarse(x, net)["mask"][0, 0].numpy()
    (result,) = coarse.segment_batch(x, net)
    union = np.any([c.mask for c in result.candidates], axis=0)
    assert result.scopes[0][20, 20] and (coarse_mask == union).all()
    assert all(np.isnan(c.score) for c in result.candidates)  # coarse: no R-NAM
    for mode in ("multi_gap", "multi_gap_coarse"):
        with pytest.raises(ValueError, match="multi_gap_network"):
            WeaklySupervisedSegmenter(mode)


def blob_slices(count: int) -> torch.Tensor:
    """``count`` different windowed slices ``(count, 1, SIZE, SIZE)`` float64, each with bright blobs all over."""
    g = torch.Generator().manual_seed(3)
    x = 0.1 + 0.01 * torch.rand(count, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    for b in range(count):
        for r, c in torch.randint(6, SIZE - 6, (12, 2), generator=g).tolist():
            x[b, 0, r - 2 : r + 2, c - 2 : c + 3] = 0.75
    return x


def test_screens_from_the_forward_that_classified_the_slice():
    """On the CPU the fine mode keeps the float32 forward of each slice called "nodule" and R-NAM starts from it: the
    forward is the slice's own (the scores of the reference path, full forwards of the full image), only the
    positive slices keep one, and R-NAM runs no forward of its own."""
    torch.manual_seed(1)
    net = GAPClassifier(gap_levels=2, width=1 / 16, head_channels=64).double().eval()
    x = blob_slices(4)
    with torch.no_grad():
        logits, nams = net.forward_with_nam(x)
    probability = torch.softmax(logits.float(), 1)[:, 1].numpy()  # the segmenter's probabilities are float32
    threshold = float(np.sort(probability)[1])  # three slices called "nodule", one not
    seg = WeaklySupervisedSegmenter("fine", threshold=threshold, spacing=(0.7, 0.7))
    found = seg.classify(x, net)
    np.testing.assert_allclose(found.probability, probability, rtol=1e-6)
    np.testing.assert_allclose(found.nam, nams[:, 0].float().numpy(), rtol=1e-6, atol=1e-9)
    assert [f is not None for f in found.forwards] == list(probability >= threshold)
    lungs = np.ones((4, SIZE, SIZE), bool)
    forwards = []
    net.features[0].register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    results = seg.segment_batch(x, net, lung_mask=lungs)
    assert forwards == [1, 1, 1, 1]  # each slice classified alone, and nothing more through conv1_1
    reference = WeaklySupervisedSegmenter("fine", threshold=threshold, spacing=(0.7, 0.7), screening={"crop": False})
    assert not any(f is not None for f in reference.classify(x, net).forwards)
    expected = reference.segment_batch(x, net, lung_mask=lungs)
    screened = [r for r in results if r.positive and len(r.candidates) > 1]
    assert len(screened) >= 2
    for result, other in zip(results, expected):
        assert result.chosen == other.chosen and result.status == other.status
        scores = [c.score for c in result.candidates]
        # the reference compares with the float32 NAM of the classification, the kept forward in float64
        np.testing.assert_allclose(scores, [c.score for c in other.candidates], rtol=1e-6)
    assert all(c.score > 0 for r in screened for c in r.candidates)
    coarse = WeaklySupervisedSegmenter("coarse", threshold=threshold)
    assert not any(f is not None for f in coarse.classify(x, net).forwards)  # no R-NAM: nothing kept
    # every mode classifies alike, to the bit (in float32, where a batch's forward rounds otherwise than a slice's)
    net32, x32 = net.float(), x.float()
    for key in ("probability", "nam"):
        np.testing.assert_array_equal(getattr(coarse.classify(x32, net32), key), getattr(seg.classify(x32, net32), key))


def test_negative_flat_and_bad_inputs():
    torch.manual_seed(0)
    net = GAPClassifier(width=1 / 16, head_channels=256).eval()
    x = slice_with_blobs((30, 30)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        net.fc.bias[1] = -20.0
    seg = WeaklySupervisedSegmenter("fine")
    out = seg(x, net)
    assert out["mask"].shape == (2, 1, SIZE, SIZE) and not out["mask"].any()
    results = seg.segment_batch(x, net)
    assert [r.status for r in results] == ["negative", "negative"] and results[0].probability < 0.5
    assert [json.loads(r)["status"] for r in out["record"]] == ["negative", "negative"]

    with torch.no_grad():  # a positive slice with a flat NAM: no scope, empty mask, no exception
        net.fc.bias[1] = 20.0
        net.fc.weight.zero_()
    out = seg(x[:1], net)
    assert not out["mask"].any() and json.loads(out["record"][0])["status"] == "no_scope"

    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        seg(x[0], net)
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        seg(bad, net)
    with pytest.raises(ValueError, match="mode"):
        WeaklySupervisedSegmenter("best")


def test_spacing_and_meta_from_metatensor():
    x = MetaTensor(slice_with_blobs((26, 28)), affine=torch.diag(torch.tensor([0.5, 0.8, 1.0, 1.0])))
    seg = WeaklySupervisedSegmenter("fine", candidates={"min_area_mm2": 1.0})
    net = scoped_net((26, 28), [(26, 28, 8, 2.0)])
    out = seg(x, net)
    for key in ("mask", "nam", "scope", "candidates"):
        assert isinstance(out[key], MetaTensor) and torch.allclose(out[key].affine, x.affine.double()), key
    (result,) = seg.segment_batch(x, net)
    assert result.spacing == pytest.approx((0.5, 0.8))
    assert result.candidates[result.chosen[0]].area_mm2 == pytest.approx(25 * 0.4)


def phantom_slice(rng: np.random.Generator, nodule: bool) -> tuple[np.ndarray, np.ndarray]:
    """A tiny chest-like slice in HU (body, two lungs, maybe a nodule) and its label."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    hu = np.where(((yy - 32) / 29) ** 2 + ((xx - 32) / 30) ** 2 < 1, 40.0, -1000.0)
    for c in (20, 44):
        hu[((yy - 32) / 20) ** 2 + ((xx - c) / 9) ** 2 < 1] = -850.0
    label = np.zeros((SIZE, SIZE), np.uint8)
    if nodule:
        label[(yy - 28) ** 2 + (xx - 20) ** 2 < 9] = 1
        hu[label == 1] = 20.0
    return (hu + rng.normal(0, 20, hu.shape)).astype(np.int16), label


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A prepared dataset of 4 phantom slices and 1-GAP / 2-GAP checkpoints."""
    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    items = []
    affine = np.diag([SPACING, SPACING, 1.0, 1.0])
    for i in range(4):
        hu, label = phantom_slice(rng, nodule=i % 2 == 0)
        for folder, array in (("images", hu), ("labels", label)):
            (root / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / folder / f"S{i}_{10 + i}.nii.gz")
        items.append(
            {
                "image": f"images/S{i}_{10 + i}.nii.gz",
                "label": f"labels/S{i}_{10 + i}.nii.gz",
                "class": int(label.any()),
                "subject": f"S{i}",
                "slice": 10 + i,
                "nodules": int(label.any()),
                "diameters_mm": [],
            }
        )
    (root / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": items}))
    torch.manual_seed(0)
    for levels, name in ((1, "model.pt"), (2, "model_2gap.pt")):
        net = GAPClassifier(gap_levels=levels, width=1 / 16)
        with torch.no_grad():
            net.fc.bias[1] = 3.0  # most slices positive: the whole pipeline runs
        # the checkpoint records its training settings, so inference needs no flags
        record = TrainingRecord(net, [{"image": "", "spacing_mm": [SPACING, SPACING]}], SIZE, (-1000, 400))
        torch.save({"model": net.state_dict(), "config": record.state_dict()}, root / name)
    return root


def overrides(root: Path, out: Path, **extra) -> dict:
    return {
        "dataset_dir": str(root),
        "ckpt_path": str(root / "model.pt"),
        "multi_gap_ckpt_path": str(root / "model_2gap.pt"),
        "output_dir": str(out),
        "segmenter#candidates#min_area_mm2": 3.0,
        "device": "cpu",
        **extra,
    }


def check_outputs(root: Path, out: Path, stems: list[str], panels: bool = True) -> list[dict]:
    records = []
    for stem in stems:
        src = nib.load(root / "images" / f"{stem}.nii.gz")
        mask, nam = nib.load(out / "masks" / f"{stem}.nii.gz"), nib.load(out / "nams" / f"{stem}.nii.gz")
        assert mask.shape == src.shape == nam.shape
        np.testing.assert_allclose(mask.affine, src.affine)
        assert mask.get_data_dtype() == np.uint8 and nam.get_data_dtype() == np.float32
        record = json.loads((out / "records" / f"{stem}.json").read_text())
        assert {"probability", "scope_boxes", "candidates", "chosen", "status"} <= record.keys()
        if record["status"] != "segmented":
            assert not np.asarray(mask.dataobj).any()
        records.append(record)
    if panels:
        assert sorted(p.stem for p in (out / "panels").glob("*.png")) == sorted(stems)
    assert not list(out.rglob(".tmp-*"))  # the atomic writer's temporary names
    return records


STEMS = [f"S{i}_{10 + i}" for i in range(4)]


@pytest.mark.parametrize("config", ["inference.json", SLICE_INFERENCE, CLASSIFY])
def test_configs_default_to_the_segmenter_s_settings(config):
    """The configs give scans and slices the settings of ``WeaklySupervisedSegmenter``'s defaults (the real-CT
    candidate rules), every one written out once, in inference.json, which the slice configs merge; the quick
    start's preset changes the cut alone."""
    parsed = ConfigParser.load_config_files(config_files(config))["segmenter"]
    for name, kind in GROUPS.items():
        written = {k: v for k, v in asdict(kind()).items() if k != "batch_size"}
        assert parsed[name] == written, name
    assert parsed["candidates"]["dense_rule"] == "relative"
    assert preset_changes("quickstart") == {"candidates": {"dense_rule": "fixed"}}


def test_settings_name_every_rule_and_rebuild_the_segmenter():
    """``settings()`` holds every argument that decides a mask, under the constructor's names and values: a segmenter
    built from it reports the same settings (a rule recorded wrong, or one left out, would not round-trip)."""
    chosen = {
        "mode": "two_nodule",
        "threshold": 0.3,
        "intensity_range": [-1100.0, 300.0],
        "precision": "bfloat16",
        "confirm_margin": 0.5,
        "scope": {"sigma": 2.0, "threshold": 0.25, "min_distance": 5, "multi_gap_min_peak": 0.4, "n_nodules": 3},
        "icm": {"phases": 3, "beta": 0.5, "max_sweeps": 7},
        "candidates": {
            "dense_rule": "fixed",
            "dense_hu": -650.0,
            "dense_margin_hu": 120.0,
            "min_area_mm2": 5.0,
            "icm_in_scope": False,
            "trim_partial_volume": False,
            "trim_iterations": 2,
            "side_tissue_px": 2.5,
            "split_mm": 1.5,
            "drop_thin": False,
            "split_vessel_mm": 2.5,
        },
        "screening": {"crop": False, "batch_size": 4, "reduced_precision": True},
    }
    settings = WeaklySupervisedSegmenter(**chosen).settings()
    assert settings == chosen and json.loads(json.dumps(settings)) == settings
    not_rules = {"lung_mask_fn", "multi_gap_network", "spacing", "amp", "checkpoint"}
    assert set(inspect.signature(WeaklySupervisedSegmenter).parameters) - not_rules == set(settings)
    assert WeaklySupervisedSegmenter(**settings).settings() == settings
    with pytest.raises(ValueError, match="unknown candidates settings"):
        WeaklySupervisedSegmenter(candidates={"dense_cut": -600.0})


@pytest.mark.parametrize("mode", ["coarse", "fine", "multi_gap", "multi_gap_coarse", "two_nodule"])
def test_config_modes_write_every_file(tiny_bundle, tmp_path, bundle_root, mode):
    out = tmp_path / mode
    run(
        "run",
        config_file=config_files(SLICE_INFERENCE),
        bundle_root=str(bundle_root),
        **overrides(tiny_bundle, out, mode=mode),
    )
    records = check_outputs(tiny_bundle, out, STEMS)
    settings = json.loads((out / "settings.json").read_text())  # what made these masks, beside them
    assert settings["segmenter"]["mode"] == mode and settings["segmenter"]["candidates"]["dense_rule"] == "relative"
    assert settings["bundle_version"] == json.loads((bundle_root / "configs" / "metadata.json").read_text())["version"]
    segmented = [r for r in records if r["status"] == "segmented"]
    assert segmented, [r["status"] for r in records]  # the fc bias makes most slices positive: the pipeline ran
    for r in segmented:
        assert r["chosen"] and r["mask_area_mm2"] > 0
        chosen_area = sum(r["candidates"][i]["area_mm2"] for i in r["chosen"])
        assert r["mask_area_mm2"] == pytest.approx(chosen_area, rel=1e-6)  # the mask is the chosen candidates
        scores = [c["rnam_score"] for c in r["candidates"]]
        if mode in ("coarse", "multi_gap_coarse"):  # the union of the candidates in C, no R-NAM
            assert r["chosen"] == list(range(len(r["candidates"]))) and all(x is None for x in scores)
        elif mode in ("fine", "multi_gap"):  # one scope, and the candidate R-NAM scores highest
            assert len(r["scope_boxes"]) == 1 and r["chosen"] == [int(np.argmax(scores))]
        else:  # two_nodule: one R-NAM choice per scope, two scopes at most
            assert 1 <= len(r["chosen"]) <= len(r["scope_boxes"]) <= 2 and all(x is not None for x in scores)
        assert (r["base_scope_box"] is not None) == (mode in ("multi_gap", "multi_gap_coarse"))


def test_config_threshold_and_input_dir(tiny_bundle, tmp_path, bundle_root):
    """Every slice negative, slices from a folder."""
    out = tmp_path / "neg"
    run(
        "run",
        config_file=config_files(SLICE_INFERENCE),
        bundle_root=str(bundle_root),
        **overrides(tiny_bundle, out, threshold=1.01, input_dir=str(tiny_bundle / "images")),
    )
    records = check_outputs(tiny_bundle, out, STEMS, panels=False)
    assert all(r["status"] == "negative" for r in records)


def _fails_saying(pattern: str, **kwargs) -> None:
    """The bundle run fails with ``pattern`` in its error or in an error it was raised from (MONAI's config
    parser re-raises what a component raised as a RuntimeError naming the component)."""
    with pytest.raises(Exception) as caught:
        run("run", **kwargs)
    error, messages = caught.value, []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(re.search(pattern, m) for m in messages), messages


def test_slices_or_settings_other_than_the_model_s_are_refused(tiny_bundle, tmp_path, bundle_root):
    """A model trained on 64 px slices is not fed 80 px ones (it would call every slice clean without a word)."""
    config = {"config_file": config_files(SLICE_INFERENCE), "bundle_root": str(bundle_root)}
    _fails_saying(
        r"model\.pt was trained with image_size=64, but image_size=80 was given",
        **config,
        **overrides(tiny_bundle, tmp_path, image_size=80),
    )
    folder = tmp_path / "big"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.full((80, 80), -800, np.int16), np.diag([SPACING, SPACING, 1, 1])), folder / "b.nii.gz")
    _fails_saying(
        "b.nii.gz: a 80 x 80 slice, but the model was trained on 64 x 64 slices",
        **config,
        **overrides(tiny_bundle, tmp_path, input_dir=str(folder)),
    )
    nib.save(nib.Nifti1Image(np.full((64, 64), -800, np.int16), np.diag([0.7, 0.7, 1, 1])), folder / "b.nii.gz")
    _fails_saying(
        r"pixel spacing \[0\.69.* mm lies outside the model's training range \[1\.6, 1\.6\] mm",
        **config,
        **overrides(tiny_bundle, tmp_path, input_dir=str(folder)),
    )


def test_cli_from_repo_root(tiny_bundle, tmp_path, bundle_root):
    out = tmp_path / "cli"
    args = [f"--{k}={v}" for k, v in overrides(tiny_bundle, out, max_panels=1).items()]
    configs = "['bundle/configs/inference.json','bundle/configs/inference_slices.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
    cmd += ["--bundle_root", "bundle", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=bundle_root.parent, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    check_outputs(tiny_bundle, out, STEMS, panels=False)
    assert len(list((out / "panels").glob("*.png"))) == 1


def test_monai_label_style_inference(tiny_bundle, bundle_root):
    """What MONAI Label's BundleInferTask calls, on the slices' config: network_def, preprocessing, inferer (its named
    outputs taken apart by decollate_batch), postprocessing. The probability is the network's own on the slice, and the
    mask is the chosen candidates, not empty."""
    parser = ConfigParser()
    parser.read_config(config_files(SLICE_INFERENCE))
    parser.update({"bundle_root": str(bundle_root), "ckpt_path": str(tiny_bundle / "model.pt"), "use_lung_mask": False})
    network = parser.get_parsed_content("network_def")
    checkpoint = torch.load(tiny_bundle / "model.pt", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))  # what MONAI Label does
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(tiny_bundle / "images" / "S0_10.nii.gz")})
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(data["image"][None], network)
        expected = float(torch.softmax(network(data["image"][None].as_tensor()), dim=1)[0, 1])
    data["pred"] = decollate_batch(pred)[0]
    data = parser.get_parsed_content("postprocessing")(data)
    assert data["mask"].shape == (1, SIZE, SIZE)
    result = json.loads(data["record"])
    assert result["probability"] == pytest.approx(expected, abs=1e-6)
    assert result["status"] == "segmented" and result["chosen"]  # the fc bias calls the slice "nodule"
    mask = data["mask"][0].numpy() > 0
    chosen = np.isin(data["candidates"][0].numpy(), [i + 1 for i in result["chosen"]])
    assert mask.any() and np.array_equal(mask, chosen)
    assert mask.sum() * SPACING**2 == pytest.approx(result["mask_area_mm2"])
    json.dumps(result)


def test_missing_inputs_give_clear_errors(tmp_path):
    from scripts.data.dataset import inference_datalist

    with pytest.raises(FileNotFoundError, match="datalist"):
        inference_datalist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="input_dir"):
        inference_datalist(input_dir=str(tmp_path / "nowhere"))
    (tmp_path / "datalist.json").write_text(json.dumps({"test": []}))
    with pytest.raises(ValueError, match="validation"):
        inference_datalist(str(tmp_path), split="validation")
