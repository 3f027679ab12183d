#!/usr/bin/env python3
"""winclip benchmark: where the time of a scan goes, as ratios measured in one run on one machine.

Measures, for the default architecture with random weights (or --weights):
  import time, model load (.pt and .safetensors), text encoding (plain open_clip, truncated, cached),
  per-image model compute and its GFLOP/s next to a dense-matmul roofline of the same dtype,
  end-to-end `winclip scan` images/s with every output written, a cron-style run (fresh process,
  cached text, N images), peak RSS of a 50- and a 500-image scan (small model: the pipeline's
  memory, not the weights'), and the drift of scores in reduced precision against fp32.
  Section "throughput" (benchmarks/throughput.py, tiny model): the per-image CPU cost of each step of
  a scan on 2 MP JPEGs (decode, preprocess, upsample, overlay, encode, thumbnails) for each heatmap
  format, and whole-scan marginal rates with --heatmaps png/jpg/none against plain Pillow decoding
  of the same files on 2 threads.

Prints a table and writes a JSON file. Nothing is asserted: these are measurements, and the
ratios between them (taken in the same run) are what to compare across machines.

Examples:
  python benchmarks/bench.py                      # CPU, fp32 (+ bf16 where the CPU has native bf16)
  python benchmarks/bench.py --device cuda --precisions fp32,bf16,fp16 --images 32
  python benchmarks/bench.py --quick              # a short smoke run of every measurement
  python benchmarks/bench.py --only throughput    # only the CPU side of a scan on 2 MP frames
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
SAMPLE_TEST = REPO / "sample_data" / "fabric" / "test"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16-plus-240", help="open_clip architecture (default: %(default)s)")
    parser.add_argument("--weights", help="checkpoint file (default: random weights saved to a temp dir)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    parser.add_argument("--precisions", default="auto", help="comma list of fp32,bf16,fp16, or auto (default)")
    parser.add_argument("--images", type=int, default=8, help="images for compute and end-to-end timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cron-images", type=int, default=20, help="images in the cron-style run")
    parser.add_argument("--rss-counts", default="50,500", help="image counts for the peak-RSS comparison")
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of sections to skip: throughput,load,text,compute,fewshot,scan,cron,rss,drift",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts everywhere (smoke test of the script)")
    parser.add_argument("--only", choices=["throughput"], help="run only this section")
    parser.add_argument(
        "--throughput-images", type=int, default=120, help="2 MP frames in the large scan (the small one has 8)"
    )
    parser.add_argument("--throughput-repeats", type=int, default=3, help="interleaved rounds of scans")
    parser.add_argument("--json", dest="json_path", default="benchmarks/results.json", help="output JSON file")
    return parser.parse_args()


def timed(fn, repeat: int = 1):
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "winclip_cli", *args], capture_output=True, text=True, env=env)
    return time.perf_counter() - start, proc


def peak_rss_mb_of(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Peak RSS of a child process (Linux: ru_maxrss in KiB), measured in a fresh grandchild-free run."""
    code = (
        "import resource, subprocess, sys; "
        f"p = subprocess.run([sys.executable, '-m', 'winclip_cli', *{args!r}], capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.split()
    return int(out[0]) / 1024, int(out[1])


def make_images(folder: Path, count: int, size=(320, 240), seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for i in range(count):
        image = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.BILINEAR)
        image.save(folder / f"img_{i:04d}.jpg", quality=90)


def vit_flops_per_image(visual, scales) -> float:
    """Multiply-adds x 2 of one WinCLIP pass: patch embedding, full image, every window of every scale."""
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0]
    block = visual.transformer.resblocks[0]
    hidden = block.mlp.c_fc.out_features
    layers = len(visual.transformer.resblocks)
    grid = visual.grid_size
    patches = grid[0] * grid[1]
    sequences = [(1, patches + 1)]
    for s in scales:
        sequences.append(((grid[0] - s + 1) * (grid[1] - s + 1), s * s + 1))
    total = 2 * patches * 3 * patch * patch * width
    for count, length in sequences:
        linear = 2 * length * (4 * width * width + 2 * width * hidden)
        attention = 2 * 2 * length * length * width
        total += count * layers * (linear + attention)
        total += count * 2 * width * visual.proj.shape[1]
    return float(total)


def matmul_roofline(torch, device, dtype, width: int, hidden: int, tokens: int) -> float:
    """GFLOP/s of the MLP-shaped matmul (tokens x width) @ (width x hidden) in this dtype on this device."""
    a = torch.randn(tokens, width, device=device, dtype=dtype)
    b = torch.randn(width, hidden, device=device, dtype=dtype)

    def step():
        out = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    step()
    repeat = 3 if device.type == "cpu" else 20
    seconds, _ = timed(step, repeat)
    return 2 * tokens * width * hidden / seconds / 1e9


def main() -> int:
    args = parse_args()
    if args.quick:
        args.images, args.cron_images, args.rss_counts = 2, 2, "4,8"
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform()}}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    work = Path(tempfile.mkdtemp(prefix="winclip-bench-"))
    env["WINCLIP_CACHE_DIR"] = str(work / "cache")
    os.environ["WINCLIP_CACHE_DIR"] = env["WINCLIP_CACHE_DIR"]

    if "throughput" not in skip:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from throughput import measure  # noqa: E402

        images, repeats = (12, 1) if args.quick else (args.throughput_images, args.throughput_repeats)
        results["throughput"] = measure(images, small=min(8, images // 2), repeats=repeats)
    if args.only == "throughput":
        import torch  # noqa: E402

        results["machine"].update(torch=torch.__version__, device="cpu", cpu=cpu_name())
        return finish(results, args)

    # --------------------------------------------------------------------------------------- imports
    t_help, _ = run_cli(["--help"], env)
    t_prompts, _ = run_cli(["prompts", "--json"], env)
    t0 = time.perf_counter()
    import torch  # noqa: E402

    t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    import open_clip  # noqa: E402

    t_open_clip = time.perf_counter() - t0
    results["startup"] = {
        "winclip_help_s": t_help,
        "winclip_prompts_json_s": t_prompts,
        "import_torch_s": t_torch,
        "import_open_clip_after_torch_s": t_open_clip,
    }

    from winclip_cli.core.backbone import cpu_has_native_bf16, select_device, select_precision  # noqa: E402
    from winclip_cli.core.engine import ModelOptions, build_backbone, quiet_open_clip  # noqa: E402
    from winclip_cli.core.prompts import load_vocabulary  # noqa: E402
    from winclip_cli.core.text import TextEmbeddingCache, encode_text_truncated  # noqa: E402
    from winclip_cli.core.winclip import WinClipScorer  # noqa: E402
    from winclip_cli.options import Device, Precision  # noqa: E402

    device = select_device(Device.parse(args.device))
    results["machine"].update(
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_native_bf16=cpu_has_native_bf16(),
        gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    )
    if args.precisions == "auto":
        precisions = ["fp32"] + (
            [select_precision(Precision.AUTO, device)] if select_precision(Precision.AUTO, device) != "fp32" else []
        )
    else:
        precisions = args.precisions.split(",")

    # ------------------------------------------------------------------------------------ model load
    checkpoint = Path(args.weights) if args.weights else work / "random.pt"
    if not args.weights:
        with quiet_open_clip():
            torch.manual_seed(0)
            model = open_clip.create_model(args.arch)
        torch.save(model.state_dict(), checkpoint)
        if "load" not in skip:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "random.safetensors"))
        del model
    if "load" not in skip:
        loads = {}
        for path in [checkpoint] + ([work / "random.safetensors"] if not args.weights else []):
            seconds, _ = timed(lambda p=path: build_backbone(ModelOptions(args.arch, str(p), "cpu")), 1)
            loads[path.suffix] = seconds
        results["model_load_s"] = loads
        results["checkpoint_mb"] = checkpoint.stat().st_size / 1e6

    # ------------------------------------------------------------------------------------------- text
    backbone = build_backbone(ModelOptions(args.arch, str(checkpoint), str(device)))
    model, tokenizer = backbone.model, backbone.tokenizer
    if "text" not in skip:
        ensemble = load_vocabulary(None).ensemble("bottle")
        tokens = tokenizer(list(ensemble.normal) + list(ensemble.anomalous)).to(device)
        with torch.inference_mode():
            t_plain, plain = timed(lambda: model.encode_text(tokens), 1)
            t_fast, fast = timed(lambda: encode_text_truncated(model, tokens), 1)
        cache = TextEmbeddingCache(work / "textcache")
        cache.get_or_compute(model, tokenizer, ensemble, backbone.identity, device)
        t_cached, _ = timed(lambda: cache.get_or_compute(model, tokenizer, ensemble, backbone.identity, device), 3)
        results["text"] = {
            "sentences": int(tokens.shape[0]),
            "plain_encode_text_s": t_plain,
            "truncated_s": t_fast,
            "cached_s": t_cached,
            "speedup_truncated": t_plain / t_fast,
            "max_abs_diff": float((plain.float() - fast.float()).abs().max()),
        }

    # ---------------------------------------------------------------------------------------- compute
    visual = model.visual
    flops = vit_flops_per_image(visual, (2, 3))
    width = visual.conv1.out_channels
    hidden = visual.transformer.resblocks[0].mlp.c_fc.out_features
    results["gflop_per_image"] = flops / 1e9
    compute: dict = {}
    if "compute" not in skip:
        for precision in precisions:
            if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
                compute[precision] = {"skipped": "this CPU has no native bf16 matmul (it would be emulated)"}
                compute[precision]["roofline_gflops"] = matmul_roofline(
                    torch, device, torch.bfloat16, width, hidden, 512
                )
                continue
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            bb = build_backbone(ModelOptions(args.arch, str(checkpoint), str(device), precision))
            scorer = WinClipScorer(bb.model.visual, torch.randn(2, bb.model.visual.output_dim))
            batch = torch.randn(min(args.batch_size, args.images), 3, *bb.image_size, device=device, dtype=dtype)

            def step(scorer=scorer, batch=batch):
                out = scorer.score_embeddings(scorer.embed(batch))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out

            step()
            seconds, _ = timed(step, 1 if device.type == "cpu" else 5)
            per_image = seconds / batch.shape[0]
            roofline = matmul_roofline(torch, device, dtype, width, hidden, 2896 * batch.shape[0])
            compute[precision] = {
                "batch": int(batch.shape[0]),
                "seconds_per_image": per_image,
                "images_per_s": 1 / per_image,
                "achieved_gflops": flops / per_image / 1e9,
                "roofline_gflops": roofline,
                "fraction_of_roofline": flops / per_image / 1e9 / roofline,
            }
            del bb, scorer
        results["compute"] = compute

    # ---------------------------------------------------------------------------------- few-shot cost
    if "fewshot" not in skip:
        from winclip_cli.core.winclip import ReferenceMemory  # noqa: E402

        scorer = WinClipScorer(visual, torch.randn(2, visual.output_dim, device=device))
        batch = torch.randn(2, 3, *backbone.image_size, device=device)
        emb = scorer.embed(batch)
        zero_s, _ = timed(lambda: scorer.score_embeddings(emb), 3)
        fewshot = {"zero_shot_scoring_s_per_image": zero_s / 2}
        for k in (1, 4, 16, 64, 256):
            scorer.memory = ReferenceMemory(
                patches=torch.randn(k * emb.patches.shape[1], emb.patches.shape[2], device=device),
                windows=[torch.randn(k * w.shape[1], w.shape[2], device=device) for w in emb.windows],
            )
            seconds, _ = timed(lambda: scorer.score_embeddings(emb), 3)
            fewshot[f"k{k}_scoring_s_per_image"] = seconds / 2
        per_image = compute.get("fp32", {}).get("seconds_per_image")
        if per_image:
            fewshot["k64_added_fraction_of_fp32_image"] = (fewshot["k64_scoring_s_per_image"] - zero_s / 2) / per_image
        results["fewshot"] = fewshot

    # ----------------------------------------------------------------------------------- end to end
    images = work / "images"
    make_images(images, max(args.images, args.cron_images))
    model_args = ["--model", args.arch, "--weights", str(checkpoint), "--device", str(device.type)]
    if "scan" not in skip:
        scan: dict = {}
        e2e_images = work / "e2e"
        make_images(e2e_images, args.images, seed=1)
        for precision in precisions:
            if "skipped" in compute.get(precision, {}):
                continue
            run_cli(["prompts", "--json"], env)  # warm the file cache
            seconds, proc = run_cli(
                [
                    "scan",
                    str(e2e_images),
                    "--out",
                    str(work / f"scan-{precision}"),
                    "--precision",
                    precision,
                    "--batch-size",
                    str(args.batch_size),
                    "-q",
                    *model_args,
                ],
                env,
            )
            info = json.loads((work / f"scan-{precision}" / "run.json").read_text())
            in_scan = info["scored"] / info["scan_seconds"]
            entry = {
                "process_seconds": seconds,
                "setup_seconds": info["setup_seconds"],
                "images_per_s_in_scan": in_scan,
                "returncode": proc.returncode,
            }
            if precision in compute and "images_per_s" in compute[precision]:
                entry["fraction_of_compute_only"] = in_scan / compute[precision]["images_per_s"]
            scan[precision] = entry
        if "fp32" in scan and len(scan) > 1:
            for precision in scan:
                scan[precision]["speedup_vs_fp32"] = (
                    scan[precision]["images_per_s_in_scan"] / scan["fp32"]["images_per_s_in_scan"]
                )
        results["scan"] = scan

    if "cron" not in skip:
        precision = precisions[-1]
        if "skipped" not in compute.get(precision, {}):
            cron_dir = work / "cron"
            make_images(cron_dir, args.cron_images, seed=2)
            run_cli(
                [
                    "scan",
                    str(cron_dir / "img_0000.jpg"),  # one image is enough to fill the text cache
                    "--out",
                    str(work / "cron-warm"),
                    "--precision",
                    precision,
                    "-q",
                    "--batch-size",
                    str(args.batch_size),
                    *model_args,
                ],
                env,
            )  # fills the text cache
            seconds, proc = run_cli(
                [
                    "scan",
                    str(cron_dir),
                    "--out",
                    str(work / "cron-out"),
                    "--precision",
                    precision,
                    "-q",
                    "--batch-size",
                    str(args.batch_size),
                    *model_args,
                ],
                env,
            )
            per_image = compute.get(precision, {}).get("seconds_per_image")
            results["cron"] = {
                "precision": precision,
                "images": args.cron_images,
                "wall_s": seconds,
                "model_compute_s": per_image * args.cron_images if per_image else None,
                "ratio_wall_to_compute": seconds / (per_image * args.cron_images) if per_image else None,
                "returncode": proc.returncode,
            }

    if "rss" not in skip:
        tiny = work / "tiny.json"
        tiny.write_text(
            json.dumps(
                {
                    "embed_dim": 32,
                    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
                }
            )
        )
        open_clip.add_model_config(tiny)
        with quiet_open_clip():
            torch.save(open_clip.create_model("tiny").state_dict(), work / "tiny.pt")
        rss = {}
        for count in map(int, args.rss_counts.split(",")):
            folder = work / f"rss-{count}"
            make_images(folder, count, size=(640, 480), seed=3)
            mb, code = peak_rss_mb_of(
                [
                    "scan",
                    str(folder),
                    "--out",
                    str(work / f"rss-out-{count}"),
                    "-q",
                    "--model",
                    str(tiny),
                    "--weights",
                    str(work / "tiny.pt"),
                    "--device",
                    "cpu",
                ],
                env,
            )
            rss[str(count)] = {"peak_rss_mb": mb, "returncode": code}
        counts = list(rss)
        rss["growth"] = rss[counts[-1]]["peak_rss_mb"] / rss[counts[0]]["peak_rss_mb"]
        results["peak_rss"] = rss

    if "drift" not in skip:
        drift = {}
        reduced = [p for p in precisions if p != "fp32" and "skipped" not in compute.get(p, {})]
        if reduced:
            import numpy as np
            import tifffile
            from scipy.stats import spearmanr

            def scan_maps(precision: str):
                out = work / f"drift-{precision}"
                run_cli(
                    [
                        "scan",
                        str(SAMPLE_TEST),
                        "--out",
                        str(out),
                        "--precision",
                        precision,
                        "--save-maps",
                        "-q",
                        *model_args,
                    ],
                    env,
                )
                from winclip_cli.io.outputs import read_results_csv

                rows = read_results_csv(out / "scores.csv")
                maps = [tifffile.imread(out / "maps" / (r["path"] + ".tiff")) for r in rows]
                return np.array([float(r["score"]) for r in rows]), maps

            base_scores, base_maps = scan_maps("fp32")
            for precision in reduced:
                scores, maps = scan_maps(precision)
                drift[precision] = {
                    "images": len(scores),
                    "max_abs_image_score_diff": float(np.abs(scores - base_scores).max()),
                    "max_abs_map_diff": float(max(np.abs(a - b).max() for a, b in zip(maps, base_maps, strict=True))),
                    "spearman_image_scores": float(spearmanr(scores, base_scores).statistic),
                }
        results["drift_vs_fp32"] = drift or {"skipped": "no reduced precision measured on this device"}

    return finish(results, args)


def cpu_name() -> str:
    """The CPU's model name and core count, as every benchmark's JSON records the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def finish(results: dict, args: argparse.Namespace) -> int:
    results["peak_rss_of_benchmark_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nJSON: {args.json_path}")
    return 0


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"winclip benchmark ({results['machine']['device']}, torch {results['machine'].get('torch')})")
    table.add_column("measurement")
    table.add_column("value", justify="right")

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:.4g}")
        else:
            table.add_row(prefix, str(value))

    walk("", results)
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
