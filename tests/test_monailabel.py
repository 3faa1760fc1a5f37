"""MONAI Label serves the bundle for real: a server on a free port, an inference and a training request over HTTP.

MONAI Label pins numpy 1.26.4, so it runs from its own virtual environment (``tools/monailabel_env.sh``; path from
``MONAILABEL_VENV``, default ``<repo>/.venv-monailabel``). Without it the test is skipped, except in CI (``CI=true``).

The app (``APP_MAIN``) is monailabel's ``monaibundle`` sample app cut down to bundle inference and training, with
one change: MONAI Label 0.8.5 writes 2-D results through ITK without their affine (``write_itk(..., affine if
ndim > 2 else None)``), so the mask of a 2-D slice would come back with 1 mm pixels; this app's infer task writes
the mask with the input file's affine instead.
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

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.dataset import write_nifti
from scripts.networks import GAPClassifier

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
MODEL = "lung_nodule_ws_segmentation"  # MONAI Label infers the task type from the name
SMALL = {"width": 0.0625, "image_size": 128}  # a small network on 128 x 128 crops keeps CPU inference fast
CROP = SMALL["image_size"]
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


APP_MAIN = '''"""monaibundle app for 2-D slices: MONAI Label's writer drops the geometry of 2-D results; keep it."""

import tempfile

import nibabel as nib
import numpy as np
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import get_bundle_models


class SliceBundleInferTask(BundleInferTask):
    """A bundle's inference on a 2-D image; the mask is written with the input file's affine."""

    def writer(self, data, extension=None, dtype=None):
        pred = np.asarray(data[self.output_label_key])
        pred = pred[0] if pred.ndim == 3 and pred.shape[0] == 1 else pred
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), nib.load(data["image_path"]).affine), path)
        return path, data.get(self.output_json_key, {})


class SliceBundleApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.models = get_bundle_models(app_dir, conf)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="2-D bundles", description="", version="1")

    def init_infers(self):
        return {name: SliceBundleInferTask(path, self.conf) for name, path in self.models.items()}

    def init_trainers(self):
        tasks = {name: BundleTrainTask(path, self.conf) for name, path in self.models.items()}
        return {name: task for name, task in tasks.items() if task.is_valid()}
'''


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


def lidc_slices(lidc_root: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[float, float]]:
    """Two real 128 x 128 crops of LIDC-IDRI-0001 in HU with their STAPLE masks: through the nodule, and far from it."""
    from scripts.labels import consensus_mask
    from scripts.lidc import LidcSource

    case = LidcSource(lidc_root, patients=["LIDC-IDRI-0001"]).load("LIDC-IDRI-0001")
    nodule = case.annotations.nodules[0]
    truth = consensus_mask(nodule)
    box = nodule.box()
    local = int(np.argmax(truth.sum(axis=(0, 1))))  # the nodule's largest section
    z = box[2].start + local
    centre = [int(round((s.start + s.stop) / 2)) for s in box[:2]]
    corner = [min(max(c - CROP // 2, 0), n - CROP) for c, n in zip(centre, case.hu.shape[:2])]
    window = (slice(corner[0], corner[0] + CROP), slice(corner[1], corner[1] + CROP))
    label = np.zeros(case.hu.shape[:2], np.uint8)
    label[box[0], box[1]] = truth[..., local]
    far = 10 if z > case.hu.shape[2] // 2 else case.hu.shape[2] - 10
    slices = [
        (case.hu[..., z][window], label[window]),
        (case.hu[..., far][window], np.zeros((CROP, CROP), np.uint8)),
    ]
    return slices, case.annotations.spacing[:2]


def small_bundle(bundle_root: Path, dest: Path) -> None:
    """Copy the bundle with its configs set to a small width and crop size, and a randomly initialised model.pt."""
    shutil.copytree(bundle_root, dest, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "logs", "__pycache__"))
    for name in ("inference.json", "train.json"):
        path = dest / "configs" / name
        config = json.loads(path.read_text())
        config.update({k: v for k, v in SMALL.items() if k in config})
        config.update({k: 0 for k in ("num_workers",) if k in config})
        config.update({"amp": False} if "amp" in config else {})
        path.write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    torch.save(GAPClassifier(width=SMALL["width"]).state_dict(), dest / "models" / "model.pt")


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


def multipart_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.walk()
        if not part.is_multipart()
    }


def test_monailabel_infers_and_trains_the_bundle(bundle_root, lidc_root, tmp_path, monkeypatch):
    venv = monailabel_venv()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # pylidc writes its config template into HOME
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text(APP_MAIN)
    small_bundle(bundle_root, app / "model" / MODEL)

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    slices, spacing = lidc_slices(lidc_root)
    names = ["LIDC-IDRI-0001_nodule", "LIDC-IDRI-0001_clear"]
    for name, (hu, label) in zip(names, slices):
        write_nifti(hu.astype(np.int16), spacing, studies / f"{name}.nii.gz")
        write_nifti(label, spacing, studies / "labels" / "final" / f"{name}.nii.gz")
    assert slices[0][1].sum() > 100  # the crop holds the nodule

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "monailabel.log"
    conf = {"models": MODEL, "zoo_source": "github", "preload": "false"}  # zoo_source github: no Model Zoo lookup
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
        assert MODEL in info["models"], info["models"].keys()
        assert MODEL in info["trainers"], f"no trainer for {MODEL}:\n{log.read_text()[-4000:]}"

        # Inference: the mask comes back on the input's grid, with the result JSON of the segmenter.
        query = urllib.parse.urlencode({"image": names[0], "output": "all"})
        params = urllib.parse.urlencode({"params": json.dumps({"device": "cpu"})}).encode()
        content_type, body = post(f"{url}/infer/{MODEL}?{query}", params, "application/x-www-form-urlencoded", log)
        parts = multipart_parts(content_type, body)
        result = json.loads(parts["params"])
        assert 0.0 <= result["probability"] <= 1.0
        assert result["status"] in ("negative", "no_scope", "no_candidates", "segmented")
        assert result["spacing_mm"] == pytest.approx(list(spacing), rel=1e-5)
        mask_file = tmp_path / "mask.nii.gz"
        mask_file.write_bytes(parts["image"])
        mask, image = nib.load(mask_file), nib.load(studies / f"{names[0]}.nii.gz")
        assert mask.shape == image.shape == (CROP, CROP)
        assert mask.header.get_zooms() == pytest.approx(spacing, rel=1e-5)
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-6)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

        # Training through the API: one short epoch on the two labelled slices, run synchronously.
        model_pt = app / "model" / MODEL / "models" / "model.pt"
        initial = torch.load(model_pt, weights_only=True)
        request = {"device": "cpu", "max_epochs": 1, "val_split": 0.5, "multi_gpu": False}
        post(f"{url}/train/{MODEL}?run_sync=true", json.dumps(request).encode(), "application/json", log)
        text = log.read_text()
        assert "Total Records for Training: 1" in text and "Epoch: 1/1" in text and "Training Finished" in text
        trained = torch.load(model_pt, weights_only=True)  # saved by the bundle's validation CheckpointSaver
        assert trained.keys() == initial.keys()
        assert any(not torch.equal(trained[k], initial[k]) for k in initial), "one epoch of SGD changed no weight"
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
