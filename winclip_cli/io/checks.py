"""Cheap checks of input files that import nothing heavy (no torch, no numpy).

The command line runs them before the model is loaded, so a wrong file fails in a fraction of a
second, and the loaders run the same checks, so a library caller gets the same message.
"""

from __future__ import annotations

from pathlib import Path

from winclip_cli.errors import MemoryFileError


def check_memory_file(path: Path | None) -> None:
    """Exists and is an .npz (a zip archive: anything else np.load would try as a pickle, and refuse
    with a misleading message); its contents are validated when the memory is loaded."""
    if path is None:
        return
    if not path.is_file():
        raise MemoryFileError(f"reference memory not found: {path} (create one with `winclip build-refs`)")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise MemoryFileError(f"cannot read {path}: {err.strerror or err}") from None
    if magic != b"PK\x03\x04":
        raise MemoryFileError(f"{path} is not a winclip memory (not an .npz file from `winclip build-refs`)")
