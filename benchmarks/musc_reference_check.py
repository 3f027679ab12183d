#!/usr/bin/env python3
"""Check winclip's mutual scoring (core/musc.py) against MuSc's reference implementation.

The reference (github.com/xrli-U/MuSc, MIT) is not part of this repository: pass a checkout of
it with --reference. Its modules are imported from there at run time: the vendored open_clip
``VisionTransformer`` whose ``forward(image, out_layers)`` is MuSc's ``encode_image`` with
intermediate tokens, ``models/modules/_LNAMD.py`` (LNAMD), ``_MSM.py`` (MSM) and ``_RsCIN.py``
(RsCIN). The glue between them follows ``models/musc.py`` (layers +1, r in 1, 3, 5, maps
averaged over layers then r, bilinear upsampling with align_corners=True, image score = map
maximum, RsCIN with k = 1, 2, 3 as for MVTec AD).

Both sides get the same weights (a seeded random ViT-B-16-plus-240 built by the installed
open_clip, its visual state dict loaded strictly into the reference's tower) and the same
240 x 240 input tensors, so no resize intervenes; everything runs in fp32 on the CPU (the
reference's ``torch.cuda.amp.autocast`` does nothing there). The reference's transformer module
imports OpenCV only for a debugging helper (``gt2attn``) that this path never calls; when OpenCV
is not installed an empty placeholder module stands in for it.

Prints the largest absolute differences of the maps, the raw image scores (map maxima, before
RsCIN) and the final scores (after RsCIN), and writes them to a JSON file.

Examples:
  git clone https://github.com/xrli-U/MuSc /tmp/MuSc
  python benchmarks/musc_reference_check.py --reference /tmp/MuSc
  python benchmarks/musc_reference_check.py --reference /tmp/MuSc --pool 20 --seed 1
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's MSM draws a progress bar per layer

import numpy as np  # noqa: E402
import open_clip
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from winclip_cli.core.musc import (  # noqa: E402
    MutualFeatureExtractor,
    PoolFeatures,
    default_layers,
    mutual_scores,
    rescore_with_class_neighbours,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="a checkout of github.com/xrli-U/MuSc")
    parser.add_argument("--arch", default="ViT-B-16-plus-240", help="open_clip architecture (default: %(default)s)")
    parser.add_argument("--pool", type=int, default=16, help="images scored together (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--json", dest="json_path", default="benchmarks/musc-reference-check.json")
    return parser.parse_args()


def load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_reference(root: Path) -> dict[str, types.ModuleType]:
    """The reference's modules, imported from its checkout without running its package __init__ files."""
    needed = [
        root / "models/backbone/open_clip/transformer.py",
        root / "models/modules/_LNAMD.py",
        root / "models/modules/_MSM.py",
        root / "models/modules/_RsCIN.py",
    ]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise SystemExit(f"--reference {root} is not a MuSc checkout (missing {', '.join(missing)})")
    if importlib.util.find_spec("cv2") is None:
        sys.modules["cv2"] = types.ModuleType("cv2")  # used only by gt2attn, a debugging helper never called here
    package = types.ModuleType("musc_reference_open_clip")
    package.__path__ = [str(root / "models/backbone/open_clip")]  # type: ignore[attr-defined]
    sys.modules[package.__name__] = package
    return {
        "transformer": importlib.import_module("musc_reference_open_clip.transformer"),
        "lnamd": load_module("musc_reference_lnamd", needed[1]),
        "msm": load_module("musc_reference_msm", needed[2]),
        "rscin": load_module("musc_reference_rscin", needed[3]),
    }


def build_models(arch: str, seed: int, reference_transformer: types.ModuleType) -> tuple[nn.Module, nn.Module]:
    """(our open_clip visual tower, the reference's tower) with the same seeded random weights."""
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None).eval()
    # open_clip initialises LayerNorms to exactly 1 and 0 and biases to 0: random values everywhere
    # make the comparison sensitive to any mix-up of layers, tokens or norms (as tests/conftest.py does)
    with torch.no_grad():
        for param in model.visual.parameters():
            param.add_(0.02 * torch.randn_like(param))
    visual = model.visual
    cfg = open_clip.get_model_config(arch)["vision_cfg"]
    width = cfg["width"]
    reference = reference_transformer.VisionTransformer(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=width,
        layers=cfg["layers"],
        heads=width // cfg.get("head_width", 64),
        mlp_ratio=cfg.get("mlp_ratio", 4.0),
        output_dim=open_clip.get_model_config(arch)["embed_dim"],
        act_layer=nn.GELU,
        norm_layer=reference_transformer.LayerNorm,
    ).eval()
    reference.load_state_dict(visual.state_dict(), strict=True)
    return visual, reference


def reference_musc(ref: dict, tower: nn.Module, images: torch.Tensor, layers: list[int], batch_size: int):
    """MuSc's models/musc.py pipeline for one pool (divide_num 1), on the CPU: (maps, raw scores, scores)."""
    features_list = [layer + 1 for layer in layers]  # musc.py: self.features_list = [l + 1 for l in ...]
    class_tokens, patch_tokens_list = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            image_features, patch_tokens = tower(images[start : start + batch_size], features_list)
            image_features /= image_features.norm(dim=-1, keepdim=True)
            class_tokens.extend(image_features[i].squeeze().cpu().numpy() for i in range(image_features.shape[0]))
            patch_tokens_list.append([p.cpu() for p in patch_tokens])
    feature_dim = patch_tokens_list[0][0].shape[-1]
    maps_r = torch.tensor([]).double()
    for r in (1, 3, 5):
        lnamd = ref["lnamd"].LNAMD(device="cpu", r=r, feature_dim=feature_dim, feature_layer=features_list)
        z_layers: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad():
            for tokens in patch_tokens_list:
                features = lnamd._embed(tokens)
                features /= features.norm(dim=-1, keepdim=True)
                for layer in range(len(features_list)):
                    z_layers.setdefault(layer, []).append(features[:, :, layer, :])
        maps_l = torch.tensor([]).double()
        for layer in z_layers:
            z = torch.cat(z_layers[layer], dim=0)
            msm = ref["msm"].MSM(Z=z, device="cpu", topmin_min=0, topmin_max=0.3)
            maps_l = torch.cat((maps_l, msm.unsqueeze(0).cpu()), dim=0)
        maps_r = torch.cat((maps_r, torch.mean(maps_l, 0).unsqueeze(0)), dim=0)
    maps = torch.mean(maps_r, 0)
    n, patches = maps.shape
    side = int(np.sqrt(patches))
    size = images.shape[-1]
    maps = F.interpolate(maps.view(n, 1, side, side), size=size, mode="bilinear", align_corners=True)
    maps = maps.cpu().numpy()
    raw = np.array(maps).reshape(n, -1).max(-1)
    scores = ref["rscin"].RsCIN(raw, class_tokens, k_list=[1, 2, 3])
    return maps[:, 0], raw, np.asarray(scores), np.stack(class_tokens), patch_tokens_list


def make_images(count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """One random "part" seen ``count`` times with its own noise; every fourth image has a bright square
    (a "defect") somewhere else, so that the pool's scores spread as they do on a real folder."""
    generator = torch.Generator().manual_seed(seed)
    part = torch.randn(3, *size, generator=generator)
    images = part + 0.3 * torch.randn(count, 3, *size, generator=generator)
    for index in range(0, count, 4):
        top, left = (int(v) for v in torch.randint(0, min(size) - 40, (2,), generator=generator))
        images[index, :, top : top + 40, left : left + 40] += 3.0
    return images


def main() -> None:
    args = parse_args()
    if args.pool < 5:
        raise SystemExit("--pool must be at least 5: below that the reference's 30 % interval is empty (NaN)")
    torch.set_grad_enabled(False)
    ref = load_reference(args.reference.resolve())
    visual, tower = build_models(args.arch, args.seed, ref["transformer"])
    layers = list(default_layers(len(visual.transformer.resblocks)))
    size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    images = make_images(args.pool, size, args.seed + 1)

    start = time.perf_counter()
    ref_maps, ref_raw, ref_scores, ref_class, ref_tokens = reference_musc(ref, tower, images, layers, args.batch_size)
    reference_s = time.perf_counter() - start

    start = time.perf_counter()
    extractor = MutualFeatureExtractor(visual)
    pool = PoolFeatures.concat(
        [extractor.extract(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    )
    ours = mutual_scores(pool, size)
    ours_s = time.perf_counter() - start

    ref_token_stack = torch.cat([torch.stack(batch, dim=1) for batch in ref_tokens])[:, :, 1:]
    diffs = {
        "patch_tokens": float((pool.tokens - ref_token_stack).abs().max()),
        "class_embeddings": float(np.abs(pool.class_embeddings.numpy() - ref_class).max()),
        "maps": float(np.abs(ours.upsample().numpy() - ref_maps).max()),
        "raw_image_scores": float(np.abs(ours.raw_scores.numpy() - ref_raw).max()),
        "rscin_image_scores": float(np.abs(ours.scores.numpy() - ref_scores).max()),
        # RsCIN alone, fed the reference's own raw scores: min-max over the pool magnifies the raw
        # scores' differences by 1 / (max - min), this isolates RsCIN's own arithmetic
        "rscin_given_reference_raw": float(
            np.abs(
                rescore_with_class_neighbours(torch.from_numpy(ref_raw), pool.class_embeddings).numpy() - ref_scores
            ).max()
        ),
    }
    result = {
        "architecture": args.arch,
        "layers_0_based": layers,
        "pool": args.pool,
        "seed": args.seed,
        "input": f"{args.pool} x 3 x {size[0]} x {size[1]} tensors (make_images), fp32, CPU",
        "max_abs_diff": diffs,
        "value_ranges": {
            "maps": [float(ref_maps.min()), float(ref_maps.max())],
            "raw_image_scores": [float(ref_raw.min()), float(ref_raw.max())],
            "rscin_image_scores": [float(ref_scores.min()), float(ref_scores.max())],
        },
        "seconds": {"reference": round(reference_s, 2), "winclip": round(ours_s, 2)},
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    for name, value in diffs.items():
        print(f"max |diff| {name:20s} {value:.3e}")
    print(f"reference {reference_s:.1f} s, winclip {ours_s:.1f} s (features + scoring of {args.pool} images)")
    within = all(diffs[name] <= 1e-4 for name in ("maps", "raw_image_scores", "rscin_image_scores"))
    print("within 1e-4:", "yes" if within else "NO")
    Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json_path}")
    if not within:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
