"""Shared fixtures: a tiny open_clip model with seeded random weights, saved the way users save theirs.

Every test runs with its own winclip cache directory, so nothing reads or writes the user's cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Isolate even session-scoped fixtures (created before any monkeypatch) from the user's cache.
os.environ["WINCLIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="winclip-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("WINCLIP_WEIGHTS", None)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"

# Same 240 px input and 16 px patches as ViT-B-16-plus-240 (a 15 x 15 grid), a fraction of the width.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("winclip-cache")
    monkeypatch.setenv("WINCLIP_CACHE_DIR", str(cache))
    monkeypatch.delenv("WINCLIP_WEIGHTS", raising=False)
    # No test may reach a model hub, even by accident.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config JSON, checkpoint .pt) of the tiny model, created once per test session."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny-model")
    config = folder / "winclip-tiny-test.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("winclip-tiny-test", pretrained=None)
    # open_clip initialises some weights to exact zeros/ones; random values everywhere make the
    # tests sensitive to any mix-up of tokens, windows or layers.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            param.add_(0.02 * torch.randn_like(param))
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_files):
    """The tiny model loaded through the product's own loader (config JSON + checkpoint file)."""
    from winclip_cli.core.engine import build_backbone
    from winclip_cli.spec import ModelSpec

    config, checkpoint = tiny_model_files
    return build_backbone(ModelSpec(model=str(config), weights=str(checkpoint), device="cpu"))


@pytest.fixture
def tiny_args(tiny_model_files) -> list[str]:
    """CLI options that load the tiny model through the real --model/--weights path, on the CPU."""
    config, checkpoint = tiny_model_files
    return ["--model", str(config), "--weights", str(checkpoint), "--device", "cpu"]


@pytest.fixture
def tiny_options(tiny_model_files):
    from winclip_cli.spec import ModelSpec

    config, checkpoint = tiny_model_files
    return ModelSpec(model=str(config), weights=str(checkpoint), device="cpu")


SYSTEM_TESTS = Path(__file__).resolve().parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/system/ is marked ``system`` (select with -m system, skip with -m "not system")."""
    for item in items:
        if item.path.is_relative_to(SYSTEM_TESTS):
            item.add_marker(pytest.mark.system)
