"""Every option shared by the commands that load a model, declared once: names, help, defaults, parsing.

``scan``, ``build-refs``, ``calibrate`` and ``eval`` take the same model, input and tiling options.
Each group is a frozen dataclass whose fields carry their Typer declaration, and ``with_options``
adds a group's fields to a command and hands the command one object per group, so adding an option
is one field here. The parsers turn option text into checked values and raise ``SetupError``
(exit 2) with one line.

This module must not import torch (nor anything that does): the CLI checks every argument with it
before the model is loaded, so a mistake fails in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from .errors import SetupError

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

MODEL_PANEL = "Model"
INPUT_PANEL = "Input"

F = TypeVar("F", bound=Callable[..., Any])


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
    """'K/N' with 1 <= K <= N -> (K, N)."""
    if text is None:
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise SetupError(f"--shard takes K/N such as 2/4, not {text!r}") from None
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


# ---------------------------------------------------------------------------------------------- option groups


@dataclass
class ModelOptions:
    """Which model, on which device, in which precision, with which window sizes (checked values)."""

    model: str = DEFAULT_ARCHITECTURE
    weights: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    scales: Sequence[int] = DEFAULT_SCALES


@dataclass(frozen=True)
class ModelArgs:
    """The model options as typed on the command line."""

    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="open_clip architecture name, or path to an open_clip model-config JSON.",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = DEFAULT_ARCHITECTURE
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Pretrained tag (downloaded once into the cache) or a local checkpoint file "
            "(.pt/.bin/.safetensors) for offline machines. Default: $WINCLIP_WEIGHTS, else laion400m_e31.",
            show_default=False,
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu.",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = "auto"
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="Visual tower precision: fp32, bf16, fp16, or auto (bf16/fp16 where fast).",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = "fp32"
    scales: Annotated[
        str,
        typer.Option("--scales", help="Window sizes in patches, e.g. '2,3'.", rich_help_panel=MODEL_PANEL),
    ] = ",".join(map(str, DEFAULT_SCALES))

    def parse(self) -> ModelOptions:
        return ModelOptions(
            model=self.model,
            weights=self.weights,
            device=check_device(self.device),
            precision=check_precision(self.precision),
            scales=parse_scales(self.scales),
        )


@dataclass(frozen=True)
class InputArgs:
    """How images are read and batched."""

    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, help="Model inputs (images or tiles) per batch.", rich_help_panel=INPUT_PANEL
        ),
    ] = DEFAULT_BATCH_SIZE
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            min=1,
            help="Refuse images larger than this many pixels (decompression bombs).",
            rich_help_panel=INPUT_PANEL,
        ),
    ] = DEFAULT_MAX_PIXELS
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Decoding threads (0: automatic).", rich_help_panel=INPUT_PANEL)
    ] = 0

    def parse(self) -> dict[str, Any]:
        """Keyword arguments of the jobs' InputOptions."""
        return {"batch_size": self.batch_size, "max_pixels": self.max_pixels, "workers": self.workers or None}


@dataclass(frozen=True)
class TileArgs:
    """Tiled scoring of large images."""

    tile: Annotated[
        str | None,
        typer.Option(
            "--tile",
            help="Cut large images into tiles of SIZE pixels (at least the model's input size) or 'auto', "
            "and score each tile.",
            show_default=False,
            rich_help_panel=INPUT_PANEL,
        ),
    ] = None
    tile_overlap: Annotated[
        float,
        typer.Option(
            "--tile-overlap", help="Overlap between neighbouring tiles, in [0, 1).", rich_help_panel=INPUT_PANEL
        ),
    ] = DEFAULT_TILE_OVERLAP

    def parse(self, model: str) -> dict[str, Any]:
        """Keyword arguments of the jobs' InputOptions; a tile smaller than the model input is refused here
        when the model's config can be read without loading it (else when the model has loaded)."""
        tile = parse_tile(self.tile)
        if not 0.0 <= self.tile_overlap < 1.0:
            raise SetupError(f"--tile-overlap must be in [0, 1), got {self.tile_overlap}")
        input_size = model_input_size(model)
        if input_size is not None:
            check_tile_size(tile, input_size)
        return {"tile": tile, "tile_overlap": self.tile_overlap}


def with_options(**groups: type) -> Callable[[F], F]:
    """Add the fields of each option group to a Typer command; the command receives one group object per name.

    ``@with_options(model_args=ModelArgs)`` on ``def scan(..., model_args: ModelArgs)`` gives ``scan`` the
    options ``--model --weights --device --precision --scales`` and calls it with ``model_args=ModelArgs(...)``.
    """

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in groups]
        added: list[inspect.Parameter] = []
        owner: dict[str, str] = {}
        for group_name, group in groups.items():
            hints = get_type_hints(group, include_extras=True)
            for field in dataclasses.fields(group):
                if field.name in owner or field.name in signature.parameters:
                    raise TypeError(f"option {field.name!r} of {group.__name__} is declared twice")
                added.append(
                    inspect.Parameter(
                        field.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[field.name], default=field.default
                    )
                )
                owner[field.name] = group_name

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {name: {} for name in groups}
            for name in owner:
                if name in kwargs:
                    values[owner[name]][name] = kwargs.pop(name)
            bundles = {name: groups[name](**fields) for name, fields in values.items()}
            return command(*args, **kwargs, **bundles)

        parameters = own + added
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper  # type: ignore[return-value]

    return decorate
