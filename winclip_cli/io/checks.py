"""Cheap checks of input files that import nothing heavy (no torch, no numpy).

The command line runs them before the model is loaded, so a wrong file fails in a fraction of a
second, and the loaders run the same checks, so a library caller gets the same message.
"""

from __future__ import annotations

from pathlib import Path

from winclip_cli.errors import MemoryFileError
from winclip_cli.io.safe_fs import NotRegularFileError, open_regular


def check_memory_file(path: Path | None) -> None:
    """Exists and is an .npz (a zip archive: anything else np.load would try as a pickle, and refuse
    with a misleading message); its contents are validated when the memory is loaded."""
    if path is None:
        return
    try:
        # opened once, never blocking: a FIFO swapped in is refused at once (and said as a FIFO)
        with open_regular(path) as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise MemoryFileError(f"reference memory not found: {path} (create one with `winclip build-refs`)") from None
    except NotRegularFileError as err:
        raise MemoryFileError(f"{err.strerror} (a memory is an .npz file from `winclip build-refs`)") from None
    except OSError as err:
        raise MemoryFileError(f"cannot read {path}: {err.strerror or err}") from None
    if magic != b"PK\x03\x04":
        raise MemoryFileError(f"{path} is not a winclip memory (not an .npz file from `winclip build-refs`)")
