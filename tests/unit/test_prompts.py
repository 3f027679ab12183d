"""The prompt ensemble, custom vocabularies, the fast text encoder and the text-embedding cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from winclip_cli.core.engine import build_engine
from winclip_cli.core.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, load_vocabulary
from winclip_cli.core.text import TextEmbeddingCache, can_truncate, encode_text_truncated
from winclip_cli.errors import PromptFileError


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
