"""A deliberately naive MuSc, written straight from the paper's and the reference's definitions.

Everything the slow, obvious way: the visual transformer block by block, the LayerNorm and the
neighbourhood means with explicit sums, for every ordered pair of images (i, j) and every patch
of i its distance to every patch of j by subtraction, a full sort of the N - 1 nearest distances,
RsCIN with explicit masks and row sums. Used only by the tests, to check the fast path.
"""

from __future__ import annotations

import numpy as np
import torch


def naive_features(visual, images: torch.Tensor, layers: list[int]):
    """(tokens (N, L, G, C), class embeddings (N, D)) from one pass, block by block (0-based layers)."""
    with torch.no_grad():
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        taken = []
        for index, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if index in layers:
                taken.append(x[:, 1:])  # the class token dropped
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return torch.stack(taken, dim=1), pooled


def naive_lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> np.ndarray:
    """(N, G, C) -> (N, G, C) float64: LayerNorm over the image by hand, r x r zero-padded means, L2 norm."""
    n, patches, width = tokens.shape
    x = tokens.double().numpy()
    out = np.zeros_like(x)
    half = r // 2
    for i in range(n):
        values = x[i]
        mean = values.sum() / values.size
        var = ((values - mean) ** 2).sum() / values.size
        normed = ((values - mean) / np.sqrt(var + 1e-5)).reshape(grid[0], grid[1], width)
        for row in range(grid[0]):
            for col in range(grid[1]):
                total = np.zeros(width)
                for dy in range(-half, half + 1):
                    for dx in range(-half, half + 1):
                        y, xx = row + dy, col + dx
                        if 0 <= y < grid[0] and 0 <= xx < grid[1]:
                            total += normed[y, xx]
                vector = total / (r * r)  # zero padding: the missing neighbours count as zeros
                out[i, row * grid[1] + col] = vector / np.sqrt((vector**2).sum())
    return out


def naive_msm(features, fraction: float = 0.3) -> np.ndarray:
    """(N, G, C) -> (N, G) float64: per patch, the mean of the smallest int(fraction (N - 1)) (at least 1)
    of its nearest-patch distances to each other image, by a loop over ordered pairs and a full sort."""
    x = np.asarray(features, dtype=np.float64)
    n, patches, _ = x.shape
    k = max(1, int(fraction * (n - 1)))
    nearest = [[[] for _ in range(patches)] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            distances = np.sqrt(((x[i][:, None, :] - x[j][None, :, :]) ** 2).sum(axis=-1))  # (G of i, G of j)
            for p in range(patches):
                nearest[i][p].append(distances[p].min())
    out = np.zeros((n, patches))
    for i in range(n):
        for p in range(patches):
            out[i, p] = sum(sorted(nearest[i][p])[:k]) / k
    return out


def naive_upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear with align_corners=True: output pixel y sits at y (gh - 1) / (H - 1) on the grid."""
    gh, gw = grid_map.shape
    height, width = size
    out = np.zeros(size)
    for y in range(height):
        sy = y * (gh - 1) / (height - 1) if height > 1 else 0.0
        y0 = min(int(np.floor(sy)), gh - 1)
        y1 = min(y0 + 1, gh - 1)
        wy = sy - y0
        for x in range(width):
            sx = x * (gw - 1) / (width - 1) if width > 1 else 0.0
            x0 = min(int(np.floor(sx)), gw - 1)
            x1 = min(x0 + 1, gw - 1)
            wx = sx - x0
            top = grid_map[y0, x0] * (1 - wx) + grid_map[y0, x1] * wx
            bottom = grid_map[y1, x0] * (1 - wx) + grid_map[y1, x1] * wx
            out[y, x] = top * (1 - wy) + bottom * wy
    return out


def naive_rscin(raw: np.ndarray, similarity: np.ndarray, ks=(1, 2, 3)) -> np.ndarray:
    """Min-max normalise, keep each row's k largest similarities, row-normalise, weight, average over k."""
    scores = (raw - raw.min()) / (raw.max() - raw.min())
    n = len(scores)
    results = []
    for k in ks:
        out = np.zeros(n)
        for i in range(n):
            keep = sorted(range(n), key=lambda j: -similarity[i, j])[: min(k, n)]
            out[i] = sum(similarity[i, j] * scores[j] for j in keep) / sum(similarity[i, j] for j in keep)
        results.append(out)
    return np.mean(results, axis=0)


def naive_musc(tokens: torch.Tensor, class_embeddings: torch.Tensor, grid, size, degrees=(1, 3, 5)):
    """(maps (N, H, W), raw scores (N,), RsCIN scores (N,)) from (N, L, G, C) tokens, all float64."""
    n, layers = tokens.shape[:2]
    per_degree = []
    for r in degrees:
        per_layer = [naive_msm(naive_lnamd(tokens[:, layer], grid, r)) for layer in range(layers)]
        per_degree.append(sum(per_layer) / layers)
    grid_maps = (sum(per_degree) / len(degrees)).reshape(n, *grid)
    maps = np.stack([naive_upsample(m, size) for m in grid_maps])
    raw = maps.reshape(n, -1).max(axis=1)
    emb = class_embeddings.double().numpy()
    return maps, raw, naive_rscin(raw, emb @ emb.T)
