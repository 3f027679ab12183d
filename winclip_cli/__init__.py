"""winclip: zero-/few-shot visual anomaly classification and segmentation with WinCLIP.

The Python API, for scoring from your own code (the ``winclip`` command is built on the same)::

    from winclip_cli import ModelOptions, build_engine, load_image, preprocess

    engine = build_engine(ModelOptions(weights="/models/vit_b_16_plus_240.pt"), "bottle")
    image = load_image(Path("part.png"))
    size, mean, std = engine.backbone.image_size, engine.backbone.mean, engine.backbone.std
    scores, maps = engine.scorer.score(preprocess(image, size, mean, std)[None])

Packages by role: ``core`` (the WinCLIP math, model, prompts, tiling, calibration, metrics),
``io`` (images, outputs, memory files, run state, datasets), ``jobs`` (what the commands run),
``report`` (the HTML page); ``cli`` (the command line). The names below are imported on first
use, so ``import winclip_cli`` stays as light as the command line's ``--help``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ModelOptions": "winclip_cli.spec",
    "ModelSpec": "winclip_cli.spec",
    "InputSpec": "winclip_cli.spec",
    "Engine": "winclip_cli.core.engine",
    "build_engine": "winclip_cli.core.engine",
    "build_backbone": "winclip_cli.core.engine",
    "WinClipScorer": "winclip_cli.core.winclip",
    "ReferenceMemory": "winclip_cli.core.winclip",
    "Scores": "winclip_cli.core.winclip",
    "PromptEnsemble": "winclip_cli.core.prompts",
    "load_vocabulary": "winclip_cli.core.prompts",
    "Calibration": "winclip_cli.core.calibration",
    "LoadedImage": "winclip_cli.io.images",
    "load_image": "winclip_cli.io.images",
    "preprocess": "winclip_cli.io.images",
    "MemoryFile": "winclip_cli.io.memory",
    "load_memory": "winclip_cli.io.memory",
    "attach_memory": "winclip_cli.io.memory",
    "WinclipError": "winclip_cli.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'winclip_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
