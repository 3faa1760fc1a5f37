"""``ModelSpacingd`` resamples slice by slice to what MONAI's ``Spacing`` gives for the same spacing, and its inverse
(through ``Invertd``, as the inference config uses it) brings outputs back to the input grid as ``Spacing``'s does."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Spacing, Spacingd
from scipy import ndimage
from scripts.pipeline.orient import ModelSpacingd, resample_slices

SPACING_RANGE = [1.0, 1.2]


def _turned(degrees: float, axis: int) -> np.ndarray:
    """A rotation by ``degrees`` about the patient ``axis`` (0: x, 2: z)."""
    angle = np.radians(degrees)
    plane = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[np.ix_(plane, plane)] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation


GRIDS = {
    "axial": (np.eye(3), (0.7, 0.7, 2.5)),
    "flipped, anisotropic": (np.diag([-1.0, 1.0, -1.0]), (0.7, 0.55, 2.5)),
    "turned about z": (_turned(10.0, 2), (0.65, 0.7, 1.25)),
    "tilted about x": (_turned(12.0, 0), (0.7, 0.7, 2.0)),
}


def _scan(name: str) -> MetaTensor:
    rotation, spacing = GRIDS[name]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (14.0, -30.0, 80.0)
    noise = np.random.default_rng(0).normal(size=(45, 38, 6))
    volume = ndimage.gaussian_filter(noise, (2.0, 2.0, 0.0)) * 3000.0 - 500.0
    return MetaTensor(torch.as_tensor(volume[None], dtype=torch.float32), affine=torch.as_tensor(affine))


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_slice_by_slice_resampling_is_spacings(name):
    scan = _scan(name)
    ours = ModelSpacingd("image", pixel_spacing_range=SPACING_RANGE)({"image": scan.clone()})["image"]
    target = [float(np.clip(s, *SPACING_RANGE)) for s in GRIDS[name][1][:2]]
    reference = Spacing(pixdim=[*target, -1.0], mode="bilinear", padding_mode="border", dtype=torch.float32)(scan)

    assert ours.shape == reference.shape and ours.shape[-1] == scan.shape[-1]
    assert ours.shape[1] < scan.shape[1]  # coarser pixels: fewer of them
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-6)
    np.testing.assert_allclose(ours.pixdim[:3], [*target, GRIDS[name][1][2]], rtol=1e-6)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-3)  # HU; float32 rounding of the grid only
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_outputs_go_back_to_the_input_grid_as_spacings_do(name):
    """A mask and a map on the model's grid, inverted with nearest interpolation (the config's ``Invertd``)."""
    scan = _scan(name)
    target = [float(np.clip(s, *SPACING_RANGE)) for s in GRIDS[name][1][:2]]
    ours = Compose([ModelSpacingd("image", pixel_spacing_range=SPACING_RANGE)])
    theirs = Compose([Spacingd("image", pixdim=[*target, -1.0], padding_mode="border", dtype=torch.float32)])
    inverted = []
    for preprocessing in (ours, theirs):
        data = preprocessing({"image": scan.clone()})
        generator = torch.Generator().manual_seed(1)
        outputs = torch.stack(
            [(torch.rand(data["image"].shape[1:], generator=generator) > 0.6).float(), data["image"][0] / 1000.0]
        )
        data["outputs"] = MetaTensor(outputs, meta=data["image"].meta)
        back = Invertd("outputs", preprocessing, orig_keys="image", nearest_interp=True)(data)["outputs"]
        inverted.append(back)
    assert inverted[0].shape == (2, *scan.shape[1:])
    np.testing.assert_allclose(inverted[0].affine, scan.affine, atol=1e-6)
    torch.testing.assert_close(inverted[0].as_tensor()[0], inverted[1].as_tensor()[0], rtol=0, atol=0)
    torch.testing.assert_close(inverted[0].as_tensor()[1], inverted[1].as_tensor()[1], rtol=0, atol=2e-6)


def test_a_scan_in_range_is_not_resampled():
    scan = _scan("axial")
    inside = ModelSpacingd("image", pixel_spacing_range=[0.6, 0.8])({"image": scan.clone()})["image"]
    torch.testing.assert_close(inside.as_tensor(), scan.as_tensor(), rtol=0, atol=0)
    np.testing.assert_allclose(inside.affine, scan.affine)


def test_a_transform_that_moves_the_slice_axis_is_refused():
    xform = np.eye(4)
    xform[2, 3] = 0.5
    with pytest.raises(ValueError, match="moves the slice axis"):
        resample_slices(torch.zeros(1, 4, 4, 3), xform, [4, 4, 3])
