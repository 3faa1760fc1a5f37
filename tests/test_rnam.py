"""R-NAM screening: the right candidate, batching, the exact stride-aligned crop and incremental recomputation."""

import numpy as np
import pytest
import torch
from scripts.networks.gap_classifier import GAPClassifier
from scripts.networks.precision import cpu_has_bf16
from scripts.networks.runtime import BFloat16Classifier
from scripts.pipeline import screen
from scripts.pipeline.classify import logits_and_nam
from scripts.pipeline.screen import (
    IncrementalNAM,
    _groups,
    crop_window,
    fill_candidates,
    rnam_scores,
    supports_incremental,
)
from torch import nn


class RegionNet(nn.Module):
    """A NAM that responds to bright pixels, weighted by a fixed map: only one region really counts."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.blur = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        nn.init.constant_(self.blur.weight, 1 / 25)

    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nam = self.blur(torch.relu(x - 0.5)) * self.weight
        logit = nam.mean(dim=(2, 3))
        return torch.cat([-logit, logit], dim=1), nam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_nam(x)[0]


def two_blob_image(size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    image = torch.full((1, size, size), 0.1)
    masks = np.zeros((2, size, size), bool)
    masks[0, 20:26, 20:26] = True
    masks[1, 36:42, 36:42] = True
    image[0, torch.as_tensor(masks.any(0))] = 0.8
    return image, masks


@pytest.mark.parametrize("important", [0, 1])
def test_picks_the_candidate_the_nam_depends_on(important):
    image, masks = two_blob_image()
    weight = torch.full((1, 1, 64, 64), 0.1)
    r0, c0 = (20, 20) if important == 0 else (36, 36)
    weight[..., r0 - 4 : r0 + 10, c0 - 4 : c0 + 10] = 1.0
    net = RegionNet(weight).eval()
    with torch.no_grad():
        _, nam = logits_and_nam(net, image[None])
    scope = np.zeros((64, 64), bool)
    scope[10:50, 10:50] = True
    scores = rnam_scores(net, image, nam[0, 0].numpy(), scope, masks, fill_value=0.1)
    assert scores.shape == (2,) and int(np.argmax(scores)) == important
    assert scores[important] > 5 * scores[1 - important] > 0


def test_no_candidates_or_empty_scope():
    image, masks = two_blob_image()
    net = RegionNet(torch.ones(1, 1, 64, 64))
    nam = np.zeros((64, 64))
    assert rnam_scores(net, image, nam, np.ones((64, 64), bool), masks[:0], 0.1).shape == (0,)
    np.testing.assert_array_equal(rnam_scores(net, image, nam, np.zeros((64, 64), bool), masks, 0.1), [0.0, 0.0])
    with pytest.raises(ValueError, match="one size"):
        rnam_scores(net, image, nam, np.ones((64, 64), bool), masks[:, :10], 0.1)


def test_fill_candidates():
    image, masks = two_blob_image()
    filled = fill_candidates(image, masks, 0.25)
    assert filled.shape == (2, 1, 64, 64)
    assert (filled[0, 0][torch.as_tensor(masks[0])] == 0.25).all()
    assert (filled[0, 0][torch.as_tensor(masks[1])] == 0.8).all()


def test_crop_window():
    assert crop_window((20, 30, 40, 50), (256, 256), 16, 40) == (slice(0, 80), slice(0, 96))
    assert crop_window((200, 100, 210, 120), (256, 256), 16, 40) == (slice(160, 256), slice(48, 160))
    assert crop_window((100, 100, 140, 140), (256, 256), 16, 129) is None  # not smaller than the image
    assert crop_window((20, 30, 40, 50), (250, 256), 16, 40) is None  # size not a multiple of the stride
    with pytest.raises(ValueError):
        crop_window((0, 0, 1, 1), (16, 16), 0, 1)


def random_slice(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, generator=g) * 0.4


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("gap_levels", [1, 2, 3])
def test_cropped_equals_full_image_scores(gap_levels, incremental):
    torch.manual_seed(gap_levels)
    net = GAPClassifier(gap_levels=gap_levels, width=1 / 16, head_channels=256).double().eval()
    image = random_slice(256).double()  # float64: the comparison is not blurred by float32 rounding
    masks = np.zeros((3, 256, 256), bool)
    masks[0, 24:30, 20:27] = True
    masks[1, 40:46, 36:40] = True
    masks[2, 30:33, 44:50] = True
    image[0, torch.as_tensor(masks.any(0))] = 0.75
    scope = np.zeros((256, 256), bool)
    scope[18:52, 16:54] = True
    window = crop_window((18, 16, 52, 54), (256, 256), net.nam_stride, net.nam_context_radius)
    assert window is not None and (window[0].stop - window[0].start) < 256  # the crop is really smaller
    with torch.no_grad():
        nam = net.nam(image[None])[0, 0].numpy()
    full = rnam_scores(net, image, nam, scope, masks, 0.1, crop=False)
    cropped = rnam_scores(net, image, nam, scope, masks, 0.1, crop=True, incremental=incremental)
    assert (full > 0).all()
    np.testing.assert_allclose(cropped, full, rtol=1e-9)


def test_batched_equals_one_by_one():
    torch.manual_seed(0)
    net = GAPClassifier(gap_levels=1, width=1 / 16, head_channels=256).double().eval()
    image = random_slice(64, seed=1).double()
    masks = np.zeros((4, 64, 64), bool)
    for j in range(4):
        masks[j, 10 + 10 * j : 16 + 10 * j, 20:28] = True
    scope = np.ones((64, 64), bool)
    with torch.no_grad():
        nam = net.nam(image[None])[0, 0].numpy()
    batched = rnam_scores(net, image, nam, scope, masks, 0.0)
    single = rnam_scores(net, image, nam, scope, masks, 0.0, batch_size=1)
    np.testing.assert_allclose(batched, single, rtol=1e-9)
    assert len(set(np.round(batched, 12))) == 4


def small_classifier(gap_levels: int, seed: int = 0, batch_norm: bool = False) -> GAPClassifier:
    torch.manual_seed(seed)
    net = GAPClassifier(gap_levels=gap_levels, width=1 / 16, head_channels=256, batch_norm=batch_norm)
    for layer in net.modules():  # running statistics far from the identity, so the test sees them
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.2, 0.2)
    return net.double().eval()


def border_candidates(h: int, w: int) -> np.ndarray:
    """Candidates of different sizes at the corners, on the edges and inside an ``(h, w)`` image."""
    masks = np.zeros((7, h, w), bool)
    masks[0, :3, :4] = True  # top-left corner
    masks[1, h - 2 :, w - 5 :] = True  # bottom-right corner: the odd last row/column that pooling drops
    masks[2, 30:41, :2] = True  # left edge
    masks[3, h // 2, w // 2] = True  # one pixel
    masks[4, 20:32, 40:55] = True  # large
    masks[5, :1, w - 9 : w - 3] = True  # top edge
    # one pixel in the bottom-right corner: with an odd height its change reaches a single row of the first pooling
    masks[6, h - 1, w - 1] = True
    return masks


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("shape", [(80, 96), (75, 90)])
@pytest.mark.parametrize("gap_levels", [1, 2, 3])
def test_incremental_equals_full_image_scores(gap_levels, shape, batch_norm):
    net = small_classifier(gap_levels, seed=gap_levels, batch_norm=batch_norm)
    assert supports_incremental(net)
    if batch_norm:  # in training mode BN uses the batch's statistics: not elementwise, so not supported
        assert not supports_incremental(small_classifier(gap_levels, batch_norm=True).train())
    image = random_slice(max(shape), seed=gap_levels)[:, : shape[0], : shape[1]].double()
    masks = border_candidates(*shape)
    image[0, torch.as_tensor(masks.any(0))] += 0.5
    scope = np.ones(shape, bool)  # the whole NAM, borders included, counts
    with torch.no_grad():
        nam = net.nam(image[None])[0, 0].numpy()
    full = rnam_scores(net, image, nam, scope, masks, 0.1, crop=False)
    assert (full > 0).all()
    for batch_size in (None, 1, 4):  # one window for all, one per candidate, and a partial last batch
        incremental = rnam_scores(net, image, nam, scope, masks, 0.1, batch_size=batch_size)
        np.testing.assert_allclose(incremental, full, rtol=1e-9)


@pytest.mark.parametrize("gap_levels", [1, 2, 3])
def test_kept_forward_is_the_network_s_and_screens_without_a_forward(gap_levels):
    """``IncrementalNAM`` is the network's forward (its logits and NAM are ``forward_with_nam``'s), and R-NAM
    started from it scores as the full image's full forwards do, running nothing through the whole network."""
    net = small_classifier(gap_levels, seed=gap_levels, batch_norm=True)
    image = random_slice(80, seed=gap_levels).double()
    masks = border_candidates(80, 80)
    image[0, torch.as_tensor(masks.any(0))] += 0.5
    scope = np.zeros((80, 80), bool)
    scope[10:60, 15:70] = True
    with torch.no_grad():
        logits, nam = net.forward_with_nam(image[None])
        kept = IncrementalNAM(net, image)
        np.testing.assert_array_equal(kept.logits().numpy(), logits.numpy())
        np.testing.assert_array_equal(kept.nam().numpy(), nam.numpy())
    full = rnam_scores(net, image, nam[0, 0].numpy(), scope, masks, 0.1, crop=False)
    batches = []
    net.features[0].register_forward_hook(lambda module, args, out: batches.append(args[0].shape))
    for batch_size in (None, 2):
        np.testing.assert_allclose(
            rnam_scores(net, image, None, scope, masks, 0.1, base=kept, batch_size=batch_size), full, rtol=1e-9
        )
    assert batches == []  # no forward: the masked copies' windows go through F.conv2d, not through conv1_1
    other = IncrementalNAM(net, random_slice(80, seed=9).double())  # another slice's forward: other scores
    assert np.abs(rnam_scores(net, image, None, scope, masks, 0.1, base=other) - full).max() > 1e-3 * full.max()
    with pytest.raises(ValueError, match="kept forward"):
        rnam_scores(net, image[:, :64, :64], None, scope[:64, :64], masks[:, :64, :64], 0.1, base=kept)


@pytest.mark.parametrize("gap_levels", [1, 3])
def test_window_cost_counts_the_layers_recomputed(gap_levels):
    """``window_cost`` of the whole image is the multiply-adds of the forward's windowed layers up to the heads (each
    output pixel: in-channels x out-channels x kernel for a convolution, channels x kernel for a pooling), counted
    here from the outputs the layers give; a smaller window costs less."""
    net = small_classifier(gap_levels)
    image = random_slice(64).double()
    kept = IncrementalNAM(net, image)
    counted = []

    def count(module, args, out):
        per_pixel = module.weight.numel() if isinstance(module, nn.Conv2d) else out.shape[1] * module.kernel_size**2
        counted.append(out.shape[2] * out.shape[3] * per_pixel)

    layers = [*net.features[: max(net.tap_indices) + 1], *(layer for head in net.heads for layer in head)]
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            layer.register_forward_hook(count)
    with torch.no_grad():
        net.forward_with_nam(image[None])
    assert kept.window_cost((0, 64), (0, 64)) == sum(counted)
    assert 0 < kept.window_cost((30, 31), (30, 31)) < kept.window_cost((20, 40), (20, 40)) < sum(counted)


def test_candidates_near_each_other_share_a_window(monkeypatch):
    """Left to the segmenter (``batch_size`` None), candidates next to each other are recomputed in one window and one
    far from them in its own (with a group's overhead of 5 % of a whole forward here); a candidate
    without pixels is in none and scores 0."""
    net = small_classifier(1).float()
    image = random_slice(128)
    kept = IncrementalNAM(net, image)
    monkeypatch.setattr(screen, "GROUP_OVERHEAD_MACS", 0.05 * kept.window_cost((0, 128), (0, 128)))
    masks = np.zeros((4, 128, 128), bool)
    masks[0, 10:14, 10:14], masks[1, 10:14, 16:20], masks[3, 110:114, 110:114] = True, True, True
    assert [g.tolist() for g, _ in _groups(kept, masks, None)] == [[0, 1], [3]]
    assert [g.tolist() for g, _ in _groups(kept, masks, 2)] == [[0, 1], [3]]
    assert [g.tolist() for g, _ in _groups(kept, masks, 1)] == [[0], [1], [3]]
    scores = rnam_scores(net, image, None, np.ones((128, 128), bool), masks, 0.1, base=kept)
    assert scores[2] == 0 and (scores[[0, 1, 3]] > 0).all()


def test_incremental_keeps_masked_copies_out_of_the_full_network():
    net = small_classifier(1)
    batches = []
    net.features[2].register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    image, masks = random_slice(64).double(), border_candidates(64, 64)
    scope, nam = np.ones((64, 64), bool), np.zeros((64, 64))
    rnam_scores(net, image, nam, scope, masks, 0.1)
    assert batches == [1]  # only the unmasked image ran through conv1_2 as a whole
    rnam_scores(net, image, nam, scope, masks, 0.1, incremental=False)
    assert batches == [1, len(masks)]


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16: the bfloat16 path runs float32")
@pytest.mark.parametrize("gap_levels", [1, 2])
def test_bfloat16_classifier_screens_incrementally(gap_levels):
    """The bfloat16 classifier's R-NAM takes the incremental path (only the unmasked image runs through conv1_2 as a
    whole), conv1_1 in float32 and conv1_2 on in bfloat16, and gives its own full forwards' scores. (Against
    float32 an untrained network's small score differences drown in bfloat16's rounding: a trained model's figures
    are bench_precision's.)"""
    net = small_classifier(gap_levels, seed=gap_levels, batch_norm=True).float()
    reduced = BFloat16Classifier(net)
    seen = []
    for index in (0, reduced.float32_prefix):  # conv1_1, conv1_2
        net.features[index].register_forward_hook(lambda module, args, out: seen.append((args[0].shape[0], out.dtype)))
    image, masks = random_slice(64, seed=gap_levels), np.zeros((3, 64, 64), bool)
    masks[0, 20:30, 20:30], masks[1, 40:46, 36:42], masks[2, 10:13, 45:48] = True, True, True
    image[0, torch.as_tensor(masks.any(0))] += 0.6
    scope = np.ones((64, 64), bool)
    scores = rnam_scores(reduced, image, None, scope, masks, 0.1)
    assert seen == [(1, torch.float32), (1, torch.bfloat16)]
    np.testing.assert_allclose(
        scores, rnam_scores(reduced, image, None, scope, masks, 0.1, incremental=False), rtol=1e-3
    )
    assert (scores > 0).all()


def test_unsupported_layers_take_the_general_path():
    net = small_classifier(2)
    conv = net.features[0]
    reflect = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, padding_mode="reflect").double()
    reflect.load_state_dict(conv.state_dict())
    net.features[0] = reflect  # reads different border pixels than zero padding: the incremental path would differ
    assert not supports_incremental(net)
    assert not supports_incremental(RegionNet(torch.ones(1, 1, 8, 8)))
    image, masks = random_slice(64).double(), border_candidates(64, 64)
    scope = np.ones((64, 64), bool)
    with torch.no_grad():
        nam = net.nam(image[None])[0, 0].numpy()
    np.testing.assert_allclose(
        rnam_scores(net, image, nam, scope, masks, 0.1), rnam_scores(net, image, nam, scope, masks, 0.1, crop=False)
    )


def test_network_without_nam():
    with pytest.raises(TypeError, match="NAM"):
        logits_and_nam(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 8, 8))
