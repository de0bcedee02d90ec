"""scripts/app.py in headless Chromium (Debian's chromium + chromedriver, installed by `make test` through
scripts/ci/install_browser.sh): generate with two methods, see the images, keep a screenshot, and bad input (steps
out of range, an empty prompt, a non-image upload, an upload over the limit) gives a message while the server
keeps answering."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("DLAB_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DLAB_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = REPO / "outputs" / "test_artifacts"
MAX_UPLOAD_MB = 1
WAIT = 120  # seconds: generous for a loaded 2-core machine; each generation below takes a few seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    work = tmp_path_factory.mktemp("app")
    log = open(work / "server.log", "w")
    # NiceGUI takes PYTEST_CURRENT_TEST (inherited) to mean "in-process screen test": the server is a real run.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "app.py"), "--port", str(port),
                             "--max_upload_mb", str(MAX_UPLOAD_MB), "--work_dir", str(work / "outputs")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"scripts/app.py exited with {proc.returncode}:\n{(work / 'server.log').read_text()}")
        try:
            if _get(url + "/") == 200:
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"scripts/app.py did not answer within 90 s:\n{(work / 'server.log').read_text()}")
        time.sleep(0.5)
    yield {"url": url, "proc": proc, "log": work / "server.log", "work": work}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: the browser test needs Debian's Chromium and ChromeDriver; "
                    "install them with `sh scripts/ci/install_browser.sh` (as root: apt-get install -y chromium "
                    "chromium-driver), which `make test` runs first")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,2000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


def _wait(driver, condition, timeout=WAIT, what="condition"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "app_failure.png"))
        pytest.fail(f"timed out waiting for {what} (screenshot: {ARTIFACTS / 'app_failure.png'})")


def _find(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _act(driver, what, action):
    """Retry ``action(driver)`` until it works: Quasar re-renders fields while the page connects."""
    from selenium.common.exceptions import WebDriverException

    def attempt(d):
        try:
            return action(d) or True
        except (WebDriverException, IndexError, StopIteration):
            return False

    _wait(driver, attempt, timeout=30, what=what)


def _set(driver, css, value):
    """Type into a NiceGUI/Quasar field (the native input or textarea inside the element with class ``css``)."""
    from selenium.webdriver.common.keys import Keys

    def type_in(d):
        field = next(f for f in _find(d, f"{css} input") + _find(d, f"{css} textarea") if f.is_displayed())
        field.click()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        if value:
            field.send_keys(value)
        field.send_keys(Keys.TAB)  # blur: NiceGUI sends the value
        if (field.get_attribute("value") or "") != value:
            raise IndexError(f"{css} holds {field.get_attribute('value')!r}")

    _act(driver, f"typing into {css}", type_in)
    time.sleep(0.3)


def _click(driver, css):
    _act(driver, f"clicking {css}",
         lambda d: next(b for b in _find(d, css) if b.is_displayed() and b.is_enabled()).click())


def _images(driver, method):
    return [img for img in _find(driver, f".app-images-{method} img")
            if (img.get_attribute("src") or "").startswith("data:image/png;base64,")]


def _error(driver, method):
    return " ".join(e.text for e in _find(driver, f".app-error-{method}")).strip()


def _alive(server):
    assert server["proc"].poll() is None, server["log"].read_text()
    assert _get(server["url"] + "/") == 200


def test_page_generates_with_two_methods_and_reports_bad_input(server, driver, tmp_path):
    driver.get(server["url"])
    _wait(driver, lambda d: any(b.is_displayed() for b in _find(d, ".app-generate-contextdiff")), what="the page")
    _set(driver, ".app-steps", "4")
    _set(driver, ".app-num-images", "2")

    # ContextDiff (the first tab)
    _set(driver, ".app-prompt-contextdiff", "a blue handwritten two")
    _click(driver, ".app-generate-contextdiff")
    _wait(driver, lambda d: len(_images(d, "contextdiff")) == 2 or _error(d, "contextdiff"),
          what="ContextDiff images")
    assert not _error(driver, "contextdiff")
    assert len(_images(driver, "contextdiff")) == 2
    assert "2 images" in _find(driver, ".app-status-contextdiff")[0].text

    # Versatile text-to-image (another tab)
    _click(driver, ".app-tab-versatile")
    _set(driver, ".app-prompt-versatile", "a green handwritten five")
    _click(driver, ".app-generate-versatile")
    _wait(driver, lambda d: len(_images(d, "versatile")) == 2 or _error(d, "versatile"), what="Versatile images")
    assert not _error(driver, "versatile")
    assert len(_images(driver, "versatile")) == 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(tmp_path / "app.png"))
    shutil.copy(tmp_path / "app.png", ARTIFACTS / "app.png")
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000

    # A non-image upload: refused with a message
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a picture\n" * 20)
    _find(driver, ".app-upload-image input[type=file]")[0].send_keys(str(fake))
    _wait(driver, lambda d: "not an image" in _error(d, "versatile"), what="the non-image message")
    # An upload over the limit: refused by the page
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_UPLOAD_MB * 2**20 + 4096))
    _find(driver, ".app-upload-image input[type=file]")[0].send_keys(str(big))
    _wait(driver, lambda d: f"larger than the {MAX_UPLOAD_MB} MB limit" in _error(d, "versatile"),
          what="the over-limit message")
    _alive(server)

    # Steps out of range, then an empty prompt: messages, no crash
    _click(driver, ".app-tab-contextdiff")
    _set(driver, ".app-steps", "5000")
    _click(driver, ".app-generate-contextdiff")
    _wait(driver, lambda d: "steps must be a whole number between 1 and 1000" in _error(d, "contextdiff"),
          what="the steps message")
    _set(driver, ".app-steps", "4")
    _set(driver, ".app-prompt-contextdiff", "")
    _click(driver, ".app-generate-contextdiff")
    _wait(driver, lambda d: "the prompt is empty" in _error(d, "contextdiff"), what="the empty-prompt message")
    driver.save_screenshot(str(ARTIFACTS / "app_errors.png"))
    _alive(server)

    # ... and the page still generates
    _set(driver, ".app-prompt-contextdiff", "a red handwritten seven")
    _click(driver, ".app-generate-contextdiff")
    _wait(driver, lambda d: "2 images" in _find(d, ".app-status-contextdiff")[0].text and not _error(d, "contextdiff"),
          what="a generation after the errors")
    assert "Traceback" not in server["log"].read_text()

    # Leaving the page deletes the visit's working folder (grids, settings, uploads) once NiceGUI drops the client
    sessions = server["work"] / "outputs"
    assert list(sessions.glob("dlab-app-*")), "the visit should have a working folder while it is open"
    driver.get("about:blank")
    deadline = time.time() + 30
    while list(sessions.glob("dlab-app-*")) and time.time() < deadline:
        time.sleep(0.5)
    left = [(p.name, sorted(q.name for q in p.iterdir())) for p in sessions.glob("dlab-app-*")]
    assert not left, f"the visit's working folder outlived its client: {left}"


def test_server_refuses_oversized_upload_request_before_reading_it(server):
    import http.client

    port = int(server["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/_nicegui/client/abc/upload/1")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(MAX_UPLOAD_MB * 2**20 + 200 * 1024))
    conn.endheaders()  # the body is never sent: the answer must come from the declared length alone
    response = conn.getresponse()
    assert response.status == 413
    assert b"limit" in response.read()
    conn.close()
    _alive(server)


def _rect(driver, css):
    element = next(e for e in _find(driver, css) if e.is_displayed())
    return element.rect


def _shown_text(driver, css):
    return " ".join(e.text for e in _find(driver, css) if e.is_displayed())


def _value(driver, css):
    return next(f for f in _find(driver, f"{css} input") if f.is_displayed()).get_attribute("value")


def test_page_as_a_user_meets_it(server, driver, tmp_path):
    """The bullets of the page's design: Generate right under the prompt; the sampling fields filled with each
    method's own defaults; an upload's state in words (never Quasar's "0.0B / 0.00%"); CoDiff shows the masks it
    used and step-labelled influence maps with a scale; the first use of a checkpoint says it loaded it."""
    from PIL import Image

    driver.get(server["url"])
    _wait(driver, lambda d: any(b.is_displayed() for b in _find(d, ".app-generate-contextdiff")), what="the page")
    _set(driver, ".app-steps", "4")
    _set(driver, ".app-num-images", "2")

    # Generate sits right under the prompt, above the method's own controls
    prompt, button = _rect(driver, ".app-prompt-contextdiff"), _rect(driver, ".app-generate-contextdiff")
    gap = button["y"] - (prompt["y"] + prompt["height"])
    assert 0 <= gap < 40, f"Generate is {gap:.0f} px below the prompt"
    assert button["y"] < _rect(driver, ".app-eta-contextdiff")["y"]

    # defaults shown in the fields, per method
    assert float(_value(driver, ".app-guidance-contextdiff")) == 7.5
    assert float(_value(driver, ".app-eta-contextdiff")) == 0.0
    _click(driver, ".app-tab-sdg")
    _wait(driver, lambda d: "ddpm" in _shown_text(d, ".app-sampler-sdg"), what="SDG's sampler default")
    assert float(_value(driver, ".app-guidance-sdg")) == 1.0

    # upload state: in words, with a thumbnail once taken
    _click(driver, ".app-tab-versatile")
    _wait(driver, lambda d: any(e.is_displayed() for e in _find(d, ".app-upload-info-image")), what="the upload")
    assert _shown_text(driver, ".app-upload-info-image") == "no image uploaded yet"
    assert "0.0B" not in driver.find_element("tag name", "body").text
    digit = tmp_path / "digit.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(digit)
    _find(driver, ".app-upload-image input[type=file]")[0].send_keys(str(digit))
    _wait(driver, lambda d: "uploaded: digit.png (32x32 RGB" in _shown_text(d, ".app-upload-info-image"),
          what="the upload's state")
    assert any(e.is_displayed() for e in _find(driver, ".app-upload-thumb-image"))
    assert "0.0B" not in driver.find_element("tag name", "body").text

    # CoDiff: the masks it used, influence maps labelled, and the cold load reported
    _click(driver, ".app-tab-codiff")
    _set(driver, ".app-prompt-codiff", "a green handwritten one")
    _click(driver, ".app-generate-codiff")
    _wait(driver, lambda d: len(_images(d, "codiff")) == 2 or _error(d, "codiff"), what="CoDiff images")
    assert not _error(driver, "codiff")
    masks = [m for m in _find(driver, ".app-mask-used-codiff img") if m.is_displayed()]
    assert len(masks) == 2 and all((m.get_attribute("src") or "").startswith("data:image/png") for m in masks)
    assert len([m for m in _find(driver, ".app-influence-codiff .app-influence-map img") if m.is_displayed()]) == 2
    panel = _shown_text(driver, ".app-influence-codiff")
    assert "step and model timestep" in panel and "white = weight 1" in panel
    status = _find(driver, ".app-status-codiff")[0].text
    assert "2 images" in status and "model loaded in" in status
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "app_codiff.png"))
    _alive(server)
