"""Assembles a scorer from command-line choices: backbone, vocabulary, text embeddings, memory.

The one place where ``scan``, ``build-refs`` and the other commands turn their options into
the objects the pipeline needs, so that they can never disagree about how an image is embedded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from winclip_cli.core.backbone import Backbone, load_backbone
from winclip_cli.core.prompts import DEFAULT_CLASS, PromptEnsemble, load_vocabulary
from winclip_cli.core.text import TextEmbeddingCache, text_embeddings
from winclip_cli.core.winclip import WinClipScorer
from winclip_cli.errors import SetupError
from winclip_cli.spec import ModelOptions as ModelOptions  # the older import path of the Python API
from winclip_cli.spec import ModelSpec


@dataclass
class Engine:
    backbone: Backbone
    scorer: WinClipScorer
    ensemble: PromptEnsemble
    text_encoder_calls: int = 0


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip logs warnings on the root logger (e.g. 'no pretrained weights' before we load ours)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_backbone(options: ModelSpec) -> Backbone:
    with quiet_open_clip():
        return load_backbone(options.model, options.weights, options.device, options.precision)


def build_engine(
    options: ModelSpec,
    class_name: str = DEFAULT_CLASS,
    prompts_file: Path | None = None,
    use_cache: bool = True,
    backbone: Backbone | None = None,
) -> Engine:
    """Backbone (unless given), vocabulary, text embeddings (cached) and a zero-shot scorer."""
    vocabulary = load_vocabulary(prompts_file)  # validate the cheap inputs before loading a model
    ensemble = vocabulary.ensemble(class_name or DEFAULT_CLASS)
    backbone = backbone or build_backbone(options)
    grid = backbone.model.visual.grid_size
    for scale in options.scales:
        if scale > min(grid):
            raise SetupError(f"window scale {scale} is larger than the model's {grid[0]}x{grid[1]} patch grid")
    cache = TextEmbeddingCache() if use_cache else None
    text = text_embeddings(backbone.model, backbone.tokenizer, ensemble, backbone.identity, backbone.device, cache)
    scorer = WinClipScorer(backbone.model.visual, text, scales=options.scales)
    calls = cache.encoder_calls if cache is not None else 1
    return Engine(backbone=backbone, scorer=scorer, ensemble=ensemble, text_encoder_calls=calls)
