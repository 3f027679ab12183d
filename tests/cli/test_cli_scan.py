"""`winclip scan` end to end through the real CLI, on the sample data and on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import SAMPLE_DATA
from helpers import invoke, run_cli
from winclip_cli.io.outputs import CSV_COLUMNS, read_results_csv

SAMPLE_TEST = SAMPLE_DATA / "fabric" / "test"


def test_scan_sample_data_end_to_end(tmp_path, tiny_args):
    out = tmp_path / "out"
    result = invoke(["scan", str(SAMPLE_TEST), "--class", "fabric", "--out", str(out), "--save-maps", *tiny_args])
    assert result.exit_code == 0, result.output
    rows = read_results_csv(out / "scores.csv")
    expected = sorted(p.relative_to(SAMPLE_TEST).as_posix() for p in SAMPLE_TEST.rglob("*.jpg"))
    assert [row["path"] for row in rows] == expected
    assert list(rows[0].keys()) == list(CSV_COLUMNS)
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        score = float(row["score"])
        assert 0.0 < score < 1.0
        assert row["label"] == ("anomalous" if score > 0.5 else "normal")
        assert row["threshold"] == "0.500000"
        assert row["mode"] == "zero-shot"
        heatmap = Image.open(out / row["heatmap"])
        source = Image.open(SAMPLE_TEST / row["path"])
        assert heatmap.size == source.size == (int(row["width"]), int(row["height"]))
        raw = tifffile.imread(out / "maps" / (row["path"] + ".tiff"))
        assert raw.dtype == np.float32 and raw.shape == (source.size[1], source.size[0])
        assert float(row["max_pixel_score"]) == pytest.approx(float(raw.max()), abs=1e-6)
    info = json.loads((out / "run.json").read_text())
    assert info["images"] == len(expected) and info["errors"] == 0
    assert info["architecture"] == "winclip-tiny-test" and info["device"] == "cpu"
    assert len(info["weights_sha256"]) == 64 and len(info["vocabulary_sha256"]) == 64
    assert "images/s" in result.stderr


def test_scan_json_lines_match_the_csv(tmp_path, tiny_args):
    out = tmp_path / "out"
    result = invoke(["scan", str(SAMPLE_TEST / "local"), "--out", str(out), "--json", "--quiet", *tiny_args])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    rows = read_results_csv(out / "scores.csv")
    assert [line["path"] for line in lines] == [row["path"] for row in rows]
    assert [f"{line['score']:.6f}" for line in lines] == [row["score"] for row in rows]


def test_scores_are_independent_of_batch_size(tmp_path, tiny_args):
    one = tmp_path / "one"
    three = tmp_path / "three"
    assert invoke(["scan", str(SAMPLE_TEST), "--out", str(one), "--batch-size", "1", "-q", *tiny_args]).exit_code == 0
    assert invoke(["scan", str(SAMPLE_TEST), "--out", str(three), "--batch-size", "3", "-q", *tiny_args]).exit_code == 0
    a = [float(r["score"]) for r in read_results_csv(one / "scores.csv")]
    b = [float(r["score"]) for r in read_results_csv(three / "scores.csv")]
    assert a == pytest.approx(b, abs=2e-6)


def scan_results(out: Path) -> tuple[list[float], list[np.ndarray], dict]:
    rows = read_results_csv(out / "scores.csv")
    maps = [tifffile.imread(out / "maps" / (row["path"] + ".tiff")) for row in rows]
    return [float(row["score"]) for row in rows], maps, json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("budget_images", [None, 2])
def test_batch_size_auto_scores_as_batch_1_does(tmp_path, tiny_args, tiny_backbone, monkeypatch, budget_images):
    """--batch-size auto (the default) moves fp32 scores and maps by float rounding only; the size it
    chose is on the first line and in run.json. ``budget_images=2``: a CPU budget of two tiny-model
    images per batch, so that auto picks 2 as it does for the default model."""
    from winclip_cli.core import batching

    expected = 8
    if budget_images is not None:
        gflop = batching.visual_facts(tiny_backbone.model.visual).gflop_per_image((2, 3))
        budget = budget_images * gflop * 1.01
        monkeypatch.setitem(batching.CPU_GFLOP_PER_BATCH, batching.Precision.FP32, budget)
        expected = budget_images
    one, auto = tmp_path / "one", tmp_path / "auto"
    common = ["--class", "fabric", "--save-maps", *tiny_args]
    assert invoke(["scan", str(SAMPLE_TEST), "--out", str(one), "--batch-size", "1", "-q", *common]).exit_code == 0
    result = invoke(["scan", str(SAMPLE_TEST), "--out", str(auto), *common])
    assert result.exit_code == 0, result.output
    assert f"on cpu fp32, batch {expected}," in result.output
    scores_one, maps_one, info_one = scan_results(one)
    scores_auto, maps_auto, info_auto = scan_results(auto)
    assert (info_one["batch_size"], info_auto["batch_size"]) == (1, expected)
    assert len(scores_one) == 6
    # scores.csv holds 6 decimals: a rounding step is 1e-6; the float32 maps are compared whole
    assert np.abs(np.array(scores_auto) - np.array(scores_one)).max() <= 1e-6 + 1e-12
    assert max(float(np.abs(a - b).max()) for a, b in zip(maps_auto, maps_one, strict=True)) <= 1e-6


def test_class_name_changes_the_scores(tmp_path, tiny_args):
    scores = {}
    for name in ("fabric", "bottle"):
        out = tmp_path / name
        assert (
            invoke(["scan", str(SAMPLE_TEST / "good"), "--class", name, "--out", str(out), "-q", *tiny_args]).exit_code
            == 0
        )
        scores[name] = [r["score"] for r in read_results_csv(out / "scores.csv")]
    assert scores["fabric"] != scores["bottle"]


def test_fail_on_anomaly_exit_code(tmp_path, tiny_args):
    args = ["scan", str(SAMPLE_TEST / "good"), "--out", str(tmp_path / "o"), "-q", *tiny_args]
    assert invoke([*args, "--threshold", "0.0", "--fail-on-anomaly"]).exit_code == 1
    assert invoke([*args, "--threshold", "1.0", "--fail-on-anomaly"]).exit_code == 0
    assert invoke([*args, "--threshold", "0.0"]).exit_code == 0  # anomalies alone do not fail without the flag


def test_output_folder_inside_the_input_is_not_rescanned(tmp_path, tiny_args):
    images = tmp_path / "images"
    images.mkdir()
    for path in (SAMPLE_TEST / "good").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    out = images / "results"
    for _ in range(2):
        assert invoke(["scan", str(images), "--out", str(out), "-q", *tiny_args]).exit_code == 0
    assert len(read_results_csv(out / "scores.csv")) == 2


def make_bad_folder(folder: Path) -> dict[str, str]:
    """A mix of good and broken files; returns the expected status per relative path."""
    folder.mkdir()
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    good.save(folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    good.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("L", (1, 1), 200).save(folder / "tiny 1x1.png")
    tifffile.imwrite(folder / "sixteen.tif", (np.arange(30 * 20, dtype=np.uint16).reshape(30, 20) * 100))
    (folder / "sub").mkdir()
    good.save(folder / "sub" / "nested.bmp")
    return {
        "empty.jpg": "error",
        "good.png": "ok",
        "sixteen.tif": "ok",
        "sub/nested.bmp": "ok",
        "text.png": "error",
        "tiny 1x1.png": "ok",
        "truncated.jpg": "error",
        "whole.jpg": "ok",
    }


def test_bad_files_are_reported_and_the_rest_is_scored(tmp_path, tiny_args):
    expected = make_bad_folder(tmp_path / "mixed")
    out = tmp_path / "out"
    result = invoke(["scan", str(tmp_path / "mixed"), "--out", str(out), "--batch-size", "2", *tiny_args])
    assert result.exit_code == 3, result.output
    rows = {row["path"]: row for row in read_results_csv(out / "scores.csv")}
    assert {path: row["status"] for path, row in rows.items()} == expected
    for path, status in expected.items():
        row = rows[path]
        if status == "error":
            assert row["error"] and row["score"] == "" and row["heatmap"] == ""
            assert path in result.stderr
        else:
            assert (out / row["heatmap"]).is_file()
    assert "Traceback" not in result.output


def test_missing_weights_file_is_one_line_and_exit_2(tmp_path, tiny_model_files):
    config, _ = tiny_model_files
    proc = run_cli(
        [
            "scan",
            str(SAMPLE_TEST),
            "--model",
            str(config),
            "--weights",
            str(tmp_path / "nope.pt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "weights file not found" in lines[0] and "--weights" in lines[0]


def test_default_weights_unavailable_offline_names_the_file_to_fetch(tmp_path):
    proc = run_cli(["scan", str(SAMPLE_TEST), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "laion400m_e31" in lines[0] and "--weights FILE" in lines[0] and "https://" in lines[0]


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_model_files):
    _, checkpoint = tiny_model_files
    other = tmp_path / "other.json"
    config = json.loads(json.dumps(__import__("conftest").TINY_CONFIG))
    config["vision_cfg"]["width"] = 96
    other.write_text(json.dumps(config))
    result = invoke(
        [
            "scan",
            str(SAMPLE_TEST),
            "--model",
            str(other),
            "--weights",
            str(checkpoint),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 2
    assert "cannot load" in result.stderr and "other" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scales", "2,x"], "--scales"),
        (["--scales", "20"], "larger than"),
        (["--threshold", "1.5"], "--threshold"),
        (["--device", "tpu"], "unknown device"),
        (["--precision", "fp8"], "unknown precision"),
    ],
)
def test_bad_options_exit_2(tmp_path, tiny_args, extra, message):
    result = invoke(["scan", str(SAMPLE_TEST / "good"), "--out", str(tmp_path / "o"), *tiny_args, *extra])
    assert result.exit_code == 2
    assert message in result.stderr


def test_no_images_is_a_usage_error(tmp_path, tiny_args):
    (tmp_path / "empty").mkdir()
    result = invoke(["scan", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *tiny_args])
    assert result.exit_code == 2 and "no images found" in result.stderr
    result = invoke(["scan", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *tiny_args])
    assert result.exit_code == 2 and "not found" in result.stderr


def test_help_lists_exit_codes_and_examples():
    result = invoke(["scan", "--help"])
    assert result.exit_code == 0
    assert "Exit codes" in result.output and "winclip scan ./images --class bottle" in result.output
