"""The GAP-CNN classifier: shapes, the NAM identity, VGG16 weight loading, checkpoints, TorchScript."""

import io

import pytest
import torch
from scripts.checkpoint import load_checkpoint
from scripts.networks import GAPClassifier, NAMInferer

WIDTH = 1 / 16

# torchvision vgg16().features: (index, out, in) of every conv, up to conv5_3
TORCHVISION_CONVS = [
    (0, 64, 3),
    (2, 64, 64),
    (5, 128, 64),
    (7, 128, 128),
    (10, 256, 128),
    (12, 256, 256),
    (14, 256, 256),
    (17, 512, 256),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
]


def _model(gap_levels: int = 1, **kwargs) -> GAPClassifier:
    torch.manual_seed(0)
    return GAPClassifier(gap_levels=gap_levels, width=WIDTH, head_channels=256, **kwargs).eval()


@pytest.mark.parametrize("gap_levels", [1, 2, 3])
@pytest.mark.parametrize("size", [(32, 32), (64, 48), (96, 96)])
def test_shapes(gap_levels, size):
    model = _model(gap_levels)
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        logits, nam = model.forward_with_nam(x)
        heads = model.head_nams(x)
    assert model(x).shape == logits.shape == (2, 2)
    assert nam.shape == model.nam(x).shape == (2, 1, *size)
    assert len(heads) == gap_levels
    for head, stride in zip(heads, (16, 8, 4)):
        assert head.shape == (2, 1, size[0] // stride, size[1] // stride)
    assert model.head_strides == [16, 8, 4][:gap_levels]
    assert model.nam_stride == 16


@pytest.mark.parametrize("gap_levels", [1, 2, 3])
def test_nam_identity(gap_levels):
    """Mean of each head's NAM = that head's share of the nodule logit; their sum = logit - bias."""
    model = _model(gap_levels).double()
    x = torch.rand(3, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        activations = model._head_activations(x)
        heads = model.head_nams(x)
        logits = model(x)
    weights = torch.split(model.fc.weight[1], model.head_sizes)
    for head, a, w in zip(heads, activations, weights):
        contribution = a.mean(dim=(2, 3)) @ w
        torch.testing.assert_close(head.mean(dim=(1, 2, 3)), contribution)
    total = torch.stack([h.mean(dim=(1, 2, 3)) for h in heads]).sum(0)
    torch.testing.assert_close(total, logits[:, 1] - model.fc.bias[1])
    with torch.no_grad():
        _, nam = model.forward_with_nam(x)
    torch.testing.assert_close(nam, model.nam(x))


def test_nam_is_raw_sum_of_upsampled_heads():
    model = _model(3).double()
    x = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        heads = model.head_nams(x)
        nam = model.nam(x)
    up = [torch.nn.functional.interpolate(h, size=(64, 64), mode="bilinear", align_corners=False) for h in heads]
    torch.testing.assert_close(nam, sum(up))


def test_nam_context_radius_is_exact():
    """A crop aligned to the stride reproduces the NAM r pixels inside its borders; r is the tight bound."""
    model = _model(1).double()
    r = model.nam_context_radius
    assert r == 129  # conv5_3 sees 196 px, the head conv adds 2 x 16, bilinear upsampling mixes two head pixels
    torch.manual_seed(1)
    x = torch.rand(1, 1, 320, 320, dtype=torch.float64)
    with torch.no_grad():
        full = model.nam(x)
        origin, size = 16, 288
        crop = model.nam(x[..., origin : origin + size, origin : origin + size])
        inner = slice(r, size - r)
        outer = slice(origin + r, origin + size - r)
        torch.testing.assert_close(crop[..., inner, inner], full[..., outer, outer], rtol=0, atol=1e-12)
        row, col = 160, 167  # col: the worst phase of the 16-pixel upsampling grid
        for offset, influences in ((r, True), (r + 1, False)):
            changed = x.clone()
            changed[..., row, col - offset] += 5.0
            delta = (model.nam(changed)[0, 0, row, col] - full[0, 0, row, col]).abs().item()
            assert (delta > 0) == influences, offset


def _torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG16 state dict at this width (random values), with the classifier keys too."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, out, inp in TORCHVISION_CONVS:
        out, inp = max(1, round(out * WIDTH)), (3 if index == 0 else max(1, round(inp * WIDTH)))
        state[f"features.{index}.weight"] = torch.randn(out, inp, 3, 3, generator=g)
        state[f"features.{index}.bias"] = torch.randn(out, generator=g)
    state["classifier.0.weight"] = torch.randn(4, 4, generator=g)
    return state


def test_pretrained_loads_backbone_only(tmp_path):
    path = tmp_path / "vgg16.pth"
    state = _torchvision_state()
    torch.save(state, path)
    model = _model(2)
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("features.")}
    model.load_backbone(path)
    loaded = model.state_dict()
    # RGB conv1_1 summed over the colour axis: a grey slice repeated to RGB gives the same response
    torch.testing.assert_close(loaded["features.0.weight"], state["features.0.weight"].sum(1, keepdim=True))
    for index, _, _ in TORCHVISION_CONVS[1:]:
        torch.testing.assert_close(loaded[f"features.{index}.weight"], state[f"features.{index}.weight"])
        torch.testing.assert_close(loaded[f"features.{index}.bias"], state[f"features.{index}.bias"])
    for key, value in heads_before.items():
        torch.testing.assert_close(loaded[key], value)
    grey = torch.rand(1, 1, 8, 8)
    conv_rgb = torch.nn.functional.conv2d(grey.repeat(1, 3, 1, 1), state["features.0.weight"], padding=1)
    torch.testing.assert_close(model.features[0](grey), conv_rgb + state["features.0.bias"][None, :, None, None])
    same = GAPClassifier(gap_levels=2, width=WIDTH, head_channels=256, pretrained=str(path))
    torch.testing.assert_close(same.features[0].weight, loaded["features.0.weight"])


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        _model().load_backbone(tmp_path / "missing.pth")
    wrong_width = tmp_path / "wide.pth"
    torch.save({k: torch.cat([v, v]) for k, v in _torchvision_state().items()}, wrong_width)
    with pytest.raises(ValueError, match=r"wide\.pth: features\.0\.weight has shape"):
        _model().load_backbone(wrong_width)
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, partial)
    with pytest.raises(ValueError, match=r"partial\.pth: not a torchvision-layout VGG16 state dict"):
        _model().load_backbone(partial)


def test_torchscript_round_trip():
    model = _model(3)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    reloaded = torch.jit.load(buffer)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(reloaded.nam(x), model.nam(x), rtol=0, atol=0)
        logits, nam = reloaded.forward_with_nam(x)
        torch.testing.assert_close(nam, model.nam(x), rtol=0, atol=0)
        assert [h.shape for h in reloaded.head_nams(x)] == [h.shape for h in model.head_nams(x)]
    assert reloaded.nam_stride == 16 and reloaded.nam_context_radius == model.nam_context_radius


def test_inferer_returns_probability_and_nam():
    model = _model(1)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = NAMInferer()(x, model)
        logits = model(x)
    torch.testing.assert_close(out["probability"][:, 0], torch.softmax(logits, 1)[:, 1])
    torch.testing.assert_close(out["nam"], model.nam(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="gap_levels"):
        GAPClassifier(gap_levels=4)
    with pytest.raises(ValueError, match="width"):
        GAPClassifier(width=0)


def test_batch_norm_variant_follows_torchvision_vgg16_bn_layout(tmp_path):
    model = GAPClassifier(gap_levels=3, width=0.0625, batch_norm=True)
    # torchvision's vgg16_bn: conv5_3 / conv4_3 / conv3_3 ReLUs at features 42, 32 and 22
    assert model.tap_indices == [42, 32, 22]
    assert isinstance(model.features[1], torch.nn.BatchNorm2d)
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    logits, nam = model.forward_with_nam(x)
    assert logits.shape == (2, 2) and nam.shape == (2, 1, 64, 64)
    path = tmp_path / "bn.pt"
    torch.save(model.state_dict(), path)
    load_checkpoint(GAPClassifier(gap_levels=3, width=0.0625, batch_norm=True), path)
    with pytest.raises(ValueError, match=r"batch_norm=True; this model .* has .*batch_norm=False"):
        load_checkpoint(GAPClassifier(gap_levels=3, width=0.0625), path)
