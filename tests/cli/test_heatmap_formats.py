"""Switching --heatmaps on one output folder, and what a scan says about outputs it could not write."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import invoke


def make_images(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / name)


def heatmap_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in (out / "heatmaps").rglob("*") if p.is_file())


def test_a_changed_heatmap_format_leaves_no_heatmap_of_the_old_one(tmp_path, tiny_args):
    """png -> jpg -> none on one OUT: only the current format is on disk, and the report shows no stale one."""
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png", "sub/b.png"])
    expected = {
        "png": ["heatmaps/a.png.png", "heatmaps/sub/b.png.png"],
        "jpg": ["heatmaps/a.png.jpg", "heatmaps/sub/b.png.jpg"],
    }
    for fmt in ("png", "jpg", "none"):
        result = invoke(["scan", images, "--out", out, "--heatmaps", fmt, "-q", *tiny_args])
        assert result.exit_code == 0, result.output
        assert heatmap_files(out) == expected.get(fmt, [])
    assert invoke(["report", out]).exit_code == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and not [link for link in links if link.startswith("heatmaps/")]  # no earlier run's heatmap


def test_watch_takes_the_heatmap_format_option():
    result = invoke(["watch", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--heatmaps" in result.output


def test_outputs_that_could_not_be_written_are_named_on_stderr_even_when_quiet(tmp_path, tiny_args):
    """A scored file whose heatmap could not be written keeps its score; the reason reaches stderr."""
    images, out, elsewhere = tmp_path / "images", tmp_path / "out", tmp_path / "elsewhere"
    make_images(images, ["a.png", "sub/b.png"])
    elsewhere.mkdir()
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "sub").symlink_to(elsewhere)  # planted: never written through
    result = invoke(["scan", images, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 3, result.output
    assert re.search(r"warning: sub/b\.png: cannot write outputs", result.output), result.output
    assert list(elsewhere.iterdir()) == []
