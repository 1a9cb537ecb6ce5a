"""The workbench end to end in a real browser: ``streamlit run app.py`` on a free localhost port,
driven by headless Chromium (Debian's ``chromium`` and ``chromium-driver``) through Selenium.

Opens a case from the Cases page, checks that the attribution graph renders, adds a note and
sees it listed, visits every page, and checks that a case made of script and img payloads
shows them as text. Screenshots go to $RCA_ARTIFACTS (default: artifacts/ in the repository).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rca.store import Store
from tests.app.conftest import APP, ROOT, SCRIPT, XSS_CASE

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (apt-get install -y chromium chromium-driver; .ci/run does)",
)
TIMEOUT = 90.0


def artifacts() -> Path:
    out = Path(os.environ.get("RCA_ARTIFACTS") or ROOT / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(db: Path) -> Iterator[str]:
    """``streamlit run app.py`` on ``db``, headless on a free port; yields its base URL."""
    port = _free_port()
    log = artifacts() / f"streamlit-{port}.log"
    env = {**os.environ, "RCA_DB": str(db), "RCA_CASES": str(ROOT / "cases")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP),
             "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start; see {log}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2200", "--hide-scrollbars"):  # fmt: skip
        opts.add_argument(arg)
    service = Service(str(CHROMEDRIVER)) if CHROMEDRIVER.exists() else Service()
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(TIMEOUT)
    yield d
    d.quit()


def wait(driver: Any, what: Callable[[Any], Any], message: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.25).until(what, message)
    except Exception:
        driver.save_screenshot(str(artifacts() / "failure.png"))
        raise


def css(sel: str) -> Callable[[Any], Any]:
    return lambda d: d.find_elements("css selector", sel)


def body_has(text: str) -> Callable[[Any], bool]:
    return lambda d: text in d.find_element("tag name", "body").text


def idle(driver: Any) -> None:
    """Wait until the script run finished (no running indicator) and the page settled."""
    time.sleep(0.5)
    wait(driver, lambda d: not d.find_elements("css selector", '[data-testid="stStatusWidget"]'),
         "the script run did not finish")  # fmt: skip


def toggle(driver: Any, label: str) -> Any:
    """The clickable label of a Streamlit toggle or checkbox."""
    return wait(
        driver,
        lambda d: next(
            (e for e in d.find_elements("css selector", "label") if label in e.text), None
        ),
        f"no toggle {label!r}",
    )


def button(driver: Any, label: str) -> Any:
    return wait(
        driver,
        lambda d: next(
            (b for b in d.find_elements("css selector", "button") if b.text.strip() == label),
            None,
        ),
        f"no button {label!r}",
    )


def test_open_a_case_see_the_graph_and_add_a_note(demo_db: Path, driver: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    with serve(demo_db) as url:
        driver.get(url)
        wait(driver, body_has("Open a run"), "the Cases page did not render")
        search = wait(driver, css('input[aria-label="Search"]'), "no search box")[0]
        search.send_keys("zoo-bias", Keys.ENTER)
        wait(driver, body_has("runs, 1 cases"), "the search did not filter the table")
        idle(driver)
        driver.save_screenshot(str(artifacts() / "cases.png"))
        button(driver, "Open case").click()

        wait(driver, lambda d: "run=" in d.current_url, "Open case did not open the case")
        # the circuit first, its members as labelled boxes; the full graph behind a toggle
        circuit = wait(driver, css('svg[aria-label="circuit"]'), "no circuit")[0]
        assert circuit.find_elements("css selector", "rect[rx]")
        assert "writer" in circuit.text or "entry" in circuit.text or "route" in circuit.text
        toggle(driver, "Show the full attribution graph").click()
        svg = wait(driver, css('svg[aria-label="attribution graph"]'), "no graph")[0]
        assert svg.find_elements("css selector", "circle") and svg.find_elements(
            "css selector", "line"
        )
        wait(driver, css(".rca-strip .rca-tok"), "no token heat strip")
        wait(driver, body_has("Ablation evidence for"), "no node details")
        idle(driver)
        driver.save_screenshot(str(artifacts() / "case-detail.png"))

        text = f"browser note {uuid.uuid4().hex[:8]} <b>not bold</b>"
        author = wait(driver, css('input[aria-label="Author"]'), "no author field")[0]
        author.send_keys(Keys.CONTROL, "a")  # clear() does not reach React's state
        author.send_keys(Keys.DELETE, "selenium")
        wait(driver, css('textarea[aria-label="Note"]'), "no note field")[0].send_keys(text)
        button(driver, "Add note").click()
        wait(driver, body_has("added."), "the note was not added")
        wait(driver, body_has(text), "the note is not listed")  # as text: <b> stays visible
        assert not driver.find_elements("xpath", "//b[text()='not bold']")
        idle(driver)
        driver.save_screenshot(str(artifacts() / "case-note.png"))
        run_id = driver.current_url.split("run=")[1].split("&")[0]
        notes = Store.reader(demo_db).get_run(run_id)["notes"]
        assert [(n["author"], n["text"]) for n in notes][-1] == ("selenium", text)

        for page, marker in (
            ("regression", "same mechanism"),
            ("monitors", "rca monitor build"),  # the monitors, or how to build one
            ("audit", "Audit chain intact"),
            ("new_investigation", "Investigate"),
        ):
            driver.get(f"{url}/{page}")
            wait(driver, body_has(marker), f"the {page} page did not render")
            idle(driver)
            driver.save_screenshot(str(artifacts() / f"{page.replace('_', '-')}.png"))


def test_script_and_img_payloads_render_as_text(xss_db: tuple[Path, str], driver: Any) -> None:
    db, run_id = xss_db
    with serve(db) as url:
        driver.get(f"{url}/case_detail?run={run_id}")
        wait(driver, css('svg[aria-label="circuit"], svg[aria-label="attribution graph"]'),
             "no graph")  # fmt: skip
        wait(driver, body_has(XSS_CASE), "the case did not render")
        idle(driver)
        body = driver.find_element("tag name", "body").text
        assert SCRIPT in body  # the prompt, shown as typed
        assert 'onerror="window.__rca_xss = 2"' in body
        assert driver.execute_script("return window.__rca_xss === undefined")
        assert not driver.find_elements("css selector", "img[onerror]")
        scripts = driver.find_elements("css selector", "script")
        assert not any("__rca_xss" in (s.get_attribute("innerHTML") or "") for s in scripts)
        # the strip holds the tokens as text, not as elements
        strip = driver.find_element("css selector", ".rca-strip")
        assert not strip.find_elements("css selector", "script, img")
        assert SCRIPT in strip.text
        driver.save_screenshot(str(artifacts() / "xss-case.png"))
