"""The WinCLIP algorithm: window masks, window/patch embeddings, zero- and few-shot scores.

Tensors in, tensors out. Nothing here reads or writes files or knows about the command line.

Shapes used throughout:
    N  images in a batch            G = gh * gw patches of the model's grid (15 x 15 for ViT-B-16-plus-240)
    W  windows of one scale          D  joint image-text embedding dim      C  visual transformer width
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from winclip_cli.options import DEFAULT_SCALES

NN_CHUNK_SIZE = 8192  # query rows compared with the memory at once: bounds the similarity matrix
TEMPERATURE = 0.07  # softmax temperature of the zero-shot class scores (WinCLIP paper)


# --------------------------------------------------------------------------------------- masks and aggregation


def window_patch_indices(grid_size: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major on the grid) of every ``scale x scale`` window, shape ``(W, scale * scale)``.

    Windows are enumerated row-major by their top-left corner, and the patches inside a window
    row-major too, which is the order ``torch.nn.functional.unfold`` gives.
    """
    height, width = grid_size
    if scale < 1 or scale > min(height, width):
        raise ValueError(f"window scale {scale} does not fit the {height}x{width} patch grid")
    grid = torch.arange(height * width).reshape(height, width)
    windows = grid.unfold(0, scale, stride).unfold(1, scale, stride)  # (rows, cols, scale, scale)
    return windows.reshape(-1, scale * scale)


def coverage_matrix(window_indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean ``(W, G)`` matrix: entry (w, p) is True when window w covers patch p."""
    coverage = torch.zeros(window_indices.shape[0], num_patches, dtype=torch.bool)
    coverage.scatter_(1, window_indices, True)
    return coverage


def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it.

    ``window_scores`` is ``(N, W)``, ``coverage`` the ``(W, G)`` boolean matrix; returns ``(N, G)``.
    A zero score among a patch's windows makes its harmonic mean 0 (1/0 is infinite); a NaN score
    (an overflowed embedding) zeroes only the patches its window covers, as the per-patch definition
    does; a patch no window covers gets 0. The sum of reciprocals is one matrix product instead of a
    loop over patches, so zeros and NaNs are taken out of the product and applied afterwards.
    """
    scores = window_scores.float()
    cover = coverage.to(device=scores.device, dtype=scores.dtype)
    degenerate = (scores == 0) | torch.isnan(scores)
    reciprocal = torch.where(degenerate, torch.zeros_like(scores), 1.0 / scores)
    harmonic = cover.sum(dim=0) / (reciprocal @ cover)
    touches_degenerate = (degenerate.to(scores.dtype) @ cover) > 0
    harmonic = torch.where(touches_degenerate, torch.zeros_like(harmonic), harmonic)
    return torch.nan_to_num(harmonic, nan=0.0, posinf=0.0)


def harmonic_mean(stack: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Harmonic mean along ``dim``; 0 where any entry is 0, as 1/0 = inf makes it, and 0 where any
    entry is NaN, as :func:`harmonic_aggregation` treats a NaN window score."""
    mean = stack.shape[dim] / (1.0 / stack).sum(dim=dim)
    return torch.where(torch.isnan(stack).any(dim=dim), torch.zeros_like(mean), mean)


# --------------------------------------------------------------------------------------------------- scores


def cosine_similarity(embeddings: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``embeddings`` (..., D) with every row of ``others`` (M, D) -> (..., M)."""
    return F.normalize(embeddings.float(), dim=-1) @ F.normalize(others.float(), dim=-1).T


def class_scores(
    embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """Zero-shot anomaly score: softmax over cosine([normal, anomalous]) / temperature, the anomalous entry.

    ``embeddings`` (..., D), ``text_embeddings`` (2, D) with the normal vector first. Returns (...).
    """
    logits = cosine_similarity(embeddings, text_embeddings) / temperature
    return logits.softmax(dim=-1)[..., 1]


def nearest_similarity(
    queries: torch.Tensor,
    memory: torch.Tensor,
    chunk_size: int = NN_CHUNK_SIZE,
    memory_owner: torch.Tensor | None = None,
    exclude_owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Largest cosine similarity of each query (N, ..., D) to any memory row (M, D) -> (N, ...).

    The memory is normalised chunk by chunk, ``chunk_size`` rows at a time, so the similarity
    matrix never holds more than (queries x chunk) entries however many references there are.
    For leave-one-out scoring, ``memory_owner`` (M,) names the reference each row comes from and
    ``exclude_owner`` (N,) the reference each query image may not be compared with (-1: none).
    """
    if memory.shape[0] == 0:
        raise ValueError("the reference memory is empty")
    flat = F.normalize(queries.float().reshape(-1, queries.shape[-1]), dim=-1)
    per_image = flat.shape[0] // queries.shape[0] if queries.ndim > 1 else 1
    excluded = None
    if exclude_owner is not None and memory_owner is not None:
        excluded = exclude_owner.to(flat.device).repeat_interleave(per_image)
    best = torch.full((flat.shape[0],), -torch.inf, device=flat.device)
    for start in range(0, memory.shape[0], chunk_size):
        chunk = F.normalize(memory[start : start + chunk_size].to(flat.device, torch.float32), dim=-1)
        sims = flat @ chunk.T
        if excluded is not None:
            owners = memory_owner[start : start + chunk_size].to(flat.device)  # type: ignore[index]
            sims = sims.masked_fill(owners[None, :] == excluded[:, None], -torch.inf)
        best = torch.maximum(best, sims.amax(dim=-1))
    return best.reshape(queries.shape[:-1])


def association_scores(queries: torch.Tensor, memory: torch.Tensor, **neighbours: Any) -> torch.Tensor:
    """Few-shot association score: (1 - max cosine similarity to the memory) / 2, shape of queries minus D.

    ``neighbours`` go to :func:`nearest_similarity` (``chunk_size``, ``memory_owner``, ``exclude_owner``).
    """
    return (1.0 - nearest_similarity(queries, memory, **neighbours)) / 2.0


# ------------------------------------------------------------------------------------------------ embeddings


@dataclass
class ImageEmbeddings:
    """What one pass of the visual tower yields for a batch of N images."""

    image: torch.Tensor  # (N, D) pooled and projected full-image embedding
    patches: torch.Tensor  # (N, G, C) full-image patch tokens after ln_post, not projected
    windows: list[torch.Tensor]  # per scale, (N, W_s, D) pooled and projected window embeddings


class WindowEncoder:
    """Runs an open_clip ``VisionTransformer`` on the full image and on every window of every scale.

    A window's embedding is the transformer run on that window's patch tokens plus the class token,
    taken after the positional embedding and before ``ln_pre``, then ``ln_post``, pooling and the
    projection, exactly like the full image. ``ln_pre`` acts on each token alone, so it is applied
    once to the full token map and the windows gather from that: the same numbers, less work.
    """

    def __init__(
        self,
        visual: nn.Module,
        scales: Sequence[int] = DEFAULT_SCALES,
        max_window_tokens: int = 65536,
    ) -> None:
        # ``_pool`` is open_clip 3.x's own pooling (class token or mean, per config); pyproject pins
        # open_clip below 4 so that this private method cannot vanish under a user unannounced.
        for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "_pool"):
            if not hasattr(visual, name):
                raise TypeError(f"WinCLIP needs an open_clip 3.x VisionTransformer; this visual tower has no {name!r}")
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("WinCLIP does not support vision towers with attentional pooling")
        self.visual: Any = visual  # open_clip's VisionTransformer: its parts are attributes torch cannot type
        self.grid_size: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))  # type: ignore[index]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.scales = tuple(int(s) for s in scales)
        # token indices of each window in the (1 + G)-token sequence: class token 0, then patches + 1
        self.window_indices = [window_patch_indices(self.grid_size, s) for s in self.scales]
        self._gather = [
            torch.cat([torch.zeros(len(idx), 1, dtype=torch.long), idx + 1], dim=1) for idx in self.window_indices
        ]
        self.coverage = [coverage_matrix(idx, self.num_patches) for idx in self.window_indices]
        self.max_window_tokens = max_window_tokens

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1 + G, C): patch embedding, class token, positional embedding."""
        visual = self.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + visual.positional_embedding.to(x.dtype)

    def _finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer, ln_post, pooling and projection on (B, L, C) tokens already through ln_pre.

        open_clip 3.x transformers take batch-first (B, L, C) tensors; older code permuted to
        (L, B, C), which on 3.x would attend across windows. ``Transformer.forward`` handles its
        own layout, so the tensor goes in batch-first as open_clip's own ``forward`` passes it.
        """
        visual = self.visual
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, tokens

    def encode(self, images: torch.Tensor) -> ImageEmbeddings:
        tokens = self.visual.ln_pre(self.embed_tokens(images))
        image, patches = self._finish(tokens)
        windows = [self._encode_windows(tokens, gather) for gather in self._gather]
        return ImageEmbeddings(image=image, patches=patches, windows=windows)

    def _encode_windows(self, tokens: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
        """(N, 1 + G, C) tokens -> (N, W, D) window embeddings, in chunks of bounded token count."""
        n, _, width = tokens.shape
        n_windows, length = gather.shape
        gather = gather.to(tokens.device)
        sequences = tokens[:, gather.reshape(-1)].reshape(n * n_windows, length, width)
        per_chunk = max(1, self.max_window_tokens // length)
        pooled = [self._finish(sequences[i : i + per_chunk])[0] for i in range(0, sequences.shape[0], per_chunk)]
        return torch.cat(pooled).reshape(n, n_windows, -1)


# ----------------------------------------------------------------------------------------------- the scorer


@dataclass
class ReferenceMemory:
    """Few-shot memory of k normal images, flattened per kind of embedding."""

    patches: torch.Tensor  # (k * G, C)
    windows: list[torch.Tensor]  # per scale, (k * W_s, D)
    # which reference each row comes from, for leave-one-out scoring (None: not tracked)
    patch_owner: torch.Tensor | None = None  # (k * G,)
    window_owner: list[torch.Tensor] | None = None  # per scale, (k * W_s,)

    @property
    def rows(self) -> int:
        """Patch rows in the memory: k x G (``MemoryFile.k`` is the number of reference images)."""
        return self.patches.shape[0]

    @classmethod
    def from_arrays(
        cls,
        patches: np.ndarray | torch.Tensor,
        windows: Sequence[np.ndarray | torch.Tensor],
        entries_per_reference: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> ReferenceMemory:
        """From per-entry arrays: patches (E, G, C), windows per scale (E, W_s, D); reference r owns the
        next ``entries_per_reference[r]`` entries (one per image, or one per tile of a tiled image)."""
        patch_tensor = torch.as_tensor(patches).to(device)
        window_tensors = [torch.as_tensor(w).to(device) for w in windows]
        owner = torch.repeat_interleave(torch.arange(len(entries_per_reference)), torch.tensor(entries_per_reference))
        return cls(
            patch_owner=owner.repeat_interleave(patch_tensor.shape[1]),
            window_owner=[owner.repeat_interleave(w.shape[1]) for w in window_tensors],
            patches=patch_tensor.reshape(-1, patch_tensor.shape[-1]),
            windows=[w.reshape(-1, w.shape[-1]) for w in window_tensors],
        )

    @classmethod
    def from_embeddings(cls, embeddings: ImageEmbeddings) -> ReferenceMemory:
        return cls(
            patches=embeddings.patches.reshape(-1, embeddings.patches.shape[-1]),
            windows=[w.reshape(-1, w.shape[-1]) for w in embeddings.windows],
        )


@dataclass
class Scores:
    """Scores of a batch. Maps are on the model's patch grid; ``upsample`` brings them to pixels."""

    image: torch.Tensor  # (N,)
    grid_maps: torch.Tensor  # (N, gh, gw)

    def upsample(self, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear (align_corners=False) upsampling of the grid maps to ``size`` -> (N, H, W)."""
        return F.interpolate(self.grid_maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class WinClipScorer:
    """Zero-shot WinCLIP, and WinCLIP+ when a reference memory is set.

    >>> scorer = WinClipScorer(model.visual, text_embeddings)          # doctest: +SKIP
    >>> image_scores, maps = scorer.score(batch)                          # doctest: +SKIP
    """

    def __init__(
        self,
        visual: nn.Module,
        text_embeddings: torch.Tensor,
        scales: Sequence[int] = DEFAULT_SCALES,
        memory: ReferenceMemory | None = None,
        temperature: float = TEMPERATURE,
        nn_chunk_size: int = NN_CHUNK_SIZE,
    ) -> None:
        if text_embeddings.shape[0] != 2:
            raise ValueError("text_embeddings must hold 2 rows: the normal and the anomalous ensemble vector")
        self.encoder = WindowEncoder(visual, scales)
        self.text_embeddings = text_embeddings.float()
        self.temperature = temperature
        self.memory = memory
        self.nn_chunk_size = nn_chunk_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def scales(self) -> tuple[int, ...]:
        return self.encoder.scales

    def embed(self, images: torch.Tensor) -> ImageEmbeddings:
        with torch.inference_mode():
            return self.encoder.encode(images)

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (N,) and anomaly maps (N, H, W) at the input's resolution, as the reference returns."""
        scores = self.score_embeddings(self.embed(images))
        return scores.image, scores.upsample((images.shape[-2], images.shape[-1]))

    def score_embeddings(self, emb: ImageEmbeddings, exclude: torch.Tensor | None = None) -> Scores:
        """Scores of embedded images; ``exclude`` (N,) names a reference each image must not be compared
        with (leave-one-out when an image is itself in the memory), -1 for none."""
        with torch.inference_mode():
            text = self.text_embeddings.to(emb.image.device)
            image_scores = class_scores(emb.image, text, self.temperature)
            grid_maps = self._zero_shot_maps(image_scores, emb.windows, text)
            if self.memory is not None:
                few_shot = self._few_shot_maps(emb, exclude)
                grid_maps = (grid_maps + few_shot) / 2
                image_scores = (image_scores + few_shot.flatten(1).amax(dim=1)) / 2
            return Scores(image=image_scores, grid_maps=grid_maps)

    def _zero_shot_maps(
        self, image_scores: torch.Tensor, windows: list[torch.Tensor], text: torch.Tensor
    ) -> torch.Tensor:
        n = image_scores.shape[0]
        per_scale = [image_scores[:, None].expand(n, self.encoder.num_patches)]  # the full image is one more scale
        for window_embeddings, coverage in zip(windows, self.encoder.coverage, strict=True):
            per_scale.append(harmonic_aggregation(class_scores(window_embeddings, text, self.temperature), coverage))
        return harmonic_mean(torch.stack(per_scale)).reshape(n, *self.grid_size)

    def _few_shot_maps(self, emb: ImageEmbeddings, exclude: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.memory
        assert memory is not None
        n = emb.image.shape[0]
        no_owners: list[torch.Tensor | None] = [None] * len(memory.windows)
        window_owners = list(memory.window_owner) if memory.window_owner else no_owners
        neighbours = {"chunk_size": self.nn_chunk_size, "exclude_owner": exclude}
        per_scale = [association_scores(emb.patches, memory.patches, memory_owner=memory.patch_owner, **neighbours)]
        for window_embeddings, rows, owner, coverage in zip(
            emb.windows, memory.windows, window_owners, self.encoder.coverage, strict=True
        ):
            scores = association_scores(window_embeddings, rows, memory_owner=owner, **neighbours)
            per_scale.append(harmonic_aggregation(scores, coverage))
        return torch.stack(per_scale).mean(dim=0).reshape(n, *self.grid_size)
