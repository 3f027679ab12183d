"""Reference embeddings gathered from ``Session.embedded``: what ``build-refs`` stores and ``eval`` compares with."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from winclip_cli.core.winclip import ReferenceMemory
from winclip_cli.jobs.decode import Decoded


@dataclass
class EmbeddedReferences:
    """Embeddings of the reference images that decoded, in input order, and the ones that did not.

    In tiled mode one image contributes one entry per tile; ``entries_per_image`` says how many.
    """

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    entries_per_image: list[int] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)  # each (G, C), one per entry
    windows: list[list[np.ndarray]] = field(default_factory=list)  # per entry, per scale (W_s, D)
    failures: list[Decoded] = field(default_factory=list)

    def to_reference_memory(self, scales: Sequence[int], device: torch.device) -> ReferenceMemory:
        """The memory a scorer compares with, built as from a memory file (``MemoryFile.to_reference_memory``)."""
        if not self.patches:
            raise ValueError("no reference was embedded")
        return ReferenceMemory.from_arrays(
            np.stack(self.patches),
            [np.stack([w[i] for w in self.windows]) for i in range(len(scales))],
            self.entries_per_image,
            device,
        )


def collect_references(
    items: Generator[Decoded, None, None], on_item: Callable[[Decoded], None] = lambda item: None
) -> EmbeddedReferences:
    """Gather embedded references (``Session.embedded``) in input order; unreadable ones are kept apart."""
    result = EmbeddedReferences()
    with closing(items):
        for item in items:
            if item.error:
                result.failures.append(item)
            else:
                result.names.append(item.relpath)
                result.paths.append(item.path)
                result.entries_per_image.append(len(item.outputs))
                for patches, windows in item.outputs:
                    result.patches.append(patches)
                    result.windows.append(windows)
            item.image = None
            item.outputs = []
            on_item(item)
    return result
