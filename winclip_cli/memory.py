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
import zipfile
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import MemoryFileError
from .hashing import sha256_file
from .outputs import atomic_path
from .preflight import check_memory_file
from .winclip import ReferenceMemory

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
        patches = torch.from_numpy(self.patches).to(device)
        # entry e belongs to reference owner[e]; each entry holds G patches and W_s windows per scale
        counts = [int(ref.get("entries", 1)) for ref in self.metadata["references"]]
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        return ReferenceMemory(
            patch_owner=owner.repeat_interleave(self.patches.shape[1]),
            window_owner=[owner.repeat_interleave(self.windows[s].shape[1]) for s in scales],
            patches=patches.reshape(-1, patches.shape[-1]),
            windows=[
                torch.from_numpy(self.windows[s]).to(device).reshape(-1, self.windows[s].shape[-1]) for s in scales
            ],
        )


def describe_model(
    identity: dict[str, str],
    input_size: tuple[int, int],
    scales: tuple[int, ...],
    grid_size: tuple[int, int],
    tile: int | str | None = None,
    tile_overlap: float = 0.25,
) -> dict[str, Any]:
    """How images are embedded: what a memory and the scan that uses it must agree on."""
    return {
        "tile": tile,
        "tile_overlap": tile_overlap if tile is not None else None,
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
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def load_memory(path: Path) -> MemoryFile:
    """Read and validate a memory file; every problem is a MemoryFileError with one line."""
    path = Path(path)
    check_memory_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if "metadata" not in names or "patches" not in names:
                raise MemoryFileError(f"{path} is not a winclip reference memory (no metadata/patches arrays)")
            arrays = {name: data[name] for name in names}
    except MemoryFileError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err) or "pickle" in str(err).lower():
            raise MemoryFileError(f"{path} contains pickled objects; refusing to load it") from None
        raise MemoryFileError(f"{path} is corrupt or not a reference memory: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise MemoryFileError(f"{path} is corrupt or truncated ({type(err).__name__}: {err})") from None

    try:
        metadata = _parse_metadata(path, arrays.pop("metadata"))
        patches = _float_array(path, arrays.pop("patches"), "patches")
        scales = tuple(int(s) for s in metadata["scales"])
        windows = {}
        for scale in scales:
            name = f"windows_{scale}"
            if name not in arrays:
                raise MemoryFileError(f"{path} lacks the window embeddings of scale {scale}")
            windows[scale] = _float_array(path, arrays[name], name)
        k = patches.shape[0]
        grid = metadata["grid_size"]
        if patches.shape[1] != grid[0] * grid[1] or patches.shape[2] != metadata["patch_dim"]:
            raise MemoryFileError(f"{path}: patches array has shape {patches.shape}, inconsistent with its metadata")
        for scale, array in windows.items():
            expected_windows = (grid[0] - scale + 1) * (grid[1] - scale + 1)
            if array.shape != (k, expected_windows, metadata["embed_dim"]):
                raise MemoryFileError(
                    f"{path}: windows_{scale} has shape {array.shape}, inconsistent with its metadata"
                )
        entries = sum(int(ref.get("entries", 1)) for ref in metadata["references"])
        if entries != k:
            raise MemoryFileError(f"{path}: metadata lists {entries} embedded images or tiles but holds {k}")
    except MemoryFileError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
        # a crafted or foreign metadata document: refuse it in one line, whatever shape it has
        raise MemoryFileError(f"{path}: metadata is malformed ({type(err).__name__}: {err})") from None
    return MemoryFile(path=path, sha256=sha256_file(path), metadata=metadata, patches=patches, windows=windows)


def _parse_metadata(path: Path, raw: np.ndarray) -> dict[str, Any]:
    if raw.dtype.kind != "U" or raw.shape != ():
        raise MemoryFileError(f"{path}: metadata is not a JSON string")
    try:
        metadata = json.loads(str(raw))
    except json.JSONDecodeError:
        raise MemoryFileError(f"{path}: metadata is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise MemoryFileError(f"{path}: metadata is not a JSON object")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise MemoryFileError(f"{path}: metadata lacks {', '.join(missing)}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise MemoryFileError(
            f"{path}: memory format {metadata['format_version']} is not supported (this winclip reads {FORMAT_VERSION})"
        )
    try:
        metadata["scales"] = [int(s) for s in metadata["scales"]]
        metadata["grid_size"] = [int(s) for s in metadata["grid_size"]]
        metadata["input_size"] = [int(s) for s in metadata["input_size"]]
        metadata["patch_dim"] = int(metadata["patch_dim"])
        metadata["embed_dim"] = int(metadata["embed_dim"])
        if not isinstance(metadata["references"], list):
            raise TypeError("references")
    except (TypeError, ValueError):
        raise MemoryFileError(f"{path}: metadata has fields of the wrong type") from None
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


def attach_memory(engine, memory: MemoryFile, tile: int | str | None = None, tile_overlap: float = 0.25) -> list[str]:
    """Turn the engine's scorer into a few-shot scorer with ``memory`` (after checking it fits); returns warnings."""
    backbone = engine.backbone
    scorer = engine.scorer
    model = describe_model(backbone.identity, backbone.image_size, scorer.scales, scorer.grid_size, tile, tile_overlap)
    warnings = check_compatible(memory, model)
    scorer.memory = memory.to_reference_memory(scorer.scales, backbone.device)
    return warnings
