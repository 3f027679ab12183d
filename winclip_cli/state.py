"""The run state of an output folder: one SQLite file and one lock, under ``OUT/.winclip/``.

SQLite (standard library) holds one row per scanned file with the file's size, mtime and hash,
committed as results arrive; it is the source of truth from which ``scores.csv`` is rewritten
atomically at the start and end of every run. So a scan killed at any moment (even SIGKILL)
leaves a state that the next run completes, with no lost, duplicated or half-written rows.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SetupError, WinclipError
from .outputs import ResultRow

STATE_DIR = ".winclip"
EXIT_BUSY = 4


class OutputBusyError(WinclipError):
    """Another scan is writing to the same output folder."""

    exit_code = EXIT_BUSY


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's content cheaply (size, mtime) and exactly (sha256)."""

    size: int
    mtime_ns: int
    sha256: str = ""

    def same_file(self, other: FileStamp) -> bool:
        """rsync's quick check: same size and modification time means unchanged (no re-read)."""
        return self.size == other.size and self.mtime_ns == other.mtime_ns


class OutputLock:
    """An exclusive lock on an output folder, held for the whole run.

    ``fcntl.flock`` is released by the kernel when its holder dies, so a lock left by a killed
    process is simply free: the next run takes it over and says whose it was.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "lock"
        self._fh: Any = None
        self.previous_holder: str = ""

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            import fcntl
        except ImportError:  # not POSIX: no kernel lock; one writer is then the user's responsibility
            self._fh = fh
            return self
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.close()  # e.g. ENOLCK on some network file systems: not "busy", say what it is
                raise SetupError(
                    f"cannot lock {self.path} ({err.strerror}); use an --out on a local file system"
                ) from None
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputBusyError(
                f"another winclip scan is writing to {self.path.parent.parent} ({holder}); "
                "wait for it or use another --out"
            ) from None
        fh.seek(0)
        self.previous_holder = fh.read().strip()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            try:
                self._fh.seek(0)
                self._fh.truncate()
            finally:
                self._fh.close()  # closing the descriptor releases the flock
                self._fh = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error so the connection stays usable."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class RunState:
    """Per-file results of an output folder, durable as soon as they are recorded."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "state.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection used from the scan's writer thread and the main thread, never at once.
        self._lock = threading.Lock()
        self.recovered_from = ""
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            # A damaged state must not stop every later cron run: keep it aside, start afresh
            # (the next scan scores everything again, which is always correct).
            aside = self.path.with_name(f"state.corrupt-{int(time.time())}.sqlite")
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.recovered_from = str(aside)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(
            # path as bytes: file names need not be valid UTF-8 (surrogate-escaped in Python), SQLite TEXT must be
            "CREATE TABLE IF NOT EXISTS results (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "sha256 TEXT, row TEXT NOT NULL)"
        )
        db.execute("SELECT COUNT(*) FROM results").fetchone()  # a damaged file fails here, not mid-scan
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ configuration of the stored rows

    def config(self) -> dict[str, Any] | None:
        return self.meta("config")

    def meta(self, key: str) -> Any:
        with self._lock:
            found = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def reset(self, config: dict[str, Any]) -> None:
        """Forget every stored row and record the configuration the new rows will have."""
        with self._lock:
            with _Transaction(self._db) as db:
                db.execute("DELETE FROM results")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (json.dumps(config, sort_keys=True),))

    # ------------------------------------------------------------------------------------------- rows

    def stamps(self) -> dict[str, FileStamp]:
        with self._lock:
            found = self._db.execute("SELECT path, size, mtime_ns, sha256 FROM results").fetchall()
        return {_path(key): FileStamp(size, mtime_ns, sha256 or "") for key, size, mtime_ns, sha256 in found}

    def stamps_of(self, paths: list[str]) -> dict[str, FileStamp | None]:
        """The stored stamps of those of ``paths`` that have a row (None: a row stored without one)."""
        found: dict[str, FileStamp | None] = {}
        with self._lock:
            for path in paths:
                hit = self._db.execute(
                    "SELECT size, mtime_ns, sha256 FROM results WHERE path = ?", (_key(path),)
                ).fetchone()
                if hit is not None:
                    size, mtime_ns, sha = hit
                    found[path] = None if size is None else FileStamp(size, mtime_ns, sha or "")
        return found

    def record_many(self, group: list[tuple[ResultRow, FileStamp | None]]) -> None:
        """Insert or replace several rows in one transaction: one disk sync for the whole group."""
        values = []
        for row, stamp in group:
            size, mtime_ns, sha = (stamp.size, stamp.mtime_ns, stamp.sha256) if stamp else (None, None, None)
            values.append((_key(row.path), size, mtime_ns, sha, json.dumps(row.as_csv_dict())))
        with self._lock:
            with _Transaction(self._db) as db:
                db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", values)

    def forget(self, paths: list[str]) -> None:
        with self._lock:
            with _Transaction(self._db) as db:
                db.executemany("DELETE FROM results WHERE path = ?", [(_key(p),) for p in paths])

    def rows(self) -> list[ResultRow]:
        """All stored rows, sorted by path."""
        with self._lock:
            found = self._db.execute("SELECT row FROM results ORDER BY path").fetchall()
        return [ResultRow.from_csv_dict(json.loads(text)) for (text,) in found]

    def replace_rows(self, rows: list[ResultRow]) -> None:
        """Rewrite stored rows in place (e.g. relabelled after a threshold change), keeping the stamps."""
        with self._lock:
            with _Transaction(self._db) as db:
                db.executemany(
                    "UPDATE results SET row = ? WHERE path = ?",
                    [(json.dumps(r.as_csv_dict()), _key(r.path)) for r in rows],
                )


def _key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _path(key: bytes) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


OWN_FOLDERS = ("heatmaps", "maps", "thumbs")
OWN_FILES = ("scores.csv", "run.json", "report.html")


def clean_stale_temporaries(out_dir: Path) -> int:
    """Remove the temporary files (``.NAME.*.tmp``) of atomic writes that a killed run left behind.

    Only winclip's own files are touched: its folders, and temporaries of its top-level files,
    so an output folder shared with other tools keeps their files.
    """
    removed = 0
    candidates = [p for name in OWN_FILES for p in out_dir.glob(f".{name}.*.tmp")]
    for folder in OWN_FOLDERS:
        candidates += list((out_dir / folder).rglob(".*.tmp"))
    for path in candidates:
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed
