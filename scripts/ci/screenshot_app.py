"""Screenshots of the web page (scripts/app.py) for the README, taken in headless Chromium.

    python scripts/ci/screenshot_app.py                 # writes docs/img/app_contextdiff.png, docs/img/app_codiff.png

Starts the app on a free local port with the shipped tiny checkpoints, generates two images in the ContextDiff tab
and two in the Collaborative Diffusion tab (its masks and influence maps shown), and saves each tab's page, reduced
to a small palette PNG. Needs Debian's chromium and chromedriver (``sh scripts/ci/install_browser.sh``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # the page re-renders while it connects: try again
            pass
        time.sleep(0.3)
    raise SystemExit(f"error: timed out waiting for {what}")


def _shown(driver, css):
    from selenium.webdriver.common.by import By

    return [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def _type(driver, css, value):
    from selenium.webdriver.common.keys import Keys

    def once():
        field = (_shown(driver, f"{css} input") + _shown(driver, f"{css} textarea"))[0]
        field.click()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(value)
        field.send_keys(Keys.TAB)
        return field.get_attribute("value") == value

    _wait(once, 30, f"typing into {css}")
    time.sleep(0.3)


def _click(driver, css):
    _wait(lambda: _shown(driver, css)[0].click() or True, 30, f"clicking {css}")


def _generate(driver, method: str, prompt: str):
    _click(driver, f".app-tab-{method}")
    _type(driver, f".app-prompt-{method}", prompt)
    _click(driver, f".app-generate-{method}")
    _wait(lambda: len([i for i in _shown(driver, f".app-images-{method} img")
                       if (i.get_attribute("src") or "").startswith("data:image/png")]) == 2, 180,
          f"{method} images")
    time.sleep(1.0)


def _save_small(png: bytes, path: Path, width: int) -> None:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    crop = image.getbbox()  # the page's white margin below the content goes
    image = image.crop((0, 0, image.width, min(image.height, _content_height(image)))) if crop else image
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _content_height(image) -> int:
    """The last row that is not plain white, plus a margin."""
    import numpy as np

    rows = np.nonzero((np.asarray(image.convert("L")) < 250).any(axis=1))[0]
    return int(rows[-1]) + 16 if len(rows) else image.height


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=str(REPO / "docs" / "img"))
    p.add_argument("--width", type=int, default=900, help="width of the saved PNGs in pixels")
    p.add_argument("--chromium", default=os.environ.get("DLAB_CHROMIUM", "/usr/bin/chromium"))
    p.add_argument("--chromedriver", default=os.environ.get("DLAB_CHROMEDRIVER", "/usr/bin/chromedriver"))
    args = p.parse_args(argv)
    for tool in (args.chromium, args.chromedriver):
        if not Path(tool).is_file():
            print(f"error: {tool} is missing: install it with `sh scripts/ci/install_browser.sh`", file=sys.stderr)
            return 2
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="dlab-screenshots-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    server = subprocess.Popen([sys.executable, str(REPO / "scripts" / "app.py"), "--port", str(port), "--work_dir",
                               str(work)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1400,1300", f"--user-data-dir={work / 'profile'}"):
        options.add_argument(flag)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: urllib.request.urlopen(url, timeout=5).status == 200, 90, "the app")
        driver = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=options)
        driver.get(url)
        _wait(lambda: _shown(driver, ".app-generate-contextdiff"), 60, "the page")
        _type(driver, ".app-steps", "10")
        _type(driver, ".app-num-images", "2")
        for method, prompt in (("contextdiff", "a blue handwritten two"), ("codiff", "a green handwritten one")):
            _generate(driver, method, prompt)
            path = out / f"app_{method}.png"
            _save_small(driver.get_screenshot_as_png(), path, args.width)
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
