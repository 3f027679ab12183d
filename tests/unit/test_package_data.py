"""The built wheel ships the package's data files, so a regular (non-editable) install writes the report.

CI installs the project in editable mode, where package data is read from the source tree: a data file
left out of pyproject.toml's package-data would only show after `pip install winclip`. These tests build
the wheel with the project's own build backend (offline, no build isolation) and run the report from the
unpacked wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from winclip_cli.io.outputs import CsvResultWriter, ResultRow
from winclip_cli.report.page import TEMPLATE_FILES, build_report

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")  # a copy: the build writes build/ and *.egg-info beside it
    shutil.copy2(REPO / "pyproject.toml", source)
    shutil.copy2(REPO / "README.md", source)
    shutil.copytree(REPO / "winclip_cli", source / "winclip_cli", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    built = subprocess.run(
        [sys.executable, "-c", code, str(dist)], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return dist / built.stdout.strip().splitlines()[-1]


def _data_files(package: Path) -> set[str]:
    return {
        path.relative_to(package.parent).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }


def test_wheel_holds_every_data_file_of_the_package(wheel: Path) -> None:
    data = _data_files(REPO / "winclip_cli")
    assert {f"winclip_cli/report/{name}" for name in TEMPLATE_FILES} | {"winclip_cli/py.typed"} <= data
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert sorted(data - names) == []


def _output_folder(out: Path) -> Path:
    out.mkdir()
    with CsvResultWriter(out / "scores.csv") as writer:
        writer.write(ResultRow(path='bad/<b>&"x".png', status="ok", score=0.83, label="anomalous", threshold=0.5))
        writer.write(ResultRow(path="good/001.jpg", status="ok", score=0.21, label="normal", threshold=0.5))
        writer.write(ResultRow(path="broken.jpg", status="error", error="cannot decode: truncated file"))
    run = {"class_name": "bottle", "threshold": 0.5, "threshold_source": "--threshold", "tool": "winclip"}
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return out


def test_report_from_the_unpacked_wheel_is_the_same_page(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    here, installed = _output_folder(tmp_path / "here"), _output_folder(tmp_path / "installed")
    expected = build_report(here).read_bytes()

    code = (
        "import sys, winclip_cli\n"
        "from pathlib import Path\n"
        "from winclip_cli.report.page import build_report\n"
        "assert Path(winclip_cli.__file__).is_relative_to(sys.argv[1]), winclip_cli.__file__\n"
        "build_report(Path(sys.argv[2]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(site), str(installed)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = (installed / "report.html").read_bytes()
    assert page == expected
    # the template's parts are all in: style, script, and the escaped path
    text = page.decode("utf-8")
    assert "<style>\n:root{" in text and 'setAttribute("data-ready", "1")' in text
    assert 'data-path="bad/&lt;b&gt;&amp;&quot;x&quot;.png"' in text and "$" not in text
