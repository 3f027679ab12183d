"""Tiled scoring of large images: cut into overlapping square tiles, blend the tile maps back seamlessly.

The model sees 240 x 240 inputs, so shrinking a 5-50 MP photo to that size hides small defects. In tiled mode
each image is cut into overlapping ``size`` x ``size`` tiles at the original resolution, each tile is scored as
an image, and the tile anomaly maps (already upsampled to the tile's pixel size) are blended into one
full-resolution map with a smooth, separable window so that no seams show. The image score is the max over tiles.

Coordinates: ``x`` is the column, ``y`` the row; boxes are ``[y0:y1, x0:x1]`` with exclusive ends.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from winclip_cli.options import DEFAULT_TILE_OVERLAP

BLEND_BORDER = 0.25  # fraction of a tile's side over which its blend weight rises from the edge

# Per-axis floor of the blend taper: keeps every weight strictly positive, so a pixel that only one tile covers
# (image corners, overlap 0) still gets that tile's value instead of 0/0. Corners of a window get WINDOW_FLOOR**2.
WINDOW_FLOOR = 1e-3


@dataclass(frozen=True)
class Tile:
    """One tile's pixel box in the full image; ``index`` is its position in the row-major grid."""

    index: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        """Number of columns (``x1 - x0``)."""
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        """Number of rows (``y1 - y0``)."""
        return self.y1 - self.y0


def _check_positive_int(name: str, value: object) -> int:
    # bool is an Integral too, but tile_grid(True, ...) is surely a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Tile start positions along one axis: evenly spread from 0 to ``length - size``."""
    if length <= size:
        return [0]
    n = math.ceil((length - size) / stride) + 1
    # Round half up rather than np.round (half to even): floor(x + 0.5) is monotone with unit steps, so starts
    # that are >= 1 apart before rounding (n - 1 <= length - size because stride >= 1) stay strictly increasing.
    starts = np.floor(np.linspace(0, length - size, n) + 0.5).astype(np.int64)
    return [int(s) for s in starts]


def tile_count(height: int, width: int, size: int, overlap: float = DEFAULT_TILE_OVERLAP) -> int:
    """``len(tile_grid(height, width, size, overlap))``, without building the grid (a 1 x 80,000,000 strip
    would need hundreds of thousands of ``Tile`` objects just to be refused)."""
    stride = max(1, round(size * (1.0 - float(overlap))))

    def along(length: int) -> int:
        return 1 if length <= size else math.ceil((length - size) / stride) + 1

    return along(height) * along(width)


def tile_grid(height: int, width: int, size: int, overlap: float = DEFAULT_TILE_OVERLAP) -> list[Tile]:
    """Overlapping ``size`` x ``size`` tiles covering every pixel of a ``height`` x ``width`` image.

    Along each axis: one tile spanning the whole axis if ``length <= size`` (the tile is clipped to the image);
    otherwise ``ceil((length - size) / stride) + 1`` tiles with ``stride = max(1, round(size * (1 - overlap)))``,
    their starts spread evenly from 0 to ``length - size`` (linspace rounded half up), so the last tile ends exactly
    at the border and the overlaps are as equal as possible (never less than requested, up to rounding).
    Row-major order (y, then x); ``index`` is the position in the list. ``overlap`` must lie in [0, 1).
    """
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    size = _check_positive_int("size", size)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}")
    stride = max(1, round(size * (1.0 - float(overlap))))
    ys = _axis_starts(height, size, stride)
    xs = _axis_starts(width, size, stride)
    tiles: list[Tile] = []
    for y0 in ys:
        for x0 in xs:
            tiles.append(Tile(len(tiles), x0, y0, min(x0 + size, width), min(y0 + size, height)))
    return tiles


def _check_border(border: object) -> float:
    if isinstance(border, bool) or not isinstance(border, numbers.Real) or not 0.0 <= float(border) <= 0.5:
        raise ValueError(f"border must be a number in [0, 0.5], got {border!r}")
    return float(border)


def _taper(length: int, border: float) -> np.ndarray:
    """1-D raised-cosine taper: 1 in the middle, falling to ~0 over ``border * length`` pixels at each end."""
    # Distance of each pixel centre from the nearer end: symmetric by construction.
    i = np.arange(length, dtype=np.float64)
    d = np.minimum(i + 0.5, length - i - 0.5)
    ramp = border * length
    if ramp > 0:
        t = np.clip(d / ramp, 0.0, 1.0)
        w = 0.5 - 0.5 * np.cos(np.pi * t)
    else:
        w = np.ones(length)
    w = np.maximum(w, WINDOW_FLOOR)
    # With border = 0.5 and an even length the two middle pixels sit half a pixel short of the plateau;
    # rescale so that the centre is exactly 1 in every case.
    return w / w.max()


def blend_window(height: int, width: int, border: float = BLEND_BORDER) -> np.ndarray:
    """(height, width) float32 blend weights: outer product of two 1-D raised-cosine (Hann) tapers.

    Exactly 1 in the centre, falling smoothly towards each edge over ``border`` (in [0, 0.5]) of the tile's
    height/width, floored at ``WINDOW_FLOOR`` per axis so every weight is strictly positive. ``border = 0``
    gives a flat window (plain averaging, hard seams).
    """
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    border = _check_border(border)
    return np.outer(_taper(height, border), _taper(width, border)).astype(np.float32)


class TileBlender:
    """Accumulates tile maps into one full-resolution map: ``sum(w * map) / sum(w)`` per pixel.

    Memory: two float32 (H, W) arrays (plus the one ``result`` returns). Where exactly one tile covers a pixel
    the result is that tile's value (up to float rounding), whatever the weight, because the weight cancels.
    """

    def __init__(self, height: int, width: int, border: float = BLEND_BORDER) -> None:
        self.height = _check_positive_int("height", height)
        self.width = _check_positive_int("width", width)
        self.border = _check_border(border)
        self._weighted = np.zeros((self.height, self.width), dtype=np.float32)
        self._weights = np.zeros((self.height, self.width), dtype=np.float32)
        # Nearly all tiles share one shape (only clipped tiles differ), so windows are computed once per shape.
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def add(self, tile: Tile, tile_map: np.ndarray) -> None:
        """Accumulate ``tile_map`` (shape ``(tile.height, tile.width)``) into the tile's box."""
        if not (0 <= tile.x0 < tile.x1 <= self.width and 0 <= tile.y0 < tile.y1 <= self.height):
            raise ValueError(
                f"tile {tile.index} box x[{tile.x0}:{tile.x1}] y[{tile.y0}:{tile.y1}] is empty or outside "
                f"the {self.height} x {self.width} image"
            )
        values = np.asarray(tile_map, dtype=np.float32)
        shape = (tile.height, tile.width)
        if values.shape != shape:
            raise ValueError(f"tile {tile.index} map has shape {values.shape}, expected {shape}")
        window = self._windows.get(shape)
        if window is None:
            window = self._windows[shape] = blend_window(*shape, self.border)
        self._weighted[tile.y0 : tile.y1, tile.x0 : tile.x1] += window * values
        self._weights[tile.y0 : tile.y1, tile.x0 : tile.x1] += window

    @property
    def complete(self) -> bool:
        """True when every pixel has been covered by at least one tile."""
        return bool(np.all(self._weights > 0))

    def result(self) -> np.ndarray:
        """The blended (H, W) float32 map; ValueError if some pixel was never covered."""
        uncovered = int(np.count_nonzero(self._weights <= 0))
        if uncovered:
            raise ValueError(f"{uncovered} of {self.height * self.width} pixels were not covered by any tile")
        return np.divide(self._weighted, self._weights, dtype=np.float32)


def auto_tile_size(height: int, width: int, model_input: int = 240, max_downscale: float = 4.0) -> int | None:
    """Tile size for ``--tile auto``, or None when the whole image can be scored as one.

    Rule: the model should never see more than ``max_downscale`` times shrinking. Scoring the whole image
    squashes it to ``model_input`` square, a downscale of ``max(height, width) / model_input``; if that is within
    the limit, return None (no tiling). Otherwise tiles of ``model_input * max_downscale`` pixels (960 by default)
    meet the limit exactly. They are capped at ``min(height, width)`` so tiles stay square inside the image (a
    long strip gets smaller, less-shrunk tiles), but never below ``model_input``: a strip narrower than that gets
    ``model_input`` tiles, which ``tile_grid`` clips to the strip.
    """
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    model_input = _check_positive_int("model_input", model_input)
    is_number = isinstance(max_downscale, numbers.Real) and not isinstance(max_downscale, bool)
    if not (is_number and math.isfinite(max_downscale) and max_downscale >= 1):
        raise ValueError(f"max_downscale must be a finite number >= 1, got {max_downscale!r}")
    largest = int(model_input * float(max_downscale))
    if max(height, width) <= largest:
        return None
    return max(model_input, min(largest, height, width))


def crop(array: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's region of an (H, W) or (H, W, C) array (a view, not a copy)."""
    return array[tile.y0 : tile.y1, tile.x0 : tile.x1]
