"""File hashes: the identity of weights, references and memories in every output."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from winclip_cli.io.safe_fs import open_regular


def sha256_file(path: Path) -> str:
    """sha256 of a regular file (a FIFO or device is refused without blocking: io/safe_fs.py)."""
    with open_regular(path) as handle:
        return sha256_handle(handle)


def sha256_handle(handle: BinaryIO) -> str:
    """sha256 of an open file's whole content, read from its start."""
    handle.seek(0)
    # a file opened for reading in binary mode has readinto, which typeshed's BinaryIO does not promise
    return hashlib.file_digest(handle, "sha256").hexdigest()  # type: ignore[arg-type]
