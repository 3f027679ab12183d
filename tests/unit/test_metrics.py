"""Metrics: hand-computed tiny cases, ties, single-class refusal, and AUPRO against a naive loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from winclip_cli.core.metrics import (
    MetricError,
    f1_max,
    image_ap,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
    pro_auc,
    pro_curve,
)
from winclip_cli.errors import WinclipError

LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])

# --------------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------------


def test_image_auroc_hand_computed() -> None:
    # Pairs (anomalous, normal): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_ap_hand_computed() -> None:
    # Descending: 0.8(A) P=1 R=.5; 0.4(N) P=.5 R=.5; 0.35(A) P=2/3 R=1; 0.1(N) P=.5 R=1.
    # AP = sum (R_k - R_{k-1}) P_k = .5*1 + 0*.5 + .5*(2/3) + 0 = 5/6.
    assert image_ap(LABELS, SCORES) == pytest.approx(5 / 6)


def test_f1_max_hand_computed() -> None:
    # Predict anomalous when score >= t:
    #   t=0.8:  TP1 FP0 FN1 -> P=1,   R=.5 -> F1=2/3
    #   t=0.4:  TP1 FP1 FN1 -> P=.5,  R=.5 -> F1=.5
    #   t=0.35: TP2 FP1 FN0 -> P=2/3, R=1  -> F1=2*(2/3)/(5/3)=0.8   <- best
    #   t=0.1:  TP2 FP2 FN0 -> P=.5,  R=1  -> F1=2/3
    f1, threshold = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_ties_count_half_in_auroc() -> None:
    # Every (anomalous, normal) pair is tied -> each counts 1/2.
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    # Pairs: 0.5 vs 0.5 tie (1/2), 0.5 vs 0.2 win, 0.9 vs both win -> (0.5 + 1 + 1 + 1) / 4.
    assert image_auroc([0, 0, 1, 1], [0.5, 0.2, 0.5, 0.9]) == pytest.approx(3.5 / 4)


def test_ties_enter_together_in_f1_max() -> None:
    # Scores tied at 0.5 (one normal, one anomalous) can only be predicted together:
    #   t=0.9: TP1 FP0 FN1 -> F1 = 2/3; t=0.5: TP2 FP1 -> P=2/3 R=1 -> F1 = 0.8; t=0.2: P=.5 R=1 -> 2/3.
    f1, threshold = f1_max([0, 0, 1, 1], [0.5, 0.2, 0.5, 0.9])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.5)


def test_f1_max_zero_over_zero_is_zero() -> None:
    # Worst ranking: at t=0.9 and t=0.8 only normal images are predicted -> P=0, R=0 -> F1 0 (not NaN).
    # t=0.2: TP1 FP2 -> P=1/3 R=1/2 -> F1 = 0.4; t=0.1: TP2 FP2 -> P=.5 R=1 -> 2/3 <- best.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f1, threshold = f1_max([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.1)


def test_perfect_separation() -> None:
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.7, 0.9]
    assert image_auroc(labels, scores) == 1.0
    assert image_ap(labels, scores) == 1.0
    assert f1_max(labels, scores) == (1.0, 0.7)


@pytest.mark.parametrize("func", [image_auroc, image_ap, f1_max])
@pytest.mark.parametrize("labels", [[0, 0, 0, 0, 0], [1, 1, 1]])
def test_single_class_raises(func, labels) -> None:
    scores = np.linspace(0, 1, len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scikit-learn warning may escape either
        with pytest.raises(MetricError, match="needs both normal and anomalous images"):
            func(labels, scores)


def test_single_class_message_counts() -> None:
    with pytest.raises(MetricError) as info:
        image_auroc(np.zeros(5), np.arange(5.0))
    assert str(info.value) == "image AUROC needs both normal and anomalous images (got 5 normal, 0 anomalous)"
    assert isinstance(info.value, WinclipError)  # shown as one line, never a traceback


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1], [0.1, np.inf], "NaN or infinite"),
        ([0, 1, 1], [0.1, 0.2], "differ in shape"),
        ([0, 2], [0.1, 0.2], "0 .normal. or 1"),
        ([], [], "no images"),
    ],
)
def test_bad_image_inputs(labels, scores, match) -> None:
    with pytest.raises(MetricError, match=match):
        image_auroc(np.array(labels), np.array(scores))


# --------------------------------------------------------------------------------------------------
# Pixel level (sklearn-backed)
# --------------------------------------------------------------------------------------------------


def test_pixel_metrics_pool_all_images() -> None:
    # The four pixels of LABELS/SCORES split across two 1x2 images: pooled, the answers are the image ones.
    masks = LABELS.astype(bool).reshape(2, 1, 2)
    maps = SCORES.reshape(2, 1, 2)
    assert pixel_auroc(masks, maps) == pytest.approx(0.75)
    f1, threshold = pixel_f1_max(masks, maps)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


@pytest.mark.parametrize("func", [pixel_auroc, pixel_f1_max, pro_auc])
def test_pixel_metrics_without_anomalous_pixel_raise(func) -> None:
    masks = np.zeros((2, 3, 3), dtype=bool)
    maps = np.random.default_rng(0).random((2, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MetricError, match="needs both normal and anomalous pixels"):
            func(masks, maps)


@pytest.mark.parametrize("func", [pixel_auroc, pixel_f1_max, pro_auc])
def test_pixel_metrics_all_anomalous_raise(func) -> None:
    with pytest.raises(MetricError, match="needs both normal and anomalous pixels"):
        func(np.ones((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))


@pytest.mark.parametrize("func", [pixel_auroc, pixel_f1_max, pro_auc])
def test_pixel_metrics_shape_mismatch(func) -> None:
    with pytest.raises(MetricError, match="differ in shape"):
        func(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 3)))


# --------------------------------------------------------------------------------------------------
# AUPRO, hand-computed
# --------------------------------------------------------------------------------------------------


def test_pro_one_region_of_two_pixels() -> None:
    # 1x4 image, region = pixels 1 and 2 (size 2), normal = pixels 0 and 3.
    # Descending: 0.8(A) 0.6(N) 0.4(A) 0.1(N).  Curve (FPR, PRO):
    #   (0,0) -> after 0.8: (0, .5) -> after 0.6: (.5, .5) -> after 0.4: (.5, 1) -> after 0.1: (1, 1).
    # max_fpr=1:   area = 0 + .5*.5 + 0 + .5*1 = .75.
    # max_fpr=0.3: points up to (0, .5); interpolate between (0,.5) and (.5,.5) at .3 -> .5;
    #              area = .3*.5 = .15, / .3 = .5.
    # max_fpr=0.5: points up to (.5, 1) (vertical step at the limit adds nothing): .25 / .5 = .5.
    mask = np.array([[[False, True, True, False]]])
    amap = np.array([[[0.1, 0.8, 0.4, 0.6]]])
    fpr, pro = pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert pro_auc(mask, amap, max_fpr=1.0) == pytest.approx(0.75, abs=1e-12)
    assert pro_auc(mask, amap, max_fpr=0.3) == pytest.approx(0.5, abs=1e-12)
    assert pro_auc(mask, amap, max_fpr=0.5) == pytest.approx(0.5, abs=1e-12)


def test_pro_averages_regions_not_pixels() -> None:
    # 1x6: region A = {0} (size 1), region B = {2, 3, 4} (size 3), normal = {1, 5}.
    # Descending: 0.9(A) -> PRO mean(1, 0) = .5; 0.8(B) -> mean(1, 1/3) = 2/3; 0.5(N) FPR .5;
    # 0.3(N) FPR 1; 0.2(B) -> mean(1, 2/3) = 5/6; 0.1(B) -> 1.
    # Curve: (0,0) (0,.5) (0,2/3) (.5,2/3) (1,2/3) (1,5/6) (1,1) -> area to FPR 1 = 2/3.
    # Pixel-wise overlap would give 2 of 4 pixels = .5 instead.
    mask = np.array([[[True, False, True, True, True, False]]])
    amap = np.array([[[0.9, 0.5, 0.8, 0.2, 0.1, 0.3]]])
    assert pro_auc(mask, amap, max_fpr=1.0) == pytest.approx(2 / 3, abs=1e-12)
    # Up to FPR .3 the curve is flat at 2/3 as well.
    assert pro_auc(mask, amap, max_fpr=0.3) == pytest.approx(2 / 3, abs=1e-12)


def test_pro_regions_are_8_connected() -> None:
    # 3x3 mask with (0,0), (1,1), (1,2): diagonal contact joins them into ONE region of 3 pixels
    # (4-connectivity would make {(0,0)} and {(1,1),(1,2)}).
    # Map: (0,0)=1.0, the six normal pixels tied at 0.5, (1,1)=(1,2)=0.0.
    # Curve: (0,0) -> after 1.0: (0, 1/3) -> after the six 0.5s: (1, 1/3) -> after 0.0: (1, 1).
    # Area to FPR 1 = 1/3 (it would be 1/2 with two regions: mean(1, 0)).
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    amap = np.full((3, 3), 0.5)
    amap[0, 0] = 1.0
    amap[1, 1] = amap[1, 2] = 0.0
    assert pro_auc(mask[None], amap[None], max_fpr=1.0) == pytest.approx(1 / 3, abs=1e-12)
    # A single (H, W) image is accepted as N = 1.
    assert pro_auc(mask, amap, max_fpr=1.0) == pytest.approx(1 / 3, abs=1e-12)


def test_pro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[0, 10:12, 10:15] = True
    masks[2, 7:9, 0:2] = True
    # Every anomalous pixel above every normal one: (0,0) -> (0,1) -> (1,1); area 1.
    maps = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    for max_fpr in (0.05, 0.3, 1.0):
        assert pro_auc(masks, maps, max_fpr=max_fpr) == pytest.approx(1.0, abs=1e-12)


def test_pro_inverted_map_is_zero() -> None:
    # Every normal pixel above every anomalous one: PRO stays 0 until FPR reaches 1, then a vertical step.
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:4, 1:4] = True
    masks[1, 5:7, 2:8] = True
    maps = np.where(masks, 0.1, 0.9)
    for max_fpr in (0.3, 1.0):
        assert pro_auc(masks, maps, max_fpr=max_fpr) == 0.0


def test_pro_ties_between_normal_and_anomalous_enter_together() -> None:
    # 1x2: anomalous and normal pixel tied at 0.5 -> the curve jumps straight from (0,0) to (1,1).
    # max_fpr=1: triangle area .5.  max_fpr=.3: interpolated PRO at .3 is .3, area .3*.3/2 = .045, / .3 = .15.
    # (Breaking the tie either way would give 1.0 or 0.0 instead.)
    mask = np.array([[[True, False]]])
    amap = np.array([[[0.5, 0.5]]])
    assert pro_auc(mask, amap, max_fpr=1.0) == pytest.approx(0.5, abs=1e-12)
    assert pro_auc(mask, amap, max_fpr=0.3) == pytest.approx(0.15, abs=1e-12)


def test_pro_max_fpr_interpolation() -> None:
    # 1x5: region = {0} (size 1), normal = {1, 2, 3, 4}.  Descending: 0.9(N) 0.8(A) 0.7(N) 0.6(N) 0.5(N).
    # Curve: (0,0) (.25,0) (.25,1) (.5,1) (.75,1) (1,1).
    # max_fpr=.3: area = 0 (0..0.25) + .05*1 = .05 -> / .3 = 1/6.
    # max_fpr=.2: interpolate between (0,0) and (.25,0) at .2 -> 0; area 0.
    # max_fpr=.6: 0 + .35*1 = .35 -> / .6 = 7/12.
    mask = np.array([[[True, False, False, False, False]]])
    amap = np.array([[[0.8, 0.9, 0.7, 0.6, 0.5]]])
    assert pro_auc(mask, amap, max_fpr=0.3) == pytest.approx(1 / 6, abs=1e-12)
    assert pro_auc(mask, amap, max_fpr=0.2) == pytest.approx(0.0, abs=1e-12)
    assert pro_auc(mask, amap, max_fpr=0.6) == pytest.approx(7 / 12, abs=1e-12)


def test_pro_image_without_region_contributes_normal_pixels() -> None:
    # Image A 1x2: region {0} at 0.9, normal at 0.1.  Image B 1x2, no region: normals at 0.95 and 0.2.
    # Descending: 0.95(N, B) 0.9(A) 0.2(N, B) 0.1(N, A); 3 normal pixels in all.
    # Curve: (0,0) (1/3,0) (1/3,1) (2/3,1) (1,1) -> area to FPR 1 = 2/3; to FPR .3: 0.
    masks = np.array([[[True, False]], [[False, False]]])
    maps = np.array([[[0.9, 0.1]], [[0.95, 0.2]]])
    assert pro_auc(masks, maps, max_fpr=1.0) == pytest.approx(2 / 3, abs=1e-12)
    assert pro_auc(masks, maps, max_fpr=0.3) == 0.0


@pytest.mark.parametrize("max_fpr", [0.0, -0.1, 1.5])
def test_pro_bad_max_fpr(max_fpr) -> None:
    with pytest.raises(MetricError, match="max_fpr"):
        pro_auc(np.array([[[True, False]]]), np.array([[[0.5, 0.1]]]), max_fpr=max_fpr)


def test_pro_rejects_nan_maps() -> None:
    with pytest.raises(MetricError, match="NaN"):
        pro_auc(np.array([[[True, False]]]), np.array([[[np.nan, 0.1]]]))


# --------------------------------------------------------------------------------------------------
# AUPRO against a naive loop over every threshold
# --------------------------------------------------------------------------------------------------


def _naive_pro_auc(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """Straight from the definition: one full pass over all images per threshold."""
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labelled == r for r in range(1, count + 1)])
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in [*np.unique(maps)[::-1], -np.inf]:
        predicted = maps > t
        overlaps = [(predicted[i] & r).sum() / r.sum() for i in range(len(masks)) for r in regions[i]]
        points.append(((predicted & normal).sum() / normal.sum(), float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the segment at the limit
            y1 = y0 + (max_fpr - x0) / (x1 - x0) * (y1 - y0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", range(6))
def test_pro_fast_path_matches_naive_loop(seed) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 12, 12)) > 0.8
    masks = ndimage.binary_dilation(masks, iterations=1) & (rng.random((3, 12, 12)) > 0.3)
    masks[1] = False  # one image without any region
    # Rounded scores, correlated with the masks, so that many thresholds hold ties of both kinds.
    maps = np.round(0.3 * masks + rng.random(masks.shape), 1)
    for max_fpr in (0.05, 0.3, 1.0):
        assert abs(pro_auc(masks, maps, max_fpr=max_fpr) - _naive_pro_auc(masks, maps, max_fpr)) < 1e-9


def test_pro_num_thresholds_approximates_exact() -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 4:12, 4:10] = True
    masks[1, 20:30, 15:18] = True
    maps = 0.5 * masks + rng.random(masks.shape)
    exact = pro_auc(masks, maps)
    assert pro_auc(masks, maps, num_thresholds=2000) == pytest.approx(exact, abs=0.01)
    # Two thresholds (min and max) plus "below the minimum" still give a valid curve.
    assert 0.0 <= pro_auc(masks, maps, num_thresholds=2) <= 1.0
    with pytest.raises(MetricError, match="num_thresholds"):
        pro_auc(masks, maps, num_thresholds=1)


def test_pro_curve_is_monotone_and_ends_at_one() -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((2, 10, 10)) > 0.7
    maps = rng.random((2, 10, 10))
    fpr, pro = pro_curve(masks, maps)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == 1.0 and pro[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
