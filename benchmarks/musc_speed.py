#!/usr/bin/env python3
"""Mutual scoring (MuSc) against WinCLIP zero-shot: images/s of the core, measured in one run.

For each model (the tiny test model and the default architecture, both with seeded random
weights; compute does not depend on the weights' values), on the same 240 x 240 input tensors:

  zero-shot   WinClipScorer.score: the full image and its 365 windows through the transformer
  features    MutualFeatureExtractor.extract: one forward pass, tokens of 4 blocks + class embedding
  scoring     mutual_scores on a pool of P images (LNAMD, MSM, maps, upsampling, RsCIN), P = 20, 50, 200

Mutual images/s at pool P = P / (P x features s/image + scoring s of the pool). Features are
extracted for --distinct images (default 20); larger pools repeat those features with a little
noise added, which changes no cost (the work of MSM depends only on the pool's size). Each
timing is the best of --repeats runs; the zero-shot and mutual figures come from the same process
on the same machine, so their ratio is what to compare across machines. Text embeddings for the
zero-shot scorer are random (the text encoder runs once per scan, not per image).

Examples:
  python benchmarks/musc_speed.py                          # tiny and default, pools 20, 50, 200
  python benchmarks/musc_speed.py --models tiny --pools 20,50
  python benchmarks/musc_speed.py --models default --zero-shot-images 4 --distinct 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import cpu_name  # noqa: E402
from throughput import TINY  # noqa: E402

from winclip_cli.core.musc import (  # noqa: E402
    BLOCK_ELEMENTS,
    MutualFeatureExtractor,
    PoolFeatures,
    mutual_scores,
)
from winclip_cli.core.winclip import WinClipScorer  # noqa: E402

DEFAULT_ARCH = "ViT-B-16-plus-240"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,default", help="comma list of tiny, default (default: %(default)s)")
    parser.add_argument("--pools", default="20,50,200", help="pool sizes (default: %(default)s)")
    parser.add_argument("--distinct", type=int, default=20, help="images whose features are extracted")
    parser.add_argument("--zero-shot-images", type=int, default=8, help="images scored zero-shot")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timings (default: %(default)s)")
    parser.add_argument("--block-elements", type=int, default=BLOCK_ELEMENTS, help="MSM distance block size")
    parser.add_argument("--json", dest="json_path", default="benchmarks/musc-speed-cpu.json")
    return parser.parse_args()


def best_of(repeats: int, fn):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        config = Path(tempfile.mkdtemp(prefix="winclip-musc-speed-")) / "winclip-musc-speed-tiny.json"
        config.write_text(json.dumps(TINY))
        open_clip.add_model_config(config)
        return open_clip.create_model(config.stem, pretrained=None).eval()
    return open_clip.create_model(DEFAULT_ARCH, pretrained=None).eval()


def grow_pool(pool: PoolFeatures, size: int) -> PoolFeatures:
    """``size`` images' features from the extracted ones, repeated with noise (timing only)."""
    generator = torch.Generator().manual_seed(size)
    index = torch.arange(size) % len(pool)
    tokens = pool.tokens[index] + 0.01 * torch.randn(pool.tokens[index].shape, generator=generator)
    return PoolFeatures(tokens, pool.class_embeddings[index], pool.grid_size)


def measure(name: str, args: argparse.Namespace, pools: list[int]) -> dict:
    model = build_model(name)
    visual = model.visual
    size = (240, 240)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(max(args.distinct, args.zero_shot_images), 3, *size, generator=generator)
    batches = lambda count: [images[i : min(i + args.batch_size, count)] for i in range(0, count, args.batch_size)]  # noqa: E731

    text = torch.nn.functional.normalize(torch.randn(2, visual.output_dim, generator=generator), dim=-1)
    scorer = WinClipScorer(visual, text)
    with torch.inference_mode():
        scorer.score(images[:1])  # warm-up
        zero_s, _ = best_of(args.repeats, lambda: [scorer.score(b) for b in batches(args.zero_shot_images)])
    zero_per_image = zero_s / args.zero_shot_images
    print(f"[{name}] zero-shot: {zero_per_image * 1000:.1f} ms/image ({1 / zero_per_image:.2f} images/s)", flush=True)

    extractor = MutualFeatureExtractor(visual)
    extractor.extract(images[:1])  # warm-up
    features_s, parts = best_of(args.repeats, lambda: [extractor.extract(b) for b in batches(args.distinct)])
    features_per_image = features_s / args.distinct
    extracted = PoolFeatures.concat(parts)
    print(
        f"[{name}] mutual features: {features_per_image * 1000:.1f} ms/image, "
        f"{extracted.bytes_per_image / 1e6:.2f} MB/image in a pool (layers {extractor.layers})",
        flush=True,
    )

    result = {
        "zero_shot_ms_per_image": round(zero_per_image * 1000, 2),
        "zero_shot_images_per_s": round(1 / zero_per_image, 3),
        "mutual_features_ms_per_image": round(features_per_image * 1000, 2),
        "pool_bytes_per_image": extracted.bytes_per_image,
        "layers": list(extractor.layers),
        "pools": {},
    }
    for pool_size in pools:
        pool = extracted if pool_size == len(extracted) else grow_pool(extracted, pool_size)
        scoring_s, _ = best_of(
            args.repeats, lambda pool=pool: mutual_scores(pool, size, block_elements=args.block_elements)
        )
        per_image = features_per_image + scoring_s / pool_size
        entry = {
            "scoring_s_per_pool": round(scoring_s, 3),
            "scoring_ms_per_image": round(scoring_s / pool_size * 1000, 2),
            "mutual_ms_per_image": round(per_image * 1000, 2),
            "mutual_images_per_s": round(1 / per_image, 3),
            "speedup_vs_zero_shot": round(zero_per_image / per_image, 2),
            "features_repeated": pool_size != len(extracted),
        }
        result["pools"][str(pool_size)] = entry
        print(
            f"[{name}] pool {pool_size}: scoring {entry['scoring_ms_per_image']:.1f} ms/image, "
            f"mutual {entry['mutual_images_per_s']:.2f} images/s = {entry['speedup_vs_zero_shot']:.2f}x zero-shot",
            flush=True,
        )
    return result


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    pools = [int(p) for p in args.pools.split(",") if p.strip()]
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": "fp32",
        "batch_size": args.batch_size,
        "models": {},
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("tiny", "default"):
            raise SystemExit(f"unknown model {name!r} (tiny, default)")
        results["models"][name if name == "tiny" else DEFAULT_ARCH] = measure(name, args, pools)
    Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
