"""GET /ui: a self-contained page; in headless Chromium it lists the models and draws the report.
GET /docs: the bundled Swagger UI renders the OpenAPI schema FastAPI writes (3.1).

The Chromium tests skip where no ``chromium`` binary is installed
(Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
BINS = 40  # ui.js draws this many bars per variant


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.text = tag, attrs, ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class DomCollector(HTMLParser):
    """Every element of a page with its attributes and its own text (enough for these checks)."""

    VOID = {"meta", "link", "input", "br", "img", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1].text += data

    def by_id(self, ident: str) -> Element:
        return next(e for e in self.elements if e.attrs.get("id") == ident)

    def select(self, tag: str, *classes: str) -> list[Element]:
        return [e for e in self.elements if e.tag == tag and set(classes) <= e.classes]


def dump_dom(url: str, profile: Path) -> DomCollector:
    """The DOM after the page's scripts ran (virtual time lets fetches and JS finish)."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    dom = DomCollector()
    dom.feed(done.stdout)
    return dom


def test_page_and_assets_are_served_from_here(client: httpx.Client) -> None:
    assert "/ui" in client.get("/").json()["links"].values()
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    script, style = client.get("/ui/ui.js"), client.get("/ui/ui.css")
    assert script.status_code == style.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    # Nothing fetched from elsewhere: every src/href is a path on this server, and the only
    # absolute URL in the script is the SVG namespace name.
    assert set(re.findall(r'(?:src|href)="([^"]*)"', page.text)) == {
        "/ui/ui.css",
        "/ui/ui.js",
        "/",
        "/docs",
        "/metrics",
    }
    assert re.findall(r"https?://[^\"' ]+", script.text) == ["http://www.w3.org/2000/svg"]
    assert not re.findall(r"https?://|@import|url\(", style.text)


@needs_chromium
def test_page_lists_models_and_draws_the_report(fresh_server: Any, tmp_path: Path) -> None:
    iterations = 150
    with fresh_server(api_key=None) as live, live.client() as client:
        for _ in range(5):  # served requests: the report sets the saving beside their p50
            sample = {"instances": [[10.0] * 30]}
            assert client.post("/v1/models/breast_cancer_mlp:predict", json=sample).is_success
        query = f"model=breast_cancer_mlp&run=measure&iterations={iterations}&batch_size=2"
        dom = dump_dom(f"{live.url}/ui?{query}", tmp_path / "profile")
        report = client.get(
            "/v2/models/breast_cancer_mlp/fold-latency", params={"cached": "true"}
        ).json()

    assert dom.select("body")[0].attrs.get("data-ready") == "true"
    assert dom.by_id("error").text == ""
    rows = {e.attrs["data-model"] for e in dom.select("tr") if "data-model" in e.attrs}
    assert rows == {"breast_cancer_mlp", "digits_cnn", "linear", "two_io"}

    # The measurement the page asked for is the one now cached; the page shows its numbers.
    assert (report["iterations"], report["batch_size"]) == (iterations, 2)
    low, high = report["speedup"]["ci95"]
    expected = f"speedup {report['speedup']['ratio']:.3f}x (95% CI {low:.3f}-{high:.3f})"
    assert dom.by_id("speedup").text == expected
    bound = report["bound"]
    assert dom.by_id("bound").text == f"bound: {bound['max_speedup']:.3f}x ({bound['description']})"
    assert dom.by_id("int8_speedup").attrs.get("hidden") is not None  # not asked for
    # The saving in microseconds, that it is ONNX Runtime time only, and the served p50.
    assert dom.by_id("scale").text == report["scale"]
    assert dom.by_id("scope").text == report["scope"]
    saving = dom.by_id("saving").text
    assert saving.startswith("saving per call: ") and "; per sample: " in saving
    assert saving.endswith("ms (5 requests)") and "end-to-end request p50: " in saving
    assert "5 answered request(s) to this version took" in report["scale"]

    charts = [e for e in dom.select("svg") if "data-bins" in e.attrs]
    assert len(charts) == 1 and charts[0].attrs["data-bins"] == str(BINS)
    for variant in ("folded", "unfolded"):
        bars = dom.select("rect", "bar", variant)
        assert len(bars) == BINS
        # Every run is in exactly one bar.
        assert sum(int(bar.attrs["data-count"]) for bar in bars) == iterations
        assert len(dom.select("line", "p50", variant)) == 1
    assert len(dom.select("circle", "ratio")) == 1 and len(dom.select("rect", "ci")) == 1
    cells = Counter(e.text for e in dom.select("td", "num"))
    assert cells["0"] >= 1 and cells["2"] >= 1  # BN nodes: folded 0, unfolded 2


@needs_chromium
def test_page_shows_the_int8_variant(fresh_server: Any, tmp_path: Path) -> None:
    with fresh_server(api_key=None) as live, live.client() as client:
        query = "model=digits_cnn&run=measure&iterations=30&int8=true"
        dom = dump_dom(f"{live.url}/ui?{query}", tmp_path / "profile")
        report = client.get("/v2/models/digits_cnn/fold-latency", params={"cached": "true"}).json()
    assert dom.by_id("error").text == ""
    low, high = report["int8_speedup"]["ci95"]
    assert dom.by_id("int8_speedup").text.startswith(
        f"int8 speedup over folded FP32 {report['int8_speedup']['ratio']:.3f}x "
        f"(95% CI {low:.3f}-{high:.3f}): {report['int8_verdict']}"
    )
    rows = [e.attrs["data-variant"] for e in dom.select("tr") if "data-variant" in e.attrs]
    assert rows == ["folded", "unfolded", "int8"]


@needs_chromium
def test_page_shows_the_api_key_error(server: Any, tmp_path: Path) -> None:
    dom = dump_dom(f"{server.url}/ui?model=breast_cancer_mlp&run=measure", tmp_path / "profile")
    assert dom.by_id("error").text.startswith("401: this route needs the API key")
    assert dom.select("svg") == []
    assert len([e for e in dom.select("tr") if "data-model" in e.attrs]) == 4


@needs_chromium
def test_docs_page_lists_every_operation(server: Any, tmp_path: Path) -> None:
    """Swagger UI older than 5 cannot read OpenAPI 3.1 and shows only an error box."""
    dom = dump_dom(f"{server.url}/docs", tmp_path / "profile")
    with server.client() as client:
        schema = client.get("/openapi.json").json()
        # The bundle, its stylesheet and the favicon, all from this server.
        assets = re.findall(r'(?:src|href)="([^"]*)"', client.get("/docs").text)
        served = {url: client.get(url).status_code for url in assets}

    assert len(served) == 3 and set(served.values()) == {200}
    assert all(url.startswith("/static/swagger-ui/") for url in served)
    assert schema["openapi"].startswith("3.1")
    assert [e.text for e in dom.elements if "Unable to render" in e.text] == []
    # One summary per operation, in document order: its method, then its path.
    methods = [e.text.lower() for e in dom.select("span", "opblock-summary-method")]
    paths = [e.attrs["data-path"] for e in dom.select("span", "opblock-summary-path")]
    expected = {(method, path) for path, item in schema["paths"].items() for method in item}
    assert len(methods) == len(paths) == len(expected)
    assert set(zip(methods, paths, strict=True)) == expected
    assert {("post", "/v2/models/{name}/infer"), ("get", "/v2/health/live")} <= expected
    assert ("get", "/v2/health/ready") in expected
