"""Writing: scored files become heatmaps, raw maps, thumbnails and rows, behind the model.

    scored Decoded items --> ResultWriter (a pool of writer threads; a collector hands the rows over
                             in input order, in groups the caller commits at once)

This stage takes an ``OutputSpec`` (folder, heatmap format, raw maps, thumbnails), the values every
row shares (:class:`RowContext`) and the thread budget; nothing of decoding or the model.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from winclip_cli.io.layout import heatmap_relpath, map_relpath
from winclip_cli.io.outputs import (
    ResultRow,
    confined_path,
    label_of,
    overlay,
    remove_inside,
    write_float_tiff_atomic,
    write_heatmap,
)
from winclip_cli.io.state import FileStamp
from winclip_cli.io.thumbnails import THUMB_SIZE, write_thumbnails
from winclip_cli.jobs.decode import PIXELS_IN_FLIGHT, Decoded, failure_reason, pixels_of
from winclip_cli.jobs.maps import full_resolution_map, image_score, overlay_tensor, upsample_grid, upsample_grid_tensor
from winclip_cli.jobs.threads import BUDGET, ThreadBudget, one_torch_thread
from winclip_cli.options import HEATMAP_SUFFIXES
from winclip_cli.spec import OutputSpec


@dataclass
class RowContext:
    """Values that are the same for every row of a run."""

    threshold: float | None  # None: no label (mode mutual without --threshold or a calibration)
    threshold_source: str
    mode: str
    k_shot: int | None = None
    refs: str = ""
    refs_sha256: str = ""
    vocabulary_sha256: str = ""
    pixel_threshold: float | None = None  # from a calibration: enables anomalous_area and bbox

    def common(self) -> dict:
        return {
            "mode": self.mode,
            "k_shot": self.k_shot,
            "refs": self.refs,
            "refs_sha256": self.refs_sha256,
            "vocabulary_sha256": self.vocabulary_sha256,
            "threshold_source": self.threshold_source,
        }

    def label(self, score: float | None) -> str:
        """Decided on the values as written (6 decimals), so that the CSV never contradicts itself
        and relabelling stored rows gives the label a fresh scan would; '' without a threshold."""
        return label_of(score, self.threshold)


@dataclass
class ScanSummary:
    images: int = 0
    scored: int = 0
    anomalies: int = 0
    errors: int = 0


def box_text(x0: int, y0: int, x1: int, y1: int) -> str:
    return f"{x0} {y0} {x1} {y1}"


def default_writer_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


RowGroup = list[tuple[ResultRow, FileStamp | None]]


class PixelGate:
    """Lets work through while the pixels it holds stay under a capacity; one item always passes,
    however large, so a huge image is processed alone instead of never."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.capacity)
            self.used += pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.used -= pixels
            self._cond.notify_all()


_NOTHING = object()  # "no new item yet" for the collector's polling loop


@dataclass(frozen=True)
class OutputSettings:
    """What a scan writes for each scored file, and where: its output spec, the values every row
    shares, and the GPU the maps are upsampled and coloured on (None: the CPU)."""

    output: OutputSpec
    context: RowContext
    device: torch.device | None = None

    @property
    def out_dir(self) -> Path:
        return self.output.out


def build_row(item: Decoded, settings: OutputSettings) -> ResultRow:
    """A scored (or failed) file's row, after writing its heatmap, map and thumbnails as ``settings`` say.

    Anything that goes wrong with the outputs is said in the row's ``error``; the score stands.
    """
    ctx = settings.context
    sha = item.stamp.sha256 if item.stamp else ""
    if item.error:
        pooled = item.pool.row_fields() if item.pool is not None else {}
        return ResultRow(path=item.relpath, status="error", error=item.error, sha256=sha, **ctx.common(), **pooled)
    image = item.image
    assert image is not None
    score, best_tile = image_score(item)
    output = settings.output
    heatmap = heatmap_relpath(item.relpath, output.heatmaps.suffix) if output.heatmaps.suffix else ""
    area, bbox, max_pixel_score = None, "", None
    problem = ""
    try:
        # On an accelerator an untiled map is upsampled and coloured there; it comes back to the
        # CPU only where something needs its values (a TIFF, the calibrated area, tiled thumbnails).
        on_device = settings.device is not None and item.tiles is None
        tiled_thumbs = output.thumbnails and item.tiles is not None
        needs_map = output.save_maps or ctx.pixel_threshold is not None or tiled_thumbs
        device_map = None
        if on_device:
            device_map = upsample_grid_tensor(item.outputs[0][1].to(settings.device), image.height, image.width)
            max_pixel_score = float(device_map.max())
            score_map = device_map.cpu().numpy() if needs_map else None
        else:
            score_map = full_resolution_map(item)
            max_pixel_score = float(score_map.max())
        if ctx.pixel_threshold is not None:
            from winclip_cli.core.calibration import anomalous_area

            assert score_map is not None  # a pixel threshold needs the map on the CPU
            area, box = anomalous_area(score_map, ctx.pixel_threshold)
            bbox = box_text(*box) if box else ""
        # 8-bit pixels are shown as they are (only read from here on: no copy); deeper ones are rounded
        display = image.rgb if image.rgb.dtype == np.uint8 else image.to_display_uint8()
        if heatmap:
            if device_map is not None:
                heat = overlay_tensor(torch.from_numpy(display).to(settings.device), device_map).cpu().numpy()
            else:
                assert score_map is not None  # made on the CPU
                heat = overlay(display, score_map)
            # confined_path: no planted symlink inside OUT can redirect a write outside it
            write_heatmap(output.heatmaps, confined_path(settings.out_dir, heatmap), heat)
        # a file scored before with another --heatmaps keeps no heatmap of the other format, which
        # the report or merge would take for this run's
        _remove_other_heatmaps(settings.out_dir, item.relpath, heatmap)
        if output.save_maps:
            target = confined_path(settings.out_dir, map_relpath(item.relpath))
            assert score_map is not None  # --save-maps needs the map on the CPU
            write_float_tiff_atomic(target, score_map, fsync=False)
        if output.thumbnails:
            write_thumbnails(settings.out_dir, item.relpath, *_small_overlay(display, item, score_map))
    except OSError as err:
        # The score stands (an anomaly must still be reported); the missing file is said in `error`.
        problem = f"cannot write outputs: {err.strerror or err}"
    except Exception as err:  # e.g. out of memory for the full-size map: the score stands too
        problem = f"cannot write outputs: {failure_reason('making the heatmap', err)}"
    if problem and heatmap and not (settings.out_dir / heatmap).is_file():
        heatmap = ""
    place = item.pool
    return ResultRow(
        path=item.relpath,
        status="ok",
        score=score,
        # mode mutual labels by the raw score: its `score` is ranked within the pool (0 to 1 there)
        label=ctx.label(score if place is None else place.raw_score),
        threshold=ctx.threshold,
        max_pixel_score=max_pixel_score,
        heatmap=heatmap,
        width=image.width,
        height=image.height,
        note=image.note,
        anomalous_area=area,
        bbox=bbox,
        tiles=len(item.tiles) if item.tiles else None,
        best_tile=box_text(best_tile.x0, best_tile.y0, best_tile.x1, best_tile.y1) if best_tile else "",
        sha256=sha,
        error=problem,
        **ctx.common(),
        **(place.row_fields() if place is not None else {}),
    )


def _remove_other_heatmaps(out_dir: Path, relpath: str, keep: str) -> None:
    """Delete this file's heatmaps in the formats it was not written in now (never through a link)."""
    for suffix in HEATMAP_SUFFIXES:
        other = heatmap_relpath(relpath, suffix)
        if other != keep:
            remove_inside(out_dir, other)


class ResultWriter:
    """Turns scored files into heatmaps, raw maps, thumbnails and rows, behind the model.

    Files are written by a pool of threads (PNG and JPEG encoding release the GIL); a collector
    thread hands the finished rows to ``on_rows`` in submission order, in groups of whatever is
    ready, so that the caller can make a whole group durable with one commit. Every file of a row
    is on disk before the row is handed over. An exception in ``on_rows`` (the state or CSV cannot
    be written) stops the scan: it is re-raised in the producer at its next submission or at ``close``.
    """

    def __init__(
        self,
        output: OutputSpec,
        context: RowContext,
        on_rows: Callable[[RowGroup], None],
        *,
        workers: int | None = None,
        max_queue: int = 4,
        device: torch.device | None = None,
        threads: ThreadBudget = BUDGET,
    ) -> None:
        output.out.mkdir(parents=True, exist_ok=True)
        # Upsampling and colouring run where the model ran when that is a GPU: the CPU keeps to
        # decoding and encoding.
        on_gpu = device is not None and torch.device(device).type == "cuda"
        self.settings = OutputSettings(output, context, device if on_gpu else None)
        self.threads = threads
        self.on_rows = on_rows
        self.summary = ScanSummary()
        self._workers = workers or default_writer_workers()
        self._pool = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="winclip-write", initializer=one_torch_thread
        )
        self._gate = PixelGate(PIXELS_IN_FLIGHT)  # large images are written a few at a time
        self._queue: queue.Queue[Decoded | None] = queue.Queue(maxsize=max_queue)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="winclip-collect", daemon=True)
        self._thread.start()

    def submit(self, item: Decoded) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.put(item)

    def close(self) -> ScanSummary:
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown(wait=True)
        if self._failure is not None:
            raise self._failure
        return self.summary

    def _run(self) -> None:
        try:
            self._collect()
        except BaseException as err:  # a bug here must not leave the producer blocked on a full queue
            self._failure = self._failure or err
            while self._queue.get() is not None:  # what is still submitted is dropped until close()
                pass

    def _collect(self) -> None:
        pending: deque[tuple[Decoded, Future[ResultRow]]] = deque()
        in_flight = 2 * self._workers  # bounds the decoded images held by the writer
        finished = False
        while not finished or pending:
            if not finished:
                item: Decoded | object | None
                try:
                    item = self._queue.get(timeout=0.01 if pending else None)
                except queue.Empty:
                    item = _NOTHING
                if item is None:
                    finished = True
                elif isinstance(item, Decoded):
                    if self._failure is None:
                        pending.append((item, self._pool.submit(self._gated_row, item)))
            group: RowGroup = []
            held = sum(pixels_of(item) for item, _ in pending)
            while pending and (pending[0][1].done() or finished or len(pending) > in_flight or held > PIXELS_IN_FLIGHT):
                item, future = pending.popleft()
                held -= pixels_of(item)
                try:
                    group.append((future.result(), item.stamp))
                except BaseException as err:  # a bug in make_row: stop rather than lose the row
                    self._failure = self._failure or err
                item.image = None
            if group and self._failure is None:
                try:
                    self.on_rows(group)
                except BaseException as err:  # the run state or CSV cannot be written (disk full...)
                    self._failure = err
                    continue
                for row, _ in group:
                    self._count(row)

    def _count(self, row: ResultRow) -> None:
        summary = self.summary
        summary.images += 1
        if row.status == "ok":
            summary.scored += 1
            summary.anomalies += row.label == "anomalous"
        if row.error:  # unreadable input, or outputs that could not be written
            summary.errors += 1

    def _gated_row(self, item: Decoded) -> ResultRow:
        pixels = pixels_of(item)
        self._gate.acquire(pixels)
        try:
            with self.threads.pipeline_step():
                return self.make_row(item)
        except Exception as err:  # one file's failure is that file's row, not the end of the scan
            sha = item.stamp.sha256 if item.stamp else ""
            error = failure_reason("scoring", err)
            common = self.settings.context.common()
            return ResultRow(path=item.relpath, status="error", error=error, sha256=sha, **common)
        finally:
            self._gate.release(pixels)

    def make_row(self, item: Decoded) -> ResultRow:
        return build_row(item, self.settings)


def _small_overlay(display: np.ndarray, item: Decoded, score_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The image shrunk to thumbnail size, and its heatmap overlay coloured at that size.

    Why not shrink the full-size heatmap: that is a second full-size resize per image (the costliest
    step after decoding), and the map is smooth (upsampled from the patch grid), so colouring it at
    thumbnail size looks the same.
    """
    from PIL import Image

    small = Image.fromarray(display)
    # reducing_gap 1.5: Pillow first shrinks by a whole factor with a box filter, leaving Lanczos at most
    # 1.5x the thumbnail to do; within about one grey level of a full Lanczos, in 60 % of the time of
    # Pillow's default (2.0) for a 2 MP frame.
    small.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS, reducing_gap=1.5)
    width, height = small.size
    if item.tiles is None:
        small_map = upsample_grid(item.outputs[0][1], height, width)
    else:
        scores = Image.fromarray(np.ascontiguousarray(score_map, dtype=np.float32), mode="F")
        small_map = np.asarray(scores.resize((width, height), Image.Resampling.BILINEAR))
    small_rgb = np.asarray(small)
    return small_rgb, overlay(small_rgb, small_map)


def write_all(items: Generator[Decoded, None, None], writer: ResultWriter) -> ScanSummary:
    """Hand every scored file to ``writer`` and wait for its rows; on an error, queued decoding is
    cancelled rather than awaited, and the rows already written are kept."""
    try:
        with closing(items):
            for item in items:
                writer.submit(item)
    finally:
        summary = writer.close()
    return summary
