"""Hostile inputs of issue 12: one bad file is that file's row, never the end of the scan; memory stays
bounded; huge files cost no hashing before they are refused; OUT is never rescanned; broken links are
reported; library warnings go to the row's note, not to stderr (cron mail).

Memory cases run the real CLI in a subprocess and measure its peak RSS from a parent of its own
(``RUSAGE_CHILDREN`` of a fresh process holds only that scan). Everything uses the tiny model.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import struct
import subprocess
import sys
import threading
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import invoke, run_cli
from winclip_cli.core.tiling import tile_count
from winclip_cli.io import outputs
from winclip_cli.io.images import load_image
from winclip_cli.jobs import decode, write
from winclip_cli.jobs.batches import processed_stream
from winclip_cli.jobs.decode import MAX_TILES, Preprocessing, decode_stream
from winclip_cli.options import Tiling

SUBPROCESS_TIMEOUT = 180
# The tiny model's scan of a few small images peaks at about 0.95 GB (torch and the model); each
# hostile file below used to add gigabytes (2.9 GB for the TIFF volume, 8.8 GB for the strips).
PEAK_RSS_LIMIT_MB = 1400


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def good_images(folder: Path, count: int = 2) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for seed in range(count):
        rgb = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"good{seed}.png")
        names.append(f"good{seed}.png")
    return names


def write_gray_png(path: Path, width: int, height: int) -> None:
    """A black 8-bit grey PNG, compressed row by row (a 350000 x 1 strip is 419 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + samples
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def scan_peak_rss(folder: Path, out: Path, tiny_args: list[str], *extra: str) -> tuple[int, int, str]:
    """(exit code, peak RSS in MB, stderr) of ``winclip scan`` run in a fresh child process."""
    command = [sys.executable, "-m", "winclip_cli", "scan", str(folder), "--out", str(out), "-q", *tiny_args, *extra]
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *command],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=SUBPROCESS_TIMEOUT,
    )
    code, peak_mb = (int(x) for x in result.stdout.split())
    return code, peak_mb, result.stderr


# ------------------------------------------------------------------------------ 1. one file, one row


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                      "you tried to allocate 230400000000 bytes"), "out of memory while preprocessing"),
        (MemoryError(), "out of memory while preprocessing"),
        (ValueError("cannot reshape"), "failed while preprocessing: ValueError: cannot reshape"),
    ],
)  # fmt: skip
def test_a_failure_while_preprocessing_one_file_is_that_files_row(tmp_path, tiny_args, monkeypatch, failure, reason):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = good_images(folder)
    Image.new("RGB", (300, 7), (9, 9, 9)).save(folder / "odd.png")
    real = decode.preprocess

    def failing(image, *args, **kwargs):
        if image.width == 300:
            raise failure
        return real(image, *args, **kwargs)

    monkeypatch.setattr(decode, "preprocess", failing)
    result = invoke(["scan", folder, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 3, result.output
    rows = rows_of(out)
    assert rows["odd.png"]["status"] == "error" and rows["odd.png"]["error"].startswith(reason)
    assert all(rows[name]["status"] == "ok" and rows[name]["score"] for name in good)
    assert "Traceback" not in result.output


def test_a_failure_while_making_the_heatmap_keeps_the_score(tmp_path, tiny_args, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    good_images(folder)
    real = write.full_resolution_map

    def failing(item):
        if item.relpath == "good1.png":
            raise MemoryError
        return real(item)

    monkeypatch.setattr(write, "full_resolution_map", failing)
    result = invoke(["scan", folder, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 3, result.output
    row = rows_of(out)["good1.png"]
    assert row["status"] == "ok" and row["score"] and row["label"] and row["heatmap"] == ""
    assert row["error"] == "cannot write outputs: out of memory while making the heatmap (see --max-pixels and --tile)"
    assert rows_of(out)["good0.png"]["error"] == ""


def test_a_deep_tiff_volume_is_refused_from_its_metadata(tmp_path, tiny_args):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = good_images(folder)
    # 256 x 256 pixels holding 4000 float64 samples each: 2 GB of data (sparse on disk, nothing written)
    tifffile.imwrite(
        folder / "volume.tif",
        shape=(4000, 256, 256),
        dtype="float64",
        planarconfig="separate",
        photometric="minisblack",
    )
    code, peak_mb, stderr = scan_peak_rss(folder, out, tiny_args)
    assert code == 3, stderr
    row = rows_of(out)["volume.tif"]
    assert row["status"] == "error"
    assert row["error"].startswith("TIFF page holds 4000 values per pixel (shape 4000x256x256, axes SYX, 2.0 GiB)")
    assert all(rows_of(out)[name]["status"] == "ok" for name in good)
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak RSS {peak_mb} MB"


def test_a_few_extra_tiff_planes_are_still_read(tmp_path):
    path = tmp_path / "stack.tif"
    data = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    tifffile.imwrite(path, data, planarconfig="separate", photometric="minisblack")
    image = load_image(path)
    assert (image.width, image.height) == (30, 20)
    assert np.array_equal(image.rgb[..., 0], data[0]) and np.array_equal(image.rgb[..., 2], data[0])


def test_absurd_tile_counts_are_refused_per_file_with_bounded_memory(tmp_path, tiny_args):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = good_images(folder)
    for i in range(4):  # 419 bytes each; --tile auto cuts each into 1945 tiles of 240 x 1
        write_gray_png(folder / f"strip{i}.png", 350_000, 1)
    assert (folder / "strip0.png").stat().st_size == 419
    code, peak_mb, stderr = scan_peak_rss(folder, out, tiny_args, "--tile", "auto")
    assert code == 3, stderr
    rows = rows_of(out)
    for i in range(4):
        assert rows[f"strip{i}.png"]["status"] == "error"
        assert rows[f"strip{i}.png"]["error"].startswith(
            f"1945 tiles of 240 px for a 350000x1 image (more than {MAX_TILES}); use a larger --tile"
        )
    assert all(rows[name]["status"] == "ok" for name in good)
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak RSS {peak_mb} MB"


def test_model_inputs_decoded_ahead_stay_within_the_budget(tmp_path, monkeypatch):
    """Files of many tiles each: the inputs alive at any time stay within the decode budget, one
    file's tiles and one batch, however far the decoding threads could run ahead."""
    names = []
    for i in range(6):
        write_gray_png(tmp_path / f"s{i}.png", 6000, 1)
        names.append((tmp_path / f"s{i}.png", f"s{i}.png"))
    prep = Preprocessing((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tiling=Tiling(16, 0.0))
    per_file = tile_count(1, 6000, 16, 0.0)  # 375 tiles of 16 x 1
    budget = 400
    monkeypatch.setattr(decode, "INPUTS_IN_FLIGHT", budget)
    alive, peak, lock = [0], [0], threading.Lock()
    real = decode.preprocess

    def counted(*args, **kwargs):
        tensor = real(*args, **kwargs)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def freed() -> None:
            with lock:
                alive[0] -= 1

        weakref.finalize(tensor, freed)
        return tensor

    monkeypatch.setattr(decode, "preprocess", counted)
    batches = []

    def process(batch, items):
        batches.append(batch.shape[0])
        return [0.0] * batch.shape[0]

    stream = decode_stream(names, prep, workers=4, lookahead=16, with_stamp=False)
    done = [item for item in processed_stream(stream, process, batch_size=8)]
    assert [item.relpath for item in done] == [name for _, name in names]
    assert all(len(item.outputs) == per_file and not item.error for item in done)
    assert sum(batches) == 6 * per_file
    # without the budget all six files (2256 inputs) are built at once by the four threads
    assert peak[0] <= budget + per_file + 8, peak[0]


# -------------------------------------------------------------------- 3. no hashing before the header


def test_a_huge_file_that_is_no_image_is_not_hashed(tmp_path, tiny_args, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = good_images(folder)
    with open(folder / "huge.png", "wb") as handle:
        handle.truncate(20 << 30)  # 20 GiB, sparse
    hashed = []
    real = decode.sha256_handle

    def recording(handle):
        hashed.append(Path(handle.name).name)
        return real(handle)

    monkeypatch.setattr(decode, "sha256_handle", recording)
    result = invoke(["scan", folder, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 3, result.output
    rows = rows_of(out)
    assert rows["huge.png"]["status"] == "error" and rows["huge.png"]["error"] == "not an image (unrecognised format)"
    assert rows["huge.png"]["sha256"] == ""
    assert sorted(hashed) == good  # only what is scored is read whole
    assert all(len(rows[name]["sha256"]) == 64 for name in good)


# --------------------------------------------------------------------- 7. lost outputs are retried


def test_incremental_retries_rows_whose_outputs_were_lost(tmp_path, tiny_args, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = good_images(folder, 3)
    real = outputs.write_png_atomic

    def disk_full(path, *args, **kwargs):
        if path.name == "good1.png.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_png_atomic", disk_full)
    # one image per batch in both runs: a batch of 3 and a batch of 1 round differently in the 8th
    # digit, which can tip the CSV's 6th decimal (the score itself is the same file's)
    one = ["--batch-size", "1"]
    assert invoke(["scan", folder, "--out", out, "--incremental", "-q", *one, *tiny_args]).exit_code == 3
    lost = rows_of(out)["good1.png"]
    assert lost["status"] == "ok" and lost["error"] == "cannot write outputs: No space left on device"
    assert lost["heatmap"] == "" and not (out / "heatmaps" / "good1.png.png").exists()

    monkeypatch.setattr(outputs, "write_png_atomic", real)  # space is free again
    result = invoke(["scan", folder, "--out", out, "--incremental", *one, *tiny_args])
    assert result.exit_code == 0, result.output
    assert "1 image to score (2 unchanged)" in result.output
    rows = rows_of(out)
    assert rows["good1.png"]["error"] == "" and rows["good1.png"]["heatmap"] == "heatmaps/good1.png.png"
    assert (out / "heatmaps" / "good1.png.png").is_file()
    assert rows["good1.png"]["score"] == lost["score"]
    result = invoke(["scan", folder, "--out", out, "--incremental", *tiny_args])
    assert "0 images to score (3 unchanged)" in result.output and sorted(rows_of(out)) == good


# -------------------------------------------------------------------------------- 8. OUT is not input


def test_out_equal_to_the_input_never_rescans_its_outputs(tmp_path, tiny_args):
    folder = tmp_path / "camera"
    good = good_images(folder, 4)
    for _ in range(3):
        result = invoke(["scan", folder, "--out", folder, "--incremental", "--save-maps", "-q", *tiny_args])
        assert result.exit_code == 0, result.output
        assert sorted(rows_of(folder)) == good
    assert invoke(["scan", folder, "--out", folder, "-q", *tiny_args]).exit_code == 0
    assert sorted(rows_of(folder)) == good
    # OUT inside the input: left out whole
    other = tmp_path / "line2"
    good = good_images(other, 2)
    for _ in range(3):
        assert invoke(["scan", other, "--out", other / "results", "--incremental", "-q", *tiny_args]).exit_code == 0
        assert sorted(rows_of(other / "results")) == good


def test_scanning_winclips_own_outputs_into_the_same_folder_is_refused(tmp_path, tiny_args):
    folder = tmp_path / "camera"
    good_images(folder)
    assert invoke(["scan", folder, "--out", folder, "-q", *tiny_args]).exit_code == 0
    result = invoke(["scan", folder / "heatmaps", "--out", folder, "-q", *tiny_args])
    assert result.exit_code == 2
    assert "lies inside winclip's own outputs" in result.stderr


# ----------------------------------------------------------------------- 9. links that lead nowhere


def test_broken_links_and_link_loops_are_reported(tmp_path, tiny_args):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = good_images(folder)
    os.symlink("missing.png", folder / "broken.png")
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("b.jpg", folder / "a.jpg")
    os.symlink("a.jpg", folder / "b.jpg")
    os.symlink("missing", folder / "notes")  # not named like an image: not listed
    result = invoke(["scan", folder, "--out", out, *tiny_args])
    assert result.exit_code == 3, result.output
    rows = rows_of(out)
    assert sorted(rows) == sorted([*good, "a.jpg", "b.jpg", "broken.png", "loop.png"])
    assert rows["broken.png"]["error"] == "broken symbolic link (its target does not exist)"
    for name in ("loop.png", "a.jpg", "b.jpg"):
        assert rows[name]["status"] == "error"
        assert rows[name]["error"] == "symbolic link loop (too many levels of symbolic links)"
    assert "broken.png: broken symbolic link" in result.stderr


# -------------------------------------------------------------------- 11. library noise goes to notes


def corrupt_exif_jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    """A JPEG whose EXIF block declares 5 tags and holds none (Pillow warns 'Corrupt EXIF data')."""
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 5) + b"\x00" * 6
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, "JPEG", exif=exif)
    path.write_bytes(buffer.getvalue())


def tiff_with_a_bad_tag(path: Path) -> None:
    """A TIFF whose ImageDescription points past the end of the file (tifffile logs a warning)."""
    tifffile.imwrite(path, np.full((24, 32), 77, np.uint8), description="x" * 40)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<HHI", 270, 2, 41))
    data[at + 8 : at + 12] = struct.pack("<I", 10**6)
    path.write_bytes(bytes(data))


EXIF_NOTE = "Pillow: Corrupt EXIF data. Expecting to read 12 bytes but only got 6."
TIFF_NOTE = (
    "tifffile: <TiffTag.fromfile> raised TiffFileError('<tifffile.TiffTag 270 @70> invalid value offset 1000000')"
)


def test_library_warnings_go_to_the_note_not_stderr(tmp_path, tiny_args):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    corrupt_exif_jpeg(folder / "exif1.jpg", (200, 10, 10))
    corrupt_exif_jpeg(folder / "exif2.jpg", (200, 10, 10))  # the same warning again: the same note
    tiff_with_a_bad_tag(folder / "tag.tif")
    good_images(folder, 1)
    result = run_cli(["scan", folder, "--out", out, *tiny_args], timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    for noise in ("tifffile", "EXIF", "UserWarning", "site-packages"):
        assert noise not in result.stderr, result.stderr
    rows = rows_of(out)
    assert rows["exif1.jpg"]["note"] == rows["exif2.jpg"]["note"] == EXIF_NOTE
    assert rows["tag.tif"]["note"] == TIFF_NOTE
    assert rows["good0.png"]["note"] == ""
    assert json.loads((out / "run.json").read_text())["errors"] == 0


def test_library_messages_are_kept_apart_per_decoding_thread(tmp_path):
    corrupt_exif_jpeg(tmp_path / "exif.jpg", (1, 2, 3))
    tiff_with_a_bad_tag(tmp_path / "tag.tif")
    good_images(tmp_path, 1)
    expected = {"exif.jpg": EXIF_NOTE, "tag.tif": TIFF_NOTE, "good0.png": ""}
    notes: dict[str, set[str]] = {name: set() for name in expected}
    start = threading.Barrier(6)

    def decode(name: str) -> None:
        start.wait()
        for _ in range(20):
            note = load_image(tmp_path / name).note
            notes[name].add(note)

    threads = [threading.Thread(target=decode, args=(name,)) for name in expected for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert notes == {name: {note} for name, note in expected.items()}
