"""The ``winclip`` command line: parses options, prints progress and summaries, returns exit codes.

Nothing here computes a score. The options shared by the commands that load a model are declared
in ``options``; each command checks all its arguments (``options``, ``preflight``) before it imports
the job, and with it torch and open_clip, so ``winclip --help`` starts instantly and a mistake fails
in a fraction of a second. A new command or option follows the same order: parse, check, then import.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from winclip_cli import __version__
from winclip_cli.cli import preflight
from winclip_cli.cli.args import (
    ClassOpt,
    InputArgs,
    ModeArgs,
    ModelArgs,
    NoCacheOpt,
    PromptsOpt,
    QuietOpt,
    ScanArgs,
    TileArgs,
    with_options,
)
from winclip_cli.core.prompts import DEFAULT_CLASS, load_vocabulary
from winclip_cli.errors import (
    EXIT_ANOMALY,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    SetupError,
    WinclipError,
)
from winclip_cli.io.layout import OutputLayout
from winclip_cli.jobs import plan
from winclip_cli.options import (
    DEFAULT_CALIBRATION_FILE,
    DEFAULT_FPR,
    DEFAULT_HOOK_TIMEOUT,
    HeatmapFormat,
    ScoringMode,
    Shard,
    Threshold,
    check_rate,
)
from winclip_cli.spec import OutputSpec, TextSpec
from winclip_cli.wording import plural

if TYPE_CHECKING:  # the jobs (and torch) are imported only once the arguments are checked
    from winclip_cli.jobs.calibrate import CalibrateResult, CalibrateSpec
    from winclip_cli.jobs.evaluate import CategoryResult, EvalSpec
    from winclip_cli.jobs.kernel import Reporter
    from winclip_cli.jobs.refs import RefsResult, RefsSpec
    from winclip_cli.jobs.scan import ScanResult, ScanSpec
    from winclip_cli.jobs.watch import WatchResult, WatchSpec

S = TypeVar("S")
R = TypeVar("R")

EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by SIGPIPE


def _paragraph(text: str) -> str:
    """An epilog as one paragraph: the help reflows it to the terminal's width (a hard line break would stay)."""
    return " ".join(text.split())


JOB_EXIT_CODES_HELP = _paragraph("""
Exit codes: 0 done; 2 usage, setup or environment error (bad option, no images, weights unusable,
unwritable output); 3 some files could not be read (every other image was used); 130 interrupted.
""")

EXIT_CODES_HELP = _paragraph("""
Exit codes: 0 done; 1 at least one image scored over the threshold (only with --fail-on-anomaly);
2 usage, setup or environment error (bad option, no images, weights or memory unusable, unwritable
output); 3 some files or folders could
not be read (every other image was scored and written); 4 another scan or watch is writing to the same output
folder; 130 interrupted (results so far are kept); 141 the reader of --json went away (a closed pipe,
e.g. `| head`): scanning stopped, results so far are kept.
""")


class _PlainHelp:
    """Help as command-line users read it: ARGUMENT names in the usage line (not ``{argument}``) and
    nothing after a flag (not ``<bool>``), which this Typer version would otherwise print."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)  # type: ignore[misc]
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper()
                plain = f"{name}..." if param.nargs != 1 else name
                written = param.get_usage_pieces(ctx)
                if written and written[0] in pieces:
                    pieces[pieces.index(written[0])] = plain if param.required else f"[{plain}]"
        return pieces


class WinclipCommand(_PlainHelp, TyperCommand):
    pass


class WinclipGroup(_PlainHelp, TyperGroup):
    pass


class WinclipTyper(typer.Typer):
    """Every command added with ``app.command`` gets the plain help above."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any):
        return super().command(*args, cls=cls or WinclipCommand, **kwargs)


app = WinclipTyper(
    cls=WinclipGroup,
    name="winclip",
    help="Find defects in folders of product photos without training (WinCLIP zero-/few-shot).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {_escape(message)}")
    return typer.Exit(code)


_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code != 0x0A}
_CONTROLS_AND_NEWLINE = {**_CONTROLS, 0x0A: "\\x0a"}


def _escape(text: str, *, one_line: bool = False) -> str:
    """``text`` for the terminal: Rich markup escaped, and control characters (a file name can hold an
    escape sequence that rewrites the terminal, or a newline that fakes a line) written as ``\\xNN``."""
    from rich.markup import escape

    return escape(text.translate(_CONTROLS_AND_NEWLINE if one_line else _CONTROLS))


@contextmanager
def user_errors():
    """Every failure becomes one line on stderr and an exit code; never a traceback.

    Domain errors carry their own code. The environment failing under us (disk full, a read-only
    or missing folder, out of memory) exits 2 with the system's reason. Anything else is a bug:
    one line too, and WINCLIP_DEBUG=1 shows the traceback for the report.
    """
    try:
        yield
    except typer.Exit:
        raise
    except WinclipError as err:
        raise fail(str(err), err.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # `winclip scan --json | head`: the reader is gone; stop quietly, as a shell pipeline expects
        try:
            sys.stdout = open(os.devnull, "w")
        finally:
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except Exception as err:
        if os.environ.get("WINCLIP_DEBUG"):
            raise
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            raise fail(f"{err.strerror or err}{where}", EXIT_USAGE) from None
        if isinstance(err, MemoryError):
            raise fail("out of memory (try a smaller --batch-size or --max-pixels)", EXIT_USAGE) from None
        raise fail(
            f"internal error: {type(err).__name__}: {err} (set WINCLIP_DEBUG=1 for the traceback)", EXIT_USAGE
        ) from None


def version_callback(value: bool) -> None:
    if value:
        print(f"winclip {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Find defects in folders of product photos without training (WinCLIP zero-/few-shot)."""


# --------------------------------------------------------------------------------------------- shared options
# Every shared option is declared once, in cli/args.py: the model, input and tiling groups
# (``with_options`` adds them to a command) and the options scan and watch have in common.


def _table_console() -> Console:
    """stdout for tables: a terminal's width, else (cron mail, a log, a pipe) wide enough that no value
    is cut or wrapped."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=1000)
    return console


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet or not stderr.is_terminal,
        transient=True,
    )


class StopFlag:
    """SIGINT/SIGTERM ask the scan to stop after the current batch; a second SIGINT aborts.
    ``quiet`` (``-q``): stop without saying so."""

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.quiet = quiet

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.requested:
                return  # a storm of SIGTERM: said once (printing from a handler again could re-enter)
            self.requested = True
            if not self.quiet:
                stderr.print("[yellow]stopping after the current batch (Ctrl-C again to abort)…[/]")

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for sig in previous:
                signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. under a test runner): keep the defaults
            yield self
            return
        try:
            yield self
        finally:
            for sig, old in previous.items():
                # once asked to stop, a later SIGTERM must not kill the clean exit with 143
                signal.signal(sig, signal.SIG_IGN if self.requested and sig == signal.SIGTERM else old)


class ConsoleReporter:
    """The jobs' Reporter on stderr: messages, one progress bar, per-row JSON on stdout."""

    def __init__(self, quiet: bool, json_lines: bool = False) -> None:
        self.quiet = quiet
        self.json_lines = json_lines
        self.progress = _progress(quiet)
        self.task = None
        self.warnings = 0  # a run that warned is not remembered as one the next run may skip (jobs/plan.py)

    def __enter__(self) -> ConsoleReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(_escape(message))

    def warn(self, message: str) -> None:
        self.warnings += 1
        self.progress.console.print(f"[yellow]warning:[/] {_escape(message, one_line=True)}")

    def start(self, description: str, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def row(self, row) -> None:
        if row.error:  # unreadable, or scored but its outputs could not be written
            said = f"{_escape(row.path, one_line=True)}: {_escape(row.error, one_line=True)}"
            self.progress.console.print(f"[yellow]warning:[/] {said}")
        if self.json_lines:
            sys.stdout.write(json.dumps(row.as_json_dict(), ensure_ascii=False) + "\n")
            sys.stdout.flush()


# --------------------------------------------------------------------------------------- the commands' skeleton


def run_command(
    parse: Callable[[], S],
    job: Callable[[S, Reporter, Callable[[], bool]], R],
    summary: Callable[[R], int],
    *,
    quiet: bool,
    json_lines: bool = False,
    reporter: type[ConsoleReporter] | None = None,
    stoppable: bool = False,
    guard: Callable[[], AbstractContextManager[object]] = nullcontext,
    after: Callable[[R], None] = lambda result: None,
) -> NoReturn:
    """The skeleton of every command that runs a job, written once.

    ``guard`` is entered first and left last (OUT's claim: its lock, taken by ``parse`` once every
    argument is checked, before torch is imported; the output folder removed when unused); ``parse``
    checks every argument and builds the job's spec before anything heavy is imported (a mistake fails
    at once); ``job`` imports and runs the job with a console reporter (rows as JSON on
    stdout with --json) and, when ``stoppable``, SIGINT/SIGTERM asking it to stop after the current
    batch; ``after`` runs what follows it (a report), with the same error handling; ``summary``
    prints the outcome and returns the exit code. Every failure is one line and its exit code.
    """
    with user_errors():
        stop = StopFlag(quiet)
        with guard():
            spec = parse()
            with (reporter or ConsoleReporter)(quiet, json_lines) as console:
                with stop.installed() if stoppable else nullcontext():
                    result = job(spec, console, stop)
            after(result)
    raise typer.Exit(summary(result))


# ------------------------------------------------------------------------------------------------------ scan


@contextmanager
def _claimed(out: Path, claim: preflight.OutputClaim) -> Iterator[None]:
    """OUT's claim held inside ``removed_if_unused``: the lock is released before an unused OUT is removed."""
    with ExitStack() as stack:
        stack.enter_context(preflight.removed_if_unused(out))
        stack.enter_context(claim)
        yield


def scan_spec(
    directory: Path,
    model_args: ModelArgs,
    input_args: InputArgs,
    tile_args: TileArgs,
    scan_args: ScanArgs,
    *,
    incremental: bool,
    claim: preflight.OutputClaim,
    shard: Shard | None = None,
    mode_args: ModeArgs | None = None,
    fail_on_anomaly: bool = False,
) -> ScanSpec:
    """The spec of a scan or a watch, with everything that needs no model checked first and OUT locked,
    before torch is imported: a mistake, or a folder in use, fails at once."""
    model = model_args.parse()
    mode, mutual = (mode_args or ModeArgs()).parse(scan_args.refs)
    threshold = Threshold.parse(scan_args.threshold, upper=mode.score_range)
    if mutual is not None:
        if tile_args.tile is not None:
            raise SetupError("--mode mutual scores whole images: it takes no --tile")
        if fail_on_anomaly and threshold.auto and scan_args.calibration is None:
            raise SetupError(
                "--fail-on-anomaly with --mode mutual needs a threshold: --calibration from "
                "`winclip calibrate --mode mutual`, or --threshold"
            )
    heatmaps = HeatmapFormat.parse(scan_args.heatmaps)
    tiling = tile_args.parse(model_args.model)
    out = scan_args.out
    preflight.check_input(directory)
    preflight.check_output_folder("--out", out)
    preflight.check_memory_file(scan_args.refs)
    preflight.check_input_file("--calibration", scan_args.calibration)
    load_vocabulary(scan_args.prompts)
    preflight.check_model_files(model_args.model, model_args.weights)
    claim.take()

    from winclip_cli.spec import ScanSpec

    return ScanSpec(
        directory=directory,
        model=model,
        inputs=input_args.parse(tiling),
        text=TextSpec(scan_args.class_name, scan_args.prompts, use_cache=not scan_args.no_cache),
        output=OutputSpec(out, heatmaps=heatmaps, save_maps=scan_args.save_maps),
        threshold=threshold,
        refs=scan_args.refs,
        calibration=scan_args.calibration,
        incremental=incremental,
        shard=shard,
        mutual=mutual,
    )


@app.command(epilog=EXIT_CODES_HELP)
@with_options(scan_args=ScanArgs, model_args=ModelArgs, input_args=InputArgs, tile_args=TileArgs, mode_args=ModeArgs)
def scan(
    directory: Annotated[
        Path,
        typer.Argument(help="Folder of images (searched recursively) or a single image.", show_default=False),
    ],
    scan_args: ScanArgs,
    model_args: ModelArgs,
    input_args: InputArgs,
    tile_args: TileArgs,
    mode_args: ModeArgs,
    fail_on_anomaly: Annotated[
        bool,
        typer.Option(
            "--fail-on-anomaly",
            help="Exit with code 1 when any row of scores.csv is anomalous (with --incremental: kept rows too).",
        ),
    ] = False,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental",
            help="Keep earlier results in OUT and score only new or changed files (size, mtime); "
            "a changed model, vocabulary, memory or calibration rescans everything.",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="Score only shard K of N (K/N, 1-based), e.g. 2/4; or auto: K and N from a Slurm job array "
            "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, "
            "with auto/N or WINCLIP_SHARD_COUNT).",
            show_default=False,
        ),
    ] = None,
    report: Annotated[bool, typer.Option("--report", help="Write OUT/report.html after the scan.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score every image in DIRECTORY: anomaly score, pass/fail label and a heatmap per image.

    Writes OUT/scores.csv (one row per file, bad files included), a heatmap per image under
    OUT/heatmaps/ (PNG, or JPEG or none with --heatmaps; mirroring the input's subfolders) and
    OUT/run.json (model, weights, device, vocabulary: what is needed to reproduce the run).

    Examples:

      winclip scan ./images --class bottle

      winclip scan ./images --class bottle --refs refs.npz --out results --fail-on-anomaly

      winclip scan /data/camera1 --class bottle --out /data/results --incremental --quiet

      winclip scan ./images --weights ~/models/vit_b_16_plus_240-laion400m_e31.pt --json > scores.jsonl

      winclip scan ./images --mode mutual --out mutual-out

      winclip calibrate ./good --mode mutual --out mutual-calibration.json

      winclip scan ./images --mode mutual --calibration mutual-calibration.json --fail-on-anomaly

    --mode mutual (MuSc) scores each image against the other images of its pool (--pool-size, in path
    order): no prompts or references. `score` is MuSc's final score, ranked within the pool (0 to 1
    there, so one image of every pool is near 1); the label compares `raw_score` (the map's maximum, a
    distance on the model's scale) with a threshold from `calibrate --mode mutual` or --threshold, and
    is empty without one. A folder where most parts are defective is the wrong input; a pool of fewer
    than 10 images is warned about.
    """
    checks_started = time.perf_counter()
    out = scan_args.out
    claim = preflight.OutputClaim(out, "scan")

    def parse() -> ScanSpec:
        return scan_spec(
            directory,
            model_args,
            input_args,
            tile_args,
            scan_args,
            incremental=incremental,
            claim=claim,
            shard=Shard.parse(shard),
            mode_args=mode_args,
            fail_on_anomaly=fail_on_anomaly,
        )

    def job(spec: ScanSpec, reporter: Reporter, stop: Callable[[], bool]) -> ScanResult | plan.NothingToScore:
        request = plan.request_of(spec)
        if (previous := plan.other_input(request)) is not None:
            reporter.warn(
                f"{out} holds the results of another input ({previous}): its rows are replaced, and its "
                "heatmaps stay in the folder; use one --out per input folder"
            )
        result: ScanResult | plan.NothingToScore | None
        result = plan.without_model(request, reporter, checks_started)  # nothing to score: no torch
        if result is None:
            from winclip_cli.jobs.scan import run_scan_job

            result = run_scan_job(spec, reporter, should_stop=stop)
            warned = getattr(reporter, "warnings", 0)
            if not (result.interrupted or result.unlisted or warned):
                plan.remember(request)  # the next run with these options may decide without the model
        return result

    def write_report(result: ScanResult | plan.NothingToScore) -> None:
        if report:
            from winclip_cli.report.page import build_report

            page = build_report(out)
            if not quiet:
                stderr.print(f"report: {_escape(str(page))}")

    def summary(result: ScanResult | plan.NothingToScore) -> int:
        # The summary and the exit code describe scores.csv as it now is: with --incremental, the rows kept
        # from earlier runs (relabelled when the threshold changed) count as much as the rows scored now.
        if not quiet:
            scanned = result.summary
            scored_now = (
                f" ({scanned.images} scored now, {result.skipped_unchanged} unchanged)"
                if result.skipped_unchanged
                else ""
            )
            stopped = "[yellow]interrupted:[/] " if result.interrupted else ""
            unlabelled = result.total_unlabelled
            unlabelled_text = f"{unlabelled} without a label (no threshold), " if unlabelled else ""
            stderr.print(
                f"{stopped}[bold]{plural(result.total_rows, 'image')}[/]: "
                f"[bold]{result.total_anomalies}[/] anomalous, {result.total_normal} normal, {unlabelled_text}"
                f"[bold]{plural(result.total_errors, 'error')}[/]{scored_now} "
                f"in {plan.describe_timing(result.run_info, scanned.scored)} "
                f"-> {_escape(str(OutputLayout(out).scores_csv))}"
            )
        if result.interrupted:
            return EXIT_INTERRUPTED
        if fail_on_anomaly and result.total_anomalies:
            return EXIT_ANOMALY
        if result.total_errors or result.unlisted:
            return EXIT_UNREADABLE
        return EXIT_OK

    run_command(
        parse,
        job,
        summary,
        quiet=quiet,
        json_lines=scan_args.json_lines,
        stoppable=True,
        guard=lambda: _claimed(out, claim),
        after=write_report,
    )


# ----------------------------------------------------------------------------------------------------- watch

WATCH_EXIT_CODES_HELP = _paragraph("""
Exit codes: 0 stopped by SIGTERM or Ctrl-C after committing the current batch; 2 usage, setup or
environment error; 4 another scan or watch is writing to the same output folder.
""")


class _WatchReporter(ConsoleReporter):
    """A watch has no end to show progress towards: messages and rows only."""

    def start(self, description: str, total: int) -> None:
        pass


@app.command(epilog=WATCH_EXIT_CODES_HELP)
@with_options(scan_args=ScanArgs, model_args=ModelArgs, input_args=InputArgs, tile_args=TileArgs, mode_args=ModeArgs)
def watch(
    directory: Annotated[Path, typer.Argument(help="Folder to watch (searched recursively).", show_default=False)],
    scan_args: ScanArgs,
    model_args: ModelArgs,
    input_args: InputArgs,
    tile_args: TileArgs,
    mode_args: ModeArgs,
    poll: Annotated[
        float | None,
        typer.Option(
            "--poll",
            help="List the folder every SECONDS instead of using file-system events (network shares, "
            "where events do not arrive); a file is scored once two listings agree on its size and mtime.",
            show_default=False,
        ),
    ] = None,
    on_anomaly: Annotated[
        str | None,
        typer.Option(
            "--on-anomaly",
            help="Shell command run for each anomalous image, with its row as JSON on stdin "
            "(and WINCLIP_PATH, WINCLIP_SCORE, WINCLIP_LABEL, WINCLIP_HEATMAP in its environment).",
            show_default=False,
        ),
    ] = None,
    hook_timeout: Annotated[
        float, typer.Option("--hook-timeout", min=0.1, help="Seconds an --on-anomaly command may run.")
    ] = DEFAULT_HOOK_TIMEOUT,
    quiet: QuietOpt = False,
) -> None:
    """Score images the moment they arrive in DIRECTORY, with the model loaded once.

    Scores what is in DIRECTORY and not yet in OUT (as `scan --incremental`), then every new or
    changed file once it is complete (closed by its writer, renamed into place, or unchanged over
    two listings). Same outputs, run state and lock as `scan`: stop the watch, and `scan
    --incremental`, `report` and `merge` work on OUT. SIGHUP, or a changed --refs, --calibration or
    --prompts file, reloads them without restarting.

    Examples:

      winclip watch /data/camera1 --class bottle --refs bottle.npz --out /data/results/camera1

      winclip watch /mnt/share/camera2 --class screw --poll 2 --out /data/results/camera2

      winclip watch /data/camera1 --class bottle --json --on-anomaly 'logger -t winclip'

      winclip watch /data/camera1 --mode mutual --calibration mutual-calibration.json --out /data/results/camera1

    With --mode mutual each batch of new images is scored against the newest images already scored
    in OUT (as `scan --mode mutual --incremental`): no label, and no --on-anomaly, without a threshold.
    """

    claim = preflight.OutputClaim(scan_args.out, "watch")

    def parse() -> WatchSpec:
        if poll is not None and poll <= 0:
            raise SetupError(f"--poll takes a positive number of seconds, not {poll:g}")
        scan = scan_spec(
            directory, model_args, input_args, tile_args, scan_args, incremental=True, claim=claim, mode_args=mode_args
        )
        from winclip_cli.jobs.watch import WatchSpec

        return WatchSpec(scan, poll=poll, on_anomaly=on_anomaly, hook_timeout=hook_timeout)

    def job(spec: WatchSpec, reporter: Reporter, stop: Callable[[], bool]) -> WatchResult:
        from winclip_cli.jobs.watch import run_watch

        return run_watch(spec, reporter, should_stop=stop)

    def summary(result: WatchResult) -> int:
        if not quiet:
            stderr.print(
                f"watch stopped: [bold]{result.scored}[/] scored, [bold]{result.anomalies}[/] anomalous, "
                f"[bold]{plural(result.errors, 'error')}[/] -> {_escape(str(OutputLayout(scan_args.out).scores_csv))}"
            )
        return EXIT_OK

    run_command(
        parse,
        job,
        summary,
        quiet=quiet,
        json_lines=scan_args.json_lines,
        reporter=_WatchReporter,
        stoppable=True,
        guard=lambda: claim,
    )


# ------------------------------------------------------------------------------------------------ build-refs


@app.command("build-refs", epilog=JOB_EXIT_CODES_HELP)
@with_options(model_args=ModelArgs, input_args=InputArgs, tile_args=TileArgs)
def build_refs(
    sources: Annotated[
        list[Path],
        typer.Argument(help="Folders (searched recursively) and/or files of normal images.", show_default=False),
    ],
    model_args: ModelArgs,
    input_args: InputArgs,
    tile_args: TileArgs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Memory file to write (.npz).")] = Path("refs.npz"),
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            min=1,
            help="Use k of the images (default: all): the first k, or a --seed sample.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Draw the k images at random with this seed.", show_default=False)
    ] = None,
    append: Annotated[
        bool, typer.Option("--append", help="Add to an existing memory (same model and scales); skips known files.")
    ] = False,
    class_name: ClassOpt = DEFAULT_CLASS,
    prompts: PromptsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Embed k normal images into a reference memory for few-shot scanning (`scan --refs`).

    Each reference is embedded exactly as `scan` embeds an image: its patch tokens and the window
    embeddings of every scale are stored, with the model, weights hash and file hashes, in one .npz.
    Use the same --tile options as the scans that will use the memory.

    Examples:

      winclip build-refs sample_data/fabric/good --out fabric-refs.npz --class fabric

      winclip build-refs ./good --k 4 --seed 0 --out refs.npz

      winclip build-refs ./more-good --out refs.npz --append
    """

    def parse() -> RefsSpec:
        model = model_args.parse()
        tiling = tile_args.parse(model_args.model)
        for source in sources:
            preflight.check_input(source, "reference source")
        preflight.check_output_file("--out", out)
        if append and out.exists():
            preflight.check_memory_file(out)
        load_vocabulary(prompts)
        preflight.check_model_files(model_args.model, model_args.weights)

        from winclip_cli.jobs.refs import RefsSpec

        inputs = input_args.parse(tiling)
        text = TextSpec(class_name, prompts)
        return RefsSpec(sources, out, model, inputs, text, k=k, seed=seed, append=append)

    def job(spec: RefsSpec, reporter: Reporter, stop: Callable[[], bool]) -> RefsResult:
        from winclip_cli.jobs.refs import run_refs_job

        return run_refs_job(spec, reporter)

    def summary(result: RefsResult) -> int:
        if not quiet:
            size_mb = out.stat().st_size / 1e6
            stderr.print(
                f"[bold]k={result.memory.k}[/] references in {_escape(str(out))} ({size_mb:.1f} MB), "
                f"{result.added} added, {result.skipped} skipped, {len(result.problems.failures)} unreadable, "
                f"{result.seconds:.1f} s"
            )
        return EXIT_OK if result.problems.complete else EXIT_UNREADABLE

    run_command(parse, job, summary, quiet=quiet)


# ------------------------------------------------------------------------------------------------- calibrate


@app.command(epilog=JOB_EXIT_CODES_HELP)
@with_options(model_args=ModelArgs, input_args=InputArgs, tile_args=TileArgs, mode_args=ModeArgs)
def calibrate(
    good_dir: Annotated[
        Path, typer.Argument(help="Folder of normal (good) images, searched recursively.", show_default=False)
    ],
    model_args: ModelArgs,
    input_args: InputArgs,
    tile_args: TileArgs,
    mode_args: ModeArgs,
    fpr: Annotated[
        float, typer.Option("--fpr", help="Largest acceptable false-alarm rate on good parts, e.g. 0.01 = 1 %.")
    ] = DEFAULT_FPR,
    pixel_fpr: Annotated[
        float | None,
        typer.Option(
            "--pixel-fpr", help="False-positive rate for the pixel threshold (default: --fpr).", show_default=False
        ),
    ] = None,
    refs: Annotated[
        Path | None,
        typer.Option(
            "--refs",
            help="Few-shot memory: scored with it, and the calibration is stored inside it.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=f"Calibration file to write when there is no --refs (default: {DEFAULT_CALIBRATION_FILE}).",
            show_default=False,
        ),
    ] = None,
    class_name: ClassOpt = DEFAULT_CLASS,
    prompts: PromptsOpt = None,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pick the score threshold whose false-alarm rate on good parts is at most --fpr.

    Scores the good images as `scan` would (a good image that is also a reference of --refs is
    scored with itself left out of the memory), picks the image threshold and a pixel threshold
    (for the anomalous-area and bounding-box columns of `scan`), shows the score distribution and
    stores the result: inside --refs, or in a calibration file for `scan --calibration`.
    `scan --threshold auto` (the default) then uses it.

    Examples:

      winclip calibrate ./good --class bottle --refs refs.npz --fpr 0.01

      winclip calibrate ./good --class bottle --out bottle-calibration.json

      winclip scan ./new --class bottle --calibration bottle-calibration.json

      winclip calibrate ./good --mode mutual --out mutual-calibration.json

    With --mode mutual the good images are pooled as `scan --mode mutual` pools a folder (the same
    --pool-size, so use as many good images as a scan's pool holds) and the threshold is taken on
    their raw scores; a calibration of one mode is refused by a scan of another.
    """

    def parse() -> CalibrateSpec:
        model = model_args.parse()
        _, mutual = mode_args.parse(refs)
        if mutual is not None and tile_args.tile is not None:
            raise SetupError("--mode mutual scores whole images: it takes no --tile")
        tiling = tile_args.parse(model_args.model)
        check_rate("--fpr", fpr)
        check_rate("--pixel-fpr", pixel_fpr)
        if refs is not None and out is not None:
            raise SetupError("--out is for calibrations without --refs; with --refs the result is stored in the memory")
        preflight.check_input(good_dir)
        calibration_file = out or DEFAULT_CALIBRATION_FILE
        if refs is not None:
            preflight.check_memory_file(refs)
            preflight.check_output_file("--refs", refs)  # the calibration is written into the memory
        else:
            preflight.check_output_file("--out", calibration_file)
        load_vocabulary(prompts)
        preflight.check_model_files(model_args.model, model_args.weights)

        from winclip_cli.jobs.calibrate import CalibrateSpec

        inputs = input_args.parse(tiling)
        text = TextSpec(class_name, prompts, use_cache=not no_cache)
        return CalibrateSpec(
            good_dir, model, inputs, text, fpr, pixel_fpr, refs=refs, out=calibration_file, mutual=mutual
        )

    def job(spec: CalibrateSpec, reporter: Reporter, stop: Callable[[], bool]) -> CalibrateResult:
        from winclip_cli.jobs.calibrate import run_calibrate_job

        return run_calibrate_job(spec, reporter)

    run_command(parse, job, lambda result: _calibration_summary(result, quiet), quiet=quiet)


def _calibration_summary(result: CalibrateResult, quiet: bool) -> int:
    from winclip_cli.core.calibration import histogram

    cal = result.calibration
    console = _table_console()
    if not quiet:
        bins = histogram(result.scores, hi=result.score_range)
        peak = max(count for _, _, count in bins) or 1
        table = Table(title=f"image scores of {plural(cal.n_images, 'good image')}", show_edge=False)
        table.add_column("score", justify="right")
        table.add_column("count", justify="right")
        table.add_column("")
        for lo, hi, count in bins:
            top = hi == result.score_range and cal.threshold == hi
            mark = " <- threshold" if lo <= cal.threshold < hi or top else ""
            table.add_row(f"{lo:.2f}-{hi:.2f}", str(count), "#" * round(30 * count / peak) + mark)
        console.print(table)
    console.print(
        f"threshold [bold]{cal.threshold:.6f}[/] (false alarms on these good images: {cal.achieved_fpr:.2%} "
        f"<= {cal.fpr:.2%}), pixel threshold {cal.pixel_threshold:.6f}; stored in {_escape(str(result.stored_in))}"
    )
    if not cal.enough_images:
        stderr.print(
            f"[yellow]warning:[/] {plural(cal.n_images, 'image')} cannot support a false-alarm rate of {cal.fpr:g}: "
            f"at least {cal.min_images_for_fpr} are needed; the threshold is the highest score seen"
        )
    return EXIT_OK if result.problems.complete else EXIT_UNREADABLE


# ------------------------------------------------------------------------------------------------------ eval


@app.command("eval", epilog=JOB_EXIT_CODES_HELP)
@with_options(model_args=ModelArgs, input_args=InputArgs, mode_args=ModeArgs)
def evaluate(
    root: Annotated[
        Path,
        typer.Argument(
            help="Labelled data: MVTec-AD, VisA (1-class split) or good/ + bad/ folders.", show_default=False
        ),
    ],
    model_args: ModelArgs,
    input_args: InputArgs,
    mode_args: ModeArgs,
    k_shot: Annotated[
        int, typer.Option("--k-shot", min=0, help="Few-shot references per category (0: zero-shot).")
    ] = 0,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Draw the references at random with this seed.", show_default=False)
    ] = None,
    class_name: Annotated[
        str | None,
        typer.Option(
            "--class", "-c", help="Class name for the prompts (default: each category's name).", show_default=False
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.csv and metrics.json.")] = Path(
        "winclip-eval"
    ),
    prompts: PromptsOpt = None,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure how well WinCLIP works on labelled data: image AUROC, AP, F1-max, pixel AUROC, F1-max, PRO.

    Several categories under ROOT are evaluated one by one, each with its folder name as the class.
    Few-shot references are drawn from each category's normal training images (reproducibly with
    --seed) and listed in metrics.json.

    Examples:

      winclip eval /data/mvtec_anomaly_detection

      winclip eval /data/mvtec_anomaly_detection/bottle --k-shot 4 --seed 0 --out eval-bottle

      winclip eval /data/mvtec_anomaly_detection --mode mutual --out eval-mutual

    With --mode mutual each category's test images are scored against each other (pools of at most
    --pool-size, in path order), as MuSc is evaluated; the image metrics use MuSc's final score.
    """

    def parse() -> EvalSpec:
        model = model_args.parse()
        if (mode_args.mode or "").lower() == ScoringMode.FEW_SHOT.value:
            if not k_shot:
                raise SetupError("eval --mode few-shot needs --k-shot N (references drawn per category)")
            mutual = None
        else:
            _, mutual = mode_args.parse(None)
            if mutual is not None and k_shot:
                raise SetupError("--mode mutual takes no --k-shot: it scores the test images against each other")
        preflight.check_input(root, "evaluation data folder")
        preflight.check_output_folder("--out", out)
        load_vocabulary(prompts)
        preflight.check_model_files(model_args.model, model_args.weights)
        preflight.check_evaluation_data(root, k_shot)

        from winclip_cli.jobs.evaluate import EvalSpec

        return EvalSpec(
            root,
            out,
            model,
            input_args.parse(),
            class_name=class_name,
            prompts=prompts,
            use_cache=not no_cache,
            k_shot=k_shot,
            seed=seed,
            mutual=mutual,
        )

    def job(spec: EvalSpec, reporter: Reporter, stop: Callable[[], bool]) -> list[CategoryResult]:
        from winclip_cli.jobs.evaluate import run_eval_job

        return run_eval_job(spec, reporter)

    def summary(results: list[CategoryResult]) -> int:
        from winclip_cli.jobs.evaluate import METRICS, mean_metrics

        table = Table(title=f"WinCLIP {'zero-shot' if not k_shot else f'{k_shot}-shot'} on {_escape(str(root))}")
        table.add_column("category")
        table.add_column("images", justify="right")
        for name in METRICS:
            table.add_column(name.replace("_", " "), justify="right")

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        for r in results:
            counts = f"{r.n_images} ({r.n_anomalous} bad)"
            table.add_row(_escape(r.name), counts, *(fmt(r.metrics[m]) for m in METRICS))
        mean = mean_metrics(results)
        table.add_row("[bold]mean[/]", str(sum(r.n_images for r in results)), *(fmt(mean[m]) for m in METRICS))
        _table_console().print(table)
        for r in results:
            for metric, why in r.notes.items():
                stderr.print(f"[yellow]note:[/] {_escape(r.name)} {metric}: {_escape(why)}")
        if not quiet:
            stderr.print(f"metrics written to {_escape(str(out / 'metrics.csv'))} and metrics.json")
        return EXIT_UNREADABLE if any(r.errors for r in results) else EXIT_OK

    run_command(parse, job, summary, quiet=quiet)


# ----------------------------------------------------------------------------------------------- merge, report


MERGE_EXIT_CODES_HELP = _paragraph("""
Exit codes: 0 merged, every shard present and complete; 2 usage or setup error (folders of different
configurations, no run.json); 3 merged, but shards are missing, repeated or interrupted (named above).
""")

REPORT_EXIT_CODES_HELP = _paragraph("""
Exit codes: 0 written; 2 usage or setup error (no such folder, no scores.csv, unwritable).
""")


@app.command(epilog=MERGE_EXIT_CODES_HELP)
def merge(
    folders: Annotated[list[Path], typer.Argument(help="Output folders of sharded scans (--shard K/N).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged output.")] = Path("winclip-merged"),
    report: Annotated[bool, typer.Option("--report", help="Also write OUT/report.html.")] = False,
) -> None:
    """Join the output folders of sharded scans into one output folder (scores.csv, heatmaps, run.json).

    OUT is locked like a scan's: merging into a folder that a scan, watch or merge is writing exits 4.

    Example:

      winclip merge results/shard-1 results/shard-2 results/shard-3 --out results/all --report
    """
    from winclip_cli.jobs.merge import merge_outputs

    with user_errors():
        result = merge_outputs(folders, out)
        if report:
            from winclip_cli.report.page import build_report

            build_report(out)
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {_escape(warning)}")
    if result.duplicates:
        stderr.print(
            f"[yellow]warning:[/] {plural(result.duplicates, 'row')} appeared in several folders; the first was kept"
        )
    stderr.print(
        f"{plural(len(result.rows), 'row')} from {plural(len(folders), 'folder')} "
        f"-> {_escape(str(OutputLayout(out).scores_csv))}"
    )
    # a merge that lacks shards is no complete result: a script must not take it for one
    raise typer.Exit(EXIT_UNREADABLE if result.warnings else EXIT_OK)


@app.command("report", epilog=REPORT_EXIT_CODES_HELP)
def report_command(
    out_dir: Annotated[Path, typer.Argument(help="An output folder of `winclip scan` (or `winclip merge`).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the report's path.")] = False,
) -> None:
    """(Re)build OUT_DIR/report.html: a self-contained page of the run, worst images first.

    Example:

      winclip report winclip-out && xdg-open winclip-out/report.html
    """
    from winclip_cli.report.page import build_report

    with user_errors():
        if not out_dir.exists():
            raise SetupError(f"output folder not found: {out_dir}")
        if not OutputLayout(out_dir).scores_csv.is_file():
            raise SetupError(f"{out_dir} has no scores.csv (is it the --out folder of a scan?)")
        page = build_report(out_dir)
    if not quiet:
        stderr.print(f"report: {_escape(str(page))}")


# --------------------------------------------------------------------------------------------------- prompts


PROMPTS_EXIT_CODES_HELP = _paragraph("""
Exit codes: 0 printed (also when the reader stops early, e.g. `| head`); 2 usage error (a --prompts
file that cannot be read or has a mistake, named with its line).
""")


@app.command(epilog=PROMPTS_EXIT_CODES_HELP)
def prompts(
    class_name: ClassOpt = DEFAULT_CLASS,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="TOML file that extends or replaces the prompt vocabulary: its states and templates "
            "(mode, normal, anomalous, templates; see the README's 'Prompts and custom vocabularies').",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the ensemble as one JSON document.")] = False,
) -> None:
    """Show the prompt ensemble that `scan` compares images against.

    Examples:

      winclip prompts --class bottle

      winclip prompts --class screw --prompts my-defects.toml --json
    """
    with user_errors():
        ensemble = load_vocabulary(prompts_file).ensemble(class_name or DEFAULT_CLASS)
    if json_output:
        print(json.dumps(ensemble.as_dict(), indent=2, ensure_ascii=False))
        return
    out = Console(highlight=False)
    vocab = ensemble.vocabulary
    out.print(
        f"Prompt ensemble for class [bold]{_escape(ensemble.class_name)}[/] "
        f"(vocabulary: {_escape(vocab.source)}, sha256 {ensemble.sha256[:12]})"
    )
    states = Table(title="States ({} = class name)", show_lines=False)
    states.add_column("kind")
    states.add_column("#", justify="right")
    states.add_column("state")
    for kind, items in (("normal", vocab.normal_states), ("anomalous", vocab.anomalous_states)):
        for i, state in enumerate(items, 1):
            states.add_row(kind, str(i), _escape(state))
    out.print(states)
    templates = Table(title="Templates ({} = state)")
    templates.add_column("#", justify="right")
    templates.add_column("template")
    for i, template in enumerate(vocab.templates, 1):
        templates.add_row(str(i), _escape(template))
    out.print(templates)
    for kind, sentences in (("normal", ensemble.normal), ("anomalous", ensemble.anomalous)):
        table = Table(title=f"{kind} sentences: {len(sentences)}")
        table.add_column("#", justify="right")
        table.add_column("sentence")
        for i, sentence in enumerate(sentences, 1):
            table.add_row(str(i), _escape(sentence))
        out.print(table)
    out.print(f"{len(ensemble.normal)} normal and {len(ensemble.anomalous)} anomalous sentences")


def main() -> None:
    """The console script. A reader that stops early (`winclip prompts | head -1`) is no error for
    commands that only print: exit 0. A scan whose --json reader goes away stops scoring: exit 141."""
    stdout_before = _stdout_identity()
    try:
        app(prog_name="winclip")
    except SystemExit as exit_:
        if exit_.code == 1 and _stdout_reader_gone(stdout_before):
            raise SystemExit(EXIT_OK) from None
        raise


def _stdout_identity() -> tuple[int, int] | None:
    try:
        stat = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return stat.st_dev, stat.st_ino


def _stdout_reader_gone(before: tuple[int, int] | None) -> bool:
    """Both ways the libraries end a write into a closed pipe with exit 1: click swaps stdout for a
    wrapper that swallows the final flush; rich points the stdout descriptor at /dev/null."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    devnull = (null.st_dev, null.st_ino)
    return before is not None and before != devnull and _stdout_identity() == devnull


if __name__ == "__main__":
    main()
