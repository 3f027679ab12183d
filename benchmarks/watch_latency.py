#!/usr/bin/env python3
"""winclip watch: latency from a file's final rename to its row, and memory over a soak run.

Starts `winclip watch --json` in a subprocess on an empty folder, then
  single: files renamed in one at a time (each waits for the previous row): latency of one file
  burst:  N files renamed in at once: latency of each, queueing behind the others included
  soak:   a file every few seconds for S seconds: RSS of the watch process at start and end,
          open file descriptors, threads, size of OUT/.winclip

A row's time is when its JSON line arrives on the watch's stdout, which the watch prints after
the row is committed to the run state and appended to scores.csv (so the CSV row is there first).
Images are the 250x250 JPEGs of sample_data, copied under new names (written to a hidden
temporary name, then renamed, as a camera or rsync does).

Prints a summary and writes a JSON file. Nothing is asserted: these are measurements.

Examples:
  python benchmarks/watch_latency.py --model tiny                         # events, tiny model, CPU
  python benchmarks/watch_latency.py --model tiny --poll 0.5              # polling instead of events
  python benchmarks/watch_latency.py --model tiny --soak 600 --interval 3 # 10-minute soak
  python benchmarks/watch_latency.py --model tiny --single 0 --burst 0 --soak 300 --delete-after
  python benchmarks/watch_latency.py --model default --single 3 --burst 8 # ViT-B-16-plus-240, random weights
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted((REPO / "sample_data").rglob("*.jpg"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny", help="tiny test model or ViT-B-16+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--poll", type=float, help="pass --poll SECONDS (default: file-system events)")
    parser.add_argument("--single", type=int, default=10, help="files renamed in one at a time")
    parser.add_argument("--burst", type=int, default=50, help="files renamed in at once")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of soak run (0: none)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between files in the soak run")
    parser.add_argument(
        "--delete-after", action="store_true", help="soak: delete each file once scored (the folder stays small)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", dest="json_path", default="benchmarks/watch-latency.json", help="output JSON file")
    return parser.parse_args()


def model_args(kind: str, folder: Path) -> list[str]:
    import open_clip
    import torch

    torch.manual_seed(0)
    if kind == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import TINY_CONFIG  # the test suite's tiny model: same 240 px input and 15x15 grid

        config = folder / "winclip-tiny-test.json"
        config.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(config)
        model = open_clip.create_model("winclip-tiny-test", pretrained=None)
        weights = folder / "tiny.pt"
        torch.save(model.state_dict(), weights)
        return ["--model", str(config), "--weights", str(weights)]
    model = open_clip.create_model("ViT-B-16-plus-240", pretrained=None)
    weights = folder / "vit_b_16_plus_240-random.pt"
    torch.save(model.state_dict(), weights)
    return ["--model", "ViT-B-16-plus-240", "--weights", str(weights)]


class WatchProcess:
    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.arrived: dict[str, float] = {}  # path -> when its row arrived
        self.messages: list[str] = []
        self.batch_seconds: list[float] = []
        self.batch_files: list[int] = []
        self._lock = threading.Condition()
        threading.Thread(target=self._rows, daemon=True).start()
        threading.Thread(target=self._stderr, daemon=True).start()

    def _rows(self) -> None:
        for line in self.proc.stdout:
            now = time.monotonic()
            row = json.loads(line)
            with self._lock:
                self.arrived[row["path"]] = now
                self._lock.notify_all()

    def _stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._lock:
                self.messages.append(line)
                if " scored: " in line and line.endswith(" s)"):
                    self.batch_seconds.append(float(line.rsplit("(", 1)[1].split()[0]))
                    self.batch_files.append(int(line.split()[0]))
                self._lock.notify_all()

    def wait(self, condition, timeout: float = 600) -> None:
        with self._lock:
            if not self._lock.wait_for(condition, timeout=timeout):
                raise SystemExit(f"timed out; watch said: {self.messages[-5:]}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1

    def resources(self) -> dict:
        return {
            "rss_kib": self.rss_kib(),
            "fds": len(os.listdir(f"/proc/{self.proc.pid}/fd")),
            "threads": len(os.listdir(f"/proc/{self.proc.pid}/task")),
        }


def put(folder: Path, name: str, index: int) -> float:
    """Copy a sample under a hidden name, rename it in; returns the time of the rename."""
    temporary = folder / f".{name}.part"
    shutil.copyfile(SAMPLES[index % len(SAMPLES)], temporary)
    os.replace(temporary, folder / name)
    return time.monotonic()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    return {
        "n": len(latencies),
        "median_s": round(statistics.median(latencies), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        "max_s": round(max(latencies), 3),
        "min_s": round(min(latencies), 3),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    args = parse_args()
    results: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **vars(args)}
    with tempfile.TemporaryDirectory(prefix="winclip-watch-bench-") as tmp:
        tmp_path = Path(tmp)
        folder, out = tmp_path / "camera", tmp_path / "out"
        folder.mkdir()
        command = [sys.executable, "-m", "winclip_cli", "watch", str(folder), "--out", str(out), "--json"]
        command += model_args(args.model, tmp_path) + ["--device", args.device, "--batch-size", str(args.batch_size)]
        os.environ["WINCLIP_CACHE_DIR"] = str(tmp_path / "cache")  # the text cache starts empty, as on a new machine
        if args.poll is not None:
            command += ["--poll", str(args.poll)]
        started = time.monotonic()
        watch = WatchProcess(command)
        watch.wait(lambda: any(m.startswith("watching ") for m in watch.messages))
        results["startup_s"] = round(time.monotonic() - started, 2)
        print(f"watch ready after {results['startup_s']} s ({watch.messages[-1]})")
        count = 0

        latencies = []
        for _ in range(args.single):
            name = f"single_{count:05d}.jpg"
            renamed = put(folder, name, count)
            count += 1
            watch.wait(lambda n=name: n in watch.arrived)
            latencies.append(watch.arrived[name] - renamed)
        watch.wait(lambda: sum(watch.batch_files) >= args.single)  # the batch lines follow the rows
        results["single"] = summary(latencies)
        results["single_batch_seconds"] = summary(list(watch.batch_seconds))
        print("one file at a time:", results["single"], "batch compute+outputs:", results["single_batch_seconds"])

        batches_before = len(watch.batch_seconds)
        renamed_at = {}
        for _ in range(args.burst):
            name = f"burst_{count:05d}.jpg"
            renamed_at[name] = put(folder, name, count)
            count += 1
        watch.wait(lambda: all(n in watch.arrived for n in renamed_at))
        watch.wait(lambda: sum(watch.batch_files) >= args.single + args.burst)
        results["burst"] = summary([watch.arrived[n] - t for n, t in renamed_at.items()])
        results["burst_batches"] = len(watch.batch_seconds) - batches_before
        print(f"burst of {args.burst}:", results["burst"], f"in {results['burst_batches']} batches")

        if args.soak > 0:
            start_resources = watch.resources()
            soak_started = time.monotonic()
            soak_latencies = []
            samples = []
            while time.monotonic() - soak_started < args.soak:
                name = f"soak_{count:05d}.jpg"
                renamed = put(folder, name, count)
                count += 1
                watch.wait(lambda n=name: n in watch.arrived)
                soak_latencies.append(watch.arrived[name] - renamed)
                if args.delete_after:
                    (folder / name).unlink()  # the watch removes its row and heatmap
                samples.append((round(time.monotonic() - soak_started, 1), watch.rss_kib()))
                time.sleep(max(0.0, args.interval - (time.monotonic() - renamed)))
            end_resources = watch.resources()
            results["soak"] = {
                "seconds": round(time.monotonic() - soak_started, 1),
                "files": len(soak_latencies),
                "latency": summary(soak_latencies),
                "start": start_resources,
                "end": end_resources,
                "rss_change_pct": round(100 * (end_resources["rss_kib"] / start_resources["rss_kib"] - 1), 2),
                "rss_samples_kib": samples[:: max(1, len(samples) // 20)],
                "state_bytes": folder_bytes(out / ".winclip"),
            }
            print("soak:", {k: v for k, v in results["soak"].items() if k != "rss_samples_kib"})

        results["end_resources"] = watch.resources()
        watch.proc.terminate()
        results["exit_code"] = watch.proc.wait(timeout=60)
        results["total_rows"] = sum(1 for _ in (out / "scores.csv").open()) - 1
    Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"exit code {results['exit_code']}, {results['total_rows']} rows; wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
