"""A whole ``winclip build-refs`` run: pick k references, embed them as a scan would, write the memory."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from winclip_cli import __version__
from winclip_cli.core.prompts import load_vocabulary
from winclip_cli.core.winclip import WindowEncoder
from winclip_cli.errors import SetupError
from winclip_cli.io.hashing import sha256_file
from winclip_cli.io.images import discover_images
from winclip_cli.io.memory import MemoryFile, build_metadata, check_compatible, describe_model, load_memory, save_memory
from winclip_cli.jobs.decode import Decoded, image_sha256
from winclip_cli.jobs.kernel import InputProblems, Reporter, Session
from winclip_cli.jobs.references import collect_references
from winclip_cli.spec import InputSpec, ModelSpec, TextSpec


@dataclass(frozen=True)
class RefsSpec:
    """``build-refs``: the images to embed, the memory file, and how many (text: recorded in the memory)."""

    sources: list[Path]
    out: Path
    model: ModelSpec
    inputs: InputSpec
    text: TextSpec
    k: int | None = None
    seed: int | None = None
    append: bool = False


@dataclass
class RefsResult:
    memory: MemoryFile
    added: int
    skipped: int
    seconds: float
    problems: InputProblems  # unreadable references and folders: the run is incomplete (exit 3)


def reference_inputs(
    sources: list[Path], exclude: list[Path], reporter: Reporter, unlisted: list[str] | None = None
) -> list[tuple[Path, str]]:
    """(path, recorded name) of every reference image; names are relative to the folder given.
    Folders that cannot be listed are warned about and appended to ``unlisted``."""
    inputs: list[tuple[Path, str]] = []
    for source in sources:
        if source.is_dir():
            found = discover_images(source, exclude=exclude)
            for folder, reason in found.skipped_dirs:
                reporter.warn(f"cannot list {folder}: {reason}")
                if unlisted is not None:
                    unlisted.append(f"{folder}: {reason}")
            inputs += [(p, (Path(source.name) / p.relative_to(source)).as_posix()) for p in found.files]
        elif source.is_file():
            inputs.append((source, source.as_posix()))
        else:
            raise SetupError(f"reference source not found: {source}")
    if not inputs:
        raise SetupError(f"no images found in {', '.join(map(str, sources))}")
    return inputs


def pick(inputs: list[tuple[Path, str]], k: int | None, seed: int | None) -> list[tuple[Path, str]]:
    """The first k in sorted order, or a reproducible random sample of k with a seed."""
    if k is None or k >= len(inputs):
        return inputs
    if seed is None:
        return inputs[:k]
    return sorted(random.Random(seed).sample(inputs, k), key=lambda item: item[1])


def run_refs_job(options: RefsSpec, reporter: Reporter) -> RefsResult:
    started = time.perf_counter()
    vocabulary = load_vocabulary(options.text.prompts)
    problems = InputProblems()
    inputs = reference_inputs(options.sources, [options.out], reporter, problems.unlisted)
    existing = load_memory(options.out) if options.append and options.out.exists() else None
    if existing is None:  # nothing known yet: choose first, so only the chosen files are read
        inputs = pick(inputs, options.k, options.seed)
    known = existing.reference_hashes if existing else set()
    hashes: dict[Path, str] = {}
    fresh: list[tuple[Path, str]] = []
    for path, name in inputs:
        try:
            if not path.is_file():
                raise SetupError(f"reference {path} is not a regular file")
        except OSError as err:
            raise SetupError(f"cannot read reference {path}: {err.strerror or err}") from None
        # decoded before it is read whole (a 1 TB sparse file is no image); None: embedding says why
        digest = image_sha256(path, options.inputs.max_pixels)
        if digest is not None and (digest in known or digest in hashes.values()):
            continue
        if digest is not None:
            hashes[path] = digest
        fresh.append((path, name))
    skipped = len(inputs) - len(fresh)
    if existing is not None:  # k counts new references: `--append --k 4` adds 4 the memory lacks
        fresh = pick(fresh, options.k, options.seed)
    sizes = {path: path.stat().st_size for path, _ in fresh}

    session = Session.open(options.model, options.inputs, text=None)  # references need no text
    backbone, encoder = session.backbone, session.encoder
    model_info = describe_model(
        backbone.identity, backbone.image_size, encoder.scales, encoder.grid_size, options.inputs.tiling
    )
    if existing is not None:
        for warning in check_compatible(existing, model_info):
            reporter.warn(warning)
    reporter.info(
        f"winclip {__version__}: embedding {len(fresh)} references with {session.describe()}"
        + (f" ({skipped} already in the memory, skipped)" if skipped else "")
    )
    reporter.start("embedding references", len(fresh))

    def on_item(item: Decoded) -> None:
        reporter.advance()
        if item.error:
            reporter.warn(f"{item.relpath}: {item.error}")

    embedded = collect_references(session.embedded(fresh), on_item)
    problems.failures += embedded.failures
    references = [
        {"path": name, "size": sizes[path], "sha256": hashes.get(path) or sha256_file(path), "entries": entries}
        for name, path, entries in zip(embedded.names, embedded.paths, embedded.entries_per_image, strict=True)
    ]
    if existing is None and not references:
        raise SetupError("no reference image could be embedded; nothing written")
    patch_dim, embed_dim = _dims(embedded, existing)
    patches = np.stack(embedded.patches) if embedded.patches else np.zeros((0, *_grid(encoder), patch_dim), np.float32)
    windows = {
        s: np.stack([w[i] for w in embedded.windows])
        if embedded.windows
        else np.zeros((0, _windows(encoder, s), embed_dim), np.float32)
        for i, s in enumerate(encoder.scales)
    }
    if existing is not None:
        references = existing.metadata["references"] + references
        patches = np.concatenate([existing.patches, patches])
        windows = {s: np.concatenate([existing.windows[s], windows[s]]) for s in encoder.scales}
    metadata = build_metadata(
        model_info,
        options.text.class_name,
        vocabulary.ensemble(options.text.class_name).sha256,
        references,
        patch_dim=int(patches.shape[-1]),
        embed_dim=int(next(iter(windows.values())).shape[-1]),
    )
    # Appending changes the references: an earlier calibration no longer describes this memory.
    save_memory(options.out, metadata, patches, windows)
    memory = load_memory(options.out)
    return RefsResult(memory, len(embedded.names), skipped, time.perf_counter() - started, problems)


def _dims(embedded, existing: MemoryFile | None) -> tuple[int, int]:
    if embedded.patches:
        return int(embedded.patches[0].shape[-1]), int(embedded.windows[0][0].shape[-1])
    assert existing is not None
    return int(existing.metadata["patch_dim"]), int(existing.metadata["embed_dim"])


def _grid(encoder: WindowEncoder) -> tuple[int]:
    return (encoder.grid_size[0] * encoder.grid_size[1],)


def _windows(encoder: WindowEncoder, scale: int) -> int:
    return (encoder.grid_size[0] - scale + 1) * (encoder.grid_size[1] - scale + 1)
