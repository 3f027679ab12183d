"""Tests for winclip_cli.report.page: thumbnails and the static HTML report (no browser here)."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from report_folder import (
    AMP_NAME,
    EXPECTED_ERRORS,
    EXPECTED_SCORES,
    OLD_RUN_NAME,
    SCRIPT_NAME,
    THRESHOLD,
    UNICODE_NAME,
    URL_NAME,
    default_run,
    label_for,
    make_output_folder,
    ok_row,
    random_image,
)
from winclip_cli.io.layout import THUMB_DIR, heatmap_relpath, thumbnail_relpaths
from winclip_cli.io.outputs import CSV_COLUMNS, CsvResultWriter, ResultRow, write_png_atomic
from winclip_cli.io.thumbnails import THUMB_SIZE, write_thumbnails
from winclip_cli.report.page import build_report

# --------------------------------------------------------------------------------------------------------
# A small HTML model built with the standard library parser
# --------------------------------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: list[str] = field(default_factory=list)
    children: list[Element] = field(default_factory=list)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def iter(self) -> list[Element]:
        found = [self]
        for child in self.children:
            found.extend(child.iter())
        return found

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.iter()
            if (tag is None or e.tag == tag) and (cls is None or cls in e.attrs.get("class", "").split())
        ]

    def by_id(self, ident: str) -> Element:
        found = [e for e in self.iter() if e.attrs.get("id") == ident]
        assert len(found) == 1, f"expected exactly one #{ident}, found {len(found)}"
        return found[0]


class StrictTree(HTMLParser):
    """Builds an Element tree and fails on unbalanced or mis-nested tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {})
        self.stack = [self.root]
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = [name for name, _ in attrs]
        assert len(names) == len(set(names)), f"duplicate attribute in <{tag}>: {names}"
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        assert tag not in VOID, f"end tag for void element </{tag}>"
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(page: str) -> Element:
    parser = StrictTree()
    parser.feed(page)
    parser.close()
    assert parser.doctype.lower() == "doctype html"
    assert [e.tag for e in parser.stack] == ["#root"], "unclosed elements at end of document"
    return parser.root


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, str, Element]:
    out = make_output_folder(tmp_path / "out")
    page_path = build_report(out)
    page = page_path.read_text(encoding="utf-8")
    return out, page, parse(page)


def _csv_truth(out: Path) -> dict[str, dict[str, str]]:
    """Last row per path, read independently of the report code."""
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


# --------------------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------------------


def test_thumbnail_relpaths_mirror_heatmap_names() -> None:
    assert thumbnail_relpaths("good/001.jpg") == ("thumbs/good/001.jpg.img.jpg", "thumbs/good/001.jpg.heat.jpg")
    assert thumbnail_relpaths("a.jpg") != thumbnail_relpaths("a.png")
    # No image name gives a thumbnail name that another image's thumbnail already has.
    names = ["x", "x.heat", "x.img", "x.jpg", "x.jpg.img", "x.jpg.heat", "x.jpg.jpg"]
    produced = [rel for name in names for rel in thumbnail_relpaths(name)]
    assert len(produced) == len(set(produced))
    for hostile in ("../../etc/passwd", "/abs/x.jpg", "a/./../b.jpg", "..", "x/../../y.jpg"):
        for rel in thumbnail_relpaths(hostile):
            parts = rel.split("/")
            assert parts[0] == THUMB_DIR and ".." not in parts and "" not in parts and "." not in parts


def test_thumbnail_relpaths_fit_long_names() -> None:
    long_a = "é" * 200 + "a.jpg"  # 405 bytes
    long_b = "é" * 200 + "b.jpg"
    a_img, a_heat = thumbnail_relpaths(long_a)
    b_img, _ = thumbnail_relpaths(long_b)
    for rel in (a_img, a_heat, b_img):
        assert len(rel.rsplit("/", 1)[-1].encode()) <= 255
    assert a_img != b_img
    assert a_img.removesuffix(".img.jpg") == a_heat.removesuffix(".heat.jpg")  # one stem for both
    # Just under the heatmap limit: the heatmap name fits but the longer '.heat.jpg' suffix must not overflow.
    edge = "x" * 250
    assert len(heatmap_relpath(edge).rsplit("/", 1)[-1].encode()) <= 255
    assert all(len(r.rsplit("/", 1)[-1].encode()) <= 255 for r in thumbnail_relpaths(edge))


def test_write_thumbnails_shrinks_keeps_aspect_never_upscales(tmp_path: Path) -> None:
    big = random_image(300, 600, 1)
    img_rel, heat_rel = write_thumbnails(tmp_path, "sub/big.jpg", big, big)
    assert (img_rel, heat_rel) == thumbnail_relpaths("sub/big.jpg")
    for rel in (img_rel, heat_rel):
        with Image.open(tmp_path / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (THUMB_SIZE, THUMB_SIZE // 2)
    tall = random_image(1000, 10, 2)
    img_rel, _ = write_thumbnails(tmp_path, "tall.png", tall, tall)
    with Image.open(tmp_path / img_rel) as im:
        assert max(im.size) == THUMB_SIZE and im.size[0] in (2, 3)
    small = random_image(30, 40, 3)
    img_rel, _ = write_thumbnails(tmp_path, "small.png", small, small)
    with Image.open(tmp_path / img_rel) as im:
        assert im.size == (40, 30)
    # The colours survive (JPEG at quality ~85 is close).
    flat = np.full((64, 64, 3), (200, 30, 90), dtype=np.uint8)
    img_rel, _ = write_thumbnails(tmp_path, "flat.png", flat, flat)
    with Image.open(tmp_path / img_rel) as im:
        assert np.abs(np.asarray(im, dtype=int) - (200, 30, 90)).max() <= 6
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_write_thumbnails_accepts_grey_and_rgba_rejects_other(tmp_path: Path) -> None:
    grey = np.zeros((20, 30), dtype=np.uint8)
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    img_rel, heat_rel = write_thumbnails(tmp_path, "g.png", grey, rgba)
    assert (tmp_path / img_rel).stat().st_size > 0 and (tmp_path / heat_rel).stat().st_size > 0
    with pytest.raises(ValueError, match="uint8"):
        write_thumbnails(tmp_path, "f.png", np.zeros((4, 4, 3), dtype=np.float32), grey)
    with pytest.raises(ValueError, match="shape"):
        write_thumbnails(tmp_path, "f.png", np.zeros((4, 4, 2), dtype=np.uint8), grey)


# --------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------


def test_report_is_written_atomically_and_parses(tmp_path: Path) -> None:
    out = make_output_folder(tmp_path / "out")
    path = build_report(out)
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    tree = parse(page)
    assert tree.find_all("html")[0].attrs.get("lang") == "en"
    assert tree.find_all("meta")[0].attrs.get("charset") == "utf-8"
    for ident in ("summary", "gallery", "failures", "filter-label", "search", "visible-count", "histogram"):
        tree.by_id(ident)
    assert tree.by_id("filter-label").tag == "select"
    assert [o.attrs["value"] for o in tree.by_id("filter-label").find_all("option")] == ["all", "anomalous", "normal"]
    assert tree.by_id("search").tag == "input"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # Rebuilding replaces the page.
    (out / "run.json").write_text(json.dumps({"class_name": "capsule"}), encoding="utf-8")
    assert "winclip report: capsule" in build_report(out).read_text(encoding="utf-8")
    assert "My title &amp; more" in build_report(out, title="My title & more").read_text(encoding="utf-8")


def test_gallery_one_card_per_ok_row_worst_first(report: tuple[Path, str, Element]) -> None:
    out, _, tree = report
    truth = _csv_truth(out)
    ok = {p: r for p, r in truth.items() if r["status"] == "ok"}
    assert set(ok) == set(EXPECTED_SCORES)
    cards = tree.by_id("gallery").find_all("div", "card")
    assert len(cards) == len(ok)
    assert [c.attrs["data-path"] for c in cards] == sorted(ok, key=lambda p: (-float(ok[p]["score"]), p))
    scores = [float(c.attrs["data-score"]) for c in cards]
    assert scores == sorted(scores, reverse=True)
    for card in cards:
        row = ok[card.attrs["data-path"]]
        assert card.attrs["data-score"] == row["score"]
        assert card.attrs["data-label"] == row["label"]
        text = card.all_text()
        assert f"{float(row['score']):.4f}" in text
        assert f"{float(row['max_pixel_score']):.4f}" in text
        assert row["label"] in text and row["path"] in text
    assert tree.by_id("visible-count").all_text().strip() == str(len(ok))


def test_card_thumbnails_side_by_side_link_to_heatmap(report: tuple[Path, str, Element]) -> None:
    out, _, tree = report
    for card in tree.by_id("gallery").find_all("div", "card"):
        path = card.attrs["data-path"]
        links = card.find_all("a")
        imgs = card.find_all("img")
        expected_img, expected_heat = thumbnail_relpaths(path)
        if path == OLD_RUN_NAME:
            assert [unquote(i.attrs["src"]) for i in imgs] == [expected_heat]  # image thumb omitted
        else:
            assert [unquote(i.attrs["src"]) for i in imgs] == [expected_img, expected_heat]
        assert len(links) == len(imgs)
        for link, img in zip(links, imgs, strict=True):
            assert img in link.children
            assert unquote(link.attrs["href"]) == heatmap_relpath(path)
            assert (out / unquote(link.attrs["href"])).is_file()
            assert img.attrs["loading"] == "lazy"
            assert (out / unquote(img.attrs["src"])).is_file()


def test_summary_counts_match_csv(report: tuple[Path, str, Element]) -> None:
    out, _, tree = report
    truth = _csv_truth(out).values()
    summary = tree.by_id("summary")
    expected = {
        "data-images": len(truth),
        "data-scored": sum(r["status"] == "ok" for r in truth),
        "data-anomalous": sum(r["status"] == "ok" and r["label"] == "anomalous" for r in truth),
        "data-normal": sum(r["status"] == "ok" and r["label"] == "normal" for r in truth),
        "data-errors": sum(r["status"] == "error" for r in truth),
    }
    assert {k: int(summary.attrs[k]) for k in expected} == expected
    assert expected["data-images"] == len(EXPECTED_SCORES) + len(EXPECTED_ERRORS)
    for key, cls in (("data-anomalous", "n-anomalous"), ("data-normal", "n-normal"), ("data-errors", "n-errors")):
        assert summary.find_all(cls=cls)[0].all_text() == str(expected[key])
    text = re.sub(r"\s+", " ", summary.all_text())
    for needle in (
        "2024-05-01T10:00:00+00:00",
        "2 min 5 s",
        "bottle",
        "ViT-B-16-plus-240",
        "laion400m_e32",
        "fp32",
        "cpu",
        "few-shot (memory k = 4)",
        "builtin",
        "0.5 (from --threshold)",
        "/data/bottles",
        "Pixel threshold0.42",
        "512 px, overlap 64",
    ):
        assert needle in text, needle


def test_histogram_bins_and_threshold_line(report: tuple[Path, str, Element]) -> None:
    _, _, tree = report
    svg = tree.by_id("histogram")
    assert svg.tag == "svg" and "xmlns" not in svg.attrs  # inline SVG needs no namespace URL
    bins = svg.find_all("g", "bin")
    assert [int(b.attrs["data-bin"]) for b in bins] == list(range(20))
    counts = [int(b.attrs["data-count"]) for b in bins]
    assert sum(counts) == len(EXPECTED_SCORES)
    expected = [0] * 20
    for score in EXPECTED_SCORES.values():
        expected[min(19, int(score * 20))] += 1
    assert counts == expected  # 0.0 in the first bin, 1.0 in the last
    line = tree.by_id("threshold-line")
    assert line.tag == "line" and float(line.attrs["data-threshold"]) == THRESHOLD
    # The line sits where 0.5 is on the fixed 0..1 axis: halfway between the first and last bar.
    first = float(bins[0].find_all("rect")[0].attrs["x"]) - 1
    last = float(bins[-1].find_all("rect")[0].attrs["x"]) + float(bins[-1].find_all("rect")[0].attrs["width"]) + 1
    assert float(line.attrs["x1"]) == pytest.approx((first + last) / 2, abs=0.2)
    legend = tree.by_id("distribution")
    n_anom = sum(s >= THRESHOLD for s in EXPECTED_SCORES.values())
    assert legend.find_all(cls="n-anomalous")[0].all_text() == str(n_anom)
    assert legend.find_all(cls="n-normal")[0].all_text() == str(len(EXPECTED_SCORES) - n_anom)


def test_failures_listed_with_reasons(report: tuple[Path, str, Element]) -> None:
    _, _, tree = report
    failures = tree.by_id("failures")
    rows = failures.find_all("tr", "failure")
    assert {r.attrs["data-path"]: r.find_all(cls="error")[0].all_text() for r in rows} == EXPECTED_ERRORS
    assert int(failures.attrs["data-count"]) == len(EXPECTED_ERRORS)
    # A failed file gets no card, and a fixed file is no failure.
    gallery_paths = {c.attrs["data-path"] for c in tree.by_id("gallery").find_all("div", "card")}
    assert not gallery_paths & set(EXPECTED_ERRORS)


def test_duplicate_rows_last_wins(report: tuple[Path, str, Element]) -> None:
    _, _, tree = report
    cards = {c.attrs["data-path"]: c for c in tree.by_id("gallery").find_all("div", "card")}
    assert cards["dup/twice.jpg"].attrs["data-score"] == "0.200000"
    assert cards["dup/twice.jpg"].attrs["data-label"] == "normal"
    assert "dup/fixed.jpg" in cards
    assert "dup/broke-later.jpg" not in cards
    failed = [r.attrs["data-path"] for r in tree.by_id("failures").find_all("tr", "failure")]
    assert failed.count("dup/broke-later.jpg") == 1 and "dup/fixed.jpg" not in failed


def test_hostile_names_are_escaped(report: tuple[Path, str, Element]) -> None:
    _, page, tree = report
    assert "<script>alert" not in page
    assert "<img src=x" not in page
    assert "<b>file</b>" not in page
    assert page.count("<script") == 1  # the page's own inline script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "a&amp;b &quot;c&quot;.png" in page
    cards = {c.attrs["data-path"]: c for c in tree.by_id("gallery").find_all("div", "card")}
    # The parser un-escapes attributes and text: the exact names come back, as text, not markup.
    for name in (SCRIPT_NAME, AMP_NAME, URL_NAME, UNICODE_NAME):
        assert name in cards
        assert cards[name].find_all(cls="path")[0].all_text() == name
    assert not [e for e in tree.iter() if e.tag == "script" and "alert" in e.all_text()]
    assert not [e for e in tree.iter() if any(k.startswith("on") for k in e.attrs)]
    assert tree.by_id("failures").find_all("tr", "failure")[1].find_all(cls="error")[0].all_text() == (
        "truncated <b>file</b> & more"
    )


def test_paths_are_url_quoted(report: tuple[Path, str, Element]) -> None:
    out, _, tree = report
    cards = {c.attrs["data-path"]: c for c in tree.by_id("gallery").find_all("div", "card")}
    srcs = [i.attrs["src"] for i in cards[URL_NAME].find_all("img")]
    assert srcs == [
        "thumbs/dir%20with%20space/sp%20ace%20%231%20%3Fx%20100%25.jpg.img.jpg",
        "thumbs/dir%20with%20space/sp%20ace%20%231%20%3Fx%20100%25.jpg.heat.jpg",
    ]
    assert cards[URL_NAME].find_all("a")[0].attrs["href"] == (
        "heatmaps/dir%20with%20space/sp%20ace%20%231%20%3Fx%20100%25.jpg.png"
    )
    unicode_src = cards[UNICODE_NAME].find_all("img")[0].attrs["src"]
    assert unicode_src.isascii() and (out / unquote(unicode_src)).is_file()
    script_src = cards[SCRIPT_NAME].find_all("img")[0].attrs["src"]
    assert script_src == "thumbs/%3Cscript%3Ealert%281%29%3C/script%3E.png.img.jpg"


def test_page_is_self_contained(tmp_path: Path) -> None:
    run = default_run()
    run["weights"] = "https://example.com/weights.pt"  # text that looks like a URL must not become one
    run["input"] = "HTTP://share/in"
    out = make_output_folder(tmp_path / "out", run)
    page = build_report(out).read_text(encoding="utf-8")
    tree = parse(page)
    assert "http://" not in page.lower() and "https://" not in page.lower() and "//" not in page.replace("://", "")
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    assert "base64" not in page
    assert "https://example.com/weights.pt" in tree.by_id("summary").all_text()  # shown as text
    scripts = tree.find_all("script")
    assert len(scripts) == 1 and "src" not in scripts[0].attrs
    assert not tree.find_all("iframe") and not tree.find_all("object") and not tree.find_all("base")
    for element in tree.iter():
        for attr in ("src", "href"):
            if attr in element.attrs:
                value = element.attrs[attr]
                assert not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", value) and not value.startswith("/"), value
                assert (out / unquote(value)).resolve().is_relative_to(out.resolve())
                assert (out / unquote(value)).is_file(), value
    imgs = tree.find_all("img")
    assert imgs and all(i.attrs.get("loading") == "lazy" for i in imgs)
    assert all(unquote(i.attrs["src"]).startswith(f"{THUMB_DIR}/") for i in imgs)
    csp = [m for m in tree.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0].attrs["content"]


def test_missing_thumbnails_are_regenerated_from_heatmaps(tmp_path: Path) -> None:
    out = make_output_folder(tmp_path / "out")
    # Drop every thumbnail, and leave one empty file as a power cut might.
    for path in sorted((out / THUMB_DIR).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    _, heat_rel = thumbnail_relpaths("bad/big.jpg")
    (out / heat_rel).parent.mkdir(parents=True)
    (out / heat_rel).write_bytes(b"")
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    for card in tree.by_id("gallery").find_all("div", "card"):
        path = card.attrs["data-path"]
        img_rel, heat_rel = thumbnail_relpaths(path)
        assert [unquote(i.attrs["src"]) for i in card.find_all("img")] == [heat_rel]
        assert not (out / img_rel).exists()  # nothing outside OUT to make it from
        with Image.open(out / heat_rel) as im:
            assert im.format == "JPEG"
            expected = (THUMB_SIZE, THUMB_SIZE // 2) if path == "bad/big.jpg" else (48, 32)
            assert im.size == expected
    # Thumbnails the scan wrote are kept as they are.
    before = {p: p.stat().st_mtime_ns for p in (out / THUMB_DIR).rglob("*.jpg")}
    build_report(out)
    assert before == {p: p.stat().st_mtime_ns for p in (out / THUMB_DIR).rglob("*.jpg")}


def test_never_reads_outside_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    secret = tmp_path / "secret.png"
    write_png_atomic(secret, random_image(20, 20, 9))
    with CsvResultWriter(out / "scores.csv") as writer:
        for path, heatmap in (
            ("a.jpg", "../secret.png"),
            ("b.jpg", str(secret)),
            ("c.jpg", "heatmaps/link.png"),
            ("d.jpg", "heatmaps/../../secret.png"),
            ("e.jpg", "heatmaps/elsewhere/secret.png"),
        ):
            writer.write(ResultRow(path=path, status="ok", score=0.7, label="anomalous", heatmap=heatmap))
    (out / "heatmaps").mkdir()
    os.symlink(secret, out / "heatmaps" / "link.png")
    os.symlink(tmp_path, out / "heatmaps" / "elsewhere", target_is_directory=True)
    page = build_report(out).read_text(encoding="utf-8")
    tree = parse(page)
    assert not list(out.rglob("*.jpg"))
    assert not tree.find_all("img") and not tree.find_all("a")
    assert len(tree.by_id("gallery").find_all("div", "card")) == 5
    assert "secret" not in "".join(e.attrs.get("href", "") + e.attrs.get("src", "") for e in tree.iter())


def test_run_json_missing_or_partial_does_not_crash(tmp_path: Path) -> None:
    out = make_output_folder(tmp_path / "out", run={"class_name": "pill"})
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    text = tree.by_id("summary").all_text()
    assert "0.5 (from scores.csv)" in text  # the threshold falls back to the CSV rows
    assert int(tree.by_id("summary").attrs["data-scored"]) == len(EXPECTED_SCORES)
    assert tree.by_id("threshold-line")
    for content in ("", "{not json", "[1, 2]", "null"):
        (out / "run.json").write_text(content, encoding="utf-8")
        tree = parse(build_report(out).read_text(encoding="utf-8"))
        assert "run.json" in tree.by_id("summary").all_text()
    (out / "run.json").unlink()
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    assert "run.json is missing" in tree.by_id("summary").all_text()
    run = default_run() | {"threshold_source": "calibrated on good/ (p99)", "threshold": 0.61, "seconds": None}
    run.pop("k_shot")
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    text = tree.by_id("summary").all_text()
    assert "0.61 (from calibrated on good/ (p99))" in text and "few-shot" in text and "memory k" not in text
    assert "Duration" not in text


def test_row_threshold_source_and_area(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CsvResultWriter(out / "scores.csv") as writer:
        for path, score in (("a.jpg", 0.9), ("b.jpg", 0.1)):
            row = ok_row(path, score, thresh=0.37)
            fields = row.as_csv_dict() | {"threshold_source": "calibrated (good/, p99)", "anomalous_area": "0.123400"}
            writer.write(ResultRow.from_csv_dict(fields))
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    assert "0.37 (from calibrated (good/, p99))" in tree.by_id("summary").all_text()
    (out / "run.json").write_text(json.dumps({"threshold": 0.37}), encoding="utf-8")
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    assert "0.37 (from calibrated (good/, p99))" in tree.by_id("summary").all_text()
    cards = tree.by_id("gallery").find_all("div", "card")
    assert [c.find_all(cls="area")[0].all_text() for c in cards] == ["area 12.3%", "area 12.3%"]


def test_unknown_and_missing_columns_are_tolerated(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "label", "status", "error", "future_column"])
        writer.writerow(["x.jpg", "0.800000", "anomalous", "ok", "", "whatever"])
        writer.writerow(["y.jpg", "0.100000", "normal", "ok", "", "1"])
        writer.writerow(["z.jpg", "", "", "error", "unreadable", ""])
        writer.writerow(["w.jpg", "0.4"])  # a row cut short
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    cards = tree.by_id("gallery").find_all("div", "card")
    assert [c.attrs["data-path"] for c in cards] == ["x.jpg", "y.jpg"]
    assert [r.attrs["data-path"] for r in tree.by_id("failures").find_all("tr", "failure")] == ["z.jpg"]
    assert not tree.find_all("line") or "threshold-line" not in [e.attrs.get("id") for e in tree.iter()]


def test_only_failures_and_missing_csv(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CsvResultWriter(out / "scores.csv") as writer:
        writer.write(ResultRow(path="bad.jpg", status="error", error="boom"))
    tree = parse(build_report(out).read_text(encoding="utf-8"))
    assert not tree.by_id("gallery").find_all("div", "card")
    assert tree.by_id("visible-count").all_text() == "0"
    assert int(tree.by_id("summary").attrs["data-errors"]) == 1
    with pytest.raises(FileNotFoundError, match="scores.csv"):
        build_report(tmp_path / "empty")


def test_large_report_stays_lean(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(0)
    # Plain csv (no per-row fsync as in CsvResultWriter) keeps this test fast.
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for i, score in enumerate(rng.random(5000)):
            row = ResultRow(path=f"lot/{i:05d}.jpg", status="ok", score=float(score), label=label_for(score))
            writer.writerow(row.as_csv_dict())
    page = build_report(out).read_text(encoding="utf-8")
    tree = parse(page)
    assert len(tree.by_id("gallery").find_all("div", "card")) == 5000
    assert len(page) / 5000 < 400  # bytes per card without thumbnails: a simple DOM
    assert sum(int(b.attrs["data-count"]) for b in tree.by_id("histogram").find_all("g", "bin")) == 5000


def test_the_heatmap_colour_scale_is_the_heatmaps_own_with_the_thresholds_marked(tmp_path: Path) -> None:
    from winclip_cli.io.outputs import LUT, colour_index

    run = default_run() | {"threshold": 0.25, "pixel_threshold": 0.75}
    tree = parse(build_report(make_output_folder(tmp_path / "out", run)).read_text(encoding="utf-8"))
    scale = tree.by_id("colour-scale")
    bands = scale.find_all("rect", "band")
    colours = [band.attrs["fill"] for band in bands]
    # the ends are the colours a heatmap gives a score of 0 and of 1: the scale is fixed, never stretched
    for value, colour in ((0.0, colours[0]), (1.0, colours[-1])):
        red, green, blue = LUT[int(colour_index(np.array([[value]], dtype=np.float32))[0, 0])]
        assert colour == f"#{red:02x}{green:02x}{blue:02x}"
    first_x = float(bands[0].attrs["x"])
    last_end = float(bands[-1].attrs["x"]) + float(bands[-1].attrs["width"]) - 0.3
    for ident, value in (("image-threshold-mark", 0.25), ("pixel-threshold-mark", 0.75)):
        mark = tree.by_id(ident)
        assert float(mark.attrs["data-value"]) == value
        assert float(mark.attrs["x1"]) == pytest.approx(first_x + value * (last_end - first_x), abs=0.1)
    # without a calibration there is no pixel threshold to mark
    uncalibrated = default_run() | {"pixel_threshold": None}
    plain = parse(build_report(make_output_folder(tmp_path / "plain", uncalibrated)).read_text(encoding="utf-8"))
    plain.by_id("image-threshold-mark")
    assert not [e for e in plain.iter() if e.attrs.get("id") == "pixel-threshold-mark"]
