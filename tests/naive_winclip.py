"""A deliberately naive WinCLIP, written straight from the method's definition, to check the fast path.

Everything is done the slow, obvious way: one window at a time through the visual transformer,
a Python loop over patches for the harmonic aggregation, the full similarity matrix for the
nearest neighbour. Used only by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_masks(grid: tuple[int, int], scale: int) -> list[list[int]]:
    """Patch indices of every scale x scale window, windows and patches both row-major."""
    height, width = grid
    windows = []
    for top in range(height - scale + 1):
        for left in range(width - scale + 1):
            windows.append([(top + dy) * width + (left + dx) for dy in range(scale) for dx in range(scale)])
    return windows


def naive_tokens(visual, images: torch.Tensor) -> torch.Tensor:
    """Tokens after the positional embedding, before ln_pre, via open_clip's own ``_embeds`` path."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    return x + visual.positional_embedding.to(x.dtype)


def naive_window_embedding(visual, tokens_one_image: torch.Tensor, window: list[int]) -> torch.Tensor:
    """The visual transformer run on ONE window: class token + the window's patch tokens."""
    index = torch.tensor([0] + [p + 1 for p in window])
    x = tokens_one_image[index][None]  # (1, L, C)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    x = visual.ln_post(x)
    pooled = x[:, 0]
    return (pooled @ visual.proj)[0]


def naive_image_embeddings(visual, images: torch.Tensor):
    """(image (N, D), patch tokens (N, G, C)) from open_clip's own forward with output_tokens."""
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = False
    return pooled, tokens


def naive_harmonic(window_scores: torch.Tensor, windows: list[list[int]], num_patches: int) -> torch.Tensor:
    """(N, W) -> (N, G) by a loop over patches."""
    out = torch.zeros(window_scores.shape[0], num_patches)
    for patch in range(num_patches):
        covering = [w for w, members in enumerate(windows) if patch in members]
        if not covering:
            continue
        scores = window_scores[:, covering]
        out[:, patch] = len(covering) / (1.0 / scores).sum(dim=1)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0)


def naive_class_score(embedding: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    sims = F.normalize(embedding, dim=-1) @ F.normalize(text, dim=-1).T
    return torch.softmax(sims / temperature, dim=-1)[..., 1]


def naive_association(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    sims = F.normalize(query, dim=-1) @ F.normalize(memory, dim=-1).T
    return (1 - sims).min(dim=-1).values / 2


def naive_winclip(visual, text: torch.Tensor, images: torch.Tensor, scales=(2, 3), references=None):
    """(image scores (N,), grid maps (N, gh, gw)) for zero-shot, or few-shot with reference images."""
    grid = tuple(visual.grid_size)
    num_patches = grid[0] * grid[1]
    masks = {s: naive_masks(grid, s) for s in scales}

    def windows_of(batch):
        tokens = naive_tokens(visual, batch)
        return {
            s: torch.stack([torch.stack([naive_window_embedding(visual, t, w) for w in masks[s]]) for t in tokens])
            for s in scales
        }

    with torch.no_grad():
        image_emb, patch_tokens = naive_image_embeddings(visual, images)
        window_emb = windows_of(images)
        image_scores = naive_class_score(image_emb, text)
        levels = [image_scores[:, None].expand(-1, num_patches)]
        for s in scales:
            levels.append(naive_harmonic(naive_class_score(window_emb[s], text), masks[s], num_patches))
        zero_shot = len(levels) / sum(1.0 / level for level in levels)
        if references is None:
            return image_scores, zero_shot.reshape(-1, *grid)
        _, ref_patches = naive_image_embeddings(visual, references)
        ref_windows = windows_of(references)
        few = [naive_association(patch_tokens, ref_patches.reshape(-1, ref_patches.shape[-1]))]
        for s in scales:
            memory = ref_windows[s].reshape(-1, ref_windows[s].shape[-1])
            few.append(naive_harmonic(naive_association(window_emb[s], memory), masks[s], num_patches))
        few_shot = torch.stack(few).mean(dim=0)
        maps = (zero_shot + few_shot) / 2
        scores = (image_scores + few_shot.amax(dim=1)) / 2
        return scores, maps.reshape(-1, *grid)
