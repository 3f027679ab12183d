"""What each option means, written once: its default, its value type and the parser of its text.

Each value type (``HeatmapFormat``, ``Precision``, ``Device``, ``Tiling``, ``Threshold``,
``ScoringMode``, ``BatchSize``) is frozen and carries its behaviour; its ``parse`` turns option text
into the value and raises ``SetupError`` (exit 2) with one line. The command line parses every
option once; the specs the jobs receive (``winclip_cli.spec``) hold only these values, so nothing
below ``cli/`` reads option text or restates a default. The command-line declarations (names,
help, panels) are in ``cli/args.py``.

This module imports neither torch nor Typer: the CLI checks every argument with it before the
model is loaded, so a mistake fails in a fraction of a second, and the core can import its
defaults without pulling in the command line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from winclip_cli.errors import SetupError
from winclip_cli.io.safe_fs import read_user_file

DEFAULT_ARCHITECTURE = "ViT-B-16-plus-240"
DEFAULT_MAX_PIXELS = 80_000_000  # decompression-bomb guard: larger images are refused
DEFAULT_SCALES: tuple[int, ...] = (2, 3)  # window sizes in patches
DEFAULT_TILE_OVERLAP = 0.25
DEFAULT_THRESHOLD = 0.5  # image score above which an image is anomalous, when nothing else decides
DEFAULT_FPR = 0.01  # calibrate: largest false-alarm rate on good parts
DEFAULT_CALIBRATION_FILE = Path("winclip-calibration.json")
AUTO = "auto"  # --threshold, --tile, --device, --precision, --batch-size: let winclip decide
DEFAULT_BATCH_SIZE = AUTO  # the measured best for the device and model: core/batching.py
DEFAULT_THRESHOLD_CHOICE = AUTO  # --threshold: a calibration when one fits, else DEFAULT_THRESHOLD
DEFAULT_DEVICE = AUTO
DEFAULT_PRECISION = "fp32"
DEFAULT_HEATMAPS = "png"
DEFAULT_POOL_SIZE = 200  # --pool-size: images scored against each other in mutual mode (MuSc's setting)
SMALL_POOL = 10  # mutual mode: a pool of fewer images is warned about (its scores mean little)
MAX_DISTANCE = 2.0  # mutual raw scores are distances between unit vectors: 0 to 2
DEFAULT_HOOK_TIMEOUT = 10.0  # watch --hook-timeout: seconds an --on-anomaly command may run
DEVICES = ("auto", "cuda", "mps", "cpu")


# ------------------------------------------------------------------------------------------- value types
# What an option means, as a frozen value with its behaviour. Each is parsed from option text once,
# at the command line (or by a Python caller building a spec); every layer below takes the value.


class HeatmapFormat(Enum):
    """scan --heatmaps: PNG, JPEG, or scores only. A new format is a member here and its encoder in
    ``io/outputs.py`` (``write_heatmap``); file names, merge and the report follow ``suffix``."""

    PNG = "png"
    JPG = "jpg"
    NONE = "none"

    @classmethod
    def parse(cls, text: str) -> HeatmapFormat:
        try:
            return cls(text)
        except ValueError:
            raise SetupError(f"--heatmaps takes {', '.join(HEATMAP_FORMATS)}, not {text!r}") from None

    @property
    def suffix(self) -> str:
        """The file-name ending of its heatmaps ('' when none is written)."""
        return "" if self is HeatmapFormat.NONE else "." + self.value


HEATMAP_FORMATS = tuple(member.value for member in HeatmapFormat)
HEATMAP_SUFFIXES = tuple(member.suffix for member in HeatmapFormat if member.suffix)  # every written format


class Precision(Enum):
    """The dtype the visual tower computes in; AUTO is resolved when the model loads (bf16/fp16 where fast)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        if isinstance(text, Precision):
            return text
        try:
            return cls(text.lower())
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise SetupError(f"unknown precision {text!r} (choose from {choices})") from None

    @property
    def dtype_name(self) -> str:
        """The torch dtype's name (``getattr(torch, name)``): this module stays free of torch."""
        if self is Precision.AUTO:
            raise ValueError("precision auto is resolved when the model loads")
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.value]


@dataclass(frozen=True)
class Device:
    """A device name winclip knows: auto, cuda, cuda:N, mps or cpu; whether it exists is checked when
    the model loads."""

    name: str = DEFAULT_DEVICE

    @classmethod
    def parse(cls, text: str | Device) -> Device:
        if isinstance(text, Device):
            return text
        lowered = text.lower()
        if lowered not in DEVICES and not (lowered.startswith("cuda:") and lowered[5:].isdigit()):
            raise SetupError(f"unknown device {text!r} (choose from {', '.join(DEVICES)} or cuda:N)")
        return cls(lowered)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Tiling:
    """--tile and --tile-overlap: whole images (size None), tiles of ``size`` pixels, or 'auto'."""

    size: int | str | None = None  # pixels, AUTO, or None for whole images
    overlap: float = DEFAULT_TILE_OVERLAP

    @classmethod
    def parse(cls, tile: str | None, overlap: float = DEFAULT_TILE_OVERLAP) -> Tiling:
        if not 0.0 <= overlap < 1.0:
            raise SetupError(f"--tile-overlap must be in [0, 1), got {overlap}")
        if tile is None or tile == AUTO:
            return cls(tile, overlap)
        try:
            size = int(tile)
        except ValueError:
            raise SetupError(f"--tile takes a size in pixels or 'auto', not {tile!r}") from None
        if size < 1:
            raise SetupError(f"--tile {size} is too small (a size in pixels)")
        return cls(size, overlap)

    @property
    def enabled(self) -> bool:
        return self.size is not None

    @property
    def recorded_overlap(self) -> float | None:
        """The overlap as run.json and the fingerprints record it: none without tiles."""
        return self.overlap if self.size is not None else None

    def check_fits(self, input_size: Sequence[int]) -> None:
        """A tile smaller than the model's input would be upsampled: no detail gained, many more tiles to score."""
        if isinstance(self.size, int) and self.size < min(input_size):
            raise SetupError(
                f"--tile {self.size} is too small: the model's input is {input_size[0]}x{input_size[1]} pixels, "
                f"so tiles must be at least {min(input_size)} (or use --tile auto)"
            )


@dataclass(frozen=True)
class Threshold:
    """--threshold: a number in [0, 1], or auto (``value`` None: a calibration, else the default)."""

    value: float | None = None

    @classmethod
    def parse(cls, text: str, upper: float = 1.0) -> Threshold:
        """``upper``: the largest score of the mode (1; mutual raw scores are distances up to 2)."""
        if text == AUTO:
            return cls(None)
        try:
            value = float(text)
        except ValueError:
            raise SetupError(f"--threshold takes a number between 0 and {upper:g} or 'auto', not {text!r}") from None
        if not 0.0 <= value <= upper:
            raise SetupError(f"--threshold must be between 0 and {upper:g}, got {text}")
        return cls(value)

    @property
    def auto(self) -> bool:
        return self.value is None


class ScoringMode(Enum):
    """How an image is scored: against the prompts only, also against reference images, or against
    the other images of its pool (MuSc). The mode chooses the scorer (``jobs/kernel.py``,
    ``jobs/mutual.py``); a new mode is a member here and its scorer there."""

    ZERO_SHOT = "zero-shot"
    FEW_SHOT = "few-shot"
    MUTUAL = "mutual"

    @classmethod
    def parse(cls, text: str | None, refs: Path | None) -> ScoringMode:
        """--mode with --refs: no mode means few-shot with a memory, else zero-shot; a mode that
        contradicts --refs is refused."""
        if text is None:
            return cls.of_refs(refs)
        try:
            mode = cls(text.lower())
        except ValueError:
            raise SetupError(f"--mode takes {', '.join(SCORING_MODES)}, not {text!r}") from None
        if mode is cls.FEW_SHOT and refs is None:
            raise SetupError("--mode few-shot needs a reference memory: --refs refs.npz (see `winclip build-refs`)")
        if mode is not cls.FEW_SHOT and refs is not None:
            raise SetupError(f"--mode {mode.value} takes no --refs (a memory makes the scoring few-shot)")
        return mode

    @property
    def score_range(self) -> float:
        """The largest score a threshold of this mode may take: mutual thresholds apply to raw scores."""
        return MAX_DISTANCE if self is ScoringMode.MUTUAL else 1.0

    @property
    def uses_references(self) -> bool:
        """Whether this mode compares with a memory of reference images (``--refs``)."""
        return self is ScoringMode.FEW_SHOT

    @classmethod
    def of_refs(cls, refs: Path | None) -> ScoringMode:
        """scan's mode from its options: a reference memory makes it few-shot."""
        return cls.FEW_SHOT if refs is not None else cls.ZERO_SHOT


SCORING_MODES = tuple(member.value for member in ScoringMode)


@dataclass(frozen=True)
class PoolSize:
    """--pool-size: at most this many images are scored against each other (mutual mode)."""

    value: int = DEFAULT_POOL_SIZE

    def __post_init__(self) -> None:
        # at least 3: files cut into nearly equal pools of at most 3 never leave one image alone (2 would: 2 + 1)
        if self.value < 3:
            raise SetupError(f"--pool-size must be at least 3 (images are compared with each other), not {self.value}")

    def __int__(self) -> int:
        return self.value


@dataclass(frozen=True)
class Layers:
    """--layers: the transformer blocks (0-based) whose patch tokens mutual scoring compares, or
    auto (``blocks`` None: MuSc's for the tower's depth, decided when the model loads)."""

    blocks: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> Layers:
        if text == AUTO:
            return cls(None)
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            blocks = tuple(int(p) for p in parts)
        except ValueError:
            raise SetupError(f"--layers takes block numbers such as '2,5,8,11' or 'auto', not {text!r}") from None
        if not blocks or any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
            raise SetupError(f"--layers needs distinct block numbers from 0 (0-based), got {text!r}")
        return cls(tuple(sorted(blocks)))

    def __str__(self) -> str:
        return AUTO if self.blocks is None else ",".join(map(str, self.blocks))


@dataclass(frozen=True)
class BatchSize:
    """Model inputs (images or tiles) per batch: a number, or AUTO, the measured best for the device and
    model, chosen once the model is loaded (``core/batching.py``)."""

    value: int | str = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.value != AUTO and (not isinstance(self.value, int) or self.value < 1):
            raise SetupError(f"--batch-size must be at least 1 or 'auto', got {self.value!r}")

    @classmethod
    def parse(cls, text: str | int | BatchSize) -> BatchSize:
        """'auto' (any case) or a whole number >= 1."""
        if isinstance(text, BatchSize):
            return text
        if isinstance(text, int):
            return cls(text)
        if text.strip().lower() == AUTO:
            return cls(AUTO)
        try:
            size = int(text)
        except ValueError:
            raise SetupError(f"--batch-size takes a whole number or 'auto', not {text!r}") from None
        return cls(size)

    @property
    def is_auto(self) -> bool:
        return self.value == AUTO

    def __str__(self) -> str:
        return str(self.value)


class Shard(NamedTuple):
    """--shard: shard ``number`` of ``total`` (1-based; a pair, so ``k, n = shard`` reads it).

    ``K/N`` as given, or AUTO (``auto`` or ``auto/N``): K and N from the index variables of the job array
    the run is a task of (``settings.shard_from_environment``: Slurm, a Kubernetes Indexed Job), read once
    when the command line parses the option."""

    number: int
    total: int

    @classmethod
    def parse(cls, text: str | None) -> Shard | None:
        if text is None:
            return None
        if text == AUTO or text.startswith(f"{AUTO}/"):
            from winclip_cli.settings import shard_from_environment

            return cls(*shard_from_environment(text[len(AUTO) + 1 :] if "/" in text else None))
        try:
            k_text, n_text = text.split("/")
            k, n = int(k_text), int(n_text)
        except ValueError:
            raise SetupError(f"--shard takes K/N such as 2/4, or auto, not {text!r}") from None
        if not 1 <= k <= n:
            raise SetupError(f"--shard {text}: K must be between 1 and N")
        return cls(k, n)

    def __str__(self) -> str:
        return f"{self.number}/{self.total}"


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


def parse_shard(text: str | None) -> Shard | None:
    """--shard's text as a :class:`Shard` (None without --shard)."""
    return Shard.parse(text)


def check_rate(option: str, value: float | None) -> float | None:
    """A false-positive rate: in [0, 1)."""
    if value is not None and not 0.0 <= value < 1.0:
        raise SetupError(f"{option} must be in [0, 1), got {value}")
    return value


_MODEL_CONFIG_LIMIT = 1 << 20  # an open_clip config is a few KB (the loader refuses more, with a message)


def model_input_size(model: str) -> tuple[int, int] | None:
    """The input size in a model config (a JSON file, or open_clip's own config of that name), read
    without importing open_clip or torch; None when it cannot be known before the model loads."""
    path = Path(model)
    if path.suffix == ".json" and path.exists():
        config_file = path  # read below like any file the user names: never blocking, bounded, links checked
    else:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            return None
        config_file = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{model}.json"
    try:
        text = read_user_file(config_file, _MODEL_CONFIG_LIMIT).decode("utf-8")
        size = json.loads(text)["vision_cfg"]["image_size"]
        return (int(size[0]), int(size[1])) if isinstance(size, list | tuple) else (int(size), int(size))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
