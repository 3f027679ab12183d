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

from helpers import invoke


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
        assert invoke(["scan", images, "--out", out, "-q", "--save-maps", *tiny_args]).exit_code == 0
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
        result = invoke(["scan", images, "--out", out, "--save-maps", *incremental, *tiny_args])
        assert result.exit_code == 2, result.output
        message = one_line_error(result)
        assert str(planted) in message and "symbolic link" in message
        assert "SECRET" not in result.output
    assert snapshot(outside) == before
    assert planted.is_symlink()


def test_a_link_deeper_in_heatmaps_is_not_written_through(tmp_path, tiny_args, outside):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["top.png", "sub/inner.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    for folder in ("heatmaps", "thumbs"):
        import shutil

        shutil.rmtree(out / folder / "sub")
        (out / folder / "sub").symlink_to(outside / "folder")
    before = snapshot(outside)
    result = invoke(["scan", images, "--out", out, "-q", *tiny_args])
    assert snapshot(outside) == before
    assert result.exit_code == 3, result.output  # the score stands; the outputs that could not be written are said
    from winclip_cli.io.outputs import read_results_csv

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
    result = invoke(["scan", images, "--out", out, *tiny_args])
    assert result.exit_code == 2, result.output
    assert "not a plain file" in one_line_error(result)
    assert "SECRET" not in result.output
    assert snapshot(outside) == before


def test_a_lock_holding_foreign_text_is_taken_over_without_printing_it(tmp_path, tiny_args):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png"])
    (out / ".winclip").mkdir(parents=True)
    (out / ".winclip" / "lock").write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    result = invoke(["scan", images, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "took over a stale lock" in result.stderr and "unreadable lock" in result.stderr
    assert "SECRET" not in result.output


def test_stale_temporaries_are_never_searched_for_behind_a_link(tmp_path, outside):
    from winclip_cli.io.state import clean_stale_temporaries

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
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    (out / "report.html").unlink(missing_ok=True)
    (out / "report.html").symlink_to(outside / "secret.txt")
    before = snapshot(outside)
    result = invoke(["report", out])
    assert result.exit_code == 2, result.output
    assert str(out / "report.html") in one_line_error(result)
    assert snapshot(outside) == before

    merged = tmp_path / "merged"
    (merged / "heatmaps").mkdir(parents=True)
    (merged / "heatmaps" / "sub").symlink_to(outside / "folder")
    result = invoke(["merge", out, "--out", merged])
    assert result.exit_code == 2, result.output
    assert str(merged / "heatmaps" / "sub") in one_line_error(result)
    assert snapshot(outside) == before
    merged = tmp_path / "merged-2"
    merged.mkdir()
    (merged / "thumbs").symlink_to(outside / "folder")
    result = invoke(["merge", out, "--out", merged])
    assert result.exit_code == 2, result.output
    assert str(merged / "thumbs") in one_line_error(result)
    assert snapshot(outside) == before


# ======================================================================== 4. a zip bomb in --refs


@pytest.fixture
def memory(tmp_path, tiny_args) -> Path:
    """A real reference memory of two images, built with the tiny model."""
    refs_dir, refs = tmp_path / "refs", tmp_path / "refs.npz"
    make_images(refs_dir, ["ref_000.png", "ref_001.png"])
    assert invoke(["build-refs", refs_dir, "--out", refs, "-q", *tiny_args]).exit_code == 0
    return refs


def memory_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_zip_bomb_memory_is_refused_before_it_takes_memory(tmp_path, memory):
    import json
    import subprocess
    import sys
    import zipfile

    arrays = memory_arrays(memory)
    bomb = tmp_path / "bomb.npz"
    patches = arrays["patches"]
    declared = 512 * 2**20 // (patches.shape[1] * patches.shape[2] * 4)  # entries making a 512 MiB member
    header = npy_bytes(np.zeros((0, *patches.shape[1:]), np.float32))
    header = header.replace(b"(0,", f"({declared},".encode())  # the same header length: the pad shrinks
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            if name != "patches":
                archive.writestr(f"{name}.npy", npy_bytes(array))
        with archive.open("patches.npy", "w", force_zip64=True) as member:
            member.write(header)
            zeros = bytes(2**24)
            for _ in range(512 // 16):
                member.write(zeros)
    assert bomb.stat().st_size < 4 * 2**20
    probe = (
        "import json, resource, sys\n"
        "from winclip_cli.io.memory import load_memory\n"
        "from winclip_cli.errors import MemoryFileError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_memory(sys.argv[1]); message = ''\n"
        "except MemoryFileError as err:\n    message = str(err)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'message': message, 'grown_kib': after - before}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    assert "zip bomb" in found["message"]
    assert found["grown_kib"] < 64 * 1024  # before the checks: the 512 MiB member, decompressed whole


def test_memory_members_are_checked_against_their_headers_and_metadata(tmp_path, memory, tiny_args):
    import zipfile

    arrays = memory_arrays(memory)
    images = tmp_path / "images"
    make_images(images, ["img_000.png"])

    def archive(path: Path, members: dict[str, bytes]) -> Path:
        with zipfile.ZipFile(path, "w") as handle:
            for name, data in members.items():
                handle.writestr(name, data)
        return path

    good = {f"{name}.npy": npy_bytes(array) for name, array in arrays.items()}
    patches = arrays["patches"]
    cases = {
        # the header says one image less than the member holds: declared size and header disagree
        "lying header": (
            {**good, "patches.npy": npy_bytes(patches[:1]).split(b"\n")[0] + b"\n" + patches.tobytes()},
            "declares",
        ),
        "extra member": ({**good, "../../etc/passwd.npy": b"x"}, "unexpected member"),
        "more entries than listed": (
            {**good, "patches.npy": npy_bytes(np.concatenate([patches, patches]))},
            "metadata lists 2",
        ),
    }
    for label, (members, expected) in cases.items():
        bad = archive(tmp_path / f"{label}.npz", members)
        result = invoke(["scan", images, "--refs", bad, "--out", tmp_path / "o", *tiny_args])
        assert result.exit_code == 2, (label, result.output)
        assert expected in one_line_error(result), label


# ======================================================================== 5. scores.csv integrity


def test_a_carriage_return_in_a_name_stays_inside_its_quoted_cell(tmp_path, tiny_args):
    import csv

    images, out = tmp_path / "images", tmp_path / "out"
    names = ["a\rb.png", "c\nd.png", "plain.png"]
    make_images(images, names)
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    text = (out / "scores.csv").read_bytes()
    assert b'"a\rb.png"' in text
    with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(names)
    merged = tmp_path / "merged"
    assert invoke(["merge", out, "--out", merged]).exit_code == 0
    with open(merged / "scores.csv", newline="", encoding="utf-8") as handle:
        assert sorted(row["path"] for row in csv.DictReader(handle)) == sorted(names)
    assert invoke(["report", out]).exit_code == 0
    page = (out / "report.html").read_bytes().decode("utf-8")
    assert "a\rb.png" in page  # the image has its card: its row was read back whole


@pytest.mark.skipif(os.name == "nt", reason="names that are not UTF-8 are a POSIX thing")
def test_outputs_of_a_name_that_is_not_utf8_are_where_the_csv_says(tmp_path, tiny_args):
    from winclip_cli.io.outputs import read_results_csv

    images, out = tmp_path / "images", tmp_path / "out"
    odd = os.fsdecode(b"bad-\xff\xfe.png")
    make_images(images, [odd, os.fsdecode(b"sub-\xe9/inner.png")])
    assert invoke(["scan", images, "--out", out, "-q", "--save-maps", *tiny_args]).exit_code == 0
    rows = read_results_csv(out / "scores.csv")  # valid UTF-8 throughout
    assert len(rows) == 2
    for row in rows:
        heatmap = row["heatmap"]
        assert heatmap.isprintable() and "%" in heatmap, heatmap
        assert (out / heatmap).is_file()  # the CSV's name is the name on disk
    odd_row = next(row for row in rows if row["path"].startswith("bad-"))
    assert odd_row["heatmap"].startswith("heatmaps/bad-%FF%FE.png~")
    stem = odd_row["heatmap"][len("heatmaps/") : -len(".png")]
    assert (out / "maps" / f"{stem}.tiff").is_file() and (out / "thumbs" / f"{stem}.heat.jpg").is_file()
    assert invoke(["report", out]).exit_code == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("thumbs/bad-%25FF%25FE.png~") == 2  # image and heatmap previews (URL-encoded '%')
    merged = tmp_path / "merged"
    assert invoke(["merge", out, "--out", merged]).exit_code == 0
    for row in read_results_csv(merged / "scores.csv"):
        assert (merged / row["heatmap"]).is_file()
    assert (merged / "thumbs" / f"{stem}.heat.jpg").is_file()


def test_formula_like_cells_are_defused_only_in_free_text_columns(tmp_path):
    from winclip_cli.io.outputs import CsvResultWriter, ResultRow, read_results_csv

    path = tmp_path / "scores.csv"
    with CsvResultWriter(path) as writer:
        writer.write(ResultRow(path="=HYPERLINK(1).png", status="error", error="=cmd|' /C calc'!A0"))
        writer.write(ResultRow(path="-x.png", status="ok", score=0.25, note="@SUM(1)", heatmap="heatmaps/-x.png.png"))
        writer.write(ResultRow(path="plain.png", status="ok", score=0.5, note="a note"))
    rows = read_results_csv(path)
    assert [row["path"] for row in rows] == ["=HYPERLINK(1).png", "-x.png", "plain.png"]  # join keys as they are
    assert rows[0]["error"] == "'=cmd|' /C calc'!A0" and rows[1]["note"] == "'@SUM(1)"
    assert rows[1]["heatmap"] == "heatmaps/-x.png.png" and rows[2]["note"] == "a note"
    again = tmp_path / "again.csv"  # a rewrite (merge) does not stack apostrophes
    with CsvResultWriter(again) as writer:
        for row in rows:
            writer.write(ResultRow.from_csv_dict(row))
    assert read_results_csv(again) == rows


# ======================================================================== 6. damaged state contents


DAMAGE = {
    "row is not JSON": "UPDATE results SET row = '{not json' WHERE rowid = 1",
    "bad status": "UPDATE results SET row = json_set(row, '$.status', 'fine') WHERE rowid = 1",
    "score not a number": "UPDATE results SET row = json_set(row, '$.score', 'high') WHERE rowid = 1",
    "size not a number": "UPDATE results SET size = 'big' WHERE rowid = 1",
    "config not JSON": "UPDATE meta SET value = '[1, 2' WHERE key = 'config'",
    "config not an object": "UPDATE meta SET value = '[1, 2]' WHERE key = 'config'",
    "other schema": "DROP TABLE results; CREATE TABLE results (name TEXT, value TEXT)",
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_state_with_damaged_contents_is_set_aside_and_rescanned(tmp_path, tiny_args, damage):
    import sqlite3

    from winclip_cli.io.outputs import read_results_csv

    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png", "img_001.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    db = sqlite3.connect(out / ".winclip" / "state.sqlite")
    db.executescript(DAMAGE[damage])
    db.commit()
    db.close()
    for incremental in (["--incremental"], [], ["--incremental"]):
        result = invoke(["scan", images, "--out", out, "-q", *incremental, *tiny_args])
        assert result.exit_code == 0, (incremental, result.output)
        assert len(read_results_csv(out / "scores.csv")) == 2
    aside = list((out / ".winclip").glob("state.corrupt-*.sqlite"))
    assert len(aside) == 1  # set aside once, kept beside the new state
    first = invoke(["scan", images, "--out", out, "-q", "--incremental", *tiny_args])
    assert "damaged" not in first.stderr and first.exit_code == 0


def test_the_damage_is_said_once_in_one_line(tmp_path, tiny_args):
    import sqlite3

    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["img_000.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    db = sqlite3.connect(out / ".winclip" / "state.sqlite")
    db.execute("UPDATE results SET row = '[]'")
    db.commit()
    db.close()
    result = invoke(["scan", images, "--out", out, "-q", "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(lines) == 1 and "state.corrupt-" in lines[0] and "stored row is invalid" in lines[0]


# ======================================================================== 10. validation, not "internal error"


def rewrite_memory(source: Path, target: Path, change) -> Path:
    import json

    arrays = memory_arrays(source)
    metadata = json.loads(str(arrays["metadata"]))
    changed = change(metadata, arrays)
    arrays = changed if isinstance(changed, dict) else arrays
    np.savez(target, **{**arrays, "metadata": np.array(json.dumps(metadata))})
    return target


CRAFTED_MEMORIES = {
    "calibration is a list": (lambda m, a: m.update(calibration=[1, 2]), "stored calibration is malformed"),
    "calibration threshold 1e300": (
        lambda m, a: m.update(
            calibration={
                "fingerprint": {},
                "calibration": {
                    "threshold": 1e300,
                    "fpr": 0.01,
                    "achieved_fpr": 0.0,
                    "n_images": 2,
                    "pixel_threshold": None,
                    "pixel_fpr": 0.01,
                    "min_images_for_fpr": 100,
                },
            }
        ),
        "'threshold' must be in [0, 1]",
    ),
    "reference without sha256": (lambda m, a: [ref.pop("sha256") for ref in m["references"]], "has no sha256"),
    "negative entries": (
        lambda m, a: m["references"][0].update(entries=-1) or m["references"][1].update(entries=3),
        "entries of reference 1 must be an integer of at least 1",
    ),
    "k = 0": (
        lambda m, a: (
            m.update(references=[]) or {name: (array[:0] if array.ndim == 3 else array) for name, array in a.items()}
        ),
        "k = 0",
    ),
    "format_version as text": (lambda m, a: m.update(format_version="1"), "format_version must be the number 1"),
    "format 2": (lambda m, a: m.update(format_version=2), "memory format 2 is not supported"),
    "patch_dim 0": (lambda m, a: m.update(patch_dim=0), "patch_dim must be an integer of at least 1"),
    # these two are written as text: json.dumps could not produce them
    "deeply nested": (', "deep": ' + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "endless integer": (', "deep": ' + "9" * 5000, "digits"),
}


@pytest.mark.parametrize("case", list(CRAFTED_MEMORIES), ids=list(CRAFTED_MEMORIES))
def test_crafted_memories_get_a_specific_message(tmp_path, memory, tiny_args, case):
    change, expected = CRAFTED_MEMORIES[case]
    images = tmp_path / "images"
    make_images(images, ["img_000.png"])
    if isinstance(change, str):
        bad = tmp_path / "bad.npz"
        arrays = memory_arrays(memory)
        np.savez(bad, **{**arrays, "metadata": np.array(str(arrays["metadata"])[:-1] + change + "}")})
    else:
        bad = rewrite_memory(memory, tmp_path / "bad.npz", change)
    result = invoke(["scan", images, "--refs", bad, "--out", tmp_path / "o", *tiny_args])
    assert result.exit_code == 2, result.output
    assert expected in one_line_error(result)


def test_a_plain_npy_as_memory_gets_a_specific_message(tmp_path, tiny_args):
    images = tmp_path / "images"
    make_images(images, ["img_000.png"])
    plain = tmp_path / "refs.npy"
    np.save(plain, np.zeros((2, 3), np.float32))
    result = invoke(["scan", images, "--refs", plain, "--out", tmp_path / "o", *tiny_args])
    assert result.exit_code == 2, result.output
    assert "is not a winclip memory (not an .npz file" in one_line_error(result)


CALIBRATION = {
    "threshold": 0.5,
    "fpr": 0.01,
    "achieved_fpr": 0.0,
    "n_images": 4,
    "pixel_threshold": 0.6,
    "pixel_fpr": 0.01,
    "min_images_for_fpr": 100,
}
CRAFTED_CALIBRATIONS = {
    "deep nesting": ('{"calibration": ' + "[" * 100_000 + "]" * 100_000 + ', "fingerprint": {}}', "nested too deeply"),
    "5000-digit integer": ('{"calibration": {"threshold": ' + "9" * 5000 + '}, "fingerprint": {}}', "digits"),
    "huge integer threshold": (
        {"calibration": {**CALIBRATION, "threshold": 10**400}, "fingerprint": {}},
        "'threshold' must be a finite number",
    ),
    "threshold 1e300": ({"calibration": {**CALIBRATION, "threshold": 1e300}, "fingerprint": {}}, "must be in [0, 1]"),
    "negative pixel threshold": (
        {"calibration": {**CALIBRATION, "pixel_threshold": -0.5}, "fingerprint": {}},
        "'pixel_threshold' must be in [0, 1]",
    ),
    "calibration is a list": ({"calibration": [1], "fingerprint": {}}, "is not a winclip calibration file"),
    "fingerprint is a list": ({"calibration": CALIBRATION, "fingerprint": [1]}, "malformed calibration"),
}


@pytest.mark.parametrize("case", list(CRAFTED_CALIBRATIONS), ids=list(CRAFTED_CALIBRATIONS))
def test_crafted_calibrations_get_a_specific_message(tmp_path, tiny_args, case):
    import json

    content, expected = CRAFTED_CALIBRATIONS[case]
    calibration = tmp_path / "calibration.json"
    calibration.write_text(content if isinstance(content, str) else json.dumps(content))
    images = tmp_path / "images"
    make_images(images, ["img_000.png"])
    result = invoke(["scan", images, "--calibration", calibration, "--out", tmp_path / "o", *tiny_args])
    assert result.exit_code == 2, result.output
    message = one_line_error(result)
    assert expected in message and str(calibration) in message
    assert len(message) < 400


def test_report_of_a_csv_with_an_enormous_score(tmp_path):
    from winclip_cli.io.outputs import CsvResultWriter, ResultRow

    out = tmp_path / "out"
    out.mkdir()
    with CsvResultWriter(out / "scores.csv") as writer:
        writer.write(ResultRow(path="huge.png", status="ok", score=1e308, label="anomalous", threshold=0.5))
        writer.write(ResultRow(path="tiny.png", status="ok", score=-1e308, label="normal", threshold=0.5))
        writer.write(ResultRow(path="fine.png", status="ok", score=0.25, label="normal", threshold=0.5))
    result = invoke(["report", out])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'data-bin="19" data-count="1"' in page and 'data-bin="0" data-count="1"' in page
    assert 'data-bin="5" data-count="1"' in page
