"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, through Selenium).

Real parts throughout: a Redis, a worker process running the tasks, and
``longhaul dashboard`` in its own process, read by the browser as an
operator would. Screenshots of the main pages go to tests/output/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from longhaul import worker
from longhaul.models import ChatMessage, TaskSnapshot, TaskStatus
from longhaul.worker.testing import free_port, missing_prerequisite, wait_until
from tests.fixtures.cli import LONGHAUL

pytestmark = [pytest.mark.browser, pytest.mark.redis]

TOKEN = "browser-test-token-0123456789"
SCREENSHOTS = Path(__file__).parent / "output" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[object]:
    """A headless Chromium driven through chromedriver: skipped locally when absent, a failure in CI."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_prerequisite("selenium is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    driver_path = shutil.which("chromedriver") or (CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else None)
    if chromium is None or driver_path is None:
        missing_prerequisite("chromium and chromium-driver are not installed "
                             "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-default-apps"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard(worker_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``longhaul dashboard`` on a free loopback port, on this test's store and Redis; its base URL."""
    port = free_port()
    env = {**worker_env, "LONGHAUL_DASHBOARD_TOKEN": TOKEN}
    with open(tmp_path / "dashboard.log", "wb") as log:
        process = subprocess.Popen([*LONGHAUL, "dashboard", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base), timeout_s=30, what="the dashboard to answer")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/", timeout=2).status_code == 401
    except httpx.HTTPError:
        return False


def screenshot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def text_of(driver, css: str) -> str:
    """The element's visible text, read in one script (htmx may swap the element between two WebDriver calls)."""
    return driver.execute_script("const found = document.querySelector(arguments[0]);"
                                 "return found ? found.innerText : '';", css)


def listed_ids(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('tr[data-task-id]')]"
                                 ".map(row => row.dataset.taskId);")


def test_an_operator_sees_the_tasks_watches_one_run_live_and_cancels_it(
        browser, dashboard, start_worker, client_runtime, store, tmp_path):
    from selenium.webdriver.common.by import By

    start_worker(processes=1, threads=2)
    ledger = str(tmp_path / "ledger.txt")
    quick = worker.enqueue("a quick one", task_id="quick", thread_id="thread-q", steps=1, ledger_path=ledger)
    slow = worker.enqueue("a slow one", task_id="slow", thread_id="thread-s", steps=40, step_delay_s=0.4,
                          ledger_path=ledger)
    wait_until(lambda: store.summary(quick).status is TaskStatus.COMPLETED, timeout_s=60, what="the quick task")

    # The list: the right tasks, with their statuses, behind the token.
    browser.get(f"{dashboard}/?token={TOKEN}")
    assert "token" not in browser.current_url  # the token left the URL for a session cookie
    wait_until(lambda: set(listed_ids(browser)) == {"quick", "slow"}, timeout_s=20, what="both tasks listed")
    wait_until(lambda: "completed" in text_of(browser, 'tr[data-task-id="quick"]'), timeout_s=10, what="quick done")
    screenshot(browser, "tasks")
    browser.get(f"{dashboard}/?status=completed")
    assert listed_ids(browser) == ["quick"]

    # The running task's page follows it without a reload.
    browser.get(f"{dashboard}/tasks/{slow}")
    browser.execute_script("window.loadedOnce = 'yes';")  # gone if the page reloads
    first = int(wait_until(lambda: text_of(browser, "#step-count") or None, timeout_s=10, what="step count"))
    wait_until(lambda: int(text_of(browser, "#step-count") or 0) >= first + 2, timeout_s=30,
               what="the step count to grow on the open page")
    assert browser.execute_script("return window.loadedOnce") == "yes"
    assert browser.execute_script("return document.querySelectorAll('#trace tbody tr').length"), "no trace shown"
    screenshot(browser, "task-running")

    # An action end to end: cancel, confirmed, and the task stops.
    browser.execute_script("document.querySelector('a[data-action=\"cancel\"]').click();")  # no stale element
    wait_until(lambda: text_of(browser, "#question"), timeout_s=10, what="the confirmation page")
    assert "Cancel task slow?" in text_of(browser, "#question")
    browser.find_element(By.ID, "confirm").click()
    # The POST answers with a redirect to the task's page: its flash shows once that page has loaded.
    wait_until(lambda: "cancel" in text_of(browser, "#flash").lower(), timeout_s=15,
               what="the task page to say the cancel was done")
    wait_until(lambda: text_of(browser, "#task-status") == "cancelled", timeout_s=30,
               what="the page to show the task cancelled")
    assert store.summary(slow).status is TaskStatus.CANCELLED
    screenshot(browser, "task-cancelled")

    browser.get(f"{dashboard}/threads/thread-q")
    assert "a quick one" in text_of(browser, "#conversation")
    screenshot(browser, "thread")


def test_a_model_answer_holding_a_script_stays_inert_text_in_the_browser(browser, dashboard, store):
    from selenium.webdriver.common.by import By

    answer = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> done"
    store.save_snapshot(TaskSnapshot(
        task_id="xss", thread_id="thread-x", channel="api", provider="scripted", model="scripted-v1",
        status=TaskStatus.COMPLETED, final_response=answer,
        execution_history=[ChatMessage.user("hi"), ChatMessage.assistant(answer)],
        resumable_history=[ChatMessage.user("hi"), ChatMessage.assistant(answer)]))

    for path in ("/tasks/xss", "/threads/thread-x"):
        browser.get(f"{dashboard}{path}?token={TOKEN}")
        assert browser.execute_script("return window.pwned === undefined")
        assert answer in browser.find_element(By.CSS_SELECTOR, "#conversation").text
        assert not browser.find_elements(By.CSS_SELECTOR, "#conversation script, #conversation img")
    screenshot(browser, "xss-inert")
