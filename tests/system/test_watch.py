"""``winclip watch`` through the real CLI in a subprocess (signals, kills, a second process on the lock),
with the tiny random-weight model of conftest; and its arrival logic and hook without a model.

Every wait is bounded; a watch is always stopped or killed, even when a test fails.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from winclip_cli.io.outputs import ResultRow
from winclip_cli.jobs.watch import ArrivalTracker, run_hook

TIMEOUT = 120  # seconds for anything a watch must do; importing torch alone takes seconds on a busy machine
POLL = "0.2"  # seconds between listings in --poll mode


# --------------------------------------------------------------------------------------------------- helpers


def png_bytes(seed: int, width: int = 64, height: int = 48) -> bytes:
    import io

    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def put_by_rename(folder: Path, name: str, seed: int) -> bytes:
    """Write a file under a hidden temporary name, then rename it into place (as cameras and rsync do)."""
    data = png_bytes(seed)
    temporary = folder / f".{name}.part"
    temporary.write_bytes(data)
    os.replace(temporary, folder / name)
    return data


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the watch exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Watch:
    """A ``winclip watch`` subprocess whose --json rows and stderr lines are collected as they come."""

    def __init__(self, folder: Path, out: Path, model_args: list[str], *extra: str) -> None:
        command = [sys.executable, "-m", "winclip_cli", "watch", str(folder), "--out", str(out), "--json"]
        self.proc = subprocess.Popen(
            [*command, *model_args, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.rows: list[dict] = []
        self.messages: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._on_row), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.messages.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def _on_row(self, line: str) -> None:
        self.rows.append(json.loads(line))

    def wait_watching(self) -> None:
        wait_until(lambda: any(m.startswith("watching ") for m in self.messages), "the watch to start", self.proc)

    def wait_rows(self, count: int) -> None:
        wait_until(lambda: len(self.rows) >= count, f"{count} rows on stdout", self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=TIMEOUT)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def watches():
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.close()


def csv_rows(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def state_paths(out: Path) -> list[str]:
    with sqlite3.connect(out / ".winclip" / "state.sqlite") as db:
        return sorted(bytes(p).decode() for (p,) in db.execute("SELECT path FROM results"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- the watch CLI


def test_watch_scores_backlog_renames_and_a_burst_then_stops_on_sigterm_and_restarts_without_duplicates(
    tmp_path: Path, tiny_args: list[str], watches: list[Watch]
) -> None:
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    contents = {f"before_{i}.png": png_bytes(i) for i in range(3)}
    for name, data in contents.items():
        (folder / name).write_bytes(data)

    watch = Watch(folder, out, tiny_args, "--poll", POLL)
    watches.append(watch)
    watch.wait_rows(3)  # files present at start
    assert sorted(row["path"] for row in watch.rows) == sorted(contents)

    contents["renamed.png"] = put_by_rename(folder, "renamed.png", 100)
    watch.wait_rows(4)
    assert watch.rows[3]["path"] == "renamed.png"
    assert watch.rows[3]["sha256"] == sha256(contents["renamed.png"])

    # the lock: a scan of the same OUT is refused while the watch runs
    scan = run_cli(["scan", folder, "--out", out, *tiny_args], timeout=TIMEOUT)
    assert scan.returncode == 4, scan.stderr
    assert "another winclip watch is writing to" in scan.stderr

    messages_before = len(watch.messages)
    burst = {f"burst_{i:02d}.png": png_bytes(200 + i) for i in range(50)}
    for name, data in burst.items():
        temporary = folder / f".{name}.part"
        temporary.write_bytes(data)
        os.replace(temporary, folder / name)
    contents.update(burst)
    watch.wait_rows(54)
    # a batch's line reaches stderr just after its rows reach stdout: wait for the lines of all 50
    batch_lines = lambda: [m for m in watch.messages[messages_before:] if re.match(r"\d+ scored, ", m)]  # noqa: E731
    wait_until(
        lambda: sum(int(m.split(" scored, ")[0]) for m in batch_lines()) >= 50, "the burst's batch lines", watch.proc
    )
    batches = len(batch_lines())
    assert 1 <= batches < 10, watch.messages  # a burst is scored in a few batches, not file by file
    assert all(row["status"] == "ok" for row in watch.rows)
    assert {row["path"]: row["sha256"] for row in watch.rows} == {n: sha256(d) for n, d in contents.items()}

    assert watch.stop(signal.SIGTERM) == 0
    assert any(m.startswith("watch stopped: ") for m in watch.messages)
    rows = csv_rows(out)
    assert sorted(row["path"] for row in rows) == sorted(contents)  # committed, each once
    assert state_paths(out) == sorted(contents)
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["watch"] is True and run_info["scored"] == 54

    # a restart scores nothing again and adds no row
    again = Watch(folder, out, tiny_args, "--poll", POLL)
    watches.append(again)
    again.wait_watching()
    assert any("0 images to score (54 unchanged)" in m for m in again.messages)
    contents["after.png"] = put_by_rename(folder, "after.png", 300)
    again.wait_rows(1)
    assert again.stop(signal.SIGINT) == 0
    assert [row["path"] for row in again.rows] == ["after.png"]
    assert sorted(row["path"] for row in csv_rows(out)) == sorted(contents)


def test_watch_killed_mid_burst_resumes_without_losing_or_repeating_rows(
    tmp_path: Path, tiny_args: list[str], watches: list[Watch]
) -> None:
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    watch = Watch(folder, out, tiny_args, "--poll", POLL, "--batch-size", "2")
    watches.append(watch)
    watch.wait_watching()
    contents = {f"img_{i:02d}.png": put_by_rename(folder, f"img_{i:02d}.png", i) for i in range(30)}
    watch.wait_rows(1)
    watch.proc.kill()  # SIGKILL: no chance to commit anything more or to clean up
    watch.proc.wait(timeout=TIMEOUT)
    committed = state_paths(out)
    assert 1 <= len(committed)

    resumed = Watch(folder, out, tiny_args, "--poll", POLL)
    watches.append(resumed)
    wait_until(lambda: len(resumed.rows) >= 30 - len(committed), "the rest of the burst", resumed.proc)
    assert resumed.stop() == 0
    assert not set(committed) & {row["path"] for row in resumed.rows}  # nothing committed is scored again
    rows = csv_rows(out)
    assert sorted(row["path"] for row in rows) == sorted(contents)
    assert {row["path"]: row["sha256"] for row in rows} == {n: sha256(d) for n, d in contents.items()}


def test_watch_with_events_waits_for_a_slow_writer_and_scores_a_broken_file_once(
    tmp_path: Path, tiny_args: list[str], watches: list[Watch]
) -> None:
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    hook_log = tmp_path / "hook.jsonl"
    vocabulary = tmp_path / "defects.toml"
    vocabulary.write_text('mode = "extend"\nanomalous = ["{} with a scratch"]\n')
    # --threshold 0: every image is anomalous, so the hook receives each scored row
    hook = ["--threshold", "0", "--on-anomaly", f"cat >> {hook_log}"]
    watch = Watch(folder, out, tiny_args, *hook, "--prompts", str(vocabulary))
    watches.append(watch)
    watch.wait_watching()
    assert any("(file-system events)" in m for m in watch.messages)

    slow = png_bytes(7, width=256, height=256)
    with open(folder / "slow.png", "wb") as fh:
        chunks = [slow[i : i + 4096] for i in range(0, len(slow), 4096)]
        for chunk in chunks[: len(chunks) // 2]:
            fh.write(chunk)
            fh.flush()
        # the writer pauses far longer than a file needs to settle; it still has the file open
        time.sleep(1.5)
        put_by_rename(folder, "meanwhile.png", 8)
        watch.wait_rows(1)
        assert [row["path"] for row in watch.rows] == ["meanwhile.png"]  # the half-written file waits
        for chunk in chunks[len(chunks) // 2 :]:
            fh.write(chunk)
    watch.wait_rows(2)
    assert watch.rows[1]["path"] == "slow.png"
    assert watch.rows[1]["status"] == "ok" and watch.rows[1]["sha256"] == sha256(slow)

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    watch.wait_rows(3)
    assert watch.rows[2]["path"] == "broken.png" and watch.rows[2]["status"] == "error"
    put_by_rename(folder, "later.png", 9)  # more listings: the broken file is not tried again
    watch.wait_rows(4)
    fixed = put_by_rename(folder, "broken.png", 10)  # ...until it changes
    watch.wait_rows(5)
    assert [row["path"] for row in watch.rows] == ["meanwhile.png", "slow.png", "broken.png", "later.png", "broken.png"]
    assert watch.rows[4]["status"] == "ok" and watch.rows[4]["sha256"] == sha256(fixed)
    names = ["broken.png", "later.png", "meanwhile.png", "slow.png"]

    # a new vocabulary is picked up without a restart: every file is scored again with it
    first_vocabulary = watch.rows[0]["vocabulary_sha256"]
    replacement = tmp_path / ".defects.toml.new"
    replacement.write_text('mode = "extend"\nanomalous = ["{} with a dent"]\n')
    os.replace(replacement, vocabulary)
    watch.wait_rows(9)
    assert sorted(row["path"] for row in watch.rows[5:]) == names
    new_vocabulary = {row["vocabulary_sha256"] for row in watch.rows[5:]}
    assert len(new_vocabulary) == 1 and first_vocabulary not in new_vocabulary
    # a file that leaves the folder leaves scores.csv, and its heatmap goes too
    heatmap = out / watch.rows[3]["heatmap"]
    assert heatmap.is_file()
    (folder / "later.png").unlink()
    wait_until(lambda: "later.png" not in {row["path"] for row in csv_rows(out)}, "later.png's row to go", watch.proc)
    assert not heatmap.exists()
    names.remove("later.png")
    # a broken one is refused and the watch goes on with the last good one
    vocabulary.write_text("mode = \"extend\"\nanomalous = ['no placeholder']\n")
    wait_until(lambda: any("cannot reload" in m for m in watch.messages), "the reload to be refused", watch.proc)
    watch.proc.send_signal(signal.SIGHUP)  # asks for a reload too (refused again: the file is still broken)
    wait_until(lambda: sum("cannot reload" in m for m in watch.messages) == 2, "SIGHUP's reload", watch.proc)
    assert watch.stop() == 0
    assert len(watch.rows) == 9
    # each batch's line counts as the final line does: their figures add up to it (issue 22)
    counts = r"(\d+) scored, (\d+) anomalous, (\d+) errors?"
    batches = [found for m in watch.messages if (found := re.match(counts, m))]
    (final,) = [found for m in watch.messages if (found := re.match(f"watch stopped: {counts}", m))]
    assert [sum(int(b[i]) for b in batches) for i in (1, 2, 3)] == [int(final[i]) for i in (1, 2, 3)]
    assert int(final[3]) == 1  # the broken file, once
    rows = {row["path"]: row for row in csv_rows(out)}
    assert sorted(rows) == names  # one row per file
    assert rows["broken.png"]["status"] == "ok"
    assert {row["vocabulary_sha256"] for row in rows.values()} == new_vocabulary
    hooked = [json.loads(line)["path"] for line in hook_log.read_text().splitlines()]
    assert hooked[:4] == ["meanwhile.png", "slow.png", "later.png", "broken.png"]
    assert sorted(hooked[4:]) == sorted([*names, "later.png"])


def test_a_quiet_watch_stops_without_a_word(tmp_path: Path, tiny_args: list[str]) -> None:
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "winclip_cli", "watch", str(folder), "--out", str(out), "-q", *tiny_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (out / "run.json").is_file(), "the watch to start", proc)
        assert (out / ".winclip" / "lock").read_text().startswith("winclip watch, pid ")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and stdout == "" and stderr == ""


# ---------------------------------------------------------------------------------- arrival logic and hooks


def listing(**stamps: tuple[int, int]) -> dict:
    return {name.replace("_", "."): (Path(name), stamp) for name, stamp in stamps.items()}


def test_a_file_is_complete_when_two_listings_agree_or_an_event_says_so() -> None:
    tracker = ArrivalTracker(settle=1.0)
    assert tracker.observe(listing(a_png=(10, 1)), now=0.0) == ([], [])
    assert tracker.observe(listing(a_png=(20, 2)), now=1.0) == ([], [])  # still growing
    assert tracker.observe(listing(a_png=(20, 2)), now=1.5) == ([], [])  # unchanged for only 0.5 s
    assert tracker.observe(listing(a_png=(20, 2)), now=2.0) == (["a.png"], [])
    assert tracker.observe(listing(a_png=(20, 2)), now=9.0) == ([], [])  # scored once
    # closed after writing, or renamed in: complete at once; written but not closed: never by settling
    seen = listing(a_png=(20, 2), b_png=(5, 5), c_png=(6, 6))
    assert tracker.observe(seen, now=10.0, closed={"b.png"}, writing={"c.png"}) == (["b.png"], [])
    assert tracker.observe(seen, now=30.0, writing={"c.png"}) == ([], [])
    assert tracker.observe(seen, now=70.0, writing={"c.png"}) == (["c.png"], [])  # the writer never closed it
    assert tracker.observe(listing(b_png=(5, 5)), now=71.0) == ([], ["a.png", "c.png"])
    assert tracker.pending == {} and tracker.stamps == {"b.png": (5, 5)}


def test_a_file_deleted_before_it_was_complete_is_forgotten() -> None:
    tracker = ArrivalTracker(settle=1.0)
    tracker.observe(listing(a_png=(1, 1)), now=0.0)
    assert tracker.next_due(now=0.0) == 1.0
    assert tracker.observe({}, now=0.5) == ([], ["a.png"])
    assert tracker.pending == {} and tracker.next_due(now=0.5) is None


def test_a_look_at_the_files_events_named_leaves_the_others_as_listed() -> None:
    tracker = ArrivalTracker(settle=1.0)
    tracker.observe(listing(a_png=(1, 1), b_png=(2, 2)), now=0.0)
    assert tracker.observe(listing(a_png=(1, 1), b_png=(2, 2)), now=1.0) == (["a.png", "b.png"], [])
    # events named b.png (rewritten and closed) and c.png (gone before the look); a.png is not looked at
    assert tracker.observe(listing(b_png=(3, 3)), now=2.0, closed={"b.png"}, only={"b.png", "c.png"}) == (
        ["b.png"],
        [],
    )
    assert tracker.stamps == {"a.png": (1, 1), "b.png": (3, 3)}
    assert tracker.observe({}, now=3.0, only={"a.png"}) == ([], ["a.png"])
    assert tracker.stamps == {"b.png": (3, 3)}


def anomalous_row() -> ResultRow:
    return ResultRow(path="cam/a.png", status="ok", score=0.75, label="anomalous", threshold=0.5)


def test_hook_gets_the_row_on_stdin_and_its_failures_are_reported(tmp_path: Path) -> None:
    received = tmp_path / "received.json"
    assert (
        run_hook(f'cat > {received}; echo "$WINCLIP_PATH $WINCLIP_SCORE" >> {received}.env', anomalous_row(), 5) == ""
    )
    assert json.loads(received.read_text())["path"] == "cam/a.png"
    assert Path(f"{received}.env").read_text() == "cam/a.png 0.750000\n"
    assert run_hook("echo no mail server >&2; exit 3", anomalous_row(), 5) == "exit code 3: no mail server"
    assert run_hook("sleep 30", anomalous_row(), 0.2) == "timed out after 0.2 s (killed)"
