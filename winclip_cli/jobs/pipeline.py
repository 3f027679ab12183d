"""The streaming loop shared by ``scan``, ``build-refs`` and ``calibrate``.

    files --> read + decode + preprocess (worker threads, bounded look-ahead)
          --> model batches (tiles of large images fill batches like images do)
          --> outputs (one writer thread behind a bounded queue)

Every image is decoded once; the model sees full batches while the next files decode and the
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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import numpy as np
import torch
import torch.nn.functional as F

from winclip_cli.core.tiling import Tile, TileBlender, auto_tile_size, crop, tile_count, tile_grid
from winclip_cli.core.winclip import ReferenceMemory, WinClipScorer
from winclip_cli.errors import ImageDecodeError
from winclip_cli.io.hashing import sha256_file
from winclip_cli.io.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image, preprocess, unreadable_reason
from winclip_cli.io.layout import heatmap_relpath, map_relpath, relative_name  # noqa: F401  (re-exported)
from winclip_cli.io.outputs import (
    LUT,
    ResultRow,
    confined_path,
    label_of,
    overlay,
    remove_inside,
    write_float_tiff_atomic,
    write_jpeg_atomic,
    write_png_atomic,
)
from winclip_cli.io.state import FileStamp
from winclip_cli.io.thumbnails import THUMB_SIZE, write_thumbnails
from winclip_cli.jobs.threads import BUDGET, one_torch_thread
from winclip_cli.options import HEATMAP_FORMATS, check_tile_size


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------ preprocessing


# Per image: its model inputs are built together (0.7 MB each at 240 px, so 512 tiles take 0.35 GB, and
# at most two such files are held at once: one being scored, the next being built). More tiles than this
# are refused for the file (a 350000 x 1 strip cut into 1945 tiles of 240 x 1); an 80 MP image needs
# --tile 480 or more.
MAX_TILES = 512


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes model inputs: the model's size and normalisation, the size guard, tiling."""

    size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile: int | str | None = None  # tile size in pixels, "auto", or None for whole images
    tile_overlap: float = 0.25
    device: str = "cpu"  # where the resize to the model input runs (a CUDA device does it faster)

    @classmethod
    def for_backbone(
        cls, backbone, max_pixels: int = DEFAULT_MAX_PIXELS, tile: int | str | None = None, tile_overlap: float = 0.25
    ) -> Preprocessing:
        """The preprocessing every command uses for ``backbone``'s inputs."""
        device = str(backbone.device) if torch.device(backbone.device).type == "cuda" else "cpu"
        return cls(backbone.image_size, backbone.mean, backbone.std, max_pixels, tile, tile_overlap, device)

    def tiles_for(self, height: int, width: int) -> list[Tile] | None:
        if self.tile is None:
            return None
        size = auto_tile_size(height, width, min(self.size)) if self.tile == "auto" else int(self.tile)
        if size is None:
            return None
        count = tile_count(height, width, size, self.tile_overlap)  # refused before the grid is built
        if count > MAX_TILES:
            raise ImageDecodeError(
                f"{count} tiles of {size} px for a {width}x{height} image "
                f"(more than {MAX_TILES}); use a larger --tile or a smaller --tile-overlap"
            )
        return tile_grid(height, width, size, self.tile_overlap)


@dataclass(kw_only=True)
class InputOptions:
    """How every command reads and batches its images: shared by scan, build-refs, calibrate, eval."""

    batch_size: int = 8  # model inputs (images or tiles) per batch
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused
    workers: int | None = None  # decoding threads (None: automatic)
    tile: int | str | None = None  # tile size in pixels, "auto", or None for whole images
    tile_overlap: float = 0.25

    def preprocessing(self, backbone) -> Preprocessing:
        check_tile_size(self.tile, backbone.image_size)  # the CLI checks it earlier when the config is readable
        return Preprocessing.for_backbone(backbone, self.max_pixels, self.tile, self.tile_overlap)


@dataclass
class Decoded:
    """One input file after decoding: its model inputs (one per tile), or the reason it has none."""

    path: Path
    relpath: str
    stamp: FileStamp | None = None
    image: LoadedImage | None = None
    inputs: list[torch.Tensor | None] | None = None  # one (3, h, w) per tile (one without tiling); freed once batched
    tiles: list[Tile] | None = None
    error: str = ""
    outputs: list = field(default_factory=list)  # what the model made of each input, filled by processed_stream
    inputs_taken: int = 0  # model inputs this file holds of the decode stream's budget

    @property
    def num_inputs(self) -> int:
        return 0 if self.inputs is None else len(self.inputs)


def decode_file(
    path: Path,
    relpath: str,
    prep: Preprocessing,
    with_stamp: bool = True,
    take_inputs: Callable[[int], None] = lambda count: None,
) -> Decoded:
    """Decode, hash and preprocess one file; any failure becomes ``Decoded.error``, never an exception.

    The header is checked and the pixels decoded before the file is hashed, so a file that is no
    usable image (a 20 GB sparse ``x.png``) costs no full read. ``take_inputs(n)`` is called with
    the number of model inputs before they are built; it may wait (see :class:`OrderedBudget`).
    """
    try:
        stat = path.stat()
    except OSError as err:
        return Decoded(path, relpath, error=unreadable_reason(path, err))
    if not S_ISREG(stat.st_mode):  # a FIFO or device would block or never end when read
        return Decoded(path, relpath, error="not a regular file")
    stamp = FileStamp(stat.st_size, stat.st_mtime_ns)
    step = "decoding"
    try:
        image = load_image(path, max_pixels=prep.max_pixels)
        if with_stamp:  # only a file that will be scored is read whole
            step = "reading"
            stamp = FileStamp(stat.st_size, stat.st_mtime_ns, sha256_file(path))
        step = "tiling"
        tiles = prep.tiles_for(image.height, image.width)
        take_inputs(1 if tiles is None else len(tiles))
        step = "preprocessing"
        if tiles is None:
            inputs: list[torch.Tensor | None] = [preprocess(image, prep.size, prep.mean, prep.std, prep.device)]
        else:
            inputs = [preprocess(_cropped(image, tile), prep.size, prep.mean, prep.std, prep.device) for tile in tiles]
    except ImageDecodeError as err:
        return Decoded(path, relpath, stamp=stamp, error=str(err))
    except Exception as err:  # anything else one file can cause (torch "can't allocate", ...) is that file's error
        return Decoded(path, relpath, stamp=stamp, error=failure_reason(step, err))
    return Decoded(path, relpath, stamp=stamp, image=image, inputs=inputs, tiles=tiles)


def failure_reason(step: str, err: BaseException) -> str:
    """One line for an unexpected per-file failure; running out of memory said as such."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError) or "can't allocate" in text or "out of memory" in text.lower():
        return f"out of memory while {step} (see --max-pixels and --tile)"
    if isinstance(err, OSError) and step == "reading":
        return f"cannot read file: {(err.strerror or text).lower()}"
    if len(text) > 200:
        text = text[:197] + "..."
    return f"failed while {step}: {type(err).__name__}: {text}"


def _cropped(image: LoadedImage, tile: Tile) -> LoadedImage:
    return LoadedImage(np.ascontiguousarray(crop(image.rgb, tile)), image.note)


class BudgetClosed(BaseException):
    """The decode stream stopped while a file waited for its turn (not a failure of that file)."""


class OrderedBudget:
    """A capacity taken in ticket order (0, 1, 2, ...) and given back later.

    Decoding threads take what a file's model inputs need before building them. A file waits for
    its turn, so capacity never goes to a later file while an earlier one waits for it: the consumer
    takes files in order, and a later file holding the capacity would deadlock it. A file larger than
    the capacity goes through alone. ``close`` wakes every waiter (they raise :class:`BudgetClosed`).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._turn = 0
        self._closed = False
        self._cond = threading.Condition()

    def take(self, ticket: int, amount: int) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._closed or (self._turn == ticket and (self.used == 0 or self.used + amount <= self.capacity))
                )
            )
            if self._closed:
                raise BudgetClosed
            self.used += amount
            self._turn += 1
            self._cond.notify_all()

    def give_back(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


INPUTS_IN_FLIGHT = 256  # model inputs decoded ahead of the model (0.7 MB each at 240 px)


def _decode_in_turn(
    path: Path, name: str, prep: Preprocessing, with_stamp: bool, budget: OrderedBudget, ticket: int
) -> Decoded:
    taken: list[int] = []

    def take(count: int) -> None:
        budget.take(ticket, count)
        taken.append(count)

    try:
        with BUDGET.pipeline_step():
            item = decode_file(path, name, prep, with_stamp, take_inputs=take)
    finally:
        if not taken:  # failed before its inputs: its turn still passes, in order
            budget.take(ticket, 0)
    item.inputs_taken = taken[0] if taken else 0
    return item


def decode_stream(
    inputs: Sequence[tuple[Path, str]],
    prep: Preprocessing,
    workers: int | None = None,
    lookahead: int = 16,
    with_stamp: bool = True,
    model_on_cpu: bool = False,
) -> Iterator[Decoded]:
    """(path, name) inputs decoded in order by worker threads, at most ``lookahead`` files ahead.

    ``model_on_cpu``: the model that consumes the stream computes on the CPU, so its threads and the
    workers share the cores (:mod:`winclip_cli.jobs.threads`).

    Memory ahead of the consumer is bounded three ways: by file count, by decoded pixels, and by
    model inputs (tiles): a file's inputs are built only once :data:`INPUTS_IN_FLIGHT` has room.
    """
    pending: deque[Future[Decoded]] = deque()
    budget = OrderedBudget(INPUTS_IN_FLIGHT)
    BUDGET.start(enabled=model_on_cpu)
    with ThreadPoolExecutor(
        max_workers=workers or default_workers(), thread_name_prefix="winclip-decode", initializer=one_torch_thread
    ) as pool:

        def next_item() -> Decoded:
            item = pending.popleft().result()
            budget.give_back(item.inputs_taken)  # the consumer holds them from here on
            item.inputs_taken = 0
            return item

        try:
            for ticket, (path, name) in enumerate(inputs):
                pending.append(pool.submit(_decode_in_turn, path, name, prep, with_stamp, budget, ticket))
                # a count bound for ordinary images, a pixel bound for huge ones
                while pending and (len(pending) >= lookahead or _decoded_pixels(pending) > PIXELS_IN_FLIGHT):
                    yield next_item()
            while pending:
                yield next_item()
        finally:  # a consumer that stops early must not wait for the whole look-ahead to decode
            for future in pending:
                future.cancel()
            budget.close()  # files waiting for their turn give up
            BUDGET.stop()


def _decoded_pixels(pending: deque[Future[Decoded]]) -> int:
    return sum(_pixels(future.result()) for future in pending if future.done())


def processed_stream(
    stream: Iterable[Decoded],
    process: Callable[[torch.Tensor, list[Decoded]], list],
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[Decoded]:
    """Decoded files with ``outputs`` filled (one entry per model input), in input order.

    Model inputs of consecutive files (whole images or tiles) are packed into batches of
    ``batch_size``; ``process`` maps a (B, 3, h, w) batch (and the file of each input) to B
    outputs. A file is yielded once all its inputs are processed; failures pass straight
    through, in order. After ``should_stop`` turns true no new batch is started and only
    complete files are yielded.
    """
    waiting: deque[Decoded] = deque()  # files in input order, not yet yielded
    queued: list[tuple[Decoded, int]] = []  # (file, input index) not yet processed

    def run_batch(entries: list[tuple[Decoded, int]]) -> None:
        batch = torch.stack([item.inputs[i] for item, i in entries])  # type: ignore[index,misc]
        for item, i in entries:
            item.inputs[i] = None  # type: ignore[index]  # a tile's input is freed as soon as it is batched
        with BUDGET.model_batch():
            outputs = process(batch, [item for item, _ in entries])
        for (item, _), output in zip(entries, outputs, strict=True):
            item.outputs.append(output)

    def ready() -> Iterator[Decoded]:
        while waiting and (waiting[0].error or len(waiting[0].outputs) == waiting[0].num_inputs):
            item = waiting.popleft()
            item.inputs = None  # downstream needs the display image, not the model inputs
            yield item

    try:
        for item in stream:
            waiting.append(item)
            if not item.error:
                queued.extend((item, i) for i in range(item.num_inputs))
            while len(queued) >= batch_size:
                run_batch(queued[:batch_size])
                del queued[:batch_size]
                yield from ready()
                if should_stop():
                    return
            yield from ready()
        if queued and not should_stop():
            run_batch(queued)
        yield from ready()
    finally:  # stopped early or failed: cancel the decoding still queued instead of waiting for it
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def scoring_fn(
    scorer: WinClipScorer,
    device: torch.device,
    dtype: torch.dtype,
    exclude_for: Callable[[Decoded], int] | None = None,
) -> Callable[[torch.Tensor, list[Decoded]], list]:
    """Batch -> [(image score, grid map (gh, gw)), ...] on the CPU.

    ``exclude_for`` gives, per file, the memory reference it must not be compared with (-1: none).
    """

    def process(batch: torch.Tensor, items: list[Decoded]) -> list[tuple[float, torch.Tensor]]:
        exclude = torch.tensor([exclude_for(item) for item in items]) if exclude_for else None
        scores = scorer.score_embeddings(scorer.embed(batch.to(device=device, dtype=dtype)), exclude)
        image, maps = scores.image.float().cpu(), scores.grid_maps.float().cpu()
        return [(float(image[i]), maps[i]) for i in range(image.shape[0])]

    return process


def embedding_fn(
    scorer: WinClipScorer, device: torch.device, dtype: torch.dtype
) -> Callable[[torch.Tensor, list[Decoded]], list]:
    """Batch -> [(patch tokens (G, C), [window embeddings (W_s, D) per scale]), ...] as float32 numpy."""

    def process(batch: torch.Tensor, items: list[Decoded]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        emb = scorer.embed(batch.to(device=device, dtype=dtype))
        patches = emb.patches.float().cpu().numpy()
        windows = [w.float().cpu().numpy() for w in emb.windows]
        return [(patches[i], [w[i] for w in windows]) for i in range(patches.shape[0])]

    return process


# ------------------------------------------------------------------------------------------------- results


# torch's bilinear upsampling precomputes indices and weights for every output row and column: for a
# 1 x 80,000,000 strip that is gigabytes. Past this many pixels on one side (no camera makes such
# images) the map is interpolated in chunks instead, with the same formula in float32.
LONG_SIDE_IN_CHUNKS = 1 << 16
_CHUNK = 1 << 20  # output pixels per side per chunk: index and weight arrays of a few MB


def upsample_grid(grid_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling (align_corners=False) of one (gh, gw) map straight to (height, width)."""
    if max(height, width) > LONG_SIDE_IN_CHUNKS:
        return upsample_grid_in_chunks(grid_map.float().cpu().numpy(), height, width)
    return upsample_grid_tensor(grid_map, height, width).numpy()


def _linear_taps(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """For outputs [start, stop): the two source indices and their weights, as torch computes them
    (source = (x + 0.5) * in / out - 0.5, clamped at 0; align_corners=False)."""
    scale = np.float32(in_size / out_size)
    source = np.maximum((np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    first = np.minimum(source.astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    far = (source - first).astype(np.float32)
    return first, second, np.float32(1) - far, far


def upsample_grid_in_chunks(grid: np.ndarray, height: int, width: int, chunk: int = _CHUNK) -> np.ndarray:
    """:func:`upsample_grid` for extreme sizes, in memory bounded by the output and ``chunk``."""
    out = np.empty((height, width), dtype=np.float32)
    gh, gw = grid.shape
    for r0 in range(0, height, chunk):
        r1 = min(height, r0 + chunk)
        top, bottom, w_top, w_bottom = _linear_taps(gh, height, r0, r1)
        rows = w_top[:, None] * grid[top] + w_bottom[:, None] * grid[bottom]  # (r1 - r0, gw)
        for c0 in range(0, width, chunk):
            c1 = min(width, c0 + chunk)
            left, right, w_left, w_right = _linear_taps(gw, width, c0, c1)
            out[r0:r1, c0:c1] = rows[:, left] * w_left + rows[:, right] * w_right
    return out


def upsample_grid_tensor(grid_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`upsample_grid` on the grid's own device, as a tensor."""
    up = F.interpolate(grid_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0]


_LUTS: dict[torch.device, torch.Tensor] = {}


def overlay_tensor(image: torch.Tensor, score_map: torch.Tensor) -> torch.Tensor:
    """:func:`outputs.overlay` with torch on the tensors' device: (H, W, 3) uint8 image and (H, W)
    scores -> (H, W, 3) uint8, the same values (the index as ``outputs.colour_index`` defines it)."""
    lut = _LUTS.get(image.device)
    if lut is None:
        lut = _LUTS.setdefault(image.device, torch.from_numpy(LUT.copy()).to(image.device))
    scaled = (score_map.float().double() * 255.0 + 0.5).float()  # rounded to float32 once, as Pillow does
    scaled = torch.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clamp_(0.0, 255.0)
    colours = lut[scaled.long()]  # truncation: the values are not negative
    return (image >> 1) + (colours >> 1) + (image & colours & 1)  # the mean rounded down, as outputs.overlay


def full_resolution_map(item: Decoded) -> np.ndarray:
    """The anomaly map at the image's own size: one upsampled grid, or the tiles blended together."""
    image = item.image
    assert image is not None
    if item.tiles is None:
        return upsample_grid(item.outputs[0][1], image.height, image.width)
    blender = TileBlender(image.height, image.width)
    for tile, (_, grid) in zip(item.tiles, item.outputs, strict=True):
        blender.add(tile, upsample_grid(grid, tile.height, tile.width))
    return blender.result()


def map_at_model_size(item: Decoded, size: Sequence[int]) -> np.ndarray:
    """The map at the model's input size, as evaluation compares it with masks: the grid upsampled (what
    ``WinClipScorer.score`` returns), or for a tiled file its full-resolution map resized to that size."""
    if item.tiles is None:
        return upsample_grid(item.outputs[0][1], *size)
    full = torch.from_numpy(full_resolution_map(item))
    return F.interpolate(full[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def image_score(item: Decoded) -> tuple[float, Tile | None]:
    """The image score (max over tiles in tiled mode) and the tile that produced it."""
    scores = [score for score, _ in item.outputs]
    best = int(np.argmax(scores))
    return scores[best], (item.tiles[best] if item.tiles else None)


@dataclass
class RowContext:
    """Values that are the same for every row of a run."""

    threshold: float
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

    def label(self, score: float) -> str:
        """Decided on the values as written (6 decimals), so that the CSV never contradicts itself
        and relabelling stored rows gives the label a fresh scan would."""
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
PIXELS_IN_FLIGHT = 100_000_000  # decoded pixels the writer may hold at once (about 2 GB of maps and images)


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


def _pixels(item: Decoded) -> int:
    return item.image.height * item.image.width if item.image is not None else 0


_NOTHING = object()  # "no new item yet" for the collector's polling loop


@dataclass(frozen=True)
class OutputSettings:
    """What a scan writes for each scored file, and where."""

    out_dir: Path
    context: RowContext
    save_maps: bool = False
    thumbnails: bool = True
    heatmaps: str = "png"  # png, jpg or none
    device: torch.device | None = None  # a CUDA device: maps are upsampled and coloured there


def build_row(item: Decoded, settings: OutputSettings) -> ResultRow:
    """A scored (or failed) file's row, after writing its heatmap, map and thumbnails as ``settings`` say.

    Anything that goes wrong with the outputs is said in the row's ``error``; the score stands.
    """
    ctx = settings.context
    sha = item.stamp.sha256 if item.stamp else ""
    if item.error:
        return ResultRow(path=item.relpath, status="error", error=item.error, sha256=sha, **ctx.common())
    image = item.image
    assert image is not None
    score, best_tile = image_score(item)
    heatmap = heatmap_relpath(item.relpath, "." + settings.heatmaps) if settings.heatmaps != "none" else ""
    area, bbox, max_pixel_score = None, "", None
    problem = ""
    try:
        # On an accelerator an untiled map is upsampled and coloured there; it comes back to the
        # CPU only where something needs its values (a TIFF, the calibrated area, tiled thumbnails).
        on_device = settings.device is not None and item.tiles is None
        tiled_thumbs = settings.thumbnails and item.tiles is not None
        needs_map = settings.save_maps or ctx.pixel_threshold is not None or tiled_thumbs
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

            area, box = anomalous_area(score_map, ctx.pixel_threshold)
            bbox = box_text(*box) if box else ""
        # 8-bit pixels are shown as they are (only read from here on: no copy); deeper ones are rounded
        display = image.rgb if image.rgb.dtype == np.uint8 else image.to_display_uint8()
        heat = None
        if settings.heatmaps != "none":
            if device_map is not None:
                heat = overlay_tensor(torch.from_numpy(display).to(settings.device), device_map).cpu().numpy()
            else:
                heat = overlay(display, score_map)
        # No fsync per file: the scan syncs the file system once per group of rows, before it
        # commits them (see scanjob). Level 1: heatmaps of textured parts barely compress anyway.
        # confined_path: no planted symlink inside OUT can redirect a write outside it
        if settings.heatmaps == "png":
            write_png_atomic(confined_path(settings.out_dir, heatmap), heat, fsync=False, compress_level=1)
        elif settings.heatmaps == "jpg":
            write_jpeg_atomic(confined_path(settings.out_dir, heatmap), heat, fsync=False)
        # a file scored before with another --heatmaps keeps no heatmap of the other format, which
        # the report or merge would take for this run's
        _remove_other_heatmaps(settings.out_dir, item.relpath, heatmap)
        if settings.save_maps:
            target = confined_path(settings.out_dir, map_relpath(item.relpath))
            write_float_tiff_atomic(target, score_map, fsync=False)
        if settings.thumbnails:
            write_thumbnails(settings.out_dir, item.relpath, *_small_overlay(display, item, score_map))
    except OSError as err:
        # The score stands (an anomaly must still be reported); the missing file is said in `error`.
        problem = f"cannot write outputs: {err.strerror or err}"
    except Exception as err:  # e.g. out of memory for the full-size map: the score stands too
        problem = f"cannot write outputs: {failure_reason('making the heatmap', err)}"
    if problem and heatmap and not (settings.out_dir / heatmap).is_file():
        heatmap = ""
    return ResultRow(
        path=item.relpath,
        status="ok",
        score=score,
        label=ctx.label(score),
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
    )

def _remove_other_heatmaps(out_dir: Path, relpath: str, keep: str) -> None:
    """Delete this file's heatmaps in the formats it was not written in now (never through a link)."""
    for suffix in (".png", ".jpg"):
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
        out_dir: Path,
        context: RowContext,
        on_rows: Callable[[RowGroup], None],
        save_maps: bool = False,
        thumbnails: bool = True,
        workers: int | None = None,
        max_queue: int = 4,
        heatmaps: str = "png",
        device: torch.device | None = None,
    ) -> None:
        if heatmaps not in HEATMAP_FORMATS:
            raise ValueError(f"heatmaps must be one of {HEATMAP_FORMATS}, got {heatmaps!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Upsampling and colouring run where the model ran when that is a GPU: the CPU keeps to
        # decoding and encoding.
        on_gpu = device is not None and torch.device(device).type == "cuda"
        self.settings = OutputSettings(out_dir, context, save_maps, thumbnails, heatmaps, device if on_gpu else None)
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
            held = sum(_pixels(item) for item, _ in pending)
            while pending and (pending[0][1].done() or finished or len(pending) > in_flight or held > PIXELS_IN_FLIGHT):
                item, future = pending.popleft()
                held -= _pixels(item)
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
        pixels = _pixels(item)
        self._gate.acquire(pixels)
        try:
            with BUDGET.pipeline_step():
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


def write_all(items: Iterator[Decoded], writer: ResultWriter) -> ScanSummary:
    """Hand every scored file to ``writer`` and wait for its rows; on an error, queued decoding is
    cancelled rather than awaited, and the rows already written are kept."""
    try:
        with closing(items):
            for item in items:
                writer.submit(item)
    finally:
        summary = writer.close()
    return summary


# ------------------------------------------------------------------------------------------------ references


@dataclass
class EmbeddedReferences:
    """Embeddings of the reference images that decoded, in input order, and the ones that did not.

    In tiled mode one image contributes one entry per tile; ``entries_per_image`` says how many.
    """

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    entries_per_image: list[int] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)  # each (G, C), one per entry
    windows: list[list[np.ndarray]] = field(default_factory=list)  # per entry, per scale (W_s, D)
    failures: list[Decoded] = field(default_factory=list)

    def to_reference_memory(self, scales: Sequence[int], device: torch.device) -> ReferenceMemory:
        """The memory a scorer compares with, built as from a memory file (``MemoryFile.to_reference_memory``)."""
        if not self.patches:
            raise ValueError("no reference was embedded")
        return ReferenceMemory.from_arrays(
            np.stack(self.patches),
            [np.stack([w[i] for w in self.windows]) for i in range(len(scales))],
            self.entries_per_image,
            device,
        )


def collect_references(
    items: Iterator[Decoded], on_item: Callable[[Decoded], None] = lambda item: None
) -> EmbeddedReferences:
    """Gather embedded references (``Session.embedded``) in input order; unreadable ones are kept apart."""
    result = EmbeddedReferences()
    with closing(items):
        for item in items:
            if item.error:
                result.failures.append(item)
            else:
                result.names.append(item.relpath)
                result.paths.append(item.path)
                result.entries_per_image.append(len(item.outputs))
                for patches, windows in item.outputs:
                    result.patches.append(patches)
                    result.windows.append(windows)
            item.image = None
            item.outputs = []
            on_item(item)
    return result
