"""Text embeddings of the prompt ensemble: a fast exact encoder and an on-disk cache.

CLIP's text transformer is causal and pools at the end-of-text token, so no output the model uses
depends on the padding after it. Cutting every sequence at the longest end-of-text position of the
batch (about 15-20 of 77 tokens here) gives the same embeddings for a fraction of the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from winclip_cli.core.prompts import PromptEnsemble
from winclip_cli.settings import cache_dir

CACHE_FORMAT = 1


def _text_tower(model: nn.Module) -> Any:  # an open_clip module: its parts are attributes torch cannot type
    """The module holding the text transformer's parts: the CLIP model itself, or ``model.text``."""
    return getattr(model, "text", None) or model


def can_truncate(model: nn.Module) -> bool:
    """True when the text tower is causal, argmax-pooled and has no class token: truncation is exact."""
    tower = _text_tower(model)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    return (
        pool == "argmax"
        and getattr(tower, "attn_mask", None) is not None
        and getattr(tower, "cls_emb", None) is None
        and all(hasattr(tower, name) for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
    )


def encode_text_truncated(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Same as ``model.encode_text(tokens)`` for a causal argmax-pooled tower, on the used prefix only."""
    tower = _text_tower(model)
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = tower.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x


def encode_sentences(model: nn.Module, tokenizer, sentences: list[str], device: torch.device) -> torch.Tensor:
    """(len(sentences), D) unnormalised text embeddings."""
    tokens = tokenizer(sentences).to(device)
    with torch.inference_mode():
        if can_truncate(model):
            return encode_text_truncated(model, tokens).float()
        encode: Any = model.encode_text
        return encode(tokens).float()


def ensemble_embeddings(model: nn.Module, tokenizer, ensemble: PromptEnsemble, device: torch.device) -> torch.Tensor:
    """(2, D): the mean unnormalised embedding of the normal sentences, then of the anomalous ones."""
    normal = encode_sentences(model, tokenizer, list(ensemble.normal), device).mean(dim=0)
    anomalous = encode_sentences(model, tokenizer, list(ensemble.anomalous), device).mean(dim=0)
    return torch.stack([normal, anomalous])


class TextEmbeddingCache:
    """Ensemble vectors on disk, keyed by model identity and the exact sentences.

    A corrupt or foreign entry is ignored (and rewritten); the cache never decides a result on
    its own: a key mismatch is simply a miss.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or (cache_dir() / "text")
        self.encoder_calls = 0  # how often the text encoder actually ran (tests assert on it)

    @staticmethod
    def key(identity: dict[str, str], ensemble: PromptEnsemble) -> str:
        payload = {
            "format": CACHE_FORMAT,
            "architecture": identity["architecture"],
            "weights_sha256": identity["weights_sha256"],
            "normal": ensemble.normal,
            "anomalous": ensemble.anomalous,
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                vectors = np.asarray(data["embeddings"], dtype=np.float32)
        except (OSError, ValueError, KeyError, EOFError):
            return None
        except Exception:  # zipfile.BadZipFile and friends: a damaged entry is a miss
            return None
        if vectors.ndim != 2 or vectors.shape[0] != 2 or not np.isfinite(vectors).all():
            return None
        return torch.from_numpy(vectors)

    def store(self, key: str, embeddings: torch.Tensor) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        except OSError:
            return  # an unwritable cache costs speed next time, never a result
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, key=np.array(key), embeddings=embeddings.detach().cpu().float().numpy())
            os.replace(tmp, self.path(key))
        except OSError:
            Path(tmp).unlink(missing_ok=True)

    def get_or_compute(
        self, model: nn.Module, tokenizer, ensemble: PromptEnsemble, identity: dict[str, str], device: torch.device
    ) -> torch.Tensor:
        key = self.key(identity, ensemble)
        cached = self.load(key)
        if cached is not None:
            return cached.to(device)
        self.encoder_calls += 1
        vectors = ensemble_embeddings(model, tokenizer, ensemble, device)
        self.store(key, vectors)
        return vectors


def text_embeddings(
    model: nn.Module,
    tokenizer,
    ensemble: PromptEnsemble,
    identity: dict[str, str],
    device: torch.device,
    cache: TextEmbeddingCache | None,
) -> torch.Tensor:
    """The (2, D) ensemble vectors, from the cache when it has them."""
    if cache is None:
        return ensemble_embeddings(model, tokenizer, ensemble, device)
    return cache.get_or_compute(model, tokenizer, ensemble, identity, device)
