"""Hostile output folders, state databases, memories, calibrations and CSVs (issue 12, items 2, 4, 5, 6, 10).

Each test plants what an attacker (or a broken disk, or an edit) could leave, runs the real CLI with the tiny
model, and checks the exit code, the one-line message, and that nothing outside OUT changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from winclip_cli.cli import app

runner = CliRunner()


def cli(args: list[object]):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        pytest.fail("the CLI crashed:\n" + "".join(traceback.format_exception(result.exception)))
    return result


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    return lines[0]


def make_images(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="PNG")


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int]]:
    """Every entry under ``root`` (links not followed): kind, content and mtime."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent) / name
            info = path.lstat()
            if path.is_symlink():
                found[str(path.relative_to(root))] = ("link", os.readlink(path).encode(), info.st_mtime_ns)
            elif path.is_file():
                found[str(path.relative_to(root))] = ("file", path.read_bytes(), info.st_mtime_ns)
            else:
                found[str(path.relative_to(root))] = ("dir", b"", info.st_mtime_ns)
    return found


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside OUT holding a file, a folder and what looks like a stale winclip temporary."""
    root = tmp_path / "outside"
    (root / "folder").mkdir(parents=True)
    (root / "secret.txt").write_text("SECRET-CONTENT do not print or truncate\n")
    (root / "folder" / "keep.txt").write_text("keep me\n")
    (root / "folder" / ".img_000.png.png.abc123.tmp").write_text("not winclip's\n")
    (root / "folder" / ".img_000.png.img.jpg.x.tmp").write_text("not winclip's\n")
    return root


# ======================================================================== 2. symlinks planted in OUT


PLANTED = [
    (".winclip/lock", "secret.txt"),
    (".winclip/state.sqlite", "secret.txt"),
    (".winclip/state.sqlite-wal", "secret.txt"),
    (".winclip", "folder"),
    ("heatmaps", "folder"),
    ("thumbs", "folder"),
    ("maps", "folder"),
    ("scores.csv", "secret.txt"),
    ("run.json", "secret.txt"),
]


@pytest.mark.parametrize(("link", "target"), PLANTED, ids=[link for link, _ in PLANTED])
def test_a_link_planted_in_out_is_refused_and_nothing_outside_changes(tmp_path, tiny_args, outside, link, target):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png", "img_001.png"])
    if link != ".winclip":  # a first, ordinary scan: the folder is a real output folder
        assert cli(["scan", images, "--out", out, "-q", "--save-maps", *tiny_args]).exit_code == 0
    planted = out / link
    if planted.is_dir() and not planted.is_symlink():
        import shutil

        shutil.rmtree(planted)
    else:
        planted.unlink(missing_ok=True)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(outside / target)
    before = snapshot(outside)
    for incremental in ([], ["--incremental"]):
        result = cli(["scan", images, "--out", out, "--save-maps", *incremental, *tiny_args])
        assert result.exit_code == 2, result.output
        message = one_line_error(result)
        assert str(planted) in message and "symbolic link" in message
        assert "SECRET" not in result.output
    assert snapshot(outside) == before
    assert planted.is_symlink()


def test_a_link_deeper_in_heatmaps_is_not_written_through(tmp_path, tiny_args, outside):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["top.png", "sub/inner.png"])
    assert cli(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    for folder in ("heatmaps", "thumbs"):
        import shutil

        shutil.rmtree(out / folder / "sub")
        (out / folder / "sub").symlink_to(outside / "folder")
    before = snapshot(outside)
    result = cli(["scan", images, "--out", out, "-q", *tiny_args])
    assert snapshot(outside) == before
    assert result.exit_code == 3, result.output  # the score stands; the outputs that could not be written are said
    from winclip_cli.outputs import read_results_csv

    rows = {row["path"]: row for row in read_results_csv(out / "scores.csv")}
    inner = rows["sub/inner.png"]
    assert inner["status"] == "ok" and inner["score"] != "" and inner["heatmap"] == ""
    assert "symbolic link" in inner["error"] and str(out / "heatmaps" / "sub") in inner["error"]
    assert rows["top.png"]["error"] == "" and (out / rows["top.png"]["heatmap"]).is_file()


def test_a_hard_linked_lock_is_refused(tmp_path, tiny_args, outside):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png"])
    (out / ".winclip").mkdir(parents=True)
    os.link(outside / "secret.txt", out / ".winclip" / "lock")
    before = snapshot(outside)
    result = cli(["scan", images, "--out", out, *tiny_args])
    assert result.exit_code == 2, result.output
    assert "not a plain file" in one_line_error(result)
    assert "SECRET" not in result.output
    assert snapshot(outside) == before


def test_a_lock_holding_foreign_text_is_taken_over_without_printing_it(tmp_path, tiny_args):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png"])
    (out / ".winclip").mkdir(parents=True)
    (out / ".winclip" / "lock").write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    result = cli(["scan", images, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "took over a stale lock" in result.stderr and "unreadable lock" in result.stderr
    assert "SECRET" not in result.output


def test_stale_temporaries_are_never_searched_for_behind_a_link(tmp_path, outside):
    from winclip_cli.state import clean_stale_temporaries

    out = tmp_path / "out"
    (out / "heatmaps" / "real").mkdir(parents=True)
    (out / "heatmaps" / "real" / ".a.png.png.xyz.tmp").write_text("stale")
    (out / "heatmaps" / "linked").symlink_to(outside / "folder")
    (out / "thumbs").symlink_to(outside / "folder")
    before = snapshot(outside)
    assert clean_stale_temporaries(out) == 1
    assert not (out / "heatmaps" / "real" / ".a.png.png.xyz.tmp").exists()
    assert snapshot(outside) == before


def test_report_and_merge_refuse_links_in_their_output(tmp_path, tiny_args, outside):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png", "sub/img_001.png"])
    assert cli(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    (out / "report.html").unlink(missing_ok=True)
    (out / "report.html").symlink_to(outside / "secret.txt")
    before = snapshot(outside)
    result = cli(["report", out])
    assert result.exit_code == 2, result.output
    assert str(out / "report.html") in one_line_error(result)
    assert snapshot(outside) == before

    merged = tmp_path / "merged"
    (merged / "heatmaps").mkdir(parents=True)
    (merged / "heatmaps" / "sub").symlink_to(outside / "folder")
    result = cli(["merge", out, "--out", merged])
    assert result.exit_code == 2, result.output
    assert str(merged / "heatmaps" / "sub") in one_line_error(result)
    assert snapshot(outside) == before
    merged = tmp_path / "merged-2"
    merged.mkdir()
    (merged / "thumbs").symlink_to(outside / "folder")
    result = cli(["merge", out, "--out", merged])
    assert result.exit_code == 2, result.output
    assert str(merged / "thumbs") in one_line_error(result)
    assert snapshot(outside) == before
