#!/usr/bin/env python3
"""GPU checks for a machine with CUDA (not part of CI): device auto-selection, precision choice,
fp32 agreement between CUDA and CPU, and the CLI end to end on the GPU.

Run from the repository root with the package importable (installed, or PYTHONPATH=.):
    python benchmarks/gpu_check.py
then the speed comparison of precisions:
    python benchmarks/bench.py --device cuda --precisions fp32,bf16,fp16 --images 32 --batch-size 32
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import open_clip

    from winclip_cli.core.backbone import select_device, select_precision
    from winclip_cli.core.engine import ModelOptions, build_backbone, quiet_open_clip
    from winclip_cli.core.winclip import WinClipScorer
    from winclip_cli.options import Device, Precision

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps(report))
        return 1
    report["gpu"] = torch.cuda.get_device_name(0)
    report["auto_device"] = str(select_device(Device.parse("auto")))
    report["auto_precision"] = select_precision(Precision.AUTO, torch.device("cuda"))

    work = Path(tempfile.mkdtemp(prefix="winclip-gpu-"))
    os.environ["WINCLIP_CACHE_DIR"] = str(work / "cache")
    with quiet_open_clip():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16-plus-240")
    checkpoint = work / "random.pt"
    torch.save(model.state_dict(), checkpoint)
    del model

    # fp32 on CUDA against fp32 on the CPU, default architecture, same random weights and images
    images = torch.randn(4, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 640, generator=torch.Generator().manual_seed(2))
    results = {}
    for device in ("cpu", "cuda"):
        bb = build_backbone(ModelOptions("ViT-B-16-plus-240", str(checkpoint), device, "fp32"))
        scorer = WinClipScorer(bb.model.visual, text.to(device))
        scores, maps = scorer.score(images.to(device))
        results[device] = (scores.cpu(), maps.cpu())
    report["fp32_cuda_vs_cpu_max_abs_score_diff"] = float((results["cpu"][0] - results["cuda"][0]).abs().max())
    report["fp32_cuda_vs_cpu_max_abs_map_diff"] = float((results["cpu"][1] - results["cuda"][1]).abs().max())
    for precision in ("bf16", "fp16"):
        bb = build_backbone(ModelOptions("ViT-B-16-plus-240", str(checkpoint), "cuda", precision))
        scorer = WinClipScorer(bb.model.visual, text.cuda())
        scores, maps = scorer.score(images.cuda().to(bb.dtype))
        report[f"{precision}_vs_fp32_max_abs_score_diff"] = float((scores.cpu() - results["cpu"][0]).abs().max())
        report[f"{precision}_vs_fp32_max_abs_map_diff"] = float((maps.float().cpu() - results["cpu"][1]).abs().max())

    # the CLI end to end with --device auto and --precision auto
    out = work / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "winclip_cli",
            "scan",
            str(REPO / "sample_data" / "fabric" / "test"),
            "--out",
            str(out),
            "--weights",
            str(checkpoint),
            "--precision",
            "auto",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    report["cli_returncode"] = proc.returncode
    report["cli_stderr"] = proc.stderr.strip().splitlines()[:2]
    if (out / "run.json").is_file():
        info = json.loads((out / "run.json").read_text())
        report["cli_run_json"] = {k: info.get(k) for k in ("device", "precision", "scored", "seconds")}
    print(json.dumps(report, indent=2))
    ok = (
        report["auto_device"] == "cuda"
        and report["fp32_cuda_vs_cpu_max_abs_score_diff"] < 1e-4
        and report["cli_returncode"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
