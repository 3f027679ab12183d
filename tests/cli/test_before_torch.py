"""Every run pays only for what it does (issue 22): mistakes fail before torch is imported, with one line
naming the option; OUT is locked before the model loads; a scan with nothing to score decides so from
the run state without importing torch, and leaves the outputs a scan would leave."""

from __future__ import annotations

import json
import re
import shutil
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from conftest import SAMPLE_DATA, TINY_CONFIG
from helpers import imported, invoke, messages, run_cli, run_cli_importtime
from winclip_cli.io.outputs import read_results_csv

cli_process = partial(run_cli_importtime, timeout=180)


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(images / "a.png")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "my.toml").write_text('[model]\nname = "ViT-B-16"\n')
    (tmp_path / "empty").mkdir()
    unrecognised = tmp_path / "unrecognised"
    (unrecognised / "photos").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(unrecognised / "photos" / "x.png")
    return {"images": images, "config": config, "tmp": tmp_path}


# (arguments with {placeholders}, extra environment, words of the one line)
FAST_FAILURES = [
    (["scan", "{images}", "--weights", "missing.pt"], {}, "--weights missing.pt: weights file not found"),
    (["scan", "{images}"], {"WINCLIP_WEIGHTS": "nope.pt"}, "WINCLIP_WEIGHTS=nope.pt: weights file not found"),
    (["scan", "{images}", "--weights", "my.toml"], {}, "--weights my.toml is a TOML text file; expected an open_clip"),
    (["scan", "{images}", "--weights", "tiny.json"], {}, "a model config, not weights (pass it with --model)"),
    (["scan", "{images}", "--model", "nope.json"], {}, "--model nope.json: model config file not found"),
    (["scan", "{images}", "--model", "ViT-B-16-plus-24"], {}, "did you mean: ViT-B-16-plus-240?"),
    (["scan", "{images}", "--out", "/proc/x"], {}, "--out /proc/x: cannot create it"),
    (["watch", "{images}", "--out", "/proc/x"], {}, "--out /proc/x: cannot create it"),
    (["calibrate", "{images}", "--weights", "missing.pt"], {}, "--weights missing.pt: weights file not found"),
    (["build-refs", "{images}", "--model", "nope.json"], {}, "--model nope.json: model config file not found"),
    (["scan", "{images}", "--shard", "auto"], {}, "--shard auto found no shard index in the environment"),
    (["scan", "{images}", "--shard", "auto/3"], {"JOB_COMPLETION_INDEX": "3"}, "index 3 (0-based) is not below"),
    (["eval", "{tmp}/empty"], {}, "no evaluation data recognised"),
    (["eval", "{tmp}/unrecognised"], {}, "no evaluation data recognised"),
    (["eval", str(SAMPLE_DATA), "--k-shot", "9"], {}, "has 4 normal training images, cannot draw 9"),
]


@pytest.mark.parametrize(
    "args, env, words", FAST_FAILURES, ids=[" ".join(a[:1] + a[2:]) + str(e) for a, e, _ in FAST_FAILURES]
)
def test_mistakes_fail_with_one_line_before_torch_is_imported(setup, args, env, words):
    result = cli_process([arg.format(**setup) for arg in args], cwd=setup["tmp"], env_extra=env)
    text = messages(result.stderr)
    assert result.returncode == 2, text
    assert words in text and "Traceback" not in text and "weights_only" not in text
    assert len(text.strip().splitlines()) == 1, text
    assert not imported(result.stderr, "torch") and not imported(result.stderr, "open_clip")


def test_a_checkpoint_that_is_no_checkpoint_is_refused_by_the_library_too(tmp_path, tiny_model_files):
    from winclip_cli.core.backbone import load_backbone
    from winclip_cli.errors import WeightsUnavailableError
    from winclip_cli.options import Device

    config, _ = tiny_model_files
    toml = tmp_path / "my.toml"
    toml.write_text("a = 1\n")
    with pytest.raises(WeightsUnavailableError, match=r"my.toml is a TOML text file; expected an open_clip checkpoint"):
        load_backbone(str(config), str(toml), device=Device("cpu"))  # the typed value (issue 20)


def test_the_did_you_mean_list_is_open_clips_own():
    import subprocess
    import sys

    from winclip_cli.io.model_files import architecture_names

    # a fresh process: this one has registered the tests' own configs with open_clip
    code = "import json, open_clip; print(json.dumps(open_clip.list_models()))"
    listed = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert len(listed) > 100 and architecture_names() == listed


def test_out_is_locked_before_the_job_is_imported(tmp_path, tiny_args, monkeypatch):
    """The command line takes OUT's lock before it imports the job (and torch): another process is refused
    while this one has not even started loading the model."""
    from winclip_cli.jobs import plan

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "a.png")
    out = tmp_path / "out"
    seen = []

    def probe(request, reporter, started):
        seen.append(run_cli(["scan", images, "--out", out, *tiny_args]))  # a whole scan, were OUT free
        return None

    monkeypatch.setattr(plan, "without_model", probe)
    result = invoke(["scan", images, "--out", out, "--incremental", *tiny_args])
    assert result.exit_code == 0, result.output
    assert seen[0].returncode == 4, seen[0].stderr
    assert "another winclip scan is writing to" in seen[0].stderr
    assert f"{out}/.winclip/lock" not in seen[0].stderr
    # and once the scan is over, the folder is free again
    from winclip_cli.io.state import OutputLock

    OutputLock(out).acquire().release()


def test_a_busy_folder_names_watch_when_a_watch_holds_it(tmp_path):
    from winclip_cli.io.state import OutputLock

    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, "watch"):
        result = cli_process(["scan", images, "--out", out])
    assert result.returncode == 4
    line = messages(result.stderr).strip()
    assert "another winclip watch is writing to" in line and "stop it or use another --out" in line
    assert not imported(result.stderr, "torch")


def test_the_lock_is_shared_within_one_thread_only(tmp_path):
    import threading

    from winclip_cli.io.state import OutputBusyError, OutputLock

    out = tmp_path / "out"
    outer = OutputLock(out, "scan").acquire()
    inner = OutputLock(out).acquire()  # the job inside the command: the same hold
    errors = []

    def other_thread():
        try:
            OutputLock(out).acquire()
        except OutputBusyError as err:
            errors.append(err)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1
    inner.release()
    assert (out / ".winclip" / "lock").read_text().startswith("winclip scan, pid ")  # still held
    outer.release()
    assert (out / ".winclip" / "lock").read_text() == ""
    OutputLock(out).acquire().release()  # free


# ======================================================================================== nothing to score


@pytest.fixture
def scanned(tmp_path, tiny_args):
    images = tmp_path / "images"
    shutil.copytree(SAMPLE_DATA / "fabric" / "test", images)
    out = tmp_path / "out"
    args = ["scan", images, "--out", out, "--incremental", *tiny_args]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    return images, out, args


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and ".winclip" not in path.parts and path.name != "run.json"
    }


def test_an_incremental_run_with_nothing_new_does_not_import_torch(scanned):
    images, out, args = scanned
    before = _outputs(out)
    result = cli_process(args)
    assert result.returncode == 0, messages(result.stderr)
    assert not imported(result.stderr, "torch") and not imported(result.stderr, "open_clip")
    text = messages(result.stderr)
    assert "0 images to score (6 unchanged)" in text and "the model was not loaded" in text
    assert "6 images: " in text and "(0 scored now, 6 unchanged)" in text
    assert _outputs(out) == before  # rows, heatmaps, thumbnails unchanged
    run = json.loads((out / "run.json").read_text())
    assert run["model_loaded"] is False and run["unchanged"] == 6 and run["images"] == 0
    assert run["total_rows"] == 6 and run["weights_sha256"]  # the stored configuration is still described
    assert run["process_seconds"] == pytest.approx(run["startup_seconds"] + run["seconds"], abs=0.002)


def test_a_changed_file_is_scored_with_the_model(scanned):
    images, out, args = scanned
    target = images / "good" / "textile_0101.jpg"
    Image.open(target).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
    result = cli_process(args)
    assert result.returncode == 0, messages(result.stderr)
    assert imported(result.stderr, "torch")
    assert "1 image to score (5 unchanged)" in messages(result.stderr)
    run = json.loads((out / "run.json").read_text())
    assert run["model_loaded"] is True and run["images"] == 1
    # and the run after it has nothing to do again
    assert not imported(cli_process(args).stderr, "torch")


@pytest.mark.parametrize(
    "change",
    [
        "model file",
        "refs-like option",
        "class",
        "precision auto",
        "removed file",
        "not incremental",
        "mode mutual",
        "mode mutual, other pool size",
    ],
)
def test_anything_that_changes_the_configuration_loads_the_model(scanned, change, tmp_path):
    images, out, args = scanned
    if change == "model file":
        config = Path(args[args.index("--model") + 1])
        config.write_text(config.read_text() + "\n")  # same config, touched: cannot be sure without loading
    elif change == "refs-like option":
        args = [*args, "--tile-overlap", "0.5", "--tile", "auto"]
    elif change == "class":
        args = [*args, "--class", "fabric"]
    elif change == "precision auto":
        args = [*args, "--precision", "auto"]
    elif change == "not incremental":
        args = [arg for arg in args if arg != "--incremental"]  # asks for every file to be scored again
    elif change.startswith("mode mutual"):
        # another scoring mode: every stored row was scored by WinCLIP
        mutual = [*args, "--mode", "mutual"]
        if change.endswith("pool size"):
            for image in sorted(images.rglob("*.jpg")):  # 12 images: no small-pool warning, so it is remembered
                shutil.copy(image, image.with_name("copy-" + image.name))
            first = cli_process(mutual)
            assert first.returncode == 0 and imported(first.stderr, "torch"), messages(first.stderr)
            cli_process(mutual)  # the first run warned (the mode changed), so this one is remembered
            assert not imported(cli_process(mutual).stderr, "torch")  # the same mutual run: nothing new
            mutual = [*mutual, "--pool-size", "6"]
        args = mutual
    else:
        (images / "good" / "textile_0101.jpg").unlink()
    result = cli_process(args)
    assert result.returncode == 0, messages(result.stderr)
    assert imported(result.stderr, "torch"), messages(result.stderr)


def test_a_new_threshold_relabels_without_the_model_as_a_scan_would(scanned, tmp_path, tiny_args):
    images, out, args = scanned
    scores = sorted(float(row["score"]) for row in read_results_csv(out / "scores.csv"))
    threshold = f"{(scores[2] + scores[3]) / 2:.7f}"  # between two samples' scores: half are anomalous
    result = cli_process([*args, "--threshold", threshold, "--fail-on-anomaly"])
    assert not imported(result.stderr, "torch")
    assert f"threshold is now {float(threshold):g} (--threshold): stored rows relabelled" in messages(result.stderr)
    fresh = tmp_path / "fresh"
    direct = invoke(["scan", images, "--out", fresh, "--threshold", threshold, *tiny_args])
    relabelled, scanned_rows = read_results_csv(out / "scores.csv"), read_results_csv(fresh / "scores.csv")
    assert relabelled == scanned_rows
    anomalous = sum(row["label"] == "anomalous" for row in scanned_rows)
    assert anomalous == 3  # the threshold splits the samples: the relabelling is visible
    assert result.returncode == 1 and direct.exit_code == 0  # --fail-on-anomaly counts the relabelled rows
    run = json.loads((out / "run.json").read_text())
    assert run["threshold"] == float(threshold) and run["threshold_source"] == "--threshold"
    assert run["model_loaded"] is False


def test_an_empty_shard_needs_no_model_and_merges(tmp_path, tiny_args):
    from winclip_cli.jobs.plan import shard_of

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (120, 10, 10)).save(images / "only.png")
    full = shard_of("only.png", 2)
    empty = 3 - full
    result = cli_process(["scan", images, "--shard", f"{empty}/2", "--out", tmp_path / "s-empty", *tiny_args])
    assert result.returncode == 0, messages(result.stderr)
    assert not imported(result.stderr, "torch")
    assert f"shard {empty}/2 holds no file" in messages(result.stderr)
    assert read_results_csv(tmp_path / "s-empty" / "scores.csv") == []
    assert json.loads((tmp_path / "s-empty" / "run.json").read_text())["model_loaded"] is False
    assert invoke(["scan", images, "--shard", f"{full}/2", "--out", tmp_path / "s-full", *tiny_args]).exit_code == 0
    merged = invoke(["merge", tmp_path / "s-empty", tmp_path / "s-full", "--out", tmp_path / "all"])
    assert merged.exit_code == 0, merged.output
    assert [row["path"] for row in read_results_csv(tmp_path / "all" / "scores.csv")] == ["only.png"]


def test_a_scan_records_start_up_and_model_loading(tmp_path, tiny_args):
    out = tmp_path / "out"
    result = run_cli(["scan", SAMPLE_DATA / "fabric" / "test", "--out", out, *tiny_args])
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["model_loaded"] is True
    assert run["process_seconds"] == pytest.approx(run["startup_seconds"] + run["seconds"], abs=0.002)
    assert 0 < run["model_seconds"] <= run["setup_seconds"] and run["startup_seconds"] > 0
    summary = result.stderr.strip().splitlines()[-1]
    figures = r"in [0-9.]+ s \(start-up [0-9.]+ s, model [0-9.]+ s, scoring [0-9.]+ s, [0-9.]+ images/s\)"
    assert re.search(figures, summary), summary


def test_shard_auto_takes_the_slurm_array_index(tmp_path, tiny_args, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    out = tmp_path / "out"
    result = invoke(["scan", SAMPLE_DATA / "fabric" / "test", "--shard", "auto", "--out", out, *tiny_args])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["shard"] == "3/4"
