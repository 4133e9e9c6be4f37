"""``slidestream view`` in a real browser: headless Chromium (Debian ``chromium`` +
``chromium-driver``) driven by Selenium opens the slide list and the slide page of a real run.

It waits until OpenSeadragon has loaded every visible slide and nucleus tile and the tissue
polygons and statistics are drawn, zooms in until the nuclei are vector outlines and clicks one,
checks that the console holds no JavaScript error, and judges the screenshots by their pixels:
the slide is drawn (H&E colours, not blank) and the overlay colours are present where the
tissue is. Screenshots of the last run stay in ``test-output/viewer/``. Skips without Chromium
(``.ci/run`` installs it).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from slidestream.db import connect_read_only
from slidestream.viewer import ViewerConfig, create_app

GOOD = "demo slide é"  # the slide of the viewer_run fixture (tests/integration/conftest.py)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--force-device-scale-factor=1",
)

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="chromium / chromium-driver not installed (apt-get install chromium "
        "chromium-driver)",
    ),
    # one browser and one analysed folder for the module: its tests run on one xdist worker
    pytest.mark.xdist_group("viewer_browser"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="slidestream-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def base_url(
    viewer_run: Path, live_server: Callable[[object], AbstractContextManager[str]]
) -> Iterator[str]:
    engine = connect_read_only(f"sqlite:///{viewer_run / 'slidestream.db'}")
    with live_server(create_app(ViewerConfig(out_dir=viewer_run), engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def shots(test_output_dir: Path) -> Path:
    folder = test_output_dir / "viewer"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _wait(driver: Any, script: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    state = driver.execute_script("return JSON.stringify(window.slidestreamViewer || null)")
    raise AssertionError(f"timed out waiting for {script!r}; viewer state {state}")


def _console_errors(driver: Any) -> list[str]:
    return [
        f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"
    ]


def _screenshot(driver: Any, path: Path) -> npt.NDArray[np.uint8]:
    png = driver.get_screenshot_as_png()
    path.write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _element_pixels(driver: Any, image: npt.NDArray[np.uint8], css: str) -> npt.NDArray[np.uint8]:
    rect = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom];",
        css,
    )
    x0, y0, x1, y1 = (round(v) for v in rect)
    return image[y0:y1, x0:x1]


def _hne_fraction(rgb: npt.NDArray[np.uint8]) -> float:
    """Share of pixels coloured like stained tissue (pink/purple: red and blue above green)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return float(((r - g > 25) & (b - g > 10)).mean())


def test_slide_list_in_the_browser(browser: Any, base_url: str, shots: Path) -> None:
    browser.get(base_url + "/")
    link = _wait(browser, "return document.querySelector('a.slide-link')")
    assert link.text == GOOD
    assert link.get_attribute("href") == f"{base_url}/slides/{quote(GOOD, safe='')}"
    _wait(
        browser,
        "const i = document.querySelector('td.thumb img');"
        "return i && i.complete && i.naturalWidth > 0",
    )
    image = _screenshot(browser, shots / "slide-list.png")
    thumb = _element_pixels(browser, image, "td.thumb img")
    assert _hne_fraction(thumb) > 0.2  # the thumbnail shows the stained tissue
    assert _console_errors(browser) == []


def test_slide_page_draws_slide_and_overlays(
    browser: Any, base_url: str, viewer_run: Path, shots: Path
) -> None:
    browser.get(f"{base_url}/slides/{quote(GOOD, safe='')}")
    _wait(
        browser,
        "const s = window.slidestreamViewer; return s && s.slideLoaded && s.nucleiLoaded"
        " && s.tissueDrawn && s.statsDrawn",
    )
    time.sleep(0.3)  # let the last animation frame paint
    state = browser.execute_script("return window.slidestreamViewer")
    assert state["errors"] == []
    image = _screenshot(browser, shots / "slide-page.png")
    view = _element_pixels(browser, image, "#viewer")
    assert view.std() > 20, "viewer is blank"
    assert _hne_fraction(view) > 0.1, "no stained tissue drawn"
    # the overlay colours (tissue class outlines/fill and nuclei) appear where the tissue is
    info = json.loads(
        browser.execute_script(
            f"return fetch('/api/slides/{quote(GOOD, safe='')}').then(r => r.text())"
        )
    )
    colours = {tuple(c) for c in info["nuclei"]["colours"].values()}
    colours |= {tuple(c) for c in info["tissue_colours"].values()}
    pixels = view.reshape(-1, 3).astype(np.int32)
    near = np.zeros(len(pixels), bool)
    for colour in colours:
        near |= np.abs(pixels - np.asarray(colour)).max(axis=1) <= 40
    assert near.mean() > 0.01, "no overlay colour in the viewer"
    # switching the overlays off removes those colours (they came from the overlays)
    browser.execute_script(
        "for (const id of ['show-tissue', 'show-nuclei']) document.getElementById(id).click();"
    )
    time.sleep(0.4)
    bare = _element_pixels(
        browser, _screenshot(browser, shots / "slide-page-no-overlays.png"), "#viewer"
    )
    pixels = bare.reshape(-1, 3).astype(np.int32)
    near_bare = np.zeros(len(pixels), bool)
    for colour in colours:
        near_bare |= np.abs(pixels - np.asarray(colour)).max(axis=1) <= 40
    assert near_bare.mean() < near.mean() / 2
    browser.execute_script(
        "for (const id of ['show-tissue', 'show-nuclei']) document.getElementById(id).click();"
    )
    stats = browser.find_element("id", "stats").text
    summary = json.loads((viewer_run / GOOD / "summary.json").read_text())
    assert f"{summary['statistics']['nucleus_count']:,}" in stats
    assert _console_errors(browser) == []


def test_zoomed_in_nuclei_are_outlines_and_clickable(
    browser: Any, base_url: str, viewer_run: Path, shots: Path
) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(viewer_run / GOOD / "nuclei.parquet").to_pydict()
    x, y = table["centroid_x"][0], table["centroid_y"][0]
    # zoom to the first nucleus at 2 screen px per level-0 px (on its own slide page: the test
    # must not depend on which test ran before it)
    browser.get(f"{base_url}/slides/{quote(GOOD, safe='')}")
    _wait(browser, "return window.slidestreamViewer && window.slidestreamViewer.slideLoaded")
    browser.execute_script(
        "window.slidestreamViewer.zoomTo(arguments[0], arguments[1], 2.0);", x, y
    )
    _wait(browser, "const s = window.slidestreamViewer; return s.vectorMode && s.vectorNuclei > 0")
    _wait(browser, "return window.slidestreamViewer.slideLoaded")
    time.sleep(0.5)
    image = _screenshot(browser, shots / "slide-page-nuclei-outlines.png")
    view = _element_pixels(browser, image, "#viewer")
    assert _hne_fraction(view) > 0.05
    # click the nucleus in the middle of the view: its measurements appear
    browser.execute_script("window.slidestreamViewer.clickAt(arguments[0], arguments[1]);", x, y)
    popup = _wait(
        browser,
        "const p = document.getElementById('nucleus-popup'); return !p.hidden && p.innerText",
    )
    assert "Nucleus 0" in popup and "Area µm^2" in popup
    _screenshot(browser, shots / "slide-page-nucleus-popup.png")
    assert _console_errors(browser) == []


def test_cohort_page_in_the_browser(browser: Any, base_url: str, shots: Path) -> None:
    browser.get(base_url + "/cohort")
    _wait(browser, "return window.slidestreamCohort && window.slidestreamCohort.loaded")
    assert browser.execute_script("return window.slidestreamCohort.errors") == []
    points = browser.find_elements("css selector", "#box-plot circle.point")
    assert len(points) == 1
    assert browser.find_elements("css selector", "#scatter-plot circle.point")
    _screenshot(browser, shots / "cohort.png")
    assert _console_errors(browser) == []
