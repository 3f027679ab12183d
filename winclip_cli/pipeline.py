"""The streaming loop shared by ``scan`` and ``build-refs``.

    files --> decode + preprocess (worker threads, bounded look-ahead) --> batches --> model
          --> outputs (one writer thread behind a bounded queue)

Every image is decoded once; the model sees full batches while the next ones decode and the
previous ones are written; memory stays flat however many files there are, because at most a
fixed number of decoded images is in flight at any time.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageDecodeError
from .images import DEFAULT_MAX_PIXELS, LoadedImage, load_image, preprocess
from .outputs import (
    CsvResultWriter,
    ResultRow,
    heatmap_relpath,
    overlay,
    write_float_tiff_atomic,
    write_png_atomic,
)
from .winclip import WinClipScorer


def relative_name(path: Path, root: Path) -> str:
    """POSIX path of ``path`` relative to the scanned root (the file name when root is the file)."""
    if root.is_file():
        return path.name
    return path.relative_to(root).as_posix()


@dataclass
class Decoded:
    """One input file after decoding: the model input, or the reason it has none."""

    path: Path
    relpath: str
    image: LoadedImage | None = None
    tensor: torch.Tensor | None = None  # (3, h, w) model input
    error: str = ""


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def decode_stream(
    inputs: Sequence[tuple[Path, str]],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    lookahead: int = 16,
) -> Iterator[Decoded]:
    """(path, name) inputs decoded in order by worker threads, at most ``lookahead`` files ahead."""

    def decode(entry: tuple[Path, str]) -> Decoded:
        path, relpath = entry
        try:
            image = load_image(path, max_pixels=max_pixels)
            tensor = preprocess(image, size, mean, std)
        except ImageDecodeError as err:
            return Decoded(path, relpath, error=str(err))
        except MemoryError:
            return Decoded(path, relpath, error="out of memory while decoding (see --max-pixels)")
        return Decoded(path, relpath, image=image, tensor=tensor)

    pending: deque[Future[Decoded]] = deque()
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="winclip-decode") as pool:
        for entry in inputs:
            pending.append(pool.submit(decode, entry))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(items: Iterable[Decoded], batch_size: int) -> Iterator[tuple[list[Decoded], list[Decoded]]]:
    """(decoded images, failures) groups: a batch is yielded when it is full, failures as they come."""
    batch: list[Decoded] = []
    failures: list[Decoded] = []
    for item in items:
        if item.error:
            failures.append(item)
        else:
            batch.append(item)
        if len(batch) >= batch_size:
            yield batch, failures
            batch, failures = [], []
        elif failures and not batch:
            yield [], failures
            failures = []
    if batch or failures:
        yield batch, failures


# ------------------------------------------------------------------------------------------------------ scan


@dataclass
class RowContext:
    """Values that are the same for every row of a run."""

    threshold: float
    mode: str
    k_shot: int | None = None
    refs: str = ""
    refs_sha256: str = ""
    vocabulary_sha256: str = ""


@dataclass
class ScanSummary:
    images: int = 0
    scored: int = 0
    anomalies: int = 0
    errors: int = 0
    rows: list[ResultRow] = field(default_factory=list)


def full_resolution_map(grid_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling (align_corners=False) of one (gh, gw) map straight to the image's size."""
    up = F.interpolate(grid_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


class OutputWriter:
    """Writes heatmaps, raw maps and CSV rows on a thread of its own, in submission order."""

    def __init__(
        self,
        out_dir: Path,
        csv_writer: CsvResultWriter,
        context: RowContext,
        save_maps: bool,
        on_row: Callable[[ResultRow], None],
        max_queue: int = 32,
    ) -> None:
        self.out_dir = out_dir
        self.csv = csv_writer
        self.context = context
        self.save_maps = save_maps
        self.on_row = on_row
        self.summary = ScanSummary()
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=max_queue)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="winclip-writer", daemon=True)
        self._thread.start()

    def submit_result(self, item: Decoded, score: float, grid_map: torch.Tensor) -> None:
        self._put(("ok", item, score, grid_map))

    def submit_error(self, item: Decoded) -> None:
        self._put(("error", item, None, None))

    def _put(self, job: tuple) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.put(job)

    def close(self) -> ScanSummary:
        self._queue.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self.summary

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._failure is not None:
                continue  # drain so producers never block on a dead writer
            try:
                row = self._write(*job)
                self.csv.write(row)
            except BaseException as err:  # the CSV itself failed (disk full...): stop the scan
                self._failure = err
                continue
            self._count(row)
            self.on_row(row)

    def _count(self, row: ResultRow) -> None:
        summary = self.summary
        summary.images += 1
        summary.rows.append(row)
        if row.status == "ok":
            summary.scored += 1
            summary.anomalies += row.label == "anomalous"
        else:
            summary.errors += 1

    def _common(self) -> dict:
        ctx = self.context
        return {
            "mode": ctx.mode,
            "k_shot": ctx.k_shot,
            "refs": ctx.refs,
            "refs_sha256": ctx.refs_sha256,
            "vocabulary_sha256": ctx.vocabulary_sha256,
        }

    def _write(self, kind: str, item: Decoded, score: float | None, grid_map: torch.Tensor | None) -> ResultRow:
        if kind == "error":
            return ResultRow(path=item.relpath, status="error", error=item.error, **self._common())
        assert item.image is not None and grid_map is not None and score is not None
        image = item.image
        score_map = full_resolution_map(grid_map, image.height, image.width)
        heatmap = heatmap_relpath(item.relpath)
        try:
            write_png_atomic(self.out_dir / heatmap, overlay(image.to_display_uint8(), score_map))
            if self.save_maps:
                write_float_tiff_atomic(
                    self.out_dir / "maps" / (heatmap[len("heatmaps/") : -len(".png")] + ".tiff"), score_map
                )
        except (OSError, ValueError) as err:
            return ResultRow(path=item.relpath, status="error", error=f"cannot write heatmap: {err}", **self._common())
        threshold = self.context.threshold
        return ResultRow(
            path=item.relpath,
            status="ok",
            score=score,
            label="anomalous" if score > threshold else "normal",
            threshold=threshold,
            max_pixel_score=float(score_map.max()),
            heatmap=heatmap,
            width=image.width,
            height=image.height,
            note=image.note,
            **self._common(),
        )


def run_scan(
    scorer: WinClipScorer,
    files: Sequence[Path],
    root: Path,
    out_dir: Path,
    context: RowContext,
    *,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    save_maps: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    on_row: Callable[[ResultRow], None] = lambda row: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> ScanSummary:
    """Score ``files`` and write ``out_dir/scores.csv`` and the heatmaps; returns the counts and rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [(path, relative_name(path, root)) for path in files]
    stream = decode_stream(
        inputs, size, mean, std, max_pixels=max_pixels, workers=workers, lookahead=max(2 * batch_size, 4)
    )
    with CsvResultWriter(out_dir / "scores.csv") as csv_writer:
        writer = OutputWriter(out_dir, csv_writer, context, save_maps, on_row)
        try:
            for batch, failures in batched(stream, batch_size):
                for item in failures:
                    writer.submit_error(item)
                if batch:
                    images = torch.stack([item.tensor for item in batch]).to(device=device, dtype=dtype)
                    scores = scorer.score_embeddings(scorer.embed(images))
                    image_scores = scores.image.float().cpu()
                    grid_maps = scores.grid_maps.float().cpu()
                    for i, item in enumerate(batch):
                        writer.submit_result(item, float(image_scores[i]), grid_maps[i])
                        item.tensor = None  # the writer only needs the display image
                if should_stop():
                    break
        finally:
            summary = writer.close()
    return summary


# ------------------------------------------------------------------------------------------------ references


@dataclass
class EmbeddedReferences:
    """Embeddings of the reference images that decoded, in input order, and the ones that did not."""

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)  # each (G, C)
    windows: list[list[np.ndarray]] = field(default_factory=list)  # per image, per scale (W_s, D)
    failures: list[Decoded] = field(default_factory=list)


def embed_references(
    scorer: WinClipScorer,
    inputs: Sequence[tuple[Path, str]],
    *,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    on_item: Callable[[Decoded], None] = lambda item: None,
) -> EmbeddedReferences:
    """Embed reference images exactly as ``run_scan`` embeds the images it scores."""
    result = EmbeddedReferences()
    stream = decode_stream(
        inputs, size, mean, std, max_pixels=max_pixels, workers=workers, lookahead=max(2 * batch_size, 4)
    )
    for batch, failures in batched(stream, batch_size):
        for item in failures:
            result.failures.append(item)
            on_item(item)
        if not batch:
            continue
        images = torch.stack([item.tensor for item in batch]).to(device=device, dtype=dtype)
        emb = scorer.embed(images)
        patches = emb.patches.float().cpu().numpy()
        windows = [w.float().cpu().numpy() for w in emb.windows]
        for i, item in enumerate(batch):
            result.names.append(item.relpath)
            result.paths.append(item.path)
            result.patches.append(patches[i])
            result.windows.append([w[i] for w in windows])
            item.tensor = item.image = None
            on_item(item)
    return result
