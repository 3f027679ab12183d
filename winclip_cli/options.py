"""Defaults and option parsing, written once: every layer reads its defaults here.

The parsers turn option text into checked values and raise ``SetupError`` (exit 2) with one line.
The command-line declarations of these options (names, help, panels) are in ``cli/args.py``.

This module imports neither torch nor Typer: the CLI checks every argument with it before the
model is loaded, so a mistake fails in a fraction of a second, and the core can import its
defaults without pulling in the command line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from winclip_cli.errors import SetupError

DEFAULT_ARCHITECTURE = "ViT-B-16-plus-240"
DEFAULT_MAX_PIXELS = 80_000_000  # decompression-bomb guard: larger images are refused
DEFAULT_SCALES: tuple[int, ...] = (2, 3)  # window sizes in patches
DEFAULT_BATCH_SIZE = 8
DEFAULT_TILE_OVERLAP = 0.25
DEFAULT_FPR = 0.01  # calibrate: largest false-alarm rate on good parts
DEFAULT_CALIBRATION_FILE = Path("winclip-calibration.json")
DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HEATMAP_FORMATS = ("png", "jpg", "none")  # scan --heatmaps: PNG, JPEG, or scores only


# --------------------------------------------------------------------------------------------------- parsers


def parse_scales(text: str) -> tuple[int, ...]:
    """'2,3' or '2 3' -> (2, 3): window sizes in patches, each at least 1, no duplicates."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        scales = tuple(int(p) for p in parts)
    except ValueError:
        raise SetupError(f"--scales takes whole numbers such as '2,3', not {text!r}") from None
    if not scales or any(s < 1 for s in scales) or len(set(scales)) != len(scales):
        raise SetupError(f"--scales needs distinct window sizes of at least 1 patch, got {text!r}")
    return scales


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' with 1 <= K <= N -> (K, N); 'auto' or 'auto/N': from a job array's environment (settings.py)."""
    if text is None:
        return None
    if text == "auto" or text.startswith("auto/"):
        from winclip_cli.settings import shard_from_environment

        return shard_from_environment(text[len("auto/") :] if "/" in text else None)
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise SetupError(f"--shard takes K/N such as 2/4, or auto, not {text!r}") from None
    if not 1 <= k <= n:
        raise SetupError(f"--shard {text}: K must be between 1 and N")
    return k, n


def parse_threshold(text: str) -> float | None:
    """'auto' -> None, else a number in [0, 1]."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise SetupError(f"--threshold takes a number between 0 and 1 or 'auto', not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise SetupError(f"--threshold must be between 0 and 1, got {text}")
    return value


def parse_tile(text: str | None) -> int | str | None:
    """None (no tiling), 'auto', or a size in pixels (checked against the model's input by ``check_tile_size``)."""
    if text is None:
        return None
    if text == "auto":
        return "auto"
    try:
        size = int(text)
    except ValueError:
        raise SetupError(f"--tile takes a size in pixels or 'auto', not {text!r}") from None
    if size < 1:
        raise SetupError(f"--tile {size} is too small (a size in pixels)")
    return size


def check_tile_size(tile: int | str | None, input_size: Sequence[int]) -> None:
    """A tile smaller than the model's input would be upsampled: no detail gained, many more tiles to score."""
    if isinstance(tile, int) and tile < min(input_size):
        raise SetupError(
            f"--tile {tile} is too small: the model's input is {input_size[0]}x{input_size[1]} pixels, "
            f"so tiles must be at least {min(input_size)} (or use --tile auto)"
        )


def check_rate(option: str, value: float | None) -> float | None:
    """A false-positive rate: in [0, 1)."""
    if value is not None and not 0.0 <= value < 1.0:
        raise SetupError(f"{option} must be in [0, 1), got {value}")
    return value


def check_heatmaps(name: str) -> str:
    if name not in HEATMAP_FORMATS:
        raise SetupError(f"--heatmaps takes {', '.join(HEATMAP_FORMATS)}, not {name!r}")
    return name


def check_device(name: str) -> str:
    """A device name winclip knows; whether that device exists is checked when the model loads."""
    lowered = name.lower()
    if lowered not in DEVICES and not (lowered.startswith("cuda:") and lowered[5:].isdigit()):
        raise SetupError(f"unknown device {name!r} (choose from {', '.join(DEVICES)} or cuda:N)")
    return lowered


def check_precision(name: str) -> str:
    lowered = name.lower()
    if lowered not in PRECISIONS:
        raise SetupError(f"unknown precision {name!r} (choose from {', '.join(PRECISIONS)})")
    return lowered


def model_input_size(model: str) -> tuple[int, int] | None:
    """The input size in a model config (a JSON file, or open_clip's own config of that name), read
    without importing open_clip or torch; None when it cannot be known before the model loads."""
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        config_file = path
    else:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            return None
        config_file = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{model}.json"
    try:
        size = json.loads(config_file.read_text(encoding="utf-8"))["vision_cfg"]["image_size"]
        return (int(size[0]), int(size[1])) if isinstance(size, list | tuple) else (int(size), int(size))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass
class ModelOptions:
    """Which model, on which device, in which precision, with which window sizes (checked values)."""

    model: str = DEFAULT_ARCHITECTURE
    weights: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    scales: Sequence[int] = DEFAULT_SCALES
