"""How counts are said in messages, the same in every command: '1 image', '3 images'."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '3 images' (``nouns`` for irregular plurals)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def files_gone(count: int) -> str:
    """What an incremental scan says about files of earlier results that are no longer in the folder."""
    if count == 1:
        return "1 file scanned earlier is gone: its row and heatmap are removed"
    return f"{count} files scanned earlier are gone: their rows and heatmaps are removed"


def results_kept_unseen(count: int) -> str:
    """...and when a folder could not be listed, so that they may still be there."""
    if count == 1:
        return "1 earlier result is kept although its file was not seen: a folder could not be listed"
    return f"{count} earlier results are kept although their files were not seen: a folder could not be listed"
