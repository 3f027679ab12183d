"""The report in a real headless Chromium (Debian's `chromium` package), opened from file:// and offline.

Three plain command-line runs (--dump-dom twice, --screenshot) check what the page shows after its JS ran;
one run driven over the DevTools protocol (--remote-debugging-pipe: JSON messages on fds 3/4, no extra
Python packages) clicks the filters, loads every thumbnail and records every request the page makes.
Without Chromium these tests are skipped with a one-line reason, so the README's test command passes on
a machine without it; `.ci/run` sets WINCLIP_REQUIRE_BROWSER=1, which makes a missing Chromium a failure.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from queue import Empty, Queue
from typing import Any
from urllib.parse import unquote

import pytest
from PIL import Image

from report_folder import EXPECTED_SCORES, SCRIPT_NAME, THRESHOLD, URL_NAME, make_output_folder
from winclip_cli.io.outputs import CSV_COLUMNS, ResultRow
from winclip_cli.report.page import build_report

pytestmark = pytest.mark.browser

TIMEOUT_S = 30.0

# No sandbox: CI runs as root. Everything that would phone home is off, and DNS resolves nothing, so the
# browser itself cannot reach any network (any request the page attempts is still seen and reported).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--hide-scrollbars",
]


REQUIRE_BROWSER_ENV = "WINCLIP_REQUIRE_BROWSER"


def find_chromium() -> str:
    """The Chromium binary ($WINCLIP_TEST_CHROMIUM, else chromium on PATH, else /usr/bin/chromium).

    Missing: a skip, or a failure where $WINCLIP_REQUIRE_BROWSER=1 (CI, which installs it)."""
    candidate = os.environ.get("WINCLIP_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(candidate, os.X_OK):
        reason = (
            f"Chromium not found ({candidate}): install it (`apt-get install -y chromium` on Debian) "
            "or set WINCLIP_TEST_CHROMIUM"
        )
        if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_BROWSER_ENV}=1 requires the browser tests", pytrace=False)
        pytest.skip(reason)
    return candidate


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(make_output_folder(tmp_path_factory.mktemp("browser") / "out dir #1"))


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {cmd}\n{exc.stderr!r}", pytrace=False)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr.decode()[-3000:]}"
    return result


class Cards(HTMLParser):
    """Collects the cards of a dumped DOM: path, label and whether they are hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str | None]] = []
        self.ids: dict[str, dict[str, str | None]] = {}
        self.root: dict[str, str | None] = {}
        self._text_of: str | None = None
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.root = a
        if "card" in (a.get("class") or "").split():
            self.cards.append(a)
        if a.get("id"):
            self.ids[a["id"]] = a  # type: ignore[index]
            self._text_of = a["id"]

    def handle_data(self, data: str) -> None:
        if self._text_of is not None:
            self.text[self._text_of] = self.text.get(self._text_of, "") + data

    def handle_endtag(self, tag: str) -> None:
        self._text_of = None


def dump_dom(chromium: str, profile: Path, url: str) -> Cards:
    result = run_chromium(chromium, profile, "--dump-dom", url)
    parsed = Cards()
    parsed.feed(result.stdout.decode("utf-8"))
    return parsed


def test_gallery_renders_after_js(chromium: str, page: Path, tmp_path: Path) -> None:
    dom = dump_dom(chromium, tmp_path / "profile", page.as_uri())
    assert dom.root.get("data-ready") == "1", "the page's script did not run"
    assert len(dom.cards) == len(EXPECTED_SCORES)
    assert all("hidden" not in card for card in dom.cards)
    assert dom.text["visible-count"] == str(len(EXPECTED_SCORES))
    scores = [float(card["data-score"] or "nan") for card in dom.cards]
    assert scores == sorted(scores, reverse=True)


def test_hash_presets_the_label_filter(chromium: str, page: Path, tmp_path: Path) -> None:
    dom = dump_dom(chromium, tmp_path / "profile", page.as_uri() + "#label=anomalous")
    anomalous = {p for p, s in EXPECTED_SCORES.items() if s >= THRESHOLD}
    visible = {card["data-path"] for card in dom.cards if "hidden" not in card}
    assert visible == anomalous
    assert all(card["data-label"] == "normal" for card in dom.cards if "hidden" in card)
    assert dom.text["visible-count"] == str(len(anomalous))
    # Label and search combine; the search ignores case.
    dom = dump_dom(chromium, tmp_path / "profile", page.as_uri() + "#label=normal&q=GOOD%2F")
    assert {card["data-path"] for card in dom.cards if "hidden" not in card} == {"good/001.jpg", "good/002.jpg"}
    assert dom.text["visible-count"] == "2"


def test_screenshot(chromium: str, page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # text, histogram and thumbnails, not a blank page


# --------------------------------------------------------------------------------------------------------
# DevTools protocol over --remote-debugging-pipe
# --------------------------------------------------------------------------------------------------------


class DevTools:
    """Minimal CDP client: Chromium reads NUL-terminated JSON commands on fd 3 and writes replies on fd 4."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Move the child's ends out of the way of 3 and 4 before the child dup2()s them there.
        child_in, child_out = os.dup(to_browser_r), os.dup(from_browser_w)
        while min(child_in, child_out) <= 4:
            child_in, child_out = os.dup(child_in), os.dup(child_out)

        def wire() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(3, 4, child_in, child_out),
            preexec_fn=wire,
        )
        for fd in (to_browser_r, from_browser_w, child_in, child_out):
            os.close(fd)
        self._out = os.fdopen(to_browser_w, "wb", buffering=0)
        self._in = os.fdopen(from_browser_r, "rb", buffering=0)
        self._next_id = 0
        self._replies: dict[int, Queue[dict[str, Any]]] = {}
        self.events: Queue[dict[str, Any]] = Queue()
        self.all_events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def _read(self) -> None:
        buffer = b""
        while chunk := self._in.read(65536):
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        queue = self._replies.get(message["id"])
                    if queue is not None:
                        queue.put(message)
                else:
                    self.all_events.append(message)
                    self.events.put(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            queue: Queue[dict[str, Any]] = Queue()
            self._replies[ident] = queue
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        try:
            reply = queue.get(timeout=TIMEOUT_S)
        except Empty:
            pytest.fail(f"no DevTools reply to {method} within {TIMEOUT_S} s", pytrace=False)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def wait_event(self, method: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                pytest.fail(f"no {method} event in time", pytrace=False)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except BaseException:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def devtools(chromium: str, tmp_path: Path) -> Iterator[DevTools]:
    client = DevTools(chromium, tmp_path / "profile")
    try:
        yield client
    finally:
        client.close()


def evaluate(client: DevTools, session: str, expression: str) -> Any:
    """Run JS in the page (awaiting a promise result) and return its JSON value."""
    result = client.send(
        "Runtime.evaluate",
        {"expression": expression, "awaitPromise": True, "returnByValue": True, "timeout": TIMEOUT_S * 1000},
        session,
    )
    assert "exceptionDetails" not in result, result["exceptionDetails"]
    return result["result"].get("value")


def choose(client: DevTools, session: str, element_id: str, value: str, event: str) -> None:
    """Set a form control's value and fire the event a user's edit would fire."""
    evaluate(
        client,
        session,
        f"(() => {{ const el = document.getElementById({json.dumps(element_id)}); el.value = {json.dumps(value)};"
        f" el.dispatchEvent(new Event({json.dumps(event)}, {{bubbles: true}})); return true; }})()",
    )


VISIBLE_JS = """
new Promise(done => setTimeout(done, 300)).then(() => ({
  count: document.getElementById("visible-count").textContent,
  paths: Array.from(document.querySelectorAll("#gallery .card")).filter(c => !c.hidden && c.offsetParent !== null)
    .map(c => c.dataset.path),
  hash: decodeURIComponent(location.hash),
}))
"""


def test_filters_images_and_no_network(devtools: DevTools, page: Path) -> None:
    target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Network", "Page", "Runtime", "Log"):
        devtools.send(f"{domain}.enable", {}, session)
    devtools.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    devtools.send("Page.navigate", {"url": page.as_uri()}, session)
    devtools.wait_event("Page.loadEventFired", time.monotonic() + TIMEOUT_S)

    state = evaluate(devtools, session, VISIBLE_JS)
    ordered = sorted(EXPECTED_SCORES, key=lambda p: (-EXPECTED_SCORES[p], p))
    assert state["count"] == str(len(EXPECTED_SCORES)) and state["paths"] == ordered

    # The label filter, as a user changes it.
    choose(devtools, session, "filter-label", "anomalous", "change")
    state = evaluate(devtools, session, VISIBLE_JS)
    assert state["paths"] == [p for p in ordered if EXPECTED_SCORES[p] >= THRESHOLD]
    assert state["count"] == str(len(state["paths"])) and state["hash"] == "#label=anomalous"

    # Typing in the search box: substring of the path, case-insensitive, combined with the label.
    choose(devtools, session, "search", "SP ACE #1 ?X 100%", "input")
    state = evaluate(devtools, session, VISIBLE_JS)
    assert state["paths"] == [URL_NAME] and state["count"] == "1"
    assert state["hash"] == "#label=anomalous&q=SP+ACE+#1+?X+100%"  # shareable view
    choose(devtools, session, "search", "<SCRIPT>", "input")
    assert evaluate(devtools, session, VISIBLE_JS)["paths"] == [SCRIPT_NAME]
    choose(devtools, session, "filter-label", "normal", "change")
    assert evaluate(devtools, session, VISIBLE_JS)["count"] == "0"
    choose(devtools, session, "search", "", "input")
    choose(devtools, session, "filter-label", "normal", "change")
    assert evaluate(devtools, session, VISIBLE_JS)["paths"] == [p for p in ordered if EXPECTED_SCORES[p] < THRESHOLD]

    # Back to everything, then make every lazy thumbnail load: each relative URL (spaces, '#', '?', '%',
    # unicode, '<script>' folders, a '#' in the report's own folder) must resolve from file://.
    evaluate(devtools, session, 'location.hash = ""; new Promise(r => setTimeout(() => r(true), 300))')
    assert evaluate(devtools, session, VISIBLE_JS)["count"] == str(len(EXPECTED_SCORES))
    loaded = evaluate(
        devtools,
        session,
        """Promise.all(Array.from(document.querySelectorAll("#gallery img")).map(img => {
             img.loading = "eager";
             return img.decode().then(() => [img.getAttribute("src"), img.naturalWidth],
                                      () => [img.getAttribute("src"), 0]);
           }))""",
    )
    assert len(loaded) == 2 * len(EXPECTED_SCORES) - 1  # the old-run row has no image thumbnail
    assert [src for src, width in loaded if width == 0] == []
    # The heatmap links resolve too (fetch is barred by the page's policy; follow one link instead).
    href = evaluate(devtools, session, 'document.querySelector("#gallery a").href')
    assert href.startswith("file://") and Path(unquote(href[7:])).is_file()

    time.sleep(0.2)
    requests = [
        e["params"]["request"]["url"] for e in devtools.all_events if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requests and all(url.startswith("file://") for url in requests), [
        u for u in requests if not u.startswith("file://")
    ]
    failed = [e["params"] for e in devtools.all_events if e.get("method") == "Network.loadingFailed"]
    assert failed == []
    problems = [
        e["params"]
        for e in devtools.all_events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert problems == []


def test_5000_cards_load_and_filter_fast(devtools: DevTools, tmp_path: Path) -> None:
    out = tmp_path / "big"
    out.mkdir()
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for i in range(5000):
            score = (i * 7919 % 5000) / 5000
            label = "anomalous" if score >= THRESHOLD else "normal"
            row = ResultRow(path=f"lot/{i:05d}.jpg", status="ok", score=score, label=label)
            writer.writerow(row.as_csv_dict())
    page = build_report(out)
    target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    devtools.send("Page.enable", {}, session)
    started = time.monotonic()
    devtools.send("Page.navigate", {"url": page.as_uri()}, session)
    devtools.wait_event("Page.loadEventFired", time.monotonic() + TIMEOUT_S)
    assert time.monotonic() - started < 10.0
    took, count = evaluate(
        devtools,
        session,
        """(() => { const el = document.getElementById("filter-label"); el.value = "anomalous";
             const t = performance.now(); el.dispatchEvent(new Event("change"));
             return [performance.now() - t, document.getElementById("visible-count").textContent]; })()""",
    )
    assert count == "2500"
    assert took < 1000, f"filtering 5,000 cards took {took:.0f} ms"
