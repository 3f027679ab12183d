"""open_clip model creation: architecture and weight resolution, device and precision choice.

Knows nothing about anomalies. Weights come from an open_clip pretrained tag (downloaded into the
winclip cache, for machines with internet) or from a local checkpoint file (air-gapped machines);
either way they are loaded without unpickling arbitrary objects (``weights_only=True`` or safetensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn

from winclip_cli.errors import SetupError, WeightsUnavailableError
from winclip_cli.io.hashing import cached_sha256_file
from winclip_cli.io.model_files import (
    CHECKPOINT_SUFFIXES,  # noqa: F401  (where callers found it before)
    DEFAULT_WEIGHTS,
    WEIGHTS_ENV,
    check_checkpoint_file,
    is_config_path,
    looks_like_path,
    read_model_config,
    unknown_architecture_message,
)
from winclip_cli.options import DEFAULT_ARCHITECTURE, DEVICES, PRECISIONS
from winclip_cli.settings import cache_dir


@dataclass
class Backbone:
    """A loaded open_clip model and everything the rest of the tool needs to know about it."""

    model: nn.Module
    architecture: str
    weights: str  # the tag or the checkpoint path, as resolved
    weights_sha256: str  # of the checkpoint file that was loaded ("" when no file: random init)
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16": the dtype the visual tower computes in
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: object = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def identity(self) -> dict[str, str]:
        """What decides the numbers: recorded in outputs and used as cache keys."""
        return {
            "architecture": self.architecture,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
        }


# ------------------------------------------------------------------------------------------- device, precision


def select_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; an explicit request that cannot be met is a setup error."""
    requested = requested.lower()
    if requested not in DEVICES and not requested.startswith("cuda:"):
        raise SetupError(f"unknown device {requested!r} (choose from {', '.join(DEVICES)} or cuda:N)")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if requested == "auto":
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


def select_precision(requested: str, device: torch.device) -> str:
    requested = requested.lower()
    if requested not in PRECISIONS:
        raise SetupError(f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise SetupError("fp16 is not supported on the CPU; use --precision bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


# -------------------------------------------------------------------------------------- architecture, weights


def resolve_architecture(model: str) -> str:
    """An open_clip architecture name, or a path to a model-config JSON (registered under its file stem)."""
    path = Path(model)
    if is_config_path(model):
        read_model_config(model)  # the same checks the command line ran before importing torch
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise SetupError(unknown_architecture_message(model, open_clip.list_models()))
    return model


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
            try_to_load_from_cache = None
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


def create_uninitialised(architecture: str) -> nn.Module:
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


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint strictly, without unpickling arbitrary objects.

    Plain open_clip state dicts are memory-mapped straight into the model; anything else (older
    layouts, timm or big_vision weights) goes through open_clip's converting loader.
    """
    state = _read_state_dict(checkpoint)
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
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "weights_only" in first.lower() or "weights only" in first.lower():
        # torch's own advice here is to unpickle the file anyway, which could run any code in it
        first = "it holds Python objects besides tensors, which are never unpickled"
    return (
        f"cannot load {checkpoint} into {architecture}: {first[:200]} "
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


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(checkpoint))
    if checkpoint.suffix in (".npz", ".npy"):
        return None  # big_vision weights: open_clip converts them
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_backbone(
    model: str = DEFAULT_ARCHITECTURE,
    weights: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Backbone:
    """Create the open_clip model with its weights on the chosen device, in eval mode."""
    architecture = resolve_architecture(model)
    torch_device = select_device(device)
    chosen_precision = select_precision(precision, torch_device)
    checkpoint = resolve_weights(architecture, weights or default_weights())
    try:
        clip = create_uninitialised(architecture)
    except Exception as err:
        raise SetupError(f"cannot build architecture {architecture}: {err}") from None
    try:
        load_weights(clip, checkpoint)
    except Exception as err:
        raise WeightsUnavailableError(_load_failure(checkpoint, architecture, err)) from None
    clip.eval()
    if torch_device.type == "cuda" and chosen_precision == "fp32":
        # fp32 means fp32: TF32 tensor cores would move scores by ~1e-3, past the reference's 1e-4.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    clip.to(torch_device)
    if chosen_precision != "fp32":
        # The visual tower computes in reduced precision; scores are taken in fp32 by the core.
        clip.visual.to({"bf16": torch.bfloat16, "fp16": torch.float16}[chosen_precision])
    preprocess = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    size = clip.visual.image_size
    image_size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return Backbone(
        model=clip,
        architecture=architecture,
        weights=str(checkpoint) if Path(weights or default_weights()).is_file() else (weights or default_weights()),
        weights_sha256=cached_sha256_file(checkpoint),
        device=torch_device,
        precision=chosen_precision,
        image_size=image_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        tokenizer=open_clip.get_tokenizer(architecture),
    )
