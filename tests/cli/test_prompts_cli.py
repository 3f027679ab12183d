"""The `winclip prompts` command and `scan --prompts`: tables, JSON, errors and a custom vocabulary's scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLE_DATA
from helpers import invoke
from winclip_cli.core.prompts import TEMPLATES, load_vocabulary
from winclip_cli.io.outputs import read_results_csv

GOOD = SAMPLE_DATA / "fabric" / "good"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vocab.toml"
    path.write_text(text)
    return path


def test_prompts_command_tables_and_json(tmp_path):
    result = invoke(["prompts", "--class", "bottle"])
    assert result.exit_code == 0
    assert "147 normal and 84 anomalous sentences" in result.output
    assert "a photo of a bottle with damage for anomaly detection." in result.output
    result = invoke(["prompts", "--class", "bottle", "--json"])
    doc = json.loads(result.stdout)
    assert doc["counts"] == {"normal": 147, "anomalous": 84}
    assert doc["normal"][0] == "a cropped photo of the bottle." and doc["templates"] == list(TEMPLATES)
    assert len(doc["sha256"]) == 64 and doc["vocabulary"] == "default"
    vocab = write(tmp_path, 'anomalous = ["{} with a scratch"]\n')
    doc = json.loads(invoke(["prompts", "--prompts", str(vocab), "--json"]).stdout)
    assert doc["counts"] == {"normal": 147, "anomalous": 105} and doc["vocabulary"] == str(vocab)


def test_prompts_command_invalid_file_exits_2(tmp_path):
    vocab = write(tmp_path, 'anomalous = ["scratch"]\n')
    result = invoke(["prompts", "--prompts", str(vocab)])
    assert result.exit_code == 2 and f"{vocab}:1:" in result.stderr


def test_prompts_json_does_not_import_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom winclip_cli.cli.app import app\n"
        "r = CliRunner().invoke(app, ['prompts', '--json'])\nassert r.exit_code == 0\n"
        "print('torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


def test_scanning_with_a_custom_vocabulary_changes_scores(tmp_path, tiny_model_files):
    config, checkpoint = tiny_model_files
    args = ["--model", str(config), "--weights", str(checkpoint), "--device", "cpu", "-q"]
    vocab = write(tmp_path, 'mode = "replace"\nnormal = ["{}"]\nanomalous = ["{} with a hole"]\ntemplates = ["{}"]\n')
    default_out, custom_out = tmp_path / "default", tmp_path / "custom"
    assert invoke(["scan", str(GOOD), "--out", str(default_out), *args]).exit_code == 0
    result = invoke(["scan", str(GOOD), "--out", str(custom_out), "--prompts", str(vocab), *args])
    assert result.exit_code == 0, result.output
    default_rows = read_results_csv(default_out / "scores.csv")
    custom_rows = read_results_csv(custom_out / "scores.csv")
    assert [r["score"] for r in default_rows] != [r["score"] for r in custom_rows]
    expected_hash = load_vocabulary(vocab).ensemble("object").sha256
    assert {r["vocabulary_sha256"] for r in custom_rows} == {expected_hash}
    assert json.loads((custom_out / "run.json").read_text())["vocabulary"] == str(vocab)


def test_scan_with_invalid_vocabulary_exits_2_before_loading_a_model(tmp_path):
    vocab = write(tmp_path, "colour = 1\n")
    result = invoke(["scan", str(GOOD), "--prompts", str(vocab), "--weights", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "unknown key 'colour'" in result.stderr
