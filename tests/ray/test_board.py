"""`loom board` end to end in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
the board loads, a typo shows its error as it is typed, a valid tiny run is submitted as a Ray job to the session's
cluster, its loss curve appears, and it finishes. Screenshots of each state are saved (LOOM_BOARD_SCREENSHOTS=DIR
keeps them there, as the README's are made)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import VENV_BIN, free_port
from tests.helpers import DEMO_DATA

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def board(ray_cluster, tmp_path):
    port = free_port()
    log = open(tmp_path / "board.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "loom"), "board", "--address", ray_cluster.dashboard_url, "--port",
                             str(port)], cwd=tmp_path, env=ray_cluster.env(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "board.log").read_text()
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1400,2000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def type_config(driver, text: str) -> None:
    """Select the editor's text and type the config over it, key by key, as a user would."""
    from selenium.webdriver.common.keys import Keys

    editor = driver.find_element("css selector", "#config textarea")
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys(Keys.DELETE)
    editor.send_keys(text)


def element(driver, css: str, timeout_s: float = 30):
    """The element once the app has drawn it (a section's content is drawn when it is opened)."""
    return wait_for(lambda: driver.find_elements("css selector", css), timeout_s, css)[0]


def open_section(driver, label: str) -> None:
    """Open one of the board's closed accordions by its label."""
    for button in driver.find_elements("css selector", "button.label-wrap, button"):
        if button.text.strip().startswith(label):
            button.click()
            return
    raise AssertionError(f"no section {label!r} on the board")


def text_of(driver, element_id: str) -> str:
    """An element's text, "" until the app has drawn it."""
    found = driver.find_elements("css selector", f"#{element_id}")
    return found[0].text if found else ""


def report_with(driver, phrase: str, timeout_s: float = 30) -> str:
    def report() -> str | None:
        text = text_of(driver, "report")
        return text if phrase in text else None

    return wait_for(report, timeout_s, f"the check's report to say {phrase!r}")


def test_the_board_checks_as_you_type_submits_a_ray_job_and_follows_it_to_the_end(
    board, browser, ray_cluster, tiny_model, tmp_path
):
    shots = Path(os.environ.get("LOOM_BOARD_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    browser.get(board)
    wait_for(lambda: "Valid" in text_of(browser, "report") or "Problems" in text_of(browser, "report"), 60,
             "the board's first check")  # fmt: skip
    browser.save_screenshot(str(shots / "board-loaded.png"))

    raw = {"model_name_or_path": tiny_model, "stage": "sft", "finetuning_type": "lora", "dataset": "loom_demo_sft",
           "dataset_dir": str(DEMO_DATA), "template": "default", "cutoff_len": 128, "max_samples": 64,
           "output_dir": str(tmp_path / "out"), "ray_storage_path": str(tmp_path / "saves"),
           "ray_run_name": "board", "ray_num_workers": 2, "resources_per_worker": {"CPU": 1},
           "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_steps": 12, "logging_steps": 1,
           "save_steps": 6, "max_new_tokens": 8, "do_sample": False}  # fmt: skip
    typo = yaml.safe_dump({**raw, "lora_rnak": 8}, sort_keys=False)
    type_config(browser, typo)
    report = report_with(browser, "lora_rnak")
    assert "did you mean 'lora_rank'" in report
    browser.save_screenshot(str(shots / "board-typo.png"))

    type_config(browser, yaml.safe_dump(raw, sort_keys=False))
    report = report_with(browser, "Valid")
    assert "run name      board" in report and "steps" in report
    browser.find_element("css selector", "#submit").click()
    job = wait_for(lambda: browser.find_element("css selector", "#job_id textarea, #job_id input").get_attribute(
        "value"), 60, "the job id")  # fmt: skip
    assert job.startswith("raysubmit_")
    wait_for(lambda: browser.find_elements("css selector", "#curve canvas, #curve svg"), 300, "the loss curve")
    browser.save_screenshot(str(shots / "board-running.png"))
    wait_for(lambda: "SUCCEEDED" in text_of(browser, "status") or "FAILED" in text_of(browser, "status"), 400,
             "the job to end")  # fmt: skip
    time.sleep(2.5)  # one more tick: the last points of the curve and of the log
    assert "SUCCEEDED" in text_of(browser, "status"), browser.find_element("css selector", "#log textarea").text
    browser.save_screenshot(str(shots / "board-finished.png"))
    log = browser.find_element("css selector", "#log textarea").get_attribute("value")
    assert "final" in log and "checkpoint-000012" in log  # `loom train`'s own summary, from the job's log
    logged = [line for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 12  # the curve's data: every logged step of the finished run
    open_section(browser, "checkpoints")
    element(browser, "#list").click()
    listing = wait_for(lambda: (text := text_of(browser, "checkpoints")) and "checkpoint-000012" in text and text,
                       30, "the checkpoint listing")  # fmt: skip
    assert "checkpoints  2: 000006, 000012" in listing and "state        finished" in listing  # `loom status`
    open_section(browser, "chat with the trained model")
    message = element(browser, "#message textarea")
    message.send_keys("Convert 3 hours to minutes.\n")  # the same engine as `loom chat`, on output_dir's adapter
    wait_for(lambda: len(browser.find_elements("css selector", "#chat .message")) >= 2, 120, "the model's answer")
    browser.save_screenshot(str(shots / "board-chat.png"))
    assert "cannot chat" not in text_of(browser, "chat")
    assert sorted(p.name for p in shots.glob("board-*.png")) == [
        "board-chat.png", "board-finished.png", "board-loaded.png", "board-running.png", "board-typo.png"]  # fmt: skip
