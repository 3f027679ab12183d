"""Checks of paths that need no model: inputs exist, outputs can be written, the output folder is free.

The CLI runs them before torch is imported, so a mistyped folder or an unwritable ``--out`` fails in a
fraction of a second instead of after the model has loaded and the images were scored. Like
``options``, this module must not import torch. The jobs keep their own checks (they run without the
CLI too); these only make the common mistakes fail first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from winclip_cli.errors import SetupError
from winclip_cli.io.checks import check_memory_file  # noqa: F401  (re-exported for the commands)

if TYPE_CHECKING:
    from winclip_cli.io.state import OutputLock

# ``state`` (and with it numpy, PIL) is imported only where an output folder already exists: the
# checks that fail most often stay as light as Python's own start-up.


def check_input(path: Path, what: str = "input") -> None:
    if not path.exists():
        raise SetupError(f"{what} not found: {path}")


def check_input_file(option: str, path: Path | None) -> None:
    if path is None:
        return
    if not path.exists():
        raise SetupError(f"{option} file not found: {path}")
    if not path.is_file():
        raise SetupError(f"{option} {path} is not a file")


def check_model_files(model: str, weights: str | None) -> None:
    """``--model`` (an open_clip architecture or a config JSON) and ``--weights`` (or ``$WINCLIP_WEIGHTS``: a
    checkpoint file that is one), read without torch or open_clip; after the cheaper checks of option text."""
    from winclip_cli.io.model_files import check_model_option, check_weights_option

    check_model_option(model)
    check_weights_option(weights)


def check_evaluation_data(root: Path, k_shot: int) -> None:
    """``eval``'s folder holds a recognised layout with test images, and enough normal training images for
    ``--k-shot``: the listing needs no model (numpy and Pillow, no torch)."""
    from winclip_cli.io.datasets import discover_categories, draw_references

    for category in discover_categories(root):
        draw_references(category, k_shot, None)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(option: str, path: Path) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a writable folder."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise SetupError(f"{option} {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SetupError(f"{option} {path}: cannot write in {ancestor} (permission denied)")


def check_output_file(option: str, path: Path) -> None:
    """A file that will be written (atomically, next to itself): its folder must be writable."""
    if path.is_dir():
        raise SetupError(f"{option} {path} is a folder; give a file name")
    if path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise SetupError(f"{option} {path}: cannot write in {path.parent} (permission denied)")
        return
    _check_can_create_in(option, path)


def check_output_folder(option: str, path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise SetupError(f"{option} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SetupError(f"{option} {path}: cannot write in it (permission denied)")
        return
    _check_can_create_in(option, path)


class OutputClaim:
    """OUT's lock, taken by the command line once every argument is checked and before torch is imported,
    so a second run on the same folder fails at once (exit 4) instead of after loading the model.

    ``take()`` creates OUT (an ``--out`` that cannot be created fails here, naming the option) and locks
    it; the job takes the same lock again, which in this thread is the same hold. Leaving the ``with``
    block releases it.
    """

    def __init__(self, out: Path, command: str = "scan") -> None:
        self.out = out
        self.command = command
        self._lock: OutputLock | None = None

    def take(self) -> None:
        from winclip_cli.io.state import OutputLock, refuse_links

        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SetupError(f"--out {self.out}: cannot create it ({err.strerror or err})") from None
        refuse_links(self.out)
        lock = OutputLock(self.out, self.command)
        try:
            lock.acquire()
        except SetupError as err:
            if type(err) is SetupError:  # cannot open or lock the lock file: say which option it is
                raise SetupError(f"--out {self.out}: {err}") from None
            raise
        self._lock = lock

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextmanager
def removed_if_unused(out: Path) -> Iterator[None]:
    """A run that fails before writing any result leaves no output folder behind that it created itself
    (a folder holding only the lock and the run state would look like an empty result)."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and _only_run_state(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _only_run_state(out: Path) -> bool:
    from winclip_cli.io.layout import STATE_DIR

    try:
        names = [entry.name for entry in out.iterdir()]
        if not names:
            return True
        if names != [STATE_DIR]:
            return False
        state = out / STATE_DIR
        return not state.is_symlink() and all(item.is_file() and not item.is_symlink() for item in state.iterdir())
    except OSError:
        return False
