"""Training, resuming, multi-process training and classification through the bundle's MONAI configs."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import pytest
import torch
from dataset_factory import write_tiny_dataset
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from scripts.evaluation.localisation import localise
from scripts.evaluation.metrics import classification_summary
from scripts.integration.config_runs import CLASSIFY, config_files
from scripts.networks.checkpoint import load_checkpoint
from scripts.networks.gap_classifier import GAPClassifier
from scripts.training.engine import last_checkpoint
from scripts.training.handlers import threshold_at_specificity
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trained_classifier import nodule_logit, nodule_probability, prepared_slice, trained_classifier

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
EPOCHS = 8
ITERATIONS_PER_EPOCH = 4  # 32 training slices, batch 8
TINY = {"width": 0.0625, "head_channels": 256, "image_size": 64, "batch_size": 8, "num_workers": 0}


def _workflow(config_file, out: Path, dataset: Path, workflow_type=None, **override) -> ConfigWorkflow:
    files = [str(f) for f in config_file] if isinstance(config_file, list) else str(config_file)
    settings = {
        "bundle_root": str(REPO / "bundle"),
        "dataset_dir": str(dataset),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "logs"),
        **TINY,
        **override,
    }
    return ConfigWorkflow(config_file=files, workflow_type=workflow_type, run_id="training", **settings)


def _train(out: Path, dataset: Path, **override) -> dict:
    """Run training in this process; return per-epoch train losses and validation metrics, and the engines."""
    workflow = _workflow(CONFIGS / "train.json", out, dataset, **override)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    history: dict = {"loss": [], "val": [], "trainer": trainer}

    def record_loss(engine):
        if engine.state.iteration % ITERATIONS_PER_EPOCH == 1:
            history["loss"].append([])
        history["loss"][-1].append(float(engine.state.output[0]["loss"]))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record_loss)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: history["val"].append(dict(e.state.metrics)))
    workflow.run()
    workflow.finalize()
    return history


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_subjects=6, size=64, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("trained")
    return out, _train(out, dataset, max_epochs=EPOCHS)


def test_training_lowers_loss_and_writes_outputs(trained, dataset):
    out, history = trained
    assert len(history["loss"]) == EPOCHS and all(len(e) == ITERATIONS_PER_EPOCH for e in history["loss"])
    assert len(history["val"]) == EPOCHS
    assert set(history["val"][0]) == {"val_accuracy", "val_auc", "val_loss", "val_threshold"}
    first, last = history["val"][0]["val_loss"], history["val"][-1]["val_loss"]
    assert last < first, (first, last)
    assert np.mean(history["loss"][-1]) < np.mean(history["loss"][0])
    models = out / "models"
    assert (models / "model.pt").is_file()
    assert Path(last_checkpoint(models)).name == f"last_checkpoint_epoch={EPOCHS}.pt"
    state = torch.load(models / "model.pt", weights_only=True)
    assert "features.0.weight" in state["model"]  # the weights, and the record of what they were trained on
    record = state["config"]
    assert record["width"] == TINY["width"] and record["head_channels"] == TINY["head_channels"]
    assert record["image_size"] == 64 and record["hu_window"] == [-1000.0, 400.0]
    assert len(record["pixel_spacing_mm"]) == 2 and record["bundle_version"] != "unknown"
    model = load_checkpoint(
        GAPClassifier(width=TINY["width"], head_channels=TINY["head_channels"]), models / "model.pt"
    )
    # the decision threshold recorded with the weights: 90 % of the validation split's clean slices below it
    items = json.loads((dataset / "datalist.json").read_text())["validation"]
    probability = np.array([nodule_probability(model.eval(), prepared_slice(dataset / i["image"])) for i in items])
    clean = probability[np.array([i["class"] for i in items]) == 0]
    assert record["threshold"] == pytest.approx(threshold_at_specificity(probability, [i["class"] for i in items], 0.9))
    assert np.mean(clean >= record["threshold"]) <= 0.1 < np.mean(clean >= record["threshold"] * (1 - 1e-6))
    assert record["threshold_rule"] == "validation specificity 0.9"
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train_loss", "val_accuracy", "val_auc", "val_loss", "lr/group0", "lr/group1"} <= scalars
    assert len(accumulator.Images("validation/nam")) == EPOCHS
    lrs = [e.value for e in accumulator.Scalars("lr/group0")]
    heads = [e.value for e in accumulator.Scalars("lr/group1")]
    np.testing.assert_allclose(lrs, [1e-2 * 0.99**i for i in range(EPOCHS)], rtol=1e-5)
    np.testing.assert_allclose(heads, [1e-1 * 0.99**i for i in range(EPOCHS)], rtol=1e-5)


def test_frozen_layers_run_once_and_stay_as_they_were(trained, dataset, tmp_path):
    # freeze_through: the dataset caches each slice's activations after the frozen layers (BackboneFeaturesd, in
    # bfloat16 where the CPU has it) and only the layers after them train; the saved model is the whole classifier
    start = trained[0] / "models" / "model.pt"
    workflow = _workflow(
        CONFIGS / "train.json", tmp_path, dataset, max_epochs=1, initial_weights=str(start), freeze_through="conv4_3"
    )
    workflow.initialize()
    validated = []  # the logit differences validation computed from the cached activations
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: validated.extend(float(o["pred"][1] - o["pred"][0]) for o in e.state.output),
    )
    workflow.run()
    workflow.finalize()

    before = torch.load(start, weights_only=True)["model"]
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert saved["config"]["freeze_through"] == "conv4_3"
    network = GAPClassifier(width=TINY["width"], head_channels=TINY["head_channels"])
    frozen = {f"features.{n}" for n, _ in network.features[: network.prefix_length("conv4_3")].named_parameters()}
    assert len(frozen) == 2 * 10  # conv1_1 to conv4_3, weights and biases
    assert all(torch.equal(saved["model"][n], before[n]) for n in frozen)
    changed = {n for n, v in saved["model"].items() if n not in frozen and not torch.equal(v, before[n])}
    assert {"features.24.weight", "fc.weight"} <= changed  # conv5_1 and the classifier trained
    # what validation scored from the cached activations is the saved classifier's own answer on the whole slice
    items = json.loads((dataset / "datalist.json").read_text())["validation"]
    model = trained_classifier(tmp_path / "models" / "model.pt")
    whole = [nodule_logit(model, prepared_slice(dataset / i["image"])) for i in items]
    # bfloat16 activations move them by 4e-4 here, activations cached one layer short by 0.05
    np.testing.assert_allclose(validated, whole, atol=5e-3)


@pytest.mark.parametrize(
    "probabilities, labels, specificity, expected",
    [
        ([0.1, 0.2, 0.3, 0.4, 0.9], [0, 0, 0, 0, 1], 0.75, 0.3),  # one of four clean slices may be called
        ([0.1, 0.2, 0.3, 0.4, 0.9], [0, 0, 0, 0, 1], 1.0, np.nextafter(0.4, 1)),  # none may
        ([0.1, 0.2, 0.3, 0.4, 0.9], [0, 0, 0, 0, 1], 0.5, 0.2),
        ([0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1], 0.5, 0.5),  # ties: every clean slice is called, not half
    ],
)
def test_threshold_at_specificity(probabilities, labels, specificity, expected):
    threshold = threshold_at_specificity(np.array(probabilities), np.array(labels), specificity)
    assert threshold == pytest.approx(expected)
    with pytest.raises(ValueError, match="no slice without nodule"):
        threshold_at_specificity(np.array([0.4]), np.array([1]), 0.9)


def test_resume_continues_from_saved_epoch(trained, dataset, tmp_path):
    out, history = trained
    shutil.copytree(out / "models", tmp_path / "models")
    resumed = _train(tmp_path, dataset, max_epochs=EPOCHS + 1, resume=True)
    trainer = resumed["trainer"]
    assert len(resumed["loss"]) == 1  # only the one missing epoch ran
    assert trainer.state.epoch == EPOCHS + 1
    assert trainer.state.iteration == (EPOCHS + 1) * ITERATIONS_PER_EPOCH
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.99 ** (EPOCHS + 1))
    assert (tmp_path / "models" / f"last_checkpoint_epoch={EPOCHS + 1}.pt").is_file()
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        last_checkpoint(tmp_path / "nowhere")


def test_same_seed_same_first_epoch_loss(trained, dataset, tmp_path):
    _, history = trained
    again = _train(tmp_path, dataset, max_epochs=1)
    assert again["loss"][0] == history["loss"][0]


def test_engines_get_plain_tensors_and_channels_last_weights(dataset, tmp_path):
    """The classifier trains in the channels-last layout on plain tensors: the batch's values, not its headers."""
    workflow = _workflow(CONFIGS / "train.json", tmp_path, dataset)
    workflow.initialize()
    parser = workflow.parser
    network = parser.get_parsed_content("network")
    convolutions = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert not convolutions[1].weight.is_contiguous()  # a 3x3 kernel over several channels: the layouts differ
    batch = next(iter(parser.get_parsed_content("validate#dataloader")))
    assert isinstance(batch["image"], MetaTensor)
    image, label = parser.get_parsed_content("prepare_batch")(batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and torch.equal(image, batch["image"].as_tensor())
    assert label.dtype == torch.long and label.tolist() == batch["class"].tolist()
    for engine in ("train#trainer", "validate#evaluator"):
        assert parser.get_parsed_content(engine).prepare_batch is parser.get_parsed_content("prepare_batch")


def test_check_properties(dataset, tmp_path, monkeypatch):
    workflow = _workflow(CONFIGS / "train.json", tmp_path, dataset, workflow_type="train")
    workflow.initialize()
    assert workflow.check_properties() == []
    # the multi-GPU overrides as one process of a world of one
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    files = [CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"]
    merged = _workflow(files, tmp_path / "ddp", dataset, workflow_type="train")
    try:
        merged.initialize()
        assert merged.check_properties() == []
        assert isinstance(merged.parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
    finally:
        idist.finalize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_overrides(dataset: Path, out: Path) -> list[str]:
    args = ["--dataset_dir", str(dataset), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "logs")]
    for key, value in TINY.items():
        args += [f"--{key}", str(value)]
    return args + ["--max_epochs", "1"]


def test_two_process_gloo_training_saves_once(dataset, tmp_path):
    configs = "['configs/train.json','configs/multi_gpu_train.json']"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
    ]
    command += ["--config_file", configs, *_cli_overrides(dataset, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO / "bundle", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["last_checkpoint_epoch=1.pt", "model.pt"]
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 1
    # split_batch (the default): batch_size is the effective batch, so each of the 2 processes takes 4 of the 8 and
    # runs 4 iterations over its 16 of the 32 training slices (8 per process would run 2)
    assert "multi-GPU training: 2 processes x batch 4 = effective batch 8 (split_batch=True)" in log
    state = torch.load(tmp_path / "models" / "last_checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["epoch_length"] == 4 and state["trainer"]["iteration"] == 4


def test_cli_from_repo_root(dataset, tmp_path):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle"]
    command += ["--config_file", "bundle/configs/train.json", *_cli_overrides(dataset, tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()


def test_classify_writes_csv_nams_and_overlays(trained, dataset, tmp_path):
    out, _ = trained
    model_path = out / "models" / "model.pt"
    settings = {
        "bundle_root": str(REPO / "bundle"),
        "dataset_dir": str(dataset),
        "ckpt_path": str(model_path),
        "output_dir": str(tmp_path / "classify"),
        "num_overlays": 3,
        **TINY,  # as the checkpoint records them (giving them is allowed, not needed)
    }
    workflow = ConfigWorkflow(config_file=config_files(CLASSIFY), workflow_type=None, **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    items = json.loads((dataset / "datalist.json").read_text())["test"]
    with open(tmp_path / "classify" / "nodule_probability.csv") as f:
        rows = {Path(r[0]).name: float(r[1]) for r in csv.reader(f)}
    assert sorted(rows) == sorted(Path(i["image"]).name for i in items)
    model = load_checkpoint(GAPClassifier(width=TINY["width"], head_channels=TINY["head_channels"]), model_path).eval()
    for item in items[:2]:
        name = Path(item["image"]).name
        source = nib.load(dataset / item["image"])
        hu = torch.as_tensor(source.get_fdata(), dtype=torch.float32)
        image = ((hu + 1000) / 1400).clamp(0, 1)[None, None]
        with torch.no_grad():
            logits, nam = model.forward_with_nam(image)
        assert rows[name] == pytest.approx(torch.softmax(logits, 1)[0, 1].item(), abs=1e-5)
        saved = nib.load(tmp_path / "classify" / "nam" / name.replace(".nii.gz", "_nam.nii.gz"))
        assert saved.shape == source.shape
        np.testing.assert_allclose(saved.affine, source.affine, atol=1e-6)
        np.testing.assert_allclose(saved.get_fdata(), nam[0, 0].numpy(), atol=1e-4)
    assert len(list((tmp_path / "classify" / "overlays").glob("*_nam.png"))) == 3

    # the report: AUC and accuracy (at the checkpoint's decision threshold) of the CSV's probabilities, localisation
    # of the saved NAMs on the dataset's truth
    report = json.loads((tmp_path / "classify" / "classifier_report.json").read_text())
    assert report["threshold"] == torch.load(model_path, weights_only=True)["config"]["threshold"] != 0.5
    classes = {Path(i["image"]).name: int(i["class"]) for i in items}
    expected = classification_summary([rows[n] for n in classes], list(classes.values()), report["threshold"])
    assert (report["auc"], report["accuracy"], report["slices"]) == (expected["auc"], expected["accuracy"], len(items))
    found = []
    for item in items:
        if item["class"] == 1:
            name = Path(item["image"]).name.replace(".nii.gz", "_nam.nii.gz")
            nam = nib.load(tmp_path / "classify" / "nam" / name).get_fdata()
            truth = [np.asarray(nib.load(dataset / item[key]).dataobj) for key in ("label", "lung")]
            found.append(localise(nam, *truth))
    assert report["nodule_slices"] == len(found) > 0
    assert report["peak_near"] == pytest.approx(np.mean([f.near for f in found]))
    assert report["percentile"] == pytest.approx(np.mean([f.percentile for f in found]), abs=1e-3)
    assert report["chance"] == pytest.approx(np.mean([f.chance for f in found]))
    assert (tmp_path / "classify" / "nam_sheet.png").stat().st_size > 10_000

    folder = ConfigWorkflow(
        config_file=config_files(CLASSIFY),
        workflow_type=None,
        **{**settings, "input_dir": str(dataset / "images"), "output_dir": str(tmp_path / "folder")},
    )
    folder.initialize()
    folder.run()
    folder.finalize()
    assert len(list((tmp_path / "folder" / "nam").glob("*_nam.nii.gz"))) == 48
    assert not (tmp_path / "folder" / "classifier_report.json").exists()  # a folder of slices has no truth


def test_slice_class_comes_from_the_item_or_from_the_mask(tmp_path):
    import nibabel as nib
    import numpy as np
    from scripts.training.transforms import SliceClassd

    mask = np.zeros((8, 8), np.uint8)
    empty, nodule = tmp_path / "empty.nii.gz", tmp_path / "nodule.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.eye(4)), empty)
    mask[3, 3] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), nodule)
    derive = SliceClassd()
    assert derive({"image": "x", "label": str(nodule)})["class"] == 1
    assert derive({"image": "x", "label": str(empty)})["class"] == 0
    assert derive({"image": "x", "label": str(nodule), "class": 0})["class"] == 0  # a given class wins
    with pytest.raises(KeyError, match="neither 'class' nor 'label'"):
        derive({"image": "x"})


@pytest.mark.parametrize("size, shift", [(128, 8.0), (256, 16.0), (384, 24.0)])
def test_the_affine_shift_grows_with_the_slice(size, shift):
    """A fixed shift made for 128 px let a 256 px classifier find the nodule's lung instead of the nodule
    (docs/classifier.md): the shift is a sixteenth of the slice."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(REPO / "bundle"), "image_size": size})
    affine = next(t for t in parser.get_parsed_content("train#random_transforms") if type(t).__name__ == "RandAffined")
    assert tuple(affine.rand_affine.rand_affine_grid.translate_range) == (shift, shift)
