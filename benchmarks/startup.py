#!/usr/bin/env python3
"""What a short run pays before it does anything: process wall times of winclip commands that fail or
have nothing to do, against the same commands through the model path, measured in one run.

  fast failure:   `scan DIR --weights missing.pt` (a name in the current folder)
  busy folder:    `scan DIR` into an OUT another process holds
  nothing new:    `scan DIR --incremental` a second time (decided from the run state, no torch)
  model path:     the same, with the model config touched first, so the scan cannot be sure without
                  loading the model: what every such run cost before (import torch and open_clip,
                  load the model, find nothing to score)
  import:         `python -c "import winclip_cli.jobs.scan"` (what any model-loading run imports)

Each is run ROUNDS times, interleaved, and the median taken; the ratios compare figures of the same
run. Uses the tiny random-weight model of the tests (built here), so the model path's own loading is
small: with the default architecture it adds seconds more. Prints a table and writes a JSON file.
Nothing is asserted: these are measurements.

Example:
  python benchmarks/startup.py --rounds 5 --json benchmarks/results-startup-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_model(folder: Path) -> list[str]:
    config, checkpoint = folder / "winclip-tiny-test.json", folder / "tiny.pt"
    config.write_text(json.dumps(TINY_CONFIG))
    code = (
        "import open_clip, torch, sys; open_clip.add_model_config(sys.argv[1]); torch.manual_seed(0); "
        "m = open_clip.create_model('winclip-tiny-test', pretrained=None); torch.save(m.state_dict(), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(config), str(checkpoint)], check=True, capture_output=True)
    return ["--model", str(config), "--weights", str(checkpoint), "--device", "cpu"]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="winclip-startup-"))
    try:
        env = {**os.environ, "WINCLIP_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        model = tiny_model(work)
        images = work / "images"
        shutil.copytree(REPO / "sample_data" / "fabric" / "test", images)
        out, busy = work / "out", work / "busy"
        winclip = [sys.executable, "-m", "winclip_cli"]
        incremental = [*winclip, "scan", str(images), "--out", str(out), "--incremental", "-q", *model]
        subprocess.run(incremental, cwd=work, env=env, check=True, capture_output=True)
        hold = (
            "import sys, time, pathlib; from winclip_cli.io.state import OutputLock; "
            "OutputLock(pathlib.Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(3600)"
        )
        holder = subprocess.Popen([sys.executable, "-c", hold, str(busy)], stdout=subprocess.PIPE, text=True, env=env)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cases = {
            "fast failure: --weights missing.pt": [*winclip, "scan", str(images), "--weights", "missing.pt"],
            "busy folder (exit 4)": [*winclip, "scan", str(images), "--out", str(busy), *model],
            "nothing new: scan --incremental": incremental,
            "the same through the model path": incremental,
            "import winclip_cli.jobs.scan": [sys.executable, "-c", "import winclip_cli.jobs.scan"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        codes: dict[str, set[int]] = {name: set() for name in cases}
        for _ in range(args.rounds):
            for name, command in cases.items():
                if name == "the same through the model path":
                    os.utime(model[1])  # touched: the key of the last run no longer matches
                seconds, code = timed(command, work, env)
                times[name].append(seconds)
                codes[name].add(code)
        holder.kill()
        holder.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    model_path = medians["the same through the model path"]
    print(f"{'case':40} {'median s':>9} {'vs model path':>14}  exit codes")
    for name, value in medians.items():
        print(f"{name:40} {value:9.2f} {value / model_path:14.2f}  {sorted(codes[name])}")
    if args.json:
        record = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "python": platform.python_version(),
            "rounds": args.rounds,
            "median_seconds": {name: round(value, 3) for name, value in medians.items()},
            "all_seconds": {name: [round(v, 3) for v in values] for name, values in times.items()},
            "exit_codes": {name: sorted(found) for name, found in codes.items()},
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
