"""Mutual scoring (MuSc, Li et al., ICLR 2024): the images of a pool scored against each other.

Tensors in, tensors out. Nothing here reads or writes files or knows about the command line.

MuSc needs no prompts and no references: most images of a folder of one product are good, so a
patch that has no close counterpart in most other images is anomalous. The steps, as the paper
and its reference implementation (github.com/xrli-U/MuSc, MIT) define them:

1. Features (:class:`MutualFeatureExtractor`): one forward pass of the visual transformer per
   image; the patch tokens after some blocks (class token dropped, no ``ln_post``) and the pooled,
   projected, L2-normalised class-token embedding.
2. LNAMD (:func:`aggregate_neighbourhoods`), per layer and aggregation degree r in (1, 3, 5):
   LayerNorm over the whole (G, C) token map without affine parameters, mean over each patch's
   r x r neighbourhood (zero padding, divided by r * r everywhere), L2 normalisation per patch.
3. MSM (:func:`nearest_patch_distances`, :func:`interval_mean`): for image i and every other
   image j, each patch's distance to its nearest patch of j; per patch, the mean of the smallest
   30 % of those N - 1 distances (k = int(0.3 (N - 1))).
4. Maps: mean over layers, then over r; bilinear (``align_corners=True``) to the input size;
   the raw image score is the map's maximum.
5. RsCIN (:func:`rescore_with_class_neighbours`): raw scores min-max normalised over the pool,
   then each image's score replaced by the similarity-weighted mean over its k most similar
   images by class embedding (itself included), averaged over k in (1, 2, 3).

Dtypes follow the reference: features and distances in float32, the per-patch interval means
cast to float64 and the maps and raw scores kept in float64; RsCIN computes in float32.

Where the reference has no answer this module chooses one, and says so:
  - pools of 2 to 4 images: the reference's k = int(0.3 (N - 1)) is 0 and its mean is NaN; here
    k is at least 1 (the nearest other image);
  - RsCIN with fewer images than k: every image is kept (the reference raises);
  - RsCIN on a pool whose raw scores are all equal: every normalised score is 0 (the reference
    divides 0 by 0).

Cost: the distances between the patches of images i and j are one matrix whose row minima serve
i and whose column minima serve j, so each pair is computed once, in blocks of bounded size.
Per layer and r, a pool of N images costs N (N - 1) / 2 matrix products of (G x C) by (C x G);
for ViT-B-16-plus-240 (G = 225, C = 896), 4 layers and 3 degrees that is about 0.54 (N - 1)
GFLOP per image, against about 54 GFLOP for the image's forward pass.

Memory: :class:`PoolFeatures` holds per image ``layers x G x C`` float32 tokens plus one ``D``
class embedding (ViT-B-16-plus-240, 4 layers: 3,225,600 + 2,560 bytes = 3.2 MB per image).
Scoring adds one aggregated layer and its copy in the distance products' layout (2 x G x (C + 2)
floats: 1.6 MB per image), the nearest-patch distances of the scored images (G x N floats:
0.18 MB per image at N = 200) and one block of distances (``block_elements`` floats, 32 MiB by
default): about 5 MB per image of a 200-image pool, 1 GB for the pool.

Shapes: N images of a pool, Q images being scored, G = gh * gw patches, C transformer width,
D embedding dim, L chosen layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

AGGREGATION_DEGREES = (1, 3, 5)  # LNAMD's r: neighbourhoods of 1 x 1, 3 x 3 and 5 x 5 patches
INTERVAL = (0.0, 0.3)  # MSM: mean of the sorted nearest-patch distances from 0 % up to 30 %
CLASS_NEIGHBOURS = (1, 2, 3)  # RsCIN's k on MVTec AD (the reference uses 1, 8, 9 on VisA)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the reference's LNAMD uses
BLOCK_ELEMENTS = 1 << 23  # distances computed at once: 32 MiB of float32


class PoolTooSmallError(ValueError):
    """Mutual scoring needs at least two images: an image alone has nothing to be compared with."""


class NonFiniteFeaturesError(ValueError):
    """Some images' features hold NaN or infinity (an overflow in reduced precision): such an image
    would make every other image's nearest distances NaN, so it must not join a pool."""


def default_layers(depth: int) -> tuple[int, ...]:
    """MuSc's blocks for a tower of ``depth`` blocks: the last of each quarter, 0-based.

    12 blocks give (2, 5, 8, 11) and 24 give (5, 11, 17, 23), MuSc's ``--feature_layers`` for
    ViT-B and ViT-L (the reference adds 1 because it counts blocks from 1: the tokens after
    blocks 3, 6, 9 and 12). Shallow towers get every distinct block this yields, e.g. (0, 1) for 2.
    """
    if depth < 1:
        raise ValueError(f"a transformer needs at least one block, not {depth}")
    return tuple(sorted({max(0, (quarter + 1) * depth // 4 - 1) for quarter in range(4)}))


# ------------------------------------------------------------------------------------------------- features


@dataclass
class PoolFeatures:
    """What mutual scoring keeps of each image: a pool is any number of these, concatenated."""

    tokens: torch.Tensor  # (N, L, G, C) float32 patch tokens after each chosen block (no class token)
    class_embeddings: torch.Tensor  # (N, D) float32, pooled, projected and L2-normalised
    grid_size: tuple[int, int]  # (gh, gw), G = gh * gw

    def __post_init__(self) -> None:
        n, _, patches, _ = self.tokens.shape
        if patches != self.grid_size[0] * self.grid_size[1]:
            raise ValueError(f"{patches} patch tokens do not fill a {self.grid_size[0]}x{self.grid_size[1]} grid")
        if self.class_embeddings.shape[0] != n:
            raise ValueError(f"{n} token maps but {self.class_embeddings.shape[0]} class embeddings")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def bytes_per_image(self) -> int:
        """Bytes one image occupies in a pool (tokens and class embedding, as stored)."""
        per_tokens = self.tokens[0].numel() * self.tokens.element_size() if len(self) else 0
        per_class = self.class_embeddings.shape[-1] * self.class_embeddings.element_size()
        return per_tokens + per_class

    def finite(self) -> torch.Tensor:
        """(N,) bool: the images whose tokens and class embedding are all finite (the others must be
        given an error row and left out of the pool: see :class:`NonFiniteFeaturesError`)."""
        # a sum is NaN or infinite when any term is (or when finite values overflow: unusable too)
        return self.tokens.flatten(1).sum(dim=1).isfinite() & self.class_embeddings.sum(dim=1).isfinite()

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> PoolFeatures:
        """The features of some images (an index tensor, a list or a slice), in that order."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return PoolFeatures(self.tokens[index], self.class_embeddings[index], self.grid_size)

    @staticmethod
    def concat(parts: Sequence[PoolFeatures]) -> PoolFeatures:
        if not parts:
            raise PoolTooSmallError("no images to form a pool from")
        grids = {part.grid_size for part in parts}
        if len(grids) != 1:
            raise ValueError(f"features of different patch grids cannot share a pool: {sorted(grids)}")
        return PoolFeatures(
            torch.cat([part.tokens for part in parts]),
            torch.cat([part.class_embeddings for part in parts]),
            parts[0].grid_size,
        )


class MutualFeatureExtractor:
    """Patch tokens of chosen blocks and the class embedding of an open_clip ``VisionTransformer``.

    One forward pass per image (open_clip 3.x ``forward_intermediates``, batch-first): the tokens
    are each block's output as the reference's ``encode_image(image, features_list)`` returns
    them, before any LayerNorm; the class embedding goes through ``ln_post`` and the projection
    as in open_clip's own ``encode_image``, then is L2-normalised.
    """

    def __init__(self, visual: Any, layers: Sequence[int] | None = None) -> None:  # open_clip VisionTransformer
        for name in ("forward_intermediates", "transformer", "grid_size", "proj"):
            if not hasattr(visual, name):
                raise TypeError(
                    f"mutual scoring needs an open_clip 3.x VisionTransformer; this visual tower has no {name!r}"
                )
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("mutual scoring does not support vision towers with attentional pooling")
        depth = len(visual.transformer.resblocks)
        chosen = default_layers(depth) if layers is None else tuple(sorted({int(layer) for layer in layers}))
        if not chosen or chosen[0] < 0 or chosen[-1] >= depth:
            raise ValueError(
                f"layers {list(layers or [])} are not blocks of this {depth}-block tower (0 to {depth - 1}, 0-based)"
            )
        self.visual = visual
        self.layers = chosen
        self.grid_size: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))

    def extract(self, images: torch.Tensor) -> PoolFeatures:
        """(N, 3, H, W) preprocessed images -> their :class:`PoolFeatures` (float32, on the images' device)."""
        dtype = next(self.visual.parameters()).dtype
        with torch.inference_mode():
            out = self.visual.forward_intermediates(
                images.to(dtype), indices=list(self.layers), output_fmt="NLC", output_extra_tokens=False
            )
            tokens = torch.stack([t.float() for t in out["image_intermediates"]], dim=1)
            embeddings = out["image_features"].float()
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return PoolFeatures(tokens=tokens, class_embeddings=embeddings, grid_size=self.grid_size)


# ---------------------------------------------------------------------------------------------------- LNAMD


def aggregate_neighbourhoods(tokens: torch.Tensor, grid_size: tuple[int, int], degree: int) -> torch.Tensor:
    """LNAMD for one layer: (N, G, C) tokens -> (N, G, C) L2-normalised aggregated features.

    LayerNorm over all G x C values of an image (no affine), the mean over each patch's
    ``degree x degree`` neighbourhood with zero padding (divided by degree² everywhere, as the
    reference's unfold + ``adaptive_avg_pool1d`` does; a per-patch factor that the L2 normalisation
    then cancels anyway), then each patch's L2 normalisation.
    """
    if degree < 1 or degree % 2 == 0:
        raise ValueError(f"aggregation degree {degree} must be odd and positive")
    n, patches, width = tokens.shape
    normed = F.layer_norm(tokens.float(), (patches, width), eps=LAYER_NORM_EPS)
    if degree > 1:
        grid = normed.transpose(1, 2).reshape(n, width, *grid_size)
        pooled = F.avg_pool2d(grid, degree, stride=1, padding=degree // 2, count_include_pad=True)
        normed = pooled.reshape(n, width, patches).transpose(1, 2)
    return normed / normed.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------------ MSM


def nearest_patch_distances(
    features: torch.Tensor, queries: int | None = None, block_elements: int = BLOCK_ELEMENTS
) -> torch.Tensor:
    """Distance from each patch of the first ``queries`` images to the nearest patch of every image.

    ``features`` (N, G, C) -> (Q, G, N) float32, where entry (i, p, j) is the smallest Euclidean
    distance between patch p of image i and any patch of image j, and (i, p, i) is +inf (an image
    is not its own neighbour). Pairs of two query images are computed once (row minima for one,
    column minima for the other); a query image and a non-query one only for the query's rows.
    The distance blocks hold at most about ``block_elements`` values.
    """
    n, patches, width = features.shape
    q = n if queries is None else int(queries)
    if not 0 < q <= n:
        raise ValueError(f"cannot score {q} of {n} images")
    rows = features.float().reshape(n * patches, width)
    # torch.cdist's matrix-product form, as the reference computes its distances: one product of
    # [-2x, |x|², 1] and [y, 1, |y|²] gives the squared distances; the minima are taken first and the
    # clamp and square root applied to them alone (both monotone: the same numbers, less work)
    squares = rows.pow(2).sum(dim=-1, keepdim=True)
    ones = torch.ones_like(squares)
    right_rows = torch.cat([rows, ones, squares], dim=1)  # made once: every block of queries meets it
    per_block = max(1, math.isqrt(max(1, block_elements)) // patches)
    out = torch.empty(q, patches, n, dtype=torch.float32, device=features.device)
    for a in range(0, q, per_block):
        a_end = min(a + per_block, q)
        span = slice(a * patches, a_end * patches)
        left = torch.cat([-2 * rows[span], squares[span], ones[span]], dim=1)
        for b in range(a, n, per_block):
            b_end = min(b + per_block, n)
            squared = (left @ right_rows[b * patches : b_end * patches].T).reshape(
                a_end - a, patches, b_end - b, patches
            )
            out[a:a_end, :, b:b_end] = squared.amin(dim=3)
            if a < b < q:  # the other side is scored too: its column minima, from the same matrix
                q_end = min(b_end, q)
                out[b:q_end, :, a:a_end] = squared[:, :, : q_end - b].amin(dim=1).permute(1, 2, 0)
    out = out.clamp_min_(0).sqrt_()
    index = torch.arange(q, device=features.device)
    out[index, :, index] = torch.inf
    return out


def interval_size(others: int, interval: tuple[float, float] = INTERVAL) -> tuple[int, int]:
    """(k_min, k_max): the positions of the sorted ``others`` distances whose mean MSM takes.

    As the reference: ``int(fraction * others)`` for each bound; k_max is raised to k_min + 1 so
    that small pools (fewer than 4 others at 30 %) take the nearest image instead of an empty mean.
    """
    if others < 1:
        raise PoolTooSmallError("mutual scoring needs at least 2 images in a pool: an image alone has no others")
    low, high = sorted(interval)
    k_min = int(low * others) if low < 1 else int(low)
    k_max = int(high * others) if high < 1 else int(high)
    k_min = min(k_min, others - 1)
    return k_min, min(others, max(k_max, k_min + 1))


def interval_mean(distances: torch.Tensor, interval: tuple[float, float] = INTERVAL) -> torch.Tensor:
    """MSM per patch: (Q, G, N) nearest distances (+inf for an image itself) -> (Q, G) float64.

    The mean of the sorted distances to the N - 1 other images from position k_min up to k_max
    (:func:`interval_size`), taken in float32 as the reference does, then cast to float64.
    """
    k_min, k_max = interval_size(distances.shape[-1] - 1, interval)
    smallest = distances.topk(k_max, dim=-1, largest=False, sorted=True).values
    return smallest[..., k_min:].mean(dim=-1).double()


def mutual_grid_maps(
    pool: PoolFeatures,
    queries: int | None = None,
    degrees: Sequence[int] = AGGREGATION_DEGREES,
    interval: tuple[float, float] = INTERVAL,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """MSM maps of the first ``queries`` images of ``pool`` against all of it -> (Q, gh, gw) float64.

    Mean over the layers, then over the aggregation degrees, as the reference averages.
    """
    n = len(pool)
    if n < 2:
        raise PoolTooSmallError(
            f"mutual scoring needs at least 2 images in a pool, got {n}: score more images together "
            "(or use zero-shot or few-shot scoring for a single image)"
        )
    bad = (~pool.finite()).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteFeaturesError(
            f"the features of pool images {bad} are not finite (NaN or infinity): leave them out of the pool"
        )
    q = n if queries is None else int(queries)
    per_degree = []
    for degree in degrees:
        per_layer = []
        for layer in range(pool.tokens.shape[1]):
            features = aggregate_neighbourhoods(pool.tokens[:, layer], pool.grid_size, degree)
            distances = nearest_patch_distances(features, q, block_elements)
            del features
            per_layer.append(interval_mean(distances, interval))
            del distances
        per_degree.append(torch.stack(per_layer).mean(dim=0))
    return torch.stack(per_degree).mean(dim=0).reshape(q, *pool.grid_size)


# ---------------------------------------------------------------------------------------------------- RsCIN


def rescore_with_similarity(
    raw_scores: torch.Tensor, similarity: torch.Tensor, neighbours: Sequence[int] = CLASS_NEIGHBOURS
) -> torch.Tensor:
    """RsCIN's MMO on a given (N, N) similarity matrix: (N,) raw scores -> (N,) float32.

    Raw scores min-max normalised over the pool (all 0 when they are all equal); for each k,
    each row of ``similarity`` keeps its k largest entries, is divided by their sum and weights
    the normalised scores; the results are averaged over k. A k above N keeps every entry.
    """
    raw = raw_scores.double()
    spread = raw.max() - raw.min()
    normalised = (raw - raw.min()) / spread if spread > 0 else torch.zeros_like(raw)
    normalised = normalised.float()
    similarity = similarity.float()
    per_k = []
    for k in neighbours:
        weights, index = similarity.topk(min(int(k), similarity.shape[1]), dim=1, largest=True, sorted=True)
        per_k.append((weights * normalised[index]).sum(dim=1) / weights.sum(dim=1))
    return torch.stack(per_k, dim=-1).mean(dim=-1)


def rescore_with_class_neighbours(
    raw_scores: torch.Tensor, class_embeddings: torch.Tensor, neighbours: Sequence[int] = CLASS_NEIGHBOURS
) -> torch.Tensor:
    """RsCIN: (N,) raw scores and (N, D) L2-normalised class embeddings -> (N,) float32 scores."""
    embeddings = class_embeddings.float()
    return rescore_with_similarity(raw_scores, embeddings @ embeddings.T, neighbours)


# ------------------------------------------------------------------------------------------------ the scorer


def upsample_maps(grid_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, gh, gw) -> (N, H, W), bilinear with ``align_corners=True`` as MuSc upsamples, same dtype."""
    return F.interpolate(grid_maps[:, None], size=tuple(size), mode="bilinear", align_corners=True)[:, 0]


def map_maxima(grid_maps: torch.Tensor, size: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """The maximum of each upsampled map (N,), upsampling ``chunk`` maps at a time."""
    if grid_maps.shape[0] == 0:
        return grid_maps.new_zeros(0)
    return torch.cat(
        [upsample_maps(grid_maps[i : i + chunk], size).flatten(1).amax(dim=1) for i in range(0, len(grid_maps), chunk)]
    )


@dataclass
class MutualScores:
    """Mutual scores of some images of a pool, in the pool's order of those images."""

    grid_maps: torch.Tensor  # (Q, gh, gw) float64 MSM maps on the patch grid
    # (Q,) float64: each upsampled map's maximum before RsCIN, a distance on the model's own scale
    # (still measured against the pool's other images, but not stretched to 0..1 over the pool)
    raw_scores: torch.Tensor
    scores: torch.Tensor  # (Q,) float32: after RsCIN, MuSc's final image score (min-max over the pool: 0 to 1)
    image_size: tuple[int, int]  # (H, W) the maps are upsampled to

    def upsample(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The maps at the input's resolution (or ``size``) -> (Q, H, W) float64."""
        return upsample_maps(self.grid_maps, size or self.image_size)


def mutual_scores(
    pool: PoolFeatures,
    image_size: tuple[int, int],
    degrees: Sequence[int] = AGGREGATION_DEGREES,
    interval: tuple[float, float] = INTERVAL,
    neighbours: Sequence[int] = CLASS_NEIGHBOURS,
    block_elements: int = BLOCK_ELEMENTS,
) -> MutualScores:
    """Every image of ``pool`` scored against all the others: MSM maps, raw scores, RsCIN scores."""
    maps = mutual_grid_maps(pool, None, degrees, interval, block_elements)
    raw = map_maxima(maps, image_size)
    rescored = rescore_with_class_neighbours(raw, pool.class_embeddings, neighbours)
    return MutualScores(
        grid_maps=maps, raw_scores=raw, scores=rescored, image_size=(int(image_size[0]), int(image_size[1]))
    )


def score_against_pool(
    new: PoolFeatures,
    kept: PoolFeatures,
    image_size: tuple[int, int],
    kept_raw_scores: torch.Tensor | None = None,
    degrees: Sequence[int] = AGGREGATION_DEGREES,
    interval: tuple[float, float] = INTERVAL,
    neighbours: Sequence[int] = CLASS_NEIGHBOURS,
    block_elements: int = BLOCK_ELEMENTS,
) -> MutualScores:
    """New images scored against a pool of themselves and ``kept`` images scored earlier.

    The maps of the new images are exactly those of :func:`mutual_scores` on the pool ``new +
    kept`` (each new image against every other image of it), at the cost of only the pairs that
    involve a new image. RsCIN needs the raw scores of the whole pool: pass ``kept_raw_scores``
    (N_kept,), e.g. those recorded when the kept images were scored, or leave it None to score
    the kept images against this pool as well (then the new rows equal :func:`mutual_scores`'s).
    Returns the scores of the new images only.
    """
    pool = PoolFeatures.concat([new, kept]) if len(kept) else new
    if kept_raw_scores is None and len(kept):
        return _rows(mutual_scores(pool, image_size, degrees, interval, neighbours, block_elements), len(new))
    maps = mutual_grid_maps(pool, len(new), degrees, interval, block_elements)
    raw = map_maxima(maps, image_size)
    pool_raw = raw if not len(kept) else torch.cat([raw, kept_raw_scores.to(raw)])  # type: ignore[union-attr]
    if pool_raw.shape[0] != len(pool):
        raise ValueError(f"{len(kept)} kept images but {pool_raw.shape[0] - len(new)} kept raw scores")
    rescored = rescore_with_class_neighbours(pool_raw, pool.class_embeddings, neighbours)[: len(new)]
    return MutualScores(
        grid_maps=maps, raw_scores=raw, scores=rescored, image_size=(int(image_size[0]), int(image_size[1]))
    )


def _rows(scores: MutualScores, count: int) -> MutualScores:
    return MutualScores(
        grid_maps=scores.grid_maps[:count],
        raw_scores=scores.raw_scores[:count],
        scores=scores.scores[:count],
        image_size=scores.image_size,
    )
