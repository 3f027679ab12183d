"""File hashes: the identity of weights, references and memories in every output."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from winclip_cli.io.safe_fs import open_regular
from winclip_cli.settings import cache_dir


def sha256_file(path: Path) -> str:
    """sha256 of a regular file (a FIFO or device is refused without blocking: io/safe_fs.py)."""
    with open_regular(path) as handle:
        return sha256_handle(handle)


def sha256_handle(handle: BinaryIO) -> str:
    """sha256 of an open file's whole content, read from its start."""
    handle.seek(0)
    return hashlib.file_digest(handle, "sha256").hexdigest()


def cached_sha256_file(path: Path) -> str:
    """sha256 of a large file, remembered in the cache by (path, size, mtime): checkpoints are hundreds of MB."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "sha256" / key
    try:
        cached = memo.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass
    value = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:
        pass  # a read-only cache only costs the hash again next time
    return value
