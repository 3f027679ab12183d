"""The ``winclip`` command line: parses options, prints progress and summaries, returns exit codes.

Nothing here computes a score. Heavy modules (torch, open_clip) are imported inside the commands
that need them, so ``winclip --help`` and ``winclip prompts`` start instantly.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import (
    EXIT_ANOMALY,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    SetupError,
    WinclipError,
)
from .prompts import DEFAULT_CLASS, load_vocabulary

EXIT_CODES_HELP = """
Exit codes: 0 done; 1 at least one image scored over the threshold (only with --fail-on-anomaly);
2 usage or setup error (bad option, no images, weights or memory unusable); 3 some files could not
be read (every other image was scored and written); 130 interrupted (results so far are kept).
"""

app = typer.Typer(
    name="winclip",
    help="Find defects in folders of product photos without training (WinCLIP zero-/few-shot).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {_escape(message)}")
    return typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@contextmanager
def user_errors():
    """Domain errors become one line on stderr and their exit code; never a traceback."""
    try:
        yield
    except WinclipError as err:
        raise fail(str(err), err.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


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

ModelOpt = Annotated[
    str,
    typer.Option("--model", help="open_clip architecture name, or path to an open_clip model-config JSON."),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Pretrained tag (downloaded once into the cache) or a local checkpoint file (.pt/.bin/.safetensors) "
        "for offline machines. Default: $WINCLIP_WEIGHTS, else laion400m_e31.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, then Apple MPS, then CPU), cuda, mps or cpu.")]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="Visual tower precision: fp32, bf16, fp16, or auto (bf16/fp16 where fast)."),
]
ScalesOpt = Annotated[str, typer.Option("--scales", help="Window sizes in patches, e.g. '2,3'.")]
ClassOpt = Annotated[str, typer.Option("--class", "-c", help="Object name used in the prompts, e.g. bottle.")]
PromptsOpt = Annotated[
    Path | None,
    typer.Option("--prompts", help="TOML file that extends or replaces the prompt vocabulary (see `winclip prompts`)."),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the text-embedding cache.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model batch.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary (errors still print).")]
MaxPixelsOpt = Annotated[
    int, typer.Option("--max-pixels", min=1, help="Refuse images larger than this many pixels (decompression bombs).")
]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Decoding threads (0: automatic).")]


def _model_options(model: str, weights: str | None, device: str, precision: str, scales: str):
    from .engine import ModelOptions, parse_scales

    return ModelOptions(model=model, weights=weights, device=device, precision=precision, scales=parse_scales(scales))


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


def _find_inputs(directory: Path, exclude: list[Path]) -> list[Path]:
    from .images import discover_images

    if not directory.exists():
        raise SetupError(f"input not found: {directory}")
    found = discover_images(directory, exclude=exclude)
    for folder, reason in found.skipped_dirs:
        stderr.print(f"[yellow]warning:[/] cannot list {_escape(str(folder))}: {_escape(reason)}")
    if not found.files:
        raise SetupError(f"no images found under {directory} (png, jpg, jpeg, bmp, tif, tiff, webp)")
    return found.files


class StopFlag:
    """SIGINT/SIGTERM ask the scan to stop after the current batch; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
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
                signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------------ scan


@app.command(epilog=EXIT_CODES_HELP)
def scan(
    directory: Annotated[Path, typer.Argument(help="Folder of images (searched recursively) or a single image.")],
    class_name: ClassOpt = DEFAULT_CLASS,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for scores.csv and heatmaps.")] = Path(
        "winclip-out"
    ),
    threshold: Annotated[
        float, typer.Option("--threshold", help="Image score above which an image is anomalous.")
    ] = 0.5,
    refs: Annotated[
        Path | None, typer.Option("--refs", help="Few-shot reference memory (.npz) from `winclip build-refs`.")
    ] = None,
    fail_on_anomaly: Annotated[
        bool, typer.Option("--fail-on-anomaly", help="Exit with code 1 when any image scores over the threshold.")
    ] = False,
    save_maps: Annotated[bool, typer.Option("--save-maps", help="Also write raw float32 maps as TIFF.")] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per image on stdout.")] = False,
    model: ModelOpt = "ViT-B-16-plus-240",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    scales: ScalesOpt = "2,3",
    prompts: PromptsOpt = None,
    no_cache: NoCacheOpt = False,
    batch_size: BatchOpt = 8,
    max_pixels: MaxPixelsOpt = 80_000_000,
    workers: WorkersOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Score every image in DIRECTORY: anomaly score, pass/fail label and a heatmap per image.

    Writes OUT/scores.csv (one row per file, bad files included), a heatmap PNG per image under
    OUT/heatmaps/ (mirroring the input's subfolders) and OUT/run.json (model, weights, device,
    vocabulary: what is needed to reproduce the run).

    Examples:

      winclip scan ./images --class bottle

      winclip scan ./images --class bottle --refs refs.npz --out results --fail-on-anomaly

      winclip scan ./images --weights ~/models/vit_b_16_plus_240-laion400m_e31.pt --json > scores.jsonl
    """
    with user_errors():
        if not 0.0 <= threshold <= 1.0:
            raise SetupError(f"--threshold must be between 0 and 1, got {threshold}")
        code = _scan(
            directory,
            class_name,
            out,
            threshold,
            refs,
            save_maps,
            json_lines,
            model,
            weights,
            device,
            precision,
            scales,
            prompts,
            no_cache,
            batch_size,
            max_pixels,
            workers,
            quiet,
            fail_on_anomaly,
        )
    raise typer.Exit(code)


def _scan(
    directory: Path,
    class_name: str,
    out: Path,
    threshold: float,
    refs: Path | None,
    save_maps: bool,
    json_lines: bool,
    model: str,
    weights: str | None,
    device: str,
    precision: str,
    scales: str,
    prompts: Path | None,
    no_cache: bool,
    batch_size: int,
    max_pixels: int,
    workers: int,
    quiet: bool,
    fail_on_anomaly: bool,
) -> int:
    options = _model_options(model, weights, device, precision, scales)
    load_vocabulary(prompts)  # a bad vocabulary fails before anything slow happens
    files = _find_inputs(directory, exclude=[out])
    started = time.perf_counter()

    from .engine import build_engine
    from .outputs import write_text_atomic
    from .pipeline import RowContext, run_scan

    memory_info = None
    if refs is not None:
        from .memory import load_memory

        memory_info = load_memory(refs)  # refuse a broken memory before loading the model
    engine = build_engine(options, class_name, prompts, use_cache=not no_cache)
    backbone = engine.backbone
    context = RowContext(threshold=threshold, mode="zero-shot", vocabulary_sha256=engine.ensemble.sha256)
    if memory_info is not None:
        from .memory import attach_memory

        for warning in attach_memory(engine, memory_info):
            stderr.print(f"[yellow]warning:[/] {_escape(warning)}")
        context.mode, context.k_shot = "few-shot", memory_info.k
        context.refs, context.refs_sha256 = str(refs), memory_info.sha256
    if not quiet:
        mode = f"few-shot k={context.k_shot}" if memory_info else "zero-shot"
        stderr.print(
            f"winclip {__version__}: {len(files)} images, {backbone.architecture} ({_escape(backbone.weights)}) "
            f"on {backbone.device} {backbone.precision}, {mode}, class '{_escape(engine.ensemble.class_name)}'"
        )
    run_info: dict[str, Any] = {
        "tool": "winclip",
        "version": __version__,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": str(directory),
        "class_name": engine.ensemble.class_name,
        **backbone.identity,
        "device": str(backbone.device),
        "scales": list(engine.scorer.scales),
        "threshold": threshold,
        "vocabulary": engine.ensemble.vocabulary.source,
        "vocabulary_sha256": engine.ensemble.sha256,
        "mode": context.mode,
        "refs": context.refs,
        "refs_sha256": context.refs_sha256,
        "k_shot": context.k_shot,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "run.json", json.dumps(run_info, indent=2) + "\n")

    stop = StopFlag()
    with _progress(quiet) as progress, stop.installed():
        task = progress.add_task("scanning", total=len(files))

        def on_row(row) -> None:
            progress.advance(task)
            if row.status == "error":
                progress.console.print(f"[yellow]warning:[/] {_escape(row.path)}: {_escape(row.error)}")
            if json_lines:
                sys.stdout.write(json.dumps(row.as_json_dict(), ensure_ascii=False) + "\n")
                sys.stdout.flush()

        summary = run_scan(
            engine.scorer,
            files,
            directory,
            out,
            context,
            size=backbone.image_size,
            mean=backbone.mean,
            std=backbone.std,
            device=backbone.device,
            dtype=backbone.dtype,
            batch_size=batch_size,
            save_maps=save_maps,
            max_pixels=max_pixels,
            workers=workers or None,
            on_row=on_row,
            should_stop=stop,
        )
    seconds = time.perf_counter() - started
    run_info.update(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
        images=summary.images,
        scored=summary.scored,
        anomalies=summary.anomalies,
        errors=summary.errors,
        interrupted=stop.requested,
    )
    write_text_atomic(out / "run.json", json.dumps(run_info, indent=2) + "\n")
    if not quiet:
        rate = summary.scored / seconds if seconds > 0 else 0.0
        stderr.print(
            f"[bold]{summary.images}[/] images: [bold]{summary.anomalies}[/] anomalous, "
            f"{summary.scored - summary.anomalies} normal, [bold]{summary.errors}[/] errors "
            f"in {seconds:.1f} s ({rate:.2f} images/s) -> {_escape(str(out / 'scores.csv'))}"
        )
    if stop.requested:
        return EXIT_INTERRUPTED
    if fail_on_anomaly and summary.anomalies:
        return EXIT_ANOMALY
    if summary.errors:
        return EXIT_UNREADABLE
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ build-refs


@app.command("build-refs", epilog=EXIT_CODES_HELP)
def build_refs(
    sources: Annotated[
        list[Path], typer.Argument(help="Folders (searched recursively) and/or files of normal images.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Memory file to write (.npz).")] = Path("refs.npz"),
    k: Annotated[
        int | None,
        typer.Option("--k", min=1, help="Use k of the images (default: all): the first k, or a --seed sample."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Draw the k images at random with this seed.")] = None,
    append: Annotated[
        bool, typer.Option("--append", help="Add to an existing memory (same model and scales); skips known files.")
    ] = False,
    class_name: ClassOpt = DEFAULT_CLASS,
    model: ModelOpt = "ViT-B-16-plus-240",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    scales: ScalesOpt = "2,3",
    prompts: PromptsOpt = None,
    batch_size: BatchOpt = 8,
    max_pixels: MaxPixelsOpt = 80_000_000,
    workers: WorkersOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Embed k normal images into a reference memory for few-shot scanning (`scan --refs`).

    Each reference is embedded exactly as `scan` embeds an image: its patch tokens and the window
    embeddings of every scale are stored, with the model, weights hash and file hashes, in one .npz.

    Examples:

      winclip build-refs sample_data/fabric/good --out fabric-refs.npz --class fabric

      winclip build-refs ./good --k 4 --seed 0 --out refs.npz

      winclip build-refs ./more-good --out refs.npz --append
    """
    with user_errors():
        code = _build_refs(
            sources,
            out,
            k,
            seed,
            append,
            class_name,
            model,
            weights,
            device,
            precision,
            scales,
            prompts,
            batch_size,
            max_pixels,
            workers,
            quiet,
        )
    raise typer.Exit(code)


def _reference_inputs(sources: list[Path], out: Path) -> list[tuple[Path, str]]:
    """(path, recorded name) of every reference image; names are relative to the folder given."""
    inputs: list[tuple[Path, str]] = []
    for source in sources:
        if source.is_dir():
            for path in _find_inputs(source, exclude=[out]):
                inputs.append((path, (Path(source.name) / path.relative_to(source)).as_posix()))
        elif source.is_file():
            inputs.append((source, source.as_posix()))
        else:
            raise SetupError(f"reference source not found: {source}")
    return inputs


def _build_refs(
    sources: list[Path],
    out: Path,
    k: int | None,
    seed: int | None,
    append: bool,
    class_name: str,
    model: str,
    weights: str | None,
    device: str,
    precision: str,
    scales: str,
    prompts: Path | None,
    batch_size: int,
    max_pixels: int,
    workers: int,
    quiet: bool,
) -> int:
    import random

    options = _model_options(model, weights, device, precision, scales)
    vocabulary = load_vocabulary(prompts)
    inputs = _reference_inputs(sources, out)
    if k is not None and k < len(inputs):
        if seed is not None:
            inputs = sorted(random.Random(seed).sample(inputs, k), key=lambda item: item[1])
        else:
            inputs = inputs[:k]
    started = time.perf_counter()

    from .engine import build_backbone
    from .hashing import sha256_file
    from .memory import build_metadata, check_compatible, describe_model, load_memory, save_memory
    from .pipeline import embed_references
    from .winclip import WinClipScorer

    existing = load_memory(out) if append and out.exists() else None
    hashes: dict[Path, str] = {}
    known = existing.reference_hashes if existing else set()
    fresh: list[tuple[Path, str]] = []
    skipped = 0
    for path, name in inputs:
        try:
            digest = sha256_file(path)
        except OSError as err:
            raise SetupError(f"cannot read reference {path}: {err.strerror or err}") from None
        if digest in known or digest in hashes.values():
            skipped += 1
            continue
        hashes[path] = digest
        fresh.append((path, name))

    backbone = build_backbone(options)
    import torch

    dummy_text = torch.zeros(2, 1)  # references need no text: the scorer is only used to embed
    scorer = WinClipScorer(backbone.model.visual, dummy_text, scales=options.scales)
    model_info = describe_model(backbone.identity, backbone.image_size, scorer.scales, scorer.grid_size)
    if existing is not None:
        for warning in check_compatible(existing, model_info):
            stderr.print(f"[yellow]warning:[/] {_escape(warning)}")
    if not quiet:
        stderr.print(
            f"winclip {__version__}: embedding {len(fresh)} references with {backbone.architecture} "
            f"on {backbone.device} {backbone.precision}" + (f" ({skipped} already known, skipped)" if skipped else "")
        )
    with _progress(quiet) as progress:
        task = progress.add_task("embedding references", total=len(fresh))

        def on_item(item) -> None:
            progress.advance(task)
            if item.error:
                progress.console.print(f"[yellow]warning:[/] {_escape(item.relpath)}: {_escape(item.error)}")

        embedded = embed_references(
            scorer,
            fresh,
            size=backbone.image_size,
            mean=backbone.mean,
            std=backbone.std,
            device=backbone.device,
            dtype=backbone.dtype,
            batch_size=batch_size,
            max_pixels=max_pixels,
            workers=workers or None,
            on_item=on_item,
        )
    import numpy as np

    references = [
        {"path": name, "size": path.stat().st_size, "sha256": hashes[path]}
        for name, path in zip(embedded.names, embedded.paths, strict=True)
    ]
    if existing is None and not references:
        raise SetupError("no reference image could be embedded; nothing written")
    patches = np.stack(embedded.patches) if references else np.zeros((0, *existing.patches.shape[1:]), np.float32)
    windows = {
        s: (
            np.stack([w[i] for w in embedded.windows])
            if references
            else np.zeros((0, *existing.windows[s].shape[1:]), np.float32)
        )
        for i, s in enumerate(scorer.scales)
    }
    if existing is not None:
        references = existing.metadata["references"] + references
        patches = np.concatenate([existing.patches, patches])
        windows = {s: np.concatenate([existing.windows[s], windows[s]]) for s in scorer.scales}
    metadata = build_metadata(
        model_info,
        class_name,
        vocabulary.ensemble(class_name).sha256,
        references,
        patch_dim=int(patches.shape[-1]),
        embed_dim=int(next(iter(windows.values())).shape[-1]),
    )
    save_memory(out, metadata, patches, windows)
    seconds = time.perf_counter() - started
    if not quiet:
        size_mb = out.stat().st_size / 1e6
        stderr.print(
            f"[bold]k={len(references)}[/] references in {_escape(str(out))} ({size_mb:.1f} MB), "
            f"{len(embedded.names)} added, {skipped} skipped, {len(embedded.failures)} unreadable, {seconds:.1f} s"
        )
    return EXIT_UNREADABLE if embedded.failures else EXIT_OK


# --------------------------------------------------------------------------------------------------- prompts


@app.command()
def prompts(
    class_name: ClassOpt = DEFAULT_CLASS,
    prompts_file: PromptsOpt = None,
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
    app()


if __name__ == "__main__":
    main()
