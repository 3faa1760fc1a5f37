"""Where the NAM looks: the localisation figures on hand-made NAMs whose answers are known, and the picture."""

import numpy as np
import pytest
from scripts.evaluation.localisation import format_localisation, localisation_summary, localise
from scripts.evaluation.nam_sheet import choose_slices, draw_nam_sheet
from skimage.io import imread

SIZE = 32


def _slice(peak: tuple[int, int]) -> dict:
    """A 3x3 nodule at rows/cols 9-11 in a slice that is all lung, and a NAM whose one maximum is at ``peak``."""
    label = np.zeros((SIZE, SIZE), bool)
    label[9:12, 9:12] = True
    nam = np.zeros((SIZE, SIZE))
    nam[peak] = 5.0
    return {"nam": nam, "label": label, "lung": np.ones((SIZE, SIZE), bool)}


@pytest.mark.parametrize(
    "peak, inside, near",
    [((10, 10), True, True), ((10, 19), False, True), ((19, 19), False, True), ((10, 20), False, False)],
)
def test_peak_within_tolerance(peak, inside, near):
    where = localise(**_slice(peak), tolerance_px=8)
    assert where.peak == peak
    assert (where.inside, where.near) == (inside, near)
    # 8-connected dilation of a 3x3 square by 8 pixels: a 19x19 square of the 32x32 lung
    assert where.chance == pytest.approx(19 * 19 / SIZE**2)


def test_percentile_ranks_the_nam_on_the_nodule_among_the_lungs():
    s = _slice((10, 10))
    rows, cols = np.mgrid[:SIZE, :SIZE]
    s["nam"] = -np.hypot(rows - 10, cols - 10)  # highest on the nodule's centre, falling with distance
    assert localise(**s).percentile > 99.0
    s["nam"] = -s["nam"]  # lowest there: the nodule is where the NAM looks least
    assert localise(**s).percentile < 2.0
    s["nam"] = np.zeros((SIZE, SIZE))  # a flat NAM ranks every pixel at the top: no better than blind
    assert localise(**s).percentile == pytest.approx(100.0)


def test_a_juxtapleural_nodule_counts_its_pixels_outside_the_lung_mask():
    s = _slice((10, 10))
    s["lung"][:, :11] = False  # the nodule straddles the lung's edge
    where = localise(**s)
    assert where.inside and where.near
    assert 0 < where.chance < 1


def test_summary_and_report_text():
    found = [localise(**_slice(p)) for p in [(10, 10), (10, 19), (10, 20), (30, 30)]]
    summary = localisation_summary(found, probabilities=[0.9, 0.8, 0.4, 0.6, 0.2, 0.1], classes=[1, 1, 1, 1, 0, 0])
    assert summary["nodule_slices"] == 4 and summary["slices"] == 6
    assert summary["peak_near"] == 0.5 and summary["peak_inside"] == 0.25
    assert summary["auc"] == pytest.approx(1.0) and summary["accuracy"] == pytest.approx(5 / 6)
    text = format_localisation(summary)
    assert "test AUC 1.000" in text and "on 50.0 % of 4 nodule slices (chance 35.3 %)" in text
    assert localisation_summary(found)["auc"] is None
    with pytest.raises(ValueError, match="no nodule slice"):
        localisation_summary([])
    with pytest.raises(ValueError, match="the ground truth is empty"):
        localise(np.zeros((4, 4)), np.zeros((4, 4)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="must be 2-D of one shape"):
        localise(np.zeros((4, 4)), np.ones((4, 5)), np.ones((4, 4)))


def _pictured(subject: str, peak: tuple[int, int]) -> dict:
    image = np.full((SIZE, SIZE), 0.2)
    image[9:12, 9:12] = 0.8
    return {**_slice(peak), "class": 1, "subject": subject, "image": image, "probability": 0.7}


def test_picture_draws_hits_and_misses_of_distinct_subjects(tmp_path):
    slices = [_pictured(f"S{i}", (10, 10) if i % 3 else (30, 30)) for i in range(20)]
    slices.append({"class": 0, "subject": "S0"})  # a slice without nodule is never drawn
    slices.append(_pictured("S1", (10, 10)))  # a second slice of a subject already drawn
    chosen = choose_slices(slices, n=6, seed=1)
    assert len(chosen) == 6
    assert len({slices[i]["subject"] for i in chosen}) == 6
    hits = [localise(slices[i]["nam"], slices[i]["label"], slices[i]["lung"]).near for i in chosen]
    assert sum(hits) == 3  # half hits, half misses: there are 6 misses (S0, S3, ...) and 14 hits to choose from
    assert choose_slices(slices, n=6, seed=1) == chosen  # seeded
    only_hits = [s for s in slices if s["class"] == 1 and s["subject"] not in ("S0", "S3", "S6", "S9", "S12", "S15")]
    assert len(choose_slices(only_hits, n=6)) == 6  # the misses' share is filled with hits
    path = tmp_path / "sheet.png"
    assert draw_nam_sheet(slices, path, n=6, seed=1) == chosen
    picture = imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 600
    assert len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)) > 50  # drawn panels, not a blank page
    with pytest.raises(ValueError, match="no nodule slice to draw"):
        draw_nam_sheet([{"class": 0, "subject": "S0"}], path)
