"""The first minute with winclip (issue 13): mistakes fail at once, before torch is imported; messages,
counts and exit codes say what is true; the README's commands and cron line do what its text says."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG
from helpers import imported, invoke, messages, run_cli, run_cli_importtime
from winclip_cli.io.outputs import CSV_COLUMNS, read_results_csv

SAMPLE_TEST = SAMPLE_DATA / "fabric" / "test"
SAMPLE_GOOD = SAMPLE_DATA / "fabric" / "good"
README = (REPO / "README.md").read_text(encoding="utf-8")


cli_process = partial(run_cli_importtime, timeout=120)


# ================================================================================ 3. mistakes fail at once


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(images / "a.png")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    return {"images": images, "config": config, "file": a_file, "text": text, "tmp": tmp_path}


# (arguments with {placeholders}, expected exit code, words of the message)
ARGUMENT_ERRORS = [
    (["scan", "{tmp}/missing"], 2, "input not found"),
    (["scan", "{images}", "--threshold", "high"], 2, "--threshold takes a number"),
    (["scan", "{images}", "--threshold", "1.5"], 2, "between 0 and 1"),
    (["scan", "{images}", "--device", "gpu"], 2, "unknown device 'gpu'"),
    (["scan", "{images}", "--precision", "fp8"], 2, "unknown precision"),
    (["scan", "{images}", "--scales", "2,x"], 2, "--scales"),
    (["scan", "{images}", "--shard", "5/4"], 2, "--shard"),
    (["scan", "{images}", "--tile", "big"], 2, "--tile takes"),
    (["scan", "{images}", "--tile", "16", "--model", "{config}"], 2, "tiles must be at least 240"),
    (["scan", "{images}", "--tile", "239"], 2, "tiles must be at least 240"),  # the default model's config
    (["scan", "{images}", "--tile-overlap", "1"], 2, "--tile-overlap"),
    (["scan", "{images}", "--refs", "{tmp}/missing.npz"], 2, "reference memory not found"),
    (["scan", "{images}", "--refs", "{text}"], 2, "not a winclip memory"),
    (["scan", "{images}", "--calibration", "{tmp}/missing.json"], 2, "--calibration file not found"),
    (["scan", "{images}", "--prompts", "{tmp}/missing.toml"], 2, "missing.toml"),
    (["scan", "{images}", "--out", "{file}"], 2, "not a folder"),
    (["build-refs", "{tmp}/missing"], 2, "reference source not found"),
    (["build-refs", "{images}", "--out", "{file}/refs.npz"], 2, "is not a folder"),
    (["build-refs", "{images}", "--out", "{images}"], 2, "is a folder"),
    (["build-refs", "{images}", "--out", "{text}", "--append"], 2, "not a winclip memory"),
    (["calibrate", "{images}", "--out", "{file}/cal.json"], 2, "is not a folder"),
    (["calibrate", "{images}", "--fpr", "1.5"], 2, "--fpr must be in [0, 1)"),
    (["calibrate", "{images}", "--refs", "{text}"], 2, "not a winclip memory"),
    (["eval", "{tmp}/missing"], 2, "not found"),
    (["eval", "{images}", "--out", "{file}/eval"], 2, "is not a folder"),
]


@pytest.mark.parametrize(
    "args, code, words", ARGUMENT_ERRORS, ids=[" ".join(a[:1] + a[2:]) for a, _, _ in ARGUMENT_ERRORS]
)
def test_argument_errors_exit_before_torch_is_imported(setup, args, code, words):
    result = cli_process([arg.format(**setup) for arg in args])
    text = messages(result.stderr)
    assert result.returncode == code, text
    assert words in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text  # one line
    assert not imported(result.stderr, "torch"), "torch was imported before the arguments were checked"


def test_busy_output_folder_exits_4_before_torch_is_imported(setup):
    from winclip_cli.io.state import OutputLock

    out = setup["tmp"] / "out"
    out.mkdir()
    with OutputLock(out):
        result = cli_process(["scan", setup["images"], "--out", out])
    assert result.returncode == 4, result.stderr
    assert "another winclip scan is writing to" in messages(result.stderr) and f"pid {os.getpid()}" in result.stderr
    assert not imported(result.stderr, "torch")


def test_a_free_lock_left_behind_is_no_obstacle_to_the_fast_checks(setup):
    out = setup["tmp"] / "out"
    (out / ".winclip").mkdir(parents=True)
    (out / ".winclip" / "lock").write_text("pid 1 on gone since 2020-01-01\n")
    result = cli_process(["scan", setup["images"], "--out", out, "--device", "gpu"])
    assert result.returncode == 2 and "unknown device" in result.stderr  # not 4: nobody holds it


def test_a_tile_smaller_than_the_input_is_refused_after_load_when_the_config_is_unknown(setup, tiny_backbone):
    from winclip_cli.errors import SetupError
    from winclip_cli.jobs.decode import Preprocessing
    from winclip_cli.options import Tiling
    from winclip_cli.spec import InputSpec

    with pytest.raises(SetupError, match="tiles must be at least 240"):
        Preprocessing.for_backbone(tiny_backbone, InputSpec(tiling=Tiling(200)))
    assert Preprocessing.for_backbone(tiny_backbone, InputSpec(tiling=Tiling(240))).tiling.size == 240


# ============================================================================ 1. browser tests without Chromium


@pytest.mark.parametrize("required, code", [("", 0), ("1", 1)])
def test_browser_tests_skip_without_chromium_unless_required(required, code):
    env = {**os.environ, "WINCLIP_TEST_CHROMIUM": "/nonexistent/chromium", "WINCLIP_REQUIRE_BROWSER": required}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/system/test_report_browser.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == code, result.stdout[-2000:]
    if code == 0:
        assert re.search(r"\d+ skipped", result.stdout) and "passed" not in result.stdout
        assert "SKIPPED" in result.stdout and "Chromium not found (/nonexistent/chromium)" in result.stdout
    else:
        assert "WINCLIP_REQUIRE_BROWSER=1 requires the browser tests" in result.stdout


def test_ci_requires_the_browser_tests():
    script = (REPO / ".ci" / "run").read_text()
    assert "export WINCLIP_REQUIRE_BROWSER=1" in script
    assert script.index("WINCLIP_REQUIRE_BROWSER=1") < script.index(".venv/bin/python -m pytest -q")


# ========================================================================================= 2. CPU-only install


def test_readme_documents_the_cpu_only_install_in_one_command():
    default = re.search(r"^python3 -m venv \.venv && \.venv/bin/pip install -e '\.\[test\]' && .*$", README, re.M)
    cpu = re.search(
        r"^python3 -m venv \.venv && \.venv/bin/pip install --extra-index-url https://download\.pytorch\.org/whl/cpu "
        r"-e '\.\[test\]' && (.*)$",
        README,
        re.M,
    )
    assert default and cpu
    assert default.group(0).endswith(cpu.group(1))  # the same scan follows


# ================================================================================ 4. tiles: warned when many


def test_many_tiles_are_announced_with_their_count(tmp_path, tiny_args):
    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("RGB", (450, 450), (120, 120, 120)).save(folder / "panel.png")
    out = tmp_path / "out"
    # stride round(240 * 0.1) = 24 px: ceil((450 - 240) / 24) + 1 = 10 tiles per axis
    result = invoke(["scan", folder, "--tile", "240", "--tile-overlap", "0.9", "--out", out, *tiny_args])
    assert result.exit_code == 0, result.output
    assert "panel.png (450x450) is cut into 100 tiles of 240 px" in result.stderr
    assert result.stderr.count("tiles of 240 px") == 1
    (row,) = read_results_csv(out / "scores.csv")
    assert row["tiles"] == "100"


# ======================================================================================== 5. merge totals


def test_merged_run_json_agrees_with_the_merged_csv(tmp_path, tiny_args):
    shards = []
    for k in (1, 2):
        out = tmp_path / f"shard-{k}"
        # threshold 0: every scored image is anomalous, so the anomaly counts are not trivially 0
        args = ["scan", SAMPLE_TEST, "--shard", f"{k}/2", "--threshold", "0", "--out", out, "-q", *tiny_args]
        assert invoke(args).exit_code == 0
        shards.append(json.loads((out / "run.json").read_text()))
    merged = tmp_path / "all"
    result = invoke(["merge", tmp_path / "shard-1", tmp_path / "shard-2", "--out", merged])
    assert result.exit_code == 0, result.output
    rows = read_results_csv(merged / "scores.csv")
    info = json.loads((merged / "run.json").read_text())
    anomalous = sum(r["label"] == "anomalous" for r in rows)
    errors = sum(bool(r["error"]) for r in rows)  # as a scan counts them
    assert anomalous == len(rows) > 0
    assert info["images"] == info["total_rows"] == len(rows)
    assert info["anomalies"] == info["total_anomalies"] == anomalous
    assert info["errors"] == info["total_errors"] == errors
    assert info["scored"] == sum(r["status"] == "ok" for r in rows)
    for key in ("seconds", "setup_seconds", "scan_seconds"):
        assert info[key] == pytest.approx(sum(s[key] for s in shards), abs=2e-3)
    assert info["durations"] == "summed over the merged scans"
    assert info["interrupted"] is False and info["shard"] is None
    assert f"{len(rows)} rows from 2 folders" in result.stderr


# ================================================================================= 6. a file that is no memory


@pytest.mark.parametrize("content", [b"hello\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b'[prompts]\nx = "y"\n'])
def test_a_file_that_is_not_an_npz_is_not_a_winclip_memory(tmp_path, content):
    from winclip_cli.errors import MemoryFileError
    from winclip_cli.io.memory import load_memory

    path = tmp_path / "refs.npz"
    path.write_bytes(content)
    with pytest.raises(MemoryFileError, match="is not a winclip memory") as caught:
        load_memory(path)
    assert "pickle" not in str(caught.value)


# ============================================================ 7. --incremental: the exit code follows the CSV


def test_fail_on_anomaly_counts_rows_relabelled_by_an_incremental_run(tmp_path, tiny_args):
    out = tmp_path / "out"
    first = invoke(["scan", SAMPLE_TEST, "--threshold", "1", "--out", out, "--incremental", *tiny_args])
    assert first.exit_code == 0, first.output
    count = len(read_results_csv(out / "scores.csv"))
    again = ["scan", SAMPLE_TEST, "--threshold", "0", "--out", out, "--incremental", "--fail-on-anomaly", *tiny_args]
    result = invoke(again)
    rows = read_results_csv(out / "scores.csv")
    assert all(r["label"] == "anomalous" for r in rows) and len(rows) == count
    assert result.exit_code == 1, result.output
    assert f"{count} images: {count} anomalous, 0 normal, 0 errors (0 scored now, {count} unchanged)" in result.stderr
    info = json.loads((out / "run.json").read_text())
    assert (info["scored"], info["total_anomalies"]) == (0, count)


# ============================================================================================ 8. smaller things


def test_memory_file_mode_follows_the_umask(tmp_path, tiny_model_files):
    config, checkpoint = tiny_model_files
    refs = tmp_path / "refs.npz"
    args = ["build-refs", SAMPLE_GOOD, "--k", "1", "--out", refs, "-q"]
    args += ["--model", config, "--weights", checkpoint, "--device", "cpu"]
    result = run_cli(args, timeout=300, preexec_fn=lambda: os.umask(0o002))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(refs.stat().st_mode) == 0o664  # not mkstemp's 0600


def test_a_failed_run_leaves_no_output_folder_behind(tmp_path, tiny_model_files):
    config, _ = tiny_model_files
    out = tmp_path / "new" / "out"
    missing = tmp_path / "missing.pt"
    result = invoke(["scan", SAMPLE_TEST, "--model", config, "--weights", missing, "--device", "cpu", "--out", out])
    assert result.exit_code == 2 and "missing.pt" in result.stderr
    assert not out.exists()
    kept = tmp_path / "kept"  # a folder that was there before is never removed
    kept.mkdir()
    result = invoke(["scan", SAMPLE_TEST, "--model", config, "--weights", missing, "--device", "cpu", "--out", kept])
    assert result.exit_code == 2 and kept.is_dir()


@pytest.mark.parametrize("command", [[], ["scan"], ["build-refs"], ["calibrate"], ["eval"], ["merge"], ["report"]])
def test_help_has_no_type_after_flags_and_plain_argument_names(command):
    result = invoke([*command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    assert not re.search(r"\{\w+\}", result.output.split("\n\n")[0] + result.output.split("Usage:")[1].splitlines()[0])
    usage = {
        "scan": "scan [OPTIONS] DIRECTORY",
        "build-refs": "build-refs [OPTIONS] SOURCES...",
        "calibrate": "calibrate [OPTIONS] GOOD_DIR",
        "eval": "eval [OPTIONS] ROOT",
        "merge": "merge [OPTIONS] FOLDERS...",
        "report": "report [OPTIONS] OUT_DIR",
    }
    if command:
        assert usage[command[0]] in result.output


def test_shared_options_are_in_panels_and_declared_once():
    scan_help = invoke(["scan", "--help"], env={"COLUMNS": "160"}).output
    assert "─ Model ─" in scan_help and "─ Input ─" in scan_help
    package = REPO / "winclip_cli"
    sources = "".join(path.read_text(encoding="utf-8") for path in package.glob("*.py"))
    assert sources.count('"ViT-B-16-plus-240"') == 1
    assert sources.count("80_000_000") == 1


@pytest.mark.parametrize("args", [["prompts"], ["--help"], ["prompts", "--json"], ["scan", "--help"]])
def test_a_reader_that_stops_early_is_no_error_for_printing_commands(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "winclip_cli", *args], stdout=write_end, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr and b"Exception ignored" not in result.stderr


def test_scan_json_into_a_closed_pipe_stops_with_141(tmp_path, tiny_args):
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = tmp_path / "out"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "winclip_cli", "scan", str(SAMPLE_TEST), "--json", "--out", str(out), *tiny_args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert b"Traceback" not in result.stderr


def test_one_image_is_not_images(tmp_path, tiny_args):
    single = tmp_path / "one"
    single.mkdir()
    Image.new("RGB", (64, 64), (100, 100, 100)).save(single / "a.png")
    result = invoke(["scan", single, "--out", tmp_path / "out", *tiny_args])
    assert result.exit_code == 0, result.output
    assert "1 image: 0 anomalous, 1 normal, 0 errors in" in result.stderr or (
        "1 image: 1 anomalous, 0 normal, 0 errors in" in result.stderr
    )


def test_report_of_a_missing_folder_says_not_found(tmp_path):
    result = invoke(["report", tmp_path / "nonexistent"])
    assert result.exit_code == 2 and "output folder not found" in result.stderr
    (tmp_path / "empty").mkdir()
    result = invoke(["report", tmp_path / "empty"])
    assert result.exit_code == 2 and "has no scores.csv" in result.stderr


@pytest.mark.parametrize("code, mails", [(0, False), (1, True), (2, True), (3, False), (4, False), (130, False)])
def test_readme_cron_line_mails_only_when_its_text_says(code, mails):
    (line,) = [line for line in README.splitlines() if line.startswith("*/5 * * * * ")]
    command = line.removeprefix("*/5 * * * * ")
    # the scan becomes a command exiting with CODE, mail a marker on stdout
    scan = re.match(r"winclip scan .*?--fail-on-anomaly", command)
    assert scan, command
    shell = command.replace(scan.group(0), f"(exit {code})")
    shell = re.sub(r"mail -s \"[^\"]*\" \S+ < /dev/null", "echo MAILED", shell)
    result = subprocess.run(["/bin/sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert ("MAILED" in result.stdout) is mails, shell
    text = README[README.index("Exit codes a cron job can act on") :][:600]
    assert "4 the previous run is still writing (skip this round)" in text


def test_threshold_source_is_next_to_threshold_as_in_the_readme():
    assert CSV_COLUMNS.index("threshold_source") == CSV_COLUMNS.index("threshold") + 1
    table = README[README.index("| column | meaning |") :]
    table = table[: table.index("\n\n")]
    documented = [name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert documented == list(CSV_COLUMNS)


def test_eval_notes_anomalous_images_without_a_mask(tmp_path, tiny_args):
    root = tmp_path / "generic" / "widget"
    rng = np.random.default_rng(0)
    for folder, count in (("good", 3), ("bad", 3)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    (root / "masks").mkdir()
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(root / "masks" / "0.png")  # named after the image, as the README says
    out = tmp_path / "eval"
    result = invoke(["eval", tmp_path / "generic", "--out", out, *tiny_args])
    assert result.exit_code == 0, result.output
    note = "2 of 3 anomalous images have no mask and are left out"
    assert f"note: widget pixel metrics: {note}" in result.stderr.replace("\n", " ")
    document = json.loads((out / "metrics.json").read_text())
    assert document["categories"][0]["notes"]["pixel metrics"].startswith(note)
    assert document["categories"][0]["metrics"]["pixel_auroc"] is not None
    assert "masks/<image stem>.png" in README


def test_a_calibration_for_another_class_names_the_class():
    from winclip_cli.jobs.kernel import SilentReporter
    from winclip_cli.jobs.scan import choose_threshold

    fingerprint = {"architecture": "a", "vocabulary_sha256": "screw-prompts", "memory": "m"}
    calibration = {
        "class_name": "bottle",
        "fingerprint": {**fingerprint, "vocabulary_sha256": "bottle-prompts"},
        "calibration": {},
    }
    from winclip_cli.errors import SetupError

    reporter = SilentReporter()
    with pytest.raises(SetupError) as refused:  # one rule for --refs and --calibration (issue 22)
        choose_threshold(None, calibration, "refs.npz", False, fingerprint, reporter, class_name="screw")
    message = str(refused.value)
    assert "made with another class ('bottle'; this run scores class 'screw')" in message
    assert "vocabulary_sha256" not in message
