"""The kept pool of ``--mode mutual``: the features of the images an output folder scored last.

A cron run (``scan --incremental``) that finds five new images scores them against a pool that also
holds up to ``--pool-size`` images already scored in the same OUT, so that five new images get the
scores of a full pool. This module stores those features in ``OUT/.winclip/mutual-pool.npz``
(numpy only, read with ``allow_pickle=False``): per image its patch tokens (layers x G x C float32),
its class embedding, its raw score, its relative path and the SHA-256 of its file. An entry counts
only while scores.csv holds an ``ok`` row of the same path and hash: a file gone, changed or rescored
(its row removed or replaced) drops out of the kept pool with its row.

Size: 3.2 MB per image for ViT-B-16-plus-240 (four layers), 640 MB at the default pool size of 200.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from winclip_cli.io.safe_fs import Confined, atomic_write, open_confined, remove_regular


@dataclass
class KeptPool:
    """Features of images scored earlier, oldest first."""

    tokens: np.ndarray  # (K, L, G, C) float32
    class_embeddings: np.ndarray  # (K, D) float32
    raw_scores: np.ndarray  # (K,) float64
    paths: list[str]
    sha256: list[str]
    layers: tuple[int, ...]
    grid_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: list[int]) -> KeptPool:
        index = np.asarray(keep, dtype=np.int64)
        return KeptPool(
            self.tokens[index],
            self.class_embeddings[index],
            self.raw_scores[index],
            [self.paths[i] for i in keep],
            [self.sha256[i] for i in keep],
            self.layers,
            self.grid_size,
        )

    def newest(self, count: int) -> KeptPool:
        """The ``count`` images scored last (none for 0)."""
        return self.subset(list(range(max(0, len(self) - max(0, count)), len(self))))

    def still_valid(self, valid: Mapping[str, str]) -> KeptPool:
        """Only the entries whose path maps to the same file hash in ``valid`` (the ok rows of OUT)."""
        pairs = zip(self.paths, self.sha256, strict=True)
        return self.subset([i for i, (path, sha) in enumerate(pairs) if valid.get(path) == sha])

    @staticmethod
    def concat(parts: list[KeptPool]) -> KeptPool:
        first = parts[0]
        return KeptPool(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.class_embeddings for p in parts]),
            np.concatenate([p.raw_scores for p in parts]),
            [path for p in parts for path in p.paths],
            [sha for p in parts for sha in p.sha256],
            first.layers,
            first.grid_size,
        )


def save_kept_pool(path: Path | Confined, pool: KeptPool) -> None:
    """Write atomically (readers see the old pool or the new one), never through a link planted in
    OUT (``path``: confined to OUT); an empty pool removes the file."""
    if not len(pool):
        remove_regular(path)
        return
    with atomic_write(path) as handle:
        np.savez(
            handle,
            tokens=pool.tokens.astype(np.float32, copy=False),
            class_embeddings=pool.class_embeddings.astype(np.float32, copy=False),
            raw_scores=pool.raw_scores.astype(np.float64, copy=False),
            paths=np.asarray(pool.paths, dtype=np.str_),
            sha256=np.asarray(pool.sha256, dtype=np.str_),
            layers=np.asarray(pool.layers, dtype=np.int64),
            grid_size=np.asarray(pool.grid_size, dtype=np.int64),
        )


def load_kept_pool(path: Path | Confined, layers: tuple[int, ...], grid_size: tuple[int, int]) -> KeptPool | None:
    """The kept pool, or None when there is none or it cannot be used (unreadable, damaged, a link or
    no regular file, or made with other layers or another patch grid): the run then scores its images
    among themselves."""
    try:
        with open_confined(path) as handle, np.load(handle, allow_pickle=False) as data:
            pool = KeptPool(
                tokens=np.asarray(data["tokens"], dtype=np.float32),
                class_embeddings=np.asarray(data["class_embeddings"], dtype=np.float32),
                raw_scores=np.asarray(data["raw_scores"], dtype=np.float64),
                paths=[str(p) for p in data["paths"]],
                sha256=[str(h) for h in data["sha256"]],
                layers=tuple(int(x) for x in data["layers"]),
                grid_size=(int(data["grid_size"][0]), int(data["grid_size"][1])),
            )
    except (OSError, ValueError, KeyError, IndexError, EOFError):
        return None
    count = len(pool.paths)
    shapes_fit = (
        pool.tokens.ndim == 4
        and pool.tokens.shape[:3] == (count, len(layers), grid_size[0] * grid_size[1])
        and pool.class_embeddings.shape[0] == count
        and pool.raw_scores.shape == (count,)
        and len(pool.sha256) == count
    )
    if not shapes_fit or pool.layers != tuple(layers) or pool.grid_size != tuple(grid_size):
        return None
    return pool
