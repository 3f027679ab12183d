"""Cron-grade scanning through the real CLI: hostile folders, kills, interrupts, incremental runs,
shards and the output-folder lock.

In-process runs use typer's CliRunner; where a real process is needed (signals, a lock held by
another process, permission checks without root's override) ``python -m winclip_cli`` runs as a
subprocess, always with a timeout. Everything uses the tiny random-weight model of conftest.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import math
import os
import re
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import invoke
from winclip_cli.io.outputs import CSV_COLUMNS
from winclip_cli.jobs.scan import shard_of

SUBPROCESS_TIMEOUT = 180  # seconds; a scan of a few dozen tiny images takes ~10 s, mostly importing torch
POLL = 0.02  # seconds between two looks at a running scan


# ------------------------------------------------------------------------------------------------- images


def random_rgb(seed: int, width: int = 64, height: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_images(folder: Path, count: int, start: int = 0, prefix: str = "img") -> list[str]:
    """``count`` small random RGB PNGs; returns their names (relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + count):
        name = f"{prefix}_{i:03d}.png"
        Image.fromarray(random_rgb(i)).save(folder / name)
        names.append(name)
    return names


def write_png_bomb(path: Path, width: int = 30_000, height: int = 30_000) -> None:
    """A valid 1-bit grayscale PNG of width x height (900 MP) whose file is only ~100 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = bytes(1 + (width + 7) // 8) * 1000  # filter byte + packed bits, 1000 rows at a time
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(rows) for _ in range(height // 1000)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------ outputs


def csv_rows(out: Path, expected: set[str] | None = None) -> dict[str, dict[str, str]]:
    """scores.csv parsed strictly: full header, every row complete, no duplicate path, valid scores."""
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        lines = list(csv.reader(fh))
    assert lines, "scores.csv is empty"
    assert tuple(lines[0]) == CSV_COLUMNS
    rows: dict[str, dict[str, str]] = {}
    for values in lines[1:]:
        assert len(values) == len(CSV_COLUMNS), f"half-written row {values!r}"
        row = dict(zip(CSV_COLUMNS, values, strict=True))
        assert row["path"] not in rows, f"duplicate row for {row['path']!r}"
        assert row["status"] in ("ok", "error")
        if row["status"] == "ok":
            score = float(row["score"])
            assert math.isfinite(score) and 0.0 <= score <= 1.0, row
            assert row["label"] in ("normal", "anomalous") and row["heatmap"]
        else:
            assert row["error"] and row["score"] == "" and row["heatmap"] == ""
        rows[row["path"]] = row
    if expected is not None:
        assert set(rows) == expected
    return rows


def run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def state_db(out: Path) -> Path:
    return out / ".winclip" / "state.sqlite"


def state_count(out: Path) -> int:
    """Rows recorded in OUT's run state (read-only; 0 while it does not exist or is busy)."""
    path = state_db(out)
    if not path.is_file():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.1)
        try:
            return int(db.execute("SELECT count(*) FROM results").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def state_rows(out: Path) -> list[dict[str, str]]:
    db = sqlite3.connect(f"file:{state_db(out)}?mode=ro", uri=True, timeout=5)
    try:
        return [json.loads(text) for (text,) in db.execute("SELECT row FROM results ORDER BY path")]
    finally:
        db.close()


def check_heatmaps(out: Path, rows: dict[str, dict[str, str]]) -> None:
    """Every heatmap listed exists inside OUT and is a complete PNG of the image's size."""
    root = out.resolve()
    for row in rows.values():
        if row["status"] != "ok":
            continue
        heatmap = (out / row["heatmap"]).resolve()
        assert heatmap.is_relative_to(root), row["heatmap"]
        assert heatmap.is_file(), row["heatmap"]
        with Image.open(heatmap) as im:
            im.verify()
        with Image.open(heatmap) as im:
            assert im.size == (int(row["width"]), int(row["height"]))


def no_temporaries(out: Path) -> None:
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------- processes


def scan_command(folder: Path, out: Path, tiny_args: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "winclip_cli", "scan", str(folder), "--out", str(out), *tiny_args, *extra]


def start_scan(command: list[str], logs: Path) -> tuple[subprocess.Popen, Path, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout, "wb") as out_fh, open(stderr, "wb") as err_fh:
        proc = subprocess.Popen(command, stdout=out_fh, stderr=err_fh, env=dict(os.environ), cwd=logs)
    return proc, stdout, stderr


def wait_for_rows(proc: subprocess.Popen, out: Path, minimum: int, timeout: float = SUBPROCESS_TIMEOUT) -> bool:
    """True once OUT's state holds ``minimum`` rows while ``proc`` still runs; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if state_count(out) >= minimum:
            return proc.poll() is None
        time.sleep(POLL)
    pytest.fail(f"no {minimum} rows in {out} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def signal_mid_run(tmp_path: Path, tiny_args: list[str], sig: int, min_rows: int, *extra: str):
    """Run a scan subprocess and send ``sig`` once ``min_rows`` rows are recorded, before it finishes.

    The scan is slowed down with --batch-size 1; if it still finishes before the signal lands, the
    attempt is repeated with more files (never passes without a mid-run signal).
    Returns (folder, out, names, returncode, stdout text, stderr text, pid).
    """
    for count in (16, 48, 128):
        folder = tmp_path / f"images-{count}"
        names = make_images(folder, count)
        out = tmp_path / f"out-{count}"
        command = scan_command(folder, out, tiny_args, "--batch-size", "1", *extra)
        proc, stdout, stderr = start_scan(command, tmp_path / f"logs-{count}")
        try:
            running = wait_for_rows(proc, out, min_rows)
            if running:
                assert proc.poll() is None  # the signal lands while the scan runs
                proc.send_signal(sig)
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            stop(proc)
        if running and state_count(out) < count:
            return (
                folder,
                out,
                names,
                proc.returncode,
                stdout.read_text(encoding="utf-8", errors="replace"),
                stderr.read_text(encoding="utf-8", errors="replace"),
                proc.pid,
            )
    pytest.fail("the scan always finished before the signal could be sent")


# ============================================================================== 1. a hostile input folder

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
# Looked up here, not in the forked child: dlopen/dlsym after fork in a threaded process may deadlock.
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None


def without_root_file_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    process that is exec'd (still uid 0) obeys file modes like any user: chmod 000 denies it.

    The tests run as root here, for whom chmod 000 changes nothing. Failures are ignored; the
    probe in the test says whether files really became unreadable.
    """
    if _PRCTL is None or os.geteuid() != 0:
        return
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        _PRCTL(PR_CAPBSET_DROP, cap, 0, 0, 0)


def really_unreadable(path: Path) -> bool:
    """Whether a process started like the scan below fails to open ``path``."""
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; open(sys.argv[1], 'rb').close()", str(path)],
        preexec_fn=without_root_file_override,
        capture_output=True,
        timeout=60,
    )
    return probe.returncode != 0


def build_hostile_corpus(root: Path, elsewhere: Path) -> tuple[dict[str, str], dict[str, str], list[Path]]:
    """Create a hostile input folder.

    Returns (expected status per discovered relative path, expected substring of the error reason
    or note per path, paths made unreadable with chmod 000).
    """
    root.mkdir()
    elsewhere.mkdir()
    expected: dict[str, str] = {}
    detail: dict[str, str] = {}
    rgb = random_rgb(1)
    base = Image.fromarray(rgb)

    def ok(name: str, note: str = "") -> Path:
        expected[name] = "ok"
        if note:
            detail[name] = note
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def error(name: str, reason: str) -> Path:
        expected[name] = "error"
        detail[name] = reason
        return root / name

    # names
    base.save(ok("plain.png"))
    base.save(ok("with space.png"))
    base.save(ok("défaut 缺陷.png"))
    base.save(ok("new\nline.png"))
    base.save(ok("-starts-with-dash.png"))
    base.save(ok("UPPER CASE.PNG"))
    base.save(ok("folder.png/inside.jpg"))  # a directory named like an image is walked
    base.save(ok("sub/deeper/nested.jpeg"))
    os.symlink("plain.png", ok("link-to-plain.png"))  # a file symlink is scanned under its own name
    # pixel formats and containers
    base.save(ok("png-named.jpg"), format="PNG")  # lying extension: decoded by content
    gray16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(gray16).save(ok("gray16.png"))
    tifffile.imwrite(ok("rgb-uint16.tif"), rgb.astype(np.uint16) * 257, photometric="rgb")
    tifffile.imwrite(ok("gray-float32.tiff"), np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64))
    with tifffile.TiffWriter(ok("pages.tif", note="first page of 3")) as tw:
        for seed in range(3):
            tw.write(random_rgb(seed + 10), photometric="rgb")
    frames = [Image.fromarray(random_rgb(seed + 20)) for seed in range(3)]
    frames[0].save(
        ok("animated-gif.png", note="first frame of 3"), format="GIF", save_all=True, append_images=frames[1:]
    )
    frames[0].save(ok("animated.webp", note="first frame of 3"), save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(ok("one-pixel.png"))
    Image.new("L", (1, 1), 99).save(ok("one-pixel.jpg"))
    rgba = np.dstack([rgb, np.random.default_rng(2).integers(0, 256, rgb.shape[:2], dtype=np.uint8)])
    Image.fromarray(rgba).save(ok("rgba.png"))
    base.convert("CMYK").save(ok("cmyk.jpg"))
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(ok("palette.png"))
    base.save(ok("image.bmp"))
    base.save(ok("image.webp"))
    # a directory link that leaves the root is followed, and a link back from there does not loop
    base.save(elsewhere / "outside.png")
    os.symlink(root, elsewhere / "back-to-root")
    os.symlink(elsewhere, root / "outside-link")
    expected["outside-link/outside.png"] = "ok"
    # broken files
    error("empty.png", "empty").write_bytes(b"")
    error("empty.jpg", "empty").write_bytes(b"")
    error("text.jpg", "not an image").write_text("this is not a picture\n")
    base.save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (root / "whole.jpg").unlink()
    error("truncated.jpg", "truncated").write_bytes(data[: len(data) // 3])
    png = (root / "plain.png").read_bytes()
    error("truncated.png", "truncated").write_bytes(png[: len(png) // 2])
    write_png_bomb(error("bomb.png", "too large"))
    # unreadable: chmod 000 (the scan runs without root's permission override, see below)
    unreadable = error("unreadable.png", "permission denied")
    base.save(unreadable)
    locked = root / "locked"
    locked.mkdir()
    base.save(locked / "hidden-by-permissions.png")
    chmodded = [unreadable, locked]
    if Path("/proc/self/mem").exists():
        # unreadable even for root with every capability: reading at offset 0 gives EIO
        os.symlink("/proc/self/mem", error("proc-mem.png", "cannot read file"))
    # links named like images that lead nowhere are reported, not skipped silently
    os.symlink("does-not-exist.png", error("broken-link.png", "broken symbolic link"))
    os.symlink("self-loop.png", error("self-loop.png", "symbolic link loop"))
    # not discovered: hidden, other extensions, links that are no image files, not regular files
    base.save(root / "..png", format="PNG")
    base.save(root / ".hidden.png")
    (root / ".hidden-dir").mkdir()
    base.save(root / ".hidden-dir" / "secret.png")
    (root / "notes.txt").write_text("not an image\n")
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])  # .gif is not a scanned type
    os.symlink("does-not-exist", root / "broken-link-without-extension")
    os.symlink("..", root / "sub" / "loop")  # directory link to its parent
    os.mkfifo(root / "fifo.png")
    return expected, detail, chmodded


def snapshot(root: Path, exclude: Path) -> dict[str, tuple]:
    """Everything under ``root`` except ``exclude``, without following links or opening FIFOs."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if here / n != exclude)
        for name in [*dirnames, *filenames]:
            path = here / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                info: tuple = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                info = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
            elif stat.S_ISDIR(st.st_mode):
                info = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                info = ("other", st.st_mode, st.st_mtime_ns)
            entries[path.relative_to(root).as_posix()] = info
    return entries


def test_hostile_folder_is_scanned_without_crash_or_stray_writes(tmp_path, tiny_args):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    expected, detail, chmodded = build_hostile_corpus(corpus, tmp_path / "elsewhere")
    for path in chmodded:
        path.chmod(0)
    try:
        # As root a chmod 000 file stays readable: the scan runs without root's permission override.
        # If that cannot be dropped here, the chmod 000 items are readable and expected as such.
        if not really_unreadable(corpus / "unreadable.png"):
            expected["unreadable.png"] = "ok"
            del detail["unreadable.png"]
            expected["locked/hidden-by-permissions.png"] = "ok"
        assert len(expected) >= 25
        before = snapshot(tmp_path, exclude=out)
        result = subprocess.run(
            scan_command(corpus, out, tiny_args, "--batch-size", "4"),
            capture_output=True,
            text=True,
            errors="replace",
            env=dict(os.environ),
            cwd=tmp_path,
            preexec_fn=without_root_file_override,
            timeout=SUBPROCESS_TIMEOUT,
        )
        after = snapshot(tmp_path, exclude=out)
    finally:
        for path in chmodded:
            path.chmod(0o755)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "Traceback" not in output
    assert before == after, "the scan wrote or changed something outside its output folder"

    rows = csv_rows(out)
    assert set(rows) == set(expected), (sorted(set(rows) - set(expected)), sorted(set(expected) - set(rows)))
    assert {path: row["status"] for path, row in rows.items()} == expected
    for path, status in expected.items():
        row = rows[path]
        if status == "error":
            assert detail[path] in row["error"], (path, row["error"])
        elif path in detail:
            assert detail[path] in row["note"], (path, row["note"])
    assert rows["one-pixel.png"]["width"] == rows["one-pixel.png"]["height"] == "1"
    for same_pixels in ("png-named.jpg", "link-to-plain.png"):  # decoded by content, whatever the name
        assert float(rows[same_pixels]["score"]) == pytest.approx(float(rows["plain.png"]["score"]), abs=1e-5)
    if expected.get("locked/hidden-by-permissions.png") is None:
        assert "cannot list" in result.stderr and "locked" in result.stderr
    check_heatmaps(out, rows)
    info = run_info(out)
    assert info["images"] == len(expected) and info["errors"] == list(expected.values()).count("error")


def test_an_unlistable_subfolder_is_reported_in_the_exit_code(tmp_path, tiny_args, monkeypatch):
    """Files in a folder that cannot be listed were not read: warning and exit code 3, like unreadable files.

    The folder is made unlistable by failing os.scandir on it (as root, chmod 000 does not; the
    hostile-folder test above does it for real in a subprocess without root's override).
    """
    folder, out = tmp_path / "images", tmp_path / "out"
    names = make_images(folder, 1)
    make_images(folder / "locked", 2)
    real_scandir = os.scandir

    def scandir(path=".", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and Path(path) == folder / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        result = invoke(["scan", folder, "--out", out, "-q", *tiny_args])
    assert "cannot list" in result.stderr and "locked" in result.stderr
    assert csv_rows(out)[names[0]]["status"] == "ok"
    assert result.exit_code == 3, result.output


def test_a_fifo_given_as_the_input_is_refused_without_blocking(tmp_path, tiny_args):
    """A FIFO named on the command line gets an error row at once; nothing opens it and waits for a writer."""
    fifo, out = tmp_path / "camera.png", tmp_path / "out"
    os.mkfifo(fifo)
    done = threading.Event()
    unblocked: list[bool] = []

    def watchdog() -> None:
        # A scan that is right never opens the FIFO; after 5 s a reader blocked on it is
        # released (a writer opens and closes it: end of file) so that the test ends and can fail.
        if done.wait(5):
            return
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads it
            except OSError:
                done.wait(POLL)
                continue
            os.close(fd)
            unblocked.append(True)
            done.wait(POLL)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        result = invoke(["scan", fifo, "--out", out, "-q", *tiny_args])
    finally:
        done.set()
        thread.join(timeout=10)
    assert not unblocked, "the scan blocked reading from a FIFO"
    assert result.exit_code == 3, result.output
    rows = csv_rows(out)
    assert list(rows) == ["camera.png"]
    assert rows["camera.png"]["status"] == "error" and "regular file" in rows["camera.png"]["error"]


def test_an_undecodable_file_name_does_not_abort_the_scan(tmp_path, tiny_args):
    """A file name that is not valid UTF-8 (possible on Linux) is scanned like any other, run after run."""
    folder, out = tmp_path / "images", tmp_path / "out"
    names = make_images(folder, 1)
    odd = folder / os.fsdecode(b"camera-\xff\xfe.png")
    Image.fromarray(random_rgb(7)).save(odd, format="PNG")
    result = invoke(["scan", folder, "--out", out, "-q", "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    rows = csv_rows(out)
    assert len(rows) == 2 and rows[names[0]]["status"] == "ok"
    (odd_row,) = [row for path, row in rows.items() if path != names[0]]
    assert odd_row["status"] == "ok" and odd_row["path"].startswith("camera-")
    result = invoke(["scan", folder, "--out", out, "-q", "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    assert (run_info(out)["scored"], run_info(out)["unchanged"]) == (0, 2)
    assert len(csv_rows(out)) == 2


# ======================================================================================== 2. SIGKILL


def test_sigkill_mid_run_then_incremental_resume(tmp_path, tiny_args):
    folder, out, names, returncode, _, _, pid = signal_mid_run(tmp_path, tiny_args, signal.SIGKILL, 2, "-q")
    assert returncode == -signal.SIGKILL
    recorded = state_count(out)
    assert 2 <= recorded < len(names)
    assert f"pid {pid} " in (out / ".winclip" / "lock").read_text()  # the dead process never released it

    result = invoke(["scan", folder, "--out", out, "--batch-size", "1", "-q", "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.stderr and f"pid {pid}" in result.stderr
    rows = csv_rows(out, expected=set(names))
    assert all(row["status"] == "ok" for row in rows.values())
    check_heatmaps(out, rows)
    # no image file in OUT is a leftover of the killed run that is half-written
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "heatmaps").rglob("*") if p.is_file())
    assert on_disk == sorted(row["heatmap"] for row in rows.values())
    for image in (out / "thumbs").rglob("*"):
        if image.is_file():
            with Image.open(image) as im:
                im.load()
    no_temporaries(out)
    info = run_info(out)
    assert info["unchanged"] == recorded
    assert info["scored"] == len(names) - recorded < len(names)
    assert info["total_rows"] == len(names)
    assert [row["path"] for row in state_rows(out)] == sorted(names)


# ========================================================================================= 3. SIGINT


def test_sigint_stops_after_the_batch_with_consistent_outputs(tmp_path, tiny_args):
    folder, out, names, returncode, stdout, stderr, _ = signal_mid_run(tmp_path, tiny_args, signal.SIGINT, 1)
    assert returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    assert "stopping after the current batch" in stderr
    # the summary says the run was cut short (issue 13)
    assert re.search(r"interrupted: \d+ images?: \d+ anomalous, \d+ normal, \d+ errors?", stderr), stderr
    rows = csv_rows(out)
    assert 1 <= len(rows) < len(names)
    assert list(rows.values()) == state_rows(out)  # the CSV is exactly the durable state
    check_heatmaps(out, rows)
    no_temporaries(out)
    info = run_info(out)
    assert info["interrupted"] is True and info["images"] == len(rows)

    result = invoke(["scan", folder, "--out", out, "-q", "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    csv_rows(out, expected=set(names))
    info = run_info(out)
    assert info["interrupted"] is False
    assert info["unchanged"] == len(rows) and info["scored"] == len(names) - len(rows)


# ==================================================================================== 4. incremental


def test_incremental_scans_only_what_changed(tmp_path, tiny_args):
    folder, out = tmp_path / "images", tmp_path / "out"
    names = make_images(folder, 4)

    def scan(*extra: str, code: int = 0):
        # --batch-size 1: an image's score never depends on which other images share its batch
        result = invoke(["scan", folder, "--out", out, "--incremental", "--batch-size", "1", "-q", *extra, *tiny_args])
        assert result.exit_code == code, result.output
        return result, run_info(out)

    _, info = scan()
    assert (info["scored"], info["unchanged"]) == (4, 0)
    first = csv_rows(out, expected=set(names))
    first_text = (out / "scores.csv").read_text(encoding="utf-8")

    _, info = scan()  # nothing changed
    assert (info["images"], info["scored"], info["unchanged"]) == (0, 0, 4)
    assert (out / "scores.csv").read_text(encoding="utf-8") == first_text

    touched = folder / names[1]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _, info = scan()  # a new mtime: that file only
    assert (info["images"], info["scored"], info["unchanged"]) == (1, 1, 3)
    assert csv_rows(out, expected=set(names)) == first  # same content, same scores

    names += make_images(folder, 1, start=4)
    _, info = scan()  # a new file: that file only
    assert (info["images"], info["scored"], info["unchanged"]) == (1, 1, 4)
    rows = csv_rows(out, expected=set(names))
    assert {path: rows[path] for path in first} == first

    vocabulary = tmp_path / "scratch.toml"
    vocabulary.write_text('anomalous = ["{} with a scratch"]\n', encoding="utf-8")
    result, info = scan("--prompts", vocabulary)  # another vocabulary: everything again, with a warning
    assert (info["images"], info["scored"], info["unchanged"]) == (5, 5, 0)
    assert "warning" in result.stderr and "vocabulary_sha256" in result.stderr
    rescored = csv_rows(out, expected=set(names))
    assert {row["vocabulary_sha256"] for row in rescored.values()} == {info["vocabulary_sha256"]}
    assert info["vocabulary_sha256"] != first[names[0]]["vocabulary_sha256"]
    assert [rescored[p]["score"] for p in first] != [first[p]["score"] for p in first]

    scores = sorted(float(row["score"]) for row in rescored.values())
    assert scores[0] < scores[-1]
    threshold = round((scores[0] + scores[-1]) / 2, 7)
    _, info = scan("--prompts", vocabulary, "--threshold", repr(threshold))  # nothing rescanned, relabelled
    assert (info["images"], info["scored"], info["unchanged"]) == (0, 0, 5)
    relabelled = csv_rows(out, expected=set(names))
    for path, row in relabelled.items():
        assert row["score"] == rescored[path]["score"]
        assert row["threshold"] == f"{threshold:.6f}" and row["threshold_source"] == "--threshold"
        assert row["label"] == ("anomalous" if float(row["score"]) > threshold else "normal")
    assert {row["label"] for row in relabelled.values()} == {"normal", "anomalous"}

    keep = ("--prompts", vocabulary, "--threshold", repr(threshold))
    (folder / "bad.png").write_text("not an image yet\n")
    names.append("bad.png")
    _, info = scan(*keep, code=3)
    assert (info["images"], info["errors"], info["unchanged"]) == (1, 1, 5)
    _, info = scan(*keep, code=3)  # unchanged, but its last row was an error: tried again
    assert (info["images"], info["errors"], info["unchanged"]) == (1, 1, 5)
    assert csv_rows(out, expected=set(names))["bad.png"]["status"] == "error"
    Image.fromarray(random_rgb(99)).save(folder / "bad.png")
    _, info = scan(*keep)
    assert (info["images"], info["scored"], info["errors"], info["unchanged"]) == (1, 1, 0, 5)
    assert csv_rows(out, expected=set(names))["bad.png"]["status"] == "ok"


def test_incremental_drops_the_rows_of_deleted_files(tmp_path, tiny_args):
    """scores.csv lists the files that exist: a file deleted since the last run loses its row."""
    folder, out = tmp_path / "images", tmp_path / "out"
    names = make_images(folder, 3)
    args = ["scan", folder, "--out", out, "-q", "--incremental", *tiny_args]
    assert invoke(args).exit_code == 0
    (folder / names[1]).unlink()
    assert invoke(args).exit_code == 0
    info = run_info(out)
    assert (info["scored"], info["unchanged"]) == (0, 2)
    assert set(csv_rows(out)) == {names[0], names[2]}
    assert info["total_rows"] == 2


# ======================================================================================= 5. sharding


def test_shards_partition_the_scan_and_merge_back(tmp_path, tiny_args):
    folder = tmp_path / "images"
    names = make_images(folder, 10, prefix="part")

    def scan(out: Path, *extra: str):
        result = invoke(["scan", folder, "--out", out, "--batch-size", "1", "-q", *extra, *tiny_args])
        assert result.exit_code == 0, result.output
        return csv_rows(out)

    whole = scan(tmp_path / "all")
    assert set(whole) == set(names)
    shard_dirs: dict[int, list[Path]] = {}
    for n in (2, 3, 5):
        union: dict[str, dict[str, str]] = {}
        shard_dirs[n] = [tmp_path / f"shard-{n}-{k}" for k in range(1, n + 1)]
        for k, out in enumerate(shard_dirs[n], start=1):
            rows = scan(out, "--shard", f"{k}/{n}")
            assert run_info(out)["shard"] == f"{k}/{n}"
            assert not set(rows) & set(union), f"shards of {n} overlap"
            assert all(shard_of(path, n) == k for path in rows)
            union.update(rows)
        assert union == whole  # same paths, same scores, same everything

        merged = tmp_path / f"merged-{n}"
        result = invoke(["merge", *shard_dirs[n], "--out", merged])
        assert result.exit_code == 0, result.output
        assert csv_rows(merged) == whole
        check_heatmaps(merged, whole)
        assert run_info(merged)["images"] == len(names)

    # adding files moves no existing file to another shard: an incremental shard scan keeps them all
    before = {out: csv_rows(out) for out in shard_dirs[3]}
    added = make_images(folder, 4, start=10, prefix="part")
    for k, out in enumerate(shard_dirs[3], start=1):
        rows = scan(out, "--shard", f"{k}/3", "--incremental")
        info = run_info(out)
        new = {path for path in added if shard_of(path, 3) == k}
        assert set(rows) == set(before[out]) | new
        assert {path: rows[path] for path in before[out]} == before[out]
        assert (info["unchanged"], info["scored"]) == (len(before[out]), len(new))

    # shards scanned with another configuration are not merged
    other = tmp_path / "shard-3-1-bottle"
    scan(other, "--shard", "1/3", "--class", "bottle")
    refused = tmp_path / "merged-mixed"
    result = invoke(["merge", other, *shard_dirs[3][1:], "--out", refused])
    assert result.exit_code == 2
    assert "class (--class)" in result.stderr and "Traceback" not in result.output  # the option, not the key
    assert not (refused / "scores.csv").exists()


@pytest.mark.parametrize("value", ["0/2", "3/2", "x", "1/0", "2", "1/2/3", "a/b"])
def test_bad_shard_values_are_usage_errors(tmp_path, tiny_args, value):
    folder = tmp_path / "images"
    make_images(folder, 1)
    out = tmp_path / "out"
    result = invoke(["scan", folder, "--out", out, "--shard", value, "-q", *tiny_args])
    assert result.exit_code == 2, result.output
    assert "--shard" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


# ============================================================================================ 6. lock


def test_a_running_scan_locks_its_output_folder(tmp_path, tiny_args):
    folder, out = tmp_path / "images", tmp_path / "out"
    names = make_images(folder, 60)
    holder, _, stderr = start_scan(scan_command(folder, out, tiny_args, "--batch-size", "1"), tmp_path / "logs")
    try:
        assert wait_for_rows(holder, out, 1), "the scan ended before the test could use its lock"
        assert f"pid {holder.pid} " in (out / ".winclip" / "lock").read_text()
        result = invoke(["scan", folder, "--out", out, "-q", "--incremental", *tiny_args])
        assert holder.poll() is None  # the refusal happened while the holder was running
        assert result.exit_code == 4, result.output
        assert str(holder.pid) in result.stderr and "Traceback" not in result.output
        holder.send_signal(signal.SIGTERM)  # SIGTERM also stops after the current batch
        assert holder.wait(timeout=SUBPROCESS_TIMEOUT) == 130
    finally:
        stop(holder)
    assert "Traceback" not in stderr.read_text(encoding="utf-8", errors="replace")
    rows = csv_rows(out)
    assert 1 <= len(rows) < len(names) and list(rows.values()) == state_rows(out)

    # released on exit: the next scan takes the folder without any stale-lock warning
    assert (out / ".winclip" / "lock").read_text() == ""
    result = invoke(["scan", folder, "--out", out, "-q", "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "stale" not in result.stderr
    csv_rows(out, expected=set(names))


def test_a_stale_lock_is_taken_over(tmp_path, tiny_args):
    folder, out = tmp_path / "images", tmp_path / "out"
    names = make_images(folder, 2)
    (out / ".winclip").mkdir(parents=True)
    (out / ".winclip" / "lock").write_text("pid 999999 on ghost-host since 2001-01-01 00:00:00\n")
    result = invoke(["scan", folder, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.stderr and "999999" in result.stderr
    csv_rows(out, expected=set(names))
    assert (out / ".winclip" / "lock").read_text() == ""
