"""Antialiased bicubic resize with torch's weights, as two banded matrix products in bounded memory.

``F.interpolate(x, mode="bicubic", antialias=True)`` is a separable filter: along each axis, output
``i`` is a normalised weighted sum of a contiguous run of inputs.  Building those per-axis weights
here (the same kernel, support and normalisation as torch's and Pillow's antialiased bicubic) and
applying them as sparse matrix products gives the same values within float rounding at a fraction
of the cost, straight from the 8- or 16-bit pixels: no full-size float copy of the image is made.
Inputs are converted to float a bounded block at a time and the weights of a very long axis are
made a group of outputs at a time, so a 1 x 80,000,000 image needs tens of megabytes of
temporaries, not the hundreds of gigabytes a dense formulation would.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["axis_weights", "resize_bicubic_aa"]

_CUBIC_A = -0.5  # Keys' parameter used by torch and Pillow for antialiased bicubic
_BLOCK_ELEMENTS = 1 << 21  # floats converted per block (8 MB): bounds the temporaries of one pass
_GROUP_TAPS = 1 << 20  # weights computed at once for one group of outputs
_DENSE_WEIGHTS = 1 << 22  # on an accelerator, a group's weights up to this size are used dense
_CACHED_WEIGHTS = 1 << 21  # axes whose weights are at most this many are cached (same-sized images)
# On the CPU, ordinary sizes take dense blocks of a few outputs each (below): outputs per block in the
# first pass (rows of a wide product) and in the second (columns of a narrow one), measured fastest for
# 2 MP -> 240 px; an axis whose dense blocks would hold more weights than _DENSE_BLOCK_WEIGHTS (or need
# more than _MAX_DENSE_BLOCKS blocks) takes the sparse path.
_BLOCK_OUTPUTS = (8, 16)
_DENSE_BLOCK_WEIGHTS = 1 << 20
_MAX_DENSE_BLOCKS = 1024


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, evaluated in the dtype of ``x``."""
    x = np.abs(x)
    a = x.dtype.type(_CUBIC_A)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


@dataclass(frozen=True)
class _Taps:
    """Where each output of one axis reads: inputs ``start[i] .. stop[i] - 1``."""

    in_size: int
    out_size: int
    scale: float
    support: float
    center: np.ndarray  # float32
    start: np.ndarray
    stop: np.ndarray


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> _Taps:
    # Same as torch's _compute_weights_aa (and Pillow's precompute_coeffs): a downscale widens the
    # kernel by the scale factor so that every input contributes (the antialiasing); the window is
    # cut at the borders and its weights renormalised, instead of clamping indices.  The scalars are
    # float32 like torch's for a float32 image: at output 200 a float32 centre is off by 1e-5 pixel,
    # which moves weights by more than the rounding of the products themselves.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = f32(2.0 * float(scale)) if scale >= 1.0 else f32(2.0)
    center = (float(scale) * (np.arange(out_size, dtype=np.float64) + 0.5)).astype(f32)
    start = np.maximum(np.trunc(center.astype(np.float64) - float(support) + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center.astype(np.float64) + float(support) + 0.5), in_size).astype(np.int64)
    return _Taps(in_size, out_size, float(scale), float(support), center, start, stop)


def _weights(taps: _Taps, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights of outputs first..last-1 as CSR parts (row offsets, input index - start[first], value)."""
    f32 = np.float32
    start, stop = taps.start[first:last], taps.stop[first:last]
    sizes = stop - start
    index = start[:, None] + np.arange(int(sizes.max()))[None, :]  # (rows, widest window)
    inside = index < stop[:, None]
    invscale = float(f32(1.0 / taps.scale)) if taps.scale >= 1.0 else 1.0
    offset = index.astype(f32) - taps.center[first:last, None]  # float32, as in torch
    w = _cubic(((offset.astype(np.float64) + 0.5) * invscale).astype(f32))
    w[~inside] = 0
    total = w.sum(axis=1, keepdims=True, dtype=f32)
    np.divide(w, total, out=w, where=total != 0)
    rows = np.concatenate([[0], np.cumsum(sizes)])
    return rows, (index - start[0])[inside], w[inside]


def _dense_weights(taps: _Taps, first: int, last: int) -> np.ndarray:
    """Weights of outputs first..last-1 as a dense (last - first, stop[last - 1] - start[first]) array
    over the inputs they read (start and stop never decrease along an axis)."""
    rows, columns, values = _weights(taps, first, last)
    dense = np.zeros((last - first, int(taps.stop[last - 1] - taps.start[first])), dtype=np.float32)
    dense[np.repeat(np.arange(last - first), np.diff(rows)), columns] = values
    return dense


def axis_weights(in_size: int, out_size: int) -> np.ndarray:
    """The full (out_size, in_size) float32 weight matrix of one axis (for tests and small sizes)."""
    taps = _taps(in_size, out_size)
    full = np.zeros((out_size, in_size), dtype=np.float32)
    lo, hi = int(taps.start[0]), int(taps.stop[-1])
    full[:, lo:hi] = _dense_weights(taps, 0, out_size)
    return full


@dataclass(frozen=True)
class _Group:
    """Consecutive outputs ``first..last-1`` and their weights over the inputs ``lo..hi-1``."""

    first: int
    last: int
    lo: int
    hi: int
    weights: torch.Tensor  # (last - first, hi - lo) float32, sparse CSR or dense


def _group_bounds(taps: _Taps) -> list[tuple[int, int]]:
    """Split the outputs into runs of at most _GROUP_TAPS weights (one output at least)."""
    widest = int((taps.stop - taps.start).max())
    rows = max(1, _GROUP_TAPS // widest)
    return [(first, min(first + rows, taps.out_size)) for first in range(0, taps.out_size, rows)]


def _make_group(taps: _Taps, first: int, last: int, device: torch.device) -> _Group:
    lo, hi = int(taps.start[first]), int(taps.stop[last - 1])
    rows, columns, values = (torch.from_numpy(part) for part in _weights(taps, first, last))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a matrix product is all we use
        warnings.simplefilter("ignore", UserWarning)
        weights = torch.sparse_csr_tensor(rows, columns, values, size=(last - first, hi - lo))
        # On the CPU the band is applied sparsely (an 8x downscale reads 32 of 1920 inputs per output);
        # an accelerator does a modest dense product faster than it would gather.
        if device.type != "cpu" and (last - first) * (hi - lo) <= _DENSE_WEIGHTS:
            weights = weights.to_dense()
        weights = weights.to(device)
    return _Group(first, last, lo, hi, weights)


@lru_cache(maxsize=16)
def _cached_groups(in_size: int, out_size: int, device: torch.device) -> tuple[_Group, ...]:
    taps = _taps(in_size, out_size)
    return tuple(_make_group(taps, first, last, device) for first, last in _group_bounds(taps))


def _groups(in_size: int, out_size: int, device: torch.device) -> Iterator[_Group]:
    taps = _taps(in_size, out_size)
    if int((taps.stop - taps.start).sum()) <= _CACHED_WEIGHTS:
        yield from _cached_groups(in_size, out_size, device)
        return
    for first, last in _group_bounds(taps):  # huge axes: made as needed, never all held at once
        yield _make_group(taps, first, last, device)


def _resize_leading(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """Resize axis 0 of an (n, m, c) tensor of any dtype and strides -> (out_size, m, c) float32.

    The input is converted to float32 in blocks of at most about _BLOCK_ELEMENTS values.
    """
    n, m, c = x.shape
    out = torch.empty((out_size, m, c), dtype=torch.float32, device=x.device)
    for group in _groups(n, out_size, x.device):
        span = group.hi - group.lo
        columns = max(1, _BLOCK_ELEMENTS // (span * c))
        for a in range(0, m, columns):
            b = min(m, a + columns)
            block = x[group.lo : group.hi, a:b].to(torch.float32, memory_format=torch.contiguous_format)
            block = block.reshape(span, (b - a) * c)
            out[group.first : group.last, a:b] = (group.weights @ block).reshape(-1, b - a, c)
    return out


# ----------------------------------------------------------------------------------- dense blocks (CPU)
#
# The sparse product above copies its dense operand into the layout it wants: for a 2 MP frame those
# copies cost more than the arithmetic.  Cut each axis into blocks of a few consecutive outputs instead:
# a block reads one contiguous run of inputs, so it is one small dense product straight on (a float
# copy of) the rows of the image, written in place.  The zeros in a block cost about twice the
# arithmetic of the band alone, which BLAS still does faster than any gather.  Same weights, so the
# same values within float rounding (only the order of the sums differs).


@dataclass(frozen=True)
class _Block:
    """Outputs ``first..last-1`` of an axis read inputs ``lo..hi-1`` with these dense weights."""

    first: int
    last: int
    lo: int
    hi: int
    weights: torch.Tensor  # (last - first, hi - lo) float32


@lru_cache(maxsize=16)
def _dense_blocks(in_size: int, out_size: int, outputs: int) -> tuple[_Block, ...] | None:
    """The axis in dense blocks of ``outputs`` outputs, or None where that would be too large."""
    taps = _taps(in_size, out_size)
    bounds = [(first, min(first + outputs, out_size)) for first in range(0, out_size, outputs)]
    total = sum((last - first) * int(taps.stop[last - 1] - taps.start[first]) for first, last in bounds)
    if len(bounds) > _MAX_DENSE_BLOCKS or total > _DENSE_BLOCK_WEIGHTS:
        return None
    blocks = []
    for first, last in bounds:
        weights = torch.from_numpy(_dense_weights(taps, first, last))
        blocks.append(_Block(first, last, int(taps.start[first]), int(taps.stop[last - 1]), weights))
    return tuple(blocks)


def _resize_dense(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor | None:
    """:func:`resize_bicubic_aa` in dense blocks, rows first, for a contiguous (H, W, C) CPU image of
    ordinary size; None where this path does not apply (the caller takes the sparse one)."""
    height, width, channels = image.shape
    row_width = width * channels
    rows = _dense_blocks(height, out_h, _BLOCK_OUTPUTS[0])
    columns = _dense_blocks(width, out_w, _BLOCK_OUTPUTS[1])
    if (
        rows is None
        or columns is None
        or image.device.type != "cpu"
        or not image.is_contiguous()
        or out_h * row_width > max(height * out_w * channels, _BLOCK_ELEMENTS)  # the intermediate stays small
        or max(block.hi - block.lo for block in rows) * row_width > _BLOCK_ELEMENTS
    ):
        return None
    flat = image.reshape(height, row_width)
    middle = torch.empty((out_h, row_width), dtype=torch.float32)
    chunk_rows = _BLOCK_ELEMENTS // row_width  # input rows converted to float at once (8 MB)
    i = 0
    while i < len(rows):  # consecutive blocks whose inputs fit in one chunk share its conversion
        j = i + 1
        while j < len(rows) and rows[j].hi - rows[i].lo <= chunk_rows:
            j += 1
        lo = rows[i].lo
        chunk = flat[lo : rows[j - 1].hi].to(torch.float32)
        for block in rows[i:j]:
            torch.mm(block.weights, chunk[block.lo - lo : block.hi - lo], out=middle[block.first : block.last])
        i = j
    # (h, W, C) -> (h * C, W): the second pass multiplies on the right, each block into its own columns
    middle = middle.reshape(out_h, width, channels).permute(0, 2, 1).reshape(out_h * channels, width)
    out = torch.empty((out_h * channels, out_w), dtype=torch.float32)
    for block in columns:
        out[:, block.first : block.last] = middle[:, block.lo : block.hi] @ block.weights.T
    return out.reshape(out_h, channels, out_w).permute(1, 0, 2)  # (C, h, w)


def resize_bicubic_aa(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, C) image of any dtype -> (C, h, w) float32, as ``F.interpolate(image as float (1, C, H, W),
    size, mode="bicubic", antialias=True, align_corners=False)`` within float rounding.

    Runs on the tensor's device.  The axis whose pass leaves the smaller intermediate goes first, so
    a very long thin image never expands to a huge intermediate.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {tuple(image.shape)}")
    height, width = int(image.shape[0]), int(image.shape[1])
    out_h, out_w = (int(s) for s in size)
    if min(height, width, out_h, out_w) < 1:
        raise ValueError(f"cannot resize {width}x{height} to {out_w}x{out_h}")
    dense = _resize_dense(image, out_h, out_w)
    if dense is not None:
        return dense
    # Rows first reads whole contiguous rows (faster); columns first when rows first would expand a
    # thin image (e.g. 1 x 2,000,000) to out_h full-width rows.
    if out_h * width <= max(height * out_w, _BLOCK_ELEMENTS):
        rows = _resize_leading(image, out_h)  # (h, W, C)
        return _resize_leading(rows.transpose(0, 1), out_w).permute(2, 1, 0)  # (w, h, C) -> (C, h, w)
    columns = _resize_leading(image.transpose(0, 1), out_w)  # (w, H, C)
    return _resize_leading(columns.transpose(0, 1), out_h).permute(2, 0, 1)  # (h, w, C) -> (C, h, w)
