"""Anomaly maps from model outputs: upsampled to the image's size, tiles blended, coloured on a GPU.

Shared by the writer (heatmaps, raw maps), ``calibrate`` (pixel statistics) and ``eval`` (maps
compared with masks), so that all of them measure the same map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from winclip_cli.core.tiling import Tile, TileBlender
from winclip_cli.io.outputs import LUT
from winclip_cli.jobs.decode import Decoded

# torch's bilinear upsampling precomputes indices and weights for every output row and column: for a
# 1 x 80,000,000 strip that is gigabytes. Past this many pixels on one side (no camera makes such
# images) the map is interpolated in chunks instead, with the same formula in float32.
LONG_SIDE_IN_CHUNKS = 1 << 16
_CHUNK = 1 << 20  # output pixels per side per chunk: index and weight arrays of a few MB


def upsample_grid(grid_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling (align_corners=False) of one (gh, gw) map straight to (height, width)."""
    if max(height, width) > LONG_SIDE_IN_CHUNKS:
        return upsample_grid_in_chunks(grid_map.float().cpu().numpy(), height, width)
    return upsample_grid_tensor(grid_map, height, width).numpy()


def _linear_taps(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """For outputs [start, stop): the two source indices and their weights, as torch computes them
    (source = (x + 0.5) * in / out - 0.5, clamped at 0; align_corners=False)."""
    scale = np.float32(in_size / out_size)
    source = np.maximum((np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    first = np.minimum(source.astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    far = (source - first).astype(np.float32)
    return first, second, np.float32(1) - far, far


def upsample_grid_in_chunks(grid: np.ndarray, height: int, width: int, chunk: int = _CHUNK) -> np.ndarray:
    """:func:`upsample_grid` for extreme sizes, in memory bounded by the output and ``chunk``."""
    out = np.empty((height, width), dtype=np.float32)
    gh, gw = grid.shape
    for r0 in range(0, height, chunk):
        r1 = min(height, r0 + chunk)
        top, bottom, w_top, w_bottom = _linear_taps(gh, height, r0, r1)
        rows = w_top[:, None] * grid[top] + w_bottom[:, None] * grid[bottom]  # (r1 - r0, gw)
        for c0 in range(0, width, chunk):
            c1 = min(width, c0 + chunk)
            left, right, w_left, w_right = _linear_taps(gw, width, c0, c1)
            out[r0:r1, c0:c1] = rows[:, left] * w_left + rows[:, right] * w_right
    return out


def upsample_grid_tensor(grid_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`upsample_grid` on the grid's own device, as a tensor."""
    up = F.interpolate(grid_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0]


_LUTS: dict[torch.device, torch.Tensor] = {}


def overlay_tensor(image: torch.Tensor, score_map: torch.Tensor) -> torch.Tensor:
    """:func:`outputs.overlay` with torch on the tensors' device: (H, W, 3) uint8 image and (H, W)
    scores -> (H, W, 3) uint8, the same values (the index as ``outputs.colour_index`` defines it)."""
    lut = _LUTS.get(image.device)
    if lut is None:
        lut = _LUTS.setdefault(image.device, torch.from_numpy(LUT.copy()).to(image.device))
    scaled = (score_map.float().double() * 255.0 + 0.5).float()  # rounded to float32 once, as Pillow does
    scaled = torch.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clamp_(0.0, 255.0)
    colours = lut[scaled.long()]  # truncation: the values are not negative
    return (image >> 1) + (colours >> 1) + (image & colours & 1)  # the mean rounded down, as outputs.overlay


def full_resolution_map(item: Decoded) -> np.ndarray:
    """The anomaly map at the image's own size: one upsampled grid, or the tiles blended together."""
    image = item.image
    assert image is not None
    if item.tiles is None:
        return upsample_grid(item.outputs[0][1], image.height, image.width)
    blender = TileBlender(image.height, image.width)
    for tile, (_, grid) in zip(item.tiles, item.outputs, strict=True):
        blender.add(tile, upsample_grid(grid, tile.height, tile.width))
    return blender.result()


def map_at_model_size(item: Decoded, size: Sequence[int]) -> np.ndarray:
    """The map at the model's input size, as evaluation compares it with masks: the grid upsampled (what
    ``WinClipScorer.score`` returns), or for a tiled file its full-resolution map resized to that size."""
    if item.tiles is None:
        return upsample_grid(item.outputs[0][1], *size)
    full = torch.from_numpy(full_resolution_map(item))
    return F.interpolate(full[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def image_score(item: Decoded) -> tuple[float, Tile | None]:
    """The image score (max over tiles in tiled mode) and the tile that produced it."""
    scores = [score for score, _ in item.outputs]
    best = int(np.argmax(scores))
    return scores[best], (item.tiles[best] if item.tiles else None)
