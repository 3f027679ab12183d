"""What a command runs with: the typed specs every job receives, built once by the command line.

A command's spec is composed of the parts the stages need, each made of the value types of
``winclip_cli.options`` (parsed once, at the command line):

    ModelSpec   which model, device, precision, window sizes   -> the backbone and scorer
    InputSpec   batch size, pixel limit, decoding threads, tiling -> decoding and batching
    TextSpec    class name, prompt file, text cache            -> the text embeddings
    MutualSpec  pool size, layers (mode mutual)               -> the pools and their features
    OutputSpec  output folder, heatmap format, raw maps         -> the result writer
    ScanSpec    scan's and watch's spec: the parts above, threshold, references, shard

A stage takes only its part: the decoder an ``InputSpec``, the writer an ``OutputSpec``. Nothing
below ``cli/`` parses option text again or restates a default. Like ``options.py``, this module
imports neither torch nor Typer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from winclip_cli.core.prompts import DEFAULT_CLASS  # light: no torch
from winclip_cli.options import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_HEATMAPS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PRECISION,
    DEFAULT_SCALES,
    BatchSize,
    Device,
    HeatmapFormat,
    Layers,
    PoolSize,
    Precision,
    ScoringMode,
    Shard,
    Threshold,
    Tiling,
)


@dataclass(frozen=True)
class ModelSpec:
    """Which model, on which device, in which precision, with which window sizes.

    A Python caller may give ``device`` and ``precision`` as text (``ModelSpec(device="cpu")``): they
    are parsed here, by the same parsers as the command line's.
    """

    model: str = DEFAULT_ARCHITECTURE
    weights: str | None = None
    device: Device = field(default_factory=Device)
    precision: Precision = Precision(DEFAULT_PRECISION)
    scales: Sequence[int] = DEFAULT_SCALES

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", Device.parse(self.device))
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        object.__setattr__(self, "scales", tuple(self.scales))


ModelOptions = ModelSpec  # the Python API's name for it before the specs


@dataclass(frozen=True)
class InputSpec:
    """How every command reads and batches its images: scan, watch, build-refs, calibrate, eval."""

    batch_size: BatchSize = field(default_factory=BatchSize)  # model inputs (images or tiles) per batch
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused
    workers: int | None = None  # decoding threads (None: automatic)
    tiling: Tiling = field(default_factory=Tiling)


@dataclass(frozen=True)
class TextSpec:
    """What the text side of a scorer is made of: the class in the prompts, the vocabulary, the cache."""

    class_name: str = DEFAULT_CLASS
    prompts: Path | None = None
    use_cache: bool = True


@dataclass(frozen=True)
class MutualSpec:
    """Mutual scoring (``--mode mutual``): how many images a pool holds at most, and which blocks'
    patch tokens are compared."""

    pool_size: PoolSize = field(default_factory=PoolSize)
    layers: Layers = field(default_factory=Layers)


@dataclass(frozen=True)
class OutputSpec:
    """What a scan writes for each scored file, and where."""

    out: Path
    heatmaps: HeatmapFormat = HeatmapFormat(DEFAULT_HEATMAPS)
    save_maps: bool = False
    thumbnails: bool = True


@dataclass(frozen=True)
class ScanSpec:
    """``scan`` and ``watch``: what is scored (``directory``, this ``shard`` of it), with which model,
    prompts and scoring mode, against which threshold, written where."""

    directory: Path
    model: ModelSpec
    inputs: InputSpec
    text: TextSpec
    output: OutputSpec
    threshold: Threshold = Threshold()
    refs: Path | None = None  # the few-shot memory (mode few-shot)
    calibration: Path | None = None
    incremental: bool = False
    shard: Shard | None = None
    mutual: MutualSpec | None = None  # mode mutual: each image scored against the others of its pool

    @property
    def out(self) -> Path:
        return self.output.out

    @property
    def mode(self) -> ScoringMode:
        return ScoringMode.MUTUAL if self.mutual is not None else ScoringMode.of_refs(self.refs)
