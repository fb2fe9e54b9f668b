"""The dashboard in a real headless browser (Debian's chromium, driven over the DevTools
protocol: benchmarks/browser.py): the login form, the workers, a job's live output while
it runs, its result and its figure; and what is served without the token.

The screenshot is kept as a test artefact: $TEST_ARTIFACTS_DIR (default build/test-artifacts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from service_fixtures import REPO, start_server

from benchmarks import dashboard
from benchmarks.browser import Browser, find_chromium
from executor_service import auth
from executor_service import dashboard as page

pytestmark = pytest.mark.timeout(240)

TOKEN = "dashboard-token-7f3a"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "build" / "test-artifacts"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    srv = start_server(tmp_path_factory, "dash", env={"EXECUTOR_API_TOKEN": TOKEN}, token=TOKEN)
    yield srv
    srv.close()


@pytest.fixture
def browser():
    if find_chromium() is None:
        pytest.skip("chromium is not installed (deployment/system-deps.sh installs it as root)")
    with Browser() as b:
        yield b


def test_the_page_shows_the_workers_and_a_jobs_live_output_result_and_figure(secured, browser):
    def submit(code: str) -> str:
        resp = secured.post("/jobs", {"paper_id": "resnet_demo", "code": code})
        assert resp.status == 202, resp.json
        return resp.json["job_id"]

    gates = []

    def gate(job_id: str) -> None:
        # The output was on the page before this: the job was still waiting here.
        assert secured.get(f"/jobs/{job_id}").json["status"] == "running"
        gates.append(job_id)
        (secured.work_dir / "jobs" / job_id / "go").touch()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shown = dashboard.show_job(browser, secured.url, submit, gate, shot, token=TOKEN)
    assert gates == [shown["job_id"]]
    assert "epoch 1/5  loss 1.2" in shown["live_output"]
    # One row per process: each slot's spares (and the job's process while it runs).
    rows = browser.eval("[...document.querySelectorAll('#workers tr')]"
                        ".map(r => [r.children[1].textContent, r.children[2].textContent])")
    assert {slot for slot, _ in rows} == {"0", "1"}
    assert {state for _, state in rows} <= {"idle", "busy", "checking", "starting", "parked", "opening"}
    assert browser.eval("document.getElementById('job-result').textContent").count("training_loss") >= 1
    row = browser.eval(f"document.querySelector('#jobs tr[data-job=\"{shown['job_id']}\"]').textContent")
    assert "0.24" in row and "0.91" in row  # training_loss and validation_accuracy in the table
    assert browser.eval("document.querySelectorAll('#chart rect').length") >= 1
    assert browser.eval("sessionStorage.getItem('trainium-executor-token')") == TOKEN
    # No script error, no CSP violation; only the first calls, before the token, were refused.
    assert [p for p in browser.problems() if "status of 401" not in p] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown["screenshot_bytes"] > 10_000


def test_without_the_token_the_page_shows_only_the_login_form(secured, browser):
    browser.goto(secured.url + "/")
    browser.wait_for("!document.getElementById('login').hidden")
    assert browser.eval("document.getElementById('main').hidden")
    assert browser.eval("document.querySelectorAll('#workers tr').length") == 0
    browser.type_into("#token", "wrong-token")
    browser.eval("document.querySelector('#login-form button').click()")
    browser.wait_for("document.getElementById('login-error').textContent.includes('refused')")
    assert browser.eval("document.getElementById('main').hidden")


def test_the_static_files_are_public_hold_no_data_and_carry_strict_headers(secured):
    job_id = secured.post("/execute", {"code": "print('secret output')"}).json["job_id"]
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):
        resp = secured.get(path, token=None)
        assert resp.status == 200, path
        assert job_id.encode() not in resp.raw and b"secret output" not in resp.raw
        assert "default-src 'none'" in resp.headers["content-security-policy"]
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["x-frame-options"] == "DENY"
    assert secured.get("/", token=None).headers["content-type"].startswith("text/html")
    assert secured.get("/dashboard/app.js", token=None).headers["content-type"].startswith("text/javascript")
    assert secured.get("/dashboard/secrets.js", token=None).status == 401
    assert secured.get("/dashboard/secrets.js").status == 404
    assert page.PUBLIC_PATHS <= auth.PUBLIC_PATHS


def test_the_page_script_never_writes_html():
    script = (REPO / "executor_service" / "dashboard" / "app.js").read_text()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
