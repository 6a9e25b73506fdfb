"""The MLflow UI as a person sees it: a real `spntune ui` server on loopback, headless Chromium.

Slow (installs Debian's chromium + chromium-driver when missing, runs a search, starts a server):
`make test-slow`. Screenshots go to runs/ui-screenshots/.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spntune.cli import main

pytestmark = pytest.mark.slow
SCREENSHOTS = Path(__file__).resolve().parents[1] / "runs" / "ui-screenshots"


def _ensure_chromium() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.geteuid() != 0:
            pytest.skip("chromium/chromedriver missing and not root to apt-get install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True, capture_output=True, env=env
        )
        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return chromium, driver  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_mlflow_ui_shows_trials_and_mask_images(tmp_path):
    chromium, driver_path = _ensure_chromium()
    from selenium import webdriver
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        NoSuchElementException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "--smoke-test", "--storage", str(tmp_path / "ray"), "--name", "browse", "--scheduler", "none",
            "--tracking-uri", uri, "--set", "train.viz_samples=1"]  # fmt: skip
    assert main(args) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("spntune")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "spntune.cli", "ui", "--port", str(port), "--tracking-uri", uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1600,1000"):  # fmt: skip
        options.add_argument(flag)
    browser = None
    try:
        assert server.stdout is not None
        first_line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first_line
        _wait_http(f"http://127.0.0.1:{port}/health")
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        wait = WebDriverWait(browser, 60)

        base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
        # the runs page lists the search run; its trial runs are nested under it
        browser.get(f"{base}/runs?workflowType=machine_learning")
        wait.until(lambda b: "browse" in b.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda b: "3 matching runs" in b.find_element(By.TAG_NAME, "body").text)  # parent + 2 trials
        browser.save_screenshot(str(SCREENSHOTS / "runs.png"))

        # a trial run's artifacts: open panels/panel_000.png as a person would, by clicking
        run = children[0]
        browser.get(f"{base}/runs/{run.info.run_id}/artifacts?workflowType=machine_learning")

        # Click once an entry takes clicks, not as soon as it is in the page: the tree renders an entry
        # before it is interactable (one run failed "element not interactable" that way), so a click
        # refused for that reason is tried again until the wait's timeout.
        def click(text: str) -> None:
            def clicked(b) -> bool:  # type: ignore[no-untyped-def]
                try:
                    b.find_element(By.XPATH, f"//*[normalize-space(text())='{text}']").click()
                    return True
                except (NoSuchElementException, ElementNotInteractableException, ElementClickInterceptedException):
                    return False

            wait.until(clicked)

        wait.until(lambda b: b.find_elements(By.XPATH, "//*[normalize-space(text())='panels']"))
        assert run.info.run_name in browser.find_element(By.TAG_NAME, "body").text
        click("panels")
        click("panel_000.png")

        def panel_loaded(b):  # type: ignore[no-untyped-def]
            # The UI shows artifacts through blob: URLs; the panel is 5 tiles of 64 px: 320 x (64 + 14 title) px.
            for img in b.find_elements(By.TAG_NAME, "img"):
                size = b.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
                if (img.get_attribute("src") or "").startswith("blob:") and size == [320, 78]:
                    return img
            return False

        img = wait.until(panel_loaded)
        assert img.size["width"] >= 100  # displayed, not just decoded
        browser.save_screenshot(str(SCREENSHOTS / "run_panel.png"))
        (SCREENSHOTS / "info.json").write_text(json.dumps({"experiment": exp.experiment_id, "run": run.info.run_id}))
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
