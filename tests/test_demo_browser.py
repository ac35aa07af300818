"""The Gradio demo driven in a real headless Chromium: example, upload, attention, click.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium
chromium-driver``) and ``selenium``. Without them the test is skipped, or fails when
``DENSEDINO_REQUIRE_BROWSER=1`` (CI sets it, so a missing browser cannot pass silently).
The screenshot lands in ``test-artifacts/demo.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from densedino.models.vit import build_backbone

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
# Chromium on a closed network, without a sandbox (containers run it as root).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1600",
]
WAIT_S = 180  # 2 shared CPU cores: the first forward pass and page load can be slow
IMAGE_SIZE = 224
# The left eye of scikit-image's "chelsea" cat (451 x 300), as fractions of width and height.
EYE = (0.377, 0.383)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def browser_or_skip() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skip (or fail when required) without them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        missing = "the selenium package"
    else:
        missing = ", ".join(
            name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
        )
    if missing:
        reason = (
            f"no headless browser: {missing} missing (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("DENSEDINO_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="densedino-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from densedino.serve.demo import (
        Explorer,
        build_demo,
        bundled_examples,
        launch,
        random_weights_label,
    )

    model = build_backbone("vit_tiny", 16, depth=2)
    examples = bundled_examples(tmp_path_factory.mktemp("examples"))
    demo = build_demo(Explorer(model, IMAGE_SIZE), random_weights_label(model), examples)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def natural_size(driver: Any, css: str) -> tuple[int, int] | None:
    """(width, height) of the loaded image matching ``css``, None while there is none."""
    return driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return img && img.complete && img.naturalWidth"
        " ? [img.naturalWidth, img.naturalHeight] : null;",
        css,
    )


def wait_for_size(driver: Any, css: str, size: tuple[int, int]) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: natural_size(d, css) == list(size),
        message=f"{css} never showed a {size[0]}x{size[1]} picture "
        f"(last: {natural_size(driver, css)})",
    )


def figure_size(picture_hw: tuple[int, int], heads: int) -> tuple[int, int]:
    """(width, height) of a tiled per-head figure for a picture of (height, width)."""
    from densedino.serve.demo import DISPLAY_SIZE, MAX_COLUMNS, THUMB_SIZE, fit_size

    display = fit_size(*picture_hw, DISPLAY_SIZE)
    thumb_h, thumb_w = fit_size(*display, THUMB_SIZE)
    columns = min(heads, MAX_COLUMNS)
    rows = -(-heads // columns)
    return columns * (thumb_w + 4) - 4, rows * (thumb_h + 4) - 4


def test_demo_in_chromium(browser: Any, demo_url: str, tmp_path: Path) -> None:
    import skimage.data
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from densedino.serve.demo import DISPLAY_SIZE, fit_size

    driver = browser
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(demo_url)
    label = wait.until(lambda d: d.find_element(By.ID, "weights-label"))
    assert "RANDOM WEIGHTS" in label.text

    # 1. Pick the bundled astronaut (512 x 512): three heads, tiled side by side.
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#examples img[src*='astronaut']"))
    driver.find_element(By.CSS_SELECTOR, "#examples img[src*='astronaut']").click()
    wait_for_size(driver, "#attention-grid img", figure_size((512, 512), 3))
    wait_for_size(driver, "#mask-grid img", figure_size((512, 512), 3))

    # 2. Upload the cat photo instead: every figure follows the new picture.
    cat = skimage.data.chelsea()
    path = tmp_path / "chelsea.png"
    Image.fromarray(cat).save(path)
    driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(path))
    wait_for_size(driver, "#input-image img", (cat.shape[1], cat.shape[0]))
    wait_for_size(driver, "#attention-grid img", figure_size(cat.shape[:2], 3))
    wait_for_size(driver, "#mask-grid img", figure_size(cat.shape[:2], 3))
    display_h, display_w = fit_size(*cat.shape[:2], DISPLAY_SIZE)
    wait_for_size(driver, "#pca img", (display_w, display_h))
    assert natural_size(driver, "#ref-attention img") is None, "no reference before a click"

    # 3. Click the cat's eye (object-fit: contain, so find the drawn picture inside the box).
    image = driver.find_element(By.CSS_SELECTOR, "#input-image img")
    box = image.rect
    scale = min(box["width"] / cat.shape[1], box["height"] / cat.shape[0])
    drawn_w, drawn_h = cat.shape[1] * scale, cat.shape[0] * scale
    x = (box["width"] - drawn_w) / 2 + EYE[0] * drawn_w
    y = (box["height"] - drawn_h) / 2 + EYE[1] * drawn_h
    ActionChains(driver).move_to_element_with_offset(
        image, round(x - box["width"] / 2), round(y - box["height"] / 2)
    ).click().perform()

    info = wait.until(
        lambda d: (
            (text := d.find_element(By.ID, "ref-info").text).startswith("Reference token") and text
        )
    )
    col, row = map(int, re.search(r"pixel \((\d+), (\d+)\)", info).groups())  # type: ignore[union-attr]
    assert abs(col - EYE[0] * cat.shape[1]) <= 6 and abs(row - EYE[1] * cat.shape[0]) <= 6, info
    wait_for_size(driver, "#ref-attention img", (display_w, display_h))
    wait_for_size(driver, "#ref-similarity img", (display_w, display_h))

    # 4. The whole page, for a human to look at.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, height + 50)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 50_000  # a rendered page with pictures, not a blank one
