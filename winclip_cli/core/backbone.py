"""open_clip model creation: architecture and weight resolution, device and precision choice.

Knows nothing about anomalies. Weights come from an open_clip pretrained tag (downloaded into the
winclip cache, for machines with internet) or from a local checkpoint file (air-gapped machines);
either way they are loaded without unpickling arbitrary objects (``weights_only=True`` or safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from winclip_cli.errors import SetupError, WeightsUnavailableError
from winclip_cli.io.hashing import sha256_handle
from winclip_cli.io.model_files import (
    CHECKPOINT_SUFFIXES,  # noqa: F401  (where callers found it before)
    DEFAULT_WEIGHTS,
    WEIGHTS_ENV,
    check_checkpoint_file,
    check_model_config_sizes,  # noqa: F401  (where callers found it before)
    is_config_path,
    looks_like_path,
    read_model_config,
    unknown_architecture_message,
)
from winclip_cli.io.safe_fs import open_regular
from winclip_cli.options import AUTO, DEFAULT_ARCHITECTURE, DEFAULT_PRECISION, Device, Precision
from winclip_cli.settings import cache_dir


@dataclass
class Backbone:
    """A loaded open_clip model and everything the rest of the tool needs to know about it."""

    model: Any  # an open_clip CLIP model: its towers are attributes torch's types cannot describe
    architecture: str
    weights: str  # the tag or the checkpoint path, as resolved
    weights_sha256: str  # of the bytes of the checkpoint file that was loaded, read through the same descriptor
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16": the dtype the visual tower computes in
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: object = field(repr=False)
    config_sha256: str = ""  # of the model config's content: two configs of one name are two models

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, Precision(self.precision).dtype_name)
        return dtype

    @property
    def identity(self) -> dict[str, str]:
        """What decides the numbers: recorded in outputs and used as cache keys."""
        return {
            "architecture": self.architecture,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "model_config_sha256": self.config_sha256,
        }


# ------------------------------------------------------------------------------------------- device, precision


def select_device(device: Device) -> torch.device:
    """CUDA, then Apple MPS, then CPU; an explicit request that cannot be met is a setup error."""
    requested = device.name
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if requested == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError("--device cuda was requested but no CUDA GPU is available (try --device auto)")
    if requested == "mps" and not mps_ok:
        raise SetupError("--device mps was requested but Apple MPS is not available (try --device auto)")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AMX or AVX512-BF16), where bf16 matmul beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def select_precision(precision: Precision, device: torch.device) -> str:
    """The precision the visual tower computes in ("fp32", "bf16" or "fp16"): as asked, or for auto
    the fast one of this device."""
    if precision is not Precision.AUTO:
        if precision is Precision.FP16 and device.type == "cpu":
            raise SetupError("fp16 is not supported on the CPU; use --precision bf16 or fp32")
        return precision.value
    if device.type == "cuda":
        return (Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16).value
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision.BF16.value
    return Precision.FP32.value


# -------------------------------------------------------------------------------------- architecture, weights


def resolve_architecture(model: str) -> str:
    """An open_clip architecture name, or a path to a model-config JSON (registered under its file stem).

    A config whose sizes no real CLIP has (10,000,000 layers...) is refused before anything is built:
    building it would take minutes and end in an allocation failure."""
    path = Path(model)
    if is_config_path(model):
        read_model_config(model)  # the same checks the command line ran before importing torch
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise SetupError(unknown_architecture_message(model, open_clip.list_models()))
    return model


def config_sha256(architecture: str) -> str:
    """sha256 of the architecture's model config (canonical JSON): what decides the numbers, not its name."""
    config = open_clip.get_model_config(architecture) or {}
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_weights() -> str:
    return os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS


_looks_like_path = looks_like_path


def resolve_weights(architecture: str, weights: str) -> Path:
    """The local checkpoint file for ``weights``: the file itself, or a tag's download in the cache."""
    path = Path(weights).expanduser()
    if path.is_file():
        check_checkpoint_file(path, f"--weights {weights}")
        return path
    if path.exists():
        raise WeightsUnavailableError(f"--weights {weights} is not a file")
    if _looks_like_path(weights):
        raise WeightsUnavailableError(
            f"weights file not found: {weights} (pass an existing open_clip checkpoint with --weights FILE)"
        )
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if weights not in tags:
        available = ", ".join(tags) if tags else "none"
        raise WeightsUnavailableError(
            f"{weights!r} is neither a checkpoint file nor a pretrained tag of {architecture} (tags: {available})"
        )
    cfg = open_clip.get_pretrained_cfg(architecture, weights)
    where = _download_hint(cfg)
    target_dir = cache_dir() / "weights"
    cached = _cached_download(cfg, target_dir)
    if cached is not None:
        return cached
    offline_hint = (
        f"Offline? Fetch {where} on a machine with internet, copy it here and pass --weights FILE "
        f"(or set {WEIGHTS_ENV}=FILE)"
    )
    host = _download_host(cfg)
    if host is not None and not _reachable(host):
        # Fail in seconds: the hub client would retry for about a minute before giving up.
        raise WeightsUnavailableError(
            f"cannot download {architecture} weights {weights!r}: {host} is not reachable. {offline_hint}"
        )
    try:
        target = open_clip.download_pretrained(cfg, cache_dir=str(target_dir))
    except Exception as err:  # proxy, disk full, server error...: all end the same way for the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise WeightsUnavailableError(
            f"cannot download {architecture} weights {weights!r} ({reason}). {offline_hint}"
        ) from None
    if not target or not Path(target).is_file():
        raise WeightsUnavailableError(f"cannot obtain {architecture} weights {weights!r}. {offline_hint}")
    return Path(target)


HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _cached_download(cfg: dict, target_dir: Path) -> Path | None:
    """A tag's checkpoint already downloaded into the cache, without touching the network."""
    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(str(cfg["hf_hub"]))
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None  # type: ignore[assignment]
        if try_to_load_from_cache is not None:
            for name in (filename,) if filename else HF_FILENAMES:
                found = try_to_load_from_cache(model_id, name, cache_dir=str(target_dir))
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    if cfg.get("url"):
        candidate = target_dir / os.path.basename(str(cfg["url"]))
        if candidate.is_file():
            return candidate
    return None


def _download_host(cfg: dict) -> str | None:
    from urllib.parse import urlparse

    if cfg.get("hf_hub"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return urlparse(endpoint).hostname
    if cfg.get("url"):
        return urlparse(str(cfg["url"])).hostname
    return None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download_hint(cfg: dict) -> str:
    """Where a user with a browser can fetch a tag's checkpoint by hand."""
    places = []
    if cfg.get("hf_hub"):
        hub = str(cfg["hf_hub"])
        model_id, filename = os.path.split(hub)
        places.append(f"https://huggingface.co/{model_id}/resolve/main/{filename or 'open_clip_pytorch_model.bin'}")
    if cfg.get("url"):
        places.append(str(cfg["url"]))
    return " or ".join(places) if places else "the checkpoint"


def create_uninitialised(architecture: str) -> Any:  # an open_clip CLIP model
    """The architecture with storage for its weights, skipping their random initialisation.

    Initialising ViT-B-16-plus-240's 200 M parameters costs seconds on a CPU, and every one of
    them is overwritten by the checkpoint (loaded strictly next). The model is built on the meta
    device and given empty storage; the only buffer that checkpoints do not hold, CLIP's causal
    text mask, is rebuilt. Models with other such buffers are built the ordinary way.
    """
    with torch.device("meta"):
        model = open_clip.create_model(architecture, pretrained=None, device="meta")
    unsaved = [(module, name) for module in model.modules() for name in module._non_persistent_buffers_set]
    if not isinstance(model, open_clip.CLIP) or any(
        module is not model or name != "attn_mask" for module, name in unsaved
    ):
        return open_clip.create_model(architecture, pretrained=None, device="cpu")
    model = model.to_empty(device="cpu")
    if unsaved:
        length = model.context_length
        model.attn_mask.copy_(torch.full((length, length), float("-inf")).triu_(1))
    return model


def load_weights(model: nn.Module, checkpoint: Path, source: str | None = None) -> None:
    """Load a checkpoint strictly, without unpickling arbitrary objects.

    Plain open_clip state dicts are memory-mapped straight into the model; anything else (older
    layouts, timm or big_vision weights) goes through open_clip's converting loader. ``source``: where
    to read the bytes (``/proc/self/fd/N`` of the descriptor that was hashed); the format is decided by
    ``checkpoint``'s name.
    """
    state = _read_state_dict(checkpoint, source or str(checkpoint))
    if state is not None and set(state) == set(model.state_dict()):
        model.load_state_dict(state, strict=True)
    else:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)


def _load_failure(checkpoint: Path, architecture: str, err: Exception) -> str:
    """Why a checkpoint did not load, in one line: the architecture its tensors fit, when it is another one."""
    try:
        state = _read_state_dict(checkpoint)
    except Exception:
        state = None
    if state is not None:
        fits = architectures_fitting({name: tuple(t.shape) for name, t in state.items()})
        if fits and architecture not in fits:
            names = " or ".join(fits[:3]) + (f" (or {len(fits) - 3} more)" if len(fits) > 3 else "")
            return (
                f"cannot load {checkpoint} into {architecture}: its tensors are those of {names}; "
                f"pass --model {fits[0]}"
            )
    first = _load_error_line(err)  # never torch's advice to unpickle the file anyway
    return (
        f"cannot load {checkpoint} into {architecture}: {first} "
        f"(is it an open_clip checkpoint of this architecture? see --model)"
    )


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors that tell a ViT CLIP architecture apart, from its open_clip config
    (open_clip's defaults where the config leaves a value out); empty for other kinds of tower."""
    vision, text = config.get("vision_cfg") or {}, config.get("text_cfg") or {}
    layers = vision.get("layers", 12)
    if "timm_model_name" in vision or "hf_model_name" in text or not isinstance(layers, int):
        return {}
    width, patch, size = vision.get("width", 768), vision.get("patch_size", 16), vision.get("image_size", 224)
    height, across = (size, size) if isinstance(size, int) else (size[0], size[1])
    text_width = text.get("width", 512)
    return {
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.positional_embedding": ((height // patch) * (across // patch) + 1, width),
        "visual.proj": (width, config.get("embed_dim", 512)),
        "positional_embedding": (text.get("context_length", 77), text_width),
        "token_embedding.weight": (text.get("vocab_size", 49408), text_width),
        "visual.transformer.layers": (layers,),
        "transformer.layers": (text.get("layers", 12),),
    }


def architectures_fitting(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The open_clip architectures whose tensors have these shapes (a state dict's names and shapes)."""

    def count_layers(prefix: str) -> int:
        found = {key[len(prefix) :].split(".")[0] for key in shapes if key.startswith(prefix)}
        return len({n for n in found if n.isdigit()})

    seen = {
        **shapes,
        "visual.transformer.layers": (count_layers("visual.transformer.resblocks."),),
        "transformer.layers": (count_layers("transformer.resblocks."),),
    }
    fitting = []
    for name in open_clip.list_models():
        expected = _expected_shapes(open_clip.get_model_config(name) or {})
        if expected and all(seen.get(key) == shape for key, shape in expected.items()):
            fitting.append(name)
    return fitting


def _read_state_dict(checkpoint: Path, source: str | None = None) -> dict[str, torch.Tensor] | None:
    source = source or str(checkpoint)  # a /proc/self/fd name: the very file that was hashed
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(source)
    if checkpoint.suffix in (".npz", ".npy"):
        return None  # big_vision weights: open_clip converts them
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _descriptor_path(handle) -> str | None:
    """A name that opens the very file behind ``handle`` (Linux), or None."""
    candidate = f"/proc/self/fd/{handle.fileno()}"
    try:
        same = os.path.samestat(os.stat(candidate), os.fstat(handle.fileno()))
    except OSError:
        return None
    return candidate if same else None


def _load_error_line(err: BaseException) -> str:
    """One printable line saying why a checkpoint did not load. Never torch's advice for a file holding
    other objects than tensors (to load it with ``weights_only=False``): that would run any code it holds."""
    text = str(err)
    if "weights_only" in text or "unpickl" in text.lower():
        return "it holds objects other than tensors, which winclip never unpickles"
    for line in text.splitlines():
        line = "".join(ch for ch in line if ch.isprintable()).strip()
        if line:
            return line[:200]
    return type(err).__name__


def load_backbone(
    model: str = DEFAULT_ARCHITECTURE,
    weights: str | None = None,
    device: Device = Device(),
    precision: Precision = Precision(DEFAULT_PRECISION),
) -> Backbone:
    """Create the open_clip model with its weights on the chosen device, in eval mode."""
    architecture = resolve_architecture(model)
    torch_device = select_device(device)
    chosen_precision = select_precision(precision, torch_device)
    checkpoint = resolve_weights(architecture, weights or default_weights())
    try:
        # Identity from content: the file is opened once, hashed, and loaded from the same descriptor, so a
        # checkpoint replaced by one of the same size and mtime (cp -p) can never keep the old hash.
        handle = open_regular(checkpoint)
    except OSError as err:
        raise WeightsUnavailableError(f"cannot read {checkpoint}: {err.strerror or err}") from None
    with handle, ThreadPoolExecutor(1, thread_name_prefix="winclip-weights-hash") as hasher:
        # hashed beside building the model and loading it (hashlib releases the GIL): the bytes are read
        # into the page cache once, and the hash costs little wall time on a second core
        hashing = hasher.submit(sha256_handle, handle)
        try:
            clip = create_uninitialised(architecture)
        except Exception as err:
            raise SetupError(f"cannot build architecture {architecture}: {err}") from None
        try:
            load_weights(clip, checkpoint, _descriptor_path(handle))
        except Exception as err:
            raise WeightsUnavailableError(_load_failure(checkpoint, architecture, err)) from None
        weights_sha256 = hashing.result()
    clip.eval()
    if torch_device.type == "cuda" and chosen_precision == Precision.FP32.value:
        # fp32 means fp32: TF32 tensor cores would move scores by ~1e-3, past the reference's 1e-4.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    clip.to(torch_device)
    if chosen_precision != Precision.FP32.value:
        # The visual tower computes in reduced precision; scores are taken in fp32 by the core.
        clip.visual.to(getattr(torch, Precision(chosen_precision).dtype_name))
    preprocess = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    size = clip.visual.image_size
    image_size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return Backbone(
        model=clip,
        architecture=architecture,
        weights=str(checkpoint) if Path(weights or default_weights()).is_file() else (weights or default_weights()),
        weights_sha256=weights_sha256,
        device=torch_device,
        precision=chosen_precision,
        image_size=image_size,
        mean=mean,
        std=std,
        tokenizer=open_clip.get_tokenizer(architecture),
        config_sha256=config_sha256(architecture),
    )
