"""The few-shot reference memory: an ``.npz`` of numeric arrays plus one JSON metadata string.

Never unpickles: files are read with ``allow_pickle=False`` and every array is checked for dtype
and shape before use, so a foreign, truncated or crafted file is refused with one clear line.

Layout (format 1):
    metadata            0-d unicode array holding a JSON object (see ``MemoryMetadata``)
    patches             float32 (k, G, C)     full-image patch tokens after ln_post, not projected
    windows_<scale>     float32 (k, W_s, D)   window embeddings of each scale
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winclip_cli import __version__
from winclip_cli.core.winclip import ReferenceMemory
from winclip_cli.errors import MemoryFileError
from winclip_cli.io.checks import check_memory_file
from winclip_cli.io.hashing import sha256_handle
from winclip_cli.io.safe_fs import atomic_write, open_regular
from winclip_cli.options import Tiling

FORMAT_VERSION = 1
REQUIRED_METADATA = (
    "format_version",
    "architecture",
    "weights_sha256",
    "input_size",
    "scales",
    "grid_size",
    "patch_dim",
    "embed_dim",
    "references",
)


@dataclass
class MemoryFile:
    """A loaded memory: metadata, arrays, and the file's identity."""

    path: Path
    sha256: str
    metadata: dict[str, Any]
    patches: np.ndarray  # (k, G, C)
    windows: dict[int, np.ndarray]  # scale -> (k, W_s, D)

    @property
    def k(self) -> int:
        """Number of reference images (in tiled mode each holds several entries)."""
        return len(self.metadata["references"])

    @property
    def entries(self) -> int:
        return int(self.patches.shape[0])

    @property
    def content_id(self) -> str:
        """Identity of what the memory holds (references and how they were embedded), independent of
        metadata that can change without changing a score, such as a stored calibration."""
        meta = self.metadata
        payload = {
            "references": [ref["sha256"] for ref in meta["references"]],
            "model": [meta["architecture"], meta["weights_sha256"], meta.get("precision"), meta["input_size"]],
            "scales": meta["scales"],
            "tile": [meta.get("tile"), meta.get("tile_overlap")],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.metadata["scales"])

    @property
    def reference_hashes(self) -> set[str]:
        return {ref["sha256"] for ref in self.metadata["references"]}

    def reference_index(self) -> dict[str, int]:
        """sha256 of a reference file -> its index, for leave-one-out scoring."""
        return {ref["sha256"]: i for i, ref in enumerate(self.metadata["references"])}

    def to_reference_memory(self, scales: tuple[int, ...], device: torch.device) -> ReferenceMemory:
        # entry e belongs to reference owner[e]; each entry holds G patches and W_s windows per scale
        counts = [int(ref.get("entries", 1)) for ref in self.metadata["references"]]
        return ReferenceMemory.from_arrays(self.patches, [self.windows[s] for s in scales], counts, device)


def describe_model(
    identity: dict[str, str],
    input_size: tuple[int, int],
    scales: tuple[int, ...],
    grid_size: tuple[int, int],
    tiling: Tiling = Tiling(),
) -> dict[str, Any]:
    """How images are embedded: what a memory and the scan that uses it must agree on."""
    return {
        "tile": tiling.size,
        "tile_overlap": tiling.recorded_overlap,
        "architecture": identity["architecture"],
        "weights": identity["weights"],
        "weights_sha256": identity["weights_sha256"],
        "precision": identity["precision"],
        "input_size": list(input_size),
        "scales": list(scales),
        "grid_size": list(grid_size),
    }


def build_metadata(
    model: dict[str, Any],
    class_name: str,
    vocabulary_sha256: str,
    references: list[dict[str, Any]],
    patch_dim: int,
    embed_dim: int,
) -> dict[str, Any]:
    from datetime import datetime

    return {
        "format_version": FORMAT_VERSION,
        "tool": "winclip",
        "tool_version": __version__,
        **model,
        "patch_dim": patch_dim,
        "embed_dim": embed_dim,
        "class_name": class_name,
        "vocabulary_sha256": vocabulary_sha256,
        "references": references,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_memory(path: Path, metadata: dict[str, Any], patches: np.ndarray, windows: dict[int, np.ndarray]) -> None:
    """Write atomically: a temporary file in the same folder, fsync'ed, then renamed over ``path``; the
    file gets the mode the umask gives any new file (readable by a cron user, like the CSVs)."""
    arrays = {"metadata": np.array(json.dumps(metadata, ensure_ascii=False)), "patches": patches.astype(np.float32)}
    for scale, array in windows.items():
        arrays[f"windows_{scale}"] = array.astype(np.float32)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stubs take the keywords for options


# The arrays a memory may hold, by member name; anything else in the archive is refused.
_MEMBER_NAME = re.compile(r"(metadata|patches|windows_[0-9]{1,4})\.npy")
# np.savez stores arrays uncompressed; a member that expands far beyond the file's own size is a zip bomb.
_MAX_EXPANSION = 4
_MAX_METADATA_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _Member:
    """One array of the archive as its zip directory and npy header declare it (nothing read yet)."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype


def _declared_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    """Shape and dtype from the npy header, checked against the size the zip directory declares."""
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise MemoryFileError(f"{path}: {info.filename} has npy format {version}, which winclip does not read")
        header_bytes = handle.tell()
    if dtype.hasobject:
        raise MemoryFileError(f"{path} contains pickled objects; refusing to load it")
    data_bytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header_bytes + data_bytes:
        raise MemoryFileError(
            f"{path}: {info.filename} declares {info.file_size} bytes but its header describes "
            f"{header_bytes + data_bytes} ({dtype} {shape}); the file is corrupt or crafted"
        )
    return _Member(info, tuple(shape), dtype)


def _read_member(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    with archive.open(member.info) as handle:
        return np.lib.format.read_array(handle, allow_pickle=False)


def load_memory(path: Path) -> MemoryFile:
    """Read and validate a memory file; every problem is a MemoryFileError with one line.

    Nothing is decompressed before the archive's directory, every npy header and the metadata agree
    on every array's shape and size: a crafted archive (a zip bomb, a lying header) is refused before
    it can take memory.
    """
    path = Path(path)
    check_memory_file(path)
    try:
        handle = open_regular(path)  # opened once, never blocking on a FIFO; read and hashed from it
    except OSError as err:
        raise MemoryFileError(f"cannot read {path}: {err.strerror or err}") from None
    with handle:
        return _load_from(path, handle)


def _load_from(path: Path, handle) -> MemoryFile:
    try:
        archive = zipfile.ZipFile(handle)
    except zipfile.BadZipFile:
        raise MemoryFileError(f"{path} is not a winclip memory (not an .npz file from `winclip build-refs`)") from None
    except OSError as err:
        raise MemoryFileError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        with archive:
            metadata, patches, windows = _read_archive(path, archive)
    except MemoryFileError:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise MemoryFileError(f"{path} contains pickled objects; refusing to load it") from None
        raise MemoryFileError(f"{path} is corrupt or not a reference memory: {err}") from None
    except (OSError, EOFError, KeyError, NotImplementedError, RuntimeError, zipfile.BadZipFile) as err:
        # NotImplementedError: a compression method zipfile lacks; RuntimeError: an encrypted member
        raise MemoryFileError(f"{path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    return MemoryFile(path=path, sha256=sha256_handle(handle), metadata=metadata, patches=patches, windows=windows)


def _read_archive(path: Path, archive: zipfile.ZipFile) -> tuple[dict[str, Any], np.ndarray, dict[int, np.ndarray]]:
    infos = archive.infolist()
    names = [info.filename for info in infos]
    unexpected = sorted({name for name in names if not _MEMBER_NAME.fullmatch(name)})
    if unexpected:
        shown = ", ".join(repr(name[:60]) for name in unexpected[:3])
        raise MemoryFileError(f"{path} is not a winclip reference memory (unexpected member {shown})")
    if len(set(names)) != len(names):
        raise MemoryFileError(f"{path} holds the same array twice; the file is corrupt or crafted")
    if "metadata.npy" not in names or "patches.npy" not in names:
        raise MemoryFileError(f"{path} is not a winclip reference memory (no metadata/patches arrays)")
    declared = sum(info.file_size for info in infos)
    on_disk = path.stat().st_size
    if declared > _MAX_EXPANSION * on_disk + 2**20:
        raise MemoryFileError(
            f"{path} declares {declared} bytes of arrays in a file of {on_disk} bytes; refusing it (a zip bomb?)"
        )
    members = {info.filename[: -len(".npy")]: _declared_member(path, archive, info) for info in infos}

    meta_member = members["metadata"]
    if meta_member.dtype.kind != "U" or meta_member.shape != () or meta_member.info.file_size > _MAX_METADATA_BYTES:
        raise MemoryFileError(f"{path}: metadata is not a JSON string of at most {_MAX_METADATA_BYTES} bytes")
    metadata = _parse_metadata(path, _read_member(archive, meta_member))

    entries = sum(int(ref.get("entries", 1)) for ref in metadata["references"])
    grid = metadata["grid_size"]
    expected = {"patches": (entries, grid[0] * grid[1], metadata["patch_dim"])}
    for scale in metadata["scales"]:
        expected[f"windows_{scale}"] = (entries, (grid[0] - scale + 1) * (grid[1] - scale + 1), metadata["embed_dim"])
    for name, shape in expected.items():
        member = members.get(name)
        if member is None:
            raise MemoryFileError(f"{path} lacks the window embeddings of scale {name[len('windows_') :]}")
        if member.dtype != np.float32 or len(member.shape) != 3:
            raise MemoryFileError(
                f"{path}: array {name!r} must be float32 with 3 dimensions, got {member.dtype} {member.shape}"
            )
        if member.shape[0] != entries:
            raise MemoryFileError(
                f"{path}: metadata lists {entries} embedded images or tiles but {name} holds {member.shape[0]}"
            )
        if member.shape != shape:
            raise MemoryFileError(f"{path}: {name} array has shape {member.shape}, inconsistent with its metadata")
    patches = _float_array(path, _read_member(archive, members["patches"]), "patches")
    windows = {
        scale: _float_array(path, _read_member(archive, members[f"windows_{scale}"]), f"windows_{scale}")
        for scale in metadata["scales"]
    }
    return metadata, patches, windows


def _whole(value: Any, what: str, minimum: int = 1) -> int:
    """A JSON integer >= minimum (not a bool, not a float, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 2**31:
        raise TypeError(f"{what} must be an integer of at least {minimum}, got {str(value)[:40]!r}")
    return value


def _parse_metadata(path: Path, raw: np.ndarray) -> dict[str, Any]:
    from winclip_cli.core.calibration import Calibration
    from winclip_cli.errors import SetupError

    try:
        metadata = json.loads(str(raw))
    except RecursionError:
        raise MemoryFileError(f"{path}: metadata is nested too deeply") from None
    except ValueError as err:  # invalid JSON, or a number too long to convert
        reason = "a number with too many digits" if "digits" in str(err) else str(err)[:80]
        raise MemoryFileError(f"{path}: metadata is not valid JSON ({reason})") from None
    if not isinstance(metadata, dict):
        raise MemoryFileError(f"{path}: metadata is not a JSON object")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise MemoryFileError(f"{path}: metadata lacks {', '.join(missing)}")
    version = metadata["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise MemoryFileError(
            f"{path}: metadata format_version must be the number {FORMAT_VERSION}, got {version!r:.40}"
        )
    if version != FORMAT_VERSION:
        raise MemoryFileError(f"{path}: memory format {version} is not supported (this winclip reads {FORMAT_VERSION})")
    try:
        for key in ("architecture", "weights_sha256"):
            if not isinstance(metadata[key], str):
                raise TypeError(f"{key} must be text")
        for key in ("scales", "grid_size", "input_size"):
            if not isinstance(metadata[key], list) or not metadata[key] or len(metadata[key]) > 16:
                raise TypeError(f"{key} must be a short non-empty list")
            metadata[key] = [_whole(value, key) for value in metadata[key]]
        if len(metadata["grid_size"]) != 2 or len(metadata["input_size"]) != 2:
            raise TypeError("grid_size and input_size must hold two numbers")
        if max(metadata["scales"]) > min(metadata["grid_size"]):
            raise ValueError("a scale is larger than the patch grid")
        metadata["patch_dim"] = _whole(metadata["patch_dim"], "patch_dim")
        metadata["embed_dim"] = _whole(metadata["embed_dim"], "embed_dim")
        references = metadata["references"]
        if not isinstance(references, list):
            raise TypeError("references must be a list")
        if not references:
            raise ValueError("references is empty (k = 0): the memory holds no reference image")
        for number, ref in enumerate(references, start=1):
            if not isinstance(ref, dict) or not isinstance(ref.get("sha256"), str) or not ref["sha256"]:
                raise TypeError(f"reference {number} has no sha256")
            if "entries" in ref:
                _whole(ref["entries"], f"entries of reference {number}")
    except (TypeError, ValueError) as err:
        raise MemoryFileError(f"{path}: metadata has fields of the wrong type or range ({err})") from None
    stored = metadata.get("calibration")
    if stored is not None:
        if not (
            isinstance(stored, dict)
            and isinstance(stored.get("fingerprint"), dict)
            and isinstance(stored.get("calibration"), dict)
        ):
            raise MemoryFileError(f"{path}: its stored calibration is malformed; recalibrate with `winclip calibrate`")
        try:
            Calibration.from_dict(stored["calibration"])
        except SetupError as err:
            raise MemoryFileError(f"{path}: its stored calibration is invalid ({err}); recalibrate") from None
    return metadata


def _float_array(path: Path, array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.float32 or array.ndim != 3:
        raise MemoryFileError(
            f"{path}: array {name!r} must be float32 with 3 dimensions, got {array.dtype} {array.shape}"
        )
    if not np.isfinite(array).all():
        raise MemoryFileError(f"{path}: array {name!r} contains NaN or infinite values")
    return array


def _tiling_text(info: dict[str, Any]) -> str:
    tile = info.get("tile")
    if tile is None:
        return "none (whole images)"
    return f"--tile {tile} --tile-overlap {info.get('tile_overlap')}"


def update_metadata(memory: MemoryFile, **changes: Any) -> MemoryFile:
    """Rewrite the memory file with changed metadata (e.g. a calibration), atomically; returns it reloaded."""
    metadata = {**memory.metadata, **changes}
    save_memory(memory.path, metadata, memory.patches, memory.windows)
    return load_memory(memory.path)


def check_compatible(memory: MemoryFile, model: dict[str, Any]) -> list[str]:
    """Refuse a memory built with another architecture, weights, input size or scales, naming the mismatch.

    Returns warnings for differences that only shift the numbers slightly (another precision).
    """
    meta = memory.metadata
    checks = [
        ("architecture", meta["architecture"], model["architecture"]),
        ("weights", meta["weights_sha256"], model["weights_sha256"]),
        ("input size", list(meta["input_size"]), list(model["input_size"])),
        ("scales", sorted(meta["scales"]), sorted(model["scales"])),
        ("tiling", _tiling_text(meta), _tiling_text(model)),
    ]
    for what, theirs, ours in checks:
        if theirs != ours:
            if what == "weights":
                theirs = f"{meta.get('weights', '?')} (sha256 {str(theirs)[:12]})"
                ours = f"{model.get('weights', '?')} (sha256 {str(ours)[:12]})"
            raise MemoryFileError(
                f"{memory.path} was built with {what} {theirs}, but this run uses {ours}; "
                f"rebuild it with `winclip build-refs` or match the options"
            )
    warnings = []
    if meta.get("precision") and model.get("precision") and meta["precision"] != model["precision"]:
        warnings.append(
            f"{memory.path} was embedded in {meta['precision']} and this run computes in {model['precision']}: "
            "scores can differ slightly from a memory built in the same precision"
        )
    return warnings


def attach_memory(engine, memory: MemoryFile, tiling: Tiling = Tiling()) -> list[str]:
    """Turn the engine's scorer into a few-shot scorer with ``memory`` (after checking it fits); returns warnings."""
    backbone = engine.backbone
    scorer = engine.scorer
    model = describe_model(backbone.identity, backbone.image_size, scorer.scales, scorer.grid_size, tiling)
    warnings = check_compatible(memory, model)
    scorer.memory = memory.to_reference_memory(scorer.scales, backbone.device)
    return warnings
