"""A Sphinx extension of the book: each page's inline scripts once.

sphinx-thebe 0.3.1 adds its configuration as an inline script (``const THEBE_JS_URL = ...``) when the documents are
read, and under Sphinx 7.4 the HTML builder lists it twice (once from the extension registry, once from the builder):
Sphinx drops a repeated script *file*, not a repeated inline body. A ``const`` declared twice is a SyntaxError on every page (the browser test, tests/test_browser.py,
found it). This removes exact repeats from a page's scripts before the page is written.
"""

from __future__ import annotations

from typing import Any


def unique_scripts(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """Keep the first of scripts with the same file, priority and attributes (an inline body is an attribute; its
    file is ``None`` from the registry and ``""`` from the builder, which Sphinx's equality tells apart)."""
    seen: set[tuple[str, int, tuple[tuple[str, str], ...]]] = set()
    kept = []
    for script in context.get("script_files") or []:
        key = (str(script.filename or ""), script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
