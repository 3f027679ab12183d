"""The fast paths of a scan give the values of the slow ones: the banded-matrix resize against torch's
antialiased bicubic, the uint8 heatmap colouring against the float blend, the streaming PNG encoder
against Pillow's decoder; plus bounded memory for thin images and ``--heatmaps png|jpg|none``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, SAMPLE_DATA
from helpers import invoke
from winclip_cli.core.resize import axis_weights, resize_bicubic_aa
from winclip_cli.io.images import LoadedImage, load_image, preprocess, to_unit_tensor
from winclip_cli.io.outputs import (
    LUT,
    colorize,
    colour_index,
    overlay,
    read_results_csv,
    write_png,
    write_png_atomic,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PARITY = 1e-4  # what the issue allows on normalised model inputs; measured worst is about 6e-6
SAMPLE_TEST = SAMPLE_DATA / "fabric" / "test"


def reference_preprocess(image: LoadedImage, size: tuple[int, int], mean=MEAN, std=STD) -> torch.Tensor:
    """What preprocess computed before: F.interpolate on the full-size [0, 1] float image."""
    x = to_unit_tensor(image)
    x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return (x - torch.tensor(list(mean))[:, None, None]) / torch.tensor(list(std))[:, None, None]


def random_image(rng: np.random.Generator, height: int, width: int, dtype) -> LoadedImage:
    if dtype == np.float32:
        return LoadedImage(rng.random((height, width, 3), dtype=np.float32))
    top = np.iinfo(dtype).max
    return LoadedImage(rng.integers(0, top + 1, (height, width, 3)).astype(dtype))


# ------------------------------------------------------------------------------------------------ resize

SHAPES = [
    (1080, 1920),  # a 2 MP camera frame, 8x / 4.5x downscale
    (480, 640),
    (1001, 999),  # odd sizes
    (239, 241),  # almost the model size: scale near 1 on both sides
    (240, 240),
    (100, 100),  # upscales
    (37, 913),
    (1, 1),
    (1, 7),
    (7, 1),
    (1, 500),  # 1 x N and N x 1
    (500, 1),
    (3, 2000),
    (2000, 3),
]


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_preprocess_matches_torch_antialiased_bicubic(height, width, dtype):
    rng = np.random.default_rng(height * 7919 + width)
    image = random_image(rng, height, width, dtype)
    for size in [(240, 240), (224, 224), (17, 300), (300, 17), (1, 1)]:
        got = preprocess(image, size, MEAN, STD)
        want = reference_preprocess(image, size)
        assert got.shape == want.shape == (3, *size)
        assert got.dtype == torch.float32
        assert float((got - want).abs().max()) <= PARITY, (height, width, size)


@pytest.mark.parametrize("n_in,n_out", [(1920, 240), (1080, 240), (241, 240), (240, 241), (5, 240), (1, 3), (7, 1)])
def test_axis_weights_are_torch_weights(n_in, n_out):
    """Resizing the identity along one axis gives torch's weight matrix itself."""
    identity = torch.eye(n_in)[None, None]  # the other axis keeps its size: torch leaves it as is
    torch_weights = F.interpolate(identity, size=(n_out, n_in), mode="bicubic", antialias=True)[0, 0]
    ours = axis_weights(n_in, n_out)
    np.testing.assert_allclose(ours, torch_weights.numpy(), rtol=0, atol=2e-6)  # float32 rounding of the kernel
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-6)


def test_preprocess_of_real_sample_images_matches_torch():
    worst = 0.0
    for path in sorted(SAMPLE_DATA.rglob("*.jpg")):
        image = load_image(path)
        worst = max(
            worst,
            float((preprocess(image, (240, 240), MEAN, STD) - reference_preprocess(image, (240, 240))).abs().max()),
        )
    assert worst <= PARITY


def test_resize_reads_uint8_directly_and_keeps_the_input():
    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    before = pixels.clone()
    out = resize_bicubic_aa(pixels, (20, 30))
    want = F.interpolate(pixels.permute(2, 0, 1)[None].float(), size=(20, 30), mode="bicubic", antialias=True)[0]
    assert torch.equal(pixels, before)
    assert float((out - want).abs().max()) <= 1e-3  # on the 0..255 scale: 4e-6 relative


def test_resize_rejects_empty_sizes():
    with pytest.raises(ValueError):
        resize_bicubic_aa(torch.zeros(4, 4, 3), (0, 5))


def test_thin_images_are_resized_in_bounded_memory(tmp_path):
    """A 1 x 2,000,000 PNG used to need a 6.5 GB intermediate; now memory stays near the image's size."""
    rng = np.random.default_rng(0)
    paths = []
    for height, width in [(1, 2_000_000), (2_000_000, 1)]:
        paths.append(str(tmp_path / f"thin-{height}x{width}.png"))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1], compress_level=1)
    script = textwrap.dedent(
        f"""
        import resource, torch
        from winclip_cli.io.images import load_image, preprocess
        images = [load_image(path) for path in {paths!r}]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for image in images:
            x = preprocess(image, (240, 240), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
            assert x.shape == (3, 240, 240) and bool(torch.isfinite(x).all())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024, images[0].rgb.nbytes / 2**20)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_mb, image_mb = map(float, done.stdout.split())
    assert image_mb == pytest.approx(6_000_000 / 2**20)
    assert grown_mb < 200, f"peak RSS grew by {grown_mb:.0f} MB for a {image_mb:.0f} MB image"


def test_thin_image_matches_torch_on_a_smaller_case():
    rng = np.random.default_rng(5)
    image = random_image(rng, 1, 20_000, np.uint8)
    assert (
        float((preprocess(image, (240, 240), MEAN, STD) - reference_preprocess(image, (240, 240))).abs().max())
        <= PARITY
    )


# ---------------------------------------------------------------------------------------------- heatmaps


def old_colorize(score_map: np.ndarray) -> np.ndarray:
    """The float64 colouring that heatmaps used before the uint8 LUT path (index rounded half to even)."""
    band = np.nan_to_num(np.asarray(score_map, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return LUT[np.rint(np.clip(band, 0.0, 1.0) * 255.0).astype(np.intp)]


def reference_index(score_map: np.ndarray) -> np.ndarray:
    """colour_index as documented, in plain numpy: score * 255 + 0.5 in float64, rounded to float32,
    truncated and clipped; NaN as 0."""
    scaled = (np.asarray(score_map, dtype=np.float32).astype(np.float64) * 255.0 + 0.5).astype(np.float32)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.trunc(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def reference_overlay(image: np.ndarray, score_map: np.ndarray) -> np.ndarray:
    """The mean of image and colours, rounded down, in wide integers."""
    return ((image.astype(np.int32) + LUT[reference_index(score_map)]) // 2).astype(np.uint8)


def awkward_map(rng: np.random.Generator, height: int, width: int, dtype=np.float32) -> np.ndarray:
    scores = (rng.random((height, width)) * 1.4 - 0.2).astype(dtype)
    k = np.arange(256)
    scores[0, :256] = ((k + 0.5) / 255).astype(dtype)  # right on the rounding boundaries
    scores[1, :256] = np.nextafter(((k + 0.5) / 255).astype(dtype), dtype(0))
    scores[3, :256] = (k / 255).astype(dtype)  # every colour exactly
    scores[2, :4] = [np.nan, np.inf, -np.inf, 1.0]
    scores[4, :3] = [np.float32(-0.0), np.nextafter(np.float32(1), np.float32(2)), 1e30]
    return scores


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_colour_index_and_overlay_follow_their_definition(dtype):
    """Pillow's passes (what the scan runs) give exactly the documented values, on boundary cases too."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # more than one band of rows
    scores = awkward_map(rng, 300, 400, dtype)
    np.testing.assert_array_equal(colour_index(scores), reference_index(scores))
    np.testing.assert_array_equal(colorize(scores), LUT[reference_index(scores)])
    np.testing.assert_array_equal(overlay(image, scores), reference_overlay(image, scores))
    assert list(colour_index(scores)[2, :4]) == [0, 255, 0, 255]
    assert list(colour_index(scores)[3, :256]) == list(range(256))


def test_colours_look_as_before():
    """Against the float64 colouring of earlier versions: the same colour index but at exact halves
    (now rounded up, was half to even), the blend at most 1 lower per channel (now rounded down)."""
    rng = np.random.default_rng(13)
    image = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    scores = rng.random((200, 300), dtype=np.float32)
    index = colour_index(scores).astype(int)
    before = np.rint(scores.astype(np.float64) * 255.0).astype(int)
    assert np.abs(index - before).max() <= 1 and np.count_nonzero(index != before) <= 2
    same = index == before
    blended_before = np.rint((image.astype(np.float32) + old_colorize(scores)) / 2)
    diff = blended_before[same] - overlay(image, scores)[same]
    assert diff.min() >= 0 and diff.max() <= 1


def test_overlay_on_a_device_equals_the_numpy_overlay():
    from winclip_cli.jobs.maps import overlay_tensor

    rng = np.random.default_rng(12)
    image = rng.integers(0, 256, (270, 300, 3), dtype=np.uint8)
    scores = awkward_map(rng, 270, 300)
    on_device = overlay_tensor(torch.from_numpy(image), torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(on_device, overlay(image, scores))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (64, 5), (65, 5), (300, 257)])
def test_png_encoder_round_trips_through_pillow(tmp_path, shape):
    rgb = np.random.default_rng(shape[0] * 1000 + shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for level in (0, 1, 6):
        path = tmp_path / f"x{level}.png"
        write_png_atomic(path, rgb, compress_level=level)
        with Image.open(path) as decoded:
            assert decoded.format == "PNG" and decoded.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_png_encoder_works_with_the_standard_zlib(monkeypatch, tmp_path):
    import builtins
    import io

    real_import = builtins.__import__

    def no_isal(name, *args, **kwargs):
        if name.startswith("isal"):
            raise ImportError("isal hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_isal)
    rgb = np.random.default_rng(2).integers(0, 256, (70, 33, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    write_png(buffer, rgb, compress_level=1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), rgb)


def test_writer_device_path_gives_the_cpu_outputs(tmp_path, tiny_backbone):
    """The GPU branch of the writer (upsample and colour where the model ran), exercised on the CPU."""
    from winclip_cli.jobs.decode import Decoded
    from winclip_cli.jobs.write import ResultWriter, RowContext
    from winclip_cli.spec import OutputSpec

    image = load_image(SAMPLE_TEST / "local" / "textile_0001.jpg")
    grid = torch.from_numpy(np.random.default_rng(4).random((15, 15), dtype=np.float32))
    rows = {}
    for name, device in (("cpu", None), ("device", torch.device("cpu"))):
        writer = ResultWriter(OutputSpec(tmp_path / name), RowContext(0.5, "test", "zero-shot"), lambda group: None)
        # what a CUDA device sets; the same code runs on the CPU here
        writer.settings = dataclasses.replace(writer.settings, device=device)
        item = Decoded(SAMPLE_TEST / "x.jpg", "x.jpg", image=image, outputs=[(0.25, grid)])
        rows[name] = writer.make_row(item)
        writer.close()
    assert rows["cpu"].max_pixel_score == rows["device"].max_pixel_score
    assert rows["cpu"].heatmap == rows["device"].heatmap == "heatmaps/x.jpg.png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "cpu" / rows["cpu"].heatmap)),
        np.asarray(Image.open(tmp_path / "device" / rows["device"].heatmap)),
    )


# ----------------------------------------------------------------------------------------- --heatmaps CLI


def scan(out: Path, tiny_args: list[str], *extra: str):
    args = ["scan", str(SAMPLE_TEST), "--class", "fabric", "--out", str(out), "-q", *extra, *tiny_args]
    return invoke(args)


def test_scan_heatmaps_jpg_and_none_keep_the_png_scores(tmp_path, tiny_args, monkeypatch):
    from winclip_cli import options

    results = {}
    for fmt in ("png", "jpg", "none"):
        out = tmp_path / fmt
        result = scan(out, tiny_args, "--heatmaps", fmt, "--save-maps")
        assert result.exit_code == 0, result.output
        results[fmt] = read_results_csv(out / "scores.csv")
        assert json.loads((out / "run.json").read_text())["heatmaps"] == fmt
    png, jpg, none = results["png"], results["jpg"], results["none"]
    assert len(png) == len(jpg) == len(none) == 6
    for a, b, c in zip(png, jpg, none, strict=True):
        assert a["score"] == b["score"] == c["score"] and a["max_pixel_score"] == c["max_pixel_score"]
        assert a["heatmap"] == f"heatmaps/{a['path']}.png"
        assert b["heatmap"] == f"heatmaps/{b['path']}.jpg"
        assert c["heatmap"] == ""
        with (
            Image.open(tmp_path / "jpg" / b["heatmap"]) as heat_jpg,
            Image.open(tmp_path / "png" / a["heatmap"]) as heat_png,
        ):
            assert heat_jpg.format == "JPEG" and heat_png.format == "PNG"
            assert heat_jpg.size == heat_png.size == (int(a["width"]), int(a["height"]))
            # same picture, up to JPEG's loss
            diff = np.abs(np.asarray(heat_jpg, dtype=np.int16) - np.asarray(heat_png, dtype=np.int16))
            assert float(diff.mean()) < 4
    assert not (tmp_path / "none" / "heatmaps").exists()
    # scores only, but the report still gets the image and a small heatmap of each
    thumbs = sorted(p.name for p in (tmp_path / "none" / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == 2 * len(none)
    page = invoke(["report", str(tmp_path / "none")])
    assert page.exit_code == 0, page.output
    html = (tmp_path / "none" / "report.html").read_text()
    assert html.count("<img") >= 2 * len(none)
    # the raw maps do not depend on the heatmap format
    for row in png:
        name = row["path"] + ".tiff"
        np.testing.assert_array_equal(
            tifffile.imread(tmp_path / "png" / "maps" / name), tifffile.imread(tmp_path / "none" / "maps" / name)
        )
    assert options.HEATMAP_FORMATS == ("png", "jpg", "none")


def test_scan_heatmaps_rejects_an_unknown_format(tmp_path, tiny_args):
    result = scan(tmp_path / "out", tiny_args, "--heatmaps", "gif")
    assert result.exit_code == 2
    assert "--heatmaps takes png, jpg, none, not 'gif'" in result.output
    assert "Traceback" not in result.output


def test_sample_data_scores_and_maps_match_the_torch_resize(tmp_path, tiny_args, monkeypatch):
    """The whole scan with the new resize against the same scan with F.interpolate: scores within one unit
    of the CSV's 6th decimal (float rounding can tip a value across a rounding boundary), maps within
    float rounding."""
    import winclip_cli.jobs.decode as decode

    out_new = tmp_path / "new"
    assert scan(out_new, tiny_args, "--save-maps").exit_code == 0

    def torch_preprocess(image, size, mean, std, device=None):
        return reference_preprocess(image, tuple(size), mean, std)

    monkeypatch.setattr(decode, "preprocess", torch_preprocess)
    out_old = tmp_path / "old"
    assert scan(out_old, tiny_args, "--save-maps").exit_code == 0
    new_rows, old_rows = read_results_csv(out_new / "scores.csv"), read_results_csv(out_old / "scores.csv")
    assert [r["path"] for r in new_rows] == [r["path"] for r in old_rows]
    for new, old in zip(new_rows, old_rows, strict=True):
        assert abs(float(new["score"]) - float(old["score"])) <= 1.0000001e-6
    worst = max(
        float(
            np.abs(
                tifffile.imread(out_new / "maps" / (r["path"] + ".tiff"))
                - tifffile.imread(out_old / "maps" / (r["path"] + ".tiff"))
            ).max()
        )
        for r in new_rows
    )
    assert worst < 1e-5


def test_sharded_jpg_scans_merge_with_their_heatmaps(tmp_path, tiny_args):
    shards = []
    for k in (1, 2):
        shards.append(tmp_path / f"shard{k}")
        result = scan(shards[-1], tiny_args, "--heatmaps", "jpg", "--shard", f"{k}/2")
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    result = invoke(["merge", *map(str, shards), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    rows = read_results_csv(merged / "scores.csv")
    assert len(rows) == 6
    for row in rows:
        assert row["heatmap"] == f"heatmaps/{row['path']}.jpg"
        with Image.open(merged / row["heatmap"]) as heat:
            assert heat.format == "JPEG"


@pytest.mark.parametrize("height,width", [(1080, 1920), (480, 640), (239, 241), (100, 100), (37, 913)])
def test_dense_blocks_equal_the_sparse_band(height, width, monkeypatch):
    """Ordinary sizes take the dense-block path on the CPU; it gives the sparse path's values."""
    from winclip_cli.core import resize

    rng = np.random.default_rng(height + width)
    pixels = torch.from_numpy(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert resize._resize_dense(pixels, 240, 240) is not None
    dense = resize_bicubic_aa(pixels, (240, 240))
    monkeypatch.setattr(resize, "_resize_dense", lambda image, out_h, out_w: None)
    sparse = resize_bicubic_aa(pixels, (240, 240))
    assert float((dense - sparse).abs().max()) <= 2e-4  # on the 0..255 scale: float rounding


def test_thin_and_huge_images_take_the_sparse_band():
    from winclip_cli.core import resize

    assert resize._resize_dense(torch.zeros((1, 300_000, 3), dtype=torch.uint8), 240, 240) is None
    assert resize._resize_dense(torch.zeros((300_000, 1, 3), dtype=torch.uint8), 240, 240) is None


def test_merging_shards_of_different_heatmap_formats_says_so(tmp_path, tiny_args):
    """A png shard and a --heatmaps none shard: each row keeps what it has, run.json names both."""
    shards = []
    for k, fmt in ((1, "png"), (2, "none")):
        shards.append(tmp_path / f"shard{k}")
        result = scan(shards[-1], tiny_args, "--heatmaps", fmt, "--shard", f"{k}/2")
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    result = invoke(["merge", *map(str, shards), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert json.loads((merged / "run.json").read_text())["heatmaps"] == "png,none"
    rows = read_results_csv(merged / "scores.csv")
    from_png = {row["path"] for row in read_results_csv(shards[0] / "scores.csv")}
    for row in rows:
        if row["path"] in from_png:
            assert row["heatmap"] == f"heatmaps/{row['path']}.png" and (merged / row["heatmap"]).is_file()
        else:
            assert row["heatmap"] == ""
    assert len(rows) == 6 and 0 < len(from_png) < 6


def test_merging_merged_folders_names_each_heatmap_format_once(tmp_path, tiny_args):
    shards = []
    for k, fmt in ((1, "png"), (2, "none")):
        shards.append(tmp_path / f"shard{k}")
        assert scan(shards[-1], tiny_args, "--heatmaps", fmt, "--shard", f"{k}/2").exit_code == 0
    for name, order in (("m1", shards), ("m2", shards[::-1])):
        assert invoke(["merge", *map(str, order), "--out", str(tmp_path / name)]).exit_code == 0
    assert invoke(["merge", str(tmp_path / "m1"), str(tmp_path / "m2"), "--out", str(tmp_path / "m3")]).exit_code == 0
    assert json.loads((tmp_path / "m3" / "run.json").read_text())["heatmaps"] == "png,none"
