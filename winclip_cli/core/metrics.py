"""Evaluation metrics reported by the anomaly-detection literature.

Image level: AUROC, average precision and F1-max over image scores.  Pixel level: AUROC and F1-max
over all pixels pooled, and AUPRO (area under the per-region-overlap curve up to a false-positive
rate, usually 0.3).  Labels and masks use 1 / True for anomalous.

Every function refuses input it cannot score (a single class, NaN scores, mismatched shapes) with
:class:`MetricError` instead of returning NaN or letting a scikit-learn warning escape.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from winclip_cli.errors import MetricError

__all__ = [
    "MetricError",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_auc",
]

# 8-connectivity: diagonal neighbours belong to the same defect region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _binary_inputs(labels: np.ndarray, scores: np.ndarray, what: str, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and check (labels, scores); both classes must be present and scores finite."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape:
        raise MetricError(f"{what}: labels and scores differ in shape ({labels.shape} vs {scores.shape})")
    if labels.size == 0:
        raise MetricError(f"{what}: no {unit}s to score")
    labels = labels.reshape(-1)
    scores = scores.reshape(-1).astype(np.float64, copy=False)
    if labels.dtype != bool:
        if not np.all((labels == 0) | (labels == 1)):
            raise MetricError(f"{what}: labels must be 0 (normal) or 1 (anomalous)")
        labels = labels == 1
    if not np.all(np.isfinite(scores)):
        raise MetricError(f"{what}: scores contain NaN or infinite values")
    n_anomalous = int(np.count_nonzero(labels))
    n_normal = labels.size - n_anomalous
    if n_anomalous == 0 or n_normal == 0:
        raise MetricError(
            f"{what} needs both normal and anomalous {unit}s (got {n_normal} normal, {n_anomalous} anomalous)"
        )
    return labels, scores


def _mask_inputs(masks: np.ndarray, maps: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Check (masks, maps) as (N, H, W) or a single (H, W); returns (N, H, W) arrays."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise MetricError(f"{what}: masks and maps differ in shape ({masks.shape} vs {maps.shape})")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise MetricError(f"{what}: masks and maps must be (N, H, W) arrays (got {masks.ndim} dimensions)")
    return masks.astype(bool, copy=False), maps.astype(np.float64, copy=False)


# --------------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------------


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores (labels 0 normal, 1 anomalous); ties count half."""
    y, s = _binary_inputs(labels, scores, "image AUROC", "image")
    return float(roc_auc_score(y, s))


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of image scores (scikit-learn's step-wise sum, no interpolation)."""
    y, s = _binary_inputs(labels, scores, "image AP", "image")
    return float(average_precision_score(y, s))


def _f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over every threshold of validated inputs, and the threshold reaching it."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision, recall) pair is scikit-learn's (1, 0) end point and has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.zeros_like(denominator)
    np.divide(2 * precision * recall, denominator, out=f1, where=denominator > 0)  # 0/0 -> 0
    best = int(np.argmax(f1))  # first maximum: thresholds ascend, so ties keep the lowest threshold
    return float(f1[best]), float(thresholds[best])


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, the threshold achieving it) for image scores.

    Follows scikit-learn's ``precision_recall_curve``: at threshold ``t`` an image is predicted
    anomalous when ``score >= t``; ``t`` is always one of the observed scores.
    """
    y, s = _binary_inputs(labels, scores, "image F1-max", "image")
    return _f1_max(y, s)


# --------------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------------


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels of all images pooled; masks bool (N, H, W), maps float (N, H, W)."""
    m, s = _mask_inputs(masks, maps, "pixel AUROC")
    y, s = _binary_inputs(m, s, "pixel AUROC", "pixel")
    return float(roc_auc_score(y, s))


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float]:
    """(best pixel F1, its threshold) over all pixels pooled; a pixel is anomalous when ``map >= t``."""
    m, s = _mask_inputs(masks, maps, "pixel F1-max")
    y, s = _binary_inputs(m, s, "pixel F1-max", "pixel")
    return _f1_max(y, s)


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Flattened region id per pixel (0 = normal, 1..R = regions numbered across images) and R."""
    ids = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        ids[i] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    return ids.reshape(-1), offset


def pro_curve(masks: np.ndarray, maps: np.ndarray, num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points of the per-region-overlap curve, FPR ascending, from (0, 0) to (1, 1).

    At threshold ``t`` a pixel is predicted anomalous when ``map > t``.  PRO(t) is the mean over all
    ground-truth regions (8-connected components of every mask) of the fraction of the region's
    pixels predicted anomalous; FPR(t) is the fraction of normal pixels predicted anomalous, over
    all images (images without a region contribute normal pixels only).

    Thresholds are every distinct map value plus one below the minimum (exact), or, with
    ``num_thresholds``, that many values evenly spaced from the minimum to the maximum map value
    plus one below the minimum.
    """
    m, s = _mask_inputs(masks, maps, "AUPRO")
    if not np.all(np.isfinite(s)):
        raise MetricError("AUPRO: maps contain NaN or infinite values")
    region, n_regions = _region_ids(m)
    n_normal = int(np.count_nonzero(region == 0))
    if n_regions == 0 or n_normal == 0:
        raise MetricError(
            "AUPRO needs both normal and anomalous pixels "
            f"(got {n_normal} normal pixels, {region.size - n_normal} anomalous)"
        )
    scores = s.reshape(-1)

    # Sort once, highest score first; the pixels above any threshold are then a prefix of this order.
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_region = region[order]
    # PRO = mean over regions of (covered pixels / region size) = sum over covered anomalous pixels
    # of 1 / (size of its region * number of regions): a single cumulative sum serves all regions.
    sizes = np.bincount(region, minlength=n_regions + 1).astype(np.float64)
    weight = np.where(sorted_region > 0, 1.0 / (sizes[sorted_region] * n_regions), 0.0)
    pro_prefix = np.concatenate(([0.0], np.cumsum(weight)))
    normal_prefix = np.concatenate(([0], np.cumsum(sorted_region == 0)))

    if num_thresholds is None:
        thresholds = np.unique(scores)  # ascending
    else:
        if num_thresholds < 2:
            raise MetricError(f"AUPRO: num_thresholds must be at least 2 (got {num_thresholds})")
        thresholds = np.linspace(scores.min(), scores.max(), num_thresholds)
    # Number of pixels with score > t, for t from the highest threshold down, then "below the minimum".
    # Equal scores enter together because the count is taken per threshold, not per pixel.
    ascending = sorted_scores[::-1]
    above = scores.size - np.searchsorted(ascending, thresholds[::-1], side="right")
    above = np.concatenate((above, [scores.size]))
    fpr = normal_prefix[above] / n_normal
    pro = pro_prefix[above]
    # Rounding can leave the sum of weights a hair off 1; the end point is exact by definition.
    pro[-1] = 1.0
    # The highest threshold is the maximum score, so the curve starts at (0, 0) with nothing above it.
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x ascending) for x in [0, limit], interpolating at ``limit``."""
    end = int(np.searchsorted(x, limit, side="right"))  # x[:end] <= limit
    xs, ys = x[:end], y[:end]
    if xs[-1] < limit and end < x.size:
        # x[end - 1] < limit < x[end]: the segment is not vertical, so interpolation is defined.
        fraction = (limit - x[end - 1]) / (x[end] - x[end - 1])
        xs = np.append(xs, limit)
        ys = np.append(ys, y[end - 1] + fraction * (y[end] - y[end - 1]))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def pro_auc(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, num_thresholds: int | None = None) -> float:
    """AUPRO: area under the PRO-vs-FPR curve for FPR in [0, max_fpr], divided by ``max_fpr``.

    See :func:`pro_curve` for the curve.  The area uses the trapezoid rule, with the curve linearly
    interpolated at exactly ``FPR = max_fpr``; a perfect map scores 1.0, a map that ranks every
    normal pixel above every anomalous one 0.0.  By default every distinct map value is a threshold
    (exact); ``num_thresholds`` trades exactness for speed on very large pixel sets.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise MetricError(f"AUPRO: max_fpr must be in (0, 1] (got {max_fpr})")
    fpr, pro = pro_curve(masks, maps, num_thresholds)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr
