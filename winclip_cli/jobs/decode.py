"""Decoding: files become model inputs, in worker threads, in input order, a bounded look-ahead ahead.

    (path, name) files --> read + decode + hash + preprocess (+ tiles) --> Decoded items

A bad file becomes an item with ``error``, never an exception. Memory ahead of the model is bounded
by file count, by decoded pixels and by model inputs. This stage takes an ``InputSpec`` (through
:class:`Preprocessing`) and the thread budget it reports its work to; nothing of the model or outputs.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from winclip_cli.core.tiling import Tile, auto_tile_size, crop, tile_count, tile_grid
from winclip_cli.errors import ImageDecodeError
from winclip_cli.io.hashing import sha256_handle
from winclip_cli.io.images import LoadedImage, load_image, open_image_file, preprocess
from winclip_cli.io.layout import relative_name  # noqa: F401  (re-exported: jobs import it from here)
from winclip_cli.io.state import FileStamp
from winclip_cli.jobs.threads import BUDGET, ThreadBudget, one_torch_thread
from winclip_cli.options import AUTO, DEFAULT_MAX_PIXELS, Tiling
from winclip_cli.spec import InputSpec

if TYPE_CHECKING:
    from winclip_cli.core.backbone import Backbone
    from winclip_cli.jobs.mutual import PoolPlace


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
    tiling: Tiling = Tiling()
    device: str = "cpu"  # where the resize to the model input runs (a CUDA device does it faster)

    @classmethod
    def for_backbone(cls, backbone: Backbone, inputs: InputSpec) -> Preprocessing:
        """The preprocessing every command uses for ``backbone``'s inputs."""
        inputs.tiling.check_fits(backbone.image_size)  # the CLI checks it earlier when the config is readable
        device = str(backbone.device) if torch.device(backbone.device).type == "cuda" else "cpu"
        return cls(backbone.image_size, backbone.mean, backbone.std, inputs.max_pixels, inputs.tiling, device)

    def tiles_for(self, height: int, width: int) -> list[Tile] | None:
        tile, overlap = self.tiling.size, self.tiling.overlap
        if tile is None:
            return None
        size = auto_tile_size(height, width, min(self.size)) if tile == AUTO else int(tile)
        if size is None:
            return None
        count = tile_count(height, width, size, overlap)  # refused before the grid is built
        if count > MAX_TILES:
            raise ImageDecodeError(
                f"{count} tiles of {size} px for a {width}x{height} image "
                f"(more than {MAX_TILES}); use a larger --tile or a smaller --tile-overlap"
            )
        return tile_grid(height, width, size, overlap)


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
    pool: PoolPlace | None = None  # mode mutual: its raw score and the pool it was scored against

    @property
    def num_inputs(self) -> int:
        return 0 if self.inputs is None else len(self.inputs)


def image_sha256(path: Path, max_pixels: int) -> str | None:
    """sha256 of an image file, read whole only once its pixels decoded, from the same descriptor (as
    :func:`decode_file` does): a file that is no usable image (a 1 TB sparse ``x.png``, a FIFO) is never read
    whole. None for such a file; decoding it again for scoring says why, as that file's error."""
    try:
        handle = open_image_file(path)
    except ImageDecodeError:
        return None
    with handle:
        try:
            load_image(handle, max_pixels=max_pixels)
        except Exception:  # noqa: BLE001 - any failure is the file's, said when it is decoded for scoring
            return None
        return sha256_handle(handle)


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
    try:  # opened once, never blocking on a FIFO; decoded and hashed from the same descriptor
        handle = open_image_file(path)
    except ImageDecodeError as err:
        return Decoded(path, relpath, error=str(err))
    stat = os.fstat(handle.fileno())
    stamp = FileStamp(stat.st_size, stat.st_mtime_ns)
    step = "decoding"
    try:
        image = load_image(handle, max_pixels=prep.max_pixels)
        if with_stamp:  # only a file that will be scored is read whole
            step = "reading"
            stamp = FileStamp(stat.st_size, stat.st_mtime_ns, sha256_handle(handle))
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
    finally:
        handle.close()
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
    path: Path,
    name: str,
    prep: Preprocessing,
    with_stamp: bool,
    budget: OrderedBudget,
    ticket: int,
    threads: ThreadBudget,
) -> Decoded:
    taken: list[int] = []

    def take(count: int) -> None:
        budget.take(ticket, count)
        taken.append(count)

    try:
        with threads.pipeline_step():
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
    threads: ThreadBudget = BUDGET,
) -> Iterator[Decoded]:
    """(path, name) inputs decoded in order by worker threads, at most ``lookahead`` files ahead.

    ``threads``: the budget the workers report their CPU time to; ``model_on_cpu``: the model that
    consumes the stream computes on the CPU, so the budget shares the cores between its threads and
    the workers while the stream runs (:mod:`winclip_cli.jobs.threads`).

    Memory ahead of the consumer is bounded three ways: by file count, by decoded pixels, and by
    model inputs (tiles): a file's inputs are built only once :data:`INPUTS_IN_FLIGHT` has room.
    """
    pending: deque[Future[Decoded]] = deque()
    budget = OrderedBudget(INPUTS_IN_FLIGHT)
    threads.start(enabled=model_on_cpu)
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
                pending.append(pool.submit(_decode_in_turn, path, name, prep, with_stamp, budget, ticket, threads))
                # a count bound for ordinary images, a pixel bound for huge ones
                while pending and (len(pending) >= lookahead or _decoded_pixels(pending) > PIXELS_IN_FLIGHT):
                    yield next_item()
            while pending:
                yield next_item()
        finally:  # a consumer that stops early must not wait for the whole look-ahead to decode
            for future in pending:
                future.cancel()
            budget.close()  # files waiting for their turn give up
            threads.stop()


def _decoded_pixels(pending: deque[Future[Decoded]]) -> int:
    return sum(pixels_of(future.result()) for future in pending if future.done())


PIXELS_IN_FLIGHT = 100_000_000  # decoded pixels the writer may hold at once (about 2 GB of maps and images)


def pixels_of(item: Decoded) -> int:
    return item.image.height * item.image.width if item.image is not None else 0
