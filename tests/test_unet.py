"""The U-Net baseline: its configs train and infer through ``monai.bundle run``; its masks keep the geometry."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import BasicUNet
from scripts.evaluation.evaluate import SegmentationEvaluation
from scripts.evaluation.unet_outputs import write_slice_prediction

SIZE = 32
TINY = ["--features", "[4,4,8,8,16,4]", "--image_size", str(SIZE), "--num_workers", "0"]


def make_dataset(root):
    """Slices of 32x32 with 5x5 bright squares on every other one, anisotropic spacing, an offset affine."""
    rng = np.random.default_rng(0)
    items = {"training": [], "validation": [], "test": []}
    for split, n in (("training", 8), ("validation", 2), ("test", 3)):
        for i in range(n):
            stem = f"{split[:3]}{i:02d}_{i}"
            image, label = np.full((SIZE, SIZE), -900, np.int16), np.zeros((SIZE, SIZE), np.uint8)
            if i % 2 == 0:
                r, c = rng.integers(6, SIZE - 10, 2)
                image[r : r + 5, c : c + 5], label[r : r + 5, c : c + 5] = 50, 1
            affine = np.diag([0.7, 0.8, 2.5, 1.0])
            affine[:3, 3] = [-10.0, 20.0, 30.0 + i]
            for sub, arr in (("images", image), ("labels", label)):
                (root / sub).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(arr, affine), str(root / sub / f"{stem}.nii.gz"))
            items[split].append(
                {
                    "image": f"images/{stem}.nii.gz",
                    "label": f"labels/{stem}.nii.gz",
                    "class": int(i % 2 == 0),
                    "subject": stem.split("_")[0],
                    "slice": i,
                    "nodules": int(i % 2 == 0),
                    "diameters_mm": [4.0] * (i % 2 == 0),
                }
            )
    (root / "datalist.json").write_text(json.dumps(items))
    return items


def config(bundle_root, name):
    """A bundle config, parsed for a tiny CPU network."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / name))
    parser["features"] = [4, 4, 8, 8, 16, 4]
    parser["device"] = "$torch.device('cpu')"
    return parser


def bundle_run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_config_holds_the_papers_recipe(bundle_root):
    parser = config(bundle_root, "train_unet.json")
    assert parser["batch_size"] == 20 and parser["amp"] is True
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert parser.get_parsed_content("lr_scheduler").gamma == pytest.approx(0.999)
    for key in ("training", "run", "bundle_root", "dataset_dir", "device", "max_epochs", "val_interval", "image_size"):
        assert key in parser


def test_loss_is_the_mean_of_per_sample_dice(bundle_root):
    """The paper's loss: the negative mean over the mini-batch of each slice's Dice (here 1 - that mean, the same
    gradient), not the Dice of the pooled batch. The three slices below tell the two apart."""
    loss = config(bundle_root, "train_unet.json").get_parsed_content("loss")
    on, off = 30.0, -30.0  # sigmoid ~ 1 or ~ 0
    logits = torch.tensor([[[[on, on]]], [[[on, off]]], [[[off, off]]]])  # three 1x2 slices
    label = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    # per slice: Dice 2*1/(2+1) = 2/3, then 1, then 1 (empty on empty: 0/0 smoothed to 1)
    per_sample = 1 - (2 / 3 + 1 + 1) / 3
    pooled = 1 - 2 * 2 / (3 + 2)  # intersections 2, sizes 3 + 2, summed over the batch
    assert float(loss(logits, label)) == pytest.approx(per_sample, abs=1e-4)
    assert abs(per_sample - pooled) > 0.05
    # a prediction on a clean slice costs that slice's whole Dice
    clean = torch.tensor([[[[off, off]]], [[[on, off]]]]), torch.zeros(2, 1, 1, 2)
    assert float(loss(*clean)) == pytest.approx(0.5, abs=1e-4)


def test_checkpoints_are_chosen_by_a_metric_that_sees_false_positives_on_clean_slices(bundle_root):
    """The key metric is the Dice of every validation slice, a clean slice scoring 1 when nothing is predicted on it
    and 0 otherwise (DiceMetric with ignore_empty=False); Dice over the nodule slices only is logged beside it."""
    parser = config(bundle_root, "train_unet.json")
    key, extra = parser.get_parsed_content("validate#key_metric"), parser.get_parsed_content(
        "validate#additional_metrics"
    )
    assert list(key) == ["val_dice_all_slices"] and list(extra) == ["val_dice_nodule_slices"]
    key_metric, extra_metric = key["val_dice_all_slices"], extra["val_dice_nodule_slices"]
    assert parser["validate#evaluator#key_val_metric"].replace("::", "#") == "@validate#key_metric"
    assert parser["validate#handlers"][-1]["_target_"] == "CheckpointSaver"
    assert parser["validate#handlers"][-1]["save_key_metric"] is True
    nodule, clean = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    nodule[0, 1:3, 1:3] = 1
    half = nodule.clone()
    half[0, 1, 1:3] = 0  # Dice 2*2/(2+4) = 2/3
    false_positive = torch.zeros(1, 4, 4)
    false_positive[0, 0, 0] = 1

    def score(metric, preds, labels):
        metric.save_details = False  # per-slice details go to an engine's state; none here
        metric.reset()
        metric.update((preds, labels))
        return metric.compute()

    labels = [nodule, clean, clean]
    assert score(key_metric, [half, clean, clean], labels) == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert score(key_metric, [half, false_positive, clean], labels) == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert score(key_metric, [clean, clean, clean], labels) == pytest.approx((0 + 1 + 1) / 3)  # a miss scores 0
    # the nodule-slice Dice alone cannot see the false positive
    assert score(extra_metric, [half, false_positive, clean], labels) == pytest.approx(2 / 3)


def test_augmentation_mirrors_the_classifiers(bundle_root):
    """The same random flips and affine as configs/train.json, applied to the image and its mask alike."""
    unet = config(bundle_root, "train_unet.json")
    classifier = config(bundle_root, "train.json")
    ours, theirs = unet["train#random_transforms"], classifier["train#random_transforms"]
    assert len(ours) == len(theirs) == 3
    for mine, reference in zip(ours, theirs):
        # the classifier's augmentation is off while its backbone is frozen (cached activations); the U-Net has none
        reference = {k: v for k, v in reference.items() if k != "_disabled_"}
        assert mine["_target_"] == reference["_target_"] and mine["keys"] == ["image", "label"]
        for name, value in reference.items():
            if name == "mode":
                assert mine["mode"] == [value, "nearest"]  # the mask stays binary
            elif name != "keys":
                assert mine[name] == value, name
        assert set(mine) == set(reference)
    assert unet["train#preprocessing#transforms"] == "$@train#deterministic_transforms + @train#random_transforms"


def test_augmented_mask_stays_on_its_nodule(tmp_path, bundle_root):
    """Through the U-Net's training preprocessing the mask moves with the image (the same flips, the same affine)."""
    image = np.full((SIZE, SIZE), -900, np.int16)
    label = np.zeros((SIZE, SIZE), np.uint8)
    image[4:12, 6:12], label[4:12, 6:12] = 100, 1  # off-centre, so flips and shifts move it
    for name, arr in (("image", image), ("label", label)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    parser = config(bundle_root, "train_unet.json")
    parser["image_size"] = SIZE
    preprocessing = parser.get_parsed_content("train#preprocessing")
    item = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    moved = 0
    for seed in range(12):
        preprocessing.set_random_state(seed)
        out = preprocessing(item)
        img, lab = out["image"][0].numpy(), out["label"][0].numpy()
        assert set(np.unique(lab)) <= {0.0, 1.0} and lab.sum() > 20
        bright = img > 0.5 * (img.max() + img.min())
        assert (lab.astype(bool) & bright).sum() / lab.sum() > 0.85, seed
        assert (lab.astype(bool) & bright).sum() / bright.sum() > 0.85, seed
        moved += not np.array_equal(lab, label)
    assert moved >= 6  # the augmentation did run


def test_train_then_infer_then_evaluate(tmp_path, bundle_root):
    items = make_dataset(tmp_path / "data")
    models, logs, pred = tmp_path / "models", tmp_path / "logs", tmp_path / "pred"
    train = ["training", "--config_file", "bundle/configs/train_unet.json", "--bundle_root", "bundle"]
    train += ["--dataset_dir", str(tmp_path / "data"), "--max_epochs", "1", "--batch_size", "4"]
    train += ["--ckpt_dir", str(models), "--output_dir", str(logs), *TINY]
    bundle_run(train, bundle_root.parent)  # from the repo root
    # one object in save_dict: ignite stores its bare state dict, which must load strictly into the network
    BasicUNet(2, 1, 1, features=(4, 4, 8, 8, 16, 4)).load_state_dict(torch.load(models / "unet.pt", map_location="cpu"))

    infer = ["--config_file", "configs/inference_unet.json", "--dataset_dir", str(tmp_path / "data")]
    infer += ["--ckpt_path", str(models / "unet.pt"), "--output_dir", str(pred), *TINY]
    bundle_run(infer, bundle_root)  # from the bundle
    # the trained network's own output on each test slice, windowed by hand: what the masks and records must hold
    trained = BasicUNet(2, 1, 1, features=(4, 4, 8, 8, 16, 4)).eval()
    trained.load_state_dict(torch.load(models / "unet.pt", map_location="cpu"))
    outcomes = []
    for item in items["test"]:
        stem = item["image"][len("images/") : -len(".nii.gz")]
        mask, image = nib.load(str(pred / "masks" / f"{stem}.nii.gz")), nib.load(str(tmp_path / "data" / item["image"]))
        assert mask.shape == image.shape == (SIZE, SIZE) and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, image.affine)
        voxels = np.asanyarray(mask.dataobj)
        assert set(np.unique(voxels)) <= {0, 1}
        window = np.clip((np.asanyarray(image.dataobj) + 1000.0) / 1400.0, 0.0, 1.0)
        with torch.no_grad():
            expected = torch.sigmoid(trained(torch.as_tensor(window, dtype=torch.float32)[None, None]))[0, 0].numpy()
        record = json.loads((pred / "records" / f"{stem}.json").read_text())
        assert record["probability"] == pytest.approx(float(expected.max()), abs=1e-5), stem
        clear = np.abs(expected - 0.5) > 1e-4  # pixels at the threshold itself may round either way
        np.testing.assert_array_equal(voxels[clear], (expected > 0.5)[clear].astype(np.uint8), err_msg=stem)
        assert record["pixels"] == int(voxels.sum())
        label = np.asanyarray(nib.load(str(tmp_path / "data" / item["label"])).dataobj) > 0
        outcomes.append(("TP" if (voxels & label).any() else "FN") if label.any() else ("FP" if voxels.any() else "TN"))
    assert sorted(p.name for p in (pred / "masks").iterdir()) == sorted(
        i["image"][len("images/") :] for i in items["test"]
    )  # no temporary files left

    result = SegmentationEvaluation(tmp_path / "data", {"U-Net": pred}, tmp_path / "eval").run()
    counts = result["methods"]["U-Net"]["counts"]
    assert (counts["S+"], counts["S-"]) == (2, 1) and result["methods"]["U-Net"]["classification"]["n"] == 3
    assert [counts[k] for k in ("TP", "FN", "FP")] == [outcomes.count(k) for k in ("TP", "FN", "FP")]


def test_write_slice_prediction_checks_the_shape(tmp_path):
    source = tmp_path / "x_1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5), np.int16), np.diag([0.6, 0.7, 1.0, 1.0])), str(source))
    path = write_slice_prediction(torch.ones(1, 6, 5), source, tmp_path / "out", probability=0.25)
    assert path == tmp_path / "out" / "masks" / "x_1.nii.gz"
    assert nib.load(str(path)).header.get_zooms() == pytest.approx((0.6, 0.7))
    assert json.loads((tmp_path / "out" / "records" / "x_1.json").read_text()) == {"probability": 0.25, "pixels": 30}
    with pytest.raises(ValueError, match="x_1.nii.gz: the mask's shape"):
        write_slice_prediction(np.ones((5, 6)), source, tmp_path / "out")


def test_engines_get_plain_tensors(tmp_path, bundle_root):
    """The trainer and the evaluator feed the U-Net plain tensors, the batch's values unchanged (a MetaTensor would
    copy every slice's header through each operation)."""
    make_dataset(tmp_path)
    parser = config(bundle_root, "train_unet.json")
    parser["dataset_dir"], parser["image_size"], parser["num_workers"] = str(tmp_path), SIZE, 0
    for engine in ("train#trainer", "validate#evaluator"):
        assert parser[f"{engine}#prepare_batch"] == "@prepare_batch"
    batch = next(iter(parser.get_parsed_content("validate#dataloader")))
    assert isinstance(batch["image"], MetaTensor)
    image, label = parser.get_parsed_content("prepare_batch")(batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and type(label) is torch.Tensor
    assert torch.equal(image, batch["image"].as_tensor()) and torch.equal(label, batch["label"].as_tensor())
