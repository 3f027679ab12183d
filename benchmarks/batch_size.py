#!/usr/bin/env python3
"""Which batch size gives the best images/s, and how a whole scan compares with the model alone.

Measured in one run on one machine, rounds interleaved (other jobs on a shared machine slow all
measurements of a round alike; the best of the rounds is kept):

  reference    the visual tower's WinCLIP forward (``WindowEncoder`` via ``WinClipScorer.embed``) in fp32
               at batch 1: one image at a time, as the reference implementation runs it, in a Python
               process of its own with the C library's allocator as it comes (a fresh process each
               round). The yardstick.
  encode       the same at batch 1, 2, 4, 8, in fp32 and bf16 (bf16 where the CPU has native bf16, or
               on CUDA), for the default architecture and the tiny test model (random weights), in this
               process with the allocator setting a scan uses (``winclip_cli/jobs/allocator.py``;
               --allocator default leaves it out).
  scan         the whole ``winclip scan`` (PNG heatmaps, 240x240 JPEGs) at ``--batch-size auto`` and any
               sizes given with --scan-batches: the marginal seconds per image from N against 3N images
               (the scan's own clock in run.json, so process start-up, model load and text cancel).

Every figure is taken twice: wall-clock seconds, and process CPU seconds (of the scan's process
with all its threads), which on a machine shared with other jobs count the work rather than the
waiting. Set OMP_WAIT_POLICY=PASSIVE there, so that a thread waiting for its partner sleeps instead
of spinning (spinning would count as work); the reference and the scan run under the same setting.

The fastest batch of each row (within 3 %) is what ``winclip_cli/core/batching.py``'s rule should
give; README's Speed section lists the rows per machine.

Examples:
  python benchmarks/batch_size.py                        # CPU, about 6 minutes on 2 cores
  python benchmarks/batch_size.py --rounds 3 --scan-images 4
  OMP_WAIT_POLICY=PASSIVE python benchmarks/batch_size.py     # on a machine shared with other jobs
  python benchmarks/batch_size.py --device cuda --batches 1,8,32,64 --scan-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="auto", help="comma list of fp32,bf16,fp16, or auto (default)")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes of the encode sweep")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best of them is kept)")
    parser.add_argument("--tiny-repeats", type=int, default=5, help="timed calls per tiny-model point and round")
    parser.add_argument("--scan-images", type=int, default=2, help="N of the N-against-3N scans (fp32)")
    parser.add_argument("--scan-batches", default="auto", help="--batch-size values of the scans, comma list")
    parser.add_argument("--skip", default="", help="comma list of: tiny,encode,scan")
    parser.add_argument("--allocator", choices=["winclip", "default"], default="winclip", help="of the encode sweep")
    parser.add_argument("--json", dest="json_path", default="benchmarks/results-batch-size.json")
    parser.add_argument("--reference-child", nargs=3, metavar=("ARCH", "CHECKPOINT", "DEVICE"), help=argparse.SUPPRESS)
    return parser.parse_args()


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_image(torch, scorer, batch, device, repeats: int = 1) -> tuple[float, float]:
    """(wall, process CPU) seconds per image of the best of ``repeats`` calls."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        scorer.embed(batch)
        sync(torch, device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best / batch.shape[0], best_cpu / batch.shape[0]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scan_seconds(folder: Path, out: Path, model_args: list[str], precision: str, batch: str, env) -> dict:
    command = [sys.executable, "-m", "winclip_cli", "scan", str(folder), "--out", str(out), "--class", "bottle"]
    command += ["--precision", precision, "--batch-size", batch, "-q", *model_args]
    cpu = children_cpu_seconds()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    cpu = children_cpu_seconds() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
    info = json.loads((out / "run.json").read_text())
    return {
        "scan_seconds": info["scan_seconds"],
        "process_cpu_seconds": cpu,
        "scored": info["scored"],
        "batch_size": info["batch_size"],
    }


def reference_child(arch: str, checkpoint: str, device_name: str) -> int:
    """The yardstick, in a process of its own: prints (wall, CPU) seconds of one fp32 batch-1 forward."""
    import torch

    from winclip_cli.core.engine import ModelOptions, build_backbone
    from winclip_cli.core.winclip import WinClipScorer

    backbone = build_backbone(ModelOptions(arch, checkpoint, device_name, "fp32"))
    scorer = WinClipScorer(backbone.model.visual, torch.randn(2, backbone.model.visual.output_dim))
    image = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(0)).to(backbone.device)
    scorer.embed(image)  # warm-up: first calls allocate
    wall, cpu = seconds_per_image(torch, scorer, image, backbone.device)
    print(json.dumps({"wall": wall, "cpu": cpu}))
    return 0


def reference_seconds(arch: str, checkpoint: Path, device_name: str, env) -> tuple[float, float]:
    command = [sys.executable, __file__, "--reference-child", arch, str(checkpoint), device_name]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"reference failed ({proc.returncode}): {proc.stderr[-2000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    return measured["wall"], measured["cpu"]


def main() -> int:
    args = parse_args()
    if args.reference_child:
        return reference_child(*args.reference_child)
    work = Path(tempfile.mkdtemp(prefix="winclip-batch-bench-"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WINCLIP_CACHE_DIR": str(work / "cache")}
    os.environ["WINCLIP_CACHE_DIR"] = env["WINCLIP_CACHE_DIR"]
    skip = set(filter(None, args.skip.split(",")))

    import open_clip
    import torch
    from bench import cpu_name, make_images

    from winclip_cli.core.backbone import cpu_has_native_bf16, select_device, select_precision
    from winclip_cli.core.batching import auto_batch_size, fastest_batch, visual_facts
    from winclip_cli.core.engine import ModelOptions, build_backbone, quiet_open_clip
    from winclip_cli.core.winclip import WinClipScorer
    from winclip_cli.jobs.allocator import keep_freed_memory
    from winclip_cli.options import Device, Precision

    allocator_kept = keep_freed_memory() if args.allocator == "winclip" else False
    device = select_device(Device.parse(args.device))
    if args.precisions == "auto":
        reduced = select_precision(Precision.AUTO, device)
        precisions = ["fp32"] + ([reduced] if reduced != "fp32" else [])
    else:
        precisions = args.precisions.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {
        "machine": {
            "cpu": cpu_name(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "cpu_native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "encode_allocator_kept_freed_memory": allocator_kept,
        },
        "precisions": precisions,
    }

    tiny_json = work / "winclip-tiny-bench.json"
    tiny_json.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(tiny_json)
    checkpoints = {}
    for name, arch in (("default", args.arch), ("tiny", "winclip-tiny-bench")):
        with quiet_open_clip():
            torch.manual_seed(0)
            model = open_clip.create_model(arch, pretrained=None)
        checkpoints[name] = work / f"{name}.pt"
        torch.save(model.state_dict(), checkpoints[name])
        del model
    archs = {"default": args.arch, "tiny": str(tiny_json)}

    scorers = {}
    for name in ("default", "tiny"):
        for precision in precisions:
            backbone = build_backbone(ModelOptions(archs[name], str(checkpoints[name]), str(device), precision))
            facts = visual_facts(backbone.model.visual)
            gflop = facts.gflop_per_image((2, 3))
            results.setdefault("models", {})[name] = {"architecture": backbone.architecture, "gflop_per_image": gflop}
            text = torch.randn(2, backbone.model.visual.output_dim, device=device)
            scorers[name, precision] = (WinClipScorer(backbone.model.visual, text), backbone.dtype, gflop)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(max(batches), 3, 240, 240, generator=generator)

    def batch_of(size: int, dtype):
        return images[:size].to(device=device, dtype=dtype)

    for scorer, dtype, _ in scorers.values():  # warm-up: first calls allocate
        scorer.embed(batch_of(1, dtype))

    # ------------------------------------------------------------------------------ scans, prepared
    scan_batches = args.scan_batches.split(",")
    folders = {}
    if "scan" not in skip:
        for precision in precisions:
            n = args.scan_images if precision == "fp32" else 2 * args.scan_images
            for count in (n, 3 * n):
                folders[precision, count] = work / f"images-{precision}-{count}"
                make_images(folders[precision, count], count, size=(240, 240), seed=count)
        model_args = ["--model", args.arch, "--weights", str(checkpoints["default"]), "--device", device.type]
        for precision in precisions:  # fills the text cache of each precision
            one = work / "images-warm"
            make_images(one, 1, size=(240, 240))
            scan_seconds(one, work / "warm-out", model_args, precision, "1", env)

    encode: dict = {}
    encode_cpu: dict = {}
    reference: list[float] = []
    reference_cpu: list[float] = []  # process CPU seconds per image: see --help on loaded machines
    scans: dict = {}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}, load average {os.getloadavg()[0]:.2f}", flush=True)
        wall, cpu = reference_seconds(args.arch, checkpoints["default"], device.type, env)
        reference.append(wall)
        reference_cpu.append(cpu)
        if "encode" not in skip:
            for (name, precision), (scorer, dtype, _) in scorers.items():
                if name == "tiny" and "tiny" in skip:
                    continue
                for size in batches:
                    repeats = args.tiny_repeats if name == "tiny" else 1
                    value, cpu = seconds_per_image(torch, scorer, batch_of(size, dtype), device, repeats)
                    encode.setdefault(f"{name} {precision}", {}).setdefault(size, []).append(value)
                    encode_cpu.setdefault(f"{name} {precision}", {}).setdefault(size, []).append(cpu)
        if "scan" not in skip:
            for precision in precisions:
                for batch in scan_batches:
                    n = args.scan_images if precision == "fp32" else 2 * args.scan_images
                    small = scan_seconds(folders[precision, n], work / "out-small", model_args, precision, batch, env)
                    large = scan_seconds(
                        folders[precision, 3 * n], work / "out-large", model_args, precision, batch, env
                    )
                    marginal = (large["scan_seconds"] - small["scan_seconds"]) / (2 * n)
                    marginal_cpu = (large["process_cpu_seconds"] - small["process_cpu_seconds"]) / (2 * n)
                    entry = scans.setdefault(f"{precision} --batch-size {batch}", {"batch_size": small["batch_size"]})
                    entry.setdefault("marginal_s_per_image", []).append(marginal)
                    entry.setdefault("marginal_cpu_s_per_image", []).append(marginal_cpu)
                    entry.setdefault("reference_in_round", []).append(reference[-1])
                    entry.setdefault("reference_cpu_in_round", []).append(reference_cpu[-1])
        print(json.dumps({"reference": reference[-1]}), flush=True)

    results["reference_fp32_batch1_s_per_image"] = {"rounds": reference, "best": min(reference)}
    results["reference_fp32_batch1_cpu_s_per_image"] = {"rounds": reference_cpu, "best": min(reference_cpu)}
    table = {}
    for key, per_size in encode.items():
        best = {size: min(values) for size, values in per_size.items()}
        name = key.split()[0]
        table[key] = {
            "s_per_image_best": best,
            "rounds": per_size,
            "fastest_batch": fastest_batch(best),
            "relative_to_batch_1": {size: value / best[batches[0]] for size, value in best.items()},
            "cpu_s_per_image_best": {size: min(values) for size, values in encode_cpu[key].items()},
            "cpu_rounds": encode_cpu[key],
            "auto_batch_size": auto_batch_size(
                device.type, results["models"][name]["gflop_per_image"], key.split()[1], allocator_kept
            ),
        }
    results["encode"] = table
    for entry in scans.values():
        values = entry["marginal_s_per_image"]
        entry["best_marginal_s_per_image"] = min(values)
        # the ratio in each round (same load) and of the bests: the scan's rate over the reference's rate
        entry["rate_vs_reference_per_round"] = [
            ref / value for ref, value in zip(entry["reference_in_round"], values, strict=True)
        ]
        entry["rate_vs_reference_best"] = min(reference) / min(values)
        entry["cpu_rate_vs_reference_per_round"] = [
            ref / value
            for ref, value in zip(entry["reference_cpu_in_round"], entry["marginal_cpu_s_per_image"], strict=True)
        ]
        entry["cpu_rate_vs_reference_best"] = min(reference_cpu) / min(entry["marginal_cpu_s_per_image"])
    results["scan"] = scans
    results["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    print(f"JSON: {args.json_path}")
    return 0


def print_summary(results: dict) -> None:
    print(f"\nmachine: {results['machine']['cpu']}, device {results['machine']['device']}")
    print(f"reference fp32 batch 1: {results['reference_fp32_batch1_s_per_image']['best']:.3f} s/image (best)")
    for key, row in results.get("encode", {}).items():
        cells = "  ".join(f"b{size}: {value:.4g}" for size, value in row["s_per_image_best"].items())
        print(f"encode {key:14s} s/image  {cells}   fastest {row['fastest_batch']}, auto {row['auto_batch_size']}")
        cells = "  ".join(f"b{size}: {value:.4g}" for size, value in row["cpu_s_per_image_best"].items())
        print(f"encode {key:14s} CPU s/image  {cells}")
    for key, entry in results.get("scan", {}).items():
        rounds = ", ".join(f"{r:.2f}" for r in entry["rate_vs_reference_per_round"])
        print(
            f"scan {key} (batch {entry['batch_size']}): {entry['best_marginal_s_per_image']:.3f} s/image marginal,"
            f" rate / reference {entry['rate_vs_reference_best']:.2f} (per round: {rounds}); in CPU seconds"
            f" {min(entry['marginal_cpu_s_per_image']):.3f}, rate / reference {entry['cpu_rate_vs_reference_best']:.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
