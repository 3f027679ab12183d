"""Decision thresholds calibrated on normal images only, for a requested false-positive rate.

An image is anomalous when its score is strictly greater than the image threshold; a pixel belongs
to the anomalous area when its map value is strictly greater than the pixel threshold.  Thresholds
are exact order statistics of the calibration scores (no interpolation), so re-running a
calibration on the same scores gives the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from winclip_cli.errors import SetupError

__all__ = ["Calibration", "anomalous_area", "calibrate", "histogram", "threshold_for_fpr"]

# fpr * n computed in floating point can land a hair below an integer (0.29 * 100 = 28.999...96);
# the same tolerance is used wherever a count of allowed false positives is derived from a rate.
_EPS = 1e-9

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _allowed_false_positives(fpr: float, n: int) -> int:
    """m = floor(fpr * n), guarded against float error."""
    return math.floor(fpr * n + _EPS)


def _min_images_for_fpr(fpr: float) -> int:
    """Fewest scores for which the rule allows at least one false positive, i.e. ceil(1 / fpr).

    Derived from the same guarded floor as the threshold, so the two always agree.  A rate of 0 is
    met by any calibration set (the threshold is the maximum), hence 1.
    """
    if fpr <= 0:
        return 1
    return max(1, math.ceil((1 - _EPS) / fpr))


def _check_fpr(fpr: float, name: str = "fpr") -> float:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating, np.integer)):
        raise SetupError(f"{name} must be a number (got {fpr!r})")
    fpr = float(fpr)
    if not 0.0 <= fpr < 1.0:  # also rejects NaN
        raise SetupError(f"{name} must be in [0, 1) (got {fpr})")
    return fpr


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise SetupError(f"cannot calibrate: no {what}")
    if np.isnan(scores).any():
        raise SetupError(f"cannot calibrate: {int(np.isnan(scores).sum())} of the {what} are NaN")
    if not np.isfinite(scores).all():
        raise SetupError(f"cannot calibrate: some {what} are infinite")
    return scores


def threshold_for_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """Smallest observed score ``t`` with at most a fraction ``fpr`` of the normal scores ``> t``.

    Sort the n scores ascending s_1..s_n; with m = floor(fpr * n) allowed false positives the
    threshold is s_(n - m), the (n - m)-th smallest.  With ties the fraction strictly above ``t``
    may be below ``fpr``.  ``fpr`` must be in [0, 1) (0 gives the maximum score); NaN or infinite
    scores are refused with :class:`SetupError`.
    """
    fpr = _check_fpr(fpr)
    scores = np.sort(_check_scores(normal_scores, "calibration scores"))
    n = scores.size
    m = _allowed_false_positives(fpr, n)
    return float(scores[n - m - 1])  # 0-based index of the (n - m)-th smallest


@dataclass(frozen=True)
class Calibration:
    """Thresholds calibrated on normal images, and how well the calibration set supports them."""

    threshold: float
    """Image-score threshold: an image is anomalous when its score is > threshold."""
    fpr: float
    """Requested image false-positive rate."""
    achieved_fpr: float
    """Fraction of the calibration image scores > threshold (<= fpr)."""
    n_images: int
    """Number of normal images calibrated on."""
    pixel_threshold: float | None
    """Pixel threshold for the anomalous-area output; None when no pixel scores were given."""
    pixel_fpr: float
    """Requested pixel false-positive rate."""
    min_images_for_fpr: int
    """ceil(1 / fpr): with fewer images the threshold is simply the highest score seen."""

    @property
    def enough_images(self) -> bool:
        """Whether the calibration set is large enough to support the requested rate."""
        return self.n_images >= self.min_images_for_fpr

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], upper: float = 1.0) -> Calibration:
        """Rebuild from :meth:`as_dict` output, checking every field; unknown keys are ignored.
        ``upper``: the largest score of the calibrated mode (mutual raw scores are distances up to 2).

        Raises :class:`SetupError` naming the first bad or missing field.
        """
        if not isinstance(data, dict):
            raise SetupError(f"calibration data must be a JSON object (got {type(data).__name__})")

        def number(key: str, optional: bool = False) -> float | None:
            if key not in data:
                raise SetupError(f"calibration data lacks '{key}'")
            value = data[key]
            if value is None and optional:
                return None
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise OverflowError
                return float(value)
            except OverflowError:  # also an integer too large for a float
                raise SetupError(f"calibration field '{key}' must be a finite number (got {str(value)[:40]})") from None

        def score(key: str, optional: bool = False) -> float | None:
            # scores lie in [0, upper]: a threshold beyond them (1e300) would silently turn detection off
            value = number(key, optional)
            if value is not None and not 0.0 <= value <= upper:
                raise SetupError(f"calibration field '{key}' must be in [0, {upper:g}] (got {value!r})")
            return value

        def count(key: str) -> int:
            if key not in data:
                raise SetupError(f"calibration data lacks '{key}'")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**53:
                raise SetupError(f"calibration field '{key}' must be a positive integer (got {str(value)[:40]})")
            return value

        def given(value: float | None) -> float:
            assert value is not None  # number() returns None only for an optional field
            return value

        def rate(key: str) -> float:
            value = given(number(key))
            if not 0.0 <= value < 1.0:
                raise SetupError(f"calibration field '{key}' must be in [0, 1) (got {value!r})")
            return value

        achieved = given(number("achieved_fpr"))
        if not 0.0 <= achieved <= 1.0:
            raise SetupError(f"calibration field 'achieved_fpr' must be in [0, 1] (got {achieved!r})")
        return cls(
            threshold=given(score("threshold")),
            fpr=rate("fpr"),
            achieved_fpr=achieved,
            n_images=count("n_images"),
            pixel_threshold=score("pixel_threshold", optional=True),
            pixel_fpr=rate("pixel_fpr"),
            min_images_for_fpr=count("min_images_for_fpr"),
        )


def calibrate(
    image_scores: np.ndarray,
    pixel_scores: np.ndarray | None,
    fpr: float,
    pixel_fpr: float | None = None,
) -> Calibration:
    """Calibrate image and pixel thresholds on normal images with :func:`threshold_for_fpr`.

    ``image_scores`` holds one score per normal image.  ``pixel_scores`` is a 1-D array of map
    values pooled from the same images (a subsample is fine); when None, ``pixel_threshold`` is
    None.  ``pixel_fpr`` defaults to ``fpr``.
    """
    fpr = _check_fpr(fpr)
    pixel_fpr = fpr if pixel_fpr is None else _check_fpr(pixel_fpr, "pixel_fpr")
    scores = _check_scores(image_scores, "image scores")
    threshold = threshold_for_fpr(scores, fpr)
    pixel_threshold = None
    if pixel_scores is not None:
        pixel_threshold = threshold_for_fpr(_check_scores(pixel_scores, "pixel scores"), pixel_fpr)
    return Calibration(
        threshold=threshold,
        fpr=fpr,
        achieved_fpr=float(np.count_nonzero(scores > threshold) / scores.size),
        n_images=int(scores.size),
        pixel_threshold=pixel_threshold,
        pixel_fpr=pixel_fpr,
        min_images_for_fpr=_min_images_for_fpr(fpr),
    )


def histogram(scores: np.ndarray, bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> list[tuple[float, float, int]]:
    """(bin start, bin end, count) for ``bins`` equal bins on [lo, hi].

    Scores outside the range are counted in the first or last bin, so the counts always add up to
    the number of scores; the last bin includes ``hi``.  NaN scores are refused.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise SetupError(f"histogram bins must be a positive integer (got {bins!r})")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise SetupError(f"histogram range must be finite with lo < hi (got [{lo}, {hi}])")
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(values).any():
        raise SetupError("histogram: scores contain NaN")
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=edges)
    return [(float(edges[i]), float(edges[i + 1]), int(counts[i])) for i in range(bins)]


def anomalous_area(score_map: np.ndarray, pixel_threshold: float) -> tuple[float, tuple[int, int, int, int] | None]:
    """(fraction of pixels > pixel_threshold, box of the largest region over it).

    The box is (x0, y0, x1, y1) in pixels with exclusive ends, around the largest 8-connected region
    of over-threshold pixels (the first in row-major order when several are equally large); None
    when no pixel is over the threshold.  NaN map values never count as over.
    """
    amap = np.asarray(score_map)
    if amap.ndim != 2 or amap.size == 0:
        raise SetupError(f"anomalous area needs a non-empty 2-D score map (got shape {amap.shape})")
    over = amap > pixel_threshold
    n_over = int(np.count_nonzero(over))
    if n_over == 0:
        return 0.0, None
    from scipy import ndimage  # 0.3 s to import: only scans with a pixel threshold pay it

    labelled, _ = ndimage.label(over, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labelled.reshape(-1))
    sizes[0] = 0  # background
    largest = int(np.argmax(sizes))  # labels follow row-major order of first pixel: ties keep the first
    rows, cols = ndimage.find_objects(labelled)[largest - 1]
    return n_over / amap.size, (int(cols.start), int(rows.start), int(cols.stop), int(rows.stop))
