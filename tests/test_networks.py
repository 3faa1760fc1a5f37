"""The GAP-CNN classifier: shapes, the NAM identity, VGG16 weight loading, checkpoints, TorchScript."""

import io

import numpy as np
import pytest
import scripts.networks.pretrained as pretrained
import torch
from scripts.networks.checkpoint import load_checkpoint
from scripts.networks.gap_classifier import GAPClassifier
from scripts.pipeline.classify import NAMInferer
from scripts.pipeline.screen import rnam_scores

WIDTH = 1 / 16
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's convention

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


def _train_a_few_steps(model: GAPClassifier, steps: int = 5, weight_decay: float = 0.0) -> GAPClassifier:
    """Adam on random slices with random classes: enough for every row of ``fc`` to move."""
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        x = torch.rand(4, model.in_channels, 64, 64, generator=generator, dtype=model.fc.weight.dtype)
        y = torch.randint(0, 2, (4,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("gap_levels, in_channels, weight_decay", [(1, 1, 0.0), (2, 3, 0.0), (3, 1, 1e-3)])
def test_nam_identity_holds_for_what_was_learned(gap_levels, in_channels, weight_decay):
    """Eq. 2 after training: fc's rows stay opposite, so the NAM is exactly half the logit-difference map.

    Each head's NAM has the spatial mean of that head's share of half the logit difference; summed over the heads
    it is half the logit difference less half the biases' difference. Fails when the rows start independent (their
    sum, which no gradient reaches, stays random) or when the NAM is read from ``fc``'s nodule row alone.
    """
    start = _model(gap_levels, in_channels=in_channels).double()
    torch.testing.assert_close(start.fc.weight[0], -start.fc.weight[1], rtol=0, atol=0)
    before = start.fc.weight.detach().clone()
    model = _train_a_few_steps(start, weight_decay=weight_decay)
    assert (model.fc.weight - before).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(model.fc.weight.sum(dim=0), torch.zeros(model.fc.in_features, dtype=torch.float64))
    torch.testing.assert_close(model.nam_weights(), model.fc.weight[1], rtol=1e-12, atol=1e-12)
    x = torch.rand(3, in_channels, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        activations = model.head_activations(x)
        heads = model.head_nams(x)
        logits = model(x)
    for head, a, w in zip(heads, activations, torch.split(model.fc.weight[1], model.head_sizes)):
        torch.testing.assert_close(head.mean(dim=(1, 2, 3)), a.mean(dim=(2, 3)) @ w)
    total = torch.stack([h.mean(dim=(1, 2, 3)) for h in heads]).sum(0)
    half_difference = (logits[:, 1] - logits[:, 0]) / 2 - (model.fc.bias[1] - model.fc.bias[0]) / 2
    torch.testing.assert_close(total, half_difference, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        _, nam = model.forward_with_nam(x)
    torch.testing.assert_close(nam, model.nam(x))


def test_nam_of_a_checkpoint_with_independent_rows_drops_their_untrained_sum():
    """Checkpoints trained before the rows started opposite: the NAM is half the difference of the rows."""
    model = _model(1).double()
    with torch.no_grad():
        model.fc.weight[0] = torch.randn(model.fc.in_features, dtype=torch.float64)  # an independent, random row
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        total = model.head_nams(x)[0].mean(dim=(1, 2, 3))
    half_difference = (logits[:, 1] - logits[:, 0]) / 2 - (model.fc.bias[1] - model.fc.bias[0]) / 2
    torch.testing.assert_close(total, half_difference, rtol=1e-10, atol=1e-10)


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


def _torchvision_state(seed: int = 0, width: float = WIDTH) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG16 state dict at ``width`` (random values), with the classifier keys too."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, out, inp in TORCHVISION_CONVS:
        out, inp = max(1, round(out * width)), (3 if index == 0 else max(1, round(inp * width)))
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
    # RGB conv1_1 folded for a grey input (see test_imagenet_weights_compute_the_rgb_model_on_normalised_grey)
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    expected = torch.tensor(IMAGENET_STD).mean() * (state["features.0.weight"] / std).sum(1, keepdim=True)
    torch.testing.assert_close(loaded["features.0.weight"], expected)
    for index, _, _ in TORCHVISION_CONVS[1:]:
        torch.testing.assert_close(loaded[f"features.{index}.weight"], state[f"features.{index}.weight"])
        torch.testing.assert_close(loaded[f"features.{index}.bias"], state[f"features.{index}.bias"])
    for key, value in heads_before.items():
        if not key.startswith("input_"):
            torch.testing.assert_close(loaded[key], value)
    same = GAPClassifier(gap_levels=2, width=WIDTH, head_channels=256, pretrained=str(path))
    torch.testing.assert_close(same.features[0].weight, loaded["features.0.weight"])


def _rgb_reference(state: dict[str, torch.Tensor], like: GAPClassifier) -> GAPClassifier:
    """torchvision's RGB VGG16 with ``state``'s backbone and ``like``'s heads: 3 input channels, no normalisation."""
    reference = GAPClassifier(
        gap_levels=like.gap_levels, width=like.width, in_channels=3, head_channels=like.head_channels
    ).double()
    own = {k: v for k, v in like.state_dict().items() if not k.startswith(("features.", "input_"))}
    reference.load_state_dict({**own, **{k: v for k, v in state.items() if k.startswith("features.")}}, strict=False)
    assert reference.config()["input_norm"] is None
    return reference.eval()


def _imagenet_normalised(grey: torch.Tensor) -> torch.Tensor:
    """A grey ``(B, 1, H, W)`` batch repeated to RGB and normalised per channel, as torchvision's weights expect."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=grey.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=grey.dtype)[None, :, None, None]
    return (grey.repeat(1, 3, 1, 1) - mean) / std


def test_imagenet_weights_compute_the_rgb_model_on_normalised_grey(tmp_path):
    state = {k: v.double() for k, v in _torchvision_state().items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = _model(2).double()  # float64 before loading: the comparison is not blurred by float32 rounding
    model.load_backbone(path)
    assert model.config()["input_norm"] == "imagenet"  # RGB ImageNet weights: the network normalises
    reference = _rgb_reference(state, model)
    torch.manual_seed(3)
    grey = torch.rand(2, 1, 40, 48, dtype=torch.float64)
    with torch.no_grad():
        ours = model.features[:5](model.normalize_input(grey))  # conv1_1, conv1_2 and pool1
        rgb = reference.features[:5](_imagenet_normalised(grey))
        inner = (..., slice(1, -1), slice(1, -1))  # the pooled pixels whose 6x6 input window is inside the image
        torch.testing.assert_close(ours[inner], rgb[inner], rtol=0, atol=1e-12)
        # only at the border, where the RGB model's zero padding is the grey m_c and ours the grey mean of m_c
        assert not torch.allclose(ours, rgb, rtol=0, atol=1e-6)
        # with 3 input channels the RGB weights load as they are: the same network, borders included
        model_rgb = GAPClassifier(gap_levels=2, width=WIDTH, in_channels=3, head_channels=256).double().eval()
        model_rgb.load_backbone(path)
        model_rgb.load_state_dict(
            {k: v for k, v in reference.state_dict().items() if k.startswith(("heads.", "fc."))}, strict=False
        )
        assert model_rgb.config()["input_norm"] == "imagenet"
        logits, nam = model_rgb.forward_with_nam(grey.repeat(1, 3, 1, 1))
        ref_logits, ref_nam = reference.forward_with_nam(_imagenet_normalised(grey))
        torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=0)
        torch.testing.assert_close(nam, ref_nam, rtol=1e-12, atol=1e-12)


def test_input_normalisation_travels_with_the_weights(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_state(), path)
    trained = _model(2, pretrained=path)
    checkpoint = tmp_path / "model.pt"
    torch.save(trained.state_dict(), checkpoint)
    # inference builds the network with the defaults (no pretrained, no input_norm): the checkpoint brings it
    loaded = load_checkpoint(_model(2), checkpoint)
    assert loaded.config() == {**_model(2).config(), "input_norm": "imagenet"}
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.nam(x), trained.nam(x), rtol=0, atol=0)
        unnormalised = _model(2)
        unnormalised.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("input_")})
        assert unnormalised.config()["input_norm"] is None  # a state dict from before the buffers: as it came
        assert not torch.allclose(unnormalised(x), trained(x))
        scripted = torch.jit.script(loaded)
        torch.testing.assert_close(scripted.forward_with_nam(x)[1], trained.nam(x), rtol=0, atol=0)
    foreign = {**trained.state_dict(), "input_std": torch.full((1, 1, 1), 0.5)}
    with pytest.raises(ValueError, match="unknown input normalisation"):
        _model(2).load_state_dict(foreign)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        _model(1, input_norm="imagenet_rgb")
    assert _model(1, input_norm="imagenet").config()["input_norm"] == "imagenet"


@pytest.mark.parametrize("gap_levels", [1, 2])
def test_incremental_rnam_normalises_like_the_network(tmp_path, gap_levels):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_state(seed=gap_levels), path)
    net = _model(gap_levels, pretrained=path).double()
    torch.manual_seed(gap_levels)
    image = torch.rand(1, 80, 96, dtype=torch.float64)
    masks = np.zeros((3, 80, 96), bool)
    masks[0, 20:26, 30:37], masks[1, :3, :4], masks[2, 50:60, 70:80] = True, True, True
    scope = np.ones((80, 96), bool)
    with torch.no_grad():
        nam = net.nam(image[None])[0, 0].numpy()
    full = rnam_scores(net, image, nam, scope, masks, 0.1, crop=False)
    incremental = rnam_scores(net, image, nam, scope, masks, 0.1, crop=True, incremental=True)
    assert (full > 0).all()
    np.testing.assert_allclose(incremental, full, rtol=1e-9)


def test_pretrained_imagenet_through_torch_hub(tmp_path, monkeypatch):
    """``pretrained="imagenet"`` reads torchvision's file from the torch.hub cache (made here: no download)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = _torchvision_state(width=1.0)
    torch.save(state, cache / "vgg16-397923af.pth")
    torch.manual_seed(0)
    model = GAPClassifier(width=1.0, head_channels=8, pretrained="imagenet")
    assert model.config()["input_norm"] == "imagenet"
    torch.testing.assert_close(model.features[28].weight, state["features.28.weight"], rtol=0, atol=0)
    from_file = GAPClassifier(width=1.0, head_channels=8)
    from_file.load_backbone(cache / "vgg16-397923af.pth")
    torch.testing.assert_close(model.features[0].weight, from_file.features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.features[0].bias, from_file.features[0].bias, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs width=1, got 0.0625"):
        _model(1, pretrained="imagenet")
    # offline: nothing cached and the server unreachable (a closed local port stands in for no network); the
    # Oxford weights have no batch-normalised variant, so vgg16_bn has nowhere else to come from
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setitem(pretrained.TORCHVISION_URLS, True, "http://127.0.0.1:9/models/vgg16_bn-6c64b313.pth")
    message = (
        r"vgg16_bn weights cannot be downloaded from http://127\.0\.0\.1:9/models/vgg16_bn-6c64b313\.pth .*offline "
        r"Oxford weights have no batch normalisation. Copy that file into .*empty/hub/checkpoints"
    )
    with pytest.raises(RuntimeError, match=message):
        GAPClassifier(width=1.0, head_channels=8, batch_norm=True, pretrained="imagenet")


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
    model(x)  # in training mode: the running statistics leave their initial values, so a load must copy them too
    model.eval()
    logits, nam = model.forward_with_nam(x)
    assert logits.shape == (2, 2) and nam.shape == (2, 1, 64, 64)
    path = tmp_path / "bn.pt"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(GAPClassifier(gap_levels=3, width=0.0625, batch_norm=True), path).eval()
    torch.testing.assert_close(loaded.forward_with_nam(x), (logits, nam))
    with pytest.raises(ValueError, match=r"batch_norm=True; this model .* has .*batch_norm=False"):
        load_checkpoint(GAPClassifier(gap_levels=3, width=0.0625), path)
