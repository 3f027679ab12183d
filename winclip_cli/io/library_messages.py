"""Warnings and log lines that image libraries emit while one file is decoded, kept for that file.

Pillow reports a damaged EXIF block with ``warnings.warn`` and tifffile logs odd tags at WARNING
level; left alone both reach stderr (cron mail) with library paths and line numbers. While a thread
decodes a file, what it emits is collected for that file's ``note`` instead. Both mechanisms are
process-wide and files are decoded by several threads at once, so collection is keyed by thread:
``warnings.catch_warnings`` would swap global state under the other decoding threads.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

_local = threading.local()
_install_lock = threading.Lock()
_previous_showwarning = None  # what handled warnings before ours (restored handlers are re-wrapped)

# Library warnings are shown on every occurrence, not once per code location: a second file with the
# same damaged EXIF block must get the same note as the first.
_ALWAYS_FROM_LIBRARIES: tuple[Literal["always"], None, type[Warning], str, int] = (
    "always",
    None,
    Warning,
    r"(PIL|tifffile)(\.|$)",
    0,
)


class _CaptureFilter(logging.Filter):
    """Diverts the records of a capturing thread into its list; other threads' records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_local, "sink", None)
        if sink is None:
            return True
        sink.append(f"{record.name}: {record.getMessage()}")
        return False


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    sink = getattr(_local, "sink", None)
    if sink is not None:
        sink.append(f"{_origin(filename)}: {message}")
        return
    previous = _previous_showwarning
    if previous is None or previous is warnings._showwarning_orig:  # type: ignore[attr-defined]
        # the default path (also what a test runner's recording context installs)
        warnings._showwarnmsg_impl(  # type: ignore[attr-defined]
            warnings.WarningMessage(message, category, filename, lineno, file, line)
        )
    else:
        previous(message, category, filename, lineno, file, line)


def _origin(filename: str) -> str:
    """'Pillow' or 'tifffile' rather than a path inside site-packages."""
    parts = Path(filename).parts
    if "PIL" in parts:
        return "Pillow"
    if "tifffile" in parts:
        return "tifffile"
    return Path(filename).stem


logging.getLogger("tifffile").addFilter(_CaptureFilter())


def _install() -> None:
    """(Re)install the warnings hook: a test runner or another library may have put its own back."""
    global _previous_showwarning
    if warnings.showwarning is _showwarning and _always_filter_present():
        return
    with _install_lock:
        if warnings.showwarning is not _showwarning:
            _previous_showwarning = warnings.showwarning
            warnings.showwarning = _showwarning
        if not _always_filter_present():
            action, message, category, module, lineno = _ALWAYS_FROM_LIBRARIES
            warnings.filterwarnings(action, category=category, module=module, lineno=lineno)


def _always_filter_present() -> bool:
    action, _, category, module, lineno = _ALWAYS_FROM_LIBRARIES
    for entry in list(warnings.filters):
        if entry[0] == action and entry[2] is category and entry[4] == lineno:
            pattern = entry[3]
            if pattern is not None and getattr(pattern, "pattern", pattern) == module:
                return True
    return False


@contextmanager
def captured_library_messages() -> Iterator[list[str]]:
    """Collect the warnings and tifffile log records this thread emits inside the block (in order,
    one line each, duplicates dropped when the block ends)."""
    _install()
    outer = getattr(_local, "sink", None)
    sink: list[str] = []
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer
        unique = list(dict.fromkeys(" ".join(text.split()) for text in sink))
        sink[:] = unique
