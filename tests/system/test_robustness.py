"""Failure paths found in review: crafted inputs, unwritable outputs, damaged state, edge thresholds."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from conftest import SAMPLE_DATA
from helpers import invoke
from winclip_cli.io.outputs import CSV_COLUMNS, read_results_csv
from winclip_cli.jobs.write import RowContext

GOOD = SAMPLE_DATA / "fabric" / "good"


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_labels_are_decided_on_the_written_values():
    ctx = RowContext(threshold=0.5, threshold_source="--threshold", mode="zero-shot")
    assert ctx.label(0.5000004) == "normal"  # written as 0.500000, equal to the threshold: not over it
    assert ctx.label(0.5000006) == "anomalous"  # written as 0.500001


def test_merge_never_reads_or_writes_outside_its_folders(tmp_path, tiny_args):
    shard = tmp_path / "shard"
    assert invoke(["scan", str(GOOD), "--out", str(shard), "-q", *tiny_args]).exit_code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the merged folder")
    rows = read_results_csv(shard / "scores.csv")
    rows[0]["heatmap"] = "../secret.txt"
    rows[1]["heatmap"] = str(secret)
    with open(shard / "scores.csv", "w", newline="", encoding="utf-8") as handle:
        import csv

        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    # a symlinked heatmap pointing outside is not followed either
    link = shard / "heatmaps" / "textile_0003.jpg.png"
    link.unlink()
    link.symlink_to(secret)
    merged = tmp_path / "nested" / "merged"
    result = invoke(["merge", str(shard), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["merged"]
    assert not any("secret" in p.read_bytes().decode("latin-1") for p in merged.rglob("*") if p.is_file())
    merged_rows = read_results_csv(merged / "scores.csv")
    assert [r["heatmap"] for r in merged_rows][:2] == ["heatmaps/textile_0001.jpg.png", "heatmaps/textile_0002.jpg.png"]
    assert not (merged / "heatmaps" / "textile_0003.jpg.png").exists()
    # merging again leaves no temporary links behind
    assert invoke(["merge", str(shard), "--out", str(merged)]).exit_code == 0
    assert not list(merged.rglob("*.tmp"))


def test_unwritable_heatmaps_keep_the_score(tmp_path, tiny_args):
    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmaps").write_text("a file where the heatmap folder should be")
    result = invoke(["scan", str(GOOD), "--out", str(out), "--threshold", "0", "--fail-on-anomaly", *tiny_args])
    assert result.exit_code == 1  # the anomalies are still reported
    rows = read_results_csv(out / "scores.csv")
    assert len(rows) == 4
    for row in rows:
        assert row["status"] == "ok" and row["score"] and row["label"] == "anomalous"
        assert row["heatmap"] == "" and row["error"].startswith("cannot write outputs")
    result = invoke(["scan", str(GOOD), "--out", str(tmp_path / "out"), "--threshold", "1", "-q", *tiny_args])
    assert result.exit_code == 3  # outputs missing: the run is not clean


def test_out_that_is_a_file_and_bad_threshold_fail_fast(tmp_path, tiny_args):
    target = tmp_path / "file"
    target.write_text("x")
    assert "not a folder" in one_line_error(invoke(["scan", str(GOOD), "--out", str(target), *tiny_args]))
    result = invoke(["scan", str(GOOD), "--threshold", "abc", "--weights", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "--threshold takes" in one_line_error(result)  # before any model


def test_crafted_memory_metadata_is_refused(tmp_path, tiny_args):
    refs = tmp_path / "refs.npz"
    assert invoke(["build-refs", str(GOOD), "--out", str(refs), "-q", *tiny_args]).exit_code == 0
    with np.load(refs) as data:
        arrays = {name: data[name] for name in data.files}
    for change in ({"references": [1, 2, 3, 4]}, {"grid_size": [2]}, {"references": [{"entries": "x"}] * 4}):
        metadata = {**json.loads(str(arrays["metadata"])), **change}
        bad = tmp_path / "bad.npz"
        np.savez(bad, **{**arrays, "metadata": np.array(json.dumps(metadata))})
        result = invoke(["scan", str(GOOD), "--refs", str(bad), "--out", str(tmp_path / "o"), *tiny_args])
        assert result.exit_code == 2, change
        one_line_error(result)


def test_a_damaged_run_state_is_set_aside(tmp_path, tiny_args):
    out = tmp_path / "out"
    assert invoke(["scan", str(GOOD), "--out", str(out), "-q", *tiny_args]).exit_code == 0
    (out / ".winclip" / "state.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (out / ".winclip" / f"state.sqlite{suffix}").unlink(missing_ok=True)
    result = invoke(["scan", str(GOOD), "--out", str(out), "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "damaged" in result.stderr
    assert len(read_results_csv(out / "scores.csv")) == 4
    assert list((out / ".winclip").glob("state.corrupt-*.sqlite"))


def test_explicit_threshold_overrides_a_mismatched_calibration(tmp_path, tiny_args):
    calibration = tmp_path / "cal.json"
    assert (
        invoke(["calibrate", str(GOOD), "--out", str(calibration), "--class", "fabric", "-q", *tiny_args]).exit_code
        == 0
    )
    out = tmp_path / "out"
    result = invoke(
        [
            "scan",
            str(GOOD),
            "--calibration",
            str(calibration),
            "--class",
            "bottle",
            "--threshold",
            "0.3",
            "--out",
            str(out),
            *tiny_args,
        ]
    )
    assert result.exit_code == 0 and "--threshold 0.3" in result.stderr
    rows = read_results_csv(out / "scores.csv")
    assert {r["threshold"] for r in rows} == {"0.300000"} and {r["anomalous_area"] for r in rows} == {""}


def test_incremental_scan_of_an_emptied_folder_drops_its_rows(tmp_path, tiny_args):
    folder = tmp_path / "camera"
    shutil.copytree(GOOD, folder)
    out = tmp_path / "out"
    assert invoke(["scan", str(folder), "--out", str(out), "--incremental", "-q", *tiny_args]).exit_code == 0
    for path in folder.iterdir():
        path.unlink()
    result = invoke(["scan", str(folder), "--out", str(out), "--incremental", "-q", *tiny_args])
    assert result.exit_code == 0, result.output
    assert read_results_csv(out / "scores.csv") == []
    assert not list((out / "heatmaps").rglob("*.png"))


def test_too_many_tiles_is_a_row_not_a_crash(tmp_path, tiny_args):
    folder = tmp_path / "big"
    folder.mkdir()
    # 240 px tiles (the smallest allowed) overlapping by 0.9: 75 x 75 = 5625 tiles, over the limit
    Image.new("RGB", (2000, 2000), (120, 120, 120)).save(folder / "wide.png")
    out = tmp_path / "out"
    result = invoke(
        ["scan", str(folder), "--tile", "240", "--tile-overlap", "0.9", "--out", str(out), "-q", *tiny_args]
    )
    assert result.exit_code == 3
    (row,) = read_results_csv(out / "scores.csv")
    assert row["status"] == "error" and "tiles" in row["error"] and "--tile" in row["error"]


def test_merge_warns_about_missing_shards(tmp_path, tiny_args):
    for k in (1, 3):
        args = ["scan", str(GOOD), "--shard", f"{k}/3", "--out", str(tmp_path / f"s{k}"), "-q", *tiny_args]
        assert invoke(args).exit_code == 0
    result = invoke(["merge", str(tmp_path / "s1"), str(tmp_path / "s3"), "--out", str(tmp_path / "m")])
    # merged, but no complete result: exit 3, as a scan that could not read every file (issue 22)
    assert result.exit_code == 3 and "shards 2 of 3 are missing" in result.stderr
    assert (tmp_path / "m" / "scores.csv").is_file()


def test_banded_overlay_equals_the_whole_image_formula():
    from winclip_cli.io.outputs import LUT, overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (700, 9, 3), dtype=np.uint8)  # taller than one band of rows
    scores = rng.random((700, 9)).astype(np.float32)
    index = np.trunc((scores.astype(np.float64) * 255 + 0.5).astype(np.float32)).astype(np.intp)
    expected = (image.astype(np.int32) + LUT[index]) // 2  # the mean rounded down
    assert np.array_equal(overlay(image, scores), expected.astype(np.uint8))


def test_pixel_gate_admits_one_huge_item_and_holds_others_back():
    import threading

    from winclip_cli.jobs.write import PixelGate

    gate = PixelGate(100)
    gate.acquire(500)  # alone: admitted although over capacity
    entered = threading.Event()

    def second():
        gate.acquire(10)
        entered.set()

    worker = threading.Thread(target=second)
    worker.start()
    assert not entered.wait(0.2)  # held back while the huge one is in flight
    gate.release(500)
    assert entered.wait(5)
    worker.join()
    assert gate.used == 10


def test_a_half_written_csv_is_rebuilt_from_the_state(tmp_path, tiny_args):
    out = tmp_path / "out"
    assert invoke(["scan", str(GOOD), "--out", str(out), "--incremental", "-q", *tiny_args]).exit_code == 0
    complete = (out / "scores.csv").read_text()
    (out / "scores.csv").write_text(complete[: len(complete) // 2])  # as a crash mid-write would leave it
    result = invoke(["scan", str(GOOD), "--out", str(out), "--incremental", "-q", *tiny_args])
    assert result.exit_code == 0
    assert json.loads((out / "run.json").read_text())["scored"] == 0
    assert (out / "scores.csv").read_text() == complete
