"""Calibration: exact order-statistic thresholds, the too-few-images flag, serialisation, histogram, area."""

from __future__ import annotations

import json

import numpy as np
import pytest

from winclip_cli.core.calibration import Calibration, anomalous_area, calibrate, histogram, threshold_for_fpr
from winclip_cli.errors import SetupError

HUNDRED = np.arange(100) / 100  # 0.00, 0.01, ..., 0.99


# --------------------------------------------------------------------------------------------------
# threshold_for_fpr
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fpr", "expected"),
    [
        # m = floor(fpr * 100) scores may lie above t; t = s_(100 - m) = (99 - m) / 100.
        (0.05, 0.94),
        (0.0, 0.99),  # m = 0: the maximum
        (0.01, 0.98),
        (0.29, 0.70),  # 0.29 * 100 = 28.999999999999996 in floats: the guard keeps m = 29
        (0.07, 0.92),  # 0.07 * 100 = 7.000000000000001: m = 7
        (0.999, 0.00),  # m = 99: the minimum
    ],
)
def test_threshold_exact_quantiles(fpr, expected) -> None:
    rng = np.random.default_rng(0)
    scores = rng.permutation(HUNDRED)  # input order must not matter
    assert threshold_for_fpr(scores, fpr) == expected
    assert np.mean(scores > threshold_for_fpr(scores, fpr)) <= fpr


def test_threshold_single_score() -> None:
    # n = 1: m = floor(fpr) = 0 for every allowed fpr, so t is the only score.
    assert threshold_for_fpr(np.array([0.42]), 0.5) == 0.42
    assert threshold_for_fpr(np.array([0.42]), 0.0) == 0.42


def test_threshold_with_ties() -> None:
    # Sorted [.1 .2 .2 .2 .3], fpr .2: m = 1 -> t = s_4 = .2, exactly 1/5 above.
    scores = np.array([0.2, 0.3, 0.2, 0.1, 0.2])
    assert threshold_for_fpr(scores, 0.2) == 0.2
    # fpr .4: m = 2 -> t = s_3 = .2 again; only 1/5 lies above, below the requested .4 (allowed).
    assert threshold_for_fpr(scores, 0.4) == 0.2
    # fpr .8: m = 4 -> t = s_1 = .1; 4/5 above.
    assert threshold_for_fpr(scores, 0.8) == 0.1


def test_threshold_is_smallest_observed_meeting_the_rate() -> None:
    # Brute force over the observed scores on random data with many ties.
    rng = np.random.default_rng(1)
    for _ in range(50):
        scores = np.round(rng.random(int(rng.integers(1, 40))), 1)
        fpr = float(rng.choice([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9]))
        allowed = [t for t in scores if np.sum(scores > t) <= np.floor(fpr * scores.size + 1e-9)]
        assert threshold_for_fpr(scores, fpr) == min(allowed)


@pytest.mark.parametrize(
    ("scores", "fpr", "match"),
    [
        ([0.1, np.nan], 0.1, "NaN"),
        ([0.1, np.inf], 0.1, "infinite"),
        ([], 0.1, "no calibration scores"),
        ([0.1, 0.2], 1.0, r"\[0, 1\)"),
        ([0.1, 0.2], -0.01, r"\[0, 1\)"),
        ([0.1, 0.2], float("nan"), r"\[0, 1\)"),
        ([0.1, 0.2], "0.1", "number"),
    ],
)
def test_threshold_rejects_bad_input(scores, fpr, match) -> None:
    with pytest.raises(SetupError, match=match):
        threshold_for_fpr(np.array(scores, dtype=float), fpr)


# --------------------------------------------------------------------------------------------------
# calibrate / Calibration
# --------------------------------------------------------------------------------------------------


def test_calibrate_hundred_images() -> None:
    pixels = np.arange(1000) / 1000  # m = floor(.01 * 1000) = 10 -> t = s_990 = 0.989
    cal = calibrate(HUNDRED, pixels, fpr=0.05, pixel_fpr=0.01)
    assert cal.threshold == 0.94
    assert cal.achieved_fpr == 0.05
    assert cal.n_images == 100
    assert cal.pixel_threshold == 0.989
    assert cal.pixel_fpr == 0.01
    assert cal.min_images_for_fpr == 20
    assert cal.enough_images


def test_calibrate_pixel_fpr_defaults_to_fpr() -> None:
    cal = calibrate(HUNDRED, HUNDRED, fpr=0.1)
    assert cal.pixel_fpr == 0.1
    assert cal.pixel_threshold == cal.threshold == 0.89


def test_calibrate_without_pixels() -> None:
    cal = calibrate(HUNDRED, None, fpr=0.1)
    assert cal.pixel_threshold is None
    assert Calibration.from_dict(json.loads(json.dumps(cal.as_dict()))) == cal


def test_achieved_fpr_with_ties() -> None:
    # Sorted [.1 .2 .2 .2 .3], fpr .4: t = .2, only .3 lies above -> achieved 1/5.
    cal = calibrate(np.array([0.2, 0.3, 0.2, 0.1, 0.2]), None, fpr=0.4)
    assert cal.threshold == 0.2
    assert cal.achieved_fpr == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("fpr", "n", "minimum", "enough"),
    [
        (0.05, 19, 20, False),  # 19 images: floor(.95) = 0 false positives allowed -> just the max
        (0.05, 20, 20, True),
        (0.1, 10, 10, True),
        (0.3, 3, 4, False),  # ceil(1 / .3) = 4
        (0.01, 50, 100, False),
        (0.0, 1, 1, True),  # rate 0 is met by the maximum with any number of images
    ],
)
def test_too_few_images_flag(fpr, n, minimum, enough) -> None:
    cal = calibrate(np.linspace(0, 1, n), None, fpr=fpr)
    assert cal.min_images_for_fpr == minimum
    assert cal.enough_images is enough
    if not enough:
        # Too few images: no false positive is allowed, so the threshold is the highest score seen.
        assert cal.threshold == 1.0
        assert cal.achieved_fpr == 0.0


def test_as_dict_round_trip_through_json() -> None:
    cal = calibrate(HUNDRED, np.linspace(0, 1, 37), fpr=0.05, pixel_fpr=0.02)
    data = json.loads(json.dumps(cal.as_dict()))
    assert data == {
        "threshold": 0.94,
        "fpr": 0.05,
        "achieved_fpr": 0.05,
        "n_images": 100,
        "pixel_threshold": cal.pixel_threshold,
        "pixel_fpr": 0.02,
        "min_images_for_fpr": 20,
    }
    assert Calibration.from_dict(data) == cal
    # Integers where floats are expected are fine (JSON writers may drop ".0"); extra keys are ignored.
    assert Calibration.from_dict({**data, "threshold": 1, "comment": "x"}).threshold == 1.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": "0.5"}, "'threshold' must be a finite number"),
        ({"threshold": None}, "'threshold' must be a finite number"),
        ({"threshold": float("nan")}, "'threshold' must be a finite number"),
        ({"fpr": 1.5}, r"'fpr' must be in \[0, 1\)"),
        ({"fpr": True}, "'fpr' must be a finite number"),
        ({"achieved_fpr": -0.1}, "'achieved_fpr'"),
        ({"n_images": 3.0}, "'n_images' must be a positive integer"),
        ({"n_images": 0}, "'n_images' must be a positive integer"),
        ({"min_images_for_fpr": "20"}, "'min_images_for_fpr'"),
        ({"pixel_threshold": [0.5]}, "'pixel_threshold'"),
        ({"pixel_fpr": -1}, "'pixel_fpr'"),
    ],
)
def test_from_dict_rejects_bad_fields(change, match) -> None:
    data = calibrate(HUNDRED, HUNDRED, fpr=0.05).as_dict()
    with pytest.raises(SetupError, match=match):
        Calibration.from_dict({**data, **change})


def test_from_dict_rejects_missing_field_and_non_dict() -> None:
    data = calibrate(HUNDRED, None, fpr=0.05).as_dict()
    del data["n_images"]
    with pytest.raises(SetupError, match="lacks 'n_images'"):
        Calibration.from_dict(data)
    with pytest.raises(SetupError, match="JSON object"):
        Calibration.from_dict([0.5])  # type: ignore[arg-type]


def test_calibrate_rejects_bad_input() -> None:
    with pytest.raises(SetupError, match="no image scores"):
        calibrate(np.array([]), None, fpr=0.1)
    with pytest.raises(SetupError, match="pixel scores are NaN"):
        calibrate(HUNDRED, np.array([0.1, np.nan]), fpr=0.1)
    with pytest.raises(SetupError, match="pixel_fpr"):
        calibrate(HUNDRED, HUNDRED, fpr=0.1, pixel_fpr=1.0)


# --------------------------------------------------------------------------------------------------
# histogram
# --------------------------------------------------------------------------------------------------


def test_histogram_counts_and_edges() -> None:
    scores = np.array([0.0, 0.1, 0.24, 0.25, 0.5, 0.74, 0.99, 1.0])
    bins = histogram(scores, bins=4)
    assert [(lo, hi) for lo, hi, _ in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    # [0, .25): 0, .1, .24 | [.25, .5): .25 | [.5, .75): .5, .74 | [.75, 1]: .99, 1.0 (last bin closed)
    assert [count for _, _, count in bins] == [3, 1, 2, 2]


def test_histogram_clips_outliers_into_end_bins() -> None:
    bins = histogram(np.array([-3.0, 0.5, 7.0, 2.0]), bins=2, lo=0.0, hi=2.0)
    assert bins == [(0.0, 1.0, 2), (1.0, 2.0, 2)]
    assert sum(count for _, _, count in histogram(HUNDRED * 5 - 2)) == 100


def test_histogram_default_twenty_bins() -> None:
    # Bin centres of 100 equal bins, so float rounding of the edges cannot move a score across one.
    bins = histogram((np.arange(100) + 0.5) / 100)
    assert len(bins) == 20
    assert all(count == 5 for _, _, count in bins)
    assert bins[0][:2] == (0.0, 0.05) and bins[-1][1] == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [({"bins": 0}, "bins"), ({"lo": 1.0, "hi": 1.0}, "lo < hi")])
def test_histogram_bad_arguments(kwargs, match) -> None:
    with pytest.raises(SetupError, match=match):
        histogram(HUNDRED, **kwargs)
    with pytest.raises(SetupError, match="NaN"):
        histogram(np.array([np.nan]))


# --------------------------------------------------------------------------------------------------
# anomalous_area
# --------------------------------------------------------------------------------------------------


def test_anomalous_area_two_blobs_largest_box() -> None:
    amap = np.zeros((6, 8))
    amap[0:2, 0:2] = 0.9  # 4 pixels at x 0..1, y 0..1
    amap[3:6, 4:7] = 0.8  # 9 pixels at x 4..6, y 3..5  <- largest
    amap[2, 7] = 0.5  # exactly at the threshold: not over
    fraction, box = anomalous_area(amap, 0.5)
    assert fraction == pytest.approx(13 / 48)
    assert box == (4, 3, 7, 6)


def test_anomalous_area_diagonal_pixels_form_one_region() -> None:
    # A diagonal of 4 pixels (one 8-connected region) beats a 3-pixel horizontal bar.
    amap = np.zeros((5, 9))
    for i in range(4):
        amap[i, i] = 1.0
    amap[4, 5:8] = 1.0
    fraction, box = anomalous_area(amap, 0.5)
    assert fraction == pytest.approx(7 / 45)
    assert box == (0, 0, 4, 4)


def test_anomalous_area_nothing_over() -> None:
    assert anomalous_area(np.full((4, 4), 0.3), 0.3) == (0.0, None)


def test_anomalous_area_whole_map() -> None:
    assert anomalous_area(np.ones((3, 5)), 0.0) == (1.0, (0, 0, 5, 3))


def test_anomalous_area_equal_blobs_keep_first() -> None:
    amap = np.zeros((4, 4))
    amap[3, 0] = amap[0, 3] = 1.0  # equal size: the first in row-major order wins
    assert anomalous_area(amap, 0.5) == (pytest.approx(2 / 16), (3, 0, 4, 1))


def test_anomalous_area_rejects_bad_maps() -> None:
    with pytest.raises(SetupError, match="2-D"):
        anomalous_area(np.zeros((2, 2, 2)), 0.5)
    with pytest.raises(SetupError, match="2-D"):
        anomalous_area(np.zeros((0, 3)), 0.5)
