"""A static, self-contained HTML report of an output folder: run summary, score histogram, gallery, failures.

The page (OUT/report.html) uses inline CSS and JS only and references its images by relative paths, so it
works from file:// on another machine or a file share, offline. Nothing here computes scores or knows the CLI.

The page's skeleton, style and script are package data files beside this module (template.html,
style.css, script.js); this module renders the parts that depend on the run and fills them in, every
piece of text from the output folder escaped by ``_esc`` (or ``_url`` for links).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from string import Template
from urllib.parse import quote

from PIL import Image

from winclip_cli.io.layout import (
    HEATMAP_DIR,
    SCORES_NAME,
    OutputLayout,
    heatmap_relpath,
    thumbnail_relpaths,
    thumbnail_relpaths_of_heatmap,
)
from winclip_cli.io.outputs import confined_path, iter_results_csv, write_text_atomic
from winclip_cli.io.safe_fs import Confined, open_confined, read_confined_bytes
from winclip_cli.io.state import refuse_link
from winclip_cli.io.thumbnails import THUMB_SIZE, save_thumbnail
from winclip_cli.options import DEFAULT_MAX_PIXELS

__all__ = ["TEMPLATE_FILES", "build_report"]

# The page's package data files (listed in pyproject.toml's package-data, so a wheel ships them).
TEMPLATE_FILES = ("template.html", "style.css", "script.js")

_HIST_BINS = 20

# C0 controls (bar tab/newline) and DEL: invalid or invisible in HTML text, shown as U+FFFD instead.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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


REPORT_ROW_LIMIT = 200_000  # rows one report page shows (a card each): ~0.5 GB to build; a page of more is unusable


def _read_rows(csv_path: Path) -> list[_Row]:
    """Rows of scores.csv, one per path (the last row of a path wins), in file order of that last row."""
    if not os.path.lexists(csv_path):
        raise FileNotFoundError(f"no scores.csv in {csv_path.parent}: nothing to report")
    latest: dict[str, _Row] = {}
    # one row at a time, bounded (SCORES_CSV_BYTE_LIMIT, REPORT_ROW_LIMIT); never a link's target, never
    # blocking on a FIFO. errors="replace": a row cut short by a crash must not stop the report.
    for raw in iter_results_csv(csv_path, errors="replace", row_limit=REPORT_ROW_LIMIT):
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


RUN_JSON_LIMIT = 16 << 20  # a run.json is a few KB
HEATMAP_FORMATS = ("PNG", "JPEG")  # what --heatmaps writes


def _read_run(run_path: Path) -> tuple[dict[str, object], str]:
    """run.json as a dict (empty when missing or unreadable) and a problem description ('' if fine)."""
    try:
        # never through a link, never blocking on a FIFO, never a file of gigabytes
        text = read_confined_bytes(run_path, RUN_JSON_LIMIT).decode("utf-8", errors="replace")
        data = json.loads(text)
    except FileNotFoundError:
        return {}, "run.json is missing"
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return {}, f"run.json could not be read: {reason[:120] or 'nested too deeply'}"
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


HEATMAP_THUMB_PIXEL_LIMIT = DEFAULT_MAX_PIXELS  # a larger heatmap gets no thumbnail regenerated (~250 MB each)


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
            # opened without following any link, and only as the formats winclip writes heatmaps in: a file
            # of another format saved as a heatmap (EPS would run Ghostscript) is not decoded at all
            with (
                open_confined(Confined(out.root, heatmap)) as handle,
                Image.open(handle, formats=HEATMAP_FORMATS) as img,
            ):
                # the size from the header, before a pixel is decoded: a crafted 13000x13000 PNG took 1.4 GB
                if img.width * img.height <= HEATMAP_THUMB_PIXEL_LIMIT:
                    img.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # a JPEG decodes at a fraction of its size
                    save_thumbnail(img, confined_path(out.root, heat_rel), owned=True)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
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
        return found.most_common(1)[0][0], row_source or SCORES_NAME
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
    scales = run.get("scales")
    if isinstance(scales, list):
        items.append(("Scales", ", ".join(map(str, scales))))
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


_SCALE_STEPS = 64  # bands of the colour scale, each filled with the heatmaps' own colour for its value


def _colour_scale_svg(threshold: float | None, pixel_threshold: float | None) -> str:
    """Inline SVG: the heatmaps' fixed 0-1 colour scale (the same table they are coloured with, so the page
    needs no gradient or url()), with the image threshold and, when calibrated, the pixel threshold marked."""
    from winclip_cli.io.outputs import LUT

    width, height, left, right, bar_top, bar_h = 640, 64, 40, 10, 16, 16
    bar_w = width - left - right
    step = bar_w / _SCALE_STEPS
    parts = [
        f'<svg id="colour-scale" role="img" aria-label="Heatmap colour scale, fixed from 0 to 1" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
    ]
    for i in range(_SCALE_STEPS):
        red, green, blue = (int(c) for c in LUT[round(i / (_SCALE_STEPS - 1) * 255)])
        parts.append(
            f'<rect class="band" x="{left + i * step:.2f}" y="{bar_top}" width="{step + 0.3:.2f}" height="{bar_h}" '
            f'fill="#{red:02x}{green:02x}{blue:02x}"/>'
        )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * bar_w
        parts.append(f'<text class="tick" x="{x:.1f}" y="{bar_top + bar_h + 14}" text-anchor="middle">{tick:g}</text>')
    marks = [("image-threshold", "image threshold", threshold), ("pixel-threshold", "pixel threshold", pixel_threshold)]
    for ident, name, value in marks:
        if value is None:
            continue
        x = left + min(1.0, max(0.0, value)) * bar_w
        above = ident == "image-threshold"
        parts.append(
            f'<line id="{ident}-mark" class="mark" data-value="{value:.6f}" x1="{x:.1f}" '
            f'y1="{bar_top - (6 if above else 0)}" x2="{x:.1f}" y2="{bar_top + bar_h + (0 if above else 6)}">'
            f"<title>{name} {value:.4g}</title></line>"
            f'<text class="thr" x="{x + 4:.1f}" y="{bar_top - 4 if above else bar_top + bar_h + 26}">'
            f"{name} {value:.3g}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _pixel_threshold(run: dict[str, object]) -> float | None:
    value = run.get("pixel_threshold")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


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


@cache
def _read_template_file(name: str) -> str:
    return files("winclip_cli.report").joinpath(name).read_text(encoding="utf-8")


# template.html holds the Content-Security-Policy: nothing may be fetched from anywhere but the report's own
# folder, whatever ends up in the page. script.js reads '#label=anomalous&q=text' on load, filters the cards
# by label and path substring (case-insensitive), and writes the current filter back to the hash so a
# filtered view can be shared.
def _page(title: str, summary: str, histogram: str, cards: list[_Card], failures: str, colour_scale: str = "") -> str:
    anomalous = sum(1 for c in cards if c.row.label == "anomalous")
    normal = sum(1 for c in cards if c.row.label == "normal")
    gallery = "\n".join(_card_html(c) for c in cards) or '<p class="empty">No scored images.</p>'
    # One pass of substitution: the values (HTML already escaped where it came from the folder, the
    # style and the script) are inserted as they are, never scanned for placeholders themselves.
    return Template(_read_template_file("template.html")).substitute(
        title=_esc(title),
        style=_read_template_file("style.css"),
        script=_read_template_file("script.js"),
        summary=summary,
        histogram=histogram,
        colour_scale=colour_scale,
        normal=normal,
        anomalous=anomalous,
        count=len(cards),
        gallery=gallery,
        failures=failures,
    )


def _sort_key(card: _Card) -> tuple[int, float, str]:
    score = card.row.score
    return (score is None, -(score or 0.0), card.row.path)


def build_report(out_dir: Path, title: str | None = None) -> Path:
    """Write OUT/report.html from OUT/scores.csv and OUT/run.json (atomically) and return its path.

    Missing heatmap thumbnails are regenerated from OUT/heatmaps/; nothing outside OUT is read. When a path
    has several CSV rows (incremental runs append), the last one wins.
    """
    out_dir = Path(out_dir)
    layout = OutputLayout(out_dir)
    for written in (layout.report_html, layout.thumbs):
        refuse_link(written)  # never write through a link planted in OUT
    rows = _read_rows(layout.scores_csv)
    run, run_problem = _read_run(layout.run_json)
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
        _colour_scale_svg(threshold, _pixel_threshold(run)),
    )
    target = layout.report_html
    write_text_atomic(target, page)
    return target
