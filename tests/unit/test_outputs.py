"""Tests for winclip_cli.io.outputs: CSV streaming, heatmap names, colouring, atomic writes."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from winclip_cli.io import safe_fs
from winclip_cli.io.layout import heatmap_relpath
from winclip_cli.io.outputs import (
    CSV_COLUMNS,
    LUT,
    CsvResultWriter,
    ResultRow,
    atomic_write,
    colorize,
    overlay,
    read_results_csv,
    write_float_tiff_atomic,
    write_png_atomic,
    write_text_atomic,
)

NASTY_NAME = 'dir, "x"/line\nbreak\r, "quoted" ünïcödé 画像 😀.jpg'


def ok_row(path: str = "good/001.jpg", **kw: object) -> ResultRow:
    fields: dict[str, object] = dict(
        path=path,
        status="ok",
        score=0.123456789,
        label="anomalous",
        threshold=0.5,
        max_pixel_score=0.9,
        heatmap="heatmaps/good/001.jpg.png",
        width=640,
        height=480,
        mode="few-shot",
        k_shot=4,
        refs="refs/a.jpg;refs/b.jpg",
        refs_sha256="ab" * 32,
        vocabulary_sha256="cd" * 32,
    )
    fields.update(kw)
    return ResultRow(**fields)  # type: ignore[arg-type]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- CSV ---


def test_csv_header_is_csv_columns(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    with CsvResultWriter(out):
        pass
    first_line = out.read_text(encoding="utf-8").splitlines()[0]
    assert tuple(first_line.split(",")) == CSV_COLUMNS
    assert read_results_csv(out) == []


def test_csv_open_alias_creates_parents(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "scores.csv"
    with CsvResultWriter.open(out) as writer:
        writer.write(ok_row())
    assert len(read_results_csv(out)) == 1


def test_csv_nasty_name_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    row = ok_row(path=NASTY_NAME, heatmap=heatmap_relpath(NASTY_NAME), note='first frame of 12, "x"')
    with CsvResultWriter(out) as writer:
        writer.write(row)
        writer.write(ok_row(path="after.jpg"))
    rows = read_results_csv(out)
    assert len(rows) == 2
    assert rows[0] == row.as_csv_dict()
    assert rows[0]["path"] == NASTY_NAME
    assert rows[1]["path"] == "after.jpg"
    assert list(rows[0]) == list(CSV_COLUMNS)


def test_csv_float_and_int_formatting(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    with CsvResultWriter(out) as writer:
        writer.write(ok_row(score=np.float32(0.25), threshold=1, max_pixel_score=1e-9))
    (row,) = read_results_csv(out)
    assert row["score"] == "0.250000"
    assert row["threshold"] == "1.000000"
    assert row["max_pixel_score"] == "0.000000"
    assert row["width"] == "640" and row["height"] == "480" and row["k_shot"] == "4"
    assert row["status"] == "ok" and row["label"] == "anomalous"


def test_csv_error_row_has_empty_score_fields(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    err = ResultRow(path="broken.jpg", status="error", error="cannot decode: truncated file", mode="zero-shot")
    with CsvResultWriter(out) as writer:
        writer.write(err)
    (row,) = read_results_csv(out)
    for col in ("score", "label", "threshold", "max_pixel_score", "heatmap", "width", "height", "k_shot"):
        assert row[col] == "", col
    assert row["status"] == "error"
    assert row["error"] == "cannot decode: truncated file"


def test_csv_rows_are_on_disk_before_close(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    writer = CsvResultWriter(out)
    try:
        assert read_results_csv(out) == []  # header already there
        writer.write(ok_row(path="a.jpg"))
        assert [r["path"] for r in read_results_csv(out)] == ["a.jpg"]
        writer.write(ok_row(path="b.jpg"))
        assert [r["path"] for r in read_results_csv(out)] == ["a.jpg", "b.jpg"]
    finally:
        writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError):
        writer.write(ok_row())


def test_csv_concurrent_writes_do_not_interleave(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    with CsvResultWriter(out) as writer:

        def work(t: int) -> None:
            for i in range(25):
                writer.write(ok_row(path=f"t{t}/{i}, with comma\n.jpg"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    paths = sorted(r["path"] for r in read_results_csv(out))
    assert paths == sorted(f"t{t}/{i}, with comma\n.jpg" for t in range(4) for i in range(25))


@pytest.mark.skipif(sys.platform == "win32", reason="surrogate-escaped names are a POSIX thing")
def test_csv_undecodable_name_does_not_crash(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    name = os.fsdecode(b"bad\xffname.jpg")
    with CsvResultWriter(out) as writer:
        writer.write(ok_row(path=name))
    (row,) = read_results_csv(out)  # still valid UTF-8
    assert row["path"] == "bad\\udcffname.jpg"


def test_result_row_rejects_unknown_status_and_label() -> None:
    with pytest.raises(ValueError):
        ResultRow(path="a.jpg", status="OK")
    with pytest.raises(ValueError):
        ResultRow(path="a.jpg", status="ok", label="bad")


# --- JSON ---


def test_as_json_dict_types_and_dumps() -> None:
    d = ok_row(score=np.float32(0.1234567891), k_shot=np.int64(2)).as_json_dict()
    assert tuple(d) == CSV_COLUMNS
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert type(d["score"]) is float and d["score"] == pytest.approx(0.123457, abs=1e-9)
    assert type(d["width"]) is int and type(d["height"]) is int and type(d["k_shot"]) is int
    assert d["path"] == "good/001.jpg" and d["status"] == "ok"


def test_as_json_dict_missing_and_non_finite_are_none() -> None:
    d = ResultRow(path="x.jpg", status="error", error="boom").as_json_dict()
    for key in ("score", "threshold", "max_pixel_score", "width", "height", "k_shot"):
        assert d[key] is None, key
    assert d["label"] == "" and d["heatmap"] == ""
    nan = ok_row(score=float("nan"), threshold=float("inf")).as_json_dict()
    assert nan["score"] is None and nan["threshold"] is None
    json.dumps(nan, allow_nan=False)


# --- heatmap names ---


def _inside(out_dir: Path, rel: str) -> bool:
    target = (out_dir / rel).resolve()
    return target.is_relative_to(out_dir.resolve()) and target != out_dir.resolve()


def test_heatmap_relpath_mirrors_and_keeps_extension() -> None:
    assert heatmap_relpath("good/001.jpg") == "heatmaps/good/001.jpg.png"
    assert heatmap_relpath("001.jpg") == "heatmaps/001.jpg.png"
    assert heatmap_relpath("a/b/c d.tif") == "heatmaps/a/b/c d.tif.png"
    assert heatmap_relpath("a.jpg") != heatmap_relpath("a.png")


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/abs/x.png", "..", "a/../../b.jpg", "./x.jpg", "a//b.jpg", "//server/share/x.jpg"],
)
def test_heatmap_relpath_stays_inside(tmp_path: Path, name: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rel = heatmap_relpath(name)
    assert rel.startswith("heatmaps/")
    assert ".." not in rel.split("/")
    assert _inside(out_dir, rel)
    assert (out_dir / rel).resolve().is_relative_to((out_dir / "heatmaps").resolve())


def test_heatmap_relpath_dotdot_does_not_collide_with_plain_name() -> None:
    assert heatmap_relpath("../a.jpg") != heatmap_relpath("a.jpg")


def test_heatmap_relpath_odd_characters_make_valid_files(tmp_path: Path) -> None:
    rel = heatmap_relpath("ünï cödé/画像\nnew\x00line.jpg")
    assert rel == "heatmaps/ünï cödé/画像\nnew_line.jpg.png"
    write_png_atomic(tmp_path / rel, np.zeros((2, 2, 3), np.uint8))
    assert (tmp_path / rel).is_file()


def test_heatmap_relpath_long_name_fits(tmp_path: Path) -> None:
    base = "é" * 126  # 252 bytes in UTF-8: legal as input, too long once '.png' is appended
    rel_a = heatmap_relpath(f"d/{base}.a")
    rel_b = heatmap_relpath(f"d/{base}.b")
    assert rel_a != rel_b
    for rel in (rel_a, rel_b):
        name = rel.rsplit("/", 1)[1]
        assert len(name.encode("utf-8")) <= 255 and name.endswith(".png")
        write_png_atomic(tmp_path / rel, np.zeros((1, 1, 3), np.uint8))
        assert (tmp_path / rel).is_file()


def test_heatmap_relpath_rejects_empty() -> None:
    for bad in ("", "/", "./."):
        with pytest.raises(ValueError):
            heatmap_relpath(bad)


# --- colours ---


def test_colorize_fixed_scale() -> None:
    alone = colorize(np.array([[0.2]]))
    mixed = colorize(np.array([[0.2, 0.9]]))
    assert alone.shape == (1, 1, 3) and alone.dtype == np.uint8
    assert np.array_equal(alone[0, 0], mixed[0, 0])
    # a flat low map stays low: no per-image stretching
    flat = colorize(np.full((3, 3), 0.1, dtype=np.float32))
    assert np.all(flat == colorize(np.array([[0.1]]))[0, 0])


def test_colorize_ends_clipping_and_nan() -> None:
    out = colorize(np.array([[0.0, 1.0, -5.0, 7.0, np.nan, np.inf, -np.inf]]))
    assert np.array_equal(out[0, 0], LUT[0])
    assert np.array_equal(out[0, 1], LUT[255])
    assert np.array_equal(out[0, 2], LUT[0])
    assert np.array_equal(out[0, 3], LUT[255])
    assert np.array_equal(out[0, 4], LUT[0])
    assert np.array_equal(out[0, 5], LUT[255])
    assert np.array_equal(out[0, 6], LUT[0])
    assert not np.array_equal(LUT[0], LUT[255])


def test_lut_shape_and_brightness_rises() -> None:
    assert LUT.shape == (256, 3) and LUT.dtype == np.uint8
    luma = LUT.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) >= -1.0)  # monotone up to rounding
    assert luma[255] - luma[0] > 200
    with pytest.raises(ValueError):
        LUT[0, 0] = 1  # read-only shared table


def test_colorize_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 3)))


def test_overlay_is_the_mean_rounded_down() -> None:
    image = np.array([[[10, 11, 255], [0, 1, 2]]], dtype=np.uint8)
    scores = np.array([[0.0, 1.0]])
    assert list(LUT[0]) == [0, 0, 4] and list(LUT[255]) == [252, 255, 164]
    # (10 + 0) // 2, (11 + 0) // 2, (255 + 4) // 2; then (0 + 252) // 2, (1 + 255) // 2, (2 + 164) // 2
    assert overlay(image, scores).tolist() == [[[5, 5, 129], [126, 128, 83]]]


def test_overlay_rejects_bad_input() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError):
        overlay(image, np.zeros((4, 5)))
    with pytest.raises(ValueError):
        overlay(image.astype(np.float32), np.zeros((4, 4)))


# --- atomic writes ---


def test_png_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    target = tmp_path / "heatmaps" / "sub" / "a.jpg.png"
    write_png_atomic(target, rgb)
    with Image.open(target) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), rgb)
    assert leftovers(target.parent) == []


def test_png_rejects_non_rgb(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_png_atomic(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_tiff_round_trip(tmp_path: Path) -> None:
    scores = np.random.default_rng(2).random((5, 8)).astype(np.float64)
    scores[0, 0] = np.nan
    target = tmp_path / "maps" / "a.tiff"
    write_float_tiff_atomic(target, scores)
    back = tifffile.imread(target)
    assert back.dtype == np.float32 and back.shape == scores.shape
    np.testing.assert_array_equal(back, scores.astype(np.float32))
    assert leftovers(target.parent) == []


def test_text_round_trip_and_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, '{"ü": 1}\nline2\n')
    assert target.read_bytes() == '{"ü": 1}\nline2\n'.encode()
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("precious", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            (tmp,) = [p for p in tmp_path.iterdir() if p.name != "run.json"]
            assert tmp.name.startswith(".run.json") and tmp.name.endswith(".tmp")
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # private until complete
            handle.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_keyboard_interrupt_also_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "a.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_temp_names_unique(tmp_path: Path) -> None:
    target = tmp_path / "same.png"
    with atomic_write(target) as a, atomic_write(target) as b:
        assert len(list(tmp_path.iterdir())) == 2
        a.write(b"a")
        b.write(b"b")
    assert target.read_text() in ("a", "b")
    assert leftovers(tmp_path) == []


def test_atomic_write_long_target_name(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 240 + ".png")
    write_text_atomic(target, "ok")
    assert target.read_text() == "ok"


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_atomic_files_get_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    write_text_atomic(target, "x")
    assert stat.S_IMODE(target.stat().st_mode) == safe_fs.FILE_MODE
