"""The options shared by the commands, declared once for the command line.

``scan``, ``watch``, ``build-refs``, ``calibrate`` and ``eval`` take the same model, input and tiling
options; ``scan`` and ``watch`` also share their output and threshold options (``ScanArgs``). Each
group is a frozen dataclass whose fields carry their Typer declaration, and ``with_options`` adds a
group's fields to a command and hands the command one object per group, so adding an option is one
field here (and, for its meaning, a value type or default in ``winclip_cli.options``); a group's
``parse`` turns its fields into the spec's parts (``winclip_cli.spec``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from winclip_cli.core.prompts import DEFAULT_CLASS
from winclip_cli.options import (
    AUTO,
    DEFAULT_ARCHITECTURE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_HEATMAPS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_POOL_SIZE,
    DEFAULT_PRECISION,
    DEFAULT_SCALES,
    DEFAULT_THRESHOLD,
    DEFAULT_THRESHOLD_CHOICE,
    DEFAULT_TILE_OVERLAP,
    SCORING_MODES,
    SMALL_POOL,
    BatchSize,
    Device,
    Layers,
    PoolSize,
    Precision,
    ScoringMode,
    Tiling,
    model_input_size,
    parse_scales,
)
from winclip_cli.spec import InputSpec, ModelSpec, MutualSpec

MODEL_PANEL = "Model"
INPUT_PANEL = "Input"
MODE_PANEL = "Scoring mode"

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------------------ single shared options

ClassOpt = Annotated[str, typer.Option("--class", "-c", help="Object name used in the prompts, e.g. bottle.")]
PromptsOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="TOML file that extends or replaces the prompt vocabulary (see `winclip prompts`).",
        show_default=False,
    ),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the text-embedding cache.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary (errors still print).")]

# scan and watch write the same output folder from the same options
OutFolderOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder for scores.csv and heatmaps.")]
DEFAULT_OUT = Path("winclip-out")
ThresholdOpt = Annotated[
    str,
    typer.Option(
        "--threshold",
        help="Image score above which an image is anomalous, or 'auto': the calibrated threshold when one is "
        f"available (--calibration, or stored in --refs), else {DEFAULT_THRESHOLD:g}.",
    ),
]
RefsOpt = Annotated[
    Path | None,
    typer.Option("--refs", help="Few-shot reference memory (.npz) from `winclip build-refs`.", show_default=False),
]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option("--calibration", help="Calibration file from `winclip calibrate`.", show_default=False),
]
SaveMapsOpt = Annotated[bool, typer.Option("--save-maps", help="Also write raw float32 maps as TIFF.")]
HeatmapsOpt = Annotated[
    str,
    typer.Option(
        "--heatmaps",
        help="Heatmap files: png, jpg (a fifth to a seventh of the size, much faster: for high-rate lines) or none "
        "(scores only; the report still shows a small heatmap thumbnail).",
    ),
]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per image on stdout.")]


# --------------------------------------------------------------------------------------------- option groups


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
    ] = DEFAULT_DEVICE
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="Visual tower precision: fp32 (the reference's numbers), bf16 (CUDA, and CPUs with AMX or "
            "AVX512-BF16: about 5x fp32's rate on a 2-core Sapphire Rapids; moves scores by up to about 2e-3 and "
            "maps by 8e-3, rankings kept), fp16 (CUDA only), or auto (bf16/fp16 where the hardware has it, "
            "else fp32). Example: --precision bf16",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = DEFAULT_PRECISION
    scales: Annotated[
        str,
        typer.Option("--scales", help="Window sizes in patches, e.g. '2,3'.", rich_help_panel=MODEL_PANEL),
    ] = ",".join(map(str, DEFAULT_SCALES))

    def parse(self) -> ModelSpec:
        return ModelSpec(
            model=self.model,
            weights=self.weights,
            device=Device.parse(self.device),
            precision=Precision.parse(self.precision),
            scales=parse_scales(self.scales),
        )


@dataclass(frozen=True)
class InputArgs:
    """How images are read and batched."""

    batch_size: Annotated[
        str,
        typer.Option(
            "--batch-size",
            help="Model inputs (images or tiles) per batch, or auto: the measured best for the device, precision "
            "and model (CPU: 2 for the default model in fp32, 8 in bf16, 8 for small ones; CUDA: 32), shown on "
            "the first line. "
            "Scores do not depend on it beyond float rounding (about 1e-7). Example: --batch-size 4",
            rich_help_panel=INPUT_PANEL,
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

    def parse(self, tiling: Tiling | None = None) -> InputSpec:
        """The input spec, with the tiling of ``TileArgs`` where the command takes those options."""
        return InputSpec(
            batch_size=BatchSize.parse(self.batch_size),
            max_pixels=self.max_pixels,
            workers=self.workers or None,
            tiling=tiling or Tiling(),
        )


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

    def parse(self, model: str) -> Tiling:
        """The tiling; a tile smaller than the model input is refused here when the model's config can be
        read without loading it (else when the model has loaded)."""
        tiling = Tiling.parse(self.tile, self.tile_overlap)
        input_size = model_input_size(model)
        if input_size is not None:
            tiling.check_fits(input_size)
        return tiling


@dataclass(frozen=True)
class ScanArgs:
    """What ``scan`` and ``watch`` share: the class, where and what they write, the threshold and the
    memory and calibration it may come from, the vocabulary and the text cache."""

    class_name: ClassOpt = DEFAULT_CLASS
    out: OutFolderOpt = DEFAULT_OUT
    threshold: ThresholdOpt = DEFAULT_THRESHOLD_CHOICE
    refs: RefsOpt = None
    calibration: CalibrationOpt = None
    save_maps: SaveMapsOpt = False
    heatmaps: HeatmapsOpt = DEFAULT_HEATMAPS
    json_lines: JsonLinesOpt = False
    prompts: PromptsOpt = None
    no_cache: NoCacheOpt = False


@dataclass(frozen=True)
class ModeArgs:
    """How images are scored (``scan``, ``watch``, ``calibrate``, ``eval``): by WinCLIP (zero-shot, few-shot with
    --refs) or against each other (mutual), with mutual scoring's pool size and layers."""

    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help=f"Scoring: {', '.join(SCORING_MODES)}. Default: zero-shot, or few-shot with --refs. mutual (MuSc) "
            "scores each image against the other images of its pool: no prompts or references, but the scores are "
            "relative to the pool (most parts must be good) and on another scale than WinCLIP's: its threshold is "
            "calibrated with `calibrate --mode mutual` (or given) and applies to raw_score.",
            show_default=False,
            rich_help_panel=MODE_PANEL,
        ),
    ] = None
    pool_size: Annotated[
        int,
        typer.Option(
            "--pool-size",
            help="mutual: the images are cut, in path order, into nearly equal pools of at most this many; each "
            f"image is scored against the others of its pool (fewer than {SMALL_POOL} mean little; the cost "
            "per image grows with the pool).",
            rich_help_panel=MODE_PANEL,
        ),
    ] = DEFAULT_POOL_SIZE
    layers: Annotated[
        str,
        typer.Option(
            "--layers",
            help="mutual: the transformer blocks (0-based) whose patch tokens are compared, e.g. '2,5,8,11'; "
            "auto: MuSc's for the model's depth (the last block of each quarter).",
            rich_help_panel=MODE_PANEL,
        ),
    ] = AUTO

    def parse(self, refs: Path | None = None) -> tuple[ScoringMode, MutualSpec | None]:
        """The scoring mode, and mutual scoring's spec when that is the mode."""
        mode = ScoringMode.parse(self.mode, refs)
        pool_size, layers = PoolSize(self.pool_size), Layers.parse(self.layers)
        return mode, MutualSpec(pool_size, layers) if mode is ScoringMode.MUTUAL else None


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
