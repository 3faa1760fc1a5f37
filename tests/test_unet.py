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
from monai.networks.nets import BasicUNet
from scripts.evaluate import SegmentationEvaluation
from scripts.unet import write_slice_prediction

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
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train_unet.json"))
    parser["features"] = [4, 4, 8, 8, 16, 4]
    parser["device"] = "$torch.device('cpu')"
    assert parser["batch_size"] == 20 and parser["amp"] is True
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert parser.get_parsed_content("lr_scheduler").gamma == pytest.approx(0.999)
    # the loss is 1 - Dice of the whole mini-batch (intersections and sizes summed over the batch)
    logits = torch.tensor([[[[10.0, -10.0]]], [[[10.0, 10.0]]]])  # two 1x2 images, sigmoid ~ 1 or ~ 0
    label = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    loss = parser.get_parsed_content("loss")(logits, label)
    assert float(loss) == pytest.approx(1 - 2 * 1 / (3 + 1), abs=1e-3)
    for key in ("training", "run", "bundle_root", "dataset_dir", "device", "max_epochs", "val_interval", "image_size"):
        assert key in parser


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
    for item in items["test"]:
        stem = item["image"][len("images/") : -len(".nii.gz")]
        mask, image = nib.load(str(pred / "masks" / f"{stem}.nii.gz")), nib.load(str(tmp_path / "data" / item["image"]))
        assert mask.shape == image.shape == (SIZE, SIZE) and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, image.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
        record = json.loads((pred / "records" / f"{stem}.json").read_text())
        assert 0.0 <= record["probability"] <= 1.0 and record["pixels"] == int(np.asanyarray(mask.dataobj).sum())
    assert sorted(p.name for p in (pred / "masks").iterdir()) == sorted(
        i["image"][len("images/") :] for i in items["test"]
    )  # no temporary files left

    result = SegmentationEvaluation(tmp_path / "data", {"U-Net": pred}, tmp_path / "eval").run()
    counts = result["methods"]["U-Net"]["counts"]
    assert (counts["S+"], counts["S-"]) == (2, 1) and result["methods"]["U-Net"]["classification"]["n"] == 3


def test_write_slice_prediction_checks_the_shape(tmp_path):
    source = tmp_path / "x_1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5), np.int16), np.diag([0.6, 0.7, 1.0, 1.0])), str(source))
    path = write_slice_prediction(torch.ones(1, 6, 5), source, tmp_path / "out", probability=0.25)
    assert path == tmp_path / "out" / "masks" / "x_1.nii.gz"
    assert nib.load(str(path)).header.get_zooms() == pytest.approx((0.6, 0.7))
    assert json.loads((tmp_path / "out" / "records" / "x_1.json").read_text()) == {"probability": 0.25, "pixels": 30}
    with pytest.raises(ValueError, match="x_1.nii.gz: the mask's shape"):
        write_slice_prediction(np.ones((5, 6)), source, tmp_path / "out")
