"""``winclip watch --mode mutual`` in a subprocess: each new image is pooled with the images OUT kept."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from test_watch import POLL, Watch, csv_rows, png_bytes, put_by_rename, watches  # noqa: F401 (a fixture)


def test_watch_mutual_scores_a_new_image_against_the_kept_pool(
    tmp_path: Path,
    tiny_args: list[str],
    watches: list[Watch],  # noqa: F811
) -> None:
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        (folder / f"before_{i}.png").write_bytes(png_bytes(i))
    watch = Watch(folder, out, tiny_args, "--poll", POLL, "--mode", "mutual")
    watches.append(watch)
    watch.wait_rows(4)  # the backlog: one pool of four
    assert {row["pool"] for row in watch.rows} == {"1/1"} and {row["pool_size"] for row in watch.rows} == {4}

    put_by_rename(folder, "new.png", 100)
    watch.wait_rows(5)
    new = watch.rows[4]
    assert new["path"] == "new.png" and new["status"] == "ok"
    assert new["pool"] == "1/1 + 4 kept" and new["pool_size"] == 5  # not a pool of one
    assert new["label"] == "" and new["raw_score"] is not None
    assert watch.stop(signal.SIGTERM) == 0
    assert sorted(row["path"] for row in csv_rows(out)) == [*(f"before_{i}.png" for i in range(4)), "new.png"]
    kept = np.load(out / ".winclip" / "mutual-pool.npz", allow_pickle=False)
    assert list(kept["paths"]) == [*(f"before_{i}.png" for i in range(4)), "new.png"]  # each once
