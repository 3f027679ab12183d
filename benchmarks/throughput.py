"""The CPU side of a scan on 2 MP camera frames: per-step cost, and whole-scan rates against decoding.

Run through ``python benchmarks/bench.py --only throughput`` (or directly). Uses the tiny test model
(random weights, compute negligible), so what it measures is exactly the per-image CPU work a GPU scan
pays: decode, resize to the model input, map upsampling, heatmap colouring and encoding, thumbnails.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted((REPO / "sample_data").rglob("*.jpg"))
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
FORMATS = ("png", "jpg", "none")


def make_frames(folder: Path, count: int, size=(1920, 1080), seed: int = 0) -> list[Path]:
    """Camera-like 2 MP JPEGs (q90): the sample photos enlarged, with sensor-like noise."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        with Image.open(SAMPLES[i % len(SAMPLES)]) as src:
            big = np.asarray(src.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"frame_{i:04d}.jpg")
        Image.fromarray(noisy).save(paths[-1], quality=90)
    return paths


def _cpu_ms(fn, items) -> float:
    """Mean CPU milliseconds per item (process time: other processes on a shared machine do not count)."""
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1000


def step_costs(paths: list[Path], work: Path) -> dict:
    """Per-image CPU cost of each step, one thread, as the scan runs them."""
    import numpy as np
    import torch

    from winclip_cli.io.images import load_image, preprocess
    from winclip_cli.io.outputs import overlay, write_jpeg_atomic, write_png_atomic
    from winclip_cli.io.thumbnails import write_thumbnails
    from winclip_cli.jobs.maps import upsample_grid
    from winclip_cli.jobs.write import _small_overlay

    torch.set_num_threads(1)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    grid = torch.from_numpy(np.random.default_rng(0).random((15, 15), dtype=np.float32))
    images = [load_image(p) for p in paths[:2]]  # warm-up (imports, cached weights)
    preprocess(images[0], (240, 240), mean, std)
    costs = {"decode": _cpu_ms(load_image, paths)}
    images = [load_image(p) for p in paths]
    displays = [im.to_display_uint8() for im in images]
    costs["preprocess"] = _cpu_ms(lambda im: preprocess(im, (240, 240), mean, std), images)
    maps = [upsample_grid(grid, im.height, im.width) for im in images]
    costs["upsample"] = _cpu_ms(lambda im: upsample_grid(grid, im.height, im.width), images)
    heats = [overlay(d, m) for d, m in zip(displays, maps, strict=True)]
    costs["overlay"] = _cpu_ms(lambda i: overlay(displays[i], maps[i]), range(len(images)))
    costs["encode_png"] = _cpu_ms(
        lambda i: write_png_atomic(work / "h.png", heats[i], fsync=False, compress_level=1), range(len(images))
    )
    costs["png_mb"] = (work / "h.png").stat().st_size / 1e6
    costs["encode_jpg"] = _cpu_ms(
        lambda i: write_jpeg_atomic(work / "h.jpg", heats[i], fsync=False), range(len(images))
    )
    costs["jpg_mb"] = (work / "h.jpg").stat().st_size / 1e6
    items = [SimpleNamespace(tiles=None, outputs=[(0.0, grid)]) for _ in images]
    costs["thumbnails"] = _cpu_ms(
        lambda i: write_thumbnails(work, "t.jpg", *_small_overlay(displays[i], items[i], None)), range(len(images))
    )
    costs["model_tiny_one_thread"] = _tiny_model_ms(work)
    shared = costs["decode"] + costs["preprocess"] + costs["upsample"]
    costs["total_png"] = shared + costs["overlay"] + costs["encode_png"] + costs["thumbnails"]
    costs["total_jpg"] = shared + costs["overlay"] + costs["encode_jpg"] + costs["thumbnails"]
    costs["total_none"] = shared + costs["thumbnails"]
    for fmt in FORMATS:  # the most a scan can reach of the decode rate: all its work against decoding alone
        work_ms = costs[f"total_{fmt}"] + costs["model_tiny_one_thread"]
        costs[f"ceiling_{fmt}_of_decode_rate"] = costs["decode"] / work_ms
    return costs


def _tiny_model_ms(work: Path) -> float:
    """CPU ms per image of the tiny model itself (batches of 8, one thread): not negligible next to the
    steps above on a small CPU, so it is reported beside them."""
    import open_clip
    import torch

    from winclip_cli.core.winclip import WinClipScorer

    config = work / "winclip-bench-tiny-steps.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("winclip-bench-tiny-steps").eval()
    scorer = WinClipScorer(model.visual, torch.randn(2, model.visual.output_dim))
    batch = torch.randn(8, 3, 240, 240)
    with torch.inference_mode():
        scorer.score_embeddings(scorer.embed(batch))
        return _cpu_ms(lambda _: scorer.score_embeddings(scorer.embed(batch)), range(5)) / 8


def _two_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else []


def _pinned():
    cpus = _two_cpus()
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def decode_rate(paths: list[Path]) -> float:
    """Images/s of plain Pillow decoding (to RGB) of the files on 2 threads."""
    from PIL import Image

    def decode(path: Path) -> None:
        with Image.open(path) as im:
            im.convert("RGB").load()

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(decode, paths))
    return len(paths) / (time.perf_counter() - start)


def scan_seconds(folder: Path, out: Path, fmt: str, model: list[str], env: dict) -> tuple[float, float]:
    """(process wall seconds, seconds of the scan loop itself as run.json records them)."""
    args = [sys.executable, "-m", "winclip_cli", "scan", str(folder), "--out", str(out), "-q", "--workers", "2"]
    start = time.perf_counter()
    done = subprocess.run(
        [*args, "--heatmaps", fmt, *model], env=env, capture_output=True, text=True, preexec_fn=_pinned()
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"scan failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, json.loads((out / "run.json").read_text())["scan_seconds"]


def marginal_rates(small: Path, large: Path, work: Path, repeats: int) -> dict:
    """Whole-process marginal images/s of `winclip scan` ((N2 - N1) / (T2 - T1)) per heatmap format,
    next to the decode rate, measured in interleaved rounds; ratios are taken within a round."""
    import open_clip
    import torch

    config = work / "winclip-bench-tiny.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("winclip-bench-tiny").state_dict(), work / "tiny.pt")
    model = ["--model", str(config), "--weights", str(work / "tiny.pt"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    n_small, n_large = len(list(small.glob("*.jpg"))), len(list(large.glob("*.jpg")))
    scan_seconds(small, work / "warm", "png", model, env)  # text cache, file cache
    rounds = []
    for r in range(repeats):
        cpus = _two_cpus()
        saved = os.sched_getaffinity(0) if cpus else None
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            decode = decode_rate(sorted(large.glob("*.jpg")))
        finally:
            if saved:
                os.sched_setaffinity(0, saved)
        entry = {"decode_images_per_s": decode}
        for fmt in FORMATS:
            t_small, loop_small = scan_seconds(small, work / f"o-{fmt}-{r}-s", fmt, model, env)
            t_large, loop_large = scan_seconds(large, work / f"o-{fmt}-{r}-l", fmt, model, env)
            rate = (n_large - n_small) / max(t_large - t_small, 1e-9)
            entry[f"scan_{fmt}_images_per_s"] = rate
            entry[f"scan_{fmt}_fraction_of_decode"] = rate / decode
            # the same difference of the scan loops alone: free of the noise of process start-up
            loop_rate = (n_large - n_small) / max(loop_large - loop_small, 1e-9)
            entry[f"scan_loop_{fmt}_images_per_s"] = loop_rate
            entry[f"scan_loop_{fmt}_fraction_of_decode"] = loop_rate / decode
        rounds.append(entry)
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {"images": [n_small, n_large], "rounds": rounds, "median": summary}


def measure(images: int = 120, small: int = 8, repeats: int = 3, steps_only: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="winclip-throughput-"))
    os.environ.setdefault("WINCLIP_CACHE_DIR", str(work / "cache"))
    frames = make_frames(work / "large", images)
    (work / "small").mkdir()
    for path in frames[:small]:
        os.link(path, work / "small" / path.name)
    results = {"frame": "1920x1080 JPEG q90", "steps_cpu_ms_per_image": step_costs(frames[:12], work)}
    if not steps_only:
        results["whole_scan"] = marginal_rates(work / "small", work / "large", work, repeats)
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-only", action="store_true")
    a = parser.parse_args()
    print(json.dumps(measure(a.images, repeats=a.repeats, steps_only=a.steps_only), indent=2))
