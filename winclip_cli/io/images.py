"""Find image files on disk and decode them into RGB arrays and model input tensors.

Every per-file failure surfaces as :class:`ImageDecodeError` with a one-line reason, so a scan can
record the file and go on.  Pixel data keeps its bit depth (8-bit, 16-bit or float) until it is
turned into a tensor.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from winclip_cli.errors import ImageDecodeError, SetupError
from winclip_cli.io.library_messages import captured_library_messages
from winclip_cli.io.safe_fs import NotRegularFileError, open_regular, trusted_link
from winclip_cli.options import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # torch is imported where tensors are made: listing and decoding need none of it
    import torch

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# Pillow formats we let it recognise.  Formats with weak or no signatures (TGA, SPIDER, ...) are left
# out on purpose: otherwise a random text file could be "identified" and decoded into noise.
_PILLOW_FORMATS: tuple[str, ...] = (
    "PNG", "JPEG", "MPO", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "JPEG2000", "AVIF", "QOI",
)  # fmt: skip

# tifffile logs every odd tag of a damaged file at WARNING level; with logging unconfigured those
# lines would go to stderr via logging's last-resort handler and clutter the CLI output.  A
# NullHandler only silences that fallback.  While winclip decodes a file, those records (and Pillow's
# warnings) go to the file's note instead, whatever logging configuration is in place (library_messages).
logging.getLogger("tifffile").addHandler(logging.NullHandler())

_ORIENTATION_TAG = 0x0112  # EXIF/TIFF Orientation
_MAX_REASON_CHARS = 240

# TIFF photometric interpretations decoded with tifffile; the rest (palette, YCbCr, Lab, ...) go to Pillow.
_MINISWHITE, _MINISBLACK, _RGB, _SEPARATED = 0, 1, 2, 5
_TIFF_BASE_SAMPLES = {_MINISWHITE: 1, _MINISBLACK: 1, _RGB: 3, _SEPARATED: 4}
_UNASSOCIATED_ALPHA = 2  # TIFF ExtraSamples value


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """What a scan of an input path found."""

    files: list[Path]
    """Image files, sorted by their POSIX path relative to the scanned root."""
    skipped_dirs: list[tuple[Path, str]]
    """Directories that could not be listed, with the reason (e.g. "permission denied")."""


def discover_images(root: Path, exclude: Sequence[Path] = ()) -> Discovery:
    """Find image files under ``root`` (recursively), reporting directories that could not be listed.

    - A ``root`` that is a file (not a directory) is returned as the only file, whatever its
      extension: the user named it explicitly, and ``load_image`` decides by content.
    - Files are matched by lower-cased extension (:data:`IMAGE_EXTENSIONS`); hidden entries (name
      starting with ".") are skipped.
    - Directories that are, or lie inside, one of ``exclude`` (compared as resolved paths) are
      skipped.  An ``exclude`` entry that contains ``root`` itself is ignored, since excluding it
      would hide everything the user asked to scan.
    - Symlinked directories are followed when they point outside ``root``; links to directories
      inside ``root`` are not followed because those files are listed under their real path
      anyway.  Each resolved directory is visited once, so link cycles terminate.
    - A link is followed only when it belongs to the user running winclip or to the owner of what it
      leads to (a linked folder of another user is reported as skipped); :func:`open_image_file`
      applies the same rule again to every link on the way when the file is opened.
    - Links named like images that lead nowhere (broken, or a loop) are listed, so that the
      caller reports them like any unreadable file (see :func:`unreadable_reason`).

    Raises :class:`SetupError` if ``root`` does not exist or cannot be examined.
    """
    root = Path(root)
    try:
        root_stat = root.stat()
    except FileNotFoundError:
        raise SetupError(f"input not found: {root}") from None
    except OSError as exc:
        raise SetupError(f"cannot access input {root}: {_os_reason(exc)}") from None
    if not stat.S_ISDIR(root_stat.st_mode):
        return Discovery(files=[root], skipped_dirs=[])

    real_root = Path(os.path.realpath(root))
    excluded = [real for real in (Path(os.path.realpath(p)) for p in exclude) if not real_root.is_relative_to(real)]

    def is_excluded(real: Path) -> bool:
        return any(real.is_relative_to(ex) for ex in excluded)

    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    visited: set[Path] = set()
    # Iterative depth-first walk: deep trees must not hit the recursion limit.
    stack: list[tuple[Path, Path]] = [(root, real_root)]
    while stack:
        directory, real_dir = stack.pop()
        if real_dir in visited:
            continue
        visited.add(real_dir)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((directory, _os_reason(exc)))
            continue

        subdirs: list[tuple[Path, Path]] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            try:
                is_link = entry.is_symlink()
            except OSError:
                continue
            try:
                is_dir = entry.is_dir()  # follows links; False for broken ones
                is_file = not is_dir and entry.is_file()
            except OSError:  # e.g. a link loop (ELOOP)
                is_dir = is_file = False
            if is_dir:
                real = Path(os.path.realpath(path)) if is_link else real_dir / entry.name
                if is_link and real.is_relative_to(real_root):
                    continue
                if is_link and not trusted_link(path):  # every open checks again: see safe_fs.open_resolved
                    skipped.append((path, "a symbolic link of another user, not followed"))
                    continue
                if not is_excluded(real):
                    subdirs.append((path, real))
            elif is_file and path.suffix.lower() in IMAGE_EXTENSIONS:
                if is_link and excluded and is_excluded(Path(os.path.realpath(path))):
                    continue
                files.append(path)
            elif is_link and path.suffix.lower() in IMAGE_EXTENSIONS and _leads_nowhere(path):
                files.append(path)  # a broken link or a link loop: listed so that its row says so
        # Reversed so that popping visits siblings in name order (decides which path a
        # directory reached twice through links is listed under).
        stack.extend(reversed(subdirs))

    files.sort(key=lambda p: p.relative_to(root).as_posix())
    skipped.sort(key=lambda item: item[0].as_posix())
    return Discovery(files=files, skipped_dirs=skipped)


def find_images(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Image files under ``root``; see :func:`discover_images` (this drops the skipped-dir report)."""
    return discover_images(root, exclude).files


def _leads_nowhere(path: Path) -> bool:
    """True for a symbolic link whose target cannot be reached (missing, or a loop of links)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def unreadable_reason(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be opened, in a few words: broken links and link loops said as such."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if isinstance(exc, FileNotFoundError):
        return "broken symbolic link (its target does not exist)" if path.is_symlink() else "file not found"
    return f"cannot read file: {_os_reason(exc)}"


def _os_reason(exc: OSError) -> str:
    """Short lower-case reason for an OS error, without the path (the caller shows it)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return _one_line(str(exc)) or type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Decoded image
# --------------------------------------------------------------------------------------------------

_RGB_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class LoadedImage:
    """A decoded image: ``rgb`` is (H, W, 3) uint8, uint16 or float32 in [0, 1], C-contiguous."""

    rgb: np.ndarray
    note: str = ""
    """Anything the user should know about the decoding ("first frame of 12"); empty if nothing."""

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            raise ValueError(f"LoadedImage.rgb must be an (H, W, 3) array, got shape {shape}")
        if rgb.dtype not in _RGB_DTYPES:
            raise ValueError(f"LoadedImage.rgb must be uint8, uint16 or float32, got {rgb.dtype}")
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError("LoadedImage.rgb has no pixels")
        object.__setattr__(self, "rgb", np.ascontiguousarray(rgb))

    @property
    def height(self) -> int:
        """Number of rows."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Number of columns."""
        return int(self.rgb.shape[1])

    def to_display_uint8(self) -> np.ndarray:
        """A new (H, W, 3) uint8 array for overlays and previews (rounded, not truncated)."""
        rgb = self.rgb
        if rgb.dtype == np.uint8:
            return rgb.copy()
        if rgb.dtype == np.uint16:
            # round(x * 255 / 65535) == round(x / 257) == (x + 128) // 257 for integers (257 is odd).
            return ((rgb.astype(np.uint32) + 128) // 257).astype(np.uint8)
        unit = np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0)
        return np.rint(unit * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def to_unit_tensor(image: LoadedImage) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: uint8 / 255, uint16 / 65535, float32 as is."""
    import torch

    rgb = image.rgb
    # Channel-first copy in the source dtype first: cheap for 8/16-bit, and the float copy below
    # is then already in the final layout.
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    if rgb.dtype == np.float32:
        return torch.from_numpy(chw)
    scale = np.float32(255.0 if rgb.dtype == np.uint8 else 65535.0)
    unit = chw.astype(np.float32)
    unit /= scale  # true division: uint8 x and uint16 257*x give bit-identical results
    return torch.from_numpy(unit)


def preprocess(
    image: LoadedImage,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(3, h, w) float32 model input: resize the whole image to ``size`` = (h, w), then normalise.

    The resize is antialiased bicubic without cropping (aspect ratio not kept): torchvision's
    ``Resize((h, w), BICUBIC, antialias=True)`` on the [0, 1] float image, within float rounding
    (see :mod:`winclip_cli.core.resize`; it reads the 8/16-bit pixels directly, in bounded memory).  The
    result is not clamped, so bicubic overshoot is kept, as in that pipeline.  It is computed on
    ``device`` (default: the CPU) and returned there.
    """
    import torch

    from winclip_cli.core.resize import resize_bicubic_aa

    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    rgb = image.rgb
    pixels = torch.from_numpy(rgb)
    if device is not None and torch.device(device).type != "cpu":
        if rgb.dtype == np.uint16:  # accelerators have few kernels for uint16: send exact int32 values
            pixels = torch.from_numpy(rgb.astype(np.int32))
        pixels = pixels.to(device)  # the 8-bit image crosses the bus, not a 4x larger float copy
    x = resize_bicubic_aa(pixels, size)
    if rgb.dtype != np.float32:
        # The resize is linear: scaling its output to [0, 1] equals resizing the scaled image.
        x /= 255.0 if rgb.dtype == np.uint8 else 65535.0
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=x.device)[:, None, None]
    std_t = torch.tensor(list(std), dtype=torch.float32, device=x.device)[:, None, None]
    return ((x - mean_t) / std_t).contiguous()


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def load_image(path: Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode a supported file into RGB, honouring EXIF orientation.

    The format is detected from the content, not the extension.  TIFFs are read with tifffile (keeps
    16-bit and float data), falling back to Pillow; everything else goes through Pillow.  Alpha is
    composited onto black (fully transparent pixels become black), so transparent regions look the
    same whatever colour the file happens to store under them.  Images wider x higher than
    ``max_pixels`` are refused from their header, before any pixel data is decoded.

    ``path`` may also be a file opened with :func:`open_image_file` (read from its start, left open).

    Raises :class:`ImageDecodeError` with a one-line reason for anything unusable.
    """
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if isinstance(path, (str, os.PathLike)):
        fh = open_image_file(Path(path))
        owned = True
    else:
        fh, owned = path, False
        fh.seek(0)
    try:
        with captured_library_messages() as library_messages:
            image = _decode(fh, max_pixels)
    except MemoryError:
        raise ImageDecodeError("not enough memory to decode the image") from None
    finally:
        if owned:
            fh.close()
    if library_messages:  # e.g. Pillow's "Corrupt EXIF data": the file's note, not stderr
        image = LoadedImage(image.rgb, _join_notes([image.note, *map(_one_line, library_messages)]))
    return image


def open_image_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading or raise ImageDecodeError saying why it cannot be an image file.

    Opened once: what was opened is checked with fstat (a FIFO or device, which could block or never end,
    is refused without blocking), and the same descriptor is decoded and hashed."""
    try:
        return open_regular(path)
    except NotRegularFileError as exc:
        raise ImageDecodeError(
            "is a directory, not an image file" if "a folder" in (exc.strerror or "") else "not a regular file"
        ) from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(unreadable_reason(path, exc)) from None


_open_image_file = open_image_file


def _decode(fh: BinaryIO, max_pixels: int) -> LoadedImage:
    """Pick the decoder from the file's signature and run it."""
    try:
        head = fh.read(16)
        fh.seek(0)
    except OSError as exc:  # e.g. an I/O error on a failing disk or network share
        raise ImageDecodeError(f"cannot read file: {_os_reason(exc)}") from None
    if not head:  # said after the read: a special file such as /proc/self/mem has size 0 and fails to read
        raise ImageDecodeError("empty file (0 bytes)")
    kind = _sniff(head)
    if kind != "TIFF":
        return _decode_pillow(fh, max_pixels, kind)

    try:
        return _decode_tiff(fh, max_pixels)
    except _TiffFallback as fallback:
        fh.seek(0)
        try:
            image = _decode_pillow(fh, max_pixels, kind)
        except ImageDecodeError as exc:
            raise ImageDecodeError(_one_line(f"{exc} (tifffile: {fallback.reason})")) from None
        if fallback.bits > 8 and image.rgb.dtype == np.uint8:
            # Pillow reads e.g. 16-bit RGB TIFFs as 8-bit; say so instead of losing depth silently.
            note = f"{fallback.bits}-bit samples reduced to 8 bits (tifffile: {fallback.reason})"
            image = LoadedImage(image.rgb, _join_notes([image.note, note]))
        return image


def _sniff(head: bytes) -> str | None:
    """Format name from a file's first bytes (only to route TIFFs and to word error messages)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    return None


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse empty or over-large images from their header dimensions."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {_format_pixels(pixels)} exceeds the "
            f"{_format_pixels(max_pixels)} limit (--max-pixels)"
        )


def _format_pixels(count: int) -> str:
    """Megapixels for realistic sizes, plain pixel counts for tiny limits (used in tests and odd setups)."""
    return f"{count / 1e6:.1f} MP" if count >= 100_000 else f"{count} pixels"


def _one_line(text: str) -> str:
    """Collapse whitespace/newlines and cap the length, so a reason fits on one line."""
    line = " ".join(text.split())
    if len(line) > _MAX_REASON_CHARS:
        line = line[: _MAX_REASON_CHARS - 3].rstrip() + "..."
    return line


def _exc_reason(exc: BaseException) -> str:
    """One-line description of a decoder exception (its type name when the message is empty)."""
    return _one_line(str(exc)) or type(exc).__name__


def _join_notes(notes: Sequence[str | None]) -> str:
    return "; ".join(n for n in notes if n)


# ---- Pillow ---------------------------------------------------------------------------------------


class _PillowBombCheckOff:
    """Reference-counted switch that turns Pillow's own decompression-bomb check off while we decode.

    Why: our own check runs on the header size first, with the user's ``--max-pixels`` and a clear
    message.  Pillow's would otherwise print a warning above ~89 MP and refuse anything above
    ~179 MP even when the user allowed it.  The original limit is restored as soon as the last
    concurrent decode in this process finishes, so other Pillow users get it back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: int | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_pillow_bomb_check_off = _PillowBombCheckOff()
_pillow_formats_cache: list[tuple[str, ...]] = []


def _pillow_formats() -> tuple[str, ...]:
    """The formats of :data:`_PILLOW_FORMATS` this Pillow build can open (unknown names make it raise)."""
    if not _pillow_formats_cache:
        Image.init()
        _pillow_formats_cache.append(tuple(f for f in _PILLOW_FORMATS if f in Image.OPEN))
    return _pillow_formats_cache[0]


pillow_formats = _pillow_formats  # for the other readers of input files (masks)


def _decode_pillow(fh: BinaryIO, max_pixels: int, kind: str | None) -> LoadedImage:
    """Decode the first frame with Pillow into an RGB array."""
    with _pillow_bomb_check_off():
        try:
            im = Image.open(fh, formats=_pillow_formats())
        except UnidentifiedImageError:
            if kind is None:
                raise ImageDecodeError("not an image (unrecognised format)") from None
            raise ImageDecodeError(f"truncated or corrupt image data: unreadable {kind} header") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"image too large: {_exc_reason(exc)}") from None
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise all sorts (SyntaxError, struct.error, ...)
            raise ImageDecodeError(f"truncated or corrupt image data: {_exc_reason(exc)}") from None

        with im:
            width, height = im.size
            _check_size(width, height, max_pixels)
            notes = [_frame_note(im), _pillow_depth_note(im)]
            try:
                im.load()
            except Image.DecompressionBombError as exc:
                raise ImageDecodeError(f"image too large: {_exc_reason(exc)}") from None
            except MemoryError:
                raise
            except Exception as exc:
                raise ImageDecodeError(f"truncated or corrupt image data: {_exc_reason(exc)}") from None
            # A GIF frame may extend the canvas; re-check what was actually decoded.
            _check_size(*im.size, max_pixels)
            orientation, exif_note = _pillow_orientation(im)
            rgb, convert_notes = _pillow_to_rgb(im)
    return LoadedImage(_apply_orientation(rgb, orientation), _join_notes([*notes, exif_note, *convert_notes]))


def _frame_note(im: Image.Image) -> str | None:
    """'first frame of N' for animations / 'first page of N' for multi-page TIFFs; leaves frame 0 current."""
    try:
        count = int(getattr(im, "n_frames", 1))
    except Exception:  # counting frames reads the whole file; a broken tail must not hide frame 0
        count = 1
    try:
        if im.tell() != 0:
            im.seek(0)
    except Exception as exc:
        raise ImageDecodeError(f"truncated or corrupt image data: {_exc_reason(exc)}") from None
    if count <= 1:
        return None
    what = "page" if im.format == "TIFF" else "frame"
    if count > _PLAUSIBLE_FRAMES:  # a header's claim (APNG's acTL says 2147483647), not a count of frames
        return f"first {what} (the file claims {count} {what}s)"
    return f"first {what} of {count}"


_PLAUSIBLE_FRAMES = 100_000


def _pillow_depth_note(im: Image.Image) -> str | None:
    """Say so when Pillow will reduce >8-bit samples (e.g. 16-bit RGB PNG) to 8 bits."""
    if im.mode not in ("L", "LA", "P", "RGB", "RGBA", "CMYK"):
        return None
    for tile in im.tile:  # type: ignore[attr-defined]  # set by ImageFile.open, not in Image's stubs
        rawmode = tile[3][0] if isinstance(tile[3], tuple) and tile[3] else tile[3]
        if isinstance(rawmode, str) and ";16" in rawmode:
            return "16-bit samples reduced to 8 bits (Pillow cannot keep them for this image type)"
    return None


def _pillow_orientation(im: Image.Image) -> tuple[int, str | None]:
    """EXIF orientation (1..8) of a loaded image; 1 with a note when the EXIF block is unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1, "EXIF data unreadable, orientation ignored"
    try:
        orientation = int(value)
    except (TypeError, ValueError):
        return 1, None
    return (orientation if 1 <= orientation <= 8 else 1), None


def _pillow_to_rgb(im: Image.Image) -> tuple[np.ndarray, list[str]]:
    """(H, W, 3) array from a loaded Pillow image, keeping 16-bit and float data."""
    mode = im.mode
    try:
        if mode in ("I", "F") or mode.startswith("I;16"):
            gray, notes = _to_supported_dtype(np.array(im)[..., None], bits=None)
            return _to_rgb3(gray), notes
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
            # convert("RGBA") also turns palette / colour-key transparency into an alpha channel.
            rgba = np.array(im.convert("RGBA"))
            alpha = rgba[..., 3].astype(np.float32) / np.float32(255.0)
            return _composite_on_black(rgba[..., :3], alpha), []
        # An RGB image is read as is: convert("RGB") would first copy it inside Pillow (2 ms for 2 MP)
        return np.array(im if mode == "RGB" else im.convert("RGB")), []
    except ValueError as exc:  # Pillow has no conversion for a few exotic modes
        raise ImageDecodeError(f"unsupported pixel mode {mode}: {_exc_reason(exc)}") from None


# ---- tifffile -------------------------------------------------------------------------------------


class _TiffFallback(Exception):
    """tifffile could not (or should not) decode this TIFF; Pillow gets a try."""

    def __init__(self, reason: str, bits: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bits = bits


def _decode_tiff(fh: BinaryIO, max_pixels: int) -> LoadedImage:
    """Decode the first page of a TIFF with tifffile, keeping 16-bit / float samples."""
    try:
        tif = tifffile.TiffFile(fh)
    except MemoryError:
        raise
    except Exception as exc:
        raise _TiffFallback(_exc_reason(exc)) from None
    with tif:  # does not close ``fh``: tifffile only closes handles it opened itself
        try:
            page = tif.pages.first
            n_pages = len(tif.pages)
            width, height = int(page.imagewidth), int(page.imagelength)
            bits = int(page.bitspersample)
            photometric = int(page.photometric)
            axes = str(page.axes)
            extrasamples = tuple(int(x) for x in page.extrasamples)
            orientation = page.tags.valueof(_ORIENTATION_TAG, 1)
            page_shape = tuple(int(n) for n in page.shape)
            itemsize = np.dtype(page.dtype).itemsize if page.dtype is not None else max(1, (bits + 7) // 8)
        except MemoryError:
            raise
        except Exception as exc:
            raise _TiffFallback(_exc_reason(exc)) from None
        _check_size(width, height, max_pixels)
        _check_tiff_page_bytes(width, height, page_shape, axes, itemsize)
        if photometric not in _TIFF_BASE_SAMPLES:
            raise _TiffFallback(f"photometric {photometric} is left to Pillow", bits)
        try:
            data = page.asarray()
        except MemoryError:
            raise
        except Exception as exc:  # e.g. a compression that needs the optional imagecodecs package
            raise _TiffFallback(_exc_reason(exc), bits) from None

    rgb, notes = _tiff_to_rgb(np.asarray(data), axes, photometric, extrasamples, bits)
    if n_pages > 1:
        notes.insert(0, f"first page of {n_pages}")
    try:
        orientation = int(orientation)
    except (TypeError, ValueError):
        orientation = 1
    if not 1 <= orientation <= 8:
        orientation = 1
    return LoadedImage(_apply_orientation(rgb, orientation), _join_notes(notes))


# Of one page's values per pixel at most 5 are used (CMYK + alpha); a page may hold this much more
# (extra channels, a depth stack in one page) before it is refused: tifffile reads a page whole.
_TIFF_MAX_VALUES_USED = 5
_TIFF_MAX_UNUSED_BYTES = 64 << 20


def _check_tiff_page_bytes(width: int, height: int, shape: tuple[int, ...], axes: str, itemsize: int) -> None:
    """Refuse, from the page's metadata, a page whose data would take far more memory than the image
    needs (e.g. a 256x256 page holding a 4000-deep float64 volume: 2 GB for a 64 kP image)."""
    values = math.prod(shape)
    per_pixel = values // max(1, width * height)
    unused = (values - width * height * min(per_pixel, _TIFF_MAX_VALUES_USED)) * itemsize
    if unused > _TIFF_MAX_UNUSED_BYTES:
        raise ImageDecodeError(
            f"TIFF page holds {per_pixel} values per pixel (shape {'x'.join(map(str, shape))}, axes {axes}, "
            f"{_format_bytes(values * itemsize)}); at most {_TIFF_MAX_VALUES_USED} are used, so it is not read"
        )


def _format_bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _tiff_to_rgb(
    data: np.ndarray, axes: str, photometric: int, extrasamples: tuple[int, ...], bits: int
) -> tuple[np.ndarray, list[str]]:
    """(H, W, 3) array from one TIFF page's samples, laid out as described by ``axes``."""
    notes: list[str] = []
    if data.ndim != len(axes):
        raise ImageDecodeError(f"unsupported TIFF layout: shape {data.shape} with axes {axes}")
    # Keep Y, X and S (samples); of any other axis (e.g. a depth stack) take the first plane.
    for axis in [a for a in axes if a not in "YXS"]:
        index = axes.index(axis)
        if data.shape[index] > 1:
            notes.append(f"first plane of {data.shape[index]}")
        data = np.take(data, 0, axis=index)
        axes = axes[:index] + axes[index + 1 :]
    if "S" not in axes:
        data = data[..., None]
        axes += "S"
    if sorted(axes) != ["S", "X", "Y"]:
        raise ImageDecodeError(f"unsupported TIFF layout: axes {axes}")
    data = data.transpose([axes.index(a) for a in "YXS"])  # planar (S, Y, X) -> (Y, X, S)

    base = _TIFF_BASE_SAMPLES[photometric]
    samples = data.shape[2]
    if samples < base:
        raise ImageDecodeError(f"TIFF has {samples} sample(s) per pixel, its colour space needs {base}")
    colour, dtype_notes = _to_supported_dtype(data[..., :base], bits)
    notes += dtype_notes
    if photometric == _MINISWHITE:
        colour = _invert(colour)
    elif photometric == _SEPARATED:
        colour = _cmyk_to_rgb(colour)
    # Associated (premultiplied) alpha is simply dropped: that already equals compositing on black.
    if samples > base and extrasamples and extrasamples[0] == _UNASSOCIATED_ALPHA:
        colour = _composite_on_black(colour, _alpha_to_unit(data[..., base]))
    return _to_rgb3(colour), notes


# ---- sample conversions ---------------------------------------------------------------------------


def _to_supported_dtype(a: np.ndarray, bits: int | None) -> tuple[np.ndarray, list[str]]:
    """Map samples of any numeric dtype to uint8, uint16 or float32 in [0, 1] (see load_image rules).

    ``bits`` is the TIFF BitsPerSample, used to stretch e.g. 12-bit data stored in uint16 to the
    full range; ``None`` when unknown.
    """
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    dtype = a.dtype
    if dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255), []
    if dtype == np.uint8 or dtype == np.uint16:
        full = 8 * dtype.itemsize
        if bits is not None and full - 8 < bits < full and bits > 1:
            # e.g. 12-bit samples in uint16 would otherwise look almost black.
            top = (1 << bits) - 1
            target = (1 << full) - 1
            stretched = (a.astype(np.uint32) * target + top // 2) // top
            return stretched.astype(dtype), [f"{bits}-bit samples scaled to {full} bits"]
        return a, []
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        scaled = (a.astype(np.float64) - float(info.min)) / (float(info.max) - float(info.min))
        return scaled.astype(np.float32), [f"{dtype.name} samples scaled to [0, 1] by type range"]
    if dtype.kind == "f":
        return _normalise_float(a)
    raise ImageDecodeError(f"unsupported sample type {dtype.name}")


def _normalise_float(a: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """float32 in [0, 1]: kept if already inside, else min-max rescaled; NaN/inf become 0."""
    # float64 stays float64 until the end so huge values do not overflow float32 before rescaling.
    work = a if a.dtype == np.float64 else a.astype(np.float32)
    finite = np.isfinite(work)
    n_bad = int(work.size - np.count_nonzero(finite))
    notes: list[str] = []
    if n_bad == work.size:
        return np.zeros(work.shape, np.float32), ["no finite values, image set to 0"]
    valid = work[finite] if n_bad else work
    lo, hi = float(valid.min()), float(valid.max())
    if lo >= 0.0 and hi <= 1.0:
        out = work.astype(np.float32, copy=False)  # ``work`` is already a private copy or float64
    else:
        span = hi - lo
        out = ((work - lo) / span).astype(np.float32) if span > 0 else np.zeros(work.shape, np.float32)
        notes.append(f"float data rescaled from [{lo:.6g}, {hi:.6g}] to [0, 1]")
    if n_bad:
        out[~finite] = 0.0
        notes.append(f"{n_bad} NaN/inf value(s) replaced by 0")
    return out, notes


def _invert(colour: np.ndarray) -> np.ndarray:
    """Negative of normalised samples (TIFF 'min is white')."""
    if colour.dtype == np.uint8:
        return np.uint8(255) - colour
    if colour.dtype == np.uint16:
        return np.uint16(65535) - colour
    return np.float32(1.0) - colour


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """Naive CMYK -> RGB, r = (1 - c)(1 - k), as Pillow does; keeps the dtype."""
    if cmyk.dtype == np.float32:
        return (1.0 - cmyk[..., :3]) * (1.0 - cmyk[..., 3:4])
    top = 255 if cmyk.dtype == np.uint8 else 65535
    inv = (top - cmyk.astype(np.uint32)[..., :3]) * (top - cmyk.astype(np.uint32)[..., 3:4])
    return ((inv + top // 2) // top).astype(cmyk.dtype)


def _alpha_to_unit(alpha: np.ndarray) -> np.ndarray:
    """Alpha samples of any dtype as float32 opacity in [0, 1]."""
    if not alpha.dtype.isnative:
        alpha = alpha.astype(alpha.dtype.newbyteorder("="))
    if alpha.dtype == np.bool_:
        return alpha.astype(np.float32)
    if alpha.dtype.kind in "iu":
        top = float(np.iinfo(alpha.dtype).max)
        return np.clip(alpha.astype(np.float32) / np.float32(top), 0.0, 1.0)
    return np.clip(np.nan_to_num(alpha.astype(np.float32), nan=0.0), 0.0, 1.0)


def _composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour * alpha, rounded back to the integer dtype where needed."""
    blended = colour.astype(np.float32) * alpha[..., None]
    if colour.dtype == np.float32:
        return blended
    return np.rint(blended).astype(colour.dtype)


def _to_rgb3(colour: np.ndarray) -> np.ndarray:
    """Contiguous (H, W, 3): one gray channel is replicated."""
    if colour.shape[2] == 1:
        return np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour[..., :3])


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) so the array is upright; same result as ImageOps.exif_transpose."""
    if orientation == 2:
        rgb = rgb[:, ::-1]
    elif orientation == 3:
        rgb = rgb[::-1, ::-1]
    elif orientation == 4:
        rgb = rgb[::-1]
    elif orientation == 5:
        rgb = rgb.transpose(1, 0, 2)
    elif orientation == 6:
        rgb = rgb.transpose(1, 0, 2)[:, ::-1]
    elif orientation == 7:
        rgb = rgb.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        rgb = rgb.transpose(1, 0, 2)[::-1]
    if any(step < 0 for step in rgb.strides):
        # ascontiguousarray keeps a reversed axis of length 1 as it is (numpy calls it contiguous), and
        # torch refuses negative strides: a fresh copy has none
        return rgb.copy()
    return np.ascontiguousarray(rgb)
