"""The report in a real headless browser: Debian's chromium driven by playwright.

Every image must load (``complete`` and ``naturalWidth > 0``), with no console error, page error or
failed request; the page must name each map, and the failed subject's page its failed step and error.
The browser is the system's (``apt-get install chromium``; ``QMRI_CHROMIUM`` names another); playwright
never downloads one here. Without chromium or playwright the tests skip, unless
``QMRI_REQUIRE_BROWSER=1`` (set in CI), which makes them fail.
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.report_dataset import FAILING_MESSAGE, FAILING_STEP

#: Headless, and nothing that reaches for the network (the test machines have none).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _chromium():
    """Path of the system chromium, or skip (fail with ``QMRI_REQUIRE_BROWSER=1``) naming what is missing."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is not installed (pip install playwright)")
    candidates = [os.environ.get("QMRI_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    executable = next((c for c in candidates if c and Path(c).is_file()), None)
    if executable is None:
        problems.append("no chromium (apt-get install chromium, or set QMRI_CHROMIUM)")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("QMRI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"QMRI_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    return executable


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        yield instance
        instance.close()


def _render(browser, path):
    """Open ``path``; return its body text, its images' states and every problem the browser saw."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    problems = []

    def on_console(message):
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url} ({request.failure})"))
    page.goto(Path(path).as_uri(), wait_until="load")
    images = page.evaluate(
        "Array.from(document.images).map("
        "i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}))"
    )
    text = page.inner_text("body")
    title = page.title()
    page.close()
    return text, title, images, problems


def test_published_report_renders_with_every_image(browser, example_with_failure):
    out = example_with_failure
    text, title, images, problems = _render(browser, out / "sub-01.html")
    assert problems == []
    assert title == "qmri-workflows report: sub-01"
    figures = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    assert len(images) == len(figures) > 10
    not_loaded = [image["src"] for image in images if not (image["complete"] and image["width"] > 0)]
    assert not_loaded == []
    for name in ("R2starmap", "R1map", "PDmap", "Chimap", "R2map"):
        assert f"{name} (" in text, f"the page does not name {name}"
    assert "Regional statistics" in text and "Lesions" in text and "Provenance" in text


def test_failed_report_names_the_failed_step_and_its_error(browser, example_with_failure):
    text, title, images, problems = _render(browser, example_with_failure / "sub-02.html")
    assert problems == []
    assert title == "qmri-workflows report: sub-02", "the error's <script> ran"
    # the maps that finished before the failure, embedded in the page and labelled as not published
    assert len(images) > 10
    not_loaded = [image["src"][:40] for image in images if not (image["complete"] and image["width"] > 0)]
    assert not_loaded == []
    assert "NOT PUBLISHED" in text and "R2starmap (" in text
    assert "FAILED" in text and FAILING_STEP in text
    assert FAILING_MESSAGE in text, "the error's markup must show as text"
