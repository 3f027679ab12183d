"""Decisions: `winclip calibrate` (leave-one-out, storage, --threshold auto) and `winclip eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DATA
from helpers import invoke
from winclip_cli.core.calibration import threshold_for_fpr
from winclip_cli.io.memory import load_memory
from winclip_cli.io.outputs import read_results_csv
from winclip_cli.jobs.calibrate import CalibrateSpec, run_calibrate_job
from winclip_cli.jobs.kernel import SilentReporter
from winclip_cli.spec import InputSpec, TextSpec

GOOD = SAMPLE_DATA / "fabric" / "good"
TEST = SAMPLE_DATA / "fabric" / "test"


def test_leave_one_out_equals_a_memory_without_the_image(tmp_path, tiny_args, tiny_options):
    refs = tmp_path / "refs.npz"
    assert invoke(["build-refs", str(GOOD), "--out", str(refs), "-q", *tiny_args]).exit_code == 0
    result = run_calibrate_job(
        CalibrateSpec(GOOD, tiny_options, InputSpec(), TextSpec("object"), fpr=0.25, refs=refs), SilentReporter()
    )
    assert result.left_out == 4 and result.calibration.n_images == 4
    files = sorted(GOOD.glob("*.jpg"))
    for i, image in enumerate(files):
        others = tmp_path / f"others-{i}.npz"
        sources = [str(f) for f in files if f != image]
        assert invoke(["build-refs", *sources, "--out", str(others), "-q", *tiny_args]).exit_code == 0
        out = tmp_path / f"scan-{i}"
        assert invoke(["scan", str(image), "--refs", str(others), "--out", str(out), "-q", *tiny_args]).exit_code == 0
        (row,) = read_results_csv(out / "scores.csv")
        assert result.scores[i] == pytest.approx(float(row["score"]), abs=2e-6)
    # the threshold is the exact order statistic of those scores
    assert result.calibration.threshold == threshold_for_fpr(result.scores, 0.25)
    stored = load_memory(refs).metadata["calibration"]
    assert stored["calibration"]["threshold"] == result.calibration.threshold
    assert stored["leave_one_out"] == 4


def test_scan_threshold_auto_uses_the_calibration_in_the_memory(tmp_path, tiny_args):
    refs = tmp_path / "refs.npz"
    assert invoke(["build-refs", str(GOOD), "--out", str(refs), "-q", *tiny_args]).exit_code == 0
    result = invoke(["calibrate", str(GOOD), "--refs", str(refs), "--fpr", "0.25", *tiny_args])
    assert result.exit_code == 0, result.output
    threshold = load_memory(refs).metadata["calibration"]["calibration"]["threshold"]
    pixel = load_memory(refs).metadata["calibration"]["calibration"]["pixel_threshold"]
    out = tmp_path / "out"
    assert invoke(["scan", str(TEST), "--refs", str(refs), "--out", str(out), "-q", *tiny_args]).exit_code == 0
    rows = read_results_csv(out / "scores.csv")
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
        assert row["threshold_source"].startswith("calibrated: fpr 0.25 on 4 good images")
        assert row["label"] == ("anomalous" if float(row["score"]) > threshold else "normal")
        assert 0.0 <= float(row["anomalous_area"]) <= 1.0
    info = json.loads((out / "run.json").read_text())
    assert info["pixel_threshold"] == pytest.approx(pixel) and info["threshold_source"].startswith("calibrated")
    # an explicit --threshold wins, and says so
    out2 = tmp_path / "out2"
    assert (
        invoke(
            ["scan", str(TEST), "--refs", str(refs), "--out", str(out2), "--threshold", "0.9", "-q", *tiny_args]
        ).exit_code
        == 0
    )
    assert {r["threshold_source"] for r in read_results_csv(out2 / "scores.csv")} == {"--threshold"}


def test_anomalous_area_and_bbox_follow_the_pixel_threshold(tmp_path, tiny_args):
    """At fpr 0 both thresholds sit at the highest good score and pixel: good images have no area, no box."""
    calibration = tmp_path / "cal.json"
    assert invoke(["calibrate", str(GOOD), "--out", str(calibration), "--fpr", "0", "-q", *tiny_args]).exit_code == 0
    record = json.loads(calibration.read_text())
    out = tmp_path / "out"
    assert (
        invoke(["scan", str(GOOD), "--calibration", str(calibration), "--out", str(out), "-q", *tiny_args]).exit_code
        == 0
    )
    rows = read_results_csv(out / "scores.csv")
    # fpr 0: the threshold is the highest good score, so no good image is over it
    assert all(row["label"] == "normal" for row in rows)
    assert max(float(r["score"]) for r in rows) == pytest.approx(record["calibration"]["threshold"], abs=1e-6)
    for row in rows:
        area = float(row["anomalous_area"])
        assert area == 0.0 and row["bbox"] == ""


def test_too_few_images_warn(tmp_path, tiny_args):
    result = invoke(["calibrate", str(GOOD), "--out", str(tmp_path / "c.json"), "--fpr", "0.01", *tiny_args])
    assert result.exit_code == 0
    assert "cannot support a false-alarm rate of 0.01" in result.stderr and "at least 100" in result.stderr


def test_calibration_of_another_configuration_is_refused_or_ignored(tmp_path, tiny_args):
    calibration = tmp_path / "cal.json"
    assert (
        invoke(["calibrate", str(GOOD), "--out", str(calibration), "--class", "fabric", "-q", *tiny_args]).exit_code
        == 0
    )
    # explicit file made for another vocabulary (class): refused
    result = invoke(
        [
            "scan",
            str(TEST),
            "--calibration",
            str(calibration),
            "--class",
            "bottle",
            "--out",
            str(tmp_path / "o"),
            *tiny_args,
        ]
    )
    assert result.exit_code == 2 and "recalibrate" in result.stderr
    # the prompts differ because the class does: the message names both classes (issue 13)
    assert "another class ('fabric'; this run scores class 'bottle')" in result.stderr
    # stored in a memory and another class at scan time: the same rule (issue 22): refused, since a cron
    # job must not silently lose its calibrated threshold; with --threshold, warned and scanned
    refs = tmp_path / "refs.npz"
    assert invoke(["build-refs", str(GOOD), "--out", str(refs), "-q", *tiny_args]).exit_code == 0
    assert invoke(["calibrate", str(GOOD), "--refs", str(refs), "--class", "fabric", "-q", *tiny_args]).exit_code == 0
    out = tmp_path / "o2"
    result = invoke(["scan", str(TEST), "--refs", str(refs), "--class", "bottle", "--out", str(out), *tiny_args])
    assert result.exit_code == 2 and "recalibrate" in result.stderr and "or pass --threshold" in result.stderr
    assert "stored in" in result.stderr and "another class ('fabric'; this run scores class 'bottle')" in result.stderr
    assert not (out / "scores.csv").exists()
    args = ["scan", str(TEST), "--refs", str(refs), "--class", "bottle", "--threshold", "0.5", "--out", str(out)]
    result = invoke([*args, *tiny_args])
    assert result.exit_code == 0 and "recalibrate" in result.stderr
    assert {r["threshold_source"] for r in read_results_csv(out / "scores.csv")} == {"--threshold"}


def test_single_reference_memory_cannot_leave_itself_out(tmp_path, tiny_args):
    refs = tmp_path / "refs.npz"
    first = sorted(GOOD.glob("*.jpg"))[0]
    assert invoke(["build-refs", str(first), "--out", str(refs), "-q", *tiny_args]).exit_code == 0
    result = invoke(["calibrate", str(GOOD), "--refs", str(refs), *tiny_args])
    assert result.exit_code == 2 and "single reference" in result.stderr


# ------------------------------------------------------------------------------------------------------ eval


def _image(path: Path, seed: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_mvtec(root: Path, categories=("bottle", "screw")) -> None:
    seed = 0
    for category in categories:
        for i in range(3):
            _image(root / category / "train" / "good" / f"{i:03d}.png", seed := seed + 1)
        for i in range(2):
            _image(root / category / "test" / "good" / f"{i:03d}.png", seed := seed + 1)
        for i in range(2):
            _image(root / category / "test" / "crack" / f"{i:03d}.png", seed := seed + 1)
            mask = np.zeros((40, 48), dtype=np.uint8)
            mask[10:20, 5 + i * 10 : 20 + i * 10] = 255
            target = root / category / "ground_truth" / "crack" / f"{i:03d}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(target)


def test_eval_end_to_end_on_an_mvtec_layout(tmp_path, tiny_args):
    root = tmp_path / "mvtec"
    make_mvtec(root)
    out = tmp_path / "eval"
    result = invoke(["eval", str(root), "--k-shot", "2", "--seed", "3", "--out", str(out), *tiny_args])
    assert result.exit_code == 0, result.output
    assert "bottle" in result.stdout and "screw" in result.stdout and "mean" in result.stdout
    document = json.loads((out / "metrics.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["bottle", "screw"]
    for category in document["categories"]:
        assert category["images"] == 4 and category["anomalous"] == 2 and len(category["references"]) == 2
        assert all(Path(r).parent.name == "good" and "train" in r for r in category["references"])
        for name, value in category["metrics"].items():
            assert value is not None and 0.0 <= value <= 1.0, name
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("category,layout,images,anomalous,image_auroc")
    assert [line.split(",")[0] for line in lines[1:]] == ["bottle", "screw", "mean"]
    mean_auroc = float(lines[3].split(",")[4])
    per_category = [c["metrics"]["image_auroc"] for c in document["categories"]]
    assert mean_auroc == pytest.approx(sum(per_category) / 2, abs=1e-6)
    # the same seed draws the same references
    again = tmp_path / "again"
    assert (
        invoke(["eval", str(root), "--k-shot", "2", "--seed", "3", "--out", str(again), "-q", *tiny_args]).exit_code
        == 0
    )
    assert (
        json.loads((again / "metrics.json").read_text())["categories"][0]["references"]
        == document["categories"][0]["references"]
    )


def test_eval_single_class_gives_a_message_not_nan(tmp_path, tiny_args):
    root = tmp_path / "generic" / "widget"
    for i in range(3):
        _image(root / "good" / f"{i}.png", i)
    (root / "bad").mkdir()
    out = tmp_path / "eval"
    result = invoke(["eval", str(tmp_path / "generic"), "--out", str(out), *tiny_args])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    metrics = document["categories"][0]["metrics"]
    assert metrics["image_auroc"] is None and "anomalous" in document["categories"][0]["notes"]["image_auroc"]
    assert "nan" not in (out / "metrics.csv").read_text().lower()
    assert "n/a" in result.stdout
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())


def test_eval_without_a_known_layout_exits_2(tmp_path, tiny_args):
    (tmp_path / "nothing").mkdir()
    result = invoke(["eval", str(tmp_path / "nothing"), *tiny_args])
    assert result.exit_code == 2 and "expected" in result.stderr
