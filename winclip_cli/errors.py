"""Domain errors: each carries one line a user can act on, and the exit code the CLI returns."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ANOMALY = 1
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_INTERRUPTED = 130


class WinclipError(Exception):
    """An error the CLI shows as one line (no traceback) and turns into ``exit_code``."""

    exit_code = EXIT_USAGE


class SetupError(WinclipError):
    """Bad options, missing inputs, weights or memories that cannot be used."""


class WeightsUnavailableError(SetupError):
    """Model weights could not be found, downloaded or loaded."""


class MemoryFileError(SetupError):
    """A few-shot reference memory is corrupt, foreign, or built for another model."""


class PromptFileError(SetupError):
    """A custom vocabulary file is invalid."""


class MetricError(WinclipError, ValueError):
    """The data cannot be scored by this metric (one class only, NaN scores, shape mismatch);
    `eval` reports the metric as n/a with this reason."""


class ImageDecodeError(WinclipError):
    """One input file could not be turned into an image; the scan records it and goes on."""

    exit_code = EXIT_UNREADABLE
