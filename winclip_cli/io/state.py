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
import re
import socket
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winclip_cli.errors import SetupError, WinclipError
from winclip_cli.io.layout import LOCK_NAME, OWN_FILES, OWN_FOLDERS, STATE_DB_NAME, STATE_DIR, OutputLayout
from winclip_cli.io.outputs import LinkInOutputError, ResultRow
from winclip_cli.io.safe_fs import UnsafeFolderError, check_folder_is_safe, open_folder, remove_stale_temporaries

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


_LOCK_TEXT = re.compile(
    r"(?:winclip (scan|watch|report|merge), )?pid ([0-9]{1,10}) on ([A-Za-z0-9._-]{1,253}) "
    r"since ([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8})\n?"
)
_LOCK_READ_LIMIT = 512
LOCK_COMMANDS = ("scan", "watch", "report", "merge")


def describe_lock(text: str) -> str:
    """Who held a lock, from what winclip wrote in it ("winclip watch, pid N on HOST since DATE"; older
    versions wrote no command); anything else is only called an unreadable lock: the file could hold
    anything, and its contents are not ours to print."""
    found = _LOCK_TEXT.fullmatch(text)
    if found is None:
        return "unreadable lock"
    return f"pid {found[2]} on {found[3]} since {found[4]}"


def lock_command(text: str) -> str:
    """The winclip command that wrote this lock text ("scan" when it does not say: older versions)."""
    found = _LOCK_TEXT.fullmatch(text)
    return found[1] if found is not None and found[1] else "scan"


class _HeldLock:
    """A lock this process holds, shared by every ``OutputLock`` of the same folder and command in the same
    thread."""

    def __init__(self, handle: Any, thread: int, previous_holder: str, command: str) -> None:
        self.handle = handle
        self.thread = thread
        self.command = command
        self.count = 1
        self.previous_holder = previous_holder  # the stale lock taken over: each holder can say so


# The command line takes OUT's lock before it imports torch (a second run fails at once), and the job
# it then runs takes the same lock again: in one thread that is the same hold, counted, not a conflict.
# Another command's lock (a merge into a folder this thread's scan holds) is another writer: busy.
_held: dict[str, _HeldLock] = {}
_held_guard = threading.Lock()


def _state_folder(out_dir: Path) -> int:
    """A descriptor of ``OUT/.winclip``, created mode 0700 when missing, opened without following a link.

    It must belong to this user (or to root) and be writable by its owner alone: anyone else who could
    write in it could plant links that SQLite follows, or hold the lock. An older folder of this user
    with a wider mode is narrowed to 0700. OUT itself must pass :func:`check_folder_is_safe`: whoever may
    rename ``.winclip`` could put a link in its place, and SQLite opens its files by name."""
    layout = OutputLayout(out_dir)
    try:
        with open_folder(layout.root, [], create=False) as root:
            try:
                check_folder_is_safe(root, layout.root)
            except UnsafeFolderError as err:
                raise SetupError(err.strerror) from None
            try:
                os.mkdir(STATE_DIR, 0o700, dir_fd=root)
            except FileExistsError:
                pass
            fd = os.open(STATE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(layout.state_dir):
            raise SetupError(LinkInOutputError(layout.state_dir).strerror) from None
        raise SetupError(f"cannot open {layout.state_dir}: {err.strerror or err}") from None
    info = os.fstat(fd)
    if info.st_uid not in (os.geteuid(), 0):
        os.close(fd)
        raise SetupError(
            f"{layout.state_dir} belongs to another user (uid {info.st_uid}); winclip keeps its state and lock "
            "only in a folder of its own user: remove it or choose another --out"
        )
    if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
        os.fchmod(fd, 0o700)
    elif stat.S_IMODE(info.st_mode) & 0o022:
        os.close(fd)
        raise SetupError(f"{layout.state_dir} is writable by other users; remove it or choose another --out")
    return fd


def _open_lock_file(out_dir: Path, flags: int) -> int:
    """The lock file's descriptor (mode 0600, a regular file with one link), never blocking on a FIFO."""
    path = OutputLayout(out_dir).lock
    folder = _state_folder(out_dir)
    try:
        try:
            fd = os.open(LOCK_NAME, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=folder)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise SetupError(LinkInOutputError(path).strerror) from None
            raise SetupError(f"cannot open the lock {path}: {err.strerror}") from None
    finally:
        os.close(folder)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise SetupError(
            f"{path} is not a plain file of the output folder (a link or special file); "
            "remove it or choose another --out"
        )
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o600:
        os.fchmod(fd, 0o600)  # a lock others can open, they can hold: every scan would exit 4
    os.set_blocking(fd, True)
    return fd


def _foreign_holder(info: os.stat_result) -> tuple[int, int] | None:
    """(pid, uid) of a process of another user (neither this user nor root) holding a lock on the file
    ``info`` describes, from /proc/locks (Linux); None when there is none or it cannot be told."""
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read(1 << 20).splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or "->" in fields or fields[5] != wanted:
            continue
        try:
            pid = int(fields[4])
            uid = os.stat(f"/proc/{pid}").st_uid
        except (ValueError, OSError):
            continue
        if uid not in (os.geteuid(), 0):
            return pid, uid
    return None


class OutputLock:
    """An exclusive lock on an output folder, held for the whole run.

    ``fcntl.flock`` is released by the kernel when its holder dies, so a lock left by a killed
    process is simply free: the next run takes it over and says whose it was.

    The lock file lives in ``OUT/.winclip`` (mode 0700, of this user), is mode 0600, is opened without
    following links or blocking on a FIFO, and must be a plain file with one link: another user can neither
    hold it nor make the run truncate a file elsewhere. Only the parsed "pid N on HOST since DATE" of a
    previous holder is ever shown.
    """

    def __init__(self, out_dir: Path, command: str = "scan") -> None:
        self.out_dir = Path(out_dir)
        self.path = OutputLayout(out_dir).lock
        self.command = command if command in LOCK_COMMANDS else "scan"
        self._fh: Any = None
        self._shared: _HeldLock | None = None
        self.previous_holder: str = ""

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def _open(self) -> Any:
        try:  # a Python caller may lock a folder that does not exist yet, as the command line does
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SetupError(f"cannot create {self.out_dir}: {err.strerror or err}") from None
        fd = _open_lock_file(self.out_dir, os.O_RDWR | os.O_CREAT)
        return os.fdopen(fd, "r+", encoding="utf-8", errors="replace")

    def acquire(self) -> OutputLock:
        with _held_guard:
            held = _held.get(self._key())
            if held is not None and held.thread == threading.get_ident() and held.command == self.command:
                held.count += 1
                self._shared = held
                self.previous_holder = held.previous_holder
                return self
        fh = self._open()
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
            foreign = _foreign_holder(os.fstat(fh.fileno()))
            fh.seek(0)
            holder = fh.read(_LOCK_READ_LIMIT).strip()
            fh.close()
            if foreign is not None:
                # not a winclip run that could write here: a user who opened the lock file while older
                # versions left it readable. Exit 2, said on stderr, not the busy exit 4 a cron line skips.
                raise SetupError(
                    f"the lock {self.path} is held by another user (uid {foreign[1]}, pid {foreign[0]}), not by a "
                    "winclip run that can write here; stop that process or remove the lock file"
                ) from None
            command = lock_command(holder)
            holder = describe_lock(holder) if holder else "another process"
            raise OutputBusyError(
                f"another winclip {command} is writing to {self.path.parent.parent} ({holder}); "
                f"{'stop it' if command == 'watch' else 'wait for it'} or use another --out"
            ) from None
        fh.seek(0)
        previous = fh.read(_LOCK_READ_LIMIT)
        self.previous_holder = describe_lock(previous) if previous.strip() else ""
        fh.seek(0)
        fh.truncate()
        fh.write(
            f"winclip {self.command}, pid {os.getpid()} on {socket.gethostname()} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        fh.flush()
        self._fh = fh
        with _held_guard:
            self._shared = _held[self._key()] = _HeldLock(fh, threading.get_ident(), self.previous_holder, self.command)
        return self

    def release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            with _held_guard:
                shared.count -= 1
                if shared.count > 0:
                    self._fh = None  # the last holder closes the descriptor
                    return
                if _held.get(self._key()) is shared:
                    del _held[self._key()]
            self._fh = shared.handle
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
        self.path = OutputLayout(out_dir).state_db
        folder = _state_folder(out_dir)  # 0700, of this user: nobody else can plant a link in it
        try:
            for suffix in _SQLITE_SUFFIXES:  # SQLite follows links: one would make it write elsewhere
                try:
                    if stat.S_ISLNK(os.lstat(f"{STATE_DB_NAME}{suffix}", dir_fd=folder).st_mode):
                        raise SetupError(LinkInOutputError(Path(f"{self.path}{suffix}")).strerror)
                except FileNotFoundError:
                    pass
        finally:
            os.close(folder)
        # One connection used from the scan's writer thread and the main thread, never at once.
        self._lock = threading.Lock()
        self.recovered_from = ""
        self.damage = ""
        self._checked_rows: list[ResultRow] | None = None
        damaged: sqlite3.Connection | None = None
        try:
            self._db = damaged = self._open()
            self.damage = self._damage()
        except sqlite3.DatabaseError as err:
            damaged, self.damage = None, f"not a readable database: {err}"
        if self.damage:
            # A damaged state must not stop every later cron run: keep it aside, start afresh
            # (the next scan scores everything again, which is always correct).
            if damaged is not None:
                damaged.close()
            aside = self.path.with_name(f"state.corrupt-{int(time.time())}.sqlite")
            _set_aside(out_dir, aside.name)
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

    def _damage(self) -> str:
        """What is wrong with the stored contents ('' when nothing): a file SQLite reads fine can still
        hold another layout or values no winclip wrote (an edit, another tool, a bug of an old version)."""
        db = self._db
        for table, columns in _SCHEMA.items():
            found = tuple(row[1] for row in db.execute(f"PRAGMA table_info({table})"))
            if found != columns:
                return f"table {table} has another layout"  # (its column names are not shown: any text)
        for key, value in db.execute("SELECT key, value FROM meta"):
            try:
                parsed = json.loads(value)
            except (TypeError, ValueError, RecursionError):
                return "a meta entry is not JSON"
            if key == "config" and not isinstance(parsed, dict):
                return "the stored configuration is not a JSON object"
        rows = []
        query = "SELECT path, size, mtime_ns, sha256, row FROM results ORDER BY path"
        for key, size, mtime_ns, sha, text in db.execute(query):
            try:
                if not isinstance(key, bytes):
                    raise TypeError("path is not a BLOB")
                for number in (size, mtime_ns):
                    if number is not None and (not isinstance(number, int) or number < 0):
                        raise ValueError("size or mtime is not a count")
                if sha is not None and not isinstance(sha, str):
                    raise TypeError("sha256 is not text")
                values = json.loads(text)
                if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                    raise TypeError("row is not an object of strings")
                row = ResultRow.from_csv_dict(values)
                if row.path != _path(key):
                    raise ValueError("row path differs from its key")
                rows.append(row)
            except (TypeError, ValueError, RecursionError) as err:
                return f"a stored row is invalid ({str(err)[:80]})"
        self._checked_rows = rows  # the first rows() needs no second parse
        return ""

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
            self._checked_rows = None
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
            self._checked_rows = None
            with _Transaction(self._db) as db:
                db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", values)

    def forget(self, paths: list[str]) -> None:
        with self._lock:
            self._checked_rows = None
            with _Transaction(self._db) as db:
                db.executemany("DELETE FROM results WHERE path = ?", [(_key(p),) for p in paths])

    def rows(self) -> list[ResultRow]:
        """All stored rows, sorted by path."""
        with self._lock:
            if self._checked_rows is not None:  # parsed by the check at open, nothing written since
                return list(self._checked_rows)
            found = self._db.execute("SELECT row FROM results ORDER BY path").fetchall()
        return [ResultRow.from_csv_dict(json.loads(text)) for (text,) in found]

    def replace_rows(self, rows: list[ResultRow]) -> None:
        """Rewrite stored rows in place (e.g. relabelled after a threshold change), keeping the stamps."""
        with self._lock:
            self._checked_rows = None
            with _Transaction(self._db) as db:
                db.executemany(
                    "UPDATE results SET row = ? WHERE path = ?",
                    [(json.dumps(r.as_csv_dict()), _key(r.path)) for r in rows],
                )


def _set_aside(out_dir: Path, aside: str) -> None:
    """Rename the damaged state file to ``aside`` and remove its -wal and -shm, all relative to the opened
    ``.winclip`` (never by name: a name is resolved again at each use), regular files only."""
    folder = _state_folder(out_dir)
    try:
        os.replace(STATE_DB_NAME, aside, src_dir_fd=folder, dst_dir_fd=folder)
        for suffix in ("-wal", "-shm"):
            name = STATE_DB_NAME + suffix
            try:
                if stat.S_ISREG(os.lstat(name, dir_fd=folder).st_mode):
                    os.unlink(name, dir_fd=folder)
            except FileNotFoundError:
                pass
    finally:
        os.close(folder)


_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
_SCHEMA = {
    "meta": ("key", "value"),
    "results": ("path", "size", "mtime_ns", "sha256", "row"),
}


def refuse_link(path: Path) -> None:
    """SetupError when ``path`` is a symbolic link (a missing path is fine)."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise SetupError(LinkInOutputError(path).strerror)
    except FileNotFoundError:
        pass


def refuse_links(out_dir: Path) -> None:
    """Refuse (exit 2, naming it) a symbolic link anywhere winclip writes, deletes or locks in ``out_dir``:
    a (root) cron job must never follow one out of the output folder. ``out_dir`` itself may be a link."""
    layout = OutputLayout(out_dir)
    for path in (
        layout.state_dir,
        layout.lock,
        *(Path(f"{layout.state_db}{suffix}") for suffix in _SQLITE_SUFFIXES),
        *layout.own_folders,
        *layout.own_files,
    ):
        refuse_link(path)


def _key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _path(key: bytes) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


def clean_stale_temporaries(out_dir: Path) -> int:
    """Remove the temporary files (``.NAME.*.tmp``) of atomic writes that a killed run left behind.

    Only winclip's own files are touched: its folders, and temporaries of its top-level files,
    so an output folder shared with other tools keeps their files. Only regular files are removed, found
    by walking opened folders: a linked folder is never searched, a link named like a temporary is left.
    """
    removed = 0
    for name in OWN_FILES:
        removed += remove_stale_temporaries(out_dir, "", recursive=False, prefix=f".{name}.")
    for folder in OWN_FOLDERS:
        removed += remove_stale_temporaries(out_dir, folder, recursive=True)
    return removed
