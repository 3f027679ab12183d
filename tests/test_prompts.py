"""The prompt ensemble, custom vocabularies, the fast text encoder and the text-embedding cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SAMPLE_DATA
from winclip_cli.cli.app import app
from winclip_cli.core.engine import build_engine
from winclip_cli.core.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, load_vocabulary
from winclip_cli.core.text import TextEmbeddingCache, can_truncate, encode_text_truncated
from winclip_cli.errors import PromptFileError
from winclip_cli.io.outputs import read_results_csv

runner = CliRunner()
GOOD = SAMPLE_DATA / "fabric" / "good"


def test_default_ensemble_counts_order_and_uniqueness():
    ensemble = load_vocabulary(None).ensemble("bottle")
    assert (len(NORMAL_STATES), len(ANOMALOUS_STATES), len(TEMPLATES)) == (7, 4, 21)
    assert len(ensemble.normal) == 147 and len(ensemble.anomalous) == 84
    assert ensemble.normal[0] == "a cropped photo of the bottle."
    assert ensemble.normal[1] == "a close-up photo of a bottle."
    assert ensemble.normal[21] == "a cropped photo of the flawless bottle."
    assert ensemble.normal[-1] == "a photo of a bottle without damage for anomaly detection."
    assert ensemble.anomalous[0] == "a cropped photo of the damaged bottle."
    assert ensemble.anomalous[-1] == "a photo of a bottle with damage for anomaly detection."
    assert len(set(ensemble.normal)) == 147 and len(set(ensemble.anomalous)) == 84
    assert "a jpeg corrupted photo of a bottle." in ensemble.normal
    assert "a jpeg corrupted photo of the bottle." in ensemble.normal
    assert load_vocabulary(None).ensemble().normal[0] == "a cropped photo of the object."


def test_class_name_with_braces_stays_literal():
    ensemble = load_vocabulary(None).ensemble("{weird} part")
    assert ensemble.normal[0] == "a cropped photo of the {weird} part."


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vocab.toml"
    path.write_text(text)
    return path


def test_extend_and_replace(tmp_path):
    extend = load_vocabulary(
        write(tmp_path, 'mode = "extend"\nanomalous = ["{} with a scratch", "{} with a missing screw"]\n')
    )
    assert extend.anomalous_states == ANOMALOUS_STATES + ("{} with a scratch", "{} with a missing screw")
    assert extend.normal_states == NORMAL_STATES and extend.templates == TEMPLATES
    ens = extend.ensemble("lid")
    assert (
        len(ens.anomalous) == 6 * 21
        and ens.anomalous[-1] == "a photo of a lid with a missing screw for anomaly detection."
    )
    replace = load_vocabulary(
        write(
            tmp_path,
            'mode = "replace"\nnormal = ["good {}"]\nanomalous = ["scratched {}", "dented {}"]\n'
            'templates = ["a photo of the {}.", "{} on the belt"]\n',
        )
    )
    ens = replace.ensemble("can")
    assert ens.normal == ("a photo of the good can.", "good can on the belt")
    assert ens.anomalous == (
        "a photo of the scratched can.",
        "scratched can on the belt",
        "a photo of the dented can.",
        "dented can on the belt",
    )
    assert ens.sha256 != load_vocabulary(None).ensemble("can").sha256


@pytest.mark.parametrize(
    "text, line, words",
    [
        ('mode = "extend"\nanomalous = ["scratched part"]\n', 2, "exactly one {}"),
        ('normal = ["{} ok"]\n\nanomalous = []\n', 3, "empty list"),
        ('normal = ["{} ok"]\ncolour = "red"\n', 2, "unknown key 'colour'"),
        ('mode = "merge"\nnormal = ["{} ok"]\n', 1, "mode must be"),
        ('anomalous = [\n  "{} bent",\n  "{} {} twice",\n]\n', 3, "exactly one {}"),
        ('templates = ["a photo of {}", "a photo of {}"]\n', 1, "listed twice"),
        ('anomalous = ["damaged {}"]\n', 1, "already in the default"),
        ('mode = "replace"\nnormal = ["{} ok"]\n', 0, "needs a non-empty"),
        ("normal = [1, 2]\n", 1, "list of strings"),
        ('normal = ["{} ok"\n', 0, "invalid TOML"),
        ('mode = "extend"\n', 0, "no 'normal'"),
    ],
)
def test_invalid_vocabularies_name_the_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(PromptFileError) as info:
        load_vocabulary(path)
    message = str(info.value)
    assert words in message
    if line:
        assert f"{path}:{line}:" in message


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_vocabulary(tmp_path / "nope.toml")


def test_prompts_command_tables_and_json(tmp_path):
    result = runner.invoke(app, ["prompts", "--class", "bottle"])
    assert result.exit_code == 0
    assert "147 normal and 84 anomalous sentences" in result.output
    assert "a photo of a bottle with damage for anomaly detection." in result.output
    result = runner.invoke(app, ["prompts", "--class", "bottle", "--json"])
    doc = json.loads(result.stdout)
    assert doc["counts"] == {"normal": 147, "anomalous": 84}
    assert doc["normal"][0] == "a cropped photo of the bottle." and doc["templates"] == list(TEMPLATES)
    assert len(doc["sha256"]) == 64 and doc["vocabulary"] == "default"
    vocab = write(tmp_path, 'anomalous = ["{} with a scratch"]\n')
    doc = json.loads(runner.invoke(app, ["prompts", "--prompts", str(vocab), "--json"]).stdout)
    assert doc["counts"] == {"normal": 147, "anomalous": 105} and doc["vocabulary"] == str(vocab)


def test_prompts_command_invalid_file_exits_2(tmp_path):
    vocab = write(tmp_path, 'anomalous = ["scratch"]\n')
    result = runner.invoke(app, ["prompts", "--prompts", str(vocab)])
    assert result.exit_code == 2 and f"{vocab}:1:" in result.stderr


def test_prompts_json_does_not_import_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom winclip_cli.cli.app import app\n"
        "r = CliRunner().invoke(app, ['prompts', '--json'])\nassert r.exit_code == 0\n"
        "print('torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


# ------------------------------------------------------------------------------------------------ text path


def test_truncated_text_encoder_equals_open_clip(tiny_backbone):
    model = tiny_backbone.model
    assert can_truncate(model)
    ensemble = load_vocabulary(None).ensemble("screw")
    tokens = tiny_backbone.tokenizer(list(ensemble.normal) + ["x"])
    with torch.no_grad():
        expected = model.encode_text(tokens)
        fast = encode_text_truncated(model, tokens)
    assert int(tokens.argmax(dim=-1).max()) + 1 < 77 // 2  # the fast path really is shorter
    assert torch.allclose(fast, expected, atol=1e-5)


def test_cache_hit_skips_the_text_encoder(tiny_options, tiny_backbone, isolated_cache):
    first = build_engine(tiny_options, "bottle", backbone=tiny_backbone)
    second = build_engine(tiny_options, "bottle", backbone=tiny_backbone)
    assert first.text_encoder_calls == 1 and second.text_encoder_calls == 0
    assert torch.equal(first.scorer.text_embeddings, second.scorer.text_embeddings)
    assert len(list((isolated_cache / "text").glob("*.npz"))) == 1
    # another class is another key
    assert build_engine(tiny_options, "screw", backbone=tiny_backbone).text_encoder_calls == 1
    # --no-cache never reads it
    assert build_engine(tiny_options, "bottle", use_cache=False, backbone=tiny_backbone).text_encoder_calls == 1


def test_corrupt_cache_entry_is_rebuilt(tiny_options, tiny_backbone, isolated_cache):
    first = build_engine(tiny_options, "bottle", backbone=tiny_backbone)
    (entry,) = (isolated_cache / "text").glob("*.npz")
    entry.write_bytes(b"garbage")
    rebuilt = build_engine(tiny_options, "bottle", backbone=tiny_backbone)
    assert rebuilt.text_encoder_calls == 1
    assert torch.allclose(rebuilt.scorer.text_embeddings, first.scorer.text_embeddings)
    with np.load(entry, allow_pickle=False) as data:  # rewritten as a valid entry
        assert data["embeddings"].shape == (2, 32)
    assert build_engine(tiny_options, "bottle", backbone=tiny_backbone).text_encoder_calls == 0


def test_changed_vocabulary_misses_the_cache(tmp_path, tiny_options, tiny_backbone):
    assert build_engine(tiny_options, "bottle", backbone=tiny_backbone).text_encoder_calls == 1
    vocab = write(tmp_path, 'anomalous = ["{} with a scratch"]\n')
    assert build_engine(tiny_options, "bottle", vocab, backbone=tiny_backbone).text_encoder_calls == 1
    assert build_engine(tiny_options, "bottle", vocab, backbone=tiny_backbone).text_encoder_calls == 0


def test_cached_embeddings_equal_fresh_ones(tiny_options, tiny_backbone):
    cached = TextEmbeddingCache()
    ensemble = load_vocabulary(None).ensemble("bottle")
    args = (tiny_backbone.model, tiny_backbone.tokenizer, ensemble, tiny_backbone.identity, tiny_backbone.device)
    a = cached.get_or_compute(*args)
    b = cached.get_or_compute(*args)
    with torch.no_grad():
        tokens_n = tiny_backbone.tokenizer(list(ensemble.normal))
        tokens_a = tiny_backbone.tokenizer(list(ensemble.anomalous))
        plain = torch.stack(
            [tiny_backbone.model.encode_text(tokens_n).mean(0), tiny_backbone.model.encode_text(tokens_a).mean(0)]
        )
    assert cached.encoder_calls == 1
    assert torch.allclose(a, plain, atol=1e-5) and torch.equal(a, b)


def test_scanning_with_a_custom_vocabulary_changes_scores(tmp_path, tiny_model_files):
    config, checkpoint = tiny_model_files
    args = ["--model", str(config), "--weights", str(checkpoint), "--device", "cpu", "-q"]
    vocab = write(tmp_path, 'mode = "replace"\nnormal = ["{}"]\nanomalous = ["{} with a hole"]\ntemplates = ["{}"]\n')
    default_out, custom_out = tmp_path / "default", tmp_path / "custom"
    assert runner.invoke(app, ["scan", str(GOOD), "--out", str(default_out), *args]).exit_code == 0
    result = runner.invoke(app, ["scan", str(GOOD), "--out", str(custom_out), "--prompts", str(vocab), *args])
    assert result.exit_code == 0, result.output
    default_rows = read_results_csv(default_out / "scores.csv")
    custom_rows = read_results_csv(custom_out / "scores.csv")
    assert [r["score"] for r in default_rows] != [r["score"] for r in custom_rows]
    expected_hash = load_vocabulary(vocab).ensemble("object").sha256
    assert {r["vocabulary_sha256"] for r in custom_rows} == {expected_hash}
    assert json.loads((custom_out / "run.json").read_text())["vocabulary"] == str(vocab)


def test_scan_with_invalid_vocabulary_exits_2_before_loading_a_model(tmp_path):
    vocab = write(tmp_path, "colour = 1\n")
    result = runner.invoke(app, ["scan", str(GOOD), "--prompts", str(vocab), "--weights", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "unknown key 'colour'" in result.stderr
