"""How a scan shares the CPU cores between the model and the pipeline around it.

Decoding and writing threads run their torch operations (the resize, map upsampling) on one thread
each: files are already processed in parallel, and an OpenMP team per worker competes with the
model's own threads for the same cores. The model, on the thread that runs it, gets as many threads
as it needs to keep up with the pipeline, and no more:

    model threads = ceil(cores * model CPU time / (model + pipeline CPU time)), within 1..cores

On C cores the process as a whole does (model + pipeline) / C seconds of work per image at best.
The model keeps up on one thread while its own time per image stays below that, as with a small
model (then its extra threads only spin and take turns with the workers: on 2 cores, the tiny test
model on 2 threads beside busy workers cost a scan of 2 MP frames about a quarter of its rate); the
default model on the CPU, the pipeline a few percent of its cost, gets all cores. A session on a GPU
leaves the count alone (the budget is disabled): the CPU's threads there are the workers'.
The budget is measured as the scan runs (thread CPU time of each model batch, of each decoded and
written file) and followed batch by batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ThreadBudget", "model_threads", "one_torch_thread", "BUDGET"]


def model_threads(cores: int, model_seconds: float, pipeline_seconds: float) -> int:
    """Threads the model needs on ``cores`` cores, given CPU seconds spent by the model and by the
    pipeline over the same stretch of work (see the module's docstring)."""
    total = model_seconds + pipeline_seconds
    if cores <= 1 or total <= 0:
        return max(1, cores)
    return min(cores, max(1, math.ceil(cores * model_seconds / total - 1e-9)))


def one_torch_thread() -> None:
    """Initializer of decoding and writing threads: their torch operations run on the calling thread.

    With torch's OpenMP backend the thread count is per thread, but a thread sets itself up at its
    first parallel operation with the count last set anywhere in the process, which would undo this
    if the model's thread changed its count in between: the setup is done here first.
    """
    torch.get_num_threads()  # this thread's own setup, now
    torch.set_num_threads(1)


class ThreadBudget:
    """Follows what the model and the pipeline cost and sets the model thread's torch thread count.

    Workers report their CPU time with :meth:`pipeline_work`; the model's thread wraps each batch in
    :meth:`model_batch`. Disabled (the default), it measures nothing and changes nothing: a GPU runs
    the model, the CPU's threads are the workers'.
    """

    DECAY = 0.7  # weight of the past at each batch: follows a change of image sizes within a few batches
    FIRST_BATCHES = 2  # batches measured before the first decision

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.enabled = False
        self.cores: int | None = None  # the model thread's torch thread count before any change
        self.threads = 1
        self._model = 0.0
        self._pipeline = 0.0
        self._batches = 0

    def start(self, enabled: bool) -> None:
        """Called on the model's thread before its workers start, ``enabled`` where the model computes
        on the CPU. Fixes that thread's own torch thread count first (workers set theirs to one). A
        budget stays measured across the streams of a process (``watch`` starts one per burst)."""
        with self._lock:
            if self.cores is None:
                self.cores = self.threads = torch.get_num_threads()  # all cores, or what OMP_NUM_THREADS says
            if enabled and not self.enabled:
                self._model = self._pipeline = 0.0
                self._batches = 0
            self.enabled = enabled
            self.threads = self.cores  # each stream starts on every core (stop() gives them back)
        torch.set_num_threads(self.cores)

    def stop(self) -> None:
        """At the end of a stream: the model's thread gets every core back for whatever runs next
        (measurements are kept for the next stream)."""
        with self._lock:
            if self.cores is None or self.threads == self.cores:
                return
            self.threads = self.cores
        torch.set_num_threads(self.cores)

    def pipeline_work(self, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self._pipeline += seconds

    @contextmanager
    def pipeline_step(self) -> Iterator[None]:
        """Wrap one file's decoding or writing on a worker thread: its thread CPU time is counted."""
        if not self.enabled:
            yield
            return
        start = time.thread_time()
        try:
            yield
        finally:
            self.pipeline_work(time.thread_time() - start)

    @contextmanager
    def model_batch(self) -> Iterator[None]:
        """Wrap one model batch on the model's thread; the thread count is revised after it."""
        if not self.enabled:
            yield
            return
        start = time.thread_time()
        yield
        # the model's thread does about 1/threads of the parallel work: the model's CPU time is
        # estimated as its thread's time times the threads it ran on
        spent = (time.thread_time() - start) * self.threads
        with self._lock:
            self._model += spent
            self._batches += 1
            if self._batches < self.FIRST_BATCHES:
                return
            wanted = model_threads(self.cores or 1, self._model, self._pipeline)
            self._model *= self.DECAY
            self._pipeline *= self.DECAY
        if wanted != self.threads:
            self.threads = wanted
            torch.set_num_threads(wanted)


BUDGET = ThreadBudget()  # torch's thread count is the process's: so is its budget
