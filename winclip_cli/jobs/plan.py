"""What a scan will do, decided before torch is imported: a run with nothing to score ends here.

A cron line (``scan --incremental``) that finds no new or changed file, or a shard that holds no
file, needs no model: importing torch and open_clip and loading the weights cost seconds to tens
of seconds, the decision milliseconds. This module decides it from the options, the listing of
the input and the run state in ``OUT/.winclip/``, and then brings ``scores.csv`` and ``run.json``
up to date itself. Whenever it cannot be sure, it answers "score" and the ordinary job runs.

It imports neither torch nor open_clip (``tests/cli/test_first_minute.py`` checks it), and runs
with OUT's lock held (``cli/preflight.py``'s ``OutputClaim``).

How it can be sure: after a scan that completed without warnings, the command line records in the
run state a key of every option and input file that decides the stored configuration (``remember``),
with that configuration and the stamp of the ``scores.csv`` it left. A later run with the same key,
the same stored configuration, an untouched ``scores.csv`` and every listed file unchanged since its
row (size and mtime, as ``--incremental`` compares them) would score nothing: it is answered here.
The threshold is not part of the key: ``--threshold VALUE`` only relabels the stored rows, which
is done here as the scan would do it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winclip_cli import __version__
from winclip_cli.io.layout import OutputLayout
from winclip_cli.io.model_files import is_config_path, weights_request
from winclip_cli.options import Precision

if TYPE_CHECKING:
    from winclip_cli.spec import ScanSpec

REQUEST_META = "request"  # the run state's meta entry written by ``remember``


def shard_of(relpath: str, count: int) -> int:
    """1-based shard of a file: a hash of its relative path, so it never moves when files are added."""
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def seconds_since_process_start() -> float | None:
    """Wall time since this process started (interpreter start-up and every import included), from the
    kernel's record of the start (Linux); None where that is not available."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot, in ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------ request


@dataclass(frozen=True)
class ScanRequest:
    """What of a scan's spec decides its outputs, in plain values (compared and hashed across runs)."""

    directory: Path
    out: Path
    model: str
    weights: str | None
    device: str
    precision: str
    scales: tuple[int, ...]
    class_name: str
    threshold: float | None  # --threshold VALUE, or None for auto
    refs: Path | None
    calibration: Path | None
    prompts: Path | None
    tile: int | str | None
    tile_overlap: float
    max_pixels: int
    heatmaps: str
    save_maps: bool
    incremental: bool
    shard: tuple[int, int] | None
    mode: str = "zero-shot"  # ScoringMode's value
    mutual: tuple[int, str] | None = None  # mode mutual: (--pool-size, --layers)


def request_of(spec: ScanSpec) -> ScanRequest:
    """The request of a scan from its spec (as the command line parsed and checked it)."""
    return ScanRequest(
        directory=spec.directory,
        out=spec.out,
        model=spec.model.model,
        weights=spec.model.weights,
        device=str(spec.model.device),
        precision=spec.model.precision.value,
        scales=tuple(spec.model.scales),
        class_name=spec.text.class_name,
        threshold=spec.threshold.value,
        refs=spec.refs,
        calibration=spec.calibration,
        prompts=spec.text.prompts,
        tile=spec.inputs.tiling.size,
        tile_overlap=spec.inputs.tiling.overlap,
        max_pixels=spec.inputs.max_pixels,
        heatmaps=spec.output.heatmaps.value,
        save_maps=spec.output.save_maps,
        incremental=spec.incremental,
        shard=spec.shard,
        mode=spec.mode.value,
        mutual=(spec.mutual.pool_size.value, str(spec.mutual.layers)) if spec.mutual is not None else None,
    )


def describe_timing(run_info: dict[str, Any], scored: int) -> str:
    """The summary's wall time: the whole run, then its start-up, the model's loading and the scoring."""
    process, startup = run_info.get("process_seconds"), run_info.get("startup_seconds")
    total = process if isinstance(process, int | float) else run_info.get("seconds") or 0.0
    parts = [f"start-up {startup:.1f} s"] if isinstance(startup, int | float) else []
    if not run_info.get("model_loaded", True):
        parts.append("the model was not loaded")
    else:
        scan_seconds = float(run_info.get("scan_seconds") or 0.0)
        rate = scored / scan_seconds if scan_seconds > 0 else 0.0
        parts.append(f"model {float(run_info.get('model_seconds') or 0.0):.1f} s")
        parts.append(f"scoring {scan_seconds:.1f} s, {rate:.2f} images/s")
    return f"{total:.1f} s ({', '.join(parts)})"


def _file_identity(path: Path | str | None) -> list[Any] | None:
    """A file named by an option, by its resolved path, size and mtime: a changed file changes the key."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return [str(path), None]
    return [os.path.realpath(path), info.st_size, info.st_mtime_ns]


def request_key(request: ScanRequest) -> str | None:
    """A hash of everything that decides the stored configuration and run.json, except the threshold;
    None when the configuration depends on the machine (``--precision auto`` picks by the device)."""
    if request.precision == Precision.AUTO.value:
        return None
    weights, origin = weights_request(request.weights)
    weights_path = Path(weights).expanduser()
    parts = {
        "version": __version__,
        "input": os.path.realpath(request.directory),
        "model": [request.model, _file_identity(request.model) if is_config_path(request.model) else None],
        "weights": [weights, origin, _file_identity(weights_path) if weights_path.is_file() else None],
        "device": request.device,
        "precision": request.precision,
        "scales": list(request.scales),
        "class_name": request.class_name,
        "refs": _file_identity(request.refs),
        "calibration": _file_identity(request.calibration),
        "prompts": _file_identity(request.prompts),
        "tile": request.tile,
        "tile_overlap": request.tile_overlap if request.tile is not None else None,
        "max_pixels": request.max_pixels,
        "heatmaps": request.heatmaps,
        "save_maps": request.save_maps,
        "incremental": request.incremental,
        "shard": list(request.shard) if request.shard else None,
        "mode": request.mode,
        "mutual": list(request.mutual) if request.mutual is not None else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- result


@dataclass
class QuickSummary:
    images: int = 0  # scored now: none
    scored: int = 0


@dataclass
class NothingToScore:
    """The answer of a run that needed no model: the figures the command line prints, as ScanResult has them."""

    total_rows: int
    skipped_unchanged: int
    seconds: float
    total_anomalies: int = 0
    total_normal: int = 0
    total_errors: int = 0
    total_unlabelled: int = 0  # scored rows without a label (mode mutual with no threshold)
    interrupted: bool = False
    unlisted: list[str] = field(default_factory=list)
    summary: QuickSummary = field(default_factory=QuickSummary)
    run_info: dict[str, Any] = field(default_factory=dict)
    model_loaded: bool = False


# ---------------------------------------------------------------------------------------------- decision


def _listed_inputs(request: ScanRequest) -> list[tuple[Path, str]] | None:
    """(path, name) of the files the scan would consider, this shard only; None when a folder could
    not be listed (the job reports that) or the input is a single file."""
    from winclip_cli.io.images import discover_images
    from winclip_cli.io.layout import relative_name

    directory = request.directory
    if not directory.is_dir():
        return None
    own = list(OutputLayout(request.out).own_folders)
    real_input = directory.resolve()
    if any(real_input.is_relative_to(folder.resolve()) for folder in own):
        return None  # the job refuses it with its message
    found = discover_images(directory, exclude=[request.out, *own])
    if found.skipped_dirs:
        return None
    inputs = [(path, relative_name(path, directory)) for path in found.files]
    if request.shard is not None:
        k, n = request.shard
        inputs = [(path, name) for path, name in inputs if shard_of(name, n) == k]
    return inputs


def _stored_request(out: Path) -> tuple[dict[str, Any], Any, Any] | None:
    """(remembered request, stored config, stored csv stamp), read from the run state without changing it."""
    database = OutputLayout(out).state_db
    if not database.is_file() or database.is_symlink():
        return None
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            found = dict(db.execute("SELECT key, value FROM meta WHERE key IN (?, 'config', 'csv')", (REQUEST_META,)))
        finally:
            db.close()
        values = {key: json.loads(text) for key, text in found.items()}
    except (sqlite3.Error, ValueError, TypeError, RecursionError):
        return None
    remembered = values.get(REQUEST_META)
    if not isinstance(remembered, dict):
        return None
    return remembered, values.get("config"), values.get("csv")


def other_input(request: ScanRequest) -> str | None:
    """The input folder whose results OUT holds, when it is not this scan's (None: the same, or none).
    OUT belongs to one input: its rows are replaced, and that input's heatmaps stay behind."""
    database = OutputLayout(request.out).state_db
    if not database.is_file() or database.is_symlink():
        return None
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            found = db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
            rows = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        finally:
            db.close()
        config = json.loads(found[0]) if found else None
    except (sqlite3.Error, ValueError, TypeError, RecursionError):
        return None
    if not isinstance(config, dict) or not rows:
        return None
    stored = config.get("input")
    if not isinstance(stored, str) or stored == str(request.directory.resolve()):
        return None
    return stored


def _stored_rows(out: Path) -> int:
    """How many rows the run state holds (0 without a state); -1 when it cannot be read (the job decides)."""
    database = OutputLayout(out).state_db
    if not database.exists():
        return 0
    if database.is_symlink():
        return -1
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        finally:
            db.close()
    except (sqlite3.Error, TypeError, ValueError):
        return -1


def stamp_of(path: Path) -> list[int] | None:
    """(size, mtime) of a file, as the run state records scores.csv's; None when it is missing."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def has_current_header(path: Path) -> bool:
    """Whether the CSV starts with this version's columns: rows are only ever appended under them."""
    from winclip_cli.io.outputs import CSV_COLUMNS
    from winclip_cli.io.safe_fs import open_confined

    header = ",".join(CSV_COLUMNS).encode("utf-8")
    try:  # through OUT's opened folders, never following a link or waiting on a FIFO (io/safe_fs.py)
        with open_confined(path) as handle:
            return handle.readline(len(header) + 3).rstrip(b"\r\n") == header
    except (OSError, ValueError):
        return False


_RUN_JSON_LIMIT = 16 << 20  # a run.json is a few KB


def _read_run_json(out: Path) -> dict[str, Any] | None:
    from winclip_cli.io.safe_fs import read_confined_bytes

    try:  # through OUT's opened folders, as merge reads it
        info = json.loads(read_confined_bytes(OutputLayout(out).run_json, _RUN_JSON_LIMIT).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) else None


def relabelled(row: Any, threshold: float, source: str) -> Any:
    """A stored row under another threshold, exactly as the scan relabels it."""
    from winclip_cli.io.outputs import label_of

    if row.status != "ok" or row.score is None:
        return replace(row, threshold_source=source)
    return replace(row, threshold=threshold, label=label_of(row.score, threshold), threshold_source=source)


def without_model(request: ScanRequest, reporter: Any, started: float) -> NothingToScore | None:
    """The run's result when it has nothing to score (outputs brought up to date here), else None.

    ``started`` is the ``time.perf_counter()`` at which the command began checking its arguments.
    """
    if not request.incremental and request.shard is None:
        return None
    inputs = _listed_inputs(request)
    if inputs is None:
        return None
    if not inputs and request.shard is not None and not _stored_rows(request.out):
        return _empty_shard(request, reporter, started)
    if not request.incremental:
        return None  # without --incremental every file is scored again, by request
    key = request_key(request)
    stored = _stored_request(request.out)
    if stored is None:
        return None
    remembered, config, csv_stamp = stored
    layout = OutputLayout(request.out)
    if (
        key is None
        or remembered.get("key") != key
        or remembered.get("config") != config
        or config is None
        or remembered.get("csv") != csv_stamp
        or csv_stamp != stamp_of(layout.scores_csv)
        or not has_current_header(layout.scores_csv)
    ):
        return None
    requested = request.threshold
    if request.threshold != remembered.get("threshold") and requested is None:
        return None  # back to 'auto' from a number: the calibration decides, which needs the model
    run_info = _read_run_json(request.out)
    if run_info is None:
        return None

    from winclip_cli.io.state import FileStamp, RunState

    state = RunState(request.out)
    try:
        if state.recovered_from:
            reporter.warn(
                f"the run state was damaged ({state.damage}) and was moved to {state.recovered_from}; starting afresh"
            )
            return None
        rows = state.rows()
        names = {name for _, name in inputs}
        if any(row.path not in names or row.status == "error" or row.error for row in rows):
            return None  # rows to remove, or files to try again: the job does both
        stamps = state.stamps()
        for path, name in inputs:
            known = stamps.get(name)
            try:
                info = path.stat()
            except OSError:
                return None
            if known is None or not known.same_file(FileStamp(info.st_size, info.st_mtime_ns)):
                return None  # something to score
        threshold, source = run_info.get("threshold"), run_info.get("threshold_source")
        if request.threshold != remembered.get("threshold"):
            assert requested is not None
            if request.mutual is not None:
                return None  # mutual rows are labelled on their raw score: the job relabels them
            threshold, source = requested, "--threshold"
            new_rows = [relabelled(row, requested, source) for row in rows]
            if any(a.as_csv_dict() != b.as_csv_dict() for a, b in zip(rows, new_rows, strict=True)):
                reporter.info(f"threshold is now {requested:g} ({source}): stored rows relabelled")
                state.replace_rows(new_rows)
                from winclip_cli.io.outputs import write_results_csv_atomic

                write_results_csv_atomic(layout.scores_csv, new_rows)
                state.set_meta("csv", stamp_of(layout.scores_csv))
            rows = new_rows
        shard = f", shard {request.shard[0]}/{request.shard[1]}" if request.shard else ""
        reporter.info(
            f"winclip {__version__}: 0 images to score ({len(inputs)} unchanged){shard}; "
            "nothing new since the last run: the model was not loaded"
        )
        result = _finish(request, reporter, started, run_info, rows, unchanged=len(inputs))
        result.run_info.update(threshold=threshold, threshold_source=source)
        _write_run_json(request.out, result.run_info)
        state.set_meta(
            REQUEST_META,
            {**remembered, "threshold": request.threshold, "csv": state.meta("csv")},
        )
        return result
    finally:
        state.close()


def _empty_shard(request: ScanRequest, reporter: Any, started: float) -> NothingToScore:
    """A shard that holds no file, in a folder that holds no rows: an empty scores.csv and a run.json
    that says no model was loaded (``merge`` compares the configuration of shards that hold rows).
    The run state is left as it is: the first run of this shard with files starts it."""
    from winclip_cli.io.outputs import write_results_csv_atomic

    assert request.shard is not None
    k, n = request.shard
    reporter.info(
        f"winclip {__version__}: shard {k}/{n} holds no file of {request.directory}: the model was not loaded"
    )
    write_results_csv_atomic(OutputLayout(request.out).scores_csv, [])
    weights, _ = weights_request(request.weights)
    run_info = {
        "tool": "winclip",
        "version": __version__,
        "input": str(request.directory),
        "class_name": request.class_name,
        "architecture": request.model,
        "weights": weights,
        "incremental": request.incremental,
        "heatmaps": request.heatmaps,
        "shard": f"{k}/{n}",
    }
    result = _finish(request, reporter, started, run_info, [], unchanged=0)
    _write_run_json(request.out, result.run_info)
    return result


def _finish(
    request: ScanRequest, reporter: Any, started: float, run_info: dict[str, Any], rows: list, unchanged: int
) -> NothingToScore:
    seconds = time.perf_counter() - started
    process = seconds_since_process_start()
    startup = process - seconds if process is not None else None
    from winclip_cli.jobs.record import run_timing

    anomalies = sum(row.label == "anomalous" for row in rows)
    errors = sum(bool(row.error) for row in rows)
    info = dict(run_info)
    info.update(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
        **run_timing(startup, seconds, 0.0, model_loaded=False),
        setup_seconds=round(seconds, 3),
        scan_seconds=0.0,
        images=0,
        scored=0,
        anomalies=0,
        errors=0,
        unchanged=unchanged,
        total_rows=len(rows),
        total_anomalies=anomalies,
        total_errors=errors,
        interrupted=False,
        unlisted_dirs=[],
    )
    return NothingToScore(
        total_rows=len(rows),
        skipped_unchanged=unchanged,
        seconds=seconds,
        total_anomalies=anomalies,
        total_normal=sum(row.label == "normal" for row in rows),
        total_errors=errors,
        total_unlabelled=sum(row.status == "ok" and not row.label for row in rows),
        run_info=info,
    )


def _write_run_json(out: Path, info: dict[str, Any]) -> None:
    from winclip_cli.io.outputs import write_text_atomic

    write_text_atomic(OutputLayout(out).run_json, json.dumps(info, indent=2) + "\n")


def remember(request: ScanRequest) -> None:
    """After a scan that completed without warnings: record what lets the next run with the same options
    decide without the model that it has nothing to score."""
    key = request_key(request)
    if key is None or not OutputLayout(request.out).state_db.is_file():
        return
    from winclip_cli.errors import WinclipError
    from winclip_cli.io.state import RunState

    try:
        state = RunState(request.out)
    except (OSError, sqlite3.Error, WinclipError):
        return  # only an optimisation: the next run then takes the ordinary path
    try:
        if state.recovered_from:
            return
        state.set_meta(
            REQUEST_META,
            {"key": key, "config": state.config(), "csv": state.meta("csv"), "threshold": request.threshold},
        )
    except (OSError, sqlite3.Error):
        pass
    finally:
        state.close()
