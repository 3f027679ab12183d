"""The output folder's names, declared once in winclip_cli.io.layout, and the packages' import direction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from winclip_cli.io.layout import (
    OWN_FILES,
    OWN_FOLDERS,
    OutputLayout,
    heatmap_relpath,
    map_relpath,
    map_relpath_of_heatmap,
    thumbnail_relpaths,
    thumbnail_relpaths_of_heatmap,
)

PACKAGE = Path(__file__).resolve().parents[2] / "winclip_cli"


def test_layout_paths_are_the_documented_names(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path)
    assert layout.scores_csv == tmp_path / "scores.csv"
    assert layout.run_json == tmp_path / "run.json"
    assert layout.report_html == tmp_path / "report.html"
    assert layout.heatmaps == tmp_path / "heatmaps" and layout.maps == tmp_path / "maps"
    assert layout.thumbs == tmp_path / "thumbs"
    assert layout.state_db == tmp_path / ".winclip" / "state.sqlite"
    assert layout.lock == tmp_path / ".winclip" / "lock"
    assert (
        layout.own_folders
        == tuple(tmp_path / name for name in OWN_FOLDERS)
        == (
            layout.heatmaps,
            layout.maps,
            layout.thumbs,
        )
    )
    assert layout.own_files == tuple(tmp_path / name for name in OWN_FILES)
    with pytest.raises(AttributeError):
        layout.root = tmp_path / "other"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("name", ["good/001.jpg", "a b/c#d.PNG", "../x.tif", "画像/ü.jpg", "x" * 300 + ".jpg"])
def test_map_and_thumbnail_names_follow_the_heatmap_name(name: str) -> None:
    heatmap = heatmap_relpath(name)
    assert map_relpath(name) == map_relpath_of_heatmap(heatmap)
    assert thumbnail_relpaths(name) == thumbnail_relpaths_of_heatmap(heatmap)
    if len(name) < 200:  # a JPEG heatmap (--heatmaps jpg) belongs to the same map and thumbnails
        assert map_relpath_of_heatmap(heatmap_relpath(name, ".jpg")) == map_relpath(name)
        assert thumbnail_relpaths_of_heatmap(heatmap_relpath(name, ".jpg")) == thumbnail_relpaths(name)
    for relpath in (heatmap, map_relpath(name), *thumbnail_relpaths(name)):
        parts = relpath.split("/")
        assert parts[0] in OWN_FOLDERS and ".." not in parts and "" not in parts
    for relpath in (heatmap, *thumbnail_relpaths(name)):
        assert len(relpath.rsplit("/", 1)[-1].encode()) <= 255


def test_layout_examples() -> None:
    assert heatmap_relpath("good/001.jpg") == "heatmaps/good/001.jpg.png"
    assert map_relpath("good/001.jpg") == "maps/good/001.jpg.tiff"
    assert thumbnail_relpaths("good/001.jpg") == ("thumbs/good/001.jpg.img.jpg", "thumbs/good/001.jpg.heat.jpg")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # lazy imports inside functions too
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("io", ("winclip_cli.jobs", "winclip_cli.report", "winclip_cli.cli")),
        ("core", ("winclip_cli.jobs", "winclip_cli.report", "winclip_cli.cli")),
        ("jobs", ("winclip_cli.report", "winclip_cli.cli")),
        ("report", ("winclip_cli.jobs", "winclip_cli.cli")),
    ],
)
def test_packages_do_not_import_upward(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = {
        f"{path.relative_to(PACKAGE).as_posix()} imports {module}"
        for path in (PACKAGE / package).rglob("*.py")
        for module in _imports(path)
        if module.startswith(forbidden)
    }
    assert sorted(wrong) == []


def test_defaults_and_checks_import_neither_torch_nor_typer() -> None:
    """options.py and errors.py are read by every layer, and io/checks.py by the CLI before torch loads."""
    for name in ("options.py", "errors.py", "io/checks.py"):
        heavy = {m for m in _imports(PACKAGE / name) if m.split(".")[0] in ("torch", "typer", "rich", "numpy")}
        assert heavy == set(), (name, heavy)
