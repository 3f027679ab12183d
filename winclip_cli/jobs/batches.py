"""Batching and the model: decoded files' inputs packed into full batches, each batch through a model step.

    Decoded items --> batches of ``batch_size`` model inputs (tiles fill batches like images do)
                  --> ``process`` (the scorer or the embedder) --> items with ``outputs``, in input order

The model steps (:func:`scoring_fn`, :func:`embedding_fn`) are chosen by the session; this stage
knows nothing of files or outputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator

import numpy as np
import torch

from winclip_cli.core.winclip import WinClipScorer, WindowEncoder
from winclip_cli.jobs.decode import Decoded
from winclip_cli.jobs.threads import BUDGET, ThreadBudget


def processed_stream(
    stream: Iterable[Decoded],
    process: Callable[[torch.Tensor, list[Decoded]], list],
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    threads: ThreadBudget = BUDGET,
) -> Generator[Decoded, None, None]:
    """Decoded files with ``outputs`` filled (one entry per model input), in input order.

    Model inputs of consecutive files (whole images or tiles) are packed into batches of
    ``batch_size``; ``process`` maps a (B, 3, h, w) batch (and the file of each input) to B
    outputs. A file is yielded once all its inputs are processed; failures pass straight
    through, in order. After ``should_stop`` turns true no new batch is started and only
    complete files are yielded. Each batch's cost is reported to ``threads``.
    """
    waiting: deque[Decoded] = deque()  # files in input order, not yet yielded
    queued: list[tuple[Decoded, int]] = []  # (file, input index) not yet processed

    def run_batch(entries: list[tuple[Decoded, int]]) -> None:
        batch = torch.stack([item.inputs[i] for item, i in entries])  # type: ignore[index,misc]
        for item, i in entries:
            item.inputs[i] = None  # type: ignore[index]  # a tile's input is freed as soon as it is batched
        with threads.model_batch():
            outputs = process(batch, [item for item, _ in entries])
        for (item, _), output in zip(entries, outputs, strict=True):
            item.outputs.append(output)

    def ready() -> Iterator[Decoded]:
        while waiting and (waiting[0].error or len(waiting[0].outputs) == waiting[0].num_inputs):
            item = waiting.popleft()
            item.inputs = None  # downstream needs the display image, not the model inputs
            yield item

    try:
        for item in stream:
            waiting.append(item)
            if not item.error:
                queued.extend((item, i) for i in range(item.num_inputs))
            while len(queued) >= batch_size:
                run_batch(queued[:batch_size])
                del queued[:batch_size]
                yield from ready()
                if should_stop():
                    return
            yield from ready()
        if queued and not should_stop():
            run_batch(queued)
        yield from ready()
    finally:  # stopped early or failed: cancel the decoding still queued instead of waiting for it
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def scoring_fn(
    scorer: WinClipScorer,
    device: torch.device,
    dtype: torch.dtype,
    exclude_for: Callable[[Decoded], int] | None = None,
) -> Callable[[torch.Tensor, list[Decoded]], list]:
    """Batch -> [(image score, grid map (gh, gw)), ...] on the CPU.

    ``exclude_for`` gives, per file, the memory reference it must not be compared with (-1: none).
    """

    def process(batch: torch.Tensor, items: list[Decoded]) -> list[tuple[float, torch.Tensor]]:
        exclude = torch.tensor([exclude_for(item) for item in items]) if exclude_for else None
        scores = scorer.score_embeddings(scorer.embed(batch.to(device=device, dtype=dtype)), exclude)
        image, maps = scores.image.float().cpu(), scores.grid_maps.float().cpu()
        return [(float(image[i]), maps[i]) for i in range(image.shape[0])]

    return process


def embedding_fn(
    encoder: WindowEncoder, device: torch.device, dtype: torch.dtype
) -> Callable[[torch.Tensor, list[Decoded]], list]:
    """Batch -> [(patch tokens (G, C), [window embeddings (W_s, D) per scale]), ...] as float32 numpy."""

    def process(batch: torch.Tensor, items: list[Decoded]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        with torch.inference_mode():
            emb = encoder.encode(batch.to(device=device, dtype=dtype))
        patches = emb.patches.float().cpu().numpy()
        windows = [w.float().cpu().numpy() for w in emb.windows]
        return [(patches[i], [w[i] for w in windows]) for i in range(patches.shape[0])]

    return process
