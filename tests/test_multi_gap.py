"""Multi-GAP rules (paper, section 2.2) on hand-made NAMs that tell a right implementation from a wrong one.

The rules: C1 is the scope of the 1-GAP NAM; C is the multi-GAP NAM's most prominent blob inside C1 when it has one
(a blob whose normalised peak reaches ``multi_gap_min_peak``), else C1; candidates are taken inside C; R-NAM runs the
1-GAP classifier and compares its NAMs inside C1. Each test below is built so that one wrong reading of a rule picks
another candidate, another scope or other scores: R-NAM summed over C instead of C1, R-NAM computed with the multi-GAP
network, or any multi-GAP blob (``multi_gap_min_peak`` 0) replacing C1.
"""

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.integration.config_runs import SLICE_INFERENCE, config_files
from scripts.pipeline.scope import nam_basins, refine_scope, top_scopes
from scripts.pipeline.segmenter import WeaklySupervisedSegmenter
from torch import nn

SIZE = 64
BRIGHT = 0.75  # a candidate's value in the windowed input (~ +50 HU); the background is ~0.1 (~ -860 HU)
YY, XX = np.mgrid[:SIZE, :SIZE]

# three bright 5x5 blobs: A and B inside the refined scope C, D inside C1 but outside C
A, B, D = (28, 20), (36, 28), (24, 40)
C1_CENTRE, C_CENTRE = (32, 32), (32, 24)


def gaussian(centre, sigma, height):
    return height * np.exp(-((YY - centre[0]) ** 2 + (XX - centre[1]) ** 2) / (2 * sigma**2))


def disc(centre, radius, value=1.0):
    return value * (((YY - centre[0]) ** 2 + (XX - centre[1]) ** 2) <= radius**2)


def box(centre):
    """The 5x5 box of a blob, as ``(row_start, row_stop, col_start, col_stop)``."""
    return centre[0] - 2, centre[0] + 3, centre[1] - 2, centre[1] + 3


class ProbeNet(nn.Module):
    """A hand-made classifier: NAM = a fixed bump + sum_j (mean input in box_j - BRIGHT) * field_j.

    On the unmasked slice (every box at BRIGHT) the NAM is the bump alone; filling candidate j changes it by a known
    multiple of ``field_j``: the R-NAM score of j over a region R is ``(change of box_j's mean)^2 * sum_R field_j^2``.
    """

    def __init__(self, bump: np.ndarray, probes: list[tuple[tuple[int, int], np.ndarray]]) -> None:
        super().__init__()
        self.register_buffer("bump", torch.as_tensor(bump, dtype=torch.float32)[None, None])
        self.boxes = [box(centre) for centre, _ in probes]
        self.register_buffer("fields", torch.as_tensor(np.stack([f for _, f in probes]), dtype=torch.float32))

    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nam = self.bump.expand(x.shape[0], 1, -1, -1)
        for (r0, r1, c0, c1), field in zip(self.boxes, self.fields):
            change = x[:, :1, r0:r1, c0:c1].mean(dim=(2, 3), keepdim=True) - BRIGHT
            nam = nam + change * field
        return torch.tensor([[-5.0, 5.0]]).expand(x.shape[0], -1), nam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_nam(x)[0]


def slice_with_blobs(*centres) -> torch.Tensor:
    """``(1, H, W)`` windowed slice: faint noise around 0.1 and 5x5 blobs at BRIGHT."""
    x = 0.1 + 0.01 * torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for centre in centres:
        r0, r1, c0, c1 = box(centre)
        x[:, r0:r1, c0:c1] = BRIGHT
    return x


def nam_of(net: ProbeNet, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net.forward_with_nam(image[None])[1][0, 0].numpy().astype(np.float64)


# the 1-GAP classifier: a broad bump gives C1 (a disc of radius ~18 around the centre); removing A changes its NAM
# strongly in C1 but outside C, removing B changes it weakly inside C
FIELD_A, FIELD_B = disc((40, 42), 4, 2.0), disc(C_CENTRE, 4, 1.0)
ONE_GAP = ProbeNet(gaussian(C1_CENTRE, 10, 10.0), [(A, FIELD_A), (B, FIELD_B)]).eval()
# the multi-GAP classifier: a sharper bump inside C1 (C: a disc of radius ~10 around C_CENTRE holding A and B, not D);
# its NAM responds to B only, strongly
MULTI_GAP = ProbeNet(gaussian(C_CENTRE, 6, 10.0), [(B, disc(C_CENTRE, 6, 3.0))]).eval()


def segment(seg: WeaklySupervisedSegmenter, image: torch.Tensor, multi_nam: np.ndarray):
    return seg.segment(image, ONE_GAP, 0.99, nam_of(ONE_GAP, image), (1.0, 1.0), multi_nam=multi_nam)


def test_the_scenes_are_what_the_tests_assume():
    """C1 holds A, B and D; the multi-GAP C holds A and B only; the fields sit where the docstrings say."""
    image = slice_with_blobs(A, B, D)
    c1 = top_scopes(nam_of(ONE_GAP, image), 1)[0]
    c, refined = refine_scope(nam_of(MULTI_GAP, image), c1)
    assert refined and not (c & ~c1).any() and c.sum() < c1.sum() / 2
    for centre in (A, B, D):
        r0, r1, c0, c1_ = box(centre)
        assert c1[r0:r1, c0:c1_].all()
    for centre, inside in ((A, True), (B, True), (D, False)):
        r0, r1, c0, c1_ = box(centre)
        assert c[r0:r1, c0:c1_].all() == inside and c[r0:r1, c0:c1_].any() == inside
    field_a, field_b = FIELD_A > 0, FIELD_B > 0
    assert field_a.sum() > 40 and not (c & field_a).any() and (c1 & field_a).sum() == field_a.sum()
    assert (c & field_b).sum() == field_b.sum()


def test_candidates_come_from_the_refined_scope_and_rnam_compares_the_1gap_nams_within_c1():
    image = slice_with_blobs(A, B, D)
    seg = WeaklySupervisedSegmenter("multi_gap", multi_gap_network=MULTI_GAP)
    result = segment(seg, image, nam_of(MULTI_GAP, image))
    assert result.status == "segmented" and result.refined
    c1, c = result.base_scope, result.scopes[0]
    assert (c1 == top_scopes(nam_of(ONE_GAP, image), 1)[0]).all()
    assert c.sum() < c1.sum() and not (c & ~c1).any()  # C is a proper part of C1

    # several candidates: A and B, both in C; D lies in C1 but not in C, so it is no candidate
    assert len(result.candidates) == 2
    hits = [[c_.mask[centre] for centre in (A, B, D)] for c_ in result.candidates]
    assert hits == [[True, False, False], [False, True, False]]

    # scored within C1 with the 1-GAP network, A wins: removing it changes the 1-GAP NAM most, but outside C.
    # Scored within C, only B would change anything; with the multi-GAP network (which responds to B only), too.
    assert result.chosen == [0]
    assert result.mask[A] and not result.mask[B] and not result.mask[D]

    # the scores themselves: (box mean change)^2 * sum over C1 of the field^2; the fill value cancels in the ratio
    score_a, score_b = (cand.score for cand in result.candidates)
    overlap = []
    for cand, centre in zip(result.candidates, (A, B)):
        r0, r1, c0, c1_ = box(centre)
        overlap.append(cand.mask[r0:r1, c0:c1_].sum())
    expected = (overlap[0] ** 2 * (FIELD_A[c1] ** 2).sum()) / (overlap[1] ** 2 * (FIELD_B[c1] ** 2).sum())
    assert score_b > 0 and score_a / score_b == pytest.approx(expected, rel=1e-4)


def test_multi_gap_coarse_takes_every_candidate_of_the_refined_scope():
    image = slice_with_blobs(A, B, D)
    seg = WeaklySupervisedSegmenter("multi_gap_coarse", multi_gap_network=MULTI_GAP)
    result = segment(seg, image, nam_of(MULTI_GAP, image))
    assert result.refined and result.chosen == [0, 1]
    assert result.mask[A] and result.mask[B] and not result.mask[D]
    assert all(np.isnan(c.score) for c in result.candidates)


def faint_inside_strong_outside(inside_height: float) -> np.ndarray:
    """A multi-GAP NAM whose highest blob lies outside C1 and whose blob inside C1 peaks at ``inside_height``."""
    return gaussian((5, 58), 3, 10.0) + gaussian(C_CENTRE, 5, inside_height)


def test_refine_scope_needs_a_prominent_blob_inside_c1():
    c1 = top_scopes(nam_of(ONE_GAP, slice_with_blobs()), 1)[0]
    assert not c1[5, 58]
    faint = faint_inside_strong_outside(3.5)
    basins, peaks = nam_basins(faint)
    assert len(peaks) == 2 and 0.2 < peaks[1] < 0.45 and basins[C_CENTRE] == 2  # a real, but faint, blob in C1
    scope, refined = refine_scope(faint, c1)  # the default least peak
    assert not refined and (scope == c1).all()
    scope, refined = refine_scope(faint, c1, min_peak=0.0)  # what any blob would do
    assert refined and scope[C_CENTRE] and scope.sum() < c1.sum()
    # a prominent blob inside C1 counts although a higher one lies outside
    scope, refined = refine_scope(faint_inside_strong_outside(7.0), c1)
    assert refined and scope[C_CENTRE] and not scope[5, 58] and scope.sum() < c1.sum()


def configured_min_peaks(bundle_root):
    """The segmenter's default least peak and the one each inference config sets."""
    default = WeaklySupervisedSegmenter("multi_gap", multi_gap_network=MULTI_GAP).scope.multi_gap_min_peak
    values = {"segmenter default": default}
    for name, config in (("inference_slices.json", SLICE_INFERENCE), ("inference.json", "inference.json")):
        parser = ConfigParser()
        parser.read_config(config_files(config))
        if "segmenter#scope#multi_gap_min_peak" in parser:
            values[name] = parser["segmenter#scope#multi_gap_min_peak"]
    return values


def test_a_faint_multi_gap_blob_leaves_c1_as_the_scope(bundle_root):
    image = slice_with_blobs(A, B, D)
    faint = faint_inside_strong_outside(3.5)
    values = configured_min_peaks(bundle_root)
    assert "segmenter default" in values and "inference_slices.json" in values
    for name, min_peak in values.items():
        seg = WeaklySupervisedSegmenter(
            "multi_gap_coarse", multi_gap_network=MULTI_GAP, scope={"multi_gap_min_peak": min_peak}
        )
        result = segment(seg, image, faint)
        assert not result.refined, f"{name}: multi_gap_min_peak {min_peak} lets a faint blob replace C1"
        assert (result.scopes[0] == result.base_scope).all()
        # C = C1: D, outside the faint blob but inside C1, is a candidate too
        assert result.mask[A] and result.mask[B] and result.mask[D], name
    # the control: with no least peak the faint blob replaces C1 and D is lost
    seg = WeaklySupervisedSegmenter("multi_gap_coarse", multi_gap_network=MULTI_GAP, scope={"multi_gap_min_peak": 0.0})
    result = segment(seg, image, faint)
    assert result.refined and not result.mask[D]
