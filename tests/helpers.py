"""Ways to run the CLI from a test, shared by tests/unit, tests/cli and tests/system.

``invoke`` runs a command in this process through Typer's CliRunner: fast, and a crash raises with
its traceback. ``run_cli`` starts the real ``python -m winclip_cli`` in a new process, for what only
a process shows: exit codes set by the interpreter, imports, signals, stdout as a pipe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

from click.testing import Result
from typer.testing import CliRunner

SUBPROCESS_TIMEOUT = 300  # seconds; a scan of a few tiny images takes ~10 s, mostly importing torch


def invoke(args: Iterable[object], **kwargs) -> Result:
    """``winclip ARGS`` in this process; each argument goes through ``str`` (so Paths and numbers work).

    A crash raises with its traceback instead of becoming an exit code; other keyword arguments
    (``env``, ``input``) go to CliRunner.invoke.
    """
    from winclip_cli.cli.app import app  # imported here so that collecting the tests imports no CLI

    return CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False, **kwargs)


def run_cli(
    args: Iterable[object],
    *,
    python_flags: Sequence[str] = (),
    env_extra: Mapping[str, str] | None = None,
    timeout: float = SUBPROCESS_TIMEOUT,
    **kwargs,
) -> subprocess.CompletedProcess[str]:
    """``python [PYTHON_FLAGS] -m winclip_cli ARGS`` in a new process, output captured as text.

    ``env_extra`` is added to this process's environment; other keyword arguments go to subprocess.run.
    """
    env = {**os.environ, **(env_extra or {})} if env_extra is not None else kwargs.pop("env", None)
    command = [sys.executable, *python_flags, "-m", "winclip_cli", *(str(arg) for arg in args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def run_cli_importtime(args: Iterable[object], **kwargs) -> subprocess.CompletedProcess[str]:
    """The real CLI in a new process (:func:`run_cli`), with ``-X importtime`` so that the test sees every
    module it imported (:func:`imported`) and what it printed besides (:func:`messages`)."""
    return run_cli(args, python_flags=("-X", "importtime"), **kwargs)


def imported(stderr: str, module: str) -> bool:
    """Whether a process run with ``-X importtime`` imported ``module`` (or a submodule of it): its
    lines end with the module name, e.g. "import time:   123 |   456 |   torch.nn"."""
    pattern = re.compile(rf"\|\s*{re.escape(module)}(\.|$)")
    return any(pattern.search(line) for line in stderr.splitlines() if line.startswith("import time"))


def messages(stderr: str) -> str:
    """What a process run with ``-X importtime`` printed, without the import-time lines."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time"))
