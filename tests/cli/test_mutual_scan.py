"""`winclip scan --mode mutual` end to end: the rows equal MuSc computed directly on the same tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import SAMPLE_DATA
from helpers import invoke
from winclip_cli.io.outputs import CSV_COLUMNS, read_results_csv

SAMPLE_TEST = SAMPLE_DATA / "fabric" / "test"


def sample_files() -> list[Path]:
    return sorted(SAMPLE_TEST.rglob("*.jpg"), key=lambda p: p.relative_to(SAMPLE_TEST).as_posix())


def direct_musc(tiny_backbone, files: list[Path]):
    """MuSc by hand on the files' preprocessed tensors: the scan's preprocessing, core.musc's scorer."""
    from winclip_cli.core.musc import MutualFeatureExtractor, mutual_scores
    from winclip_cli.io.images import load_image, preprocess
    from winclip_cli.jobs.decode import Preprocessing
    from winclip_cli.spec import InputSpec

    prep = Preprocessing.for_backbone(tiny_backbone, InputSpec())
    batch = torch.stack([preprocess(load_image(f), prep.size, prep.mean, prep.std) for f in files])
    pool = MutualFeatureExtractor(tiny_backbone.model.visual).extract(batch)
    return mutual_scores(pool, prep.size)


def full_map(scores, index: int, height: int, width: int) -> np.ndarray:
    from winclip_cli.core.musc import upsample_maps
    from winclip_cli.jobs.maps import upsample_grid

    model_map = upsample_maps(scores.grid_maps[index : index + 1], scores.image_size)[0].float()
    return upsample_grid(model_map, height, width)


def scan(tmp_path: Path, folder: Path, tiny_args: list[str], *extra: object, name: str = "out"):
    out = tmp_path / name
    result = invoke(["scan", folder, "--mode", "mutual", "--out", out, "--save-maps", *tiny_args, *extra])
    return result, out


def test_mutual_scan_equals_musc_on_the_same_tensors(tmp_path, tiny_args, tiny_backbone):
    result, out = scan(tmp_path, SAMPLE_TEST, tiny_args)
    assert result.exit_code == 0, result.output
    rows = read_results_csv(out / "scores.csv")
    files = sample_files()
    assert [row["path"] for row in rows] == [f.relative_to(SAMPLE_TEST).as_posix() for f in files]
    assert list(rows[0]) == list(CSV_COLUMNS)
    expected = direct_musc(tiny_backbone, files)
    for i, row in enumerate(rows):
        assert row["status"] == "ok" and row["mode"] == "mutual" and row["error"] == ""
        assert float(row["score"]) == pytest.approx(float(expected.scores[i]), abs=1e-6)
        assert float(row["raw_score"]) == pytest.approx(float(expected.raw_scores[i]), abs=1e-6)
        assert row["pool"] == "1/1" and row["pool_size"] == str(len(files))
        # no threshold without a calibration: no label rather than one from a number of another scale
        assert row["label"] == "" and row["threshold"] == "" and row["threshold_source"].startswith("none")
        height, width = int(row["height"]), int(row["width"])
        written = tifffile.imread(out / "maps" / (row["path"] + ".tiff"))
        assert np.abs(written - full_map(expected, i, height, width)).max() <= 1e-6
        assert float(row["max_pixel_score"]) == pytest.approx(float(written.max()), abs=1e-6)
        assert (out / row["heatmap"]).is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["mode"] == "mutual" and info["pool_size"] == 200 and info["layers"] == [0, 1]
    assert info["pools"] == [
        {
            "pool": "1/1",
            "size": len(files),
            "files": len(files),
            "kept": 0,
            "first": rows[0]["path"],
            "last": rows[-1]["path"],
        }
    ]
    assert info["threshold"] is None
    assert f"pool 1/1 holds {len(files)} images" in result.stderr  # fewer than 10: warned
    assert f"0 normal, {len(files)} without a label (no threshold)" in result.stderr


def test_permuting_and_renaming_files_permutes_rows_only(tmp_path, tiny_args):
    files = sample_files()
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, source in enumerate(files):  # reversed path order, other names
        shutil.copy(source, renamed / f"part_{len(files) - i:02d}.jpg")
    first, out_a = scan(tmp_path, SAMPLE_TEST, tiny_args, name="a")
    second, out_b = scan(tmp_path, renamed, tiny_args, "--batch-size", 3, name="b")
    assert first.exit_code == second.exit_code == 0
    by_hash = {row["sha256"]: row for row in read_results_csv(out_a / "scores.csv")}
    rows_b = read_results_csv(out_b / "scores.csv")
    assert sorted(by_hash) == sorted(row["sha256"] for row in rows_b)
    for row in rows_b:
        same = by_hash[row["sha256"]]
        for column in ("score", "raw_score", "max_pixel_score"):
            assert float(row[column]) == pytest.approx(float(same[column]), abs=1e-6)
        map_a = tifffile.imread(out_a / "maps" / (same["path"] + ".tiff"))
        map_b = tifffile.imread(out_b / "maps" / (row["path"] + ".tiff"))
        assert np.abs(map_a - map_b).max() <= 1e-6


def test_an_unreadable_file_gets_an_error_row_and_joins_no_pool(tmp_path, tiny_args, tiny_backbone):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE_TEST, folder)
    (folder / "global" / "broken.png").write_bytes(b"not an image at all")
    result, out = scan(tmp_path, folder, tiny_args)
    assert result.exit_code == 3, result.output  # a file could not be read: the run is incomplete
    rows = {row["path"]: row for row in read_results_csv(out / "scores.csv")}
    broken = rows.pop("global/broken.png")
    assert broken["status"] == "error" and broken["error"] and broken["pool"] == "" and broken["raw_score"] == ""
    files = sample_files()
    expected = direct_musc(tiny_backbone, files)  # the pool of the readable files only
    for i, source in enumerate(files):
        row = rows[source.relative_to(SAMPLE_TEST).as_posix()]
        assert row["pool_size"] == str(len(files))
        assert float(row["score"]) == pytest.approx(float(expected.scores[i]), abs=1e-6)
        assert float(row["raw_score"]) == pytest.approx(float(expected.raw_scores[i]), abs=1e-6)


def test_a_pool_left_with_one_image_gives_it_an_error_row(tmp_path, tiny_args):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(sample_files()[0], folder / "a.jpg")
    (folder / "b.png").write_bytes(b"broken")
    result, out = scan(tmp_path, folder, tiny_args)
    assert result.exit_code == 3, result.output
    rows = {row["path"]: row for row in read_results_csv(out / "scores.csv")}
    assert rows["a.jpg"]["status"] == "error" and "needs at least 2 images" in rows["a.jpg"]["error"]
    assert rows["a.jpg"]["pool"] == "1/1" and rows["a.jpg"]["pool_size"] == "1"
    assert rows["b.png"]["status"] == "error"


def test_pools_of_at_most_pool_size_each_scored_on_its_own(tmp_path, tiny_args, tiny_backbone):
    files = sample_files()  # 6 files, pools of at most 4: 3 + 3
    result, out = scan(tmp_path, SAMPLE_TEST, tiny_args, "--pool-size", 4)
    assert result.exit_code == 0, result.output
    rows = read_results_csv(out / "scores.csv")
    assert [row["pool"] for row in rows] == ["1/2"] * 3 + ["2/2"] * 3
    assert {row["pool_size"] for row in rows} == {"3"}
    for start in (0, 3):
        expected = direct_musc(tiny_backbone, files[start : start + 3])
        for i in range(3):
            assert float(rows[start + i]["score"]) == pytest.approx(float(expected.scores[i]), abs=1e-6)
            assert float(rows[start + i]["raw_score"]) == pytest.approx(float(expected.raw_scores[i]), abs=1e-6)
    pools = json.loads((out / "run.json").read_text())["pools"]
    expected_pools = [("1/2", 3, rows[0]["path"]), ("2/2", 3, rows[3]["path"])]
    assert [(p["pool"], p["size"], p["first"]) for p in pools] == expected_pools


def test_the_threshold_applies_to_the_raw_score(tmp_path, tiny_args):
    first, out = scan(tmp_path, SAMPLE_TEST, tiny_args, "--threshold", "1.5", "--heatmaps", "none", name="high")
    assert first.exit_code == 0, first.output
    rows = read_results_csv(out / "scores.csv")
    raw = sorted(float(row["raw_score"]) for row in rows)
    middle = (raw[2] + raw[3]) / 2  # three above, three below
    result, out = scan(
        tmp_path, SAMPLE_TEST, tiny_args, "--threshold", f"{middle:.6f}", "--fail-on-anomaly", name="middle"
    )
    assert result.exit_code == 1  # anomalous rows with --fail-on-anomaly
    rows = read_results_csv(out / "scores.csv")
    for row in rows:
        assert row["label"] == ("anomalous" if float(row["raw_score"]) > middle else "normal")
    assert sum(row["label"] == "anomalous" for row in rows) == 3
    # the image ranked last of the pool (score near 1) is normal when its raw score is under the threshold
    assert all(row["label"] == "normal" for row in read_results_csv(tmp_path / "high" / "scores.csv"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "few-shot"], "--mode few-shot needs a reference memory"),
        (["--mode", "mutual", "--refs", "refs.npz"], "--mode mutual takes no --refs"),
        (["--mode", "zero-shot", "--refs", "refs.npz"], "--mode zero-shot takes no --refs"),
        (["--mode", "musc"], "--mode takes zero-shot, few-shot, mutual"),
        (["--mode", "mutual", "--tile", "240"], "takes no --tile"),
        (["--mode", "mutual", "--pool-size", "2"], "--pool-size must be at least 3"),
        (["--mode", "mutual", "--layers", "2,x"], "--layers takes block numbers"),
        (["--mode", "mutual", "--fail-on-anomaly"], "--fail-on-anomaly with --mode mutual needs a threshold"),
        (["--mode", "mutual", "--threshold", "2.5"], "--threshold must be between 0 and 2"),
        (["--threshold", "1.5"], "--threshold must be between 0 and 1"),
    ],
)
def test_mode_mistakes_are_one_line_errors_before_the_model(tmp_path, extra, message):
    (tmp_path / "refs.npz").write_bytes(b"")  # never opened: the mistake is found first
    result = invoke(["scan", SAMPLE_TEST, "--out", tmp_path / "out", "--model", "no-such-model", *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_layers_beyond_the_tower_are_refused(tmp_path, tiny_args):
    result, _ = scan(tmp_path, SAMPLE_TEST, tiny_args, "--layers", "0,5")
    assert result.exit_code == 2
    assert "--layers 0,5" in result.output and "2-block tower" in result.output


def test_calibrate_mutual_takes_the_threshold_on_raw_scores_and_modes_do_not_mix(tmp_path, tiny_args, tiny_backbone):
    good = SAMPLE_DATA / "fabric" / "good"
    good_files = sorted(good.rglob("*.jpg"), key=lambda p: p.relative_to(good).as_posix())
    calibration = tmp_path / "mutual.json"
    result = invoke(["calibrate", good, "--mode", "mutual", "--out", calibration, *tiny_args])
    assert result.exit_code == 0, result.output
    stored = json.loads(calibration.read_text())
    assert stored["fingerprint"]["mode"] == "mutual" and stored["fingerprint"]["layers"] == [0, 1]
    expected = direct_musc(tiny_backbone, good_files)
    # 4 good images cannot support fpr 0.01: the threshold is the highest raw score seen
    assert stored["calibration"]["threshold"] == pytest.approx(float(expected.raw_scores.max()), abs=1e-9)
    result, out = scan(tmp_path, SAMPLE_TEST, tiny_args, "--calibration", calibration)
    assert result.exit_code == 0, result.output
    threshold = stored["calibration"]["threshold"]
    for row in read_results_csv(out / "scores.csv"):
        assert row["threshold_source"].startswith("calibrated")
        assert row["label"] == ("anomalous" if float(row["raw_score"]) > threshold else "normal")
    # thresholds do not carry across modes, either way
    zero_shot = tmp_path / "zero.json"
    assert invoke(["calibrate", good, "--out", zero_shot, "-q", *tiny_args]).exit_code == 0
    refused, _ = scan(tmp_path, SAMPLE_TEST, tiny_args, "--calibration", zero_shot, name="refused")
    assert refused.exit_code == 2 and "thresholds do not carry across modes" in refused.output
    refused = invoke(["scan", SAMPLE_TEST, "--out", tmp_path / "z", "--calibration", calibration, *tiny_args])
    assert refused.exit_code == 2 and "`winclip calibrate` without --mode mutual" in refused.output


def test_eval_mutual_measures_musc_final_scores(tmp_path, tiny_args, tiny_backbone):
    from test_decisions import make_mvtec

    from winclip_cli.core.metrics import image_auroc

    root = tmp_path / "mvtec"
    make_mvtec(root)
    out = tmp_path / "eval"
    result = invoke(["eval", root, "--mode", "mutual", "--out", out, *tiny_args])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    assert document["mode"] == "mutual" and document["pool_size"] == 200
    for category in document["categories"]:
        test = sorted((root / category["name"] / "test").rglob("*.png"), key=str)
        labels = np.array([0 if path.parent.name == "good" else 1 for path in test])
        expected = direct_musc(tiny_backbone, test)
        assert category["images"] == len(test) and category["references"] == []
        assert category["metrics"]["image_auroc"] == pytest.approx(
            image_auroc(labels, expected.scores.double().numpy()), abs=1e-9
        )
        assert category["metrics"]["pixel_auroc"] is not None
    refused = invoke(["eval", root, "--mode", "mutual", "--k-shot", "2", "--out", out, *tiny_args])
    assert refused.exit_code == 2 and "--mode mutual takes no --k-shot" in refused.output


def test_incremental_runs_score_new_images_against_the_kept_pool(tmp_path, tiny_args, tiny_backbone):
    from winclip_cli.core.musc import MutualFeatureExtractor, score_against_pool
    from winclip_cli.io.images import load_image, preprocess
    from winclip_cli.jobs.decode import Preprocessing
    from winclip_cli.spec import InputSpec

    files = sample_files()
    folder = tmp_path / "line"
    folder.mkdir()
    for i, source in enumerate(files[:4]):
        shutil.copy(source, folder / f"a{i}.jpg")
    first, out = scan(tmp_path, folder, tiny_args, "--incremental")
    assert first.exit_code == 0, first.output
    kept_rows = {row["path"]: row for row in read_results_csv(out / "scores.csv")}
    for i, source in enumerate(files[4:]):  # two new images arrive
        shutil.copy(source, folder / f"b{i}.jpg")
    second, out = scan(tmp_path, folder, tiny_args, "--incremental")
    assert second.exit_code == 0, second.output
    rows = {row["path"]: row for row in read_results_csv(out / "scores.csv")}
    assert all(rows[path] == row for path, row in kept_rows.items())  # the earlier rows stand

    # by hand: the two new images against the four kept ones, with the raw scores recorded for those
    prep = Preprocessing.for_backbone(tiny_backbone, InputSpec())
    extractor = MutualFeatureExtractor(tiny_backbone.model.visual)

    def features(paths):
        batch = [preprocess(load_image(p), prep.size, prep.mean, prep.std) for p in paths]
        return extractor.extract(torch.stack(batch))

    old = sorted(folder.glob("a*.jpg"))
    new = sorted(folder.glob("b*.jpg"))
    kept = np.load(out / ".winclip" / "mutual-pool.npz", allow_pickle=False)
    assert list(kept["paths"]) == [p.name for p in old + new]  # the newest images, oldest first
    recorded = torch.tensor([float(kept_rows[p.name]["raw_score"]) for p in old], dtype=torch.float64)
    assert np.allclose(kept["raw_scores"][:4], recorded.numpy(), atol=1e-6)
    expected = score_against_pool(features(new), features(old), prep.size, torch.from_numpy(kept["raw_scores"][:4]))
    for i, path in enumerate(new):
        row = rows[path.name]
        assert row["pool"] == "1/1 + 4 kept" and row["pool_size"] == "6"
        assert float(row["score"]) == pytest.approx(float(expected.scores[i]), abs=1e-6)
        assert float(row["raw_score"]) == pytest.approx(float(expected.raw_scores[i]), abs=1e-6)
    assert json.loads((out / "run.json").read_text())["pools"][0]["kept"] == 4

    # a file that is gone leaves the kept pool with its row
    (folder / "a0.jpg").unlink()
    third, out = scan(tmp_path, folder, tiny_args, "--incremental")
    assert third.exit_code == 0, third.output
    assert "a0.jpg" not in {row["path"] for row in read_results_csv(out / "scores.csv")}
    kept = np.load(out / ".winclip" / "mutual-pool.npz", allow_pickle=False)
    assert list(kept["paths"]) == ["a1.jpg", "a2.jpg", "a3.jpg", "b0.jpg", "b1.jpg"]


def test_shards_score_their_own_pools_and_merge_keeps_every_pool(tmp_path, tiny_args, tiny_backbone):
    from winclip_cli.jobs.scan import shard_of

    files = sample_files()
    names = [f.relative_to(SAMPLE_TEST).as_posix() for f in files]
    for k in (1, 2):
        result, _ = scan(tmp_path, SAMPLE_TEST, tiny_args, "--shard", f"{k}/2", name=f"shard{k}")
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert invoke(["merge", tmp_path / "shard1", tmp_path / "shard2", "--out", merged]).exit_code == 0
    rows = {row["path"]: row for row in read_results_csv(merged / "scores.csv")}
    assert sorted(rows) == names
    for k in (1, 2):
        mine = [f for f, name in zip(files, names, strict=True) if shard_of(name, 2) == k]
        expected = direct_musc(tiny_backbone, mine)  # a shard's files are its pool
        for i, source in enumerate(mine):
            row = rows[source.relative_to(SAMPLE_TEST).as_posix()]
            assert row["pool"] == f"{k}/2:1/1" and row["pool_size"] == str(len(mine))
            assert float(row["score"]) == pytest.approx(float(expected.scores[i]), abs=1e-6)
    pools = json.loads((merged / "run.json").read_text())["pools"]
    assert [pool["pool"] for pool in pools] == ["1/2:1/1", "2/2:1/1"]


def test_an_image_with_non_finite_features_gets_an_error_row_and_joins_no_pool(
    tmp_path, tiny_args, tiny_backbone, monkeypatch
):
    from winclip_cli.core.musc import MutualFeatureExtractor, PoolFeatures

    extract = MutualFeatureExtractor.extract
    calls = []

    def overflowing_second_image(self, images):
        features = extract(self, images)
        calls.append(len(images))
        if len(calls) == 2:  # --batch-size 1: the second file in path order
            tokens = features.tokens.clone()
            tokens[0, 0, 0, 0] = float("inf")
            features = PoolFeatures(tokens, features.class_embeddings, features.grid_size)
        return features

    monkeypatch.setattr(MutualFeatureExtractor, "extract", overflowing_second_image)
    result, out = scan(tmp_path, SAMPLE_TEST, tiny_args, "--batch-size", 1)
    assert result.exit_code == 3, result.output
    rows = read_results_csv(out / "scores.csv")
    assert rows[1]["status"] == "error" and "NaN or infinity" in rows[1]["error"] and rows[1]["pool"] == ""
    monkeypatch.setattr(MutualFeatureExtractor, "extract", extract)
    files = sample_files()
    expected = direct_musc(tiny_backbone, [files[0], *files[2:]])
    for i, row in enumerate([rows[0], *rows[2:]]):
        assert row["status"] == "ok" and row["pool_size"] == str(len(files) - 1)
        assert float(row["score"]) == pytest.approx(float(expected.scores[i]), abs=1e-6)
