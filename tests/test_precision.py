"""Reduced-precision CPU inference (issue #30): int8 and bfloat16 give float32's answer, on a small model, a tiny
synthetic scan and the real LIDC-IDRI-0001; a CPU without the instructions runs float32 and says so; an int8 model
made from other weights is refused."""

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scipy import ndimage
from scripts.data.prepare import scans
from scripts.networks import quantize, runtime
from scripts.networks.checkpoint import TrainingRecord, resolve_settings
from scripts.networks.gap_classifier import GAPClassifier
from scripts.networks.precision import cpu_has_bf16, cpu_has_int8_dot
from scripts.pipeline.screen import rnam_scores
from scripts.pipeline.segmenter import CONFIRM_MARGINS, WeaklySupervisedSegmenter

SIZE = 64
REDUCED = ("bfloat16", "int8")
needs_instructions = pytest.mark.skipif(
    not (cpu_has_bf16() and cpu_has_int8_dot()), reason="this CPU lacks bfloat16 or int8 dot products: float32 only"
)


def _checkpoint(folder, bundle_root, size=SIZE, spacing=4.5):
    """A small seeded 1-GAP classifier saved with its record; the model is returned too."""
    torch.manual_seed(0)
    model = GAPClassifier(width=0.125, head_channels=128).eval()
    record = TrainingRecord(model, [{"image": "", "spacing_mm": [spacing, spacing]}], size, (-1000, 400), bundle_root)
    torch.save({"model": model.state_dict(), "config": record.state_dict()}, folder / "model.pt")
    return folder / "model.pt", model


@pytest.fixture(scope="module")
def synthetic(bundle_root, tmp_path_factory):
    """A tiny synthetic scan and a small classifier quantised by the command, calibrated on the scan's slices (the
    scan-only user's way)."""
    folder = tmp_path_factory.mktemp("precision")
    scans(str(folder), cases=1, seed=3, size=SIZE, n_slices=32)
    checkpoint, model = _checkpoint(folder, bundle_root)
    quantize.main(["--ckpt", str(checkpoint), "--scans", str(folder / "SYN-0000.nii.gz"), "--count", "8"])
    return folder, checkpoint, model


def _nam_agreement(reference: torch.Tensor, other: torch.Tensor, stride: int) -> tuple[float, float]:
    """The least Pearson correlation of two batches of NAMs ``(B, 1, H, W)``, and the share of slices whose peaks
    lie within ``stride`` pixels of each other."""
    correlations, near = [], []
    for a, b in zip(reference[:, 0].numpy(), other[:, 0].numpy()):
        correlations.append(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        peaks = [np.unravel_index(np.argmax(m), m.shape) for m in (a, b)]
        near.append(np.abs(np.subtract(*peaks)).max() <= stride)
    return float(min(correlations)), float(np.mean(near))


@needs_instructions
@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_paths_give_float32_logits_and_nams(synthetic, precision):
    """On every lung slice of the scan: probabilities within 0.02, NAMs correlated >= 0.98 with their peaks within a
    head cell on >= 95 % of slices (90 % in int8)."""
    folder, checkpoint, model = synthetic
    network = runtime.inference_network(model, precision, checkpoint)
    assert type(network) is {"bfloat16": runtime.BFloat16Classifier, "int8": runtime.Int8Classifier}[precision]
    slices = torch.as_tensor(quantize.scan_slices([folder / "SYN-0000.nii.gz"], checkpoint, count=64))
    assert len(slices) >= 12
    with torch.no_grad():
        logits, nams = model.forward_with_nam(slices)
        other_logits, other_nams = network.forward_with_nam(slices)
    probability = torch.softmax(logits, 1)[:, 1]
    assert (probability - torch.softmax(other_logits, 1)[:, 1]).abs().max() <= 0.02
    correlation, peaks = _nam_agreement(nams, other_nams, model.nam_stride)
    # the untrained model's NAM is flat, so its peak moves where two places are nearly equal: int8 measured 30 of 32
    # slices (correlation 0.998); the 0.8.2 recipe kept all 32 at correlation 0.995 but moved the peak on more of a
    # trained model's nodule slices (docs/precision.md)
    assert correlation >= 0.98 and peaks >= {"bfloat16": 0.95, "int8": 0.9}[precision], (correlation, peaks)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16: the bfloat16 path runs float32")
def test_bfloat16_path_keeps_conv1_1_and_the_nam_sum_in_float32():
    """The two float32 ends of the bfloat16 path (docs/precision.md): an input change below bfloat16's resolution
    still changes the output (conv1_1 reads the input in float32), and the NAM is not bfloat16-valued (its weighted
    sum and upsampling run in float32). Autocasting the whole forward fails both."""
    torch.manual_seed(0)
    model = GAPClassifier(width=0.125, head_channels=128, gap_levels=2, batch_norm=True).eval()
    network = runtime.inference_network(model, "bfloat16")
    x = torch.randint(64, 128, (2, 1, 64, 64)) / 128.0  # exact in bfloat16; a step of 2**-8 above 0.5
    nudged = x + 2e-4  # rounds back to x in bfloat16, not in float32
    assert torch.equal(nudged.bfloat16().float(), x)
    with torch.no_grad():
        logits, nam = network.forward_with_nam(x)
        nudged_logits, nudged_nam = network.forward_with_nam(nudged)
    assert logits.dtype == nam.dtype == torch.float32
    assert not torch.equal(nam, nudged_nam) and not torch.equal(logits, nudged_logits)
    representable = (nam == nam.bfloat16().float()).float().mean()
    assert representable < 0.5, representable


def _rnam_choices(network, slices, nams, precision_nams):
    """R-NAM's choice among three discs (on the float32 NAM's peak and beside it, in a scope around it) per slice,
    ``network`` screening against its own NAMs ``precision_nams``."""
    size = slices.shape[-1]
    rows, cols = np.mgrid[:size, :size]
    choices = []
    for image, nam, own in zip(slices, nams[:, 0].numpy(), precision_nams[:, 0].numpy()):
        peak = np.unravel_index(np.argmax(nam), nam.shape)
        scope = (np.abs(rows - peak[0]) <= 12) & (np.abs(cols - peak[1]) <= 12)
        centres = [peak, (peak[0] + 6, peak[1] - 6), (peak[0] - 6, peak[1] + 6)]
        masks = np.stack([(rows - r) ** 2 + (cols - c) ** 2 <= 9 for r, c in centres]) & scope
        choices.append(int(np.argmax(rnam_scores(network, image, own, scope, masks, 0.2))))
    return np.array(choices)


@needs_instructions
def test_rnam_in_reduced_precision_against_float32(synthetic):
    """What ``screening.reduced_precision`` would give on an untrained small model, where the candidates' scores are
    close: bfloat16 picks float32's candidate on >= 90 % of slices; int8 is noisier (measured 65 %), which is why int8
    screens in float32. The float32 path without a reference NAM (the segmenter's case when the slice was
    classified in int8) gives the float32 scores."""
    folder, checkpoint, model = synthetic
    slices = torch.as_tensor(quantize.scan_slices([folder / "SYN-0000.nii.gz"], checkpoint, count=64))
    with torch.no_grad():
        nams = model.nam(slices)
        bf16 = runtime.inference_network(model, "bfloat16", checkpoint)
        choices = {
            "float32": _rnam_choices(model, slices, nams, nams),
            "bfloat16": _rnam_choices(bf16, slices, nams, bf16.nam(slices)),
        }
    assert (choices["bfloat16"] == choices["float32"]).mean() >= 0.9, choices
    rows, cols = np.mgrid[:SIZE, :SIZE]
    scope, masks = (rows < 40) & (cols < 40), np.stack([(rows - 20) ** 2 + (cols - c) ** 2 <= 16 for c in (12, 28)])
    given = rnam_scores(model, slices[0], nams[0, 0].numpy(), scope, masks, 0.2, incremental=False)
    computed = rnam_scores(model, slices[0], None, scope, masks, 0.2, incremental=False)
    np.testing.assert_allclose(computed, given, rtol=1e-3)  # float32 sums in another order
    assert given.max() > 0


@needs_instructions
@needs_instructions
@pytest.mark.parametrize("precision", REDUCED)
def test_confirmation_gives_float32_on_the_slices_at_or_above_confirm_from(synthetic, precision):
    """``confirm_margin``: the slices the reduced precision puts at ``confirm_from`` or above keep float32's
    probability and NAM (as classified alone in float32), the others the reduced precision's; the records say which."""
    folder, checkpoint, model = synthetic
    slices = torch.as_tensor(quantize.scan_slices([folder / "SYN-0000.nii.gz"], checkpoint, count=16))
    raw = WeaklySupervisedSegmenter(precision=precision, checkpoint=checkpoint, confirm_margin=None)
    reduced = raw.classify(slices, model)
    with torch.no_grad():
        logits, nams = model.forward_with_nam(slices)
    float32 = torch.softmax(logits, 1)[:, 1].numpy()
    assert not reduced.confirmed.any() and np.abs(reduced.probability - float32).max() > 1e-5  # they differ
    split = float(np.median(reduced.probability))  # half the slices above, half below
    segmenter = WeaklySupervisedSegmenter(
        precision=precision, checkpoint=checkpoint, confirm_margin=0.0, threshold=split
    )
    assert segmenter.confirm_from == pytest.approx(split)
    found = segmenter.classify(slices, model)
    confirmed = reduced.probability >= segmenter.confirm_from
    assert 0 < confirmed.sum() < len(slices)
    np.testing.assert_array_equal(found.confirmed, confirmed)
    np.testing.assert_allclose(found.probability[confirmed], float32[confirmed], atol=1e-6)
    np.testing.assert_allclose(found.nam[confirmed], nams[confirmed, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(found.probability[~confirmed], reduced.probability[~confirmed])
    np.testing.assert_array_equal(found.nam[~confirmed], reduced.nam[~confirmed])
    records = [json.loads(r) for r in segmenter(slices, model)["record"]]
    assert [r["precision"] for r in records] == ["float32" if c else precision for c in confirmed]
    # the margin is in logits below the threshold's: 0.5 (logit 0) less ln 3 is a probability of 1/4
    assert WeaklySupervisedSegmenter(threshold=0.5, confirm_margin=np.log(3)).confirm_from == pytest.approx(0.25)
    assert WeaklySupervisedSegmenter(threshold=0.0, precision="int8").confirm_from == pytest.approx(0.0)
    with pytest.raises(ValueError, match="confirm_margin"):
        WeaklySupervisedSegmenter(confirm_margin=-1.0)


def test_confirm_margin_per_precision():
    """One margin for every precision, or one each (the default: int8 2, bfloat16 1, docs/precision.md); a precision
    the mapping leaves out, or None, is not confirmed; unknown precisions and negative margins are refused."""
    logit = {"bfloat16": 1.0, "int8": 2.0}
    for precision, margin in logit.items():
        assert WeaklySupervisedSegmenter(threshold=0.5, precision=precision).confirm_from == pytest.approx(
            1.0 / (1.0 + np.exp(margin))
        )
        assert WeaklySupervisedSegmenter(threshold=0.5, precision=precision, confirm_margin=0.0).confirm_from == 0.5
    only = WeaklySupervisedSegmenter(threshold=0.5, precision="bfloat16", confirm_margin={"int8": 2.0})
    assert only.margin is None and only.confirm_from is None
    assert WeaklySupervisedSegmenter(precision="int8", confirm_margin=None).confirm_from is None
    with pytest.raises(ValueError, match="confirm_margin"):
        WeaklySupervisedSegmenter(confirm_margin={"int4": 1.0})
    with pytest.raises(ValueError, match="confirm_margin"):
        WeaklySupervisedSegmenter(confirm_margin={"int8": -0.5})


def test_inference_config_gives_each_precision_its_margin(bundle_root):
    """``configs/inference.json``'s ``confirm_margin`` is ``CONFIRM_MARGINS``, and one number on the command line sets
    every precision's."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "precision": "int8"})
    assert parser.get_parsed_content("segmenter").confirm_margin == CONFIRM_MARGINS
    parser.update({"confirm_margin": 1.5, "precision": "bfloat16"})
    assert parser.get_parsed_content("segmenter", lazy=False).margin == 1.5


@needs_instructions
def test_inference_config_confirmed_int8_gives_float32_nodules_on_a_real_scan(bundle_root, lidc_root, tmp_path):
    """LIDC-IDRI-0001 as DICOM through ``configs/inference.json`` in int8 with the config's float32 confirmation
    (``confirm_margin`` 1), at a threshold that calls a fifth of its slices "nodule": float32's nodules, mask and
    probabilities. An untrained model puts every slice within a few thousandths of 0.5, inside the margin, so every
    slice is confirmed here (int8 alone moves them: ``test_int8_on_a_real_scan_gives_the_same_nodules``)."""
    scan = lidc_root / "LIDC-IDRI-0001" / "ct"
    checkpoint, _ = _checkpoint(tmp_path, bundle_root, size=160, spacing=2.25)
    quantize.quantize_checkpoint(checkpoint, quantize.scan_slices([scan], checkpoint, count=16), "LIDC-IDRI-0001")
    everything = _run(bundle_root, tmp_path, checkpoint, "float32", scan, tmp_path / "all")
    probabilities = [s["probability"] for s in everything[0]["slices"] if s["probability"] is not None]
    threshold = float(np.quantile(probabilities, 0.8))
    reference = _run(bundle_root, tmp_path, checkpoint, "float32", scan, tmp_path / "float32", threshold=threshold)
    confirmed = _run(bundle_root, tmp_path, checkpoint, "int8", scan, tmp_path / "int8", 1.0, threshold)
    assert confirmed[0]["segmenter"]["confirm_margin"] == 1.0
    dice, found, probability = agreement(reference, confirmed)
    assert reference[1].any() and dice == 1.0 and found == 1.0 and probability <= 1e-6, (dice, found, probability)


@needs_instructions
def test_shipped_model_in_int8_confirmed_gives_float32s_probabilities_on_a_real_scan(bundle_root, lidc_root, tmp_path):
    """The shipped model quantised on lung slices of LIDC-IDRI-0001, run on LIDC-IDRI-0003 through
    ``configs/inference.json`` in int8 with the config's ``confirm_margin`` at the model's threshold: issue #30's
    "same answer" against float32 (every nodule found by the other, mask Dice >= 0.95, probabilities within 0.02).
    With a margin of 1.0 the clean slices just below the line kept int8's error here (0.058, docs/precision.md)."""
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(bundle_root / "models" / "model.pt", checkpoint)  # its int8 model is written beside it
    calibration = quantize.scan_slices([lidc_root / "LIDC-IDRI-0001" / "ct"], checkpoint, count=16)
    quantize.quantize_checkpoint(checkpoint, calibration, "LIDC-IDRI-0001")
    margin = ConfigParser.load_config_file(str(bundle_root / "configs" / "inference.json"))["confirm_margin"]
    threshold = resolve_settings(checkpoint)["threshold"]
    scan = lidc_root / "LIDC-IDRI-0003" / "ct"
    reference = _run(bundle_root, tmp_path, checkpoint, "float32", scan, tmp_path / "float32", threshold=threshold)
    confirmed = _run(bundle_root, tmp_path, checkpoint, "int8", scan, tmp_path / "int8", margin, threshold)
    assert confirmed[0]["segmenter"]["precision"] == "int8"
    dice, found, probability = agreement(reference, confirmed)
    assert reference[1].any() and dice >= 0.95 and found == 1.0 and probability <= 0.02, (dice, found, probability)


def test_rnam_screens_in_bfloat16_only_after_bfloat16_classification(synthetic):
    """``screening.reduced_precision``: bfloat16 screens in bfloat16; int8 (its pick held best in float32) and
    float32 screen in float32, as does everything with the setting off."""
    _, checkpoint, model = synthetic
    for precision, reduced, screener in [
        ("bfloat16", True, runtime.BFloat16Classifier),
        ("bfloat16", False, GAPClassifier),
        ("int8", True, GAPClassifier),
        ("float32", True, GAPClassifier),
    ]:
        segmenter = WeaklySupervisedSegmenter(
            precision=precision, checkpoint=checkpoint, screening={"reduced_precision": reduced}
        )
        assert type(segmenter.screening_network(model)) is screener, (precision, reduced)


def test_inference_builds_the_classifier_channels_last(bundle_root, tmp_path):
    """``configs/inference.json``'s classifier is channels-last (the CPU's convolutions run it 1.5x faster at width 1,
    docs/precision.md) and holds the checkpoint's weights."""
    checkpoint, model = _checkpoint(tmp_path, bundle_root)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "ckpt_path": str(checkpoint), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    convolutions = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert not convolutions[1].weight.is_contiguous()  # several input channels: the two layouts differ
    for name, value in model.state_dict().items():
        assert torch.equal(network.state_dict()[name], value), name


def _run(bundle_root, folder, checkpoint, precision, scan, out, confirm_margin=None, threshold=0.0):
    """``configs/inference.json`` on ``scan`` with ``precision``, fine mode, every lung slice segmented unless a
    ``threshold`` is given; ``confirm_margin`` None: the reduced precision's own answer (no float32
    confirmation). Returns the scan's nodule table and its mask (array and affine)."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "ckpt_path": str(checkpoint),
            "input": str(scan),
            "output_dir": str(out),
            "precision": precision,
            "confirm_margin": confirm_margin,
            "mode": "fine",
            "threshold": threshold,  # 0: every slice with lung goes through scope, ICM and R-NAM
            "min_height_ratio": 0.0,  # the blobs of every slice are compared, flat or not
            "overview": False,
            "dicom_seg": False,
        }
    )
    name = parser.get_parsed_content("evaluator").run()["done"][0]["name"]
    table = json.loads((out / name / f"{name}_nodules.json").read_text())
    mask = nib.load(out / name / f"{name}_mask.nii.gz")
    return table, np.asarray(mask.dataobj) > 0, mask.affine


def agreement(reference, other):
    """``(Dice of the masks, share of the nodules of each found by the other, largest slice probability change)``
    after checking that the masks lie on one grid and the same slices were classified."""
    (table, mask, affine), (other_table, other_mask, other_affine) = reference, other
    assert mask.shape == other_mask.shape and np.allclose(affine, other_affine)
    dice = 2 * (mask & other_mask).sum() / max(mask.sum() + other_mask.sum(), 1)
    found = []
    for a, b in ((mask, other_mask), (other_mask, mask)):
        labels, count = ndimage.label(a)
        found += [b[labels == j].any() for j in range(1, count + 1)]
    pairs = [(s["probability"], t["probability"]) for s, t in zip(table["slices"], other_table["slices"])]
    assert all((p is None) == (q is None) for p, q in pairs) and found
    return float(dice), float(np.mean(found)), max(abs(p - q) for p, q in pairs if p is not None)


@needs_instructions
def test_inference_config_in_each_precision(bundle_root, synthetic, tmp_path):
    """The whole-scan config with each precision: the mask on the scan's grid, the precision recorded in the table,
    and the same nodules as float32."""
    folder, checkpoint, _ = synthetic
    scan = folder / "SYN-0000.nii.gz"
    reference = _run(bundle_root, folder, checkpoint, "float32", scan, tmp_path / "float32")
    image = nib.load(scan)
    assert reference[1].shape == image.shape and np.allclose(reference[2], image.affine, atol=1e-4)
    for precision in REDUCED:
        other = _run(bundle_root, folder, checkpoint, precision, scan, tmp_path / precision)
        assert other[0]["segmenter"]["precision"] == precision
        dice, found, probability = agreement(reference, other)
        print(
            f"{precision}: Dice {dice:.3f}, nodules found by both {found:.3f}, probabilities within {probability:.4f}"
        )
        # an untrained model with every slice segmented (about 200 "nodules" of a flat NAM's watershed) is a harder
        # case than the trained one on real scans (Dice >= 0.95, every nodule): int8 measured Dice 0.951 and
        # 98.4 % of the blobs found by both, bfloat16 1.0 and 100 %
        assert dice >= 0.9 and found >= 0.95 and probability <= 0.02


@pytest.mark.parametrize(
    "precision, check, message",
    [("bfloat16", "cpu_has_bf16", "no native bfloat16"), ("int8", "cpu_has_int8_dot", "no int8 dot-product")],
)
def test_without_the_instructions_float32_with_a_message(synthetic, monkeypatch, caplog, precision, check, message):
    """A CPU without the instructions (simulated) gets the float32 network itself and a warning naming why."""
    _, checkpoint, model = synthetic
    monkeypatch.setattr(runtime, check, lambda: False)
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert runtime.inference_network(model, precision, checkpoint) is model
    assert message in caplog.text and f"precision {precision}" in caplog.text and "float32" in caplog.text
    segmenter = WeaklySupervisedSegmenter(precision=precision, checkpoint=str(checkpoint))
    assert segmenter.in_precision(model) is model  # the config's path falls back alike


def test_settings_that_cannot_run_are_refused():
    """An unknown precision, a reduced one for a network that is not the classifier, and int8 without the checkpoint
    beside which its model lies are errors on any CPU (they do not fall back)."""
    network = GAPClassifier(width=1 / 16, head_channels=32)
    with pytest.raises(ValueError, match="precision must be one of .*'float16'"):
        runtime.inference_network(network, "float16")
    with pytest.raises(ValueError, match="precision bfloat16 needs a GAPClassifier, got Conv2d"):
        runtime.inference_network(torch.nn.Conv2d(1, 1, 3), "bfloat16")
    with pytest.raises(ValueError, match="precision int8 needs the checkpoint"):
        runtime.inference_network(network, "int8")


def test_int8_model_of_other_weights_is_refused(synthetic, tmp_path):
    """A checkpoint changed after quantisation, one never quantised, or a model file that is not the recorded one, is
    refused with the files named and the command that makes the model again."""
    folder, checkpoint, model = synthetic
    copy = tmp_path / "model.pt"
    shutil.copy(checkpoint, copy)
    with pytest.raises(quantize.StaleModelError, match="model_int8.onnx and its record .*python -m scripts.networks"):
        runtime.inference_network(model, "int8", copy)
    for made in quantize.int8_paths(checkpoint):
        shutil.copy(made, tmp_path / made.name)
    assert quantize.int8_model(copy) == tmp_path / "model_int8.onnx"  # the same weights: accepted
    state = torch.load(copy, weights_only=True)
    state["model"]["fc.bias"] += 0.1  # "retrained"
    torch.save(state, copy)
    with pytest.raises(quantize.StaleModelError) as refused:
        runtime.inference_network(model, "int8", copy)
    text = str(refused.value)
    assert "stale" in text and str(tmp_path / "model_int8.onnx") in text and str(tmp_path / "model_int8.json") in text
    assert str(copy) in text and f"python -m scripts.networks.quantize --ckpt {copy}" in text
    shutil.copy(checkpoint, copy)  # the weights it was made from again, but another model file beside them
    (tmp_path / "model_int8.onnx").write_bytes(b"another model")
    with pytest.raises(quantize.StaleModelError, match="not the model its record"):
        quantize.int8_model(copy)
    (tmp_path / "model_int8.onnx").write_bytes((folder / "model_int8.onnx").read_bytes())
    older = json.loads((folder / "model_int8.json").read_text()) | {"recipe": "static QDQ; Conv and MaxPool"}
    (tmp_path / "model_int8.json").write_text(json.dumps(older))
    with pytest.raises(quantize.StaleModelError, match="older recipe .*python -m scripts.networks.quantize"):
        quantize.int8_model(copy)
    record = json.loads((folder / "model_int8.json").read_text())
    assert record["recipe"] == quantize.RECIPE
    assert record["calibration"]["slices"] == 8 and record["calibration"]["source"].endswith("SYN-0000.nii.gz")
    assert record["checkpoint_sha256"] == quantize.sha256(checkpoint) and record["onnxruntime"]
    assert record["model_sha256"] == quantize.sha256(folder / "model_int8.onnx")


def test_int8_model_quantises_each_activation_once_and_keeps_conv1_1_float(synthetic):
    """The recipe of docs/precision.md, read from the int8 model's graph: every convolution but conv1_1 has int8
    weights, conv1_1 and the input stay float32, and every quantised activation is on a ReLU's range, from 0 (zero
    point 0): no convolution output quantised on its own range, negatives included, before its ReLU."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(quantize.int8_paths(synthetic[1])[0])).graph
    initializers = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    made_by = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 14  # conv1_1 ... conv5_3 and the head's
    assert convs[0].input[1] in initializers and initializers[convs[0].input[1]].dtype == np.float32  # conv1_1
    for conv in convs[1:]:
        assert made_by[conv.input[1]].op_type == "DequantizeLinear"
        assert initializers[made_by[conv.input[1]].input[0]].dtype == np.int8
    activations = [
        node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in initializers
    ]
    assert activations and "image" not in {node.input[0] for node in activations}
    assert all(initializers[node.input[2]] == 0 for node in activations), [node.input[0] for node in activations]


@needs_instructions
def test_int8_on_a_real_scan_gives_the_same_nodules(bundle_root, lidc_root, tmp_path):
    """LIDC-IDRI-0001 as DICOM with a small classifier at 160 px (2.25 mm), int8 calibrated on the scan's slices,
    every lung slice segmented in fine mode: nearly the same nodules as float32, probabilities within 0.02."""
    scan = lidc_root / "LIDC-IDRI-0001" / "ct"
    checkpoint, _ = _checkpoint(tmp_path, bundle_root, size=160, spacing=2.25)
    quantize.quantize_checkpoint(checkpoint, quantize.scan_slices([scan], checkpoint, count=16), "LIDC-IDRI-0001")
    reference = _run(bundle_root, tmp_path, checkpoint, "float32", scan, tmp_path / "float32")
    dice, found, probability = agreement(
        reference, _run(bundle_root, tmp_path, checkpoint, "int8", scan, tmp_path / "int8")
    )
    print(f"LIDC-IDRI-0001 int8: Dice {dice:.3f}, nodules found by both {found:.3f}, probabilities {probability:.4f}")
    # an untrained model, every lung slice segmented: the scope is the watershed of a flat NAM, which int8's rounding
    # moves more often than a trained model's peaked one, and which a change of the input in the fifth decimal moves
    # too. Measured: Dice 0.940, 84 % of the blobs found by both, probabilities within 0.001 (0.8.3, the scan
    # resampled on a float64 grid: 0.949 and 92 %; the 0.95 and "every nodule" are for a trained model, and
    # the float32 confirmation gives float32's nodules: test_inference_config_confirmed_int8_...)
    assert dice >= 0.85 and found >= 0.8 and probability <= 0.02
