"""Messages that say what is true (issue 22): a checkpoint of another architecture names it, counts agree
with their nouns, a folder used for two inputs is named, merge speaks in options, eval's table is whole
in a log."""

from __future__ import annotations

import shutil

from PIL import Image

from conftest import REPO, SAMPLE_DATA
from helpers import invoke

SAMPLE_TEST = SAMPLE_DATA / "fabric" / "test"


def test_a_checkpoint_of_another_architecture_names_it(tmp_path, tiny_model_files):
    _, checkpoint = tiny_model_files  # the tiny architecture, registered with open_clip by the fixture
    result = invoke(["scan", SAMPLE_TEST, "--weights", checkpoint, "--device", "cpu", "--out", tmp_path / "o"])
    assert result.exit_code == 2
    assert "its tensors are those of winclip-tiny-test; pass --model winclip-tiny-test" in result.stderr
    assert "pos_embed" not in result.stderr


def test_the_fitting_architectures_come_from_tensor_shapes():
    import open_clip
    import torch

    from winclip_cli.core.backbone import architectures_fitting

    for architecture, fitting in (
        ("ViT-B-32", ["ViT-B-32", "ViT-B-32-quickgelu"]),  # the same tensors: both are named
        ("ViT-B-16-plus-240", ["ViT-B-16-plus-240"]),
    ):
        with torch.device("meta"):
            model = open_clip.create_model(architecture, pretrained=None, device="meta")
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        assert architectures_fitting(shapes) == fitting
        del shapes["visual.proj"]
        assert architectures_fitting(shapes) == []


def test_files_gone_since_the_last_run_are_counted_in_words(tmp_path, tiny_args):
    images = tmp_path / "images"
    shutil.copytree(SAMPLE_TEST, images)
    args = ["scan", images, "--out", tmp_path / "out", "--incremental", *tiny_args]
    assert invoke(args).exit_code == 0
    (images / "good" / "textile_0101.jpg").unlink()
    assert "1 file scanned earlier is gone: its row and heatmap are removed" in invoke(args).stderr
    (images / "local" / "textile_0001.jpg").unlink()
    (images / "local" / "textile_0002.jpg").unlink()
    assert "2 files scanned earlier are gone: their rows and heatmaps are removed" in invoke(args).stderr


def test_an_output_folder_of_another_input_is_named(tmp_path, tiny_args):
    first, second = tmp_path / "camera1", tmp_path / "camera2"
    for folder, colour in ((first, 10), (second, 200)):
        folder.mkdir()
        Image.new("RGB", (64, 64), (colour, colour, colour)).save(folder / f"{folder.name}.png")
    out = tmp_path / "out"
    assert "another input" not in invoke(["scan", first, "--out", out, *tiny_args]).stderr
    assert "another input" not in invoke(["scan", first, "--out", out, *tiny_args]).stderr  # the same again
    result = invoke(["scan", second, "--out", out, *tiny_args])
    assert result.exit_code == 0
    assert f"holds the results of another input ({first.resolve()})" in result.stderr
    assert "use one --out per input folder" in result.stderr


def test_merge_names_the_options_that_differ(tmp_path, tiny_args):
    for k, name in ((1, "fabric"), (2, "cloth")):
        args = ["scan", SAMPLE_TEST, "--shard", f"{k}/2", "--class", name, "--out", tmp_path / f"s{k}", "-q"]
        assert invoke([*args, *tiny_args]).exit_code == 0
    result = invoke(["merge", tmp_path / "s1", tmp_path / "s2", "--out", tmp_path / "m"])
    assert result.exit_code == 2
    assert "scanned with another class (--class), vocabulary (--class, --prompts) than" in result.stderr


def test_eval_table_is_never_cut_when_stdout_is_not_a_terminal(tmp_path, tiny_args):
    result = invoke(["eval", SAMPLE_DATA, "--out", tmp_path / "e", *tiny_args])  # the bundled samples, as shipped
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "category" in line)
    assert "image auroc" in header and "pixel f1 max" in header and "…" not in result.stdout
    assert any("fabric" in line and "6 (4 bad)" in line for line in lines)


def test_help_and_readme_say_the_same():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    scan_help = " ".join(invoke(["scan", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "a fifth to a seventh of the size" in scan_help and "a fifth to a seventh of the size" in readme
    assert "141 the reader of --json went away" in scan_help and "| 141 |" in readme
    for command in ("merge", "report", "prompts", "watch", "eval"):
        assert "Exit codes:" in invoke([command, "--help"], env={"COLUMNS": "200"}).stdout, command
    prompts_help = invoke(["prompts", "--help"], env={"COLUMNS": "200"}).stdout
    assert "see `winclip prompts`" not in prompts_help  # it does not send its reader to itself
    assert "TESTS_" not in readme  # every measured figure is filled in


def test_report_quiet_prints_nothing(tmp_path, tiny_args):
    out = tmp_path / "out"
    assert invoke(["scan", SAMPLE_TEST, "--out", out, "-q", *tiny_args]).exit_code == 0
    quiet = invoke(["report", out, "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and (out / "report.html").is_file()
    assert "report: " in invoke(["report", out]).stderr
