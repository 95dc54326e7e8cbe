"""End to end in a real headless Chromium: a node serves its dashboard; crashes, restarts and an
escalation appear on the open page without a reload.

Chromium and chromedriver are Debian's (``make test`` installs them: SYSTEM_PACKAGES), driven
by selenium. Every wait is on what the page shows, bounded by :data:`PAGE_WAIT` (reached only
when something is broken, even on a loaded two-core machine). The last screenshot is kept in
``test-artifacts/dashboard.png`` (``$VILLAGEMESH_ARTIFACTS`` to put it elsewhere).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from villagemesh.node import create_network

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_WAIT = 30.0
ARTIFACTS = Path(os.environ.get("VILLAGEMESH_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make sysdeps` installs chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="villagemesh-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, what: str):
    """Wait until the page's ``script`` (a JS expression) is truthy; fail naming ``what``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        waiting = WebDriverWait(driver, PAGE_WAIT, poll_frequency=0.05)
        return waiting.until(lambda d: d.execute_script(f"return {script}"))
    except TimeoutException:
        text = driver.execute_script("return document.body.innerText")[:2000]
        pytest.fail(f"the page never showed {what} within {PAGE_WAIT} s; it shows:\n{text}")


def child(sup: str, child_id: str) -> str:
    return f'document.querySelector(\'.child[data-supervisor="{sup}"][data-child="{child_id}"]\')'


def test_the_page_shows_a_transport_crash_its_restart_and_an_escalation_without_reload(tmp_path, browser):
    node = create_network("hybrid", data_dir=tmp_path / "alice", name="alice", dashboard=True)
    bob = create_network(
        "hybrid", data_dir=tmp_path / "bob", name="bob", bootstrap=(node.acceptor_address,), discovery_interval=0.3
    )
    bob.subscribe("DATA", lambda message: None)  # a message nobody handles is not delivered
    with node, bob:
        assert node.wait_for_peers(1, PAGE_WAIT), "alice never learned of bob"
        for handle in [node.send(bob.node_id, b"hello %d" % i) for i in range(20)]:
            assert handle.wait(PAGE_WAIT).delivered
        browser.get(f"http://{node.acceptor_address}/villagemesh/dashboard")
        wait_for(browser, f"{child('transports', 'websocket')}?.dataset.state === 'running'", "websocket running")
        wait_for(browser, "document.getElementById('conn').textContent === 'live'", "the live stream")
        browser.execute_script("window.__sameDocument = 'yes'")

        node.crash("websocket")
        wait_for(
            browser,
            'document.querySelector(\'#timeline tr[data-event="child_crashed"][data-child="websocket"]\')',
            "the crash in the timeline",
        )
        wait_for(
            browser,
            f"{child('transports', 'websocket')}?.dataset.restarts === '1'"
            f" && {child('transports', 'websocket')}.dataset.state === 'running'",
            "the restart",
        )
        crash = browser.execute_script(f"return {child('transports', 'websocket')}.querySelector('.crash').textContent")
        assert "CrashInjected" in crash
        # The restart reached the page within the design's bound after its log line (polled every
        # 0.1 s, pushed every 0.2 s): measured here and printed, not asserted (the machine is shared).
        seen_at = datetime.datetime.now(datetime.UTC).timestamp()
        restarted = [e for e in _log(node) if e["event"] == "child_restarted" and e["child_id"] == "websocket"]
        logged_at = datetime.datetime.fromisoformat(restarted[0]["timestamp"].replace("Z", "+00:00")).timestamp()
        print(f"restart on the page {seen_at - logged_at:.3f} s after its log line (upper bound, incl. polling)")

        browser.execute_script(f"{child('transports', 'websocket')}.querySelector('.crash').click()")
        wait_for(browser, "document.getElementById('traceback').textContent.includes('Traceback')", "the traceback")

        for _ in range(11):  # the transports supervisor allows 10 restarts in 10 s
            node.crash("websocket")
        wait_for(
            browser,
            "document.querySelector('.sup[data-supervisor=\"transports\"]')?.dataset.escalations === '1'",
            "the escalation on the transports supervisor",
        )
        wait_for(
            browser,
            'document.querySelector(\'#timeline tr[data-event="supervisor_escalated"][data-supervisor="transports"]\')',
            "supervisor_escalated in the timeline",
        )
        wait_for(browser, f"{child('root', 'transports')}?.dataset.state === 'running'", "transports restarted by root")
        for handle in [node.send(bob.node_id, b"again %d" % i) for i in range(20)]:
            assert handle.wait(PAGE_WAIT).delivered
        wait_for(
            browser,
            "window.dashboardState.nodes[0].actors.some((a) => a.name === 'retrier' && a.in_per_s !== null)",
            "message rates (two status samples)",
        )
        wait_for(browser, "document.querySelectorAll('#actors tr').length > 3", "the actors' figures")
        peers = f"document.getElementById('peers').textContent.includes('{bob.node_id[:16]}')"
        wait_for(browser, peers, "bob as a peer")
        wait_for(browser, "document.getElementById('outbox').textContent.includes('normal 0')", "the outbox")
        wait_for(browser, "document.querySelector('#chart .restart-bar')", "restarts in the chart")
        weights = tmp_path / "weights.bin"
        weights.write_bytes(bytes(range(256)) * 4096 * 4)  # 4 MiB
        finished = node.send_file(bob.node_id, weights, kind="model").wait(PAGE_WAIT)
        assert finished.state == "done"
        row = f"document.querySelector('#transfers [data-transfer=\"{finished.transfer_id}\"]')"
        wait_for(browser, f"{row}?.textContent === '100.0 %'", "the transfer, done, in the transfers table")
        transfers = browser.execute_script("return document.getElementById('transfers').textContent")
        assert "weights.bin" in transfers and "model" in transfers and "done" in transfers, transfers
        assert browser.execute_script("return window.__sameDocument") == "yes", "the page was reloaded"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def _log(node):
    import json

    return [json.loads(line) for line in node.log_path.read_text().splitlines()]
