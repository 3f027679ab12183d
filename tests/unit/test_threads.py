"""The thread budget: workers on one torch thread, the model on as many as it needs to keep up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from winclip_cli.jobs import threads
from winclip_cli.jobs.threads import ThreadBudget, model_threads, one_torch_thread


@pytest.mark.parametrize(
    "cores,model,pipeline,expected",
    [
        (2, 24.0, 100.0, 1),  # a tiny model beside 2 MP outputs: 2 * 24 / 124 = 0.39 -> 1
        (2, 2700.0, 100.0, 2),  # the default model on the CPU: 2 * 0.96 -> 2
        (2, 50.0, 50.0, 1),  # exactly half on 2 cores: one thread keeps up
        (2, 51.0, 49.0, 2),
        (16, 10.0, 150.0, 1),  # a GPU host: the CPU's work is the pipeline's
        (16, 300.0, 100.0, 12),  # 16 * 0.75
        (8, 1.0, 0.0, 8),  # nothing measured in the pipeline: all cores
        (8, 0.0, 0.0, 8),  # nothing measured at all
        (1, 5.0, 5.0, 1),
    ],
)
def test_model_threads_rule(cores, model, pipeline, expected):
    assert model_threads(cores, model, pipeline) == expected


def test_workers_run_torch_on_one_thread_and_the_model_thread_keeps_its_count():
    before = torch.get_num_threads()
    with ThreadPoolExecutor(2, initializer=one_torch_thread) as pool:
        assert list(pool.map(lambda _: torch.get_num_threads(), range(4))) == [1, 1, 1, 1]
    assert torch.get_num_threads() == before


def test_budget_follows_the_measured_costs(monkeypatch):
    """Fake clocks: the model's thread spends 10 ms per batch on 4 threads (40 ms of model CPU), the
    workers 300 ms: one thread keeps up (4 * 40 / 340 = 0.47). When the pipeline's share drops, the
    count climbs back (decayed sums follow within a few batches)."""
    clock = iter(x * 0.010 for x in range(1000))  # each thread_time() call advances 10 ms
    monkeypatch.setattr(threads.time, "thread_time", lambda: next(clock))
    counts: list[int] = []
    monkeypatch.setattr(threads.torch, "set_num_threads", counts.append)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 4)
    budget = ThreadBudget()
    budget.start(enabled=True)
    assert (budget.cores, budget.threads, counts) == (4, 4, [4])
    for _ in range(2):
        budget.pipeline_work(0.150)
        with budget.model_batch():
            pass
    assert budget.threads == 1 and counts[-1] == 1
    for _ in range(12):  # the pipeline now costs nothing: the model needs every core again
        with budget.model_batch():
            pass
    assert budget.threads == 4 and counts[-1] == 4


def test_a_disabled_budget_measures_and_changes_nothing(monkeypatch):
    counts: list[int] = []
    monkeypatch.setattr(threads.torch, "set_num_threads", counts.append)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 8)
    budget = ThreadBudget()
    budget.start(enabled=False)  # a GPU session: the model thread's count is only pinned
    for _ in range(5):
        budget.pipeline_work(1.0)
        with budget.model_batch():
            pass
    assert counts == [8] and budget.threads == 8


def test_a_worker_stays_on_one_thread_when_the_model_thread_changes_its_count_meanwhile():
    """A worker sets itself up before the model's thread moves the process-wide default: its first
    torch operation after that still runs on one thread."""
    import threading

    before = torch.get_num_threads()
    started, moved = threading.Event(), threading.Event()

    def first_operation_later() -> int:
        started.set()
        moved.wait(10)
        return torch.get_num_threads()

    try:
        with ThreadPoolExecutor(1, initializer=one_torch_thread) as pool:
            future = pool.submit(first_operation_later)
            started.wait(10)
            torch.set_num_threads(before + 2)  # what the budget does on the model's thread
            moved.set()
            assert future.result() == 1
    finally:
        torch.set_num_threads(before)


def test_the_model_thread_gets_every_core_back_when_a_stream_ends(monkeypatch):
    counts: list[int] = []
    monkeypatch.setattr(threads.torch, "set_num_threads", counts.append)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 4)
    budget = ThreadBudget()
    budget.start(enabled=True)
    budget.threads = 1  # as after a decision for a small model
    budget.stop()
    assert budget.threads == 4 and counts == [4, 4]
    budget.start(enabled=False)  # a GPU stream next: left at every core
    assert counts[-1] == 4
