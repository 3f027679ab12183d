"""High-resolution inspection: `scan --tile` end to end, compared with scanning the tiles alone."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import invoke
from winclip_cli.core.tiling import tile_grid
from winclip_cli.io.memory import load_memory
from winclip_cli.io.outputs import read_results_csv


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A textured but smooth picture, so that every tile sees something different."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 20 + 2, width // 20 + 2, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(0, 30, (height, width, 3))
    return np.clip(np.asarray(big, dtype=np.int64) + noise, 0, 255).astype(np.uint8)


def test_tiled_map_equals_each_tile_scanned_alone(tmp_path, tiny_args):
    height, width, size = 500, 720, 240
    pixels = smooth_image(height, width, 0)
    big = tmp_path / "big" / "panel.png"
    big.parent.mkdir()
    Image.fromarray(pixels).save(big)
    out = tmp_path / "out"
    result = invoke(
        [
            "scan",
            str(big.parent),
            "--tile",
            str(size),
            "--tile-overlap",
            "0.25",
            "--save-maps",
            "--out",
            str(out),
            "-q",
            *tiny_args,
        ]
    )
    assert result.exit_code == 0, result.output
    (row,) = read_results_csv(out / "scores.csv")
    tiles = tile_grid(height, width, size, 0.25)
    assert int(row["tiles"]) == len(tiles) == 12
    assert Image.open(out / row["heatmap"]).size == (width, height)
    full_map = tifffile.imread(out / "maps" / "panel.png.tiff")
    assert full_map.shape == (height, width)

    # every tile scanned on its own, as an ordinary image (PNG is lossless: the same pixels)
    alone = tmp_path / "tiles"
    alone.mkdir()
    for tile in tiles:
        Image.fromarray(pixels[tile.y0 : tile.y1, tile.x0 : tile.x1]).save(alone / f"tile{tile.index:02d}.png")
    tiles_out = tmp_path / "tiles_out"
    assert invoke(["scan", str(alone), "--save-maps", "--out", str(tiles_out), "-q", *tiny_args]).exit_code == 0
    tile_rows = {r["path"]: r for r in read_results_csv(tiles_out / "scores.csv")}
    tile_scores = [float(tile_rows[f"tile{t.index:02d}.png"]["score"]) for t in tiles]
    assert float(row["score"]) == pytest.approx(max(tile_scores), abs=1e-6)
    best = tiles[int(np.argmax(tile_scores))]
    assert row["best_tile"] == f"{best.x0} {best.y0} {best.x1} {best.y1}"

    coverage = np.zeros((height, width), dtype=int)
    for tile in tiles:
        coverage[tile.y0 : tile.y1, tile.x0 : tile.x1] += 1
    checked = 0
    for tile in tiles:
        tile_map = tifffile.imread(tiles_out / "maps" / f"tile{tile.index:02d}.png.tiff")
        only_here = coverage[tile.y0 : tile.y1, tile.x0 : tile.x1] == 1
        region = full_map[tile.y0 : tile.y1, tile.x0 : tile.x1]
        np.testing.assert_allclose(region[only_here], tile_map[only_here], atol=1e-5)
        checked += int(only_here.sum())
    assert checked > 0.2 * height * width  # a real share of the image was compared


def test_tile_auto_leaves_small_images_whole_and_tiles_large_ones(tmp_path, tiny_args):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(smooth_image(200, 300, 1)).save(folder / "small.png")
    Image.fromarray(smooth_image(400, 1100, 2)).save(folder / "wide.png")
    out = tmp_path / "out"
    assert invoke(["scan", str(folder), "--tile", "auto", "--out", str(out), "-q", *tiny_args]).exit_code == 0
    rows = {r["path"]: r for r in read_results_csv(out / "scores.csv")}
    assert rows["small.png"]["tiles"] == "1"  # left whole: 300 px fits the model at under 4x downscaling
    assert int(rows["wide.png"]["tiles"]) >= 2
    assert Image.open(out / rows["wide.png"]["heatmap"]).size == (1100, 400)


def test_few_shot_with_tiles_and_mismatched_tiling_is_refused(tmp_path, tiny_args):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(300, 480, 10 + i)).save(good / f"g{i}.png")
    refs = tmp_path / "refs.npz"
    assert invoke(["build-refs", str(good), "--tile", "240", "--out", str(refs), "-q", *tiny_args]).exit_code == 0
    memory = load_memory(refs)
    per_image = len(tile_grid(300, 480, 240, 0.25))
    assert memory.k == 2 and memory.entries == 2 * per_image
    assert [r["entries"] for r in memory.metadata["references"]] == [per_image, per_image]
    out = tmp_path / "out"
    result = invoke(["scan", str(good), "--tile", "240", "--refs", str(refs), "--out", str(out), "-q", *tiny_args])
    assert result.exit_code == 0, result.output
    zero = tmp_path / "zero"
    assert invoke(["scan", str(good), "--tile", "240", "--out", str(zero), "-q", *tiny_args]).exit_code == 0
    # the references themselves: every tile is in the memory, so the few-shot part is 0 and scores halve
    for few, z in zip(read_results_csv(out / "scores.csv"), read_results_csv(zero / "scores.csv"), strict=True):
        assert float(few["score"]) == pytest.approx(float(z["score"]) / 2, abs=2e-6)
    result = invoke(["scan", str(good), "--refs", str(refs), "--out", str(tmp_path / "o"), *tiny_args])
    assert result.exit_code == 2 and "tiling" in result.stderr


@pytest.mark.parametrize("value, message", [("12", "too small"), ("big", "--tile takes")])
def test_bad_tile_options(tmp_path, tiny_args, value, message):
    result = invoke(["scan", str(tmp_path), "--tile", value, *tiny_args])
    assert result.exit_code == 2 and message in result.stderr
