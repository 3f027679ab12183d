"""The WinCLIP core: hand-computed small cases, and the fast batched path equal to the naive one."""

from __future__ import annotations

import math

import pytest
import torch

from naive_winclip import naive_masks, naive_tokens, naive_winclip, naive_window_embedding
from winclip_cli.core.winclip import (
    ReferenceMemory,
    WinClipScorer,
    WindowEncoder,
    association_scores,
    class_scores,
    coverage_matrix,
    harmonic_aggregation,
    harmonic_mean,
    nearest_similarity,
    window_patch_indices,
)


def test_window_indices_on_a_3x3_grid():
    assert window_patch_indices((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_patch_indices((3, 3), 3).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert window_patch_indices((2, 3), 1).tolist() == [[0], [1], [2], [3], [4], [5]]


def test_window_indices_match_the_definition_on_the_default_grid():
    for scale in (2, 3):
        assert window_patch_indices((15, 15), scale).tolist() == naive_masks((15, 15), scale)
    assert window_patch_indices((15, 15), 2).shape == (196, 4)
    assert window_patch_indices((15, 15), 3).shape == (169, 9)


def test_window_larger_than_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        window_patch_indices((3, 3), 4)


def test_coverage_counts():
    cover = coverage_matrix(window_patch_indices((3, 3), 2), 9)
    assert cover.sum(dim=0).tolist() == [1, 2, 1, 2, 4, 2, 1, 2, 1]


def test_harmonic_aggregation_by_hand():
    cover = coverage_matrix(window_patch_indices((3, 3), 2), 9)
    scores = torch.tensor([[0.2, 0.4, 0.5, 1.0]])
    out = harmonic_aggregation(scores, cover)[0]
    assert out[0].item() == pytest.approx(0.2)  # only window 0
    assert out[1].item() == pytest.approx(2 / (1 / 0.2 + 1 / 0.4))  # windows 0, 1
    assert out[4].item() == pytest.approx(4 / (5 + 2.5 + 2 + 1))  # all four
    assert out[8].item() == pytest.approx(1.0)  # only window 3


def test_harmonic_aggregation_with_a_zero_score():
    cover = coverage_matrix(window_patch_indices((3, 3), 2), 9)
    out = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), cover)[0]
    assert out[0].item() == 0.0 and out[1].item() == 0.0 and out[4].item() == 0.0
    assert out[2].item() == pytest.approx(0.5)
    assert not torch.isnan(out).any()


def test_harmonic_aggregation_nan_stays_local():
    cover = coverage_matrix(window_patch_indices((3, 3), 2), 9)
    out = harmonic_aggregation(torch.tensor([[float("nan"), 0.5, 0.5, 0.5]]), cover)[0]
    assert out[[0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]  # covered by the NaN window
    assert out[[2, 5, 6, 7, 8]].tolist() == pytest.approx([0.5] * 5)


def test_harmonic_mean_by_hand():
    stack = torch.tensor([[0.5], [0.25], [1.0]])
    assert harmonic_mean(stack)[0].item() == pytest.approx(3 / (2 + 4 + 1))
    assert harmonic_mean(torch.tensor([[0.0], [0.5]]))[0].item() == 0.0


def test_class_scores_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert class_scores(torch.tensor([1.0, 1.0]), text).item() == pytest.approx(0.5)
    expected = 1 / (1 + math.exp(1 / 0.07))
    assert class_scores(torch.tensor([[3.0, 0.0]]), text)[0].item() == pytest.approx(expected, rel=1e-4)
    assert class_scores(torch.tensor([[0.0, 2.0]]), text)[0].item() == pytest.approx(1 - expected, rel=1e-6)


def test_association_scores_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    queries = torch.tensor([[5.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    out = association_scores(queries, memory)
    assert out[0].item() == pytest.approx(0.0, abs=1e-7)  # same direction as a memory row
    assert out[1].item() == pytest.approx(0.5)  # orthogonal to one, opposite to the other: best cos 0
    assert out[2].item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_nearest_neighbour_equals_one_shot(chunk):
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 11, 16, generator=gen)
    memory = torch.randn(300, 16, generator=gen)
    full = (torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(memory, dim=-1).T).amax(-1)
    assert torch.allclose(nearest_similarity(queries, memory, chunk_size=chunk), full, atol=1e-6)


def test_empty_memory_is_refused():
    with pytest.raises(ValueError, match="empty"):
        nearest_similarity(torch.randn(2, 4), torch.zeros(0, 4))


# ------------------------------------------------------------------------------- the real (tiny) transformer


@pytest.fixture(scope="module")
def visual(tiny_backbone):
    return tiny_backbone.model.visual


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(2))


def test_batched_windows_equal_one_window_at_a_time(visual, images):
    encoder = WindowEncoder(visual, scales=(2, 3), max_window_tokens=1000)  # small chunks: chunking is exercised
    with torch.no_grad():
        emb = encoder.encode(images)
        tokens = naive_tokens(visual, images)
        for scale_index, scale in enumerate((2, 3)):
            windows = naive_masks(visual.grid_size, scale)
            for n in range(images.shape[0]):
                for w in (0, 1, 13, 14, len(windows) // 2, len(windows) - 1):
                    expected = naive_window_embedding(visual, tokens[n], windows[w])
                    assert torch.allclose(emb.windows[scale_index][n, w], expected, atol=1e-5), (scale, n, w)


def test_full_image_path_equals_open_clip_forward(visual, images):
    encoder = WindowEncoder(visual)
    with torch.no_grad():
        emb = encoder.encode(images)
        visual.output_tokens = True
        try:
            pooled, tokens = visual(images)
        finally:
            visual.output_tokens = False
    assert torch.allclose(emb.image, pooled, atol=1e-5)
    assert torch.allclose(emb.patches, tokens, atol=1e-5)
    assert emb.patches.shape == (2, 225, 64)


def test_windows_do_not_attend_across_windows_or_images(visual, images):
    """Changing one patch changes exactly the windows that contain it, in that image only.

    This is what breaks when tokens are permuted to (L, N, D) for a batch-first transformer.
    """
    encoder = WindowEncoder(visual, scales=(2,))
    changed = images.clone()
    changed[0, :, 0:16, 0:16] += 1.0  # patch 0 of image 0
    with torch.no_grad():
        before = encoder.encode(images).windows[0]
        after = encoder.encode(changed).windows[0]
    moved = (before - after).abs().amax(dim=-1) > 1e-6  # (N, W)
    assert moved[0].nonzero().flatten().tolist() == [0]  # only window 0 holds patch 0
    assert not moved[1].any()


def test_zero_shot_scores_equal_the_naive_definition(tiny_backbone, images):
    text = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    scorer = WinClipScorer(tiny_backbone.model.visual, text)
    scores, maps = scorer.score(images)
    expected_scores, expected_grid = naive_winclip(tiny_backbone.model.visual, text, images)
    assert torch.allclose(scores, expected_scores, atol=1e-5)
    grid = scorer.score_embeddings(scorer.embed(images)).grid_maps
    assert torch.allclose(grid, expected_grid, atol=1e-5)
    assert maps.shape == (2, 240, 240)
    expected_maps = torch.nn.functional.interpolate(expected_grid[:, None], size=(240, 240), mode="bilinear")[:, 0]
    assert torch.allclose(maps, expected_maps, atol=1e-5)


def test_few_shot_scores_equal_the_naive_definition(tiny_backbone, images):
    visual = tiny_backbone.model.visual
    text = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    references = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(5))
    scorer = WinClipScorer(visual, text)
    scorer.memory = ReferenceMemory.from_embeddings(scorer.embed(references))
    scorer.nn_chunk_size = 100  # force the chunked search
    scores = scorer.score_embeddings(scorer.embed(images))
    expected_scores, expected_grid = naive_winclip(visual, text, images, references=references)
    assert torch.allclose(scores.image, expected_scores, atol=1e-5)
    assert torch.allclose(scores.grid_maps, expected_grid, atol=1e-5)


def test_a_reference_scores_zero_against_a_memory_holding_it(tiny_backbone, images):
    text = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    scorer = WinClipScorer(tiny_backbone.model.visual, text)
    emb = scorer.embed(images)
    scorer.memory = ReferenceMemory.from_embeddings(emb)
    few_shot = scorer._few_shot_maps(emb)
    assert few_shot.abs().max().item() < 1e-6


def test_harmonic_mean_is_zero_where_an_entry_is_nan():
    stack = torch.tensor([[0.5, float("nan")], [0.25, 0.5]])
    result = harmonic_mean(stack)
    assert result[0].item() == pytest.approx(2 / (2 + 4))
    assert result[1].item() == 0.0


def test_vision_tower_without_open_clip_pooling_is_refused(visual):
    from torch import nn

    from winclip_cli.core.winclip import WindowEncoder

    tower = nn.Module()  # every part WinCLIP reads, but not open_clip 3.x's _pool
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post"):
        setattr(tower, name, getattr(visual, name))
    with pytest.raises(TypeError, match="open_clip 3.x VisionTransformer; this visual tower has no '_pool'"):
        WindowEncoder(tower)
