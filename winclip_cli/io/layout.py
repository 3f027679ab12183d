"""The layout of an output folder: every folder and file name winclip writes there, in one place.

``OutputLayout(out)`` gives the paths of the top-level files and folders; the ``*_relpath`` functions
derive, from an input file's relative path, where its heatmap, raw map and thumbnails go (relative to the
output folder, POSIX separators). The names are what users' scripts and the report link to, so they never
change between versions. Nothing here touches the disk.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from winclip_cli.io.safe_fs import Confined
from winclip_cli.options import DEFAULT_HEATMAPS, HEATMAP_SUFFIXES, HeatmapFormat

__all__ = [
    "HEATMAP_DIR",
    "LOCK_NAME",
    "MAP_DIR",
    "OWN_FILES",
    "OWN_FOLDERS",
    "REPORT_NAME",
    "RUN_NAME",
    "SCORES_NAME",
    "KEPT_POOL_NAME",
    "STATE_DB_NAME",
    "STATE_DIR",
    "THUMB_DIR",
    "OutputLayout",
    "heatmap_relpath",
    "map_relpath",
    "map_relpath_of_heatmap",
    "thumbnail_relpaths",
    "thumbnail_relpaths_of_heatmap",
]

SCORES_NAME = "scores.csv"  # one row per input file
RUN_NAME = "run.json"  # how the run was made
REPORT_NAME = "report.html"
HEATMAP_DIR = "heatmaps"  # colour overlays, mirroring the input folders
MAP_DIR = "maps"  # raw float TIFF maps (--save-maps)
THUMB_DIR = "thumbs"  # JPEG previews for the report
STATE_DIR = ".winclip"  # run state and lock, see io/state.py
STATE_DB_NAME = "state.sqlite"
KEPT_POOL_NAME = "mutual-pool.npz"  # --mode mutual: features of the images scored last, for the next run
LOCK_NAME = "lock"

# What winclip owns in an output folder (it creates, replaces and deletes files only in these), so a
# folder shared with other tools keeps their files.
OWN_FOLDERS = (HEATMAP_DIR, MAP_DIR, THUMB_DIR)
OWN_FILES = (SCORES_NAME, RUN_NAME, REPORT_NAME)

# Most file systems cap one name at 255 bytes; the suffixes we append must not push a long name over it.
_NAME_MAX_BYTES = 255
_IMAGE_THUMB_SUFFIX = ".img.jpg"  # distinct endings: no image name can produce another's heatmap thumbnail
_HEAT_THUMB_SUFFIX = ".heat.jpg"


@dataclass(frozen=True)
class OutputLayout:
    """The paths of an output folder's own files and folders."""

    root: Path

    @property
    def scores_csv(self) -> Path:
        return self.root / SCORES_NAME

    @property
    def run_json(self) -> Path:
        return self.root / RUN_NAME

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_NAME

    @property
    def heatmaps(self) -> Path:
        return self.root / HEATMAP_DIR

    @property
    def maps(self) -> Path:
        return self.root / MAP_DIR

    @property
    def thumbs(self) -> Path:
        return self.root / THUMB_DIR

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def state_db(self) -> Path:
        return self.state_dir / STATE_DB_NAME

    @property
    def kept_pool(self) -> Path:
        return self.state_dir / KEPT_POOL_NAME

    @property
    def kept_pool_confined(self) -> Confined:
        """The kept pool as writes and reads inside OUT reach it: no link below OUT followed."""
        return Confined(self.root, f"{STATE_DIR}/{KEPT_POOL_NAME}")

    @property
    def lock(self) -> Path:
        return self.state_dir / LOCK_NAME

    @property
    def own_folders(self) -> tuple[Path, ...]:
        return tuple(self.root / name for name in OWN_FOLDERS)

    @property
    def own_files(self) -> tuple[Path, ...]:
        return tuple(self.root / name for name in OWN_FILES)


# --------------------------------------------------------------------------------------------------------
# Heatmap and map names
# --------------------------------------------------------------------------------------------------------


def _split_parts(relpath: str) -> list[str]:
    # '/' is the documented separator; on Windows '\\' is one too, and leaving it in a part would let
    # '..\\..\\x' escape once the string is joined to a Path there. On POSIX '\\' is an ordinary character.
    if os.name == "nt":
        relpath = relpath.replace("\\", "/")
    return relpath.split("/")


def _fit_name(name: str, suffix: str) -> str:
    """Shorten a too-long name (in UTF-8 bytes) and add a hash, so distinct long names stay distinct."""
    if len(name.encode("utf-8", "surrogateescape")) <= _NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    tail = f"~{digest}{suffix}"
    budget = _NAME_MAX_BYTES - len(tail)
    head = name
    while len(head.encode("utf-8", "surrogateescape")) > budget:
        head = head[:-1]
    return head + tail


def _portable_part(part: str) -> str:
    """A name part that is valid UTF-8: bytes that were not (surrogate-escaped in Python, e.g. b'\\xff' ->
    '\\udcff') become '%FF', plus a short hash of the original so a name that really holds '%FF' stays
    distinct. The same text is then the file's name on disk and the CSV's `heatmap` cell."""
    if not any("\ud800" <= char <= "\udfff" for char in part):
        return part
    escaped = "".join(
        (f"%{ord(char) - 0xDC00:02X}" if "\udc80" <= char <= "\udcff" else f"%u{ord(char):04X}")
        if "\ud800" <= char <= "\udfff"
        else char
        for char in part
    )
    digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{escaped}~{digest}"


def heatmap_relpath(image_relpath: str, suffix: str = HeatmapFormat(DEFAULT_HEATMAPS).suffix) -> str:
    """'good/001.jpg' -> 'heatmaps/good/001.jpg.png' (POSIX separators, relative to the output folder);
    ``suffix`` another format's (``HeatmapFormat.suffix``), e.g. ".jpg" for JPEG heatmaps.

    Subfolders are mirrored and the full file name is kept, so 'a.jpg' and 'a.png' never collide. The
    result always stays inside the output folder: empty, '.' and root parts are dropped and '..' becomes
    '__'. Only NUL (invalid everywhere) is replaced; unicode, spaces and newlines are kept; bytes that are
    not UTF-8 are written as '%XX' (see ``_portable_part``), so the name in scores.csv is the name on disk.
    """
    parts: list[str] = []
    for part in _split_parts(image_relpath):
        if part in ("", "."):
            continue  # absolute paths and doubled slashes: the root/empty parts simply vanish
        if part == "..":
            part = "__"  # neutralised rather than dropped so '../a.jpg' and 'a.jpg' do not collide
        parts.append(_portable_part(part.replace("\x00", "_")))
    if not parts:
        raise ValueError(f"cannot derive a heatmap name from {image_relpath!r}")
    parts[-1] = _fit_name(parts[-1] + suffix, suffix)
    return "/".join([HEATMAP_DIR, *parts])


def map_relpath(image_relpath: str) -> str:
    """'good/001.jpg' -> 'maps/good/001.jpg.tiff': the raw float map, beside the heatmap's naming."""
    return map_relpath_of_heatmap(heatmap_relpath(image_relpath))


def map_relpath_of_heatmap(heatmap: str) -> str:
    """'heatmaps/good/001.jpg.png' (or a JPEG heatmap '... .jpg.jpg') -> 'maps/good/001.jpg.tiff'."""
    return MAP_DIR + "/" + heatmap_stem(heatmap[len(HEATMAP_DIR) + 1 :]) + ".tiff"


def is_heatmap_name(name: str) -> bool:
    """Whether ``name`` ends as a heatmap of some ``--heatmaps`` format does."""
    return name.endswith(HEATMAP_SUFFIXES)


def heatmap_stem(name: str) -> str:
    """A heatmap's name without its format's suffix (the name itself when it has none)."""
    for suffix in HEATMAP_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------------------
# Thumbnail names
# --------------------------------------------------------------------------------------------------------


def _name_bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def _fit_stem(stem: str) -> str:
    """Shorten ``stem`` so that stem + the longest thumbnail suffix fits one file name (255 bytes)."""
    if _name_bytes(stem + _HEAT_THUMB_SUFFIX) <= _NAME_MAX_BYTES:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    tail = f"~{digest}"
    head = stem
    while _name_bytes(head + tail + _HEAT_THUMB_SUFFIX) > _NAME_MAX_BYTES:
        head = head[:-1]
    return head + tail


def thumbnail_relpaths(image_relpath: str) -> tuple[str, str]:
    """(image thumbnail, heatmap thumbnail) paths relative to OUT, e.g. 'good/001.jpg' ->
    ('thumbs/good/001.jpg.img.jpg', 'thumbs/good/001.jpg.heat.jpg').

    Derived from :func:`heatmap_relpath`, so the same safe naming applies ('..' neutralised, never outside
    OUT, long names shortened with a hash).
    """
    return thumbnail_relpaths_of_heatmap(heatmap_relpath(image_relpath))


def thumbnail_relpaths_of_heatmap(heat: str) -> tuple[str, str]:
    """The thumbnails that belong to the heatmap ``heat`` ('heatmaps/good/001.jpg.png')."""
    parts = heat.split("/")[1:]  # drop the 'heatmaps' folder
    stem = _fit_stem(heatmap_stem(parts[-1]))
    folder = "/".join([THUMB_DIR, *parts[:-1]])
    return f"{folder}/{stem}{_IMAGE_THUMB_SUFFIX}", f"{folder}/{stem}{_HEAT_THUMB_SUFFIX}"


def relative_name(path: Path, root: Path) -> str:
    """POSIX path of ``path`` relative to the scanned root (the file name when root is not a folder)."""
    if not root.is_dir():
        return path.name
    return path.relative_to(root).as_posix()
