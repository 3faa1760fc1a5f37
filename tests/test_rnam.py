"""R-NAM screening: the right candidate, batching, and the exact stride-aligned crop."""

import numpy as np
import pytest
import torch
from scripts.networks import GAPClassifier
from scripts.rnam import crop_window, fill_candidates, logits_and_nam, rnam_scores
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


@pytest.mark.parametrize("gap_levels", [1, 2, 3])
def test_cropped_equals_full_image_scores(gap_levels):
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
    cropped = rnam_scores(net, image, nam, scope, masks, 0.1, crop=True)
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


def test_network_without_nam():
    with pytest.raises(TypeError, match="NAM"):
        logits_and_nam(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 8, 8))
