"""Tiled mode: the tile grid, the blend window, and seamless reassembly of tile maps (pure numpy, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from winclip_cli.core.tiling import Tile, TileBlender, auto_tile_size, blend_window, crop, tile_grid

OVERLAPS = [0.0, 0.25, 0.5]
# Image shapes (height, width) for tile size 240: sizes that do and do not divide the image, thin and tiny ones.
SHAPES = [(1000, 700), (720, 960), (240, 240), (100, 50), (241, 241), (239, 1000), (517, 263)]


def coverage(height: int, width: int, tiles: list[Tile]) -> np.ndarray:
    """How many tiles cover each pixel."""
    count = np.zeros((height, width), dtype=np.int64)
    for t in tiles:
        count[t.y0 : t.y1, t.x0 : t.x1] += 1
    return count


def blend(height: int, width: int, tiles: list[Tile], maps: list[np.ndarray], border: float = 0.25) -> np.ndarray:
    blender = TileBlender(height, width, border)
    for t, m in zip(tiles, maps, strict=True):
        blender.add(t, m)
    assert blender.complete
    return blender.result()


def smooth_map(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return (0.5 + 0.4 * np.sin(x / 37) * np.cos(y / 53)).astype(np.float32)


def checkerboard_maps(tiles: list[Tile]) -> list[np.ndarray]:
    """Tile maps that are constant 0 or 1, alternating like a checkerboard over the grid, so neighbours differ by 1."""
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    return [np.full((t.height, t.width), (ys.index(t.y0) + xs.index(t.x0)) % 2, dtype=np.float32) for t in tiles]


# --- tile_grid ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_grid_covers_every_pixel_with_inside_boxes(height: int, width: int, overlap: float) -> None:
    size = 240
    tiles = tile_grid(height, width, size, overlap)
    assert coverage(height, width, tiles).min() >= 1
    for i, t in enumerate(tiles):
        assert t.index == i
        assert 0 <= t.x0 < t.x1 <= width and 0 <= t.y0 < t.y1 <= height
        # Full size unless the image is smaller than the tile in that dimension.
        assert t.width == min(size, width) and t.height == min(size, height)
    # The last tile along each axis ends exactly at the border.
    assert max(t.x1 for t in tiles) == width and max(t.y1 for t in tiles) == height


@pytest.mark.parametrize("overlap", OVERLAPS + [0.1, 0.9])
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_grid_row_major_even_starts_and_tile_count(height: int, width: int, overlap: float) -> None:
    size = 240
    tiles = tile_grid(height, width, size, overlap)
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    # A full grid, in row-major order.
    assert [(t.y0, t.x0) for t in tiles] == [(y, x) for y in ys for x in xs]
    stride = max(1, round(size * (1 - overlap)))
    for length, starts in ((height, ys), (width, xs)):
        expected = 1 if length <= size else math.ceil((length - size) / stride) + 1
        assert len(starts) == expected
        assert starts[0] == 0
        steps = np.diff(starts)
        assert np.all(steps > 0)  # strictly increasing
        assert np.all(steps <= stride)  # at least the requested overlap
        if len(steps):
            assert steps.max() - steps.min() <= 1  # spread as evenly as integers allow


def test_grid_known_cases() -> None:
    assert tile_grid(240, 240, 240) == [Tile(0, 0, 0, 240, 240)]
    assert tile_grid(100, 50, 240) == [Tile(0, 0, 0, 50, 100)]
    assert tile_grid(100, 241, 240, 0.25) == [Tile(0, 0, 0, 240, 100), Tile(1, 1, 0, 241, 100)]
    tiles = tile_grid(1000, 700, 240, 0.25)  # stride 180: 6 rows x 4 columns
    assert len(tiles) == 24
    assert sorted({t.x0 for t in tiles}) == [0, 153, 307, 460]
    assert tiles[-1] == Tile(23, 460, 760, 700, 1000)
    # Overlap 0 with a dividing size: a plain partition.
    assert coverage(480, 720, tile_grid(480, 720, 240, 0.0)).max() == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": -240},
        {"size": 2.5},
        {"size": True},
        {"overlap": -0.1},
        {"overlap": 1.0},
        {"overlap": 1.5},
        {"overlap": float("nan")},
        {"overlap": "0.25"},
        {"height": 0},
        {"width": -1},
        {"width": 7.0},
    ],
)
def test_grid_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"height": 1000, "width": 700, "size": 240, "overlap": 0.25} | kwargs
    with pytest.raises(ValueError):
        tile_grid(**args)


def test_grid_accepts_numpy_integers() -> None:
    assert tile_grid(np.int64(480), np.int32(480), np.int64(240), np.float32(0.5)) == tile_grid(480, 480, 240, 0.5)


# --- blend_window ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(240, 240), (241, 240), (100, 50), (1, 1), (2, 7), (960, 333)])
@pytest.mark.parametrize("border", [0.1, 0.25, 0.5])
def test_window_positive_centred_symmetric_separable(height: int, width: int, border: float) -> None:
    w = blend_window(height, width, border)
    assert w.shape == (height, width) and w.dtype == np.float32
    assert w.min() > 0
    assert w.max() == 1.0
    assert w[height // 2, width // 2] == 1.0 and w[(height - 1) // 2, (width - 1) // 2] == 1.0
    np.testing.assert_array_equal(w, w[::-1, :])
    np.testing.assert_array_equal(w, w[:, ::-1])
    # Separable: the outer product of its middle column and middle row.
    r, c = height // 2, width // 2
    np.testing.assert_allclose(w, np.outer(w[:, c], w[r, :]), rtol=1e-6)
    # Rises monotonically from the edge to the centre.
    assert np.all(np.diff(w[r, : c + 1]) >= 0) and np.all(np.diff(w[: r + 1, c]) >= 0)


def test_window_tapers_smoothly_over_border() -> None:
    row = blend_window(1, 240, 0.25)[0].astype(np.float64)
    assert row[0] < 0.01  # nearly 0 at the edge ...
    assert np.all(row[60:180] == 1.0)  # ... flat 1 beyond the 60 px (25 %) taper
    assert np.abs(np.diff(row)).max() < 0.03  # smooth: no step anywhere
    np.testing.assert_array_equal(blend_window(5, 9, 0.0), np.ones((5, 9), dtype=np.float32))


@pytest.mark.parametrize("border", [-0.1, 0.6, float("nan"), None])
def test_window_rejects_bad_border(border: object) -> None:
    with pytest.raises(ValueError):
        blend_window(10, 10, border)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TileBlender(10, 10, border)  # type: ignore[arg-type]


# --- TileBlender ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_blend_constant_is_exact(height: int, width: int, overlap: float) -> None:
    tiles = tile_grid(height, width, 240, overlap)
    out = blend(height, width, tiles, [np.full((t.height, t.width), 0.37, dtype=np.float32) for t in tiles])
    assert out.shape == (height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overlap", OVERLAPS + [0.1, 0.75])
@pytest.mark.parametrize(("height", "width"), [(1000, 700), (517, 263), (100, 50)])
def test_blend_reconstructs_smooth_map_without_seams(height: int, width: int, overlap: float) -> None:
    truth = smooth_map(height, width)
    tiles = tile_grid(height, width, 240, overlap)
    out = blend(height, width, tiles, [crop(truth, t) for t in tiles])
    np.testing.assert_allclose(out, truth, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize(("height", "width"), [(1000, 700), (241, 241), (517, 263)])
def test_blend_pixels_covered_once_keep_their_tile_value(height: int, width: int, overlap: float) -> None:
    tiles = tile_grid(height, width, 240, overlap)
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 1.0, size=len(tiles)).astype(np.float32)
    out = blend(
        height,
        width,
        tiles,
        [np.full((t.height, t.width), v, dtype=np.float32) for t, v in zip(tiles, values, strict=True)],
    )
    count = coverage(height, width, tiles)
    owner = np.full((height, width), -1)
    for t in tiles:
        owner[t.y0 : t.y1, t.x0 : t.x1] = t.index
    once = count == 1
    assert once.any()
    # Even at image corners, where the window weight is ~1e-6, the weight cancels: one float32 rounding at most.
    np.testing.assert_allclose(out[once], values[owner[once]], rtol=2 * np.finfo(np.float32).eps, atol=0)


@pytest.mark.parametrize("overlap", [0.1, 0.25, 0.5])
@pytest.mark.parametrize(("height", "width"), [(1000, 700), (517, 263), (100, 1000)])
def test_blend_has_no_hard_seams_between_disagreeing_tiles(height: int, width: int, overlap: float) -> None:
    tiles = tile_grid(height, width, 240, overlap)
    out = blend(height, width, tiles, checkerboard_maps(tiles)).astype(np.float64)
    assert out.min() >= 0.0 and out.max() <= 1.0  # a convex combination of the tile values
    jumps = [np.abs(np.diff(out, axis=axis)).max() for axis in (0, 1) if out.shape[axis] > 1]
    # Neighbouring tiles differ by 1; blended neighbouring pixels must differ by far less.
    assert max(jumps) < 0.2


def test_blend_without_overlap_is_a_plain_mosaic() -> None:
    tiles = tile_grid(480, 720, 240, 0.0)
    maps = checkerboard_maps(tiles)
    out = blend(480, 720, tiles, maps)
    for t, m in zip(tiles, maps, strict=True):
        np.testing.assert_array_equal(crop(out, t), m)


def test_blend_rejects_wrong_map_shape() -> None:
    blender = TileBlender(480, 480)
    tile = tile_grid(480, 480, 240)[0]
    for bad in (np.zeros((240, 239)), np.zeros((239, 240)), np.zeros((240, 240, 1)), np.zeros(240 * 240)):
        with pytest.raises(ValueError, match="shape"):
            blender.add(tile, bad)


def test_blend_rejects_tiles_outside_the_image() -> None:
    blender = TileBlender(100, 100)
    for tile in (Tile(0, 0, 0, 101, 50), Tile(0, -1, 0, 49, 50), Tile(0, 10, 10, 10, 20)):
        with pytest.raises(ValueError):
            blender.add(tile, np.zeros((max(tile.height, 0), max(tile.width, 0))))


def test_blend_incomplete_coverage_is_an_error() -> None:
    tiles = tile_grid(480, 480, 240, 0.25)
    blender = TileBlender(480, 480)
    assert not blender.complete
    with pytest.raises(ValueError, match="not covered"):
        blender.result()
    for t in tiles[:-1]:
        blender.add(t, np.zeros((t.height, t.width), dtype=np.float32))
    assert not blender.complete
    with pytest.raises(ValueError, match="not covered"):
        blender.result()
    blender.add(tiles[-1], np.zeros((240, 240), dtype=np.float32))
    assert blender.complete
    np.testing.assert_array_equal(blender.result(), 0.0)


def test_blend_accepts_float64_maps_and_result_is_repeatable() -> None:
    tiles = tile_grid(300, 300, 240, 0.25)
    truth = smooth_map(300, 300).astype(np.float64)
    blender = TileBlender(300, 300)
    for t in tiles:
        blender.add(t, crop(truth, t))
    first = blender.result()
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, blender.result())
    np.testing.assert_allclose(first, truth, atol=1e-5)


# --- crop -----------------------------------------------------------------------------------------------------------


def test_crop_2d_and_3d() -> None:
    tile = Tile(3, 10, 20, 50, 25)
    gray = np.arange(30 * 60).reshape(30, 60)
    rgb = np.stack([gray, gray + 1, gray + 2], axis=-1)
    assert crop(gray, tile).shape == (tile.height, tile.width) == (5, 40)
    assert crop(rgb, tile).shape == (5, 40, 3)
    assert crop(gray, tile)[0, 0] == gray[20, 10]
    np.testing.assert_array_equal(crop(rgb, tile)[..., 2], crop(gray, tile) + 2)


# --- auto_tile_size -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(240, 240), (100, 50), (480, 640), (960, 960), (720, 960)])
def test_auto_small_image_is_not_tiled(height: int, width: int) -> None:
    assert auto_tile_size(height, width) is None


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (1944, 2592, 960),  # 5 MP
        (6144, 8192, 960),  # 50 MP
        (961, 961, 960),
        (500, 3000, 500),  # long strip: square tiles as tall as the strip
        (100, 5000, 240),  # strip thinner than the model input: never below model_input
    ],
)
def test_auto_large_image_gets_a_multi_tile_size(height: int, width: int, expected: int) -> None:
    size = auto_tile_size(height, width)
    assert size == expected
    assert size >= 240 and (size <= min(height, width) or min(height, width) < 240)
    assert len(tile_grid(height, width, size)) > 1


def test_auto_respects_model_input_and_limit() -> None:
    assert auto_tile_size(3000, 4000, model_input=224, max_downscale=2.0) == 448
    assert auto_tile_size(448, 448, model_input=224, max_downscale=2.0) is None
    assert auto_tile_size(241, 241, max_downscale=1.0) == 240
    for bad in ({"max_downscale": 0.5}, {"max_downscale": float("inf")}, {"model_input": 0}):
        with pytest.raises(ValueError):
            auto_tile_size(4000, 3000, **bad)
