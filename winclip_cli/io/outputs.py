"""Everything the scan writes to disk: the streaming scores.csv, heatmap PNGs, float TIFF maps, run.json
(where each goes: io/layout.py; thumbnails: io/thumbnails.py).

This module only does file I/O and colouring of already computed score maps; it computes no scores and
knows nothing about the CLI.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import shutil
import stat
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image

from winclip_cli.io.safe_fs import (
    Confined,
    LinkInOutputError,
    NotRegularFileError,
    atomic_write,
    open_confined,
    open_regular,
    remove_regular,
)
from winclip_cli.options import HeatmapFormat, ScoringMode

__all__ = [
    "NOTE_LIMIT",
    "Confined",
    "NotRegularFileError",
    "CSV_COLUMNS",
    "CsvResultWriter",
    "ResultRow",
    "atomic_write",
    "LinkInOutputError",
    "colorize",
    "confined_path",
    "overlay",
    "iter_results_csv",
    "read_results_csv",
    "remove_inside",
    "write_float_tiff_atomic",
    "write_jpeg_atomic",
    "write_png",
    "write_png_atomic",
    "write_text_atomic",
]

CSV_COLUMNS: tuple[str, ...] = (
    "path",
    "score",
    "label",
    "threshold",
    "threshold_source",
    "max_pixel_score",
    "heatmap",
    "width",
    "height",
    "status",
    "error",
    "note",
    "mode",
    "k_shot",
    "refs",
    "refs_sha256",
    "vocabulary_sha256",
    "anomalous_area",
    "bbox",
    "tiles",
    "best_tile",
    "sha256",
    "raw_score",
    "pool",
    "pool_size",
)

_STATUSES = frozenset({"ok", "error"})
_LABELS = frozenset({"anomalous", "normal", ""})


# --------------------------------------------------------------------------------------------------------
# Result rows and the streaming CSV
# --------------------------------------------------------------------------------------------------------


def _fmt_float(value: float | None) -> str:
    """Fixed 6 decimals so the CSV is stable across runs and diffable; '' for a missing value."""
    return "" if value is None else f"{float(value):.6f}"


def _fmt_int(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _json_text(value: str) -> str:
    """Text that encodes as UTF-8: a file name's bytes that are not UTF-8 (surrogate-escaped on POSIX) are
    written as ``\\xNN``, as in scores.csv, so a JSON line or a hook's input can never fail to encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no byte stands for
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _json_float(value: float | None) -> float | None:
    """Rounded float, or None: NaN/inf are not valid JSON, so they count as missing there."""
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def label_of(score: float | None, threshold: float | None) -> str:
    """Decided on the values as written (6 decimals), so that the CSV never contradicts itself
    and relabelling stored rows gives the label a fresh scan would; '' without a threshold (mode
    mutual, uncalibrated) or a score."""
    if score is None or threshold is None:
        return ""
    return "anomalous" if round(score, 6) > round(threshold, 6) else "normal"


@dataclass(frozen=True)
class ResultRow:
    """One scanned file: its score and label, or the error that stopped it."""

    path: str
    status: str  # "ok" or "error"
    score: float | None = None
    label: str = ""
    threshold: float | None = None
    max_pixel_score: float | None = None
    heatmap: str = ""
    width: int | None = None
    height: int | None = None
    error: str = ""
    note: str = ""
    mode: str = ""
    k_shot: int | None = None
    refs: str = ""
    refs_sha256: str = ""
    vocabulary_sha256: str = ""
    threshold_source: str = ""  # where the threshold came from: "--threshold", "calibrated (...)", ...
    anomalous_area: float | None = None  # fraction of pixels over the calibrated pixel threshold
    bbox: str = ""  # "x0 y0 x1 y1" (exclusive end) of the largest region over the pixel threshold
    tiles: int | None = None  # number of tiles in tiled mode
    best_tile: str = ""  # "x0 y0 x1 y1" of the tile that produced the image score, in tiled mode
    sha256: str = ""  # of the input file's bytes
    # mode mutual: the map's maximum before RsCIN (what the threshold applies to), and the pool the
    # image was scored against ("2/3": the second of this run's three pools) with its image count
    raw_score: float | None = None
    pool: str = ""
    pool_size: int | None = None

    @property
    def decision_score(self) -> float | None:
        """The value the threshold applies to: the raw score in mutual mode (``score`` is relative to
        the pool there), else the score."""
        return self.raw_score if self.mode == ScoringMode.MUTUAL.value else self.score

    def __post_init__(self) -> None:
        # A typo here would silently corrupt every downstream filter on status/label, so fail loudly.
        if self.status not in _STATUSES:
            raise ValueError(f"status must be 'ok' or 'error', got {self.status!r}")
        if self.label not in _LABELS:
            raise ValueError(f"label must be 'anomalous', 'normal' or '', got {self.label!r}")
        for name in ("note", "error"):  # a file with thousands of bad tags must not make a 400 KB cell
            text = getattr(self, name)
            if len(text) > NOTE_LIMIT:
                object.__setattr__(self, name, text[: NOTE_LIMIT - 30] + f" ... ({len(text) - NOTE_LIMIT + 30} more)")

    def as_csv_dict(self) -> dict[str, str]:
        """All CSV_COLUMNS as strings: floats '%.6f', ints plain, missing values ''."""
        out: dict[str, str] = {}
        for name in CSV_COLUMNS:
            value = getattr(self, name)
            if name in _FLOAT_FIELDS:
                out[name] = _fmt_float(value)
            elif name in _INT_FIELDS:
                out[name] = _fmt_int(value)
            else:
                out[name] = value
        return out

    def as_json_dict(self) -> dict[str, object]:
        """All CSV_COLUMNS with native JSON types: floats rounded to 6 decimals, None where missing."""
        out: dict[str, object] = {}
        for name in CSV_COLUMNS:
            value = getattr(self, name)
            if name in _FLOAT_FIELDS:
                out[name] = _json_float(value)
            elif name in _INT_FIELDS:
                out[name] = None if value is None else int(value)
            else:
                out[name] = _json_text(value)
        return out

    @classmethod
    def from_csv_dict(cls, values: dict[str, str]) -> ResultRow:
        """Inverse of as_csv_dict (columns missing from an older CSV take their defaults)."""
        kwargs: dict[str, object] = {}
        for name in CSV_COLUMNS:
            if name not in values:
                continue
            text = values[name]
            if name in _FLOAT_FIELDS:
                kwargs[name] = float(text) if text != "" else None
            elif name in _INT_FIELDS:
                kwargs[name] = int(text) if text != "" else None
            else:
                kwargs[name] = text
        return cls(**kwargs)  # type: ignore[arg-type]


_FLOAT_FIELDS = frozenset({"score", "threshold", "max_pixel_score", "anomalous_area", "raw_score"})
_INT_FIELDS = frozenset({"width", "height", "k_shot", "tiles", "pool_size"})


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# Free-text columns that a spreadsheet program could take for a formula. `path` (and `heatmap`) are left
# exactly as they are: they are the keys scripts join on (see README, "scores.csv").
_TEXT_COLUMNS = frozenset({"error", "note"})
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def format_csv_line(values: list[str]) -> str:
    """One CSV record ending in '\\n', quoted like the csv module does, and also when a field holds a
    carriage return (with lineterminator '\\n' the csv module leaves a lone CR unquoted, which
    splits the record for every reader)."""
    buffer = io.StringIO()
    # '\r\n' as terminator makes the writer quote fields with either character; then end with '\n'.
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()[:-2] + "\n"


def spreadsheet_safe(values: dict[str, str]) -> dict[str, str]:
    """The row with free-text cells that start like a formula prefixed by an apostrophe."""
    return {
        name: "'" + value if name in _TEXT_COLUMNS and value.startswith(_FORMULA_START) else value
        for name, value in values.items()
    }


class CsvResultWriter:
    """Writes scores.csv row by row; every row is flushed and fsync'ed at once, so a crash loses nothing
    already written. Use as a context manager; the file is created (with its header) on construction."""

    def __init__(self, path: Path, *, append: bool = False, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # newline="" is what the csv module needs to keep embedded newlines inside quoted fields intact.
        # backslashreplace: undecodable file names (surrogate-escaped on POSIX) must not crash the scan
        # and must not make the whole CSV invalid UTF-8 for pandas/Excel.
        fd, info = self._open_own(self.path)
        if info.st_nlink != 1:
            # another name of the same file (a hard link someone made, a backup's): never appended to
            # through it; the name gets a copy of its own first (written as every file is: safe_fs)
            os.close(fd)
            with open_confined(self.path) as old, atomic_write(self.path, fsync=fsync) as copy:
                shutil.copyfileobj(old, copy, 1 << 20)
            fd, info = self._open_own(self.path)
        os.set_blocking(fd, True)
        exists = append and info.st_size > 0
        if exists:
            os.lseek(fd, 0, os.SEEK_END)
        else:
            os.ftruncate(fd, 0)
        self._fh = open(fd, "w", newline="", encoding="utf-8", errors="backslashreplace")
        # Rows may come from worker threads; interleaved half-rows would corrupt the file.
        self._lock = threading.Lock()
        self._closed = False
        if not exists:
            self._write_line(list(CSV_COLUMNS))

    @staticmethod
    def _open_own(path: Path) -> tuple[int, os.stat_result]:
        # Opened once, without following a link and without blocking on a FIFO; fstat says what it is.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:  # a planted link must not make a (root) cron job write elsewhere
                raise LinkInOutputError(path) from None
            if err.errno == errno.ENXIO:  # a FIFO nobody reads
                raise NotRegularFileError(path, stat.S_IFIFO) from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise NotRegularFileError(path, info.st_mode)
        return fd, info

    @classmethod
    def open(cls, path: Path) -> CsvResultWriter:
        """Alias for the constructor: create ``path`` with the header and return the writer."""
        return cls(path)

    def _write_line(self, values: list[str]) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"write to closed CsvResultWriter ({self.path})")
            self._fh.write(format_csv_line(values))
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())

    def write(self, row: ResultRow) -> None:
        """Append one row and make it durable before returning."""
        values = spreadsheet_safe(row.as_csv_dict())
        self._write_line([values[col] for col in CSV_COLUMNS])

    def write_many(self, rows: list[ResultRow]) -> None:
        """Append several rows with one flush (and fsync) for all of them."""
        with self._lock:
            if self._closed:
                raise ValueError(f"write to closed CsvResultWriter ({self.path})")
            for row in rows:
                values = spreadsheet_safe(row.as_csv_dict())
                self._fh.write(format_csv_line([values[col] for col in CSV_COLUMNS]))
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._fh.close()

    def __enter__(self) -> CsvResultWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_results_csv_atomic(path: Path, rows: list[ResultRow]) -> None:
    """The whole scores.csv at once (header and rows), replacing any previous file atomically."""
    with atomic_write(path) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8", errors="backslashreplace", newline="", write_through=True)
        text.write(format_csv_line(list(CSV_COLUMNS)))
        for row in rows:
            values = spreadsheet_safe(row.as_csv_dict())
            text.write(format_csv_line([values[col] for col in CSV_COLUMNS]))
        text.flush()
        text.detach()  # atomic_write closes the file itself


# A CSV cell that winclip writes is at most a path, a note or an error (notes and errors are capped at
# NOTE_LIMIT characters when written): the csv module's default limit of 131,072 characters would refuse
# a file name that is long after backslash escapes; this one still stops a crafted CSV of one endless field.
CSV_FIELD_LIMIT = 1 << 20
NOTE_LIMIT = 2000  # characters of a row's note or error: a file with 4,000 bad tags is not a 400 KB note


SCORES_CSV_BYTE_LIMIT = 512 << 20  # ~3 million real rows; a crafted file must not take gigabytes of memory
SCORES_CSV_ROW_LIMIT = 1_000_000  # rows read from one scores.csv (report, merge): far above a real folder


def iter_results_csv(
    path: Path, *, errors: str = "strict", row_limit: int = SCORES_CSV_ROW_LIMIT
) -> Iterator[dict[str, str]]:
    """Rows of a scores.csv as dicts keyed by CSV_COLUMNS, one at a time (a link or FIFO at ``path`` is
    refused); OSError (EFBIG) for a file over SCORES_CSV_BYTE_LIMIT bytes or ``row_limit`` rows."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, CSV_FIELD_LIMIT))
    try:
        with open_regular(path, follow_links=False) as raw:
            if os.fstat(raw.fileno()).st_size > SCORES_CSV_BYTE_LIMIT:
                raise OSError(errno.EFBIG, f"larger than {SCORES_CSV_BYTE_LIMIT >> 20} MB, more than winclip reads")
            with io.TextIOWrapper(raw, encoding="utf-8", errors=errors, newline="") as fh:
                for number, row in enumerate(csv.DictReader(fh), start=1):
                    if number > row_limit:
                        raise OSError(errno.EFBIG, f"more than {row_limit:,} rows, more than winclip reads")
                    yield row
    finally:
        csv.field_size_limit(limit)


def read_results_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a scores.csv as dicts keyed by CSV_COLUMNS (see :func:`iter_results_csv`)."""
    return list(iter_results_csv(path))


# --------------------------------------------------------------------------------------------------------
# Colouring
# --------------------------------------------------------------------------------------------------------

# Inferno sampled at 10 evenly spaced points (matplotlib/viridisLite values). Its lightness rises
# monotonically, so "brighter = more anomalous" reads correctly even in greyscale or for colour-blind users.
_INFERNO_POINTS = np.array(
    [
        [0x00, 0x00, 0x04],
        [0x1B, 0x0C, 0x41],
        [0x4A, 0x0C, 0x6B],
        [0x78, 0x1C, 0x6D],
        [0xA5, 0x2C, 0x60],
        [0xCF, 0x44, 0x46],
        [0xED, 0x69, 0x25],
        [0xFB, 0x9B, 0x06],
        [0xF7, 0xD1, 0x3D],
        [0xFC, 0xFF, 0xA4],
    ],
    dtype=np.float64,
)


def _build_lut() -> np.ndarray:
    stops = np.linspace(0.0, 1.0, len(_INFERNO_POINTS))
    xs = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(xs, stops, _INFERNO_POINTS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


LUT: np.ndarray = _build_lut()  # (256, 3) uint8
LUT.flags.writeable = False  # shared module state: nobody should be able to repaint it by accident


_ROWS_PER_CHUNK = 256  # colour a large map a band of rows at a time: temporaries stay small
_PALETTE = LUT.tobytes()


def colour_index(score_map: np.ndarray) -> np.ndarray:
    """(H, W) scores -> (H, W) uint8 index into LUT: ``score * 255 + 0.5`` rounded down, clipped to
    0..255; NaN counts as 0.

    Exactly: the product and sum in float64, rounded once to float32, then truncated (float64 maps are
    taken as float32 first). That is what Pillow's point transform and float-to-8-bit conversion
    compute, which do it in two C passes instead of five numpy ones; the GPU path computes the same.
    """
    scores = np.asarray(score_map)
    if scores.ndim != 2:
        raise ValueError(f"score_map must be 2-D (H, W), got shape {scores.shape}")
    out = np.empty(scores.shape, dtype=np.uint8)
    for top in range(0, scores.shape[0], _ROWS_PER_CHUNK):
        out[top : top + _ROWS_PER_CHUNK] = np.asarray(_index_image(scores[top : top + _ROWS_PER_CHUNK]))
    return out


def _index_image(scores: np.ndarray) -> Image.Image:
    """colour_index of a band of scores as a Pillow "L" image."""
    band = np.ascontiguousarray(scores, dtype=np.float32)
    if np.isnan(band.max()):  # Pillow's conversion of NaN to an integer is the C compiler's choice: never ask
        band = np.nan_to_num(band, nan=0.0, posinf=np.inf, neginf=-np.inf)
    height, width = band.shape
    floats = Image.frombuffer("F", (width, height), band, "raw", "F", 0, 1)
    return floats.point(lambda v: v * 255.0 + 0.5).convert("L")  # clips to 0..255 and truncates


def colorize(score_map: np.ndarray) -> np.ndarray:
    """(H, W) scores on the fixed 0..1 scale -> (H, W, 3) uint8 colours.

    Values are clipped to 0..1 and NaN counts as 0. The scale is never normalised per image: a normal
    image must look calm, not have its noise stretched to full red.
    """
    return np.take(LUT, colour_index(score_map), axis=0)


def _colours_band(scores: np.ndarray) -> np.ndarray:
    """LUT colours of a band of scores, through Pillow's palette conversion (5x faster than a gather)."""
    index = _index_image(scores)
    index.putpalette(_PALETTE)
    return np.asarray(index.convert("RGB"))


def overlay(image_rgb: np.ndarray, score_map: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 image half and half with colorize(score_map): ``(image + colours) // 2``.

    The mean is rounded down (what Pillow's blend gives) and computed in uint8 without widening.
    Works in bands of rows, so a 50-megapixel heatmap needs megabytes of temporaries, not gigabytes.
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if np.shape(score_map) != image.shape[:2]:
        raise ValueError(f"score_map shape {np.shape(score_map)} does not match image {image.shape[:2]}")
    out = np.empty_like(image)
    for top in range(0, image.shape[0], _ROWS_PER_CHUNK):
        rows = slice(top, top + _ROWS_PER_CHUNK)
        colours = _colours_band(np.asarray(score_map[rows]))
        half = out[rows]
        np.right_shift(image[rows], 1, out=half)
        half += colours >> 1
        both_odd = image[rows] & colours
        both_odd &= 1
        half += both_odd
    return out


# --------------------------------------------------------------------------------------------------------
# Confinement to the output folder
# --------------------------------------------------------------------------------------------------------


def confined_path(root: Path, relpath: str) -> Confined:
    """``root/relpath`` for writing: the writers below open every folder between ``root`` and the file
    without following links (creating missing ones), and never write through a link (io/safe_fs.py).

    Raises ValueError for a path that is not plain and relative. A link found on the way is refused at
    write time with :class:`LinkInOutputError` (an OSError) naming it.
    """
    return Confined(Path(root), relpath)


def remove_inside(root: Path, relpath: str) -> None:
    """Delete the regular file ``root/relpath``; a link (as the file or any folder on the way) is left
    alone, never followed, wherever it leads."""
    remove_regular(Confined(Path(root), relpath))


def sync_filesystem(path: Path) -> None:
    """Make every write on the file system holding ``path`` durable: one ``syncfs`` for a whole group
    of files instead of an fsync of each file and folder (Linux; elsewhere a global ``sync``)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2  # each byte minus the one above: one vectorised subtraction per band of rows
_PNG_ROWS_PER_BAND = 64


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _deflater(level: int):
    """A zlib-format compressor: ISA-L's (several times faster) for levels 1-3 where installed."""
    if 1 <= level <= 3:
        try:
            from isal import isal_zlib
        except ImportError:  # optional speed-up; the standard library's zlib writes the same format
            pass
        else:
            return isal_zlib.compressobj(level)
    return zlib.compressobj(level)


def write_png(fh: BinaryIO, rgb: np.ndarray, compress_level: int = 1) -> None:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG into ``fh``, a band of rows at a time.

    Why not Pillow: its PNG encoder tries all five row filters on every row (about 100 ms for 2 MP,
    before any compression) and only has zlib. Here every row gets the Up filter, computed with
    numpy, and the deflate stream comes from ISA-L where available: the same pixels, a file of about
    the same size, in a fifth of the time. Memory stays at one band of rows whatever the image size.
    """
    height, width = rgb.shape[:2]
    row_bytes = width * 3
    fh.write(_PNG_SIGNATURE)
    fh.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
    deflater = _deflater(compress_level)
    previous = np.zeros(row_bytes, dtype=np.uint8)
    for top in range(0, height, _PNG_ROWS_PER_BAND):
        band = rgb[top : top + _PNG_ROWS_PER_BAND].reshape(-1, row_bytes)
        filtered = np.empty((band.shape[0], row_bytes + 1), dtype=np.uint8)
        filtered[:, 0] = _PNG_FILTER_UP
        np.subtract(band[0], previous, out=filtered[0, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
        np.subtract(band[1:], band[:-1], out=filtered[1:, 1:])
        previous = band[-1]
        data = deflater.compress(filtered.data)
        if data:
            fh.write(_png_chunk(b"IDAT", data))
    fh.write(_png_chunk(b"IDAT", deflater.flush()))
    fh.write(_png_chunk(b"IEND", b""))


def _check_rgb(rgb: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{what} data must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def write_png_atomic(path: Path | Confined, rgb: np.ndarray, *, fsync: bool = True, compress_level: int = 6) -> None:
    """Write an (H, W, 3) uint8 array as a PNG, atomically (``fsync=False``: the caller syncs in bulk)."""
    arr = _check_rgb(rgb, "PNG")
    with atomic_write(path, fsync=fsync) as fh:
        write_png(fh, arr, compress_level)


JPEG_QUALITY = 90


def write_jpeg_atomic(
    path: Path | Confined, rgb: np.ndarray, *, fsync: bool = True, quality: int = JPEG_QUALITY
) -> None:
    """Write an (H, W, 3) uint8 array as a JPEG, atomically (``fsync=False``: the caller syncs in bulk)."""
    image = Image.fromarray(_check_rgb(rgb, "JPEG"))
    with atomic_write(path, fsync=fsync) as fh:
        image.save(fh, format="JPEG", quality=quality)


def write_float_tiff_atomic(path: Path | Confined, score_map: np.ndarray, *, fsync: bool = True) -> None:
    """Write an (H, W) score map as a float32 TIFF (zlib, lossless), atomically."""
    arr = np.asarray(score_map)
    if arr.ndim != 2:
        raise ValueError(f"score map must be 2-D (H, W), got shape {arr.shape}")
    data = np.ascontiguousarray(arr, dtype=np.float32)
    with atomic_write(path, fsync=fsync) as fh:
        # zlib works with the standard library alone (no imagecodecs) and is readable by any TIFF reader.
        tifffile.imwrite(fh, data, compression="zlib")


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text with '\\n' line endings (same bytes on every OS), atomically."""
    with atomic_write(path) as fh:
        fh.write(text.encode("utf-8"))


def write_heatmap(heatmaps: HeatmapFormat, path: Path | Confined, rgb: np.ndarray) -> None:
    """A heatmap overlay in the chosen format, atomically and without an fsync (the scan syncs the file
    system once per group of rows, before it commits them). PNG at level 1: heatmaps of textured parts
    barely compress anyway. A new ``HeatmapFormat`` gets its encoder here."""
    if heatmaps is HeatmapFormat.PNG:
        write_png_atomic(path, rgb, fsync=False, compress_level=1)
    elif heatmaps is HeatmapFormat.JPG:
        write_jpeg_atomic(path, rgb, fsync=False)
    elif heatmaps is not HeatmapFormat.NONE:
        raise ValueError(f"no encoder for heatmap format {heatmaps}")
