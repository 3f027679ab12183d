"""The prompt ensemble: states x templates, and custom vocabularies from TOML files.

Pure data and validation; no torch here, so ``winclip prompts`` starts instantly. The tables
below are the single source that both ``winclip prompts`` and the scoring core read.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from winclip_cli.errors import PromptFileError
from winclip_cli.io.safe_fs import open_regular

PLACEHOLDER = "{}"
DEFAULT_CLASS = "object"

# The WinCLIP compositional prompt ensemble (paper, appendix; same lists as the reference implementation).
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",  # the reference lists "...of the {}." twice; the paper has this one
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

VOCABULARY_KEYS = ("mode", "normal", "anomalous", "templates")
MODES = ("extend", "replace")


@dataclass(frozen=True)
class Vocabulary:
    """States and templates; ``{}`` in a state stands for the class name, in a template for the state."""

    normal_states: tuple[str, ...] = NORMAL_STATES
    anomalous_states: tuple[str, ...] = ANOMALOUS_STATES
    templates: tuple[str, ...] = TEMPLATES
    source: str = "default"  # "default" or the TOML file it came from

    def sentences(self, class_name: str = DEFAULT_CLASS) -> tuple[list[str], list[str]]:
        """(normal, anomalous) sentences, state-major then template, as the reference orders them."""
        return (
            _compose(self.normal_states, self.templates, class_name),
            _compose(self.anomalous_states, self.templates, class_name),
        )

    def ensemble(self, class_name: str = DEFAULT_CLASS) -> PromptEnsemble:
        normal, anomalous = self.sentences(class_name)
        return PromptEnsemble(class_name=class_name, normal=tuple(normal), anomalous=tuple(anomalous), vocabulary=self)


def _compose(states: tuple[str, ...], templates: tuple[str, ...], class_name: str) -> list[str]:
    # str.replace rather than str.format: a class name or state containing braces stays literal text
    return [
        template.replace(PLACEHOLDER, state.replace(PLACEHOLDER, class_name))
        for state in states
        for template in templates
    ]


@dataclass(frozen=True)
class PromptEnsemble:
    """The exact sentences the text encoder sees for one class."""

    class_name: str
    normal: tuple[str, ...]
    anomalous: tuple[str, ...]
    vocabulary: Vocabulary

    @property
    def sha256(self) -> str:
        """Identity of what the model compares against: same hash, same text embeddings."""
        payload = json.dumps({"normal": self.normal, "anomalous": self.anomalous}, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def as_dict(self) -> dict[str, object]:
        vocab = self.vocabulary
        return {
            "class_name": self.class_name,
            "vocabulary": vocab.source,
            "sha256": self.sha256,
            "normal_states": list(vocab.normal_states),
            "anomalous_states": list(vocab.anomalous_states),
            "templates": list(vocab.templates),
            "normal": list(self.normal),
            "anomalous": list(self.anomalous),
            "counts": {"normal": len(self.normal), "anomalous": len(self.anomalous)},
        }


DEFAULT_VOCABULARY = Vocabulary()


def load_vocabulary(path: Path | None) -> Vocabulary:
    """The default vocabulary, or the one a TOML file describes (extending or replacing the default).

    File format::

        mode = "extend"                     # or "replace" (default: "extend")
        normal = ["{} in mint condition"]   # states, each with exactly one {} for the class name
        anomalous = ["{} with a scratch", "{} with a missing screw"]
        templates = ["a photo of the {} on the conveyor."]   # each with exactly one {} for the state
    """
    if path is None:
        return DEFAULT_VOCABULARY
    try:
        with open_regular(Path(path)) as handle:  # a FIFO is refused, never waited on
            raw = handle.read(PROMPT_FILE_LIMIT + 1)
        if len(raw) > PROMPT_FILE_LIMIT:
            raise PromptFileError(f"{path}: larger than {PROMPT_FILE_LIMIT // 1024} KB; not a prompt file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except OSError as err:
        raise PromptFileError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise PromptFileError(f"cannot read prompt file {path}: {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PromptFileError(f"{path}: invalid TOML: {err}") from None
    except RecursionError:
        raise PromptFileError(f"{path}: invalid TOML: nested too deeply") from None
    lines = text.splitlines()

    def where(key: str) -> str:
        return f"{path}:{_line_of_key(lines, key)}"

    unknown = [key for key in data if key not in VOCABULARY_KEYS]
    if unknown:
        key = unknown[0]
        raise PromptFileError(f"{where(key)}: unknown key {key!r} (allowed: {', '.join(VOCABULARY_KEYS)})")
    mode = data.get("mode", "extend")
    if mode not in MODES:
        raise PromptFileError(f'{where("mode")}: mode must be "extend" or "replace", not {mode!r}')

    def read_list(key: str, what: str) -> tuple[str, ...]:
        if key not in data:
            return ()
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise PromptFileError(f"{where(key)}: {key!r} must be a list of strings")
        if not value:
            raise PromptFileError(f"{where(key)}: {key!r} is an empty list; leave the key out instead")
        for item in value:
            rest = item.replace(PLACEHOLDER, "")
            if item.count(PLACEHOLDER) != 1 or "{" in rest or "}" in rest:
                raise PromptFileError(
                    f"{path}:{_line_of_string(lines, item, key)}: {what} {item!r} must contain exactly one {{}} "
                    f"(where the {'class name' if what == 'state' else 'state'} goes) and no other braces"
                )
        seen: set[str] = set()
        for item in value:
            if item in seen:
                raise PromptFileError(f"{path}:{_line_of_string(lines, item, key)}: {what} {item!r} is listed twice")
            seen.add(item)
        return tuple(value)

    normal = read_list("normal", "state")
    anomalous = read_list("anomalous", "state")
    templates = read_list("templates", "template")
    if not (normal or anomalous or templates):
        raise PromptFileError(f"{path}: no 'normal', 'anomalous' or 'templates' list found")

    if mode == "replace":
        for key, value in (("normal", normal), ("anomalous", anomalous), ("templates", templates)):
            if not value:
                raise PromptFileError(f'{path}: mode "replace" needs a non-empty {key!r} list')
        return _within_sentence_cap(Vocabulary(normal, anomalous, templates, source=str(path)))

    def extend(base: tuple[str, ...], extra: tuple[str, ...], key: str) -> tuple[str, ...]:
        for item in extra:
            if item in base:
                raise PromptFileError(
                    f"{path}:{_line_of_string(lines, item, key)}: {item!r} is already in the default {key} list"
                )
        return base + extra

    return _within_sentence_cap(
        Vocabulary(
            extend(NORMAL_STATES, normal, "normal"),
            extend(ANOMALOUS_STATES, anomalous, "anomalous"),
            extend(TEMPLATES, templates, "templates"),
            source=str(path),
        )
    )


PROMPT_FILE_LIMIT = 1 << 20  # a prompt file is a few KB
MAX_SENTENCES = 10_000  # per side: states x templates. The default has 147 normal and 84 anomalous sentences.


def _within_sentence_cap(vocabulary: Vocabulary) -> Vocabulary:
    """The vocabulary, or PromptFileError when states x templates makes more sentences than MAX_SENTENCES
    on a side: each one goes through the text encoder (180,000 sentences took 3.3 GB and 87 s)."""
    templates = len(vocabulary.templates)
    for side, states in (("normal", vocabulary.normal_states), ("anomalous", vocabulary.anomalous_states)):
        count = len(states) * templates
        if count > MAX_SENTENCES:
            raise PromptFileError(
                f"{vocabulary.source}: {len(states)} {side} states x {templates} templates make {count} sentences; "
                f"at most {MAX_SENTENCES} per side are encoded (use fewer states or templates)"
            )
    return vocabulary


def _line_of_key(lines: list[str], key: str) -> int:
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(lines, start=1):
        if pattern.match(line):
            return number
    return 1


def _line_of_string(lines: list[str], item: str, key: str) -> int:
    """Line of the first occurrence of ``item`` as a TOML string at or after ``key``'s line."""
    start = _line_of_key(lines, key)
    quoted = (json.dumps(item, ensure_ascii=False), f"'{item}'")
    for number in range(start, len(lines) + 1):
        if any(q in lines[number - 1] for q in quoted):
            return number
    return start
