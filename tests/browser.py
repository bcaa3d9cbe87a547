"""The built book in a real browser: headless Chromium driven by Playwright, every page visited over HTTP.

What a reader would meet and a file check misses: a script that throws, an image the browser cannot load, a
formula MathJax left as TeX, a link to a page or anchor that is not there, an error cell, and the results page's
table rendered as a paragraph of pipes. :func:`check_book` visits every HTML page of a build and returns what it
found; ``tests/test_browser.py`` runs it on the smoke report, and

    python -m tests.browser _build/html --run runs/demo

on the book ``make report`` built (screenshots of the results and attention pages go to ``RUN/screenshots``).

The browser is the system's Chromium (Debian: ``apt-get install chromium``; ``BONY_CHROMIUM`` names another),
started with the flags a closed network needs: without ``--disable-background-networking`` and its kin it keeps
trying to reach Google's services, and its refused connections show up as errors.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--metrics-recording-only"]
SCREENSHOTS = ("09_results", "03_xcit_attention")
"""Pages whose full-page screenshot is saved (the results table and the attention maps)."""
RESULTS_PAGE = "book/executed/09_results.html"
SKIPPED = ("_static", "_sources", "_images")
"""Build folders that hold assets, not pages."""
RESOURCE_ERROR = "Failed to load resource"
"""The console's line for a failed load: the request and response handlers report those with their URL, and the
browser's own request for /favicon.ico, which no page makes, only ever shows up here."""

_IMAGES = """async () => {
  const images = Array.from(document.images);
  images.forEach(image => { image.loading = 'eager'; });
  await Promise.race([
    Promise.all(images.map(image => image.complete ? null
      : new Promise(done => { image.addEventListener('load', done); image.addEventListener('error', done); }))),
    new Promise(done => setTimeout(done, 10000)),
  ]);
  return images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.getAttribute('src'));
}"""
_MATH = """async () => {
  const math = Array.from(document.querySelectorAll('.math'));
  if (!math.length) return {formulas: 0, untypeset: [], errors: 0};
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const untypeset = math.filter(node => !node.querySelector('mjx-container')).map(node => node.textContent.slice(0, 60));
  return {formulas: math.length, untypeset: untypeset, errors: document.querySelectorAll('mjx-merror').length};
}"""
_LINKS = "() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
_IDS = "() => Array.from(document.querySelectorAll('[id]')).map(node => node.id)"
_ERROR_CELLS = ("div.output.traceback, div.output.error, .cell_output .traceback, #papermill-error-cell, "
                "span#papermill-error-cell")


def chromium() -> str | None:
    """The Chromium to drive: ``BONY_CHROMIUM``, else the system's (Debian's ``chromium``), else None."""
    named = os.environ.get("BONY_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable() -> str | None:
    """Why no browser check can run here (None: it can): Playwright or Chromium missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (it is in requirements.lock: make env)"
    if chromium() is None:
        return ("no Chromium on this machine: `make browser` installs Debian's as root (apt-get install chromium); "
                "elsewhere install one and set BONY_CHROMIUM to its path")
    return None


@dataclass
class PageFindings:
    """What one page showed in the browser."""

    path: str
    errors: list[str] = field(default_factory=list)
    """JavaScript exceptions, console errors, failed requests and responses of 400 and above."""
    broken_images: list[str] = field(default_factory=list)
    formulas: int = 0
    untypeset: list[str] = field(default_factory=list)
    error_cells: int = 0
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


@dataclass
class BookFindings:
    """Every page of a build, and what is wrong with it."""

    pages: dict[str, PageFindings]
    broken_links: list[str]
    results_rows: int | None
    """Body rows of the results page's table (``table#results-table``); None when the page has no such table."""
    screenshots: list[Path]

    def problems(self) -> list[str]:
        """One line per thing a reader would see broken."""
        lines = []
        for page in self.pages.values():
            lines += [f"{page.path}: {error}" for error in page.errors]
            lines += [f"{page.path}: image not loaded: {src}" for src in page.broken_images]
            lines += [f"{page.path}: MathJax left untypeset: {text!r}" for text in page.untypeset]
            lines += [f"{page.path}: {page.error_cells} error cell(s)"] if page.error_cells else []
        return lines + [f"broken internal link: {link}" for link in self.broken_links]


def html_pages(html: Path) -> list[str]:
    """Every page of a build, as a path relative to its root (asset folders left out)."""
    return sorted(str(p.relative_to(html)) for p in html.rglob("*.html") if p.relative_to(html).parts[0] not in SKIPPED)


@contextmanager
def served(html: Path) -> Iterator[str]:
    """``html`` served over HTTP on a free port of 127.0.0.1 while the block runs; yields the root URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _target(root: str, link: str) -> tuple[str, str] | None:
    """``(path relative to the build, fragment)`` of a link into the build; None for one that leaves it."""
    url, fragment = urldefrag(link)
    if not url.startswith(root):
        return None
    path = unquote(urlparse(url).path)[len(urlparse(root).path):]
    return (path + "index.html" if not path or path.endswith("/") else path, fragment)


def check_book(html: Path, screenshots: Path | None = None, timeout_s: float = 60) -> BookFindings:
    """Visit every page of the build ``html`` in headless Chromium and record what is broken; save full-page
    screenshots of :data:`SCREENSHOTS` into ``screenshots``."""
    from playwright.sync_api import sync_playwright

    html = Path(html)
    pages: dict[str, PageFindings] = {}
    saved = []
    rows = None
    with served(html) as root, sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(timeout_s * 1000)
            for path in html_pages(html):
                found = pages[path] = PageFindings(path)
                page = context.new_page()
                page.on("pageerror", lambda exc, found=found: found.errors.append(f"JavaScript error: {exc}"))
                page.on("console", lambda msg, found=found: found.errors.append(f"console error: {msg.text}")
                        if msg.type == "error" and not msg.text.startswith(RESOURCE_ERROR) else None)
                page.on("requestfailed", lambda req, found=found: found.errors.append(
                    f"request failed: {req.url} ({req.failure})"))
                page.on("response", lambda res, found=found: found.errors.append(
                    f"HTTP {res.status}: {res.url}") if res.status >= 400 else None)
                page.goto(root + path, wait_until="load")
                page.wait_for_load_state("networkidle")  # the root index.html forwards to the first page
                found.broken_images = page.evaluate(_IMAGES)
                math = page.evaluate(_MATH)
                found.formulas, found.untypeset = math["formulas"], math["untypeset"]
                found.untypeset += ["MathJax error"] * math["errors"]
                found.error_cells = page.locator(_ERROR_CELLS).count()
                found.links = page.evaluate(_LINKS)
                found.ids = set(page.evaluate(_IDS))
                if path == RESULTS_PAGE:
                    table = page.locator("table#results-table")
                    rows = table.locator("tbody > tr").count() if table.count() == 1 else None
                stem = Path(path).stem
                if screenshots is not None and stem in SCREENSHOTS:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshots / f"{stem}.png"), full_page=True)
                    saved.append(screenshots / f"{stem}.png")
                page.close()
        finally:
            browser.close()
    broken = []
    for found in pages.values():
        for link in found.links:
            target = _target(root, link)
            if target is None:
                continue
            path, fragment = target
            if not (html / path).is_file():
                broken.append(f"{found.path} -> {path}")
            elif fragment and path in pages and fragment not in pages[path].ids:
                broken.append(f"{found.path} -> {path}#{fragment}")
    return BookFindings(pages, sorted(set(broken)), rows, saved)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.browser HTML [--run RUN]``: check a built book, print what is broken, exit 1 if anything."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the build's HTML folder (_build/html)")
    parser.add_argument("--run", type=Path, help="run folder: screenshots go to RUN/screenshots")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"no browser check: {reason}", file=sys.stderr)
        return 2
    findings = check_book(args.html, args.run / "screenshots" if args.run else None)
    for line in findings.problems():
        print(line)
    print(f"{len(findings.pages)} pages visited, {len(findings.problems())} problems; results table rows: "
          f"{findings.results_rows}; screenshots: {', '.join(map(str, findings.screenshots)) or 'none'}")
    return 1 if findings.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
