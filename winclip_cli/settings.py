"""Where winclip keeps its cache; environment variables that change defaults."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "WINCLIP_CACHE_DIR"


def cache_dir() -> Path:
    """``$WINCLIP_CACHE_DIR``, else the platform's user cache directory (e.g. ``~/.cache/winclip``)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("winclip", appauthor=False))
