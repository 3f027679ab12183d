"""The job kernel: every command that runs the model opens a :class:`Session` and streams files through it.

``scan``, ``watch``, ``build-refs``, ``calibrate`` and ``eval`` differ in what they do with a scored or
embedded file, not in how they get there: the model and its text embeddings, the few-shot memory,
the preprocessing (input size, pixel limit, tiling), the decoding threads and their look-ahead, the
batching, and what counts as an incomplete run are decided here once, so they cannot drift apart.

    files --Session.scored()/embedded()--> Decoded items in input order, ``outputs`` filled
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from winclip_cli.core.backbone import Backbone
from winclip_cli.core.batching import resolve_batch_size
from winclip_cli.core.engine import Engine, build_backbone, build_engine
from winclip_cli.core.winclip import WinClipScorer, WindowEncoder
from winclip_cli.errors import SetupError
from winclip_cli.io.layout import OutputLayout
from winclip_cli.io.memory import MemoryFile, attach_memory
from winclip_cli.io.outputs import ResultRow
from winclip_cli.jobs.allocator import keep_freed_memory
from winclip_cli.jobs.batches import embedding_fn, processed_stream, scoring_fn
from winclip_cli.jobs.decode import Decoded, Preprocessing, decode_stream
from winclip_cli.jobs.threads import BUDGET, ThreadBudget
from winclip_cli.spec import InputSpec, ModelSpec, MutualSpec, TextSpec

if TYPE_CHECKING:
    from winclip_cli.core.musc import MutualFeatureExtractor


class Reporter(Protocol):
    """What a job tells its user; the CLI implements it with rich, tests with a list."""

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def start(self, description: str, total: int) -> None: ...

    def advance(self) -> None: ...

    def row(self, row: ResultRow) -> None: ...


class SilentReporter:
    """A Reporter that keeps its messages in a list (tests, Python callers)."""

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


def never() -> bool:
    return False


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class InputProblems:
    """What a job could not read: files (with their reasons) and folders that could not be listed.

    Every job reports these the same way: a run with any of them is incomplete (exit code 3), and
    everything else was still used.
    """

    failures: list[Decoded] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # "folder: reason"

    @property
    def complete(self) -> bool:
        return not self.failures and not self.unlisted


def discover(directory: Path, out: Path, reporter: Reporter, unlisted: list[str] | None = None) -> list[Path]:
    """The image files under ``directory``; folders that cannot be listed are warned about and,
    when ``unlisted`` is given, appended to it (the job reports them in its exit code)."""
    from winclip_cli.io.images import discover_images

    if not directory.exists():
        raise SetupError(f"input not found: {directory}")
    # OUT is never scanned, whatever its relation to the input: a separate folder or one inside the
    # input is left out whole; when OUT is the input (or holds it), winclip's own folders in OUT are.
    own = list(OutputLayout(out).own_folders)
    real_input = directory.resolve()
    for folder in own:
        if real_input.is_relative_to(folder.resolve()):
            raise SetupError(f"the input {directory} lies inside winclip's own outputs in {folder}; use another --out")
    found = discover_images(directory, exclude=[out, *own])
    for folder, reason in found.skipped_dirs:
        reporter.warn(f"cannot list {folder}: {reason}")
        if unlisted is not None:
            unlisted.append(f"{folder}: {reason}")
    return found.files


# ------------------------------------------------------------------------------------------------ session


def decoding_workers(requested: int | None, device: torch.device) -> int | None:
    """Decoding threads: as asked, else automatic; a GPU consumes what many decoding threads make."""
    if requested is None and torch.device(device).type == "cuda":
        return max(1, min(16, os.cpu_count() or 1))
    return requested


@dataclass
class Session:
    """A loaded model ready to stream files: backbone, window encoder, scorer (with text and memory where
    the job has them), preprocessing, how files are decoded and batched, and the thread budget."""

    backbone: Backbone
    encoder: WindowEncoder
    prep: Preprocessing
    batch_size: int
    workers: int | None
    scorer: WinClipScorer | None = None  # None for a session that only embeds (build-refs needs no text)
    engine: Engine | None = None
    memory: MemoryFile | None = None
    threads: ThreadBudget = BUDGET  # torch's thread count is the process's: so is the budget
    # mode mutual: the patch tokens and class embedding each image adds to its pool (jobs/mutual.py)
    extractor: MutualFeatureExtractor | None = None
    mutual: MutualSpec | None = None

    @classmethod
    def open(
        cls,
        model: ModelSpec,
        inputs: InputSpec,
        *,
        text: TextSpec | None,
        memory: MemoryFile | None = None,
        reporter: Reporter | None = None,
        backbone: Backbone | None = None,
        mutual: MutualSpec | None = None,
    ) -> Session:
        """Load the model (or reuse ``backbone``). With ``text`` the session scores (and compares with
        ``memory`` when given); without, it only embeds and loads no text. With ``mutual`` it also
        extracts the features mutual scoring compares (``--mode mutual``: jobs/mutual.py)."""
        engine = scorer = None
        if text is None:
            if memory is not None:
                raise ValueError("a memory needs a scoring session (text)")
            backbone = backbone or build_backbone(model)
            encoder = WindowEncoder(backbone.model.visual, model.scales)
        else:
            engine = build_engine(model, text.class_name, text.prompts, use_cache=text.use_cache, backbone=backbone)
            backbone, scorer, encoder = engine.backbone, engine.scorer, engine.scorer.encoder
        if engine is not None and memory is not None:
            for warning in attach_memory(engine, memory, inputs.tiling):
                if reporter is not None:
                    reporter.warn(warning)
        # on the CPU the model's activations reuse the heap (jobs/allocator.py); the batch rule depends on it
        memory_kept = keep_freed_memory() if backbone.device.type == "cpu" else False
        extractor = None
        if mutual is not None:
            from winclip_cli.core.musc import MutualFeatureExtractor

            if inputs.tiling.enabled:
                raise SetupError("--mode mutual scores whole images: it takes no --tile")
            try:
                extractor = MutualFeatureExtractor(backbone.model.visual, mutual.layers.blocks)
            except (TypeError, ValueError) as err:
                raise SetupError(f"--layers {mutual.layers}: {err}") from None
        return cls(
            extractor=extractor,
            mutual=mutual,
            backbone=backbone,
            encoder=encoder,
            prep=Preprocessing.for_backbone(backbone, inputs),
            batch_size=resolve_batch_size(
                inputs.batch_size,
                backbone.device.type,
                backbone.model.visual,
                model.scales,
                backbone.precision,
                memory_kept,
            ),
            workers=decoding_workers(inputs.workers, backbone.device),
            scorer=scorer,
            engine=engine,
            memory=memory,
        )

    @property
    def memory_id(self) -> str:
        return self.memory.content_id if self.memory is not None else ""

    def stream(
        self,
        files: Sequence[tuple[Path, str]],
        process: Callable[[torch.Tensor, list[Decoded]], list],
        *,
        with_stamp: bool = False,
        should_stop: Callable[[], bool] = never,
    ) -> Generator[Decoded, None, None]:
        """(path, name) files decoded ahead by threads, batched through ``process``, in input order."""
        decoded = decode_stream(
            files,
            self.prep,
            workers=self.workers,
            lookahead=max(2 * self.batch_size, 4),
            with_stamp=with_stamp,
            model_on_cpu=torch.device(self.backbone.device).type == "cpu",
            threads=self.threads,
        )
        return processed_stream(decoded, process, self.batch_size, should_stop, threads=self.threads)

    def scored(
        self,
        files: Sequence[tuple[Path, str]],
        *,
        exclude_for: Callable[[Decoded], int] | None = None,
        with_stamp: bool = False,
        should_stop: Callable[[], bool] = never,
    ) -> Generator[Decoded, None, None]:
        """Files with ``outputs`` = [(image score, grid map)] per model input (one, or one per tile).

        ``exclude_for`` gives, per file, the memory reference it must not be compared with (-1: none);
        ``with_stamp`` hashes each file that decodes (the run state records it)."""
        if self.scorer is None:
            raise ValueError("this session only embeds: open it with text to score")
        process = scoring_fn(self.scorer, self.backbone.device, self.backbone.dtype, exclude_for)
        return self.stream(files, process, with_stamp=with_stamp, should_stop=should_stop)

    def embedded(self, files: Sequence[tuple[Path, str]]) -> Generator[Decoded, None, None]:
        """Files with ``outputs`` = [(patch tokens, [window embeddings per scale])] per model input."""
        return self.stream(files, embedding_fn(self.encoder, self.backbone.device, self.backbone.dtype))

    def describe(self) -> str:
        backbone = self.backbone
        return f"{backbone.architecture} on {backbone.device} {backbone.precision}, batch {self.batch_size}"
