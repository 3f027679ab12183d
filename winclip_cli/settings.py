"""Where winclip keeps its cache; environment variables that change defaults or fill in options."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from winclip_cli.errors import SetupError

CACHE_ENV = "WINCLIP_CACHE_DIR"


def cache_dir() -> Path:
    """``$WINCLIP_CACHE_DIR``, else the platform's user cache directory (e.g. ``~/.cache/winclip``)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("winclip", appauthor=False))


SHARD_COUNT_ENV = "WINCLIP_SHARD_COUNT"
_NO_SHARD_INDEX = (
    "--shard auto found no shard index in the environment: it reads SLURM_ARRAY_TASK_ID and "
    "SLURM_ARRAY_TASK_COUNT (a Slurm job array), or JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) with the "
    f"count as --shard auto/N or in {SHARD_COUNT_ENV}; or give --shard K/N"
)


def _whole(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SetupError(f"--shard auto: {name}={text!r} is not a whole number") from None


def shard_from_environment(count_text: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``--shard auto`` (or ``auto/N``): this task's shard (K, N), 1-based, from the index variables of the
    engines shards run on. A Slurm job array gives its task id, first id, step and task count
    (``--array=0-15`` or ``1-16`` or ``0-30:2``: 16 shards); a Kubernetes Indexed Job gives a 0-based
    ``JOB_COMPLETION_INDEX``, and the count comes from ``auto/N`` or ``$WINCLIP_SHARD_COUNT``."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_TASK_ID"):
        task = _whole("SLURM_ARRAY_TASK_ID", env["SLURM_ARRAY_TASK_ID"])
        first = _whole("SLURM_ARRAY_TASK_MIN", env.get("SLURM_ARRAY_TASK_MIN", "0") or "0")
        step = _whole("SLURM_ARRAY_TASK_STEP", env.get("SLURM_ARRAY_TASK_STEP", "1") or "1")
        count_source = "SLURM_ARRAY_TASK_COUNT"
        count = _whole(count_source, env["SLURM_ARRAY_TASK_COUNT"]) if env.get(count_source) else None
        if count is None and count_text is not None:
            count, count_source = _whole("--shard auto/N", count_text), "--shard auto/N"
        if count is None:
            raise SetupError(_NO_SHARD_INDEX)
        if step < 1 or (task - first) % step:
            raise SetupError(
                f"--shard auto: Slurm task {task} is not on the array's grid (first {first}, step {step}); "
                "give --shard K/N"
            )
        index = (task - first) // step
    elif env.get("JOB_COMPLETION_INDEX"):
        index = _whole("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"])
        if count_text is not None:
            count, count_source = _whole("--shard auto/N", count_text), "--shard auto/N"
        elif env.get(SHARD_COUNT_ENV):
            count, count_source = _whole(SHARD_COUNT_ENV, env[SHARD_COUNT_ENV]), SHARD_COUNT_ENV
        else:
            raise SetupError(
                "--shard auto: JOB_COMPLETION_INDEX gives this task's index but not the number of shards: "
                f"give it as --shard auto/N or in {SHARD_COUNT_ENV} (the Job's completions)"
            )
    else:
        raise SetupError(_NO_SHARD_INDEX)
    if not 0 <= index < count:
        raise SetupError(
            f"--shard auto: task index {index} (0-based) is not below the shard count {count} ({count_source})"
        )
    return index + 1, count
