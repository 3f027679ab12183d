"""A whole ``winclip scan`` run: lock, run state, incremental selection, sharding, outputs.

Sits between the CLI (which parses and prints) and the pipeline (which streams tensors). Talks to
the user only through a ``Reporter``, so the same job runs under the CLI, in tests, or embedded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .engine import Engine, ModelOptions, build_engine
from .errors import SetupError
from .outputs import (
    CSV_COLUMNS,
    CsvResultWriter,
    ResultRow,
    heatmap_relpath,
    map_relpath,
    sync_filesystem,
    write_results_csv_atomic,
    write_text_atomic,
)
from .pipeline import HEATMAP_FORMATS, InputOptions, Preprocessing, RowContext, ScanSummary, relative_name, run_scan
from .state import FileStamp, OutputLock, RunState, clean_stale_temporaries

DEFAULT_THRESHOLD = 0.5


class Reporter(Protocol):
    """What a job tells its user; the CLI implements it with rich, tests with a list."""

    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def start(self, description: str, total: int) -> None: ...
    def advance(self) -> None: ...
    def row(self, row: ResultRow) -> None: ...


class SilentReporter:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warning: " + message)

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def row(self, row: ResultRow) -> None:
        pass


# --------------------------------------------------------------------------------------------------- shards


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' with 1 <= K <= N -> (K, N)."""
    if text is None:
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise SetupError(f"--shard takes K/N such as 2/4, not {text!r}") from None
    if not 1 <= k <= n:
        raise SetupError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_of(relpath: str, count: int) -> int:
    """1-based shard of a file: a hash of its relative path, so it never moves when files are added."""
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


# ---------------------------------------------------------------------------------------------- thresholds


@dataclass
class ThresholdChoice:
    value: float
    source: str
    pixel: float | None = None
    calibration: dict[str, Any] | None = None


def calibration_fingerprint(engine: Engine, memory_id: str, prep: Preprocessing) -> dict[str, Any]:
    """What a calibration depends on: the same fingerprint must hold when it is used."""
    return {
        "architecture": engine.backbone.architecture,
        "weights_sha256": engine.backbone.weights_sha256,
        "precision": engine.backbone.precision,
        "scales": list(engine.scorer.scales),
        "vocabulary_sha256": engine.ensemble.sha256,
        "memory": memory_id,
        "tile": prep.tile,
        "tile_overlap": prep.tile_overlap if prep.tile is not None else None,
    }


def parse_threshold(text: str) -> float | None:
    """'auto' -> None, else a number in [0, 1]; checked before anything slow happens."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise SetupError(f"--threshold takes a number between 0 and 1 or 'auto', not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise SetupError(f"--threshold must be between 0 and 1, got {text}")
    return value


def choose_threshold(
    requested: float | None,
    calibration: dict[str, Any] | None,
    calibration_origin: str,
    explicit: bool,
    fingerprint: dict[str, Any],
    reporter: Reporter,
) -> ThresholdChoice:
    """--threshold VALUE, else a matching calibration, else the default 0.5 (and say which).

    A calibration made for another configuration is never used: with an explicit --calibration
    that is an error (unless --threshold overrides it), otherwise a warning.
    """
    from .calibration import Calibration

    usable = None
    if calibration is not None:
        stored = calibration.get("fingerprint")
        if not isinstance(stored, dict):
            raise SetupError(
                f"{calibration_origin} holds a malformed calibration; recalibrate with `winclip calibrate`"
            )
        differences = sorted(key for key in fingerprint if stored.get(key) != fingerprint[key])
        if differences:
            message = (
                f"the calibration in {calibration_origin} was made with another {', '.join(differences)}; "
                "recalibrate with `winclip calibrate`"
            )
            if explicit and requested is None:
                raise SetupError(message)
            fallback = (
                f"--threshold {requested:g}" if requested is not None else f"the default threshold {DEFAULT_THRESHOLD}"
            )
            reporter.warn(f"{message}; using {fallback} and no pixel threshold")
        else:
            usable = Calibration.from_dict(calibration["calibration"])
    pixel = usable.pixel_threshold if usable is not None else None
    if requested is not None:
        return ThresholdChoice(requested, "--threshold", pixel, calibration)
    if usable is not None:
        source = f"calibrated: fpr {usable.fpr:g} on {usable.n_images} good images ({calibration_origin})"
        return ThresholdChoice(usable.threshold, source, pixel, calibration)
    return ThresholdChoice(DEFAULT_THRESHOLD, "default", None, None)


def load_calibration_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"calibration file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SetupError(f"cannot read calibration file {path}: {err}") from None
    if not isinstance(data, dict) or "calibration" not in data or "fingerprint" not in data:
        raise SetupError(f"{path} is not a winclip calibration file")
    return data


# ------------------------------------------------------------------------------------------------------ job


@dataclass
class ScanOptions(InputOptions):
    directory: Path
    out: Path
    model: ModelOptions
    class_name: str
    threshold: str = "auto"
    refs: Path | None = None
    calibration: Path | None = None
    prompts: Path | None = None
    use_cache: bool = True
    save_maps: bool = False
    thumbnails: bool = True
    heatmaps: str = "png"  # png, jpg or none
    incremental: bool = False
    shard: tuple[int, int] | None = None


@dataclass
class ScanResult:
    summary: ScanSummary
    total_rows: int
    skipped_unchanged: int
    seconds: float
    run_info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    unlisted: list[str] = field(default_factory=list)  # folders that could not be listed


def discover(directory: Path, out: Path, reporter: Reporter, unlisted: list[str] | None = None) -> list[Path]:
    """The image files under ``directory``; folders that cannot be listed are warned about and,
    when ``unlisted`` is given, appended to it (a scan reports them in its exit code)."""
    from .images import discover_images

    if not directory.exists():
        raise SetupError(f"input not found: {directory}")
    found = discover_images(directory, exclude=[out])
    for folder, reason in found.skipped_dirs:
        reporter.warn(f"cannot list {folder}: {reason}")
        if unlisted is not None:
            unlisted.append(f"{folder}: {reason}")
    return found.files


def run_scan_job(
    options: ScanOptions, reporter: Reporter, should_stop: Callable[[], bool] = lambda: False
) -> ScanResult:
    from .memory import load_memory
    from .prompts import load_vocabulary

    started = time.perf_counter()
    requested_threshold = parse_threshold(options.threshold)  # bad options fail before anything slow
    if options.heatmaps not in HEATMAP_FORMATS:
        raise SetupError(f"--heatmaps takes {', '.join(HEATMAP_FORMATS)}, not {options.heatmaps!r}")
    load_vocabulary(options.prompts)
    if options.out.exists() and not options.out.is_dir():
        raise SetupError(f"--out {options.out} exists and is not a folder")
    unlisted: list[str] = []
    files = discover(options.directory, options.out, reporter, unlisted)
    if not files and not options.incremental:
        raise SetupError(f"no images found under {options.directory} (png, jpg, jpeg, bmp, tif, tiff, webp)")
    inputs = [(path, relative_name(path, options.directory)) for path in files]
    if options.shard is not None:
        k, n = options.shard
        inputs = [(path, name) for path, name in inputs if shard_of(name, n) == k]
    memory = load_memory(options.refs) if options.refs is not None else None  # refuse a broken memory early
    calibration, origin = None, ""
    if options.calibration is not None:
        calibration, origin = load_calibration_file(options.calibration), str(options.calibration)
    elif memory is not None and memory.metadata.get("calibration"):
        calibration, origin = memory.metadata["calibration"], str(options.refs)

    options.out.mkdir(parents=True, exist_ok=True)
    with OutputLock(options.out) as lock:
        if lock.previous_holder:
            reporter.warn(f"took over a stale lock in {options.out} ({lock.previous_holder})")
        clean_stale_temporaries(options.out)
        engine = build_engine(options.model, options.class_name, options.prompts, use_cache=options.use_cache)
        backbone = engine.backbone
        context = RowContext(
            threshold=DEFAULT_THRESHOLD, threshold_source="", mode="zero-shot", vocabulary_sha256=engine.ensemble.sha256
        )
        memory_id = ""
        if memory is not None:
            from .memory import attach_memory

            for warning in attach_memory(engine, memory, tile=options.tile, tile_overlap=options.tile_overlap):
                reporter.warn(warning)
            context.mode, context.k_shot = "few-shot", memory.k
            context.refs, context.refs_sha256 = str(options.refs), memory.sha256
            memory_id = memory.content_id
        prep = options.preprocessing(backbone)
        fingerprint = calibration_fingerprint(engine, memory_id, prep)
        choice = choose_threshold(
            requested_threshold, calibration, origin, options.calibration is not None, fingerprint, reporter
        )
        context.threshold, context.threshold_source, context.pixel_threshold = choice.value, choice.source, choice.pixel

        config = {
            **fingerprint,
            "class_name": engine.ensemble.class_name,
            "pixel_threshold": choice.pixel,
            "max_pixels": options.max_pixels,
            # another folder or shard in the same OUT must never mix with (or delete) the stored rows
            "input": str(options.directory.resolve()),
            "shard": list(options.shard) if options.shard else None,
        }
        state = RunState(options.out)
        if state.recovered_from:
            reporter.warn(f"the run state was damaged and was moved to {state.recovered_from}; starting afresh")
        try:
            todo, skipped, rows_changed = _select(
                state, config, context, inputs, options.incremental, reporter, bool(unlisted)
            )
            mode = f"few-shot k={context.k_shot}" if memory is not None else "zero-shot"
            shard = f", shard {options.shard[0]}/{options.shard[1]}" if options.shard else ""
            reporter.info(
                f"winclip {__version__}: {len(todo)} images to score"
                + (f" ({skipped} unchanged)" if skipped else "")
                + f"{shard}, {backbone.architecture} ({backbone.weights}) on {backbone.device} {backbone.precision}, "
                f"{mode}, class '{engine.ensemble.class_name}', threshold {choice.value:g} ({choice.source})"
            )
            run_info = _run_info(options, engine, context, choice, memory_id)
            write_text_atomic(options.out / "run.json", json.dumps(run_info, indent=2) + "\n")
            csv_path = options.out / "scores.csv"
            # The CSV is rebuilt from the state first unless it is exactly what the last run left: a run
            # killed mid-line (or a user's edit) leaves nothing half-written or stale behind.
            if rows_changed or state.meta("csv") != _stamp_of(csv_path):
                write_results_csv_atomic(csv_path, state.rows())
            reporter.start("scanning", len(todo))
            with CsvResultWriter(csv_path, append=True) as live_csv:

                def on_rows(group: list[tuple[ResultRow, FileStamp | None]]) -> None:
                    sync_filesystem(options.out)  # the group's heatmaps are on disk before its rows
                    state.record_many(group)  # one durable commit: the state is the source of truth
                    live_csv.write_many([row for row, _ in group])
                    for row, _ in group:
                        reporter.advance()
                        reporter.row(row)

                scan_started = time.perf_counter()
                try:
                    summary = run_scan(
                        engine.scorer,
                        todo,
                        options.out,
                        context,
                        prep,
                        device=backbone.device,
                        dtype=backbone.dtype,
                        batch_size=options.batch_size,
                        save_maps=options.save_maps,
                        thumbnails=options.thumbnails,
                        workers=options.workers,
                        heatmaps=options.heatmaps,
                        on_rows=on_rows,
                        should_stop=should_stop,
                    )
                finally:
                    scan_seconds = time.perf_counter() - scan_started
                    rows = state.rows()
                    write_results_csv_atomic(csv_path, rows)
                    state.set_meta("csv", _stamp_of(csv_path))
            seconds = time.perf_counter() - started
            run_info.update(
                finished=datetime.now(UTC).isoformat(timespec="seconds"),
                seconds=round(seconds, 3),
                setup_seconds=round(seconds - scan_seconds, 3),  # model load, text embeddings, state
                scan_seconds=round(scan_seconds, 3),  # decoding, model and outputs, overlapped
                images=summary.images,
                scored=summary.scored,
                anomalies=summary.anomalies,
                errors=summary.errors,
                unchanged=skipped,
                total_rows=len(rows),
                total_anomalies=sum(r.label == "anomalous" for r in rows),
                total_errors=sum(r.status == "error" for r in rows),
                interrupted=bool(should_stop()),
                unlisted_dirs=unlisted,
            )
            write_text_atomic(options.out / "run.json", json.dumps(run_info, indent=2) + "\n")
        finally:
            state.close()
    return ScanResult(
        summary, len(rows), skipped, seconds, run_info, interrupted=bool(should_stop()), unlisted=unlisted
    )


def _stamp_of(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _select(
    state: RunState,
    config: dict[str, Any],
    context: RowContext,
    inputs: list[tuple[Path, str]],
    incremental: bool,
    reporter: Reporter,
    listing_incomplete: bool = False,
) -> tuple[list[tuple[Path, str]], int, bool]:
    """The inputs to score now, how many are unchanged since the stored results, and whether
    the stored rows changed here (reset, removed or relabelled)."""
    stored = state.config()
    if not incremental or stored is None:
        state.reset(config)
        return inputs, 0, True
    changed = sorted(key for key in set(config) | set(stored) if config.get(key) != stored.get(key))
    if changed:
        reporter.warn(
            f"the scan configuration changed since the stored results ({', '.join(changed)}): "
            f"earlier rows are discarded and all {len(inputs)} images are scored again"
        )
        state.reset(config)
        return inputs, 0, True
    changed_rows = False
    present = {name for _, name in inputs}
    gone = [row for row in state.rows() if row.path not in present]
    if gone and listing_incomplete:
        reporter.warn(
            f"{len(gone)} earlier results are kept although their files were not seen: a folder could not be listed"
        )
    elif gone:
        # scores.csv describes the folder as it is: results of files that disappeared go too
        reporter.info(f"{len(gone)} files scanned earlier are gone: their rows and heatmaps are removed")
        state.forget([row.path for row in gone])
        _remove_outputs(state.path.parent.parent, gone)
        changed_rows = True
    rows = state.rows()
    relabelled = [_relabel(row, context) for row in rows]
    # compare as written (6 decimals): the stored rows hold the rounded values
    if any(a.as_csv_dict() != b.as_csv_dict() for a, b in zip(rows, relabelled, strict=True)):
        reporter.info(f"threshold is now {context.threshold:g} ({context.threshold_source}): stored rows relabelled")
        state.replace_rows(relabelled)
        changed_rows = True
    stamps = state.stamps()
    todo = []
    for path, name in inputs:
        known = stamps.get(name)
        try:
            stat = path.stat()
            current = FileStamp(stat.st_size, stat.st_mtime_ns)
        except OSError:
            todo.append((path, name))  # the decoder will report why it cannot be read
            continue
        if known is None or not known.same_file(current):
            todo.append((path, name))
    # files whose last result was an error are tried again: the cause may be gone
    errors = {row.path for row in rows if row.status == "error"}
    todo_names = {name for _, name in todo}
    todo += [(path, name) for path, name in inputs if name in errors and name not in todo_names]
    todo.sort(key=lambda entry: entry[1])
    return todo, len(inputs) - len(todo), changed_rows


def _remove_outputs(out_dir: Path, rows: list[ResultRow]) -> None:
    from .report import thumbnail_relpaths

    for row in rows:
        if row.status != "ok":
            continue
        heatmaps = (heatmap_relpath(row.path), heatmap_relpath(row.path, ".jpg"))  # --heatmaps png or jpg
        for relpath in (*heatmaps, map_relpath(row.path), *thumbnail_relpaths(row.path)):
            target = out_dir / relpath
            if target.resolve().is_relative_to(out_dir.resolve()):  # never outside OUT, whatever the CSV says
                target.unlink(missing_ok=True)


def _relabel(row: ResultRow, context: RowContext) -> ResultRow:
    from dataclasses import replace

    if row.status != "ok" or row.score is None:
        return replace(row, threshold_source=context.threshold_source)
    return replace(
        row, threshold=context.threshold, label=context.label(row.score), threshold_source=context.threshold_source
    )


def _run_info(
    options: ScanOptions, engine: Engine, context: RowContext, choice: ThresholdChoice, memory_id: str
) -> dict[str, Any]:
    backbone = engine.backbone
    return {
        "tool": "winclip",
        "version": __version__,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": str(options.directory),
        "class_name": engine.ensemble.class_name,
        **backbone.identity,
        "device": str(backbone.device),
        "scales": list(engine.scorer.scales),
        "threshold": choice.value,
        "threshold_source": choice.source,
        "pixel_threshold": choice.pixel,
        "vocabulary": engine.ensemble.vocabulary.source,
        "vocabulary_sha256": engine.ensemble.sha256,
        "mode": context.mode,
        "refs": context.refs,
        "refs_sha256": context.refs_sha256,
        "memory_id": memory_id,
        "k_shot": context.k_shot,
        "tile": options.tile,
        "tile_overlap": options.tile_overlap if options.tile is not None else None,
        "incremental": options.incremental,
        "heatmaps": options.heatmaps,
        "shard": f"{options.shard[0]}/{options.shard[1]}" if options.shard else None,
        "columns": list(CSV_COLUMNS),
    }
