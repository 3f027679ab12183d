"""Text embeddings of the prompt ensemble: a fast exact encoder and an on-disk cache.

CLIP's text transformer is causal and pools at the end-of-text token, so no output the model uses
depends on the padding after it. Cutting every sequence at the longest end-of-text position of the
batch (about 15-20 of 77 tokens here) gives the same embeddings for a fraction of the work.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from winclip_cli.core.prompts import PromptEnsemble
from winclip_cli.io.safe_fs import Confined, atomic_write, check_folder_is_safe, open_confined, open_folder
from winclip_cli.settings import cache_dir

CACHE_FORMAT = 2  # 2: keyed by the model config's content, entries carry a checksum


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


TEXT_BATCH = 512  # sentences per text-encoder call: memory stays bounded whatever a prompt file holds


def encode_sentences(model: nn.Module, tokenizer, sentences: list[str], device: torch.device) -> torch.Tensor:
    """(len(sentences), D) unnormalised text embeddings."""
    tokens = tokenizer(sentences).to(device)
    with torch.inference_mode():
        if can_truncate(model):
            return encode_text_truncated(model, tokens).float()
        encode: Any = model.encode_text
        return encode(tokens).float()


def mean_embedding(model: nn.Module, tokenizer, sentences: list[str], device: torch.device) -> torch.Tensor:
    """(D,) the mean unnormalised embedding of ``sentences``, encoded TEXT_BATCH at a time.

    Up to TEXT_BATCH sentences (the default ensembles have 147 and 84) go through in one call, exactly
    as before batching existed; more are summed batch by batch in float64 and divided once."""
    if len(sentences) <= TEXT_BATCH:
        return encode_sentences(model, tokenizer, sentences, device).mean(dim=0)
    total: torch.Tensor | None = None
    for start in range(0, len(sentences), TEXT_BATCH):
        part = encode_sentences(model, tokenizer, sentences[start : start + TEXT_BATCH], device).double().sum(dim=0)
        total = part if total is None else total + part
    assert total is not None  # more than TEXT_BATCH sentences: at least one batch
    return (total / len(sentences)).float()


def ensemble_embeddings(model: nn.Module, tokenizer, ensemble: PromptEnsemble, device: torch.device) -> torch.Tensor:
    """(2, D): the mean unnormalised embedding of the normal sentences, then of the anomalous ones."""
    normal = mean_embedding(model, tokenizer, list(ensemble.normal), device)
    anomalous = mean_embedding(model, tokenizer, list(ensemble.anomalous), device)
    return torch.stack([normal, anomalous])


def embedding_width(model: nn.Module) -> int | None:
    """D, the width of the text embeddings ``model`` makes (None when it cannot be told without encoding)."""
    projection = getattr(_text_tower(model), "text_projection", None)
    if isinstance(projection, nn.Linear):
        return int(projection.out_features)
    if isinstance(projection, torch.Tensor) and projection.ndim == 2:
        return int(projection.shape[1])
    return None


_ENTRY_LIMIT = 16 << 20  # (2, D) float32 with D in the thousands is a few KB


class TextEmbeddingCache:
    """Ensemble vectors on disk, keyed by the model's identity (its config's content and its weights'
    sha256) and the exact sentences.

    An entry is used only when it is a regular file of this user in a folder of this user that nobody else
    can write to (reached without links, never blocking on a FIFO), holds this key, has the shape (2, D)
    the model makes, float32, finite values, and the sha256 of the vectors stored beside them. Anything
    else is a miss and is rebuilt: the cache never decides a result on its own.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or (cache_dir() / "text")
        self.encoder_calls = 0  # how often the text encoder actually ran (tests assert on it)

    @staticmethod
    def key(identity: dict[str, str], ensemble: PromptEnsemble) -> str:
        payload = {
            "format": CACHE_FORMAT,
            "architecture": identity["architecture"],
            "model_config_sha256": identity.get("model_config_sha256", ""),
            "weights_sha256": identity["weights_sha256"],
            "normal": ensemble.normal,
            "anomalous": ensemble.anomalous,
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def _entry(self, key: str) -> Confined:
        return Confined(self.directory.parent, f"{self.directory.name}/{key}.npz")

    def _trusted_folder(self) -> bool:
        """The cache folder exists, is no link, belongs to this user and only this user can write in it."""
        try:
            with open_folder(self.directory.parent, [], create=False) as parent:
                check_folder_is_safe(parent, self.directory.parent)  # else text/ could be renamed and swapped
            with open_folder(self.directory.parent, [self.directory.name], create=False) as folder:
                info = os.fstat(folder)
        except OSError:
            return False
        return info.st_uid == os.geteuid() and not info.st_mode & 0o022

    def load(self, key: str, width: int | None = None) -> torch.Tensor | None:
        if not self._trusted_folder():
            return None
        try:
            with open_confined(self._entry(key)) as handle:
                info = os.fstat(handle.fileno())
                if info.st_uid != os.geteuid() or info.st_mode & 0o022 or info.st_size > _ENTRY_LIMIT:
                    return None
                data = handle.read(_ENTRY_LIMIT + 1)
            with np.load(io.BytesIO(data), allow_pickle=False) as stored:
                if str(stored["key"]) != key:
                    return None
                vectors = stored["embeddings"]
                checksum = str(stored["sha256"])
        except (OSError, ValueError, KeyError, EOFError):
            return None
        except Exception:  # zipfile.BadZipFile and friends: a damaged entry is a miss
            return None
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != 2:
            return None
        if (width is not None and vectors.shape[1] != width) or not np.isfinite(vectors).all():
            return None
        if hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest() != checksum:
            return None
        return torch.from_numpy(np.array(vectors))

    def store(self, key: str, embeddings: torch.Tensor) -> None:
        vectors = np.ascontiguousarray(embeddings.detach().cpu().float().numpy())
        checksum = hashlib.sha256(vectors.tobytes()).hexdigest()
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            with open_folder(self.directory.parent, [], create=False) as parent:
                check_folder_is_safe(parent, self.directory.parent)
            # folder 0700, file 0600: the entries decide scores, nobody else may write (or swap) them
            with atomic_write(self._entry(key), mode=0o600, folder_mode=0o700) as handle:
                np.savez(handle, key=np.array(key), embeddings=vectors, sha256=np.array(checksum))
        except OSError:
            return  # an unwritable cache costs speed next time, never a result

    def get_or_compute(
        self, model: nn.Module, tokenizer, ensemble: PromptEnsemble, identity: dict[str, str], device: torch.device
    ) -> torch.Tensor:
        key = self.key(identity, ensemble)
        cached = self.load(key, embedding_width(model))
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
