"""Mutual scoring (``--mode mutual``) as a stage: files in, scored files out, one pool at a time.

    (path, name) files, in path order --> pools of at most ``--pool-size`` files (nearly equal, consecutive)
    per pool:  decode + features, batch by batch (the session's decoding threads and batching)
               --> only the features are kept (the decoded pixels are dropped at once)
               --> core/musc.py scores the pool's images against each other
               --> the files are decoded again, one bounded look-ahead at a time, and yielded with
                   their maps for the writer, in path order

Memory is bounded by the pool, whatever the folder's size: a pool keeps each image's features
(3.2 MB for ViT-B-16-plus-240) and never its pixels, which are decoded a second time for the
heatmap, thumbnail and raw map (the price of holding 200 full-resolution images in no case).

An unreadable file gets its error row and leaves its pool one image smaller; an image whose
features are not finite gets an error row and stays out of the pool; a pool left with a single
image gives that image an error row (an image alone has nothing to be compared with).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from winclip_cli.core.musc import (
    MutualFeatureExtractor,
    MutualScores,
    PoolFeatures,
    mutual_scores,
    score_against_pool,
    upsample_maps,
)
from winclip_cli.io.kept_pool import KeptPool
from winclip_cli.jobs.decode import Decoded, decode_stream
from winclip_cli.jobs.kernel import Reporter, Session, never
from winclip_cli.options import SMALL_POOL


@dataclass(frozen=True)
class PoolPlace:
    """Where a row's image was scored: its pool ("2/3": the second of this run's three pools), the
    pool's image count, and the image's raw score (None for an error row)."""

    pool: str
    size: int
    raw_score: float | None = None

    def row_fields(self) -> dict[str, Any]:
        return {"raw_score": self.raw_score, "pool": self.pool, "pool_size": self.size}


@dataclass
class PoolRecord:
    """What run.json says of one pool: its name, how many images it held (``kept`` of them scored by an
    earlier run), how many of this run's files it was cut from, its first and last file of this run."""

    pool: str
    size: int
    files: int
    first: str
    last: str
    kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "size": self.size,
            "files": self.files,
            "kept": self.kept,
            "first": self.first,
            "last": self.last,
        }


def pool_bounds(count: int, pool_size: int) -> list[tuple[int, int]]:
    """``count`` files in order cut into the fewest consecutive groups of at most ``pool_size``, their
    sizes differing by at most one (201 files, pool size 200: 101 + 100). With ``pool_size`` >= 3
    no group holds a single file unless ``count`` is 1."""
    if count <= 0:
        return []
    groups = -(-count // pool_size)
    base, extra = divmod(count, groups)
    bounds, start = [], 0
    for index in range(groups):
        size = base + (index < extra)
        bounds.append((start, start + size))
        start += size
    return bounds


def features_fn(
    extractor: MutualFeatureExtractor, device: torch.device, dtype: torch.dtype
) -> Callable[[torch.Tensor, list[Decoded]], list]:
    """Batch -> one :class:`PoolFeatures` of one image per input, on the CPU (float32)."""

    def process(batch: torch.Tensor, items: list[Decoded]) -> list[PoolFeatures]:
        features = extractor.extract(batch.to(device=device, dtype=dtype))
        tokens, embeddings = features.tokens.cpu(), features.class_embeddings.cpu()
        return [
            PoolFeatures(tokens[i : i + 1].clone(), embeddings[i : i + 1].clone(), features.grid_size)
            for i in range(tokens.shape[0])
        ]

    return process


NON_FINITE = "its features hold NaN or infinity (an overflow of the model; try --precision fp32), so it joins no pool"


@dataclass
class MutualStream:
    """Scores files pool by pool with a session that has a feature extractor; ``pools`` lists the
    pools scored so far (run.json), ``reporter`` hears of small pools."""

    session: Session
    reporter: Reporter
    pool_size: int
    prefix: str = ""  # a shard's pools are named "2/4:1/3"
    # features of images scored by earlier runs in this OUT (--incremental): each pool of this run is
    # filled up to the pool size with the newest of them
    kept: KeptPool | None = None
    pools: list[PoolRecord] = field(default_factory=list)
    scored_now: list[KeptPool] = field(default_factory=list)  # this run's pools, for the next run's kept pool

    def scored(
        self,
        files: Sequence[tuple[Path, str]],
        *,
        with_stamp: bool = True,
        should_stop: Callable[[], bool] = never,
    ) -> Generator[Decoded, None, None]:
        """Every file (in the order given: path order), scored against the other files of its pool;
        ``outputs`` = [(MuSc's final score, map at the model's input size)], ``pool`` set."""
        bounds = pool_bounds(len(files), self.pool_size)
        for index, (start, stop) in enumerate(bounds):
            if should_stop():
                return
            name = f"{self.prefix}{index + 1}/{len(bounds)}"
            yield from self._pool(name, files[start:stop], with_stamp, should_stop)

    def _pool(
        self, name: str, files: Sequence[tuple[Path, str]], with_stamp: bool, should_stop: Callable[[], bool]
    ) -> Generator[Decoded, None, None]:
        session = self.session
        extractor = session.extractor
        assert extractor is not None, "a mutual stream needs a session opened with a MutualSpec"
        members: list[Decoded] = []
        parts: list[PoolFeatures] = []
        process = features_fn(extractor, session.backbone.device, session.backbone.dtype)
        for item in session.stream(files, process, with_stamp=with_stamp, should_stop=should_stop):
            if not item.error:
                parts.append(item.outputs[0])
            item.outputs, item.image = [], None  # only the features are kept: the pixels are decoded again
            members.append(item)
        if should_stop():
            return  # an interrupted pool is not scored: its files are scored by the next run
        readable = [item for item in members if not item.error]
        pool_members: list[Decoded] = []
        pool_parts: list[PoolFeatures] = []
        if parts:
            for item, part in zip(readable, parts, strict=True):
                if bool(part.finite()[0]):
                    pool_members.append(item)
                    pool_parts.append(part)
                else:
                    item.error = NON_FINITE
        if not pool_members:
            yield from members
            return
        kept = self.kept.newest(self.pool_size - len(pool_members)) if self.kept is not None else None
        kept_count = len(kept) if kept is not None else 0
        if kept_count:
            name = f"{name} + {kept_count} kept"
        size = len(pool_members) + kept_count
        self.pools.append(
            PoolRecord(name, size, len(files), pool_members[0].relpath, pool_members[-1].relpath, kept=kept_count)
        )
        if size == 1:
            only = pool_members[0]
            only.error = (
                f"pool {name} holds only this image (the others of its {len(files)} files could not be used): "
                "mutual scoring needs at least 2 images"
            )
            only.pool = PoolPlace(name, size)
            yield from members
            return
        if size < SMALL_POOL:
            self.reporter.warn(
                f"pool {name} holds {size} images: mutual scores compare an image with the others of its pool, "
                f"and fewer than {SMALL_POOL} mean little"
            )
        pool = PoolFeatures.concat(pool_parts)
        del parts, pool_parts
        with session.threads.model_batch():
            scores = self._scores(pool, kept)
        self._remember(_kept_entries(pool, scores, pool_members, extractor.layers))
        del pool
        place_of = {
            id(item): (i, PoolPlace(name, size, float(scores.raw_scores[i]))) for i, item in enumerate(pool_members)
        }
        again = decode_stream(
            [(item.path, item.relpath) for item in pool_members],
            session.prep,
            workers=session.workers,
            lookahead=max(2 * session.batch_size, 4),
            with_stamp=False,
            threads=session.threads,
        )
        try:
            for item in members:
                if id(item) not in place_of:
                    yield item
                    continue
                index, place = place_of[id(item)]
                fresh = next(again)
                item.pool = place
                if fresh.error:
                    item.error = f"{fresh.error} (when decoded again for its heatmap)"
                elif item.stamp is not None and fresh.stamp is not None and not item.stamp.same_file(fresh.stamp):
                    item.error = "the file changed while its pool was scored; scan it again"
                else:
                    item.image, item.tiles = fresh.image, None
                    # MuSc's map: the grid upsampled (align_corners=True) to the model's input size; the
                    # writer takes it to the image's own size as it does every mode's map
                    model_map = upsample_maps(scores.grid_maps[index : index + 1], scores.image_size)[0].float()
                    item.outputs = [(float(scores.scores[index]), model_map)]
                item.inputs = None
                yield item
        finally:
            again.close()  # type: ignore[attr-defined]

    def _remember(self, entries: KeptPool) -> None:
        """Keep this pool's features for the next run's kept pool, and only as many of the newest as
        the pool size needs: a 10,000-image scan holds at most two pools' features, never all."""
        self.scored_now.append(entries)
        while len(self.scored_now) > 1 and sum(map(len, self.scored_now[1:])) >= self.pool_size:
            self.scored_now.pop(0)

    def _scores(self, pool: PoolFeatures, kept: KeptPool | None) -> MutualScores:
        """The pool's images scored against each other, and against the kept images when there are any
        (their raw scores as recorded when they were scored: RsCIN needs the whole pool's)."""
        size = tuple(self.session.prep.size)
        image_size = (int(size[0]), int(size[1]))
        if kept is None or not len(kept):
            return mutual_scores(pool, image_size)
        kept_features = PoolFeatures(
            torch.from_numpy(kept.tokens), torch.from_numpy(kept.class_embeddings), pool.grid_size
        )
        return score_against_pool(pool, kept_features, image_size, kept_raw_scores=torch.from_numpy(kept.raw_scores))

    def kept_after_run(self, before: KeptPool | None) -> KeptPool | None:
        """The kept pool for the next run: the earlier one and this run's pools, the newest ``pool_size``."""
        parts = ([before] if before is not None and len(before) else []) + self.scored_now
        if not parts:
            return None
        return KeptPool.concat(parts).newest(self.pool_size)


def _kept_entries(
    pool: PoolFeatures, scores: MutualScores, members: list[Decoded], layers: tuple[int, ...]
) -> KeptPool:
    """What the kept pool stores of a scored pool's images (features, raw scores, path and hash)."""
    return KeptPool(
        tokens=pool.tokens.numpy(),
        class_embeddings=pool.class_embeddings.numpy(),
        raw_scores=scores.raw_scores[: len(members)].double().numpy(),
        paths=[item.relpath for item in members],
        sha256=[item.stamp.sha256 if item.stamp is not None else "" for item in members],
        layers=tuple(layers),
        grid_size=pool.grid_size,
    )
