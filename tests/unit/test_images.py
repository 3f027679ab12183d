"""Tests for winclip_cli.io.images: discovery, decoding rules, errors and model preprocessing."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from winclip_cli.errors import ImageDecodeError, SetupError
from winclip_cli.io import images
from winclip_cli.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Discovery,
    LoadedImage,
    discover_images,
    find_images,
    load_image,
    preprocess,
    to_unit_tensor,
)

RNG = np.random.default_rng(1234)


def _rand_u8(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _save(path: Path, array: np.ndarray, fmt: str | None = None, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kwargs)
    return path


def _touch_image(path: Path) -> Path:
    return _save(path, np.zeros((2, 2, 3), np.uint8), fmt="PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_rgb16(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = array.shape
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _decode_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --------------------------------------------------------------------------------------------------
# find_images / discover_images
# --------------------------------------------------------------------------------------------------


def _rel(files: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in files]


def test_extensions_constant() -> None:
    assert IMAGE_EXTENSIONS == frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
    assert DEFAULT_MAX_PIXELS == 80_000_000


def test_find_images_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    for name in ["z.bmp", "b.png", "A.JPG", "sub/c.TIFF", "sub/deeper/d.webp", "x.jpeg", "sub/e.Tif"]:
        _touch_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "data.csv").write_text("1,2")
    (tmp_path / "dir.png").mkdir()  # a directory with an image-like name is not a file

    found = find_images(tmp_path)
    assert _rel(found, tmp_path) == sorted(
        ["A.JPG", "b.png", "sub/c.TIFF", "sub/deeper/d.webp", "sub/e.Tif", "x.jpeg", "z.bmp"]
    )
    assert all(p.is_absolute() == tmp_path.is_absolute() for p in found)


def test_sorting_is_by_relative_posix_path(tmp_path: Path) -> None:
    # "a/z.png" < "a-b.png" < "a_z.png" by string, regardless of directory-first walking order
    for name in ["a_z.png", "a/z.png", "a-b.png"]:
        _touch_image(tmp_path / name)
    assert _rel(find_images(tmp_path), tmp_path) == sorted(["a_z.png", "a/z.png", "a-b.png"])


def test_hidden_files_and_dirs_are_skipped(tmp_path: Path) -> None:
    _touch_image(tmp_path / "keep.png")
    _touch_image(tmp_path / ".hidden.png")
    _touch_image(tmp_path / ".cache" / "inside.png")
    _touch_image(tmp_path / "sub" / "._resource.jpg")
    assert _rel(find_images(tmp_path), tmp_path) == ["keep.png"]


def test_excluded_output_folder_is_skipped(tmp_path: Path) -> None:
    _touch_image(tmp_path / "in.png")
    _touch_image(tmp_path / "out" / "heatmap.png")
    _touch_image(tmp_path / "out" / "nested" / "x.png")
    _touch_image(tmp_path / "outer.png")  # shares a prefix with the excluded folder: kept
    found = find_images(tmp_path, exclude=[tmp_path / "out"])
    assert _rel(found, tmp_path) == ["in.png", "outer.png"]


def test_exclude_that_contains_root_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _touch_image(root / "a.png")
    assert _rel(find_images(root, exclude=[tmp_path]), root) == ["a.png"]
    assert _rel(find_images(root, exclude=[root]), root) == ["a.png"]


def test_symlink_loop_to_parent_terminates(tmp_path: Path) -> None:
    _touch_image(tmp_path / "a.png")
    _touch_image(tmp_path / "sub" / "b.png")
    os.symlink(tmp_path, tmp_path / "sub" / "loop", target_is_directory=True)
    os.symlink(tmp_path / "sub", tmp_path / "alias", target_is_directory=True)
    # Links back into the root are not followed: every file appears once, under its real path.
    assert _rel(find_images(tmp_path), tmp_path) == ["a.png", "sub/b.png"]


def test_symlinked_directory_outside_root_is_followed_once(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _touch_image(root / "a.png")
    _touch_image(outside / "o.png")
    os.symlink(outside, outside / "self", target_is_directory=True)  # a cycle outside the root
    os.symlink(outside, root / "link1", target_is_directory=True)
    os.symlink(outside, root / "link2", target_is_directory=True)
    os.symlink(root / "missing", root / "broken")  # broken links are ignored
    os.symlink(outside / "o.png", root / "file_link.png")  # file links count as files
    assert _rel(find_images(root), root) == ["a.png", "file_link.png", "link1/o.png"]


def test_excluded_folder_reached_through_symlink_is_skipped(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    _touch_image(root / "a.png")
    _touch_image(out / "o.png")
    os.symlink(out, root / "results", target_is_directory=True)
    assert _rel(find_images(root, exclude=[out]), root) == ["a.png"]


def test_single_file_root(tmp_path: Path) -> None:
    image = _touch_image(tmp_path / "one.PNG")
    assert find_images(image) == [image]
    other = tmp_path / "scan.raw"
    other.write_bytes(b"x")
    # An explicitly named file is returned whatever its extension; load_image decides by content.
    assert discover_images(other) == Discovery(files=[other], skipped_dirs=[])


def test_missing_root_is_a_setup_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="not found"):
        find_images(tmp_path / "nope")


def test_unreadable_directory_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch_image(tmp_path / "ok" / "a.png")
    _touch_image(tmp_path / "locked" / "b.png")
    real_scandir = os.scandir
    locked = tmp_path / "locked"

    def fake_scandir(path: os.PathLike[str] | str) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    result = discover_images(tmp_path)
    assert _rel(result.files, tmp_path) == ["ok/a.png"]
    assert result.skipped_dirs == [(locked, "permission denied")]


# --------------------------------------------------------------------------------------------------
# load_image: formats and modes
# --------------------------------------------------------------------------------------------------


def test_rgb_png_exact_pixels(tmp_path: Path) -> None:
    data = _rand_u8((5, 7, 3))
    image = load_image(_save(tmp_path / "rgb.png", data))
    assert image.rgb.dtype == np.uint8 and image.rgb.flags.c_contiguous
    assert (image.height, image.width) == (5, 7)
    np.testing.assert_array_equal(image.rgb, data)
    assert image.note == ""


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = _rand_u8((4, 6))
    rgb = load_image(_save(tmp_path / "g.png", gray)).rgb
    assert rgb.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    data = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [9, 9, 9, 0]]], np.uint8)
    rgb = load_image(_save(tmp_path / "a.png", data)).rgb
    np.testing.assert_array_equal(rgb[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(rgb[0, 1], np.rint(np.array([200, 100, 50]) * 128 / 255))
    np.testing.assert_array_equal(rgb[0, 2], [0, 0, 0])


def test_gray_alpha_la(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    rgb = load_image(tmp_path / "la.png").rgb
    np.testing.assert_array_equal(rgb[0], [[100, 100, 100], [0, 0, 0]])


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="L").convert("P")
    pal.putpalette(palette)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png").rgb[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    pal.save(tmp_path / "pt.png", transparency=1)  # index 1 (green) is fully transparent
    np.testing.assert_array_equal(load_image(tmp_path / "pt.png").rgb[0], [[255, 0, 0], [0, 0, 0], [0, 0, 255]])


def test_bilevel_image(tmp_path: Path) -> None:
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_image(tmp_path / "b.png").rgb[0], [[255] * 3, [0] * 3])


def test_cmyk_jpeg_decodes_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (9, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    rgb = load_image(tmp_path / "c.jpg").rgb
    assert rgb.shape == (6, 9, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60  # reddish


def test_16bit_grayscale_png_keeps_16_bits(tmp_path: Path) -> None:
    data = np.array([[0, 40000, 65535], [1, 257, 12345]], np.uint16)
    Image.fromarray(data).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    assert image.rgb.dtype == np.uint16
    for c in range(3):
        np.testing.assert_array_equal(image.rgb[..., c], data)


def test_16bit_rgb_png_says_depth_was_reduced(tmp_path: Path) -> None:
    data = np.array([[[65535, 0, 40000]]], np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png_rgb16(data))
    image = load_image(tmp_path / "rgb16.png")
    assert image.rgb.shape == (1, 1, 3)
    assert "8 bits" in image.note


def test_uint16_rgb_tiff_exact(tmp_path: Path) -> None:
    data = RNG.integers(0, 65536, size=(5, 4, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", data, photometric="rgb")
    image = load_image(tmp_path / "rgb16.tif")
    assert image.rgb.dtype == np.uint16 and image.note == ""
    np.testing.assert_array_equal(image.rgb, data)


def test_planar_tiff_is_transposed(tmp_path: Path) -> None:
    planar = RNG.integers(0, 65536, size=(3, 4, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tiff", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(load_image(tmp_path / "planar.tiff").rgb, planar.transpose(1, 2, 0))


def test_gray_uint16_tiff_and_big_endian(tmp_path: Path) -> None:
    data = np.array([[0, 40000], [65535, 7]], np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">")
    rgb = load_image(tmp_path / "be.tif").rgb
    assert rgb.dtype == np.uint16
    np.testing.assert_array_equal(rgb, np.repeat(data[..., None], 3, axis=2))


def test_float32_tiff_in_unit_range_is_exact(tmp_path: Path) -> None:
    data = RNG.random((3, 4, 3), dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", data, photometric="rgb")
    image = load_image(tmp_path / "f.tif")
    assert image.rgb.dtype == np.float32 and image.note == ""
    np.testing.assert_array_equal(image.rgb, data)


def test_float32_tiff_out_of_range_is_rescaled(tmp_path: Path) -> None:
    data = np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32)
    tifffile.imwrite(tmp_path / "hdr.tif", data)
    image = load_image(tmp_path / "hdr.tif")
    np.testing.assert_allclose(image.rgb[..., 0], [[0.0, 0.25], [0.5, 1.0]])
    assert "rescaled" in image.note and "-1" in image.note and "3" in image.note


def test_float_tiff_nan_and_inf_become_zero(tmp_path: Path) -> None:
    data = np.array([[np.nan, 0.5], [np.inf, 0.25]], np.float64)
    tifffile.imwrite(tmp_path / "nan.tif", data)
    image = load_image(tmp_path / "nan.tif")
    assert image.rgb.dtype == np.float32
    np.testing.assert_array_equal(image.rgb[..., 1], [[0.0, 0.5], [0.0, 0.25]])
    assert "NaN" in image.note and "rescaled" not in image.note


def test_int16_tiff_scaled_by_type_range(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "i16.tif", np.array([[-32768, 32767]], np.int16))
    image = load_image(tmp_path / "i16.tif")
    assert image.rgb.dtype == np.float32
    np.testing.assert_allclose(image.rgb[0, :, 0], [0.0, 1.0])
    assert "int16" in image.note


def test_bool_tiff_becomes_0_255(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "bits.tif", np.array([[True, False]]), photometric="minisblack")
    rgb = load_image(tmp_path / "bits.tif").rgb
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], [255, 0])
    # tifffile writes bilevel data as "min is white" by default: 1 means black there (as in Pillow).
    tifffile.imwrite(tmp_path / "fax.tif", np.array([[True, False]]))
    np.testing.assert_array_equal(load_image(tmp_path / "fax.tif").rgb[0, :, 0], [0, 255])


def test_tiff_single_channel_axis_and_rgba(tmp_path: Path) -> None:
    one = _rand_u8((3, 4, 1))
    tifffile.imwrite(tmp_path / "one.tif", one, photometric="minisblack")
    np.testing.assert_array_equal(load_image(tmp_path / "one.tif").rgb, np.repeat(one, 3, axis=2))

    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.tif").rgb[0], [[200, 100, 50], [0, 0, 0]])


def test_tiff_miniswhite_and_cmyk(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "mw.tif", np.array([[0, 255]], np.uint8), photometric="miniswhite")
    np.testing.assert_array_equal(load_image(tmp_path / "mw.tif").rgb[0, :, 0], [255, 0])

    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk, photometric="separated")
    np.testing.assert_array_equal(load_image(tmp_path / "cmyk.tif").rgb[0], [[255, 0, 0], [0, 0, 0]])


def test_multipage_tiff_first_page_with_note(tmp_path: Path) -> None:
    pages = _rand_u8((3, 4, 5))
    with tifffile.TiffWriter(tmp_path / "multi.tif") as writer:
        for page in pages:
            writer.write(page)
    image = load_image(tmp_path / "multi.tif")
    np.testing.assert_array_equal(image.rgb[..., 0], pages[0])
    assert image.note == "first page of 3"


def test_tiff_that_tifffile_cannot_decode_falls_back_to_pillow(tmp_path: Path) -> None:
    data = _rand_u8((6, 5, 3))
    _save(tmp_path / "lzw.tif", data, compression="tiff_lzw")  # LZW needs imagecodecs in tifffile
    np.testing.assert_array_equal(load_image(tmp_path / "lzw.tif").rgb, data)


def test_tiff_orientation_tag(tmp_path: Path) -> None:
    data = _rand_u8((2, 3))
    tifffile.imwrite(tmp_path / "rot.tif", data, extratags=[(274, "H", 1, 6, True)])
    rgb = load_image(tmp_path / "rot.tif").rgb
    np.testing.assert_array_equal(rgb[..., 0], np.rot90(data, k=-1))


def test_animated_gif_first_frame_with_note(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 3), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(tmp_path / "anim.gif")
    assert image.note == "first frame of 3"
    np.testing.assert_array_equal(image.rgb, np.broadcast_to([255, 0, 0], (3, 4, 3)))


def test_animated_webp_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 3), colour) for colour in [(250, 250, 250), (0, 0, 0)]]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    image = load_image(tmp_path / "anim.webp")
    assert image.note == "first frame of 2"
    assert image.rgb.min() >= 240


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(tmp_path: Path, orientation: int) -> None:
    data = _rand_u8((3, 5, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "o.png", data, exif=exif)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(load_image(path).rgb, expected)


def test_exif_orientation_6_rotates_clockwise(tmp_path: Path) -> None:
    data = np.zeros((2, 3, 3), np.uint8)
    data[0, 0] = [255, 0, 0]  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(_save(tmp_path / "rot.png", data, exif=exif))
    assert (image.height, image.width) == (3, 2)
    # Rotating 90 degrees clockwise moves the top-left pixel to the top-right.
    np.testing.assert_array_equal(image.rgb[0, 1], [255, 0, 0])
    assert image.rgb.sum() == 255

    _save(tmp_path / "rot.jpg", np.zeros((16, 24, 3), np.uint8), exif=exif)
    assert load_image(tmp_path / "rot.jpg").rgb.shape == (24, 16, 3)


def test_one_pixel_image(tmp_path: Path) -> None:
    image = load_image(_save(tmp_path / "px.bmp", np.array([[[1, 2, 3]]], np.uint8)))
    assert image.rgb.shape == (1, 1, 3)
    np.testing.assert_array_equal(image.rgb[0, 0], [1, 2, 3])


def test_content_decides_not_extension(tmp_path: Path) -> None:
    data = _rand_u8((3, 3, 3))
    _save(tmp_path / "really_png.jpg", data, fmt="PNG")
    np.testing.assert_array_equal(load_image(tmp_path / "really_png.jpg").rgb, data)
    _save(tmp_path / "really_jpeg.png", data, fmt="JPEG")
    assert load_image(tmp_path / "really_jpeg.png").rgb.shape == (3, 3, 3)
    tifffile.imwrite(tmp_path / "really_tiff.png", data.astype(np.uint16) * 257, photometric="rgb")
    assert load_image(tmp_path / "really_tiff.png").rgb.dtype == np.uint16


# --------------------------------------------------------------------------------------------------
# load_image: errors
# --------------------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file (0 bytes)" in _decode_error(tmp_path / "empty.png")


def test_truncated_jpeg_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "full.jpg", _rand_u8((64, 64, 3)), quality=95)
    blob = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    assert "truncated" in _decode_error(tmp_path / "cut.jpg")


def test_truncated_png_is_an_error(tmp_path: Path) -> None:
    blob = _save(tmp_path / "full.png", _rand_u8((64, 64, 3))).read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    assert "truncated" in _decode_error(tmp_path / "cut.png")
    (tmp_path / "header_only.png").write_bytes(blob[:20])
    assert "truncated" in _decode_error(tmp_path / "header_only.png")


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow warns as well as failing
def test_truncated_tiff_is_an_error(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "full.tif", _rand_u8((64, 64)))
    blob = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(blob[:200])
    _decode_error(tmp_path / "cut.tif")


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello, I am not an image\n" * 20)
    assert _decode_error(tmp_path / "notes.png") == "not an image (unrecognised format)"


def test_too_large_image_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "20.png", np.zeros((20, 20), np.uint8))
    message = _decode_error(path, max_pixels=100)
    assert "too large" in message and "20x20" in message and "--max-pixels" in message
    assert load_image(path, max_pixels=400).rgb.shape == (20, 20, 3)


def test_too_large_is_decided_from_the_header(tmp_path: Path) -> None:
    blob = _save(tmp_path / "big.png", np.zeros((3000, 3000), np.uint8)).read_bytes()
    # Cut right after the start of the pixel data: a decoder that looked at pixels would call it truncated.
    (tmp_path / "big_header.png").write_bytes(blob[: blob.index(b"IDAT") + 16])
    message = _decode_error(tmp_path / "big_header.png", max_pixels=1_000_000)
    assert message == "image too large: 3000x3000 = 9.0 MP exceeds the 1.0 MP limit (--max-pixels)"

    tifffile.imwrite(tmp_path / "big.tif", shape=(3000, 3000), dtype=np.uint8)
    assert "3000x3000" in _decode_error(tmp_path / "big.tif", max_pixels=1_000_000)


def test_pillow_bomb_limit_is_ours_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    path = _save(tmp_path / "px.png", np.zeros((20, 20, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the test
        assert load_image(path).rgb.shape == (20, 20, 3)
        assert "too large" in _decode_error(path, max_pixels=399)
    assert Image.MAX_IMAGE_PIXELS == 50


def test_directory_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    assert "directory" in _decode_error(tmp_path / "folder.png")
    assert "not found" in _decode_error(tmp_path / "missing.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    assert "broken symbolic link" in _decode_error(tmp_path / "dangling.png")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "secret.png", np.zeros((2, 2, 3), np.uint8))

    def deny(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(path))

    # Patch the module's opener (tests usually run as root, where chmod would not stop reading).
    monkeypatch.setattr(images, "open_regular", deny)
    assert _decode_error(path) == "cannot read file: permission denied"


def test_corrupt_data_after_valid_header(tmp_path: Path) -> None:
    blob = bytearray(_save(tmp_path / "ok.png", _rand_u8((32, 32, 3))).read_bytes())
    blob[60:80] = b"\x00" * 20  # breaks the IDAT CRC / stream
    (tmp_path / "bad.png").write_bytes(bytes(blob))
    _decode_error(tmp_path / "bad.png")


def test_gif_and_webp_garbage(tmp_path: Path) -> None:
    (tmp_path / "g.gif").write_bytes(b"GIF89a" + b"\xff" * 4)
    assert "truncated or corrupt" in _decode_error(tmp_path / "g.gif")
    (tmp_path / "w.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8)
    _decode_error(tmp_path / "w.webp")


# --------------------------------------------------------------------------------------------------
# LoadedImage, tensors, preprocessing
# --------------------------------------------------------------------------------------------------


def test_loaded_image_validates_its_array() -> None:
    with pytest.raises(ValueError):
        LoadedImage(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError):
        LoadedImage(np.zeros((2, 2, 3), np.float64))
    image = LoadedImage(np.zeros((3, 2, 3), np.uint8)[::-1])
    assert image.rgb.flags.c_contiguous and (image.height, image.width) == (3, 2)


def test_to_display_uint8() -> None:
    u16 = LoadedImage(np.array([[[0, 65535, 40000]]], np.uint16))
    np.testing.assert_array_equal(u16.to_display_uint8(), [[[0, 255, round(40000 / 257)]]])
    f32 = LoadedImage(np.array([[[0.0, 1.0, 0.5]]], np.float32))
    out = f32.to_display_uint8()
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 255, 128]]])
    u8 = LoadedImage(np.array([[[1, 2, 3]]], np.uint8))
    display = u8.to_display_uint8()
    display[...] = 0
    np.testing.assert_array_equal(u8.rgb, [[[1, 2, 3]]])  # a copy, overlays cannot alter the image


def test_to_unit_tensor_scales_by_dtype() -> None:
    data = np.array([[[0, 255, 51]]], np.uint8)
    t8 = to_unit_tensor(LoadedImage(data))
    assert t8.dtype == torch.float32 and t8.shape == (3, 1, 1)
    torch.testing.assert_close(t8[:, 0, 0], torch.tensor([0.0, 1.0, 0.2]))
    t16 = to_unit_tensor(LoadedImage(data.astype(np.uint16) * 257))
    assert torch.equal(t8, t16)
    f = np.array([[[0.25, 0.5, 1.0]]], np.float32)
    assert torch.equal(to_unit_tensor(LoadedImage(f))[:, 0, 0], torch.tensor([0.25, 0.5, 1.0]))


MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def test_preprocess_matches_interpolate_then_normalise() -> None:
    data = _rand_u8((7, 5, 3))
    out = preprocess(LoadedImage(data), (4, 6), MEAN, STD)
    unit = torch.from_numpy(data.astype(np.float32) / 255.0).permute(2, 0, 1)
    resized = F.interpolate(unit[None], size=(4, 6), mode="bicubic", antialias=True, align_corners=False)[0]
    expected = (resized - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_preprocess_matches_torchvision_resize() -> None:
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    data = _rand_u8((19, 23, 3))
    image = LoadedImage(data)
    expected = tv.resize(to_unit_tensor(image), [8, 11], InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(preprocess(image, (8, 11), (0, 0, 0), (1, 1, 1)), expected, rtol=0, atol=1e-6)


def test_preprocess_uint8_and_uint16_agree() -> None:
    data = _rand_u8((9, 11, 3))
    a = preprocess(LoadedImage(data), (5, 4), MEAN, STD)
    b = preprocess(LoadedImage(data.astype(np.uint16) * 257), (5, 4), MEAN, STD)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_preprocess_keeps_bicubic_overshoot() -> None:
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = LoadedImage(np.repeat(checker[..., None], 3, axis=2))
    out = preprocess(image, (13, 13), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.max().item() > 1.0 and out.min().item() < 0.0
