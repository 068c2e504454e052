"""End to end in a real headless Chromium: log in, find a blocked account, replay it, see it active."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from django.contrib.auth.models import User

from ordered_tasks import partition_for
from ordered_tasks.models import PartitionStatus
from tests.conftest import eventually
from tests.services import in_ci
from tests.support.workload import fail, parked, publish, ran, status

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
#: Set to a folder (docs/_static/admin) to keep the screenshots for the admin guide.
SCREENSHOTS = os.environ.get("ORDERED_TASKS_SCREENSHOTS")


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = f"Chromium and ChromeDriver are needed at {CHROMIUM} and {CHROMEDRIVER}"
        if in_ci():
            pytest.fail(message + " (CI=true: .ci/run installs them)")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def control_through(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin's replay publishes with the project's Celery app: here, the test's broker."""
    monkeypatch.setattr("ordered_tasks.celery_app.find_celery_app", lambda _path=None: app)
    monkeypatch.setattr("ordered_tasks.dashboard.broker_url", lambda: app.conf.broker_url)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_an_operator_replays_a_blocked_account_in_the_browser(
        app: Celery, start_workers: Any, results: redis.Redis, live_server: Any, browser: Any,
        tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    run, key = uuid.uuid4().hex, f"acct-{uuid.uuid4().hex[:6]}"
    fail(results, run, key, 2)
    start_workers(1)
    publish(app, "strict_step", run, (key, 1), (key, 2), (key, 3))
    eventually(lambda: len(parked(key)) == 2 and status(key) == "blocked", what="a blocked account")
    results.delete(f"{run}:fail:{key}:2")  # the cause is fixed; replaying will now succeed
    User.objects.create_superuser("operator", "operator@example.com", "a-long-password")

    browser.get(live_server.url + "/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("a-long-password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    browser.find_element(By.LINK_TEXT, "Partitions").click()
    assert browser.find_element(By.ID, "partitions")

    browser.get(live_server.url + "/admin/ordered_tasks/accountstate/?status__exact=blocked")
    browser.save_screenshot(str(shots / "accounts.png"))
    # Each click loads a new page: wait for it rather than read the old one.
    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
    browser.find_element(By.LINK_TEXT, key).click()
    wait.until(lambda d: "Parked messages, in the order" in d.page_source)
    assert "failed on purpose" in browser.page_source
    browser.save_screenshot(str(shots / "account.png"))

    browser.get(live_server.url + "/admin/ordered_tasks/accountstate/?status__exact=blocked")
    row = browser.find_element(By.XPATH, f"//tr[.//a[text()='{key}']]")
    row.find_element(By.CSS_SELECTOR, "input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("replay")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    confirm = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=submit][value='Yes, replay']"))
    assert key in browser.find_element(By.ID, "content").text
    browser.save_screenshot(str(shots / "confirm-replay.png"))
    confirm.click()
    wait.until(lambda d: "Requested a replay of 1 account"
               in d.find_element(By.CSS_SELECTOR, "ul.messagelist").text)

    def active_in_browser() -> bool:
        browser.get(live_server.url + f"/admin/ordered_tasks/accountstate/?q={key}")
        return "active" in browser.find_element(By.ID, "result_list").text

    eventually(active_in_browser, timeout=30, what="the account to show as active")
    browser.save_screenshot(str(shots / "replayed.png"))
    assert ran(results, run, key) == [1, 2, 3]

    # The worker reports its partitions in batches; the page shows its figures.
    partition = partition_for(key)
    eventually(lambda: PartitionStatus.objects.filter(partition=partition, completed__gte=3).exists(),
               timeout=20, what="the worker's report")
    row = f"//table[@id='partitions']//tr[td[1][text()='{partition}']]"

    def reported() -> bool:
        browser.get(live_server.url + "/admin/ordered_tasks/partitionstatus/")
        try:  # the page reloads itself every few seconds
            line = browser.find_element(By.XPATH, row).text
        except StaleElementReferenceException:
            return False
        return "@" in line and "reported" in line

    eventually(reported, timeout=20, what="the partitions page to show the consumer")
    browser.save_screenshot(str(shots / "partitions.png"))
