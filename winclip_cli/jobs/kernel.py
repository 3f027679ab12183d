"""The job kernel: every command that runs the model opens a :class:`Session` and streams files through it.

``scan``, ``watch``, ``build-refs``, ``calibrate`` and ``eval`` differ in what they do with a scored or
embedded file, not in how they get there: the model and its text embeddings, the few-shot memory,
the preprocessing (input size, pixel limit, tiling), the decoding threads and their look-ahead, the
batching, and what counts as an incomplete run are decided here once, so they cannot drift apart.

    files --Session.scored()/embedded()--> Decoded items in input order, ``outputs`` filled
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from winclip_cli.core.backbone import Backbone
from winclip_cli.core.batching import resolve_batch_size
from winclip_cli.core.engine import Engine, ModelOptions, build_backbone, build_engine
from winclip_cli.core.winclip import WinClipScorer
from winclip_cli.errors import SetupError
from winclip_cli.io.layout import OutputLayout
from winclip_cli.io.memory import MemoryFile, attach_memory
from winclip_cli.io.outputs import ResultRow
from winclip_cli.jobs.pipeline import (
    Decoded,
    InputOptions,
    Preprocessing,
    decode_stream,
    embedding_fn,
    processed_stream,
    scoring_fn,
)


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
    """A loaded model ready to stream files: backbone, scorer (with text and memory where the job has
    them), preprocessing, and how files are decoded and batched."""

    backbone: Backbone
    scorer: WinClipScorer
    prep: Preprocessing
    batch_size: int
    workers: int | None
    engine: Engine | None = None  # None for a session that only embeds (build-refs needs no text)
    memory: MemoryFile | None = None

    @classmethod
    def open(
        cls,
        model: ModelOptions,
        inputs: InputOptions,
        *,
        class_name: str | None,
        prompts: Path | None = None,
        use_cache: bool = True,
        memory: MemoryFile | None = None,
        reporter: Reporter | None = None,
        backbone: Backbone | None = None,
    ) -> Session:
        """Load the model (or reuse ``backbone``); ``class_name=None`` opens an embedding-only session."""
        engine = None
        if class_name is None:
            backbone = backbone or build_backbone(model)
            # references need no text: this scorer only embeds
            scorer = WinClipScorer(backbone.model.visual, torch.zeros(2, 1), scales=model.scales)
        else:
            engine = build_engine(model, class_name, prompts, use_cache=use_cache, backbone=backbone)
            backbone, scorer = engine.backbone, engine.scorer
        if memory is not None:
            assert engine is not None, "a memory needs a scoring session"
            for warning in attach_memory(engine, memory, tile=inputs.tile, tile_overlap=inputs.tile_overlap):
                if reporter is not None:
                    reporter.warn(warning)
        return cls(
            backbone=backbone,
            scorer=scorer,
            prep=inputs.preprocessing(backbone),
            batch_size=resolve_batch_size(inputs.batch_size, backbone.device.type, backbone.model.visual, model.scales),
            workers=decoding_workers(inputs.workers, backbone.device),
            engine=engine,
            memory=memory,
        )

    @classmethod
    def for_job(
        cls,
        options: Any,
        *,
        memory: MemoryFile | None = None,
        reporter: Reporter | None = None,
        backbone: Backbone | None = None,
    ) -> Session:
        """The scoring session of a job whose options (InputOptions) also carry ``model``, ``class_name``,
        ``prompts`` and ``use_cache``: scan, watch and calibrate."""
        return cls.open(
            options.model,
            options,
            class_name=options.class_name,
            prompts=options.prompts,
            use_cache=options.use_cache,
            memory=memory,
            reporter=reporter,
            backbone=backbone,
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
    ) -> Iterator[Decoded]:
        """(path, name) files decoded ahead by threads, batched through ``process``, in input order."""
        decoded = decode_stream(
            files,
            self.prep,
            workers=self.workers,
            lookahead=max(2 * self.batch_size, 4),
            with_stamp=with_stamp,
            model_on_cpu=torch.device(self.backbone.device).type == "cpu",
        )
        return processed_stream(decoded, process, self.batch_size, should_stop)

    def scored(
        self,
        files: Sequence[tuple[Path, str]],
        *,
        exclude_for: Callable[[Decoded], int] | None = None,
        with_stamp: bool = False,
        should_stop: Callable[[], bool] = never,
    ) -> Iterator[Decoded]:
        """Files with ``outputs`` = [(image score, grid map)] per model input (one, or one per tile).

        ``exclude_for`` gives, per file, the memory reference it must not be compared with (-1: none);
        ``with_stamp`` hashes each file that decodes (the run state records it)."""
        process = scoring_fn(self.scorer, self.backbone.device, self.backbone.dtype, exclude_for)
        return self.stream(files, process, with_stamp=with_stamp, should_stop=should_stop)

    def embedded(self, files: Sequence[tuple[Path, str]]) -> Iterator[Decoded]:
        """Files with ``outputs`` = [(patch tokens, [window embeddings per scale])] per model input."""
        return self.stream(files, embedding_fn(self.scorer, self.backbone.device, self.backbone.dtype))

    def describe(self) -> str:
        backbone = self.backbone
        return f"{backbone.architecture} on {backbone.device} {backbone.precision}, batch {self.batch_size}"


def calibration_fingerprint(session: Session) -> dict[str, Any]:
    """What a calibration depends on: the same fingerprint must hold when it is used."""
    engine, prep = session.engine, session.prep
    assert engine is not None
    return {
        "architecture": engine.backbone.architecture,
        "weights_sha256": engine.backbone.weights_sha256,
        "precision": engine.backbone.precision,
        "scales": list(engine.scorer.scales),
        "vocabulary_sha256": engine.ensemble.sha256,
        "memory": session.memory_id,
        "tile": prep.tile,
        "tile_overlap": prep.tile_overlap if prep.tile is not None else None,
    }
