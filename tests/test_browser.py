"""The book in a real browser (headless Chromium through Playwright): the smoke report's every page, and the check
itself on a page made broken in each way it looks for. Skipped, with the reason, where there is no browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonylib.evaluation.results import read_results
from tests.browser import check_book, html_pages, unavailable
from tests.conftest import SMOKE_REPORT_TIMEOUT_S, BuiltReport


@pytest.fixture(scope="module", autouse=True)
def browser() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def test_the_check_sees_what_a_reader_would_see_broken(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text(
        '<html><body><a href="missing.html">gone</a> <a href="other.html#there">ok</a> <img src="nope.png">'
        '<span class="math">\\(x^2\\)</span><div class="output traceback">ValueError</div>'
        '<script>throw new Error("boom")</script></body></html>')
    (tmp_path / "other.html").write_text('<html><body><p id="there">x</p><a href="index.html#nowhere">back</a>'
                                         '</body></html>')
    findings = check_book(tmp_path)
    problems = "\n".join(findings.problems())
    assert set(findings.pages) == {"index.html", "other.html"}
    for expected in ("index.html: JavaScript error: boom", "index.html: image not loaded: nope.png",
                     "index.html: HTTP 404", "index.html: MathJax left untypeset: '\\\\(x^2\\\\)'",
                     "index.html: 1 error cell(s)", "broken internal link: index.html -> missing.html",
                     "broken internal link: other.html -> index.html#nowhere"):
        assert expected in problems, expected
    assert "other.html#there" not in problems and findings.results_rows is None


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_REPORT_TIMEOUT_S)
def test_every_page_of_the_book_in_a_real_browser(smoke_report: BuiltReport) -> None:
    """100 % of the pages visited with no broken link, image, script, formula or cell; the results page holds the
    results table as an HTML table with a row per encoder (a markdown table rendered as a paragraph has none)."""
    html = smoke_report.index.parent
    shots = smoke_report.run / "screenshots"
    findings = check_book(html, shots)
    assert set(findings.pages) == set(html_pages(html)) and len(findings.pages) >= 13, "every chapter and page"
    assert not findings.problems(), "\n".join(findings.problems())
    assert sum(page.formulas for page in findings.pages.values()) > 20, "the equations of chapters 02, 03 and 08"
    encoders = read_results(smoke_report.run / "evaluate")["encoder"].nunique()
    assert findings.results_rows == encoders == 3
    assert sorted(findings.screenshots) == [shots / "03_xcit_attention.png", shots / "09_results.png"]
    assert all(path.stat().st_size > 10_000 for path in findings.screenshots)
