"""``winclip watch``: score images the moment they arrive in a folder, with the model loaded once.

A watch is a scan that does not end. It holds OUT's lock for its whole life and keeps one
``ScanSession`` (engine, memory, threshold, run state, scores.csv) open, so its outputs are exactly
a scan's, and ``scan --incremental``, ``report`` and ``merge`` work on a watched OUT between watches.

    start:  list DIR, select what is new, changed or failed since the stored results (as
            ``scan --incremental`` does), and treat those files as just arrived
    loop:   list DIR again when events say something happened (watchdog: inotify, FSEvents...)
            or every --poll seconds; a file is scored once it is complete, then committed

When is a file complete? Cameras and copies write in pieces, so a file is scored only when

- an event said its writer closed it (close-write) or it was renamed into place, or
- its size and mtime stayed the same over ``settle`` seconds (two listings when polling),
  and no write was seen without its close.

A file whose result is stored with its current size and mtime is never scored again (a broken
file gets its error row once and is retried when it changes). Memory stays flat: what is kept
between listings is the last listing and the files waiting to be complete, nothing that grows with
time; every result is in the SQLite run state, which a restart (even after ``kill -9``) resumes from.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISREG
from typing import Any

from winclip_cli.errors import SetupError, WinclipError
from winclip_cli.io.outputs import ResultRow
from winclip_cli.io.state import OutputLock
from winclip_cli.jobs.allocator import release_kept_memory
from winclip_cli.jobs.decode import relative_name
from winclip_cli.jobs.kernel import Reporter
from winclip_cli.jobs.record import watch_totals
from winclip_cli.jobs.scan import ScanSession, ScanSpec, check_output_options, remove_outputs_of
from winclip_cli.options import DEFAULT_HOOK_TIMEOUT
from winclip_cli.wording import plural

DEFAULT_SETTLE = 0.5  # seconds a file must stay unchanged when no event says it is complete
SAFETY_LISTING = 30.0  # seconds between full listings when events are used (events can be lost)
WRITE_GRACE = 60.0  # a file seen written but never closed is scored once unchanged this long
EVENT_DEBOUNCE = 0.05  # after an event, wait this long for the rest of a burst before listing
SETTINGS_CHECK = 1.0  # seconds between looks at the memory, calibration and vocabulary files
MAX_FILES_PER_RUN = 256  # a large backlog is scored in parts, committing and checking for a stop in between

Stamp = tuple[int, int]  # (size, mtime_ns)
Listing = dict[str, tuple[Path, Stamp]]


@dataclass(frozen=True)
class WatchSpec:
    """``watch``: a scan's spec (always incremental), and how arrivals are noticed and reported."""

    scan: ScanSpec
    poll: float | None = None  # seconds between listings, polling only; None: events (polling if unavailable)
    settle: float | None = None  # None: the poll interval when polling, DEFAULT_SETTLE with events
    on_anomaly: str | None = None  # shell command run with each anomalous row as JSON on stdin
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT


@dataclass
class WatchResult:
    scored: int = 0
    anomalies: int = 0
    errors: int = 0
    batches: int = 0
    reloads: int = 0
    events: bool = False


# --------------------------------------------------------------------------------------------------- listing


def list_folder(directory: Path, out: Path) -> tuple[Listing, list[str]]:
    """The image files under ``directory`` with their (size, mtime), and the folders that could not be listed."""
    from winclip_cli.io.images import discover_images

    found = discover_images(directory, exclude=[out])
    listing: Listing = {}
    for path in found.files:
        try:
            stat = path.stat()
        except OSError:
            continue  # gone since it was listed, or unreadable: seen again at the next listing
        listing[relative_name(path, directory)] = (path, (stat.st_size, stat.st_mtime_ns))
    return listing, [f"{folder}: {reason}" for folder, reason in found.skipped_dirs]


@dataclass
class ArrivalTracker:
    """Which listed files are new or changed, and which of those are complete enough to score.

    Holds the last listing's stamps and the files waiting to be complete, nothing else: both are
    bounded by the folder's content, not by how long the watch runs.
    """

    settle: float
    write_grace: float = WRITE_GRACE
    stamps: dict[str, Stamp] = field(default_factory=dict)  # the last listing
    pending: dict[str, tuple[Stamp, float]] = field(default_factory=dict)  # name -> (stamp, unchanged since)
    last_observed: float = float("-inf")

    def expect(self, names: list[str], listing: Listing, now: float) -> None:
        """Mark listed files as arrived now (e.g. the backlog found at start)."""
        for name in names:
            if name in listing:
                self.pending[name] = (listing[name][1], now)

    def observe(
        self,
        listing: Listing,
        now: float,
        closed: set[str] | None = None,
        writing: set[str] | None = None,
        only: set[str] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Take a new listing; returns (files complete now, in name order; files gone since the last look).

        ``closed``: files an event said are complete (closed after writing, renamed into place);
        ``writing``: files written to since their last close, which are not complete, however still.
        ``only``: the listing covers just these names (the files events named, and the waiting ones,
        which must be among them); the rest of the folder is as last listed.
        """
        closed, writing = closed or set(), writing or set()
        self.last_observed = now
        looked = self.stamps.keys() if only is None else only
        gone = sorted(name for name in looked if name in self.stamps and name not in listing)
        for name, (_, stamp) in listing.items():
            if self.stamps.get(name) != stamp:
                seen = self.pending.get(name)
                if seen is None or seen[0] != stamp:
                    self.pending[name] = (stamp, now)
        if only is None:
            self.stamps = {name: stamp for name, (_, stamp) in listing.items()}
        else:
            for name in gone:
                del self.stamps[name]
            self.stamps.update((name, stamp) for name, (_, stamp) in listing.items())
        ready = []
        for name, (stamp, since) in list(self.pending.items()):
            if name not in listing:
                if only is None or name in only:
                    del self.pending[name]  # deleted or renamed away before it was complete
                continue
            if listing[name][1] != stamp:
                continue
            unchanged = now - since
            if name in writing:
                complete = unchanged >= self.write_grace  # a writer that never closes: give up waiting, once
            else:
                complete = name in closed or unchanged >= self.settle
            if complete:
                ready.append(name)
                del self.pending[name]
        return sorted(ready), gone

    def next_due(self, now: float) -> float | None:
        """When the next waiting file will have been unchanged for ``settle`` seconds. Files that were due
        at the last look and still not complete (being written) wait for an event or the next listing."""
        due = [since + self.settle for _, since in self.pending.values() if since + self.settle > self.last_observed]
        return max(now, min(due)) if due else None


# ---------------------------------------------------------------------------------------------------- events


class FolderEvents:
    """File-system events under the watched folder (watchdog), reduced to what the watch needs: a
    wake-up, which files were closed after writing or renamed into place, and which are being written."""

    def __init__(self, directory: Path, out: Path) -> None:
        self.directory = directory.resolve()
        self.out = out.resolve()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._closed: set[str] = set()
        self._writing: set[str] = set()
        self._touched: set[str] = set()  # files named by events since the last look
        self._relist = False  # a folder changed: list the whole folder
        self._observer: Any = None  # a watchdog Observer once started

    def start(self) -> str:
        """Start watching; returns '' or why events are not available (the watch then polls)."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return "the watchdog package is not installed"
        events = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                events._on_event(event)

        try:
            observer = Observer()
            observer.schedule(Handler(), str(self.directory), recursive=True)
            observer.start()
        except Exception as err:  # e.g. the inotify watch limit (fs.inotify.max_user_watches)
            return f"file-system events are not available ({type(err).__name__}: {err})"
        self._observer = observer
        return ""

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def take(self) -> tuple[set[str], set[str], set[str] | None]:
        """(files closed or renamed in since the last call, files being written now, files events
        named since the last call, or None when a folder changed and the whole folder must be listed)."""
        with self._lock:
            closed, self._closed = self._closed, set()
            touched, self._touched = self._touched, set()
            relist, self._relist = self._relist, False
            return closed, set(self._writing), None if relist else touched

    def forget(self, names: set[str]) -> None:
        """Drop files that are no longer listed (so the sets stay bounded by what exists)."""
        with self._lock:
            self._writing -= names

    def _name(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        resolved = Path(path)
        if resolved.is_relative_to(self.out):
            return None  # our own outputs (OUT inside DIR) must not wake the watch
        try:
            return resolved.relative_to(self.directory).as_posix()
        except ValueError:
            return None

    def _on_event(self, event) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return  # reads, ours included: nothing changed
        src = self._name(event.src_path)
        dest = self._name(event.dest_path) if kind == "moved" and event.dest_path else None
        if src is None and dest is None:
            return
        with self._lock:
            if event.is_directory:
                if kind != "modified":  # a folder created, moved or deleted: its files with it
                    self._relist = True
            else:
                self._touched.update(name for name in (src, dest) if name is not None)
                if kind == "modified" and src is not None:
                    self._writing.add(src)  # written to: complete only once closed
                    self._closed.discard(src)
                elif kind == "closed" and src is not None:
                    self._writing.discard(src)
                    self._closed.add(src)
                elif kind in ("moved", "deleted") and src is not None:
                    self._writing.discard(src)
                    self._closed.discard(src)
                if dest is not None:  # a rename is atomic: the file is complete under its new name
                    self._writing.discard(dest)
                    self._closed.add(dest)
        self.wake.set()


# ------------------------------------------------------------------------------------------------------ hook


class AnomalyHook:
    """Runs ``command`` (a shell command line) for each anomalous row, the row as JSON on stdin, one at
    a time in a thread of its own so that a slow hook never holds up scoring. A hook that fails or
    runs past ``timeout`` (its whole process group is killed) is reported, never fatal.

    At most ``max_waiting`` rows wait; a row beyond is dropped and said so. ``close`` never blocks longer
    than it is told, whatever the queue holds, and nothing one row holds (a name that is not UTF-8, a
    hook printing gigabytes) can stop the thread that sends the later ones."""

    def __init__(self, command: str, timeout: float, reporter: Reporter, max_waiting: int = 1000) -> None:
        self.command = command
        self.timeout = timeout
        self.reporter = reporter
        self.failures = 0
        self.dropped = 0
        self._queue: queue.Queue[ResultRow | None] = queue.Queue(maxsize=max_waiting)
        self._stop_by: float | None = None  # monotonic deadline set by close()
        self._thread = threading.Thread(target=self._run, name="winclip-hook", daemon=True)
        self._thread.start()

    def submit(self, row: ResultRow) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.failures += 1
            self.dropped += 1
            self.reporter.warn(f"--on-anomaly: {row.path} not sent, too many hooks waiting")

    def close(self, wait: float) -> None:
        """Let the waiting hooks run for at most ``wait`` seconds; say how many were left."""
        deadline = time.monotonic() + wait
        self._stop_by = deadline
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread stops by the deadline instead: close() must never block on a full queue
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        left = self._queue.qsize()
        if self._thread.is_alive() or (left and not self._stop_mark_only()):
            left = max(1, left)  # the one running, or those waiting behind the end mark
            self.reporter.warn(f"--on-anomaly: stopping with about {left} anomalous rows not sent")

    def _stop_mark_only(self) -> bool:
        try:
            return self._queue.qsize() == 1 and self._queue.queue[0] is None
        except IndexError:
            return True

    def _run(self) -> None:
        while True:
            if self._stop_by is not None and time.monotonic() >= self._stop_by:
                return
            try:
                row = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if row is None:
                return
            try:
                problem = run_hook(self.command, row, self.timeout)
            except Exception as err:  # this row's problem only: the later anomalies must still be sent
                problem = f"cannot run: {type(err).__name__}: {str(err)[:160]}"
            if problem:
                self.failures += 1
                self.reporter.warn(f"--on-anomaly for {row.path}: {problem}")


_HOOK_STDERR_TAIL = 4096  # bytes of a hook's stderr kept for its error line; the rest is read and dropped


_HOOK_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def hook_text(value: str) -> str:
    """``value`` for a hook's environment: control characters (newline, escape...) written as ``\\xNN``
    (the exact name is in the JSON on the hook's stdin)."""
    return value.translate(_HOOK_CONTROLS)


def run_hook(command: str, row: ResultRow, timeout: float) -> str:
    """Run ``command`` with ``row`` as JSON on stdin; returns '' or what went wrong.

    The hook's stdout is discarded and only the last 4 KB of its stderr kept, so a hook printing gigabytes
    costs no memory; it is killed (its whole process group) ``timeout`` seconds after it started."""
    env = {
        **os.environ,
        # os.fsencode (surrogateescape) gives a name that is not UTF-8 back its own bytes; control
        # characters as \xNN: a newline in a name would otherwise add a header to `mail -s "$WINCLIP_PATH"`
        "WINCLIP_PATH": hook_text(row.path),
        "WINCLIP_SCORE": "" if row.score is None else f"{row.score:.6f}",
        "WINCLIP_LABEL": row.label,
        "WINCLIP_HEATMAP": hook_text(row.heatmap),
    }
    payload = (json.dumps(row.as_json_dict(), ensure_ascii=False) + "\n").encode("utf-8")
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # never mixed into the --json stream on our stdout, never buffered
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group, so a timeout kills what it started too
        )
    except OSError as err:
        return f"cannot run: {err.strerror or err}"
    try:
        tail = _feed_and_drain(proc, payload, deadline)
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        return f"timed out after {timeout:g} s (killed)"
    finally:
        for stream in (proc.stdin, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
    if proc.returncode != 0:
        # only printable characters of the hook's last line: its output could hold terminal escape codes
        lines = [
            "".join(ch for ch in line if ch.isprintable()).strip()
            for line in tail.decode("utf-8", "replace").splitlines()
        ]
        last = [line for line in lines if line][-1:]
        return f"exit code {proc.returncode}" + (f": {last[0][:200]}" if last else "")
    return ""


def _feed_and_drain(proc: subprocess.Popen, payload: bytes, deadline: float) -> bytes:
    """Write ``payload`` to the hook's stdin and read its stderr until it closes, keeping only the tail;
    TimeoutExpired at ``deadline``."""
    import selectors

    assert proc.stdin is not None and proc.stderr is not None
    os.set_blocking(proc.stdin.fileno(), False)
    pending = memoryview(payload)
    tail = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        if pending:
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        open_streams = 2 if pending else 1
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            for key, _ in selector.select(remaining):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending) :]
                    except BrokenPipeError:
                        pending = pending[:0]  # the hook does not read its input: its choice
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                        open_streams -= 1
                else:
                    chunk = os.read(proc.stderr.fileno(), 1 << 16)
                    if not chunk:
                        selector.unregister(proc.stderr)
                        open_streams -= 1
                    else:
                        tail = (tail + chunk)[-_HOOK_STDERR_TAIL:]
    return tail


# ------------------------------------------------------------------------------------------------------ watch


class ReloadFlag:
    """SIGHUP asks the watch to re-read its memory, calibration and vocabulary."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> Callable[[], None]:
        """Install the handler (main thread, POSIX); returns what restores the previous one."""
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGHUP)

        def handler(signum, frame) -> None:
            self.requested = True

        signal.signal(signal.SIGHUP, handler)

        def restore() -> None:
            signal.signal(signal.SIGHUP, previous)

        return restore


def _file_stamp(path: Path | None) -> Stamp | None:
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def run_watch(options: WatchSpec, reporter: Reporter, should_stop: Callable[[], bool] = lambda: False) -> WatchResult:
    """Watch ``options.scan.directory`` until ``should_stop()``; every result is committed as it is made."""
    scan = options.scan
    if not scan.incremental:  # a watch keeps what is stored and adds to it
        options = replace(options, scan=replace(scan, incremental=True))
        scan = options.scan
    check_output_options(scan)
    if not scan.directory.is_dir():
        raise SetupError(f"watch needs a folder, and {scan.directory} is not one")
    scan.out.mkdir(parents=True, exist_ok=True)
    result = WatchResult()
    reload = ReloadFlag()
    restore_hup = reload.install()
    try:
        with OutputLock(scan.out, "watch") as lock:  # held across re-opened sessions: no scan slips in between
            if lock.previous_holder:
                reporter.warn(f"took over a stale lock in {scan.out} ({lock.previous_holder})")
            _Watch(options, reporter, should_stop, reload, result).run()
    finally:
        restore_hup()
    return result


class _Watch:
    def __init__(
        self,
        options: WatchSpec,
        reporter: Reporter,
        should_stop: Callable[[], bool],
        reload: ReloadFlag,
        result: WatchResult,
    ) -> None:
        self.options = options
        self.scan = options.scan
        self.reporter = reporter
        self.should_stop = should_stop
        self.reload = reload
        self.result = result
        self.events: FolderEvents | None = None
        self.hook: AnomalyHook | None = None
        self.problems: list[str] = []  # what the last listing could not see (warned once)
        self.settings_files = [p for p in (self.scan.refs, self.scan.calibration, self.scan.text.prompts) if p]

    def run(self) -> None:
        options, scan = self.options, self.scan
        if options.poll is None:
            self.events = FolderEvents(scan.directory, scan.out)
            why_not = self.events.start()
            if why_not:
                self.reporter.warn(f"{why_not}: polling the folder every {DEFAULT_SETTLE:g} s instead")
                self.events = None
        self.result.events = self.events is not None
        poll = options.poll if options.poll is not None else (SAFETY_LISTING if self.events else DEFAULT_SETTLE)
        settle = options.settle if options.settle is not None else (poll if options.poll else DEFAULT_SETTLE)
        self.tracker = ArrivalTracker(settle=settle)
        if options.on_anomaly:
            self.hook = AnomalyHook(options.on_anomaly, options.hook_timeout, self.reporter)
        self.session = ScanSession(scan, self.reporter, hold_lock=False)
        try:
            self.session.open()
            self.settings_seen = [_file_stamp(p) for p in self.settings_files]
            self.settings_changed_since: float | None = None
            self._settings_candidate: list[Stamp | None] = []
            self.settings_due = False
            self.next_settings_check = 0.0
            self._start_session()
            how = "file-system events" if self.events else f"polling every {poll:g} s"
            self.reporter.info(f"watching {scan.directory} ({how}); stop with Ctrl-C or SIGTERM")
            next_listing = time.monotonic() + poll
            while not self.should_stop():
                self._wait(next_listing)
                if self.should_stop():
                    break
                if self.reload.requested or self.settings_due:
                    self.reload.requested = self.settings_due = False
                    self._reload()
                full = time.monotonic() >= next_listing
                self._tick(time.monotonic(), full)
                if full:
                    next_listing = time.monotonic() + poll
        finally:
            if self.events is not None:
                self.events.stop()
            if self.hook is not None:
                self.hook.close(wait=options.hook_timeout)
            try:
                self._finish_run_info()
            finally:
                self.session.close()

    # ----------------------------------------------------------------------------------------- steps

    def _start_session(self) -> None:
        """What a ``scan --incremental`` would score now is treated as just arrived (it may still be written)."""
        listing = self._list()
        if listing is None:
            raise SetupError(f"cannot list {self.scan.directory}")
        inputs = sorted(((path, name) for name, (path, _) in listing.items()), key=lambda entry: entry[1])
        todo, _ = self.session.start(inputs, listing_incomplete=bool(self.problems))
        now = time.monotonic()
        self.tracker.stamps = {name: stamp for name, (_, stamp) in listing.items()}
        self.tracker.pending.clear()
        self.tracker.expect([name for _, name in todo], listing, now)

    def _wait(self, next_listing: float) -> None:
        """Sleep until the next listing is due, a waiting file may be complete, or an event arrives."""
        while not self.should_stop() and not self.reload.requested:
            now = time.monotonic()
            if self.settings_files and now >= self.next_settings_check:
                self.next_settings_check = now + SETTINGS_CHECK
                if self._settings_changed(now):
                    self.settings_due = True
                    return
            due = self.tracker.next_due(now)
            deadline = next_listing if due is None else min(next_listing, due)
            if now >= deadline:
                return
            step = min(deadline - now, 0.1)  # short steps: a stop request is noticed at once
            if self.events is not None:
                if self.events.wake.wait(step):
                    time.sleep(EVENT_DEBOUNCE)  # let the rest of a burst arrive: fewer, fuller batches
                    self.events.wake.clear()
                    return
            else:
                time.sleep(step)

    def _list(self) -> Listing | None:
        try:
            listing, problems = list_folder(self.scan.directory, self.scan.out)
        except WinclipError as err:  # the folder itself is gone (an unmounted share): wait for it
            self._say_problems([str(err)])
            return None
        self._say_problems(problems)
        return listing

    def _say_problems(self, problems: list[str]) -> None:
        if problems != self.problems:
            for problem in problems:
                self.reporter.warn(f"cannot list {problem}")
            if self.problems and not problems:
                self.reporter.info(f"{self.scan.directory} can be listed again")
        self.problems = problems

    def _tick(self, now: float, full: bool) -> None:
        """Look at the folder: all of it (``full``, or when polling), else only the files events named
        and the waiting ones, which keeps a look cheap in a folder of many files."""
        closed: set[str] = set()
        writing: set[str] = set()
        touched: set[str] | None = None
        if self.events is not None:
            closed, writing, touched = self.events.take()
        only = None if full or touched is None else touched | self.tracker.pending.keys()
        listing = self._list() if only is None else self._stat_some(only)
        if listing is None:
            return
        ready, gone = self.tracker.observe(listing, now, closed, writing, only=only)
        if self.events is not None and gone:
            self.events.forget(set(gone))
        if gone and not self.problems:
            self._forget(gone)
        if ready:
            self._score([(listing[name][0], name) for name in ready])

    def _stat_some(self, names: set[str]) -> Listing:
        """The listing entries of these files, with the rules of a full listing (images, no hidden parts)."""
        from winclip_cli.io.images import IMAGE_EXTENSIONS

        directory = self.scan.directory
        listing: Listing = {}
        for name in names:
            path = directory / name
            if any(part.startswith(".") for part in Path(name).parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            if S_ISREG(stat.st_mode):
                listing[name] = (path, (stat.st_size, stat.st_mtime_ns))
        return listing

    def _forget(self, gone: list[str]) -> None:
        """Files that left the folder leave scores.csv too, as with ``scan --incremental``."""
        state = self.session.state
        assert state is not None
        stored = list(state.stamps_of(gone))
        if not stored:
            return
        state.forget(stored)
        remove_outputs_of(self.scan.out, [(name, "") for name in stored])
        self.session.rewrite_csv()
        self.reporter.info(f"{plural(len(stored), 'file')} gone: their rows and heatmaps are removed")

    def _score(self, ready: list[tuple[Path, str]]) -> None:
        """Score the complete files whose stored result is not for their current content."""
        state = self.session.state
        assert state is not None
        stored = state.stamps_of([name for _, name in ready])
        todo = []
        for path, name in ready:
            known = stored.get(name)
            current = self.tracker.stamps.get(name)
            if known is not None and current is not None and (known.size, known.mtime_ns) == current:
                continue  # already scored as it is now (a restart, or a file renamed back)
            todo.append((path, name))
        for start in range(0, len(todo), MAX_FILES_PER_RUN):
            if self.should_stop():
                return  # the rest is found again by the next start
            part = todo[start : start + MAX_FILES_PER_RUN]
            replaced = any(name in stored for _, name in part)
            started = time.monotonic()
            summary = self.session.score(part, self.should_stop, on_committed=self._committed)
            # scores.csv got the new rows appended; a file scored before also left its old row there
            if replaced:
                self.session.rewrite_csv()
            else:
                self.session.mark_csv_current()
            result = self.result
            result.batches += 1
            result.scored += summary.scored
            result.anomalies += summary.anomalies
            result.errors += summary.errors
            # counted as the final "watch stopped" line counts: these lines' figures add up to its figures
            self.reporter.info(
                f"{summary.scored} scored, {summary.anomalies} anomalous, {plural(summary.errors, 'error')} "
                f"({plural(summary.images, 'file')}, {time.monotonic() - started:.2f} s)"
            )
        if todo:
            release_kept_memory()  # between bursts the memory the model kept goes back (jobs/allocator.py)

    def _committed(self, rows: list[ResultRow]) -> None:
        if self.hook is None:
            return
        for row in rows:
            if row.status == "ok" and row.label == "anomalous":
                self.hook.submit(row)

    # ---------------------------------------------------------------------------------------- reload

    def _settings_changed(self, now: float) -> bool:
        """The memory, calibration or vocabulary file changed, and was the same at the next look."""
        current = [_file_stamp(p) for p in self.settings_files]
        if current == self.settings_seen:
            self.settings_changed_since = None
            return False
        if self.settings_changed_since is None or current != self._settings_candidate:
            self._settings_candidate = current
            self.settings_changed_since = now
            return False
        return now > self.settings_changed_since

    def _reload(self) -> None:
        """Open a new session with the same model (memory, calibration and vocabulary read again);
        keep the current one when the new files cannot be used."""
        self.settings_seen = [_file_stamp(p) for p in self.settings_files]
        self.settings_changed_since = None
        session = ScanSession(self.scan, self.reporter, hold_lock=False, backbone=self.session.engine.backbone)
        try:
            session.open()
        except WinclipError as err:
            session.close()
            self.reporter.warn(f"cannot reload ({err}); going on with the current memory and threshold")
            return
        self.session.close()
        self.session = session
        self.result.reloads += 1
        self.reporter.info("reloaded the memory, calibration and vocabulary")
        self._start_session()

    def _finish_run_info(self) -> None:
        if self.session.state is None or not self.session.run_info:
            return
        result = self.result
        self.session.run_info.update(watch_totals(result.scored, result.anomalies, result.errors))
        self.session.write_run_info()
