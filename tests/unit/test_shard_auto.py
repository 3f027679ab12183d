"""--shard auto: K/N from the index variables of a Slurm job array or a Kubernetes Indexed Job (issue 22)."""

from __future__ import annotations

import pytest

from winclip_cli.errors import SetupError
from winclip_cli.settings import shard_from_environment


@pytest.mark.parametrize(
    "env, count, shard",
    [
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, None, (1, 4)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, None, (4, 4)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "16"}, None, (1, 16)),
        ({"SLURM_ARRAY_TASK_ID": "16", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "16"}, None, (16, 16)),
        # --array=0-30:2: ids 0, 2, ..., 30, sixteen tasks
        (
            {
                "SLURM_ARRAY_TASK_ID": "30",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "16",
            },
            None,
            (16, 16),
        ),
        ({"JOB_COMPLETION_INDEX": "0"}, "3", (1, 3)),
        ({"JOB_COMPLETION_INDEX": "2", "WINCLIP_SHARD_COUNT": "3"}, None, (3, 3)),
        ({"JOB_COMPLETION_INDEX": "2", "WINCLIP_SHARD_COUNT": "9"}, "3", (3, 3)),  # the command line wins
    ],
)
def test_the_shard_comes_from_the_job_arrays_index(env, count, shard):
    assert shard_from_environment(count, env) == shard


@pytest.mark.parametrize(
    "env, count, words",
    [
        ({}, None, "found no shard index in the environment"),
        ({}, "4", "found no shard index in the environment"),
        ({"JOB_COMPLETION_INDEX": "1"}, None, "give it as --shard auto/N or in WINCLIP_SHARD_COUNT"),
        ({"JOB_COMPLETION_INDEX": "3"}, "3", "task index 3 (0-based) is not below the shard count 3"),
        ({"JOB_COMPLETION_INDEX": "x"}, "3", "JOB_COMPLETION_INDEX='x' is not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, None, "index 4"),
        (
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"},
            None,
            "is not on the array's grid",
        ),
    ],
)
def test_no_usable_index_is_one_clear_error(env, count, words):
    with pytest.raises(SetupError, match=None) as error:
        shard_from_environment(count, env)
    assert words in str(error.value)


def test_parse_shard_reads_auto_from_the_environment(monkeypatch):
    from winclip_cli.options import parse_shard

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert parse_shard("auto/2") == (2, 2)
    assert parse_shard("1/2") == (1, 2)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(SetupError, match="found no shard index"):
        parse_shard("auto")
