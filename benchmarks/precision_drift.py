#!/usr/bin/env python3
"""How far bf16 moves WinCLIP scores and maps from fp32, on weights whose scores spread.

With random weights every image scores within about 1e-3 of 0.5 (the random text vectors are
nearly orthogonal to every image), which hides what reduced precision does to a ranking. Here the
visual tower keeps its random weights (seed 0), but the two text vectors are minus and plus the first
principal direction of the fp32 full-image embeddings of the images themselves, scaled so that the
image scores spread over most of (0, 1): the same softmax at temperature 0.07 as the product, on
score differences a trained model gives. Scores and maps (240x240, bilinear) are then computed in
fp32 and in each reduced precision, from the same inputs, batch 1 (no batch-composition rounding).

Prints and writes: the spread of fp32 image scores, the largest image-score and map difference,
the largest difference relative to that spread, and the Spearman rank correlation of image scores.

Examples:
  python benchmarks/precision_drift.py                    # sample_data, default architecture, CPU
  python benchmarks/precision_drift.py --device cuda --precisions bf16,fp16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="bf16")
    parser.add_argument("--images", default=str(REPO / "sample_data" / "fabric"), help="folder of images")
    parser.add_argument("--json", dest="json_path", default="benchmarks/results-precision-drift.json")
    args = parser.parse_args()

    import numpy as np
    import open_clip
    import torch
    from scipy.stats import spearmanr

    from winclip_cli.core.engine import ModelOptions, build_backbone, quiet_open_clip
    from winclip_cli.core.winclip import WinClipScorer, class_scores
    from winclip_cli.io.images import load_image, preprocess

    work = Path(tempfile.mkdtemp(prefix="winclip-drift-"))
    with quiet_open_clip():
        torch.manual_seed(0)
        model = open_clip.create_model(args.arch, pretrained=None)
    checkpoint = work / "random.pt"
    torch.save(model.state_dict(), checkpoint)
    del model
    files = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def embed_all(precision: str):
        """The WinCLIP embeddings of every image, one at a time, and the scorer that made them."""
        backbone = build_backbone(ModelOptions(args.arch, str(checkpoint), args.device, precision))
        scorer = WinClipScorer(backbone.model.visual, torch.zeros(2, backbone.model.visual.output_dim))
        embeddings = []
        for path in files:
            batch = preprocess(load_image(path), backbone.image_size, backbone.mean, backbone.std)[None]
            embeddings.append(scorer.embed(batch.to(device=backbone.device, dtype=backbone.dtype)))
        return scorer, embeddings, backbone.image_size

    def scores_of(scorer, embeddings, size, text: torch.Tensor):
        scorer.text_embeddings = text.float()
        scored = [scorer.score_embeddings(emb) for emb in embeddings]
        image = np.array([float(scores.image[0]) for scores in scored])
        return image, [scores.upsample(size)[0].float().cpu().numpy() for scores in scored]

    scorer, fp32_embeddings, size = embed_all("fp32")
    embeddings = torch.cat([emb.image.float().cpu() for emb in fp32_embeddings])
    normalised = torch.nn.functional.normalize(embeddings, dim=-1)
    centred = normalised - normalised.mean(dim=0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    # the cosines of the images with +-direction spread by about the centred norm; a text vector that
    # mixes the mean embedding in keeps the product's softmax in its working range
    mean = torch.nn.functional.normalize(normalised.mean(dim=0), dim=0)
    spread = float((normalised @ direction).std())
    weight = 0.07 * 2.0 / max(spread, 1e-6)  # about 2 logits of spread between images
    text = torch.stack([mean - weight * direction, mean + weight * direction])
    base_scores, base_maps = scores_of(scorer, fp32_embeddings, size, text)
    check = class_scores(embeddings, text)
    assert torch.allclose(check, torch.tensor(base_scores, dtype=check.dtype), atol=1e-5)
    results: dict = {
        "architecture": args.arch,
        "device": args.device,
        "images": len(files),
        "fp32_image_scores": {"min": float(base_scores.min()), "max": float(base_scores.max())},
        "fp32_map_range": [float(min(m.min() for m in base_maps)), float(max(m.max() for m in base_maps))],
    }
    span = float(base_scores.max() - base_scores.min())
    for precision in args.precisions.split(","):
        scorer, reduced_embeddings, size = embed_all(precision)
        scores, maps = scores_of(scorer, reduced_embeddings, size, text)
        image_diff = float(np.abs(scores - base_scores).max())
        map_diff = float(max(np.abs(a - b).max() for a, b in zip(maps, base_maps, strict=True)))
        results[precision] = {
            "max_abs_image_score_diff": image_diff,
            "max_abs_map_diff": map_diff,
            "image_diff_over_fp32_spread": image_diff / span,
            "spearman_image_scores": float(spearmanr(scores, base_scores).statistic),
        }
    Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
