"""The MuSc core: hand-computed small cases, and the fast blocked path equal to the naive one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from naive_musc import naive_features, naive_lnamd, naive_msm, naive_musc, naive_rscin, naive_upsample

from winclip_cli.core.musc import (
    MutualFeatureExtractor,
    NonFiniteFeaturesError,
    PoolFeatures,
    PoolTooSmallError,
    aggregate_neighbourhoods,
    default_layers,
    interval_mean,
    interval_size,
    mutual_grid_maps,
    mutual_scores,
    nearest_patch_distances,
    rescore_with_class_neighbours,
    rescore_with_similarity,
    score_against_pool,
    upsample_maps,
)


def random_images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 240, 240, generator=generator)


def random_pool(count: int, layers: int = 2, grid=(4, 4), width: int = 8, dim: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(count, layers, grid[0] * grid[1], width, generator=generator)
    embeddings = torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)
    return PoolFeatures(tokens=tokens, class_embeddings=embeddings, grid_size=grid)


@pytest.fixture(scope="module")
def tiny_pool(tiny_backbone) -> PoolFeatures:
    return MutualFeatureExtractor(tiny_backbone.model.visual).extract(random_images(6))


# ------------------------------------------------------------------------------------------------- features


def test_default_layers_are_musc_blocks():
    assert default_layers(12) == (2, 5, 8, 11)  # MuSc's --feature_layers for ViT-B (blocks 3, 6, 9, 12 from 1)
    assert default_layers(24) == (5, 11, 17, 23)  # and for ViT-L
    assert default_layers(2) == (0, 1)
    assert default_layers(1) == (0,)
    with pytest.raises(ValueError):
        default_layers(0)


def test_features_equal_block_by_block_pass(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = random_images(3, seed=1)
    extractor = MutualFeatureExtractor(visual)
    assert extractor.layers == (0, 1)
    pool = extractor.extract(images)
    tokens, embeddings = naive_features(visual, images, [0, 1])
    assert pool.tokens.shape == (3, 2, 225, 64)
    assert pool.grid_size == (15, 15)
    torch.testing.assert_close(pool.tokens, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.class_embeddings, embeddings, atol=1e-6, rtol=1e-5)
    assert torch.allclose(pool.class_embeddings.norm(dim=-1), torch.ones(3))


def test_explicit_layers(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = random_images(2, seed=2)
    pool = MutualFeatureExtractor(visual, layers=[1]).extract(images)
    tokens, _ = naive_features(visual, images, [1])
    torch.testing.assert_close(pool.tokens, tokens, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not blocks of this 2-block tower"):
        MutualFeatureExtractor(visual, layers=[2])


def test_features_of_a_bf16_tower_come_back_in_float32(tiny_backbone):
    import copy

    visual = tiny_backbone.model.visual
    images = random_images(2, seed=3)
    exact = MutualFeatureExtractor(visual).extract(images)
    reduced = MutualFeatureExtractor(copy.deepcopy(visual).to(torch.bfloat16)).extract(images)
    assert reduced.tokens.dtype == torch.float32 and reduced.class_embeddings.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: close to fp32, not equal
    assert (reduced.tokens - exact.tokens).abs().max().item() < 0.05 * exact.tokens.abs().max().item()
    assert not torch.equal(reduced.tokens, exact.tokens)


def test_bytes_per_image_of_the_default_architecture():
    pool = PoolFeatures(
        tokens=torch.empty(200, 4, 225, 896, device="meta"),
        class_embeddings=torch.empty(200, 640, device="meta"),
        grid_size=(15, 15),
    )
    assert pool.bytes_per_image == 4 * 225 * 896 * 4 + 640 * 4 == 3_228_160


def test_pool_features_select_and_concat():
    pool = random_pool(5)
    joined = PoolFeatures.concat([pool.select([3, 1]), pool.select(slice(0, 1))])
    assert torch.equal(joined.tokens, pool.tokens[[3, 1, 0]])
    assert torch.equal(joined.class_embeddings, pool.class_embeddings[[3, 1, 0]])
    with pytest.raises(ValueError, match="different patch grids"):
        PoolFeatures.concat([pool, random_pool(2, grid=(2, 8))])


# ---------------------------------------------------------------------------------------------------- LNAMD


@pytest.mark.parametrize("degree", [1, 3, 5])
def test_lnamd_equals_naive(degree):
    tokens = torch.randn(2, 20, 6, generator=torch.Generator().manual_seed(degree))
    fast = aggregate_neighbourhoods(tokens, (4, 5), degree)
    np.testing.assert_allclose(fast.double().numpy(), naive_lnamd(tokens, (4, 5), degree), atol=1e-6)


def test_lnamd_of_one_patch_is_layer_norm_then_unit_length():
    tokens = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])  # one image, 2 patches (a 1 x 2 grid), 2 channels
    out = aggregate_neighbourhoods(tokens, (1, 2), 1)
    # LayerNorm over all 4 values (mean 4, std sqrt(5)): patch 0 -> (-3, -1) / sqrt(5), then length 1
    expected = torch.tensor([[[-3.0, -1.0], [1.0, 3.0]]]) / np.sqrt(10.0)
    torch.testing.assert_close(out, expected)


def test_lnamd_refuses_even_degree():
    with pytest.raises(ValueError, match="odd"):
        aggregate_neighbourhoods(torch.randn(1, 4, 2), (2, 2), 2)


# ------------------------------------------------------------------------------------------------------ MSM


@pytest.mark.parametrize("block_elements", [1, 40 * 40, 10**9])
@pytest.mark.parametrize("queries", [None, 1, 4, 7])
def test_nearest_distances_equal_brute_force(block_elements, queries):
    features = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(3))
    fast = nearest_patch_distances(features, queries, block_elements)
    q = 7 if queries is None else queries
    assert fast.shape == (q, 5, 7)
    for i in range(q):
        for j in range(7):
            if i == j:
                assert torch.isinf(fast[i, :, j]).all()
            else:
                exact = (features[i][:, None] - features[j][None]).norm(dim=-1).amin(dim=1)
                torch.testing.assert_close(fast[i, :, j], exact, atol=1e-6, rtol=0)


def test_interval_size():
    assert interval_size(199) == (0, 59)  # a pool of 200: the nearest 59 of 199 other images
    assert interval_size(7) == (0, 2)
    assert interval_size(10) == (0, 3)
    assert interval_size(3) == (0, 1)  # int(0.9) = 0: the reference's empty mean; here the nearest image
    assert interval_size(1) == (0, 1)
    assert interval_size(10, (0.1, 0.3)) == (1, 3)
    with pytest.raises(PoolTooSmallError):
        interval_size(0)


def hand_pool() -> torch.Tensor:
    """8 images of 2 x 2 patches with 1-d features: image j is all 0.1 j, except patch 3 of image 0 at 5."""
    features = torch.tensor([[0.1 * j] * 4 for j in range(8)], dtype=torch.float64)[..., None]
    features[0, 3, 0] = 5.0
    return features


def test_msm_by_hand():
    distances = nearest_patch_distances(hand_pool().float())
    maps = interval_mean(distances)  # 7 others, k = int(0.3 * 7) = 2: the mean of the 2 smallest
    assert maps.dtype == torch.float64
    # image 0, patch 0 (value 0): distances 0.1 .. 0.7 to images 1 .. 7 -> (0.1 + 0.2) / 2
    assert maps[0, 0].item() == pytest.approx(0.15, abs=1e-6)
    # image 0, patch 3 (value 5): 4.9 .. 4.3 -> (4.3 + 4.4) / 2
    assert maps[0, 3].item() == pytest.approx(4.35, abs=1e-6)
    # image 3 (all 0.3): 0.3 to image 0 (its patch 0), then 0.2, 0.1, 0.1, 0.2, 0.3, 0.4 -> (0.1 + 0.1) / 2
    assert maps[3].tolist() == pytest.approx([0.1] * 4, abs=1e-6)
    # image 7 (all 0.7): 0.6 .. 0.1 to images 1 .. 6, 0.7 to image 0 -> (0.1 + 0.2) / 2
    assert maps[7].tolist() == pytest.approx([0.15] * 4, abs=1e-6)


def test_msm_equals_naive_with_a_full_sort():
    features = torch.randn(9, 6, 4, generator=torch.Generator().manual_seed(4))
    fast = interval_mean(nearest_patch_distances(features, block_elements=13 * 13))
    np.testing.assert_allclose(fast.numpy(), naive_msm(features), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- RsCIN


def test_rscin_by_hand():
    similarity = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.5], [0.2, 0.5, 1.0]])
    raw = torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64)  # normalised: 0, 1, 0.5
    out = rescore_with_similarity(raw, similarity)
    k1 = [0.0, 1.0, 0.5]  # each row keeps only itself
    k2 = [0.9 / 1.9, 1.0 / 1.9, (0.5 + 0.5) / 1.5]  # itself and its most similar other image
    k3 = [(0.9 + 0.1) / 2.1, (1.0 + 0.25) / 2.4, (0.5 + 0.5) / 1.7]  # every image
    expected = [(a + b + c) / 3 for a, b, c in zip(k1, k2, k3, strict=True)]
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_rscin_equals_naive():
    pool = random_pool(10, seed=5)
    raw = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fast = rescore_with_class_neighbours(raw, pool.class_embeddings)
    emb = pool.class_embeddings.double().numpy()
    np.testing.assert_allclose(fast.numpy(), naive_rscin(raw.numpy(), emb @ emb.T), atol=1e-6)


def test_rscin_with_equal_scores_and_a_small_pool():
    similarity = torch.tensor([[1.0, 0.3], [0.3, 1.0]])
    assert rescore_with_similarity(torch.tensor([0.5, 0.5]), similarity).tolist() == [0.0, 0.0]
    out = rescore_with_similarity(torch.tensor([1.0, 2.0]), similarity)  # k = 2 and 3 both keep both images
    assert out.tolist() == pytest.approx([(0 + 2 * 0.3 / 1.3) / 3, (1 + 2 * 1 / 1.3) / 3], abs=1e-6)


# ---------------------------------------------------------------------------------------------- whole method


def test_upsampling_equals_naive_bilinear_align_corners():
    grid = torch.rand(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fast = upsample_maps(grid, (7, 9))
    for i in range(2):
        np.testing.assert_allclose(fast[i].numpy(), naive_upsample(grid[i].numpy(), (7, 9)), atol=1e-12)


def test_mutual_scores_equal_naive_on_random_tensors():
    pool = random_pool(6, seed=7)
    fast = mutual_scores(pool, (9, 9), block_elements=2 * 16 * 2 * 16)
    maps, raw, rescored = naive_musc(pool.tokens, pool.class_embeddings, pool.grid_size, (9, 9))
    assert fast.grid_maps.dtype == torch.float64 and fast.raw_scores.dtype == torch.float64
    np.testing.assert_allclose(fast.upsample().numpy(), maps, atol=1e-6)
    np.testing.assert_allclose(fast.raw_scores.numpy(), raw, atol=1e-6)
    np.testing.assert_allclose(fast.scores.numpy(), rescored, atol=1e-6)


def test_mutual_scores_equal_naive_on_the_tiny_model(tiny_pool):
    fast = mutual_scores(tiny_pool, (240, 240))
    maps, raw, rescored = naive_musc(tiny_pool.tokens, tiny_pool.class_embeddings, (15, 15), (240, 240))
    assert fast.upsample().shape == (6, 240, 240)
    np.testing.assert_allclose(fast.upsample().numpy(), maps, atol=1e-6)
    np.testing.assert_allclose(fast.raw_scores.numpy(), raw, atol=1e-6)
    np.testing.assert_allclose(fast.scores.numpy(), rescored, atol=1e-6)
    assert fast.scores.min().item() >= 0 and fast.scores.max().item() <= 1


def test_permuting_the_pool_permutes_the_scores(tiny_pool):
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    # different block sizes as well: the pairs fall into different blocks in either run
    first = mutual_scores(tiny_pool, (240, 240), block_elements=(2 * 225) ** 2)
    second = mutual_scores(tiny_pool.select(order), (240, 240), block_elements=(4 * 225) ** 2)
    torch.testing.assert_close(second.grid_maps, first.grid_maps[order], atol=1e-6, rtol=0)
    torch.testing.assert_close(second.raw_scores, first.raw_scores[order], atol=1e-6, rtol=0)
    torch.testing.assert_close(second.scores, first.scores[order], atol=1e-6, rtol=0)


def test_a_pool_of_one_image_is_refused(tiny_pool):
    with pytest.raises(PoolTooSmallError, match="at least 2 images") as caught:
        mutual_scores(tiny_pool.select([0]), (240, 240))
    assert isinstance(caught.value, ValueError)


def test_a_pool_of_two_images(tiny_pool):
    pair = tiny_pool.select([0, 1])
    fast = mutual_scores(pair, (240, 240))
    maps, raw, rescored = naive_musc(pair.tokens, pair.class_embeddings, (15, 15), (240, 240))
    assert torch.isfinite(fast.grid_maps).all()
    np.testing.assert_allclose(fast.raw_scores.numpy(), raw, atol=1e-6)
    np.testing.assert_allclose(fast.scores.numpy(), rescored, atol=1e-6)
    assert sorted(fast.scores.tolist()) != [0.0, 0.0]


def test_new_images_against_a_kept_pool_equal_the_whole_pool(tiny_pool):
    whole = mutual_scores(tiny_pool, (240, 240))
    new, kept = tiny_pool.select([0, 1]), tiny_pool.select([2, 3, 4, 5])
    rescored_too = score_against_pool(new, kept, (240, 240))
    recorded = score_against_pool(new, kept, (240, 240), kept_raw_scores=whole.raw_scores[2:])
    for result in (rescored_too, recorded):
        torch.testing.assert_close(result.grid_maps, whole.grid_maps[:2], atol=1e-6, rtol=0)
        torch.testing.assert_close(result.raw_scores, whole.raw_scores[:2], atol=1e-6, rtol=0)
        torch.testing.assert_close(result.scores, whole.scores[:2], atol=1e-6, rtol=0)
    # only the new images' maps are computed: the kept images' rows are not
    assert mutual_grid_maps(PoolFeatures.concat([new, kept]), queries=2).shape == (2, 15, 15)


def test_new_images_without_kept_ones_are_a_pool_of_their_own(tiny_pool):
    new = tiny_pool.select([0, 1, 2])
    alone = score_against_pool(new, tiny_pool.select([]), (240, 240))
    whole = mutual_scores(new, (240, 240))
    torch.testing.assert_close(alone.scores, whole.scores, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="kept raw scores"):
        score_against_pool(new, tiny_pool.select([3, 4]), (240, 240), kept_raw_scores=torch.zeros(3))


def test_an_image_with_non_finite_features_is_named_not_scored():
    pool = random_pool(4)
    pool.tokens[2, 1, 5, 0] = float("nan")
    assert pool.finite().tolist() == [True, True, False, True]
    with pytest.raises(NonFiniteFeaturesError, match=r"pool images \[2\]"):
        mutual_scores(pool, (8, 8))
    assert torch.isfinite(mutual_scores(pool.select(pool.finite().nonzero().flatten()), (8, 8)).scores).all()


def test_pool_bounds_are_consecutive_balanced_and_never_leave_one_image_alone():
    from winclip_cli.jobs.mutual import pool_bounds

    assert pool_bounds(201, 200) == [(0, 101), (101, 201)]
    assert pool_bounds(200, 200) == [(0, 200)]
    assert pool_bounds(0, 200) == [] and pool_bounds(1, 200) == [(0, 1)]
    assert pool_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    for pool_size in range(3, 12):
        for count in range(2, 60):
            bounds = pool_bounds(count, pool_size)
            sizes = [stop - start for start, stop in bounds]
            assert [start for start, _ in bounds] == [0, *[stop for _, stop in bounds[:-1]]]  # consecutive
            assert sum(sizes) == count and max(sizes) <= pool_size and max(sizes) - min(sizes) <= 1
            assert min(sizes) >= 2 and len(bounds) == -(-count // pool_size)  # as few pools as fit
            assert pool_bounds(count, pool_size) == bounds  # deterministic
