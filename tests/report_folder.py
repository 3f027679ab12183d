"""A hand-made scan output folder (scores.csv with duplicate and hostile rows, run.json, heatmaps,
thumbnails) and the values the report must show for it; used by tests/unit/test_report.py and the
browser tests in tests/system/test_report_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from winclip_cli.io.layout import heatmap_relpath
from winclip_cli.io.outputs import CsvResultWriter, ResultRow, overlay, write_png_atomic
from winclip_cli.io.thumbnails import write_thumbnails

SCRIPT_NAME = "<script>alert(1)</script>.png"
AMP_NAME = 'a&b "c".png'
URL_NAME = "dir with space/sp ace #1 ?x 100%.jpg"
UNICODE_NAME = "画像/ünïcödé 😀.jpg"
OLD_RUN_NAME = "old/no-thumbs.jpg"  # heatmap only, as written before thumbnails existed
THRESHOLD = 0.5

# path -> score of every ok row that should end up in the gallery (after "last row wins").
EXPECTED_SCORES: dict[str, float] = {
    "good/001.jpg": 0.12,
    "good/002.jpg": 0.31,
    "bad/big.jpg": 0.97,
    "bad/003.jpg": 0.71,
    SCRIPT_NAME: 0.66,
    AMP_NAME: 0.42,
    URL_NAME: 0.55,
    UNICODE_NAME: 0.05,
    OLD_RUN_NAME: 0.83,
    "dup/twice.jpg": 0.2,  # first written as 0.99 anomalous, then re-scanned
    "dup/fixed.jpg": 0.6,  # first an error, then scored
    "zero.jpg": 0.0,
    "one.jpg": 1.0,
}
# path -> reason of every failed file (after "last row wins").
EXPECTED_ERRORS: dict[str, str] = {
    "broken.jpg": "cannot identify image file",
    "dup/broke-later.jpg": "truncated <b>file</b> & more",  # first scored, then failed
    "<img src=x onerror=alert(2)>.jpg": "decode error: 'quoted' \"double\"",
}


def label_for(score: float) -> str:
    return "anomalous" if score >= THRESHOLD else "normal"


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def ok_row(path: str, score: float, *, thresh: float = THRESHOLD, w: int = 48, h: int = 32) -> ResultRow:
    return ResultRow(
        path=path,
        status="ok",
        score=score,
        label=label_for(score) if thresh == THRESHOLD else ("anomalous" if score >= thresh else "normal"),
        threshold=thresh,
        max_pixel_score=min(1.0, score + 0.05),
        heatmap=heatmap_relpath(path),
        width=w,
        height=h,
        mode="zero-shot",
    )


def write_outputs(out: Path, path: str, h: int, w: int, seed: int, *, thumbs: bool = True) -> None:
    """Heatmap PNG (and thumbnails) for one image, as the scan writes them."""
    img = random_image(h, w, seed)
    heat = overlay(img, np.linspace(0.0, 1.0, h * w).reshape(h, w))
    write_png_atomic(out / heatmap_relpath(path), heat)
    if thumbs:
        write_thumbnails(out, path, img, heat)


def default_run() -> dict[str, object]:
    """A complete run.json as the current scan writes it."""
    return {
        "tool": "winclip",
        "version": "0.1.0",
        "started": "2024-05-01T10:00:00+00:00",
        "finished": "2024-05-01T10:02:05+00:00",
        "seconds": 125.4,
        "input": "/data/bottles",
        "class_name": "bottle",
        "architecture": "ViT-B-16-plus-240",
        "weights": "laion400m_e32",
        "weights_sha256": "ab" * 32,
        "precision": "fp32",
        "device": "cpu",
        "scales": [2, 3],
        "threshold": THRESHOLD,
        "vocabulary": "builtin",
        "vocabulary_sha256": "cd" * 32,
        "mode": "few-shot",
        "refs": "refs.npz",
        "refs_sha256": "ef" * 32,
        "k_shot": 4,
        "pixel_threshold": 0.42,
        "tile": 512,
        "tile_overlap": 64,
        "images": 16,
        "scored": 13,
        "anomalies": 7,
        "errors": 3,
    }


def make_output_folder(out: Path, run: dict[str, object] | None = None) -> Path:
    """A hand-made scan output folder: scores.csv (with duplicate rows), run.json, heatmaps and thumbnails."""
    out.mkdir(parents=True, exist_ok=True)
    with CsvResultWriter(out / "scores.csv") as writer:
        # Earlier rows that later rows replace.
        writer.write(ok_row("dup/twice.jpg", 0.99))
        writer.write(ResultRow(path="dup/fixed.jpg", status="error", error="first attempt failed"))
        writer.write(ok_row("dup/broke-later.jpg", 0.93))
        for i, (path, score) in enumerate(EXPECTED_SCORES.items()):
            big = path == "bad/big.jpg"
            h, w = (300, 600) if big else (32, 48)
            writer.write(ok_row(path, score, w=w, h=h))
            write_outputs(out, path, h, w, seed=i, thumbs=path != OLD_RUN_NAME)
        for path, reason in EXPECTED_ERRORS.items():
            writer.write(ResultRow(path=path, status="error", error=reason))
    (out / "run.json").write_text(json.dumps(default_run() if run is None else run), encoding="utf-8")
    return out
