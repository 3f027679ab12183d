"""The kept pool of --mode mutual: stored without pickle, bounded, entries valid only with their rows."""

from __future__ import annotations

import numpy as np

from winclip_cli.io.kept_pool import KeptPool, load_kept_pool, save_kept_pool


def pool(count: int, start: int = 0, layers=(0, 1), grid=(2, 3)) -> KeptPool:
    rng = np.random.default_rng(start)
    return KeptPool(
        tokens=rng.standard_normal((count, len(layers), grid[0] * grid[1], 4)).astype(np.float32),
        class_embeddings=rng.standard_normal((count, 5)).astype(np.float32),
        raw_scores=rng.random(count),
        paths=[f"img{start + i}.png" for i in range(count)],
        sha256=[f"{start + i:064x}" for i in range(count)],
        layers=tuple(layers),
        grid_size=grid,
    )


def test_save_and_load_round_trip_exactly(tmp_path):
    path = tmp_path / ".winclip" / "mutual-pool.npz"
    kept = pool(3)
    save_kept_pool(path, kept)
    with np.load(path, allow_pickle=False) as data:  # nothing in it needs pickle
        assert sorted(data.files) == sorted(
            ["tokens", "class_embeddings", "raw_scores", "paths", "sha256", "layers", "grid_size"]
        )
    loaded = load_kept_pool(path, (0, 1), (2, 3))
    assert loaded is not None
    assert np.array_equal(loaded.tokens, kept.tokens) and np.array_equal(loaded.raw_scores, kept.raw_scores)
    assert loaded.paths == kept.paths and loaded.sha256 == kept.sha256
    # made with other layers or another patch grid, or damaged: not used
    assert load_kept_pool(path, (0, 2), (2, 3)) is None and load_kept_pool(path, (0, 1), (3, 3)) is None
    path.write_bytes(b"damaged")
    assert load_kept_pool(path, (0, 1), (2, 3)) is None
    assert load_kept_pool(tmp_path / "none.npz", (0, 1), (2, 3)) is None
    save_kept_pool(path, kept.subset([]))  # an empty pool leaves no file
    assert not path.exists()


def test_newest_and_still_valid():
    kept = KeptPool.concat([pool(3), pool(2, start=3)])
    assert kept.newest(2).paths == ["img3.png", "img4.png"] and kept.newest(0).paths == []
    assert kept.newest(10).paths == kept.paths
    valid = {"img0.png": kept.sha256[0], "img2.png": "another file now", "img4.png": kept.sha256[4]}
    survivors = kept.still_valid(valid)
    assert survivors.paths == ["img0.png", "img4.png"]
    assert np.array_equal(survivors.tokens, kept.tokens[[0, 4]])


def test_a_long_scan_remembers_at_most_two_pools():
    from winclip_cli.jobs.mutual import MutualStream

    stream = MutualStream(session=None, reporter=None, pool_size=4)  # type: ignore[arg-type]
    for start in range(0, 40, 4):
        stream._remember(pool(4, start=start))
        assert sum(map(len, stream.scored_now)) <= 8
    after = stream.kept_after_run(pool(3, start=100))
    assert after is not None and after.paths == ["img36.png", "img37.png", "img38.png", "img39.png"]


def test_a_link_planted_at_the_kept_pool_is_never_followed(tmp_path):
    from winclip_cli.io.layout import OutputLayout

    out = tmp_path / "out"
    (out / ".winclip").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.npz"
    save_kept_pool(elsewhere, pool(2))
    before = elsewhere.read_bytes()
    target = OutputLayout(out).kept_pool_confined
    (out / ".winclip" / "mutual-pool.npz").symlink_to(elsewhere)
    assert load_kept_pool(target, (0, 1), (2, 3)) is None  # not read through the link
    save_kept_pool(target, pool(3, start=10))  # replaces the link itself
    assert elsewhere.read_bytes() == before
    loaded = load_kept_pool(target, (0, 1), (2, 3))
    assert loaded is not None and loaded.paths == ["img10.png", "img11.png", "img12.png"]
