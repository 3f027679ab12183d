"""A whole ``winclip scan`` run: lock, run state, incremental selection, sharding, outputs.

Sits between the CLI (which parses and prints) and the pipeline (which streams tensors). Talks to
the user only through a ``Reporter``, so the same job runs under the CLI, in tests, or embedded.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winclip_cli import __version__
from winclip_cli.core.backbone import Backbone
from winclip_cli.core.engine import Engine
from winclip_cli.errors import SetupError
from winclip_cli.io.layout import (
    HEATMAP_DIR,
    OutputLayout,
    heatmap_relpath,
    is_heatmap_name,
    map_relpath_of_heatmap,
    thumbnail_relpaths_of_heatmap,
)
from winclip_cli.io.memory import MemoryFile
from winclip_cli.io.outputs import (
    CsvResultWriter,
    ResultRow,
    remove_inside,
    sync_filesystem,
    write_results_csv_atomic,
    write_text_atomic,
)
from winclip_cli.io.safe_fs import CALIBRATION_LIMIT, read_user_file
from winclip_cli.io.state import FileStamp, OutputLock, RunState, clean_stale_temporaries, refuse_links
from winclip_cli.jobs.decode import Preprocessing, relative_name
from winclip_cli.jobs.kernel import Reporter, Session, discover

if TYPE_CHECKING:
    from winclip_cli.io.kept_pool import KeptPool
    from winclip_cli.jobs.mutual import MutualStream
from winclip_cli.jobs.plan import (  # noqa: F401  (shard_of: where callers found it)
    has_current_header,
    seconds_since_process_start,
    shard_of,
    stamp_of,
)
from winclip_cli.jobs.record import ScanRecord, calibration_fingerprint, scan_totals
from winclip_cli.jobs.write import ResultWriter, RowContext, ScanSummary, write_all
from winclip_cli.options import DEFAULT_THRESHOLD, HEATMAP_SUFFIXES, MAX_DISTANCE, ScoringMode
from winclip_cli.spec import InputSpec, ModelSpec, MutualSpec, OutputSpec, ScanSpec, TextSpec  # noqa: F401  (ScanSpec: where callers found it)
from winclip_cli.wording import files_gone, plural, results_kept_unseen

# --------------------------------------------------------------------------------------------------- shards


# shard_of lives in jobs/plan.py: the command line decides there, without torch, that a shard is empty


# ---------------------------------------------------------------------------------------------- thresholds


@dataclass
class ThresholdChoice:
    value: float | None  # None: no label (mode mutual with neither --threshold nor a calibration)
    source: str
    pixel: float | None = None
    calibration: dict[str, Any] | None = None


def choose_threshold(
    requested: float | None,
    calibration: dict[str, Any] | None,
    calibration_origin: str,
    explicit: bool,
    fingerprint: dict[str, Any],
    reporter: Reporter,
    class_name: str = "",
) -> ThresholdChoice:
    """--threshold VALUE, else a matching calibration, else the default 0.5 (and say which).

    A calibration made for another configuration is never used. One rule for both places it comes
    from (``explicit``: --calibration, else stored in --refs): without --threshold that is an error
    (exit 2), since a cron job must not silently lose its calibrated threshold; with --threshold, a
    warning.
    """
    from winclip_cli.core.calibration import Calibration

    mutual = fingerprint.get("mode") == ScoringMode.MUTUAL.value
    usable = None
    if calibration is not None:
        stored = calibration.get("fingerprint")
        if not isinstance(stored, dict):
            raise SetupError(
                f"{calibration_origin} holds a malformed calibration; recalibrate with `winclip calibrate`"
            )
        if (stored.get("mode") == ScoringMode.MUTUAL.value) != mutual:
            made, used = ("--mode mutual", "WinCLIP") if not mutual else ("WinCLIP", "--mode mutual")
            again = "`winclip calibrate --mode mutual`" if mutual else "`winclip calibrate` without --mode mutual"
            raise SetupError(
                f"the calibration in {calibration_origin} is for {made} scores and this run makes {used} scores, "
                f"on another scale (thresholds do not carry across modes): calibrate again with {again}"
            )
        differences = sorted(key for key in fingerprint if stored.get(key) != fingerprint[key])
        calibrated_for = calibration.get("class_name")
        if "vocabulary_sha256" in differences and class_name and calibrated_for and calibrated_for != class_name:
            # the prompts differ because the class does: say that, not which hash differs
            differences[differences.index("vocabulary_sha256")] = (
                f"class ('{calibrated_for}'; this run scores class '{class_name}')"
            )
        if differences:
            where = "in" if explicit else "stored in"
            message = (
                f"the calibration {where} {calibration_origin} was made with another {', '.join(differences)}; "
                "recalibrate with `winclip calibrate`"
            )
            if requested is None:
                raise SetupError(f"{message}, or pass --threshold VALUE to scan without it")
            fallback = (
                f"--threshold {requested:g}" if requested is not None else f"the default threshold {DEFAULT_THRESHOLD}"
            )
            reporter.warn(f"{message}; using {fallback} and no pixel threshold")
        else:
            usable = Calibration.from_dict(calibration["calibration"], upper=MAX_DISTANCE if mutual else 1.0)
    pixel = usable.pixel_threshold if usable is not None else None
    if requested is not None:
        return ThresholdChoice(requested, "--threshold", pixel, calibration)
    if usable is not None:
        source = f"calibrated: fpr {usable.fpr:g} on {usable.n_images} good images ({calibration_origin})"
        return ThresholdChoice(usable.threshold, source, pixel, calibration)
    if mutual:
        # raw mutual scores are distances on the model's own scale: no number fits every model and product
        return ThresholdChoice(None, "none: calibrate with `winclip calibrate --mode mutual` or give --threshold")
    return ThresholdChoice(DEFAULT_THRESHOLD, "default", None, None)


def load_calibration_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_user_file(path, CALIBRATION_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise SetupError(f"calibration file not found: {path}") from None
    except RecursionError:
        raise SetupError(f"cannot read calibration file {path}: it is nested too deeply") from None
    except (OSError, ValueError) as err:  # ValueError: bad UTF-8, bad JSON, a number too long to convert
        reason = "it holds a number with too many digits" if "digits" in str(err) else str(err)[:120]
        raise SetupError(f"cannot read calibration file {path}: {reason}") from None
    if not isinstance(data, dict) or not isinstance(data.get("calibration"), dict):
        raise SetupError(f"{path} is not a winclip calibration file")
    if not isinstance(data.get("fingerprint"), dict):
        raise SetupError(f"{path} holds a malformed calibration; recalibrate with `winclip calibrate`")
    from winclip_cli.core.calibration import Calibration

    mutual = data["fingerprint"].get("mode") == ScoringMode.MUTUAL.value
    try:  # refused now, whether or not its fingerprint matches
        Calibration.from_dict(data["calibration"], upper=MAX_DISTANCE if mutual else 1.0)
    except SetupError as err:
        raise SetupError(f"{path}: {err}") from None
    return data


# ------------------------------------------------------------------------------------------------------ job


@dataclass
class ScanResult:
    summary: ScanSummary
    total_rows: int
    skipped_unchanged: int
    seconds: float
    run_info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    unlisted: list[str] = field(default_factory=list)  # folders that could not be listed
    # scores.csv after the run (with --incremental: kept rows too); errors as in ScanSummary: rows with a
    # reason in `error` (unreadable input, or outputs that could not be written)
    total_anomalies: int = 0
    total_normal: int = 0
    total_errors: int = 0
    total_unlabelled: int = 0  # scored rows without a label (mode mutual with no threshold)


def run_scan_job(options: ScanSpec, reporter: Reporter, should_stop: Callable[[], bool] = lambda: False) -> ScanResult:
    started = time.perf_counter()
    startup = seconds_since_process_start()  # before this job: interpreter, imports (torch), checks
    check_output_options(options)
    unlisted: list[str] = []
    files = discover(options.directory, options.out, reporter, unlisted)
    if not files and not options.incremental:
        raise SetupError(f"no images found under {options.directory} (png, jpg, jpeg, bmp, tif, tiff, webp)")
    inputs = [(path, relative_name(path, options.directory)) for path in files]
    if options.shard is not None:
        k, n = options.shard
        inputs = [(path, name) for path, name in inputs if shard_of(name, n) == k]

    with ScanSession(options, reporter) as session:
        todo, skipped = session.start(inputs, listing_incomplete=bool(unlisted))
        reporter.start("scanning", len(todo))
        scan_started = time.perf_counter()
        try:
            summary = session.score(todo, should_stop)
        finally:
            scan_seconds = time.perf_counter() - scan_started
            rows = session.rewrite_csv()
        seconds = time.perf_counter() - started
        session.run_info.update(
            scan_totals(
                summary,
                rows,
                seconds=seconds,
                scan_seconds=scan_seconds,
                startup_seconds=startup,
                model_seconds=session.model_seconds,
                unchanged=skipped,
                interrupted=bool(should_stop()),
                unlisted=unlisted,
            )
        )
        if session.mutual is not None:  # the pools of this run: each row names its own
            session.run_info["pools"] = [pool.as_dict() for pool in session.mutual.pools]
        session.write_run_info()
    run_info = session.run_info
    return ScanResult(
        summary,
        len(rows),
        skipped,
        seconds,
        run_info,
        interrupted=bool(should_stop()),
        unlisted=unlisted,
        total_anomalies=run_info["total_anomalies"],
        total_normal=sum(r.label == "normal" for r in rows),
        total_errors=run_info["total_errors"],
        total_unlabelled=sum(r.status == "ok" and not r.label for r in rows),
    )


def check_output_options(options: ScanSpec) -> None:
    """The cheap checks of a scan's files, done before anything slow (again: they may have changed
    since the command line looked)."""
    from winclip_cli.core.prompts import load_vocabulary

    load_vocabulary(options.text.prompts)
    if options.out.exists() and not options.out.is_dir():
        raise SetupError(f"--out {options.out} exists and is not a folder")


class ScanSession:
    """A scan's setup held open: the output lock, the engine with its memory, the threshold, the run
    state and scores.csv. ``scan`` scores one list of files with it; ``watch`` scores many lists,
    one after the other, with the model loaded once.

    ``hold_lock=False`` when the caller already holds OUT's lock (a watch re-opening its session
    to pick up a new memory keeps the folder locked throughout); ``backbone`` reuses a loaded model.
    """

    def __init__(
        self,
        options: ScanSpec,
        reporter: Reporter,
        *,
        hold_lock: bool = True,
        backbone: Backbone | None = None,
    ) -> None:
        self.options = options
        self.reporter = reporter
        self.csv_path = OutputLayout(options.out).scores_csv
        self.run_info: dict[str, Any] = {}
        self._hold_lock = hold_lock
        self._backbone = backbone
        self._lock: OutputLock | None = None
        self.model_seconds = 0.0
        self.state: RunState | None = None

    @property
    def engine(self) -> Engine:
        assert self.session.engine is not None
        return self.session.engine

    @property
    def prep(self) -> Preprocessing:
        return self.session.prep

    @property
    def memory(self) -> MemoryFile | None:
        return self.session.memory

    def __enter__(self) -> ScanSession:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        from winclip_cli.io.memory import load_memory

        options, reporter = self.options, self.reporter
        # the scoring mode chooses the scorer: few-shot compares with the memory (refused early when broken)
        memory = load_memory(options.refs) if options.refs is not None and options.mode.uses_references else None
        calibration, origin = None, ""
        if options.calibration is not None:
            calibration, origin = load_calibration_file(options.calibration), str(options.calibration)
        elif memory is not None and memory.metadata.get("calibration"):
            calibration, origin = memory.metadata["calibration"], str(options.refs)

        options.out.mkdir(parents=True, exist_ok=True)
        refuse_links(options.out)
        if self._hold_lock:
            self._lock = OutputLock(options.out).acquire()
            if self._lock.previous_holder:
                reporter.warn(f"took over a stale lock in {options.out} ({self._lock.previous_holder})")
        clean_stale_temporaries(options.out)
        loading = time.perf_counter()
        self.session = Session.open(
            options.model,
            options.inputs,
            text=options.text,
            memory=memory,
            reporter=reporter,
            backbone=self._backbone,
            mutual=options.mutual,
        )
        self.model_seconds = time.perf_counter() - loading  # the model, its text embeddings, the memory
        engine = self.engine
        context = RowContext(
            threshold=DEFAULT_THRESHOLD,
            threshold_source="",
            mode=options.mode.value,
            # mutual scores use no prompts: their rows name no vocabulary
            vocabulary_sha256=engine.ensemble.sha256 if options.mutual is None else "",
        )
        memory_id = self.session.memory_id
        if memory is not None:
            context.k_shot = memory.k
            context.refs, context.refs_sha256 = str(options.refs), memory.sha256
        fingerprint = calibration_fingerprint(self.session)
        choice = choose_threshold(
            options.threshold.value,
            calibration,
            origin,
            options.calibration is not None,
            fingerprint,
            reporter,
            class_name=engine.ensemble.class_name,
        )
        context.threshold, context.threshold_source, context.pixel_threshold = choice.value, choice.source, choice.pixel
        self.context, self.choice, self.memory_id = context, choice, memory_id
        self.mutual: MutualStream | None = None
        if options.mutual is not None:
            from winclip_cli.jobs.mutual import MutualStream

            prefix = f"{options.shard[0]}/{options.shard[1]}:" if options.shard else ""
            self.mutual = MutualStream(self.session, reporter, int(options.mutual.pool_size), prefix)
        self.record = ScanRecord(options, self.session, context, choice)
        self.config = self.record.state_config()
        self.state = RunState(options.out)
        if self.state.recovered_from:
            reporter.warn(
                f"the run state was damaged ({self.state.damage}) and was moved to {self.state.recovered_from}; "
                "starting afresh"
            )

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def start(
        self, inputs: list[tuple[Path, str]], listing_incomplete: bool = False
    ) -> tuple[list[tuple[Path, str]], int]:
        """Select what to score among ``inputs`` (all, or with --incremental the new, changed and failed
        files), say so, write run.json and bring scores.csv in line with the state. Returns (todo, unchanged)."""
        assert self.state is not None
        options, backbone, context, choice = self.options, self.engine.backbone, self.context, self.choice
        todo, skipped, rows_changed = _select(
            self.state, self.config, context, inputs, options.incremental, self.reporter, listing_incomplete
        )
        mode = f"few-shot k={context.k_shot}" if self.memory is not None else "zero-shot"
        if options.mutual is not None:
            mode = f"mutual, pools of at most {int(options.mutual.pool_size)}"
        shard = f", shard {options.shard[0]}/{options.shard[1]}" if options.shard else ""
        threshold = "none" if choice.value is None else f"{choice.value:g}"
        scored_class = "" if options.mutual is not None else f", class '{self.engine.ensemble.class_name}'"
        self.reporter.info(
            f"winclip {__version__}: {plural(len(todo), 'image')} to score"
            + (f" ({skipped} unchanged)" if skipped else "")
            + f"{shard}, {backbone.architecture} ({backbone.weights}) on {backbone.device} {backbone.precision}, "
            f"batch {self.session.batch_size}, "
            f"{mode}{scored_class}, threshold {threshold} ({choice.source})"
        )
        self.run_info = self.record.run_json()
        self.write_run_info()
        # The CSV is rebuilt from the state first unless it is exactly what the last run left: a run
        # killed mid-line (or a user's edit) leaves nothing half-written or stale behind.
        if rows_changed or self.state.meta("csv") != stamp_of(self.csv_path) or not has_current_header(self.csv_path):
            write_results_csv_atomic(self.csv_path, self.state.rows())
        return todo, skipped

    def score(
        self,
        todo: list[tuple[Path, str]],
        should_stop: Callable[[], bool] = lambda: False,
        on_committed: Callable[[list[ResultRow]], None] = lambda rows: None,
    ) -> ScanSummary:
        """Score ``todo``; each group of rows is committed to the state, then appended to scores.csv
        (which may then hold an older row of a re-scored file until ``rewrite_csv``)."""
        state, options = self.state, self.options
        assert state is not None
        with CsvResultWriter(self.csv_path, append=True) as live_csv:
            tile_notice = TileCountNotice(self.prep, self.reporter)

            def on_rows(group: list[tuple[ResultRow, FileStamp | None]]) -> None:
                if self.prep.tiling.enabled:
                    group = [(tile_notice.seen(row), stamp) for row, stamp in group]
                sync_filesystem(options.out)  # the group's heatmaps are on disk before its rows
                state.record_many(group)  # one durable commit: the state is the source of truth
                live_csv.write_many([row for row, _ in group])
                for row, _ in group:
                    self.reporter.advance()
                    self.reporter.row(row)
                on_committed([row for row, _ in group])

            writer = ResultWriter(
                options.output,
                self.context,
                on_rows,
                device=self.session.backbone.device,
                threads=self.session.threads,
            )
            if self.mutual is None:
                return write_all(self.session.scored(todo, with_stamp=True, should_stop=should_stop), writer)
            kept = self._kept_pool(todo)
            # each call (a watch makes many) pools its files with what OUT kept: nothing of an earlier call
            self.mutual.kept, self.mutual.scored_now, self.mutual.pools = kept, [], []
            try:
                return write_all(self.mutual.scored(todo, with_stamp=True, should_stop=should_stop), writer)
            finally:
                self._save_kept_pool(kept)

    def _kept_pool(self, todo: list[tuple[Path, str]]) -> KeptPool | None:
        """--mode mutual: the features kept from earlier runs in OUT whose rows still stand (an
        ok row of the same file) and that are not scored again now."""
        from winclip_cli.io.kept_pool import load_kept_pool

        assert self.state is not None and self.session.extractor is not None
        extractor = self.session.extractor
        kept = load_kept_pool(OutputLayout(self.options.out).kept_pool_confined, extractor.layers, extractor.grid_size)
        if kept is None:
            return None
        again = {name for _, name in todo}
        valid = {row.path: row.sha256 for row in self.state.rows() if row.status == "ok" and row.path not in again}
        return kept.still_valid(valid)

    def _save_kept_pool(self, before: KeptPool | None) -> None:
        """The newest images scored in OUT (earlier runs' and this run's), for the next run's pools; only
        those whose rows were committed (an interrupted or failed run keeps what it finished)."""
        from winclip_cli.io.kept_pool import save_kept_pool

        assert self.state is not None and self.mutual is not None
        kept = self.mutual.kept_after_run(before)
        if kept is None:
            return
        try:
            valid = {row.path: row.sha256 for row in self.state.rows() if row.status == "ok"}
            save_kept_pool(OutputLayout(self.options.out).kept_pool_confined, kept.still_valid(valid))
        except (OSError, sqlite3.Error) as err:  # the rows stand; the next --incremental run pools less
            self.reporter.warn(f"cannot keep the pool's features for the next run: {err}")

    def rewrite_csv(self) -> list[ResultRow]:
        """scores.csv rewritten atomically from the state (one row per file, sorted); returns the rows."""
        assert self.state is not None
        rows = self.state.rows()
        write_results_csv_atomic(self.csv_path, rows)
        self.mark_csv_current()
        return rows

    def mark_csv_current(self) -> None:
        """Record scores.csv's size and mtime: the next run rewrites it only if it differs."""
        assert self.state is not None
        self.state.set_meta("csv", stamp_of(self.csv_path))

    def write_run_info(self) -> None:
        write_text_atomic(OutputLayout(self.options.out).run_json, json.dumps(self.run_info, indent=2) + "\n")


MANY_TILES = 64  # per image: said once, since each tile costs as much as a whole image


class TileCountNotice:
    """With tiling on, every scored row says how many model inputs its image took (1: left whole by
    --tile auto), and the first image cut into many tiles is named with its count, once."""

    def __init__(self, prep: Preprocessing, reporter: Reporter) -> None:
        self.prep = prep
        self.reporter = reporter
        self.said = False

    def seen(self, row: ResultRow) -> ResultRow:
        if row.status != "ok":
            return row
        if row.tiles is None:
            from dataclasses import replace

            return replace(row, tiles=1)
        if row.tiles > MANY_TILES and not self.said:
            self.said = True
            size = f" of {self.prep.tiling.size} px" if isinstance(self.prep.tiling.size, int) else ""
            self.reporter.warn(
                f"{row.path} ({row.width}x{row.height}) is cut into {row.tiles} tiles{size}, "
                f"each scored like a whole image; a larger --tile (or --tile auto) is faster"
            )
        return row


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
        reporter.warn(results_kept_unseen(len(gone)))
    elif gone:
        # scores.csv describes the folder as it is: results of files that disappeared go too
        reporter.info(files_gone(len(gone)))
        state.forget([row.path for row in gone])
        _remove_outputs(state.path.parent.parent, gone)
        changed_rows = True
    rows = state.rows()
    relabelled = [_relabel(row, context) for row in rows]
    # compare as written (6 decimals): the stored rows hold the rounded values
    if any(a.as_csv_dict() != b.as_csv_dict() for a, b in zip(rows, relabelled, strict=True)):
        now = "none" if context.threshold is None else f"{context.threshold:g}"
        reporter.info(f"threshold is now {now} ({context.threshold_source}): stored rows relabelled")
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
    # and so are files whose outputs could not be written (disk full...): their heatmaps are missing
    errors = {row.path for row in rows if row.status == "error" or row.error}
    todo_names = {name for _, name in todo}
    todo += [(path, name) for path, name in inputs if name in errors and name not in todo_names]
    todo.sort(key=lambda entry: entry[1])
    return todo, len(inputs) - len(todo), changed_rows


def _remove_outputs(out_dir: Path, rows: list[ResultRow]) -> None:
    # a row scored with --heatmaps none has no heatmap, but may have thumbnails and a map
    remove_outputs_of(out_dir, [(row.path, row.heatmap) for row in rows if row.status == "ok"])


def remove_outputs_of(out_dir: Path, entries: list[tuple[str, str]]) -> None:
    """Delete the heatmaps, maps and thumbnails of these (input file, heatmap cell) entries from OUT;
    the heatmap cell may be empty, or name an output of an older winclip that named it differently."""
    for name, heatmap_cell in entries:
        # every format of --heatmaps, and the name an older winclip may have written
        heatmaps = {*(heatmap_relpath(name, suffix) for suffix in HEATMAP_SUFFIXES), heatmap_cell} - {""}
        relpaths = [
            relpath
            for heatmap in heatmaps
            if heatmap.startswith(f"{HEATMAP_DIR}/") and is_heatmap_name(heatmap) and ".." not in heatmap.split("/")
            for relpath in (heatmap, map_relpath_of_heatmap(heatmap), *thumbnail_relpaths_of_heatmap(heatmap))
        ]
        for relpath in relpaths:
            remove_inside(out_dir, relpath)  # never outside OUT, whatever the CSV says


def _relabel(row: ResultRow, context: RowContext) -> ResultRow:
    from dataclasses import replace

    if row.status != "ok" or row.score is None:
        return replace(row, threshold_source=context.threshold_source)
    return replace(
        row,
        threshold=context.threshold,
        label=context.label(row.decision_score),
        threshold_source=context.threshold_source,
    )
