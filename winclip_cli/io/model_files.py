"""The model's files checked without torch or open_clip: the architecture name or config, the checkpoint.

``--model`` and ``--weights`` (or ``$WINCLIP_WEIGHTS``) name files and open_clip configs that can be
checked by reading a few bytes: the command line does so before torch is imported, so a typo fails
in a fraction of a second with one line naming the option, and ``core/backbone.py`` runs the same
checks for Python callers. open_clip's own configs are the JSON files of its package folder, found
with ``importlib.util.find_spec``, which locates the package without running it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from winclip_cli.errors import SetupError, WeightsUnavailableError
from winclip_cli.io.safe_fs import open_regular

WEIGHTS_ENV = "WINCLIP_WEIGHTS"
DEFAULT_WEIGHTS = "laion400m_e31"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
EXPECTED_CHECKPOINT = (
    "expected an open_clip checkpoint (a state dict saved with torch.save: .pt/.pth/.bin, or .safetensors) "
    f"or a pretrained tag such as {DEFAULT_WEIGHTS}"
)


# ------------------------------------------------------------------------------------------- architecture


def open_clip_config_dir() -> Path | None:
    """open_clip's folder of model-config JSON files, located without importing open_clip (or torch)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return folder if folder.is_dir() else None


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def architecture_names() -> list[str] | None:
    """The architectures open_clip knows (its config files' stems, in open_clip's order); None when the
    folder cannot be found (then the check is left to open_clip itself)."""
    folder = open_clip_config_dir()
    if folder is None:
        return None
    return sorted((path.stem for path in folder.glob("*.json")), key=_natural_key)


def is_config_path(model: str) -> bool:
    """``--model`` names a config file (not an architecture) when it ends in .json or is a file."""
    return model.endswith(".json") or Path(model).is_file()


def read_model_config(model: str, option: str = "--model") -> dict:
    """The open_clip model config in the JSON file ``model`` (checked: a mapping with both towers, of sizes
    some CLIP has). Opened once without blocking: a FIFO or device is refused, not waited on."""
    path = Path(model)
    try:
        with open_regular(path) as handle:  # a config is a few KB
            text = handle.read(CONFIG_LIMIT + 1)
    except FileNotFoundError:
        raise SetupError(f"{option} {model}: model config file not found") from None
    except OSError as err:
        raise SetupError(f"{option} {model}: cannot read the model config ({err.strerror or err})") from None
    if len(text) > CONFIG_LIMIT:
        raise SetupError(f"{option} {model} is not an open_clip model config (larger than {CONFIG_LIMIT} bytes)")
    try:
        config = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SetupError(
            f"{option} {model}: cannot read the model config ({str(err)[:120] or 'nested too deeply'})"
        ) from None
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        raise SetupError(f"{option} {model} is not an open_clip model config (needs 'vision_cfg' and 'text_cfg')")
    check_model_config_sizes(config, model)
    return config


CONFIG_LIMIT = 1 << 20
# Far above every open_clip model (ViT-bigG-14: 48 layers, width 1664, 2.5 G parameters), far below what
# exhausts a machine's memory while the modules are built.
MAX_LAYERS = 256
MAX_WIDTH = 16384
MAX_PARAMETERS = 20_000_000_000


def check_model_config_sizes(config: dict, name: str) -> None:
    """SetupError for a config whose layer count, width or estimated parameter count is absurd."""
    total = 0
    for tower in ("vision_cfg", "text_cfg"):
        cfg = config.get(tower)
        if not isinstance(cfg, dict):
            raise SetupError(f"{name} is not an open_clip model config ({tower} is not an object)")
        sizes = {}
        for key, cap in (("layers", MAX_LAYERS), ("width", MAX_WIDTH), ("vocab_size", 10_000_000)):
            value = cfg.get(key, 1)
            if isinstance(value, list):  # ResNet towers give layers per stage
                value = sum(v for v in value if isinstance(v, int))
            if not isinstance(value, int) or isinstance(value, bool):
                continue  # open_clip says what is wrong with a non-number
            if value > cap:
                raise SetupError(f"{name}: {tower}.{key} = {value} is larger than any CLIP model (at most {cap})")
            sizes[key] = max(value, 1)
        total += 12 * sizes.get("layers", 1) * sizes.get("width", 1) ** 2 + sizes.get("vocab_size", 1) * sizes.get(
            "width", 1
        )
    if total > MAX_PARAMETERS:
        raise SetupError(f"{name}: about {total / 1e9:.0f} G parameters, larger than any CLIP model; refused")


def similar_architectures(model: str, names: list[str]) -> list[str]:
    """Up to five known names that contain the given one (case-insensitive), else close spellings."""
    close = [name for name in names if model.lower() in name.lower()]
    if not close:
        import difflib

        lowered = {name.lower(): name for name in names}
        close = [lowered[n] for n in difflib.get_close_matches(model.lower(), list(lowered), n=5, cutoff=0.8)]
    return close[:5]


def unknown_architecture_message(model: str, names: list[str]) -> str:
    close = similar_architectures(model, names)
    hint = f" (did you mean: {', '.join(close)}?)" if close else " (see open_clip.list_models())"
    return f"--model: unknown architecture {model!r}{hint}"


def check_model_option(model: str) -> None:
    """An open_clip architecture name or a model-config JSON file, checked without importing open_clip."""
    if is_config_path(model):
        read_model_config(model)
        return
    names = architecture_names()
    if names is not None and model not in names:
        raise SetupError(unknown_architecture_message(model, names))


# ---------------------------------------------------------------------------------------------- weights


def weights_request(weights: str | None) -> tuple[str, str]:
    """(the weights text in effect, where it came from): ``--weights``, ``$WINCLIP_WEIGHTS`` or the default."""
    if weights:
        return weights, "--weights"
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        return from_env, WEIGHTS_ENV
    return DEFAULT_WEIGHTS, "default"


def looks_like_path(weights: str) -> bool:
    """A checkpoint file rather than a pretrained tag: it has a folder part or a checkpoint's suffix."""
    return os.sep in weights or "/" in weights or weights.lower().endswith(CHECKPOINT_SUFFIXES)


def _named(origin: str, weights: str) -> str:
    return f"{WEIGHTS_ENV}={weights}" if origin == WEIGHTS_ENV else f"--weights {weights}"


def check_weights_option(weights: str | None) -> None:
    """The checkpoint named by ``--weights`` or ``$WINCLIP_WEIGHTS`` exists and is a checkpoint file; a
    pretrained tag is checked when open_clip is loaded (its list of tags is Python code)."""
    text, origin = weights_request(weights)
    path = Path(text).expanduser()
    if path.is_file():
        check_checkpoint_file(path, _named(origin, text))
    elif path.exists():
        raise WeightsUnavailableError(f"{_named(origin, text)} is a folder; {EXPECTED_CHECKPOINT}")
    elif looks_like_path(text):
        raise WeightsUnavailableError(
            f"{_named(origin, text)}: weights file not found (pass an existing open_clip checkpoint, "
            f"or a pretrained tag such as {DEFAULT_WEIGHTS})"
        )


def checkpoint_kind(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when it is a format a checkpoint can have; else None.

    torch.save writes a zip archive (or, before torch 1.6, a pickle stream); safetensors starts
    with the 8-byte length of its JSON header, then the header; big_vision weights are .npz/.npy.
    """
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length < 100_000_000:
            return "safetensors"
    return None


def describe_file(path: Path, head: bytes) -> str:
    """A few words on what a file that is no checkpoint holds, for the error message."""
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a checkpoint (no torch, safetensors or numpy format)"
    stripped = text.lstrip()
    if stripped.startswith("{") and path.suffix.lower() == ".json":
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            config = None
        if isinstance(config, dict) and "vision_cfg" in config:
            return "an open_clip JSON: a model config, not weights (pass it with --model)"
        return "a JSON text file"
    kinds = {".toml": "a TOML text file", ".yaml": "a YAML text file", ".yml": "a YAML text file"}
    return kinds.get(path.suffix.lower(), "a text file")


def check_checkpoint_file(path: Path, named: str) -> None:
    """Refuse (exit 2, one line) a file that cannot be a checkpoint, saying what it is and what is expected,
    before torch would try to unpickle it (whose own message suggests the unsafe weights_only=False)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise WeightsUnavailableError(f"{named}: cannot read it ({err.strerror or err})") from None
    if checkpoint_kind(head) is None:
        raise WeightsUnavailableError(f"{named} is {describe_file(path, head)}; {EXPECTED_CHECKPOINT}")
