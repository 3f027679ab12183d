"""A static, self-contained HTML report of an output folder: run summary, score histogram, gallery, failures.

The page (OUT/report.html) uses inline CSS and JS only and references its images by relative paths, so it
works from file:// on another machine or a file share, offline. Nothing here computes scores or knows the CLI.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from winclip_cli.io.outputs import HEATMAP_DIR, atomic_path, confined_path, heatmap_relpath, write_text_atomic
from winclip_cli.io.state import refuse_link

__all__ = [
    "REPORT_NAME",
    "THUMB_DIR",
    "THUMB_SIZE",
    "build_report",
    "thumbnail_relpaths",
    "write_thumbnails",
]

REPORT_NAME = "report.html"
THUMB_DIR = "thumbs"
THUMB_SIZE = 256  # longest side in pixels
THUMB_QUALITY = 85

_IMAGE_SUFFIX = ".img.jpg"  # distinct endings: no image name can produce another's heatmap thumbnail
_HEAT_SUFFIX = ".heat.jpg"
_NAME_MAX_BYTES = 255
_HIST_BINS = 20

# C0 controls (bar tab/newline) and DEL: invalid or invisible in HTML text, shown as U+FFFD instead.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# --------------------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------------------


def _name_bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def _fit_stem(stem: str) -> str:
    """Shorten ``stem`` so that stem + the longest thumbnail suffix fits one file name (255 bytes)."""
    if _name_bytes(stem + _HEAT_SUFFIX) <= _NAME_MAX_BYTES:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    tail = f"~{digest}"
    head = stem
    while _name_bytes(head + tail + _HEAT_SUFFIX) > _NAME_MAX_BYTES:
        head = head[:-1]
    return head + tail


def thumbnail_relpaths(image_relpath: str) -> tuple[str, str]:
    """(image thumbnail, heatmap thumbnail) paths relative to OUT, e.g. 'good/001.jpg' ->
    ('thumbs/good/001.jpg.img.jpg', 'thumbs/good/001.jpg.heat.jpg').

    Derived from :func:`heatmap_relpath`, so the same safe naming applies ('..' neutralised, never outside
    OUT, long names shortened with a hash).
    """
    return thumbnail_relpaths_of_heatmap(heatmap_relpath(image_relpath))


def thumbnail_relpaths_of_heatmap(heat: str) -> tuple[str, str]:
    """The thumbnails that belong to the heatmap ``heat`` ('heatmaps/good/001.jpg.png')."""
    parts = heat.split("/")[1:]  # drop the 'heatmaps' folder
    stem = parts[-1][: -len(".png")] if parts[-1].endswith((".png", ".jpg")) else parts[-1]  # PNG or JPEG heatmap
    stem = _fit_stem(stem)
    folder = "/".join([THUMB_DIR, *parts[:-1]])
    return f"{folder}/{stem}{_IMAGE_SUFFIX}", f"{folder}/{stem}{_HEAT_SUFFIX}"


def _as_rgb_image(array: np.ndarray, what: str) -> Image.Image:
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))
    raise ValueError(f"{what} must be (H, W) or (H, W, 3) uint8, got shape {arr.shape}")


def _save_thumbnail(image: Image.Image, path: Path, owned: bool = False) -> None:
    """Shrink (never enlarge) to THUMB_SIZE on the longest side and write a JPEG atomically.

    ``owned``: the caller's image may be shrunk in place (saves copying a full-size image)."""
    thumb = image.convert("RGB") if image.mode != "RGB" else image if owned else image.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    # No fsync: thumbnails can be regenerated, and a scan writes thousands. An empty file left by a power
    # cut is treated as missing by build_report.
    with atomic_path(path, fsync=False) as tmp:
        thumb.save(tmp, format="JPEG", quality=THUMB_QUALITY)


def write_thumbnails(
    out_dir: Path, image_relpath: str, image_rgb: np.ndarray, heatmap_rgb: np.ndarray
) -> tuple[str, str]:
    """Write JPEG thumbnails of the image and its heatmap overlay under OUT/thumbs/; return their relpaths."""
    image_rel, heat_rel = thumbnail_relpaths(image_relpath)
    image = _as_rgb_image(image_rgb, "image")
    heat = _as_rgb_image(heatmap_rgb, "heatmap")
    out_dir = Path(out_dir)
    _save_thumbnail(image, confined_path(out_dir, image_rel), owned=True)  # both made from the arrays above
    _save_thumbnail(heat, confined_path(out_dir, heat_rel), owned=True)
    return image_rel, heat_rel


# --------------------------------------------------------------------------------------------------------
# Reading the output folder
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    path: str
    status: str
    score: float | None
    label: str
    threshold: float | None
    max_pixel_score: float | None
    heatmap: str
    error: str
    note: str
    threshold_source: str = ""
    anomalous_area: float | None = None


def _float(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_rows(csv_path: Path) -> list[_Row]:
    """Rows of scores.csv, one per path (the last row of a path wins), in file order of that last row."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"no scores.csv in {csv_path.parent}: nothing to report")
    latest: dict[str, _Row] = {}
    # errors="replace": a row cut short by a crash must not stop the report.
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as fh:
        for raw in csv.DictReader(fh):
            # Missing columns (older files, a cut-short last row) read as ''; unknown columns are ignored.
            get = {key: value for key, value in raw.items() if isinstance(key, str) and isinstance(value, str)}.get
            path = get("path", "")
            if not path:
                continue
            row = _Row(
                path=path,
                status=get("status", "").strip(),
                score=_float(get("score")),
                label=get("label", "").strip(),
                threshold=_float(get("threshold")),
                max_pixel_score=_float(get("max_pixel_score")),
                heatmap=get("heatmap", ""),
                error=get("error", ""),
                note=get("note", ""),
                threshold_source=get("threshold_source", ""),
                anomalous_area=_float(get("anomalous_area")),
            )
            latest.pop(path, None)  # re-insert so the order follows the last occurrence
            latest[path] = row
    return list(latest.values())


def _read_run(run_path: Path) -> tuple[dict[str, object], str]:
    """run.json as a dict (empty when missing or unreadable) and a problem description ('' if fine)."""
    try:
        data = json.loads(run_path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return {}, "run.json is missing"
    except (OSError, ValueError, RecursionError) as exc:
        return {}, f"run.json could not be read: {str(exc)[:120] or 'nested too deeply'}"
    if not isinstance(data, dict):
        return {}, "run.json does not hold an object"
    return data, ""


class _Confined:
    """Maps relative paths to files inside OUT, refusing any that would lead outside it (symlinks too)."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir
        self._real_root = out_dir.resolve()
        self._dirs: dict[Path, bool] = {}  # a few folders hold thousands of files: resolve each folder once

    def _within(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self._real_root)
        except (OSError, ValueError, RuntimeError):
            return False

    def path(self, relpath: str) -> Path | None:
        """OUT/relpath if it is a plain relative path that stays inside OUT, else None."""
        if not relpath or "\x00" in relpath or relpath.startswith("/") or ("\\" in relpath and os.name == "nt"):
            return None
        parts = relpath.split("/")
        if any(part in ("", ".", "..") for part in parts) or (":" in parts[0] and os.name == "nt"):
            return None
        candidate = self.root.joinpath(*parts)
        parent = candidate.parent
        if parent not in self._dirs:
            self._dirs[parent] = self._within(parent)
        if not self._dirs[parent]:
            return None
        if candidate.is_symlink() and not self._within(candidate):
            return None
        return candidate


def _nonempty_file(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        info = path.stat()
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > 0


@dataclass(frozen=True)
class _Card:
    row: _Row
    heatmap: str  # relpath of the full-size heatmap, '' if absent
    image_thumb: str  # relpath, '' if absent
    heat_thumb: str  # relpath, '' if absent


def _prepare_card(out: _Confined, row: _Row) -> _Card:
    """Find (or regenerate from the heatmap PNG) the row's thumbnails; never reads outside OUT."""
    heatmap, heatmap_path = "", None
    for candidate in (row.heatmap, _safe_heatmap_relpath(row.path)):
        found = out.path(candidate)
        if _nonempty_file(found):
            heatmap, heatmap_path = candidate, found
            break
    try:
        # from the heatmap found: its name is the one on disk even where the CSV's path is not (bytes
        # that are not UTF-8 read back as '\\udcff' text)
        own = heatmap.startswith(HEATMAP_DIR + "/") and heatmap.endswith(".png")
        image_rel, heat_rel = thumbnail_relpaths_of_heatmap(heatmap) if own else thumbnail_relpaths(row.path)
    except ValueError:
        return _Card(row, heatmap, "", "")
    image_path, heat_path = out.path(image_rel), out.path(heat_rel)
    if heat_path is not None and heatmap_path is not None and not _nonempty_file(heat_path):
        try:
            with Image.open(heatmap_path) as img:
                _save_thumbnail(img, confined_path(out.root, heat_rel))
        except (OSError, ValueError, Image.DecompressionBombError):
            pass  # a broken heatmap: the card simply shows less
    return _Card(
        row,
        heatmap,
        image_rel if _nonempty_file(image_path) else "",
        heat_rel if _nonempty_file(heat_path) else "",
    )


def _safe_heatmap_relpath(path: str) -> str:
    try:
        return heatmap_relpath(path)
    except ValueError:
        return ""


# --------------------------------------------------------------------------------------------------------
# HTML helpers
# --------------------------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    """HTML-escape any text (quotes too, so it is safe in attributes); lone surrogates and control
    characters become visible placeholders, and '://' is broken up so no text can read as a URL."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = _CONTROL_RE.sub("\ufffd", text)
    return html.escape(text, quote=True).replace("://", ":&#47;/")


def _url(relpath: str) -> str:
    """A relative path as an attribute-ready URL: every segment percent-encoded (spaces, '#', '?', '%')."""
    quoted = "/".join(quote(seg, safe="", errors="surrogateescape") for seg in relpath.split("/"))
    return html.escape(quoted, quote=True)


def _fmt_score(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_seconds(value: object) -> str:
    seconds = _float(str(value))
    if seconds is None:
        return str(value)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {rest} s" if hours else f"{minutes} min {rest} s"


def _short_hash(value: object) -> str:
    text = str(value)
    return text[:12] if len(text) > 12 else text


# --------------------------------------------------------------------------------------------------------
# Page sections
# --------------------------------------------------------------------------------------------------------


def _threshold(run: dict[str, object], rows: list[_Row]) -> tuple[float | None, str]:
    """The run's threshold and where it came from."""
    sources = Counter(row.threshold_source for row in rows if row.threshold_source)
    row_source = sources.most_common(1)[0][0] if sources else ""
    value = run.get("threshold")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        source = run.get("threshold_source")
        return float(value), str(source) if source not in (None, "") else row_source or "--threshold"
    found = Counter(row.threshold for row in rows if row.threshold is not None)
    if found:
        return found.most_common(1)[0][0], row_source or "scores.csv"
    return None, ""


def _summary_html(
    run: dict[str, object],
    run_problem: str,
    cards: list[_Card],
    failures: list[_Row],
    threshold: float | None,
    source: str,
) -> str:
    anomalous = sum(1 for c in cards if c.row.label == "anomalous")
    normal = sum(1 for c in cards if c.row.label == "normal")
    images = len(cards) + len(failures)
    counts = (
        f'<section id="summary" data-images="{images}" data-scored="{len(cards)}" data-anomalous="{anomalous}" '
        f'data-normal="{normal}" data-errors="{len(failures)}">\n<h2>Summary</h2>\n<ul class="counts">'
        f'<li><b class="n-images">{images}</b> images</li>'
        f'<li><b class="n-anomalous">{anomalous}</b> anomalous</li>'
        f'<li><b class="n-normal">{normal}</b> normal</li>'
        f'<li><b class="n-errors">{len(failures)}</b> errors</li></ul>\n'
    )
    items: list[tuple[str, str]] = []

    def add(label: str, key: str, fmt: Callable[[object], str] = str) -> None:
        if run.get(key) not in (None, "", []):
            items.append((label, fmt(run[key])))

    if run.get("started") or run.get("finished"):
        started, finished = run.get("started") or "?", run.get("finished") or "unfinished"
        items.append(("Date", f"{started} → {finished}"))
    add("Duration", "seconds", fmt=_fmt_seconds)
    add("Input", "input")
    add("Class", "class_name")
    add("Model", "architecture")
    add("Weights", "weights")
    add("Weights SHA-256", "weights_sha256", fmt=_short_hash)
    add("Precision", "precision")
    add("Device", "device")
    if isinstance(run.get("scales"), list):
        items.append(("Scales", ", ".join(map(str, run["scales"]))))  # type: ignore[arg-type]
    if run.get("mode"):
        mode = str(run["mode"])
        if run.get("k_shot") not in (None, ""):
            mode += f" (memory k = {run['k_shot']})"
        items.append(("Mode", mode))
    add("References", "refs")
    add("Vocabulary", "vocabulary")
    add("Vocabulary SHA-256", "vocabulary_sha256", fmt=_short_hash)
    if threshold is not None:
        items.append(("Threshold", f"{threshold:.6g} (from {source})"))
    add("Pixel threshold", "pixel_threshold", fmt=lambda v: f"{v:.6g}" if isinstance(v, float) else str(v))
    if run.get("tile") not in (None, "", 0):
        overlap = run.get("tile_overlap")
        items.append(("Tiles", f"{run['tile']} px" + (f", overlap {overlap}" if overlap not in (None, "") else "")))
    add("Shard", "shard")
    if run.get("incremental") is True:
        items.append(("Incremental", "yes"))
    distinct = {c.row.threshold for c in cards if c.row.threshold is not None}
    if len(distinct) > 1:
        items.append(("Note", f"rows were scored with {len(distinct)} different thresholds"))
    if run.get("tool") or run.get("version"):
        items.append(("Tool", f"{run.get('tool') or ''} {run.get('version') or ''}".strip()))
    if run.get("interrupted") is True:
        items.append(("Interrupted", "yes: the scan was stopped before the end"))
    if run_problem:
        items.append(("Note", run_problem))
    table = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    return counts + f'<table class="run">{table}</table>\n</section>\n'


def _histogram_svg(cards: list[_Card], threshold: float | None) -> str:
    """Inline SVG: stacked normal/anomalous counts of image scores in 20 bins over 0..1, threshold line."""
    normal = [0] * _HIST_BINS
    anomalous = [0] * _HIST_BINS
    for card in cards:
        if card.row.score is None:
            continue
        # clamped first: a score far outside 0..1 (1e308 in an edited CSV) lands in an end bin, not in inf
        score = min(1.0, max(0.0, card.row.score))
        idx = min(_HIST_BINS - 1, int(math.floor(score * _HIST_BINS)))
        (anomalous if card.row.label == "anomalous" else normal)[idx] += 1
    width, height, left, bottom, top = 640, 180, 40, 24, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max([a + n for a, n in zip(anomalous, normal, strict=True)] + [1])
    bar_w = plot_w / _HIST_BINS
    parts = [
        f'<svg id="histogram" role="img" aria-label="Histogram of image scores" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<text class="tick" x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text class="tick" x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        parts.append(f'<text class="tick" x="{x:.1f}" y="{height - 6}" text-anchor="middle">{tick:g}</text>')
    for i in range(_HIST_BINS):
        lo, hi = i / _HIST_BINS, (i + 1) / _HIST_BINS
        x = left + i * bar_w
        total = normal[i] + anomalous[i]
        h_n = plot_h * normal[i] / peak
        h_a = plot_h * anomalous[i] / peak
        parts.append(
            f'<g class="bin" data-bin="{i}" data-count="{total}"><title>{lo:.2f}–{hi:.2f}: {normal[i]} normal, '
            f"{anomalous[i]} anomalous</title>"
            f'<rect class="bar normal" x="{x + 1:.1f}" y="{top + plot_h - h_n:.1f}" width="{bar_w - 2:.1f}" '
            f'height="{h_n:.1f}"/>'
            f'<rect class="bar anomalous" x="{x + 1:.1f}" y="{top + plot_h - h_n - h_a:.1f}" '
            f'width="{bar_w - 2:.1f}" height="{h_a:.1f}"/></g>'
        )
    if threshold is not None:
        x = left + min(1.0, max(0.0, threshold)) * plot_w
        parts.append(
            f'<line id="threshold-line" data-threshold="{threshold:.6f}" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" '
            f'y2="{top + plot_h}"><title>threshold {threshold:.4g}</title></line>'
            f'<text class="thr" x="{x + 4:.1f}" y="{top + 8}">threshold {threshold:.3g}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _thumb_html(card: _Card, thumb: str, alt: str) -> str:
    img = f'<img src="{_url(thumb)}" alt="{alt}" loading="lazy" decoding="async">'
    return f'<a href="{_url(card.heatmap)}">{img}</a>' if card.heatmap else img


def _card_html(card: _Card) -> str:
    row = card.row
    thumbs = []
    if card.image_thumb:
        thumbs.append(_thumb_html(card, card.image_thumb, "image"))
    if card.heat_thumb:
        thumbs.append(_thumb_html(card, card.heat_thumb, "heatmap"))
    if not thumbs:
        thumbs.append('<span class="nothumb">no preview</span>')
    label = row.label or "unlabelled"
    score_attr = "" if row.score is None else f"{row.score:.6f}"
    area = (
        ""
        if row.anomalous_area is None
        else f' <span class="area" title="anomalous area">area {100 * row.anomalous_area:.1f}%</span>'
    )
    return (
        f'<div class="card" data-label="{_esc(label)}" data-score="{score_attr}" data-path="{_esc(row.path)}">'
        f'<div class="thumbs">{"".join(thumbs)}</div>'
        f'<div class="meta"><span class="score">{_fmt_score(row.score)}</span> '
        f'<span class="label {_esc(label)}">{_esc(label)}</span> '
        f'<span class="maxpx" title="max pixel score">max px {_fmt_score(row.max_pixel_score)}</span>'
        f"{area}"
        f'<div class="path">{_esc(row.path)}</div></div></div>'
    )


def _failures_html(failures: list[_Row]) -> str:
    if not failures:
        return '<section id="failures" data-count="0"><h2>Failed files</h2><p>None.</p></section>'
    rows = "".join(
        f'<tr class="failure" data-path="{_esc(r.path)}"><td class="path">{_esc(r.path)}</td>'
        f'<td class="error">{_esc(r.error or r.note or "unknown error")}</td></tr>'
        for r in failures
    )
    return (
        f'<section id="failures" data-count="{len(failures)}"><h2>Failed files ({len(failures)})</h2>'
        f"<table><thead><tr><th>Path</th><th>Reason</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


_CSS = """
:root{--fg:#1b1b1f;--bg:#f6f6f8;--card:#fff;--muted:#666;--bad:#c0392b;--ok:#2e7d32;--line:#ddd}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1600px;padding:16px 24px;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;
color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:20px 0 8px}
[hidden]{display:none!important}
.counts{list-style:none;padding:0;margin:0 0 10px;display:flex;gap:22px;flex-wrap:wrap}.counts b{font-size:20px}
table{border-collapse:collapse}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
table.run th{color:var(--muted);font-weight:500;white-space:nowrap}
td{overflow-wrap:anywhere}
#failures table{width:100%;background:var(--card)}#failures td,#failures th{border-bottom:1px solid var(--line);
padding:4px 8px}
#histogram{max-width:100%;height:auto;background:var(--card);border:1px solid var(--line)}
#histogram .bar.normal{fill:#7aa6c2}#histogram .bar.anomalous{fill:var(--bad)}
#histogram .axis{stroke:#888}#histogram .tick,#histogram .thr{font-size:11px;fill:#555}
#threshold-line{stroke:#111;stroke-width:2;stroke-dasharray:5 3}
.controls{position:sticky;top:0;z-index:1;background:var(--bg);padding:8px 0;display:flex;gap:12px;
align-items:center;flex-wrap:wrap;border-bottom:1px solid var(--line)}
#search{width:320px;max-width:100%;padding:4px 6px}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px;margin-top:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:8px;
content-visibility:auto;contain-intrinsic-size:340px 240px}
.thumbs{display:flex;gap:6px}.thumbs a,.thumbs img{display:block}
.thumbs img{width:160px;height:160px;object-fit:contain;background:#eee}
.nothumb{display:flex;align-items:center;justify-content:center;width:160px;height:160px;background:#eee;
color:var(--muted)}
.meta{margin-top:6px}.score{font-weight:700;font-size:16px}.maxpx,.area{color:var(--muted)}
.label{padding:1px 6px;border-radius:3px;background:#eee}.label.anomalous{background:var(--bad);color:#fff}
.label.normal{background:#dcefdc;color:var(--ok)}
.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere;color:#333}
.empty{color:var(--muted)}
"""

# Reads '#label=anomalous&q=text' on load, filters the cards by label and path substring (case-insensitive),
# and writes the current filter back to the hash so a filtered view can be shared.
_JS = """
(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll("#gallery .card"));
  var paths = cards.map(function (c) { return (c.getAttribute("data-path") || "").toLowerCase(); });
  var labels = cards.map(function (c) { return c.getAttribute("data-label") || ""; });
  var select = document.getElementById("filter-label");
  var search = document.getElementById("search");
  var counter = document.getElementById("visible-count");
  var timer = null;
  function apply() {
    timer = null;
    var want = select.value, q = search.value.toLowerCase(), n = 0;
    for (var i = 0; i < cards.length; i++) {
      var show = (want === "all" || labels[i] === want) && (q === "" || paths[i].indexOf(q) !== -1);
      if (show) { n++; }
      if (cards[i].hidden === show) { cards[i].hidden = !show; }
    }
    counter.textContent = String(n);
    var state = new URLSearchParams();
    if (want !== "all") { state.set("label", want); }
    if (q !== "") { state.set("q", search.value); }
    var hash = state.toString();
    if (hash !== location.hash.replace(/^#/, "")) {
      try { history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search); }
      catch (e) { /* some browsers refuse on file:// */ }
    }
  }
  function schedule() {
    if (timer !== null) { clearTimeout(timer); }
    timer = setTimeout(apply, cards.length > 2000 ? 120 : 0);
  }
  function readHash() {
    var state = new URLSearchParams(location.hash.replace(/^#/, ""));
    var label = state.get("label");
    var ok = false;
    for (var i = 0; i < select.options.length; i++) { if (select.options[i].value === label) { ok = true; } }
    select.value = ok ? label : "all";
    search.value = state.get("q") || "";
  }
  select.addEventListener("change", apply);
  search.addEventListener("input", schedule);
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
  document.documentElement.setAttribute("data-ready", "1");
})();
"""

# Nothing may be fetched from anywhere but the report's own folder, whatever ends up in the page.
_CSP = (
    "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def _page(title: str, summary: str, histogram: str, cards: list[_Card], failures: str) -> str:
    anomalous = sum(1 for c in cards if c.row.label == "anomalous")
    normal = sum(1 for c in cards if c.row.label == "normal")
    gallery = "\n".join(_card_html(c) for c in cards) or '<p class="empty">No scored images.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="referrer" content="no-referrer">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
{summary}
<section id="distribution"><h2>Score distribution</h2>
{histogram}
<p class="legend"><span class="n-normal">{normal}</span> normal, <span class="n-anomalous">{anomalous}</span> anomalous
(fixed 0–1 axis, 20 bins; dashed line: threshold)</p>
</section>
<h2>Images, worst first</h2>
<div class="controls">
<label>Label <select id="filter-label"><option value="all">all</option>
<option value="anomalous">anomalous</option><option value="normal">normal</option></select></label>
<label>Path <input id="search" type="search" placeholder="filter by path" autocomplete="off"></label>
<span><span id="visible-count">{len(cards)}</span> of {len(cards)} shown</span>
</div>
<div id="gallery" data-count="{len(cards)}">
{gallery}
</div>
{failures}
<script>{_JS}</script>
</body>
</html>
"""


def _sort_key(card: _Card) -> tuple[int, float, str]:
    score = card.row.score
    return (score is None, -(score or 0.0), card.row.path)


def build_report(out_dir: Path, title: str | None = None) -> Path:
    """Write OUT/report.html from OUT/scores.csv and OUT/run.json (atomically) and return its path.

    Missing heatmap thumbnails are regenerated from OUT/heatmaps/; nothing outside OUT is read. When a path
    has several CSV rows (incremental runs append), the last one wins.
    """
    out_dir = Path(out_dir)
    for written in (REPORT_NAME, THUMB_DIR):
        refuse_link(out_dir / written)  # never write through a link planted in OUT
    rows = _read_rows(out_dir / "scores.csv")
    run, run_problem = _read_run(out_dir / "run.json")
    failures = [row for row in rows if row.status == "error"]
    confined = _Confined(out_dir)
    cards = sorted((_prepare_card(confined, row) for row in rows if row.status == "ok"), key=_sort_key)
    threshold, source = _threshold(run, rows)
    if title is None:
        name = run.get("class_name")
        title = f"winclip report: {name}" if name else "winclip report"
    page = _page(
        title,
        _summary_html(run, run_problem, cards, failures, threshold, source),
        _histogram_svg(cards, threshold),
        cards,
        _failures_html(failures),
    )
    target = out_dir / REPORT_NAME
    write_text_atomic(target, page)
    return target
